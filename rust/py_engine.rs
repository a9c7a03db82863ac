//! The Gram-space engine as Python sees it: `gram` and `combine`, the two P-sized passes
//! every method in `mtbert.aggregation` runs, and `pcgrad`, which runs both with PCGrad's
//! T x T algebra between them (`crate::gram`, `crate::pcgrad`).

use std::hash::BuildHasher;

use numpy::{
    PyArray1, PyArray2, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use super::args::{checked_array, gram_out_array, out_array, threads_arg};
use super::errors::{detached, value, NativeResult};
// Aliased: `#[pyfunction]` puts a hidden item named after each function (`gram`, `pcgrad`).
use crate::gram::{self as engine, GradError};
use crate::pcgrad::{self as surgery, Reduction};

/// `grads` as a (T, P) float32 array with 1 <= T <= MAX_TASKS, and (T, P); checked
/// before anything T x T is allocated.
fn checked_grads<'py>(
    grads: &Bound<'py, PyAny>,
) -> NativeResult<(Bound<'py, PyArray2<f32>>, usize, usize)> {
    let untyped = checked_array::<f32>(grads, "grads", 2, "(T, P)", "float32")?;
    let (tasks, p) = (untyped.shape()[0], untyped.shape()[1]);
    engine::check_tasks(tasks)?;
    let arr = untyped
        .cast::<PyArray2<f32>>()
        .map_err(PyErr::from)?
        .clone();
    Ok((arr, tasks, p))
}

// ---------------------------------------------------------------------------------------
// gram: the (T, T) Gram matrix
// ---------------------------------------------------------------------------------------

/// The (T, T) float64 Gram matrix of the (T, P) float32 `grads`; see `_native.pyi`.
#[pyfunction]
#[pyo3(signature = (grads, *, num_threads=None))]
fn gram<'py>(
    py: Python<'py>,
    grads: &Bound<'py, PyAny>,
    num_threads: Option<&Bound<'py, PyAny>>,
) -> NativeResult<Bound<'py, PyArray2<f64>>> {
    let (grads_arr, tasks, _) = checked_grads(grads)?;
    let threads = threads_arg(num_threads)?;
    let ro = grads_arr
        .try_readonly()
        .map_err(|e| value(format!("grads: {e}")))?;
    let slice = ro.as_slice().map_err(|e| value(e.to_string()))?;
    let g = detached(py, "gram", || engine::gram(slice, tasks, threads))??;
    Ok(PyArray1::from_vec(py, g).reshape([tasks, tasks])?)
}

// ---------------------------------------------------------------------------------------
// combine: sum_k weights[k] * grads[k]
// ---------------------------------------------------------------------------------------

/// The T float64 `weights`, any real array-like holding exactly T values.
fn checked_weights(
    py: Python<'_>,
    weights: &Bound<'_, PyAny>,
    tasks: usize,
) -> NativeResult<Vec<f64>> {
    let bad = |e: PyErr| {
        value(format!(
            "weights must be {tasks} real numbers (shape ({tasks},)): {e}"
        ))
    };
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (weights,)).map_err(bad)?;
    // A cast to float64 would drop the imaginary part with only a warning.
    if arr.getattr("dtype")?.getattr("kind")?.extract::<String>()? == "c" {
        return Err(value(format!(
            "weights must be {tasks} real numbers, got dtype {}",
            arr.getattr("dtype")?
        )));
    }
    let arr = np.call_method1("asarray", (arr, "float64")).map_err(bad)?;
    let size: usize = arr.getattr("size")?.extract()?;
    if size != tasks {
        return Err(GradError::WeightsLength {
            expected: tasks,
            got: size,
        }
        .into());
    }
    arr.call_method1("reshape", (-1,))
        .and_then(|a| a.call_method0("tolist"))
        .and_then(|a| a.extract())
        .map_err(bad)
}

/// `sum_k weights[k] * grads[k]` of the (T, P) float32 `grads`; see `_native.pyi`.
#[pyfunction]
#[pyo3(signature = (grads, weights, *, out=None, num_threads=None))]
fn combine<'py>(
    py: Python<'py>,
    grads: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
    num_threads: Option<&Bound<'py, PyAny>>,
) -> NativeResult<Bound<'py, PyAny>> {
    let (grads_arr, tasks, p) = checked_grads(grads)?;
    let threads = threads_arg(num_threads)?;
    let weights = checked_weights(py, weights, tasks)?;
    let out_arr = out_array(py, out, p, &grads_arr)?;
    let grads_ro = grads_arr
        .try_readonly()
        .map_err(|e| value(format!("grads: {e}")))?;
    let mut out_rw = out_arr
        .try_readwrite()
        .map_err(|e| value(format!("out: {e}")))?;
    let grads_slice = grads_ro.as_slice().map_err(|e| value(e.to_string()))?;
    let out_slice = out_rw.as_slice_mut().map_err(|e| value(e.to_string()))?;
    detached(py, "combine", || {
        engine::combine_into(grads_slice, tasks, &weights, out_slice, threads)
    })??;
    drop(out_rw);
    Ok(out_arr.into_any())
}

