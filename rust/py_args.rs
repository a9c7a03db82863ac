//! Argument checks shared by the entry points: integers and thread counts (the engine
//! and the tokenizer), and the numpy arrays of the Gram-space engine (`grads`, `out=`,
//! `gram_out=`).

use std::ops::Range;

use numpy::{
    PyArray1, PyArray2, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use super::errors::{value, NativeError, NativeResult};
use crate::gram::GradError;

/// The name of `obj`'s type, for messages.
pub(super) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_string())
}

// ---------------------------------------------------------------------------------------
// Integers and thread counts
// ---------------------------------------------------------------------------------------

/// An integer argument (a Python int or anything with `__index__`, not a bool) as i64.
pub(super) fn int_arg(obj: &Bound<'_, PyAny>, what: &str) -> NativeResult<i64> {
    if obj.is_instance_of::<pyo3::types::PyBool>() {
        return Err(NativeError::Type(format!(
            "{what} must be an int, not bool"
        )));
    }
    obj.extract::<i64>().map_err(|_| {
        if obj.hasattr("__index__").unwrap_or(false) {
            NativeError::Value(format!("{what} is out of range: {obj}"))
        } else {
            NativeError::Type(format!("{what} must be an int, not {}", type_name(obj)))
        }
    })
}

/// `num_threads`: 0 or None (all cores) up to `pool::MAX_THREADS`, as a worker count.
pub(super) fn threads_arg(num_threads: Option<&Bound<'_, PyAny>>) -> NativeResult<usize> {
    let negative = || {
        NativeError::Value(format!(
            "num_threads must be >= 0 (0: all cores), got {}",
            num_threads.map_or(String::new(), |o| o.to_string())
        ))
    };
    let n = match num_threads {
        Some(obj) if !obj.is_none() => match int_arg(obj, "num_threads") {
            Ok(n) => usize::try_from(n).map_err(|_| negative())?,
            // Beyond i64: as too many threads (or too few) as any other count.
            Err(NativeError::Value(_)) if obj.lt(0)? => return Err(negative()),
            Err(NativeError::Value(_)) => usize::MAX,
            Err(e) => return Err(e),
        },
        _ => 0,
    };
    crate::pool::checked_threads(n, "num_threads").map_err(|_| {
        NativeError::Value(format!(
            "num_threads must be at most {} (0: all cores), got {}",
            crate::pool::MAX_THREADS,
            num_threads.map_or(String::new(), |o| o.to_string())
        ))
    })
}

// ---------------------------------------------------------------------------------------
// numpy arrays
// ---------------------------------------------------------------------------------------

/// `obj` as a numpy array with `ndim` dimensions, dtype `T` (native byte order),
/// C-contiguous and aligned; `name` and `shape` (e.g. "(T, P)") go into the messages.
pub(super) fn checked_array<'py, T: numpy::Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    ndim: usize,
    shape: &str,
    dtype: &str,
) -> NativeResult<Bound<'py, PyUntypedArray>> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        value(format!(
            "{name} must be a numpy.ndarray of {dtype} with shape {shape}, got {} \
             (use tensor.numpy() for a CPU torch tensor)",
            type_name(obj)
        ))
    })?;
    if arr.ndim() != ndim {
        return Err(value(format!(
            "{name} must have {ndim} dimension(s) {shape}, got shape {:?}",
            arr.shape()
        )));
    }
    if !arr.dtype().is_equiv_to(&numpy::dtype::<T>(obj.py())) {
        return Err(value(format!(
            "{name} must have dtype {dtype} (native byte order), got {}",
            arr.dtype()
        )));
    }
    if !arr.is_c_contiguous() {
        return Err(value(format!(
            "{name} must be C-contiguous (use numpy.ascontiguousarray or tensor.contiguous())"
        )));
    }
    if !arr.is_aligned() {
        return Err(value(format!("{name} must be aligned")));
    }
    Ok(arr.clone())
}

fn byte_range<T: numpy::Element, D: numpy::ndarray::Dimension>(
    arr: &Bound<'_, numpy::PyArray<T, D>>,
) -> Range<usize> {
    let start = arr.data() as usize;
    start..start + arr.len() * std::mem::size_of::<T>()
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

/// The caller's `out`, checked as a (P,) float32 array apart from `grads`, or a new
/// zeroed one (the result of `pcgrad` and `combine`).
pub(super) fn out_array<'py>(
    py: Python<'py>,
    out: Option<&Bound<'py, PyAny>>,
    p: usize,
    grads: &Bound<'py, PyArray2<f32>>,
) -> NativeResult<Bound<'py, PyArray1<f32>>> {
    let Some(out) = out else {
        return Ok(PyArray1::<f32>::zeros(py, p, false));
    };
    checked_array::<f32>(out, "out", 1, &format!("({p},)"), "float32")?;
    let out = out.cast::<PyArray1<f32>>().map_err(PyErr::from)?.clone();
    if out.len() != p {
        return Err(GradError::OutLength {
            expected: p,
            got: out.len(),
        }
        .into());
    }
    if p > 0 && overlaps(&byte_range(&out), &byte_range(grads)) {
        return Err(value("out must not overlap grads"));
    }
    Ok(out)
}

/// The caller's `gram_out`, checked as a (T, T) float64 array.
pub(super) fn gram_out_array<'py>(
    gram_out: &Bound<'py, PyAny>,
    tasks: usize,
) -> NativeResult<Bound<'py, PyArray2<f64>>> {
    let shape = format!("({tasks}, {tasks})");
    checked_array::<f64>(gram_out, "gram_out", 2, &shape, "float64")?;
    let g = gram_out
        .cast::<PyArray2<f64>>()
        .map_err(PyErr::from)?
        .clone();
    if g.shape() != [tasks, tasks] {
        return Err(value(format!(
            "gram_out must have shape {shape}, got {:?}",
            g.shape()
        )));
    }
    Ok(g)
}