// ---------------------------------------------------------------------------------------
// pcgrad: gram, PCGrad's T x T algebra, combine
// ---------------------------------------------------------------------------------------

/// The (T, T) order: an integer array-like, each row a permutation of 0..T.
fn checked_order(
    py: Python<'_>,
    order: &Bound<'_, PyAny>,
    tasks: usize,
) -> NativeResult<Vec<usize>> {
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (order,)).map_err(|e| {
        value(format!(
            "order must be an integer array of shape ({tasks}, {tasks}): {e}"
        ))
    })?;
    let untyped = arr.cast::<PyUntypedArray>().map_err(PyErr::from)?;
    let kind = untyped.dtype().kind();
    if kind != b'i' && kind != b'u' {
        return Err(value(format!(
            "order must be an integer array, got dtype {}",
            untyped.dtype()
        )));
    }
    if untyped.shape() != [tasks, tasks] {
        return Err(value(format!(
            "order must have shape ({tasks}, {tasks}), got {:?}",
            untyped.shape()
        )));
    }
    // uint64 values above 2**63 would wrap to negative int64: refuse them first.
    if kind == b'u' && untyped.dtype().itemsize() == 8 {
        let max: u64 = arr.call_method0("max")?.extract().unwrap_or(0);
        if max >= tasks as u64 {
            return Err(value(format!(
                "order has an entry {max}, not a task index in [0, {tasks})"
            )));
        }
    }
    let arr = np.call_method1("ascontiguousarray", (arr, "int64"))?;
    let arr = arr.cast::<PyArray2<i64>>().map_err(PyErr::from)?;
    let values = arr.to_vec().map_err(|e| value(format!("order: {e}")))?;
    Ok(surgery::checked_orders(&values, tasks)?)
}

fn checked_seed(seed: &Bound<'_, PyAny>) -> NativeResult<u64> {
    seed.extract::<u64>()
        .map_err(|_| value(format!("seed must be an integer in [0, 2**64), got {seed}")))
}

/// PCGrad of the (T, P) float32 `grads`; see `_native.pyi`.
#[pyfunction]
#[pyo3(signature = (grads, *, order=None, seed=None, reduction="mean", eps=1e-12, out=None, num_threads=None, gram_out=None))]
#[allow(clippy::too_many_arguments)]
fn pcgrad<'py>(
    py: Python<'py>,
    grads: &Bound<'py, PyAny>,
    order: Option<&Bound<'py, PyAny>>,
    seed: Option<&Bound<'py, PyAny>>,
    reduction: &str,
    eps: f64,
    out: Option<&Bound<'py, PyAny>>,
    num_threads: Option<&Bound<'py, PyAny>>,
    gram_out: Option<&Bound<'py, PyAny>>,
) -> NativeResult<Bound<'py, PyAny>> {
    // 1. Checks and extraction, holding the GIL.
    let (grads_arr, tasks, p) = checked_grads(grads)?;
    let reduction = Reduction::parse(reduction)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(GradError::BadEps(eps).into());
    }
    let threads = threads_arg(num_threads)?;
    let orders = match (order, seed) {
        (Some(order), _) => checked_order(py, order, tasks)?,
        (None, Some(seed)) => surgery::random_orders(tasks, checked_seed(seed)?),
        // No order and no seed: fresh orders from the standard library's random keys.
        (None, None) => surgery::random_orders(tasks, std::hash::RandomState::new().hash_one(p)),
    };
    let out_arr = out_array(py, out, p, &grads_arr)?;
    let gram_arr = gram_out.map(|g| gram_out_array(g, tasks)).transpose()?;
    let grads_ro = grads_arr
        .try_readonly()
        .map_err(|e| value(format!("grads: {e}")))?;
    let mut out_rw = out_arr
        .try_readwrite()
        .map_err(|e| value(format!("out: {e}")))?;
    let grads_slice = grads_ro.as_slice().map_err(|e| value(e.to_string()))?;
    let out_slice = out_rw.as_slice_mut().map_err(|e| value(e.to_string()))?;

    // 2. The work, without the GIL.
    let result = detached(py, "pcgrad", || {
        surgery::pcgrad_into(
            grads_slice,
            tasks,
            &orders,
            reduction,
            eps,
            out_slice,
            threads,
        )
    })??;

    // 3. Results.
    if let Some(g) = gram_arr {
        let mut rw = g
            .try_readwrite()
            .map_err(|e| value(format!("gram_out: {e}")))?;
        rw.as_slice_mut()
            .map_err(|e| value(e.to_string()))?
            .copy_from_slice(&result.gram);
    }
    drop(out_rw);
    Ok(out_arr.into_any())
}

/// Adds `pcgrad`, `gram`, `combine` and `MAX_TASKS` to `m`.
pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pcgrad, m)?)?;
    m.add("MAX_TASKS", engine::MAX_TASKS)?;
    m.add_function(wrap_pyfunction!(gram, m)?)?;
    m.add_function(wrap_pyfunction!(combine, m)?)?;
    Ok(())
}
