//! The Python binding: the only file that touches pyo3.
//!
//! Each entry point checks its arguments here or in the core (types, shapes, dtypes,
//! ranges, sizes; the Python wrappers do not repeat these checks), extracts its inputs
//! while holding the GIL, then runs the work with the GIL released in [`detached`].
//!
//! Guarantees at this boundary: every failure is a Python exception, never an abort.
//! [`NativeError`] is the one error type; its variant is the exception raised
//! (`ValueError`, `TypeError`, `MemoryError`; a Rust panic, which would be a bug,
//! becomes `RuntimeError`). Allocations sized by a caller's numbers are fallible, thread
//! counts are at most `pool::MAX_THREADS`, task counts (PCGrad, `gram`, `combine`) at most
//! `gram::MAX_TASKS`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// The binding's one error type: each variant names the Python exception it becomes.
enum NativeError {
    /// `ValueError`: an argument of the right type with a wrong value, shape or layout.
    Value(String),
    /// `TypeError`: an argument of the wrong type.
    Type(String),
    /// `MemoryError`: an output sized by the caller's numbers cannot be allocated.
    Memory(String),
    /// `RuntimeError`: a Rust panic caught at the boundary (a bug in mtbert).
    Internal(String),
    /// An exception raised by Python code the binding called, passed on unchanged.
    Python(PyErr),
}

type NativeResult<T> = Result<T, NativeError>;

impl From<NativeError> for PyErr {
    fn from(e: NativeError) -> PyErr {
        match e {
            NativeError::Value(m) => PyValueError::new_err(m),
            NativeError::Type(m) => PyTypeError::new_err(m),
            NativeError::Memory(m) => PyMemoryError::new_err(m),
            NativeError::Internal(m) => PyRuntimeError::new_err(m),
            NativeError::Python(e) => e,
        }
    }
}

impl From<PyErr> for NativeError {
    fn from(e: PyErr) -> Self {
        NativeError::Python(e)
    }
}

/// The Gram engine's errors (PCGrad's included: `pcgrad::PcgradError` is this type).
impl From<crate::gram::GradError> for NativeError {
    fn from(e: crate::gram::GradError) -> Self {
        NativeError::Value(e.to_string())
    }
}

impl From<crate::wordpiece::Error> for NativeError {
    fn from(e: crate::wordpiece::Error) -> Self {
        match e {
            crate::wordpiece::Error::OutOfMemory(m) => NativeError::Memory(m),
            other => NativeError::Value(other.to_string()),
        }
    }
}

/// Runs `f` with the GIL released; a panic becomes `NativeError::Internal`, never an abort.
fn detached<T: Send, F: Send + FnOnce() -> T>(py: Python<'_>, what: &str, f: F) -> NativeResult<T> {
    py.detach(|| catch_unwind(AssertUnwindSafe(f)))
        .map_err(|payload| {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            NativeError::Internal(format!("internal error in mtbert._native.{what}: {msg}"))
        })
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_string())
}

/// An integer argument (a Python int or anything with `__index__`, not a bool) as i64.
fn int_arg(obj: &Bound<'_, PyAny>, what: &str) -> NativeResult<i64> {
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
fn threads_arg(num_threads: Option<&Bound<'_, PyAny>>) -> NativeResult<usize> {
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

// ==== PCGrad binding (owned by the PCGrad work) ====
// In its own module so that its `use` lines never collide with another section's.
mod pcgrad_binding {
    use super::{detached, threads_arg, type_name, NativeError, NativeResult};
    use crate::pcgrad::{self as core, Reduction};
    use numpy::{
        PyArray1, PyArray2, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray,
        PyUntypedArrayMethods,
    };
    use pyo3::prelude::*;
    use std::hash::BuildHasher;
    use std::ops::Range;

    fn value(msg: impl Into<String>) -> NativeError {
        NativeError::Value(msg.into())
    }

    /// `obj` as a numpy array with `ndim` dimensions, dtype `T` (native byte order),
    /// C-contiguous and aligned; `name` and `shape` (e.g. "(T, P)") go into the messages.
    fn checked_array<'py, T: numpy::Element>(
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
    fn out_array<'py>(
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
            return Err(core::PcgradError::OutLength {
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
        Ok(core::checked_orders(&values, tasks)?)
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
        let untyped = checked_array::<f32>(grads, "grads", 2, "(T, P)", "float32")?;
        let (tasks, p) = (untyped.shape()[0], untyped.shape()[1]);
        core::check_tasks(tasks)?; // before anything T x T is allocated
        let reduction = Reduction::parse(reduction)?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(core::PcgradError::BadEps(eps).into());
        }
        let threads = threads_arg(num_threads)?;
        let orders = match (order, seed) {
            (Some(order), _) => checked_order(py, order, tasks)?,
            (None, Some(seed)) => core::random_orders(tasks, checked_seed(seed)?),
            // No order and no seed: fresh orders from the standard library's random keys.
            (None, None) => core::random_orders(tasks, std::hash::RandomState::new().hash_one(p)),
        };
        let grads_arr = untyped.cast::<PyArray2<f32>>().map_err(PyErr::from)?;
        let out_arr = out_array(py, out, p, grads_arr)?;
        let gram_arr = match gram_out {
            Some(g) => {
                let shape = format!("({tasks}, {tasks})");
                checked_array::<f64>(g, "gram_out", 2, &shape, "float64")?;
                let g = g.cast::<PyArray2<f64>>().map_err(PyErr::from)?.clone();
                if g.shape() != [tasks, tasks] {
                    return Err(value(format!(
                        "gram_out must have shape {shape}, got {:?}",
                        g.shape()
                    )));
                }
                Some(g)
            }
            None => None,
        };
        let grads_ro = grads_arr
            .try_readonly()
            .map_err(|e| value(format!("grads: {e}")))?;
        let mut out_rw = out_arr
            .try_readwrite()
            .map_err(|e| value(format!("out: {e}")))?;
        let grads_slice = grads_ro.as_slice().map_err(|e| value(e.to_string()))?;
        let out_slice = out_rw.as_slice_mut().map_err(|e| value(e.to_string()))?;

        // 2. The work, without the GIL.
        let surgery = detached(py, "pcgrad", || {
            core::pcgrad_into(
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
                .copy_from_slice(&surgery.gram);
        }
        drop(out_rw);
        Ok(out_arr.into_any())
    }

    type MatrixF64<'py> = Bound<'py, PyArray2<f64>>;

    /// Gram and cosine matrices of the (T, P) float32 `grads`; see `_native.pyi`.
    #[pyfunction]
    #[pyo3(signature = (grads, *, num_threads=None))]
    fn gradient_stats<'py>(
        py: Python<'py>,
        grads: &Bound<'py, PyAny>,
        num_threads: Option<&Bound<'py, PyAny>>,
    ) -> NativeResult<(MatrixF64<'py>, MatrixF64<'py>)> {
        let untyped = checked_array::<f32>(grads, "grads", 2, "(T, P)", "float32")?;
        let tasks = untyped.shape()[0];
        core::check_tasks(tasks)?;
        let threads = threads_arg(num_threads)?;
        let ro = untyped
            .cast::<PyArray2<f32>>()
            .map_err(PyErr::from)?
            .try_readonly()
            .map_err(|e| value(format!("grads: {e}")))?;
        let slice = ro.as_slice().map_err(|e| value(e.to_string()))?;
        let gram = detached(py, "gradient_stats", || core::gram(slice, tasks, threads))??;
        let cos = core::cosine(&gram, tasks);
        let to_array = |v: Vec<f64>| PyArray1::from_vec(py, v).reshape([tasks, tasks]);
        Ok((to_array(gram)?, to_array(cos)?))
    }

    // ==== Gram engine binding (owned by the multi-task methods work, issue 13) ====
    // The two P-sized passes every method in `mtbert.aggregation` runs: `gram` and
    // `combine`. Nested here so it calls the helpers above as they are.
    mod engine_binding {
        use super::{checked_array, detached, out_array, threads_arg, value, NativeResult};
        use crate::gram::{self as engine, GradError};
        use numpy::{PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
        use pyo3::prelude::*;

        /// The (T, T) float64 Gram matrix of the (T, P) float32 `grads`; see `_native.pyi`.
        #[pyfunction]
        #[pyo3(signature = (grads, *, num_threads=None))]
        fn gram<'py>(
            py: Python<'py>,
            grads: &Bound<'py, PyAny>,
            num_threads: Option<&Bound<'py, PyAny>>,
        ) -> NativeResult<Bound<'py, PyArray2<f64>>> {
            let untyped = checked_array::<f32>(grads, "grads", 2, "(T, P)", "float32")?;
            let tasks = untyped.shape()[0];
            engine::check_tasks(tasks)?; // before anything T x T is allocated
            let threads = threads_arg(num_threads)?;
            let ro = untyped
                .cast::<PyArray2<f32>>()
                .map_err(PyErr::from)?
                .try_readonly()
                .map_err(|e| value(format!("grads: {e}")))?;
            let slice = ro.as_slice().map_err(|e| value(e.to_string()))?;
            let g = detached(py, "gram", || engine::gram(slice, tasks, threads))??;
            Ok(PyArray1::from_vec(py, g).reshape([tasks, tasks])?)
        }

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
            Ok(arr
                .call_method1("reshape", (-1,))
                .and_then(|a| a.call_method0("tolist"))
                .and_then(|a| a.extract())
                .map_err(bad)?)
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
            let untyped = checked_array::<f32>(grads, "grads", 2, "(T, P)", "float32")?;
            let (tasks, p) = (untyped.shape()[0], untyped.shape()[1]);
            engine::check_tasks(tasks)?;
            let threads = threads_arg(num_threads)?;
            let weights = checked_weights(py, weights, tasks)?;
            let grads_arr = untyped.cast::<PyArray2<f32>>().map_err(PyErr::from)?;
            let out_arr = out_array(py, out, p, grads_arr)?;
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

        pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
            m.add_function(wrap_pyfunction!(gram, m)?)?;
            m.add_function(wrap_pyfunction!(combine, m)?)?;
            Ok(())
        }
    }
    pub use engine_binding::register as register_engine;
    // ==== end Gram engine binding ====

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(pcgrad, m)?)?;
        m.add_function(wrap_pyfunction!(gradient_stats, m)?)?;
        m.add("MAX_TASKS", core::MAX_TASKS)?;
        Ok(())
    }
}
// ==== end PCGrad binding ====

// ==== WordPiece binding (owned by the tokenizer work) ====
mod wordpiece_binding {
    use numpy::ndarray::Array2;
    use numpy::{IntoPyArray, PyArray2};
    use pyo3::prelude::*;
    use pyo3::types::PyString;

    use super::{detached, int_arg, threads_arg, type_name, NativeError, NativeResult};
    use crate::wordpiece::{BatchOptions, WordPiece};

    /// UTF-8 of one Python str; `what` names the argument in errors.
    fn utf8_of(obj: &Bound<'_, PyAny>, what: &str) -> NativeResult<String> {
        let s = obj.cast::<PyString>().map_err(|_| {
            NativeError::Type(format!("{what} must be str, not {}", type_name(obj)))
        })?;
        let bytes = s
            .encode_utf8()
            .map_err(|e| NativeError::Value(format!("{what} is not valid Unicode text: {e}")))?;
        // Python's UTF-8 encoder only produces valid UTF-8.
        String::from_utf8(bytes.as_bytes().to_vec())
            .map_err(|e| NativeError::Value(format!("{what} is not valid UTF-8: {e}")))
    }

    /// `max_length`: None, or an int >= 0.
    fn length_arg(obj: Option<&Bound<'_, PyAny>>) -> NativeResult<Option<usize>> {
        let Some(obj) = obj else { return Ok(None) };
        let n = int_arg(obj, "max_length").map_err(|e| match e {
            NativeError::Type(_) => NativeError::Type(format!(
                "max_length must be an int or None, not {}",
                type_name(obj)
            )),
            other => other,
        })?;
        usize::try_from(n)
            .map(Some)
            .map_err(|_| NativeError::Value(format!("max_length must be >= 0, not {n}")))
    }

    /// The texts of a sequence of str, copied into one UTF-8 arena.
    struct Texts {
        arena: String,
        spans: Vec<(usize, usize)>,
    }

    impl Texts {
        fn collect(obj: &Bound<'_, PyAny>, what: &str) -> NativeResult<Self> {
            if obj.is_instance_of::<PyString>() {
                return Err(NativeError::Type(format!(
                    "{what} must be a list of str, not a single str"
                )));
            }
            let iter = obj.try_iter().map_err(|_| {
                NativeError::Type(format!(
                    "{what} must be a list of str, not {}",
                    type_name(obj)
                ))
            })?;
            let mut arena = Vec::new();
            let mut spans = Vec::new();
            for (i, item) in iter.enumerate() {
                let item = item?;
                let s = item.cast::<PyString>().map_err(|_| {
                    NativeError::Type(format!("{what}[{i}] must be str, not {}", type_name(&item)))
                })?;
                let bytes = s.encode_utf8().map_err(|e| {
                    NativeError::Value(format!("{what}[{i}] is not valid Unicode text: {e}"))
                })?;
                // A list may repeat one huge str many times: grow fallibly.
                arena.try_reserve(bytes.as_bytes().len()).map_err(|_| {
                    NativeError::Memory(format!(
                        "{what}: cannot copy {} more bytes of text",
                        bytes.as_bytes().len()
                    ))
                })?;
                let start = arena.len();
                arena.extend_from_slice(bytes.as_bytes());
                spans.push((start, arena.len()));
            }
            let arena = String::from_utf8(arena)
                .map_err(|e| NativeError::Value(format!("{what} is not valid UTF-8: {e}")))?;
            Ok(Texts { arena, spans })
        }

        fn strs(&self) -> Vec<&str> {
            // Spans end where a whole Python str ended: always char boundaries.
            self.spans.iter().map(|&(a, b)| &self.arena[a..b]).collect()
        }
    }

    /// BERT WordPiece tokenizer (private; `mtbert.WordPieceTokenizer` is the public API).
    #[pyclass(name = "_WordPiece", module = "mtbert._native", frozen)]
    pub struct PyWordPiece {
        inner: WordPiece,
    }

    #[pymethods]
    impl PyWordPiece {
        /// Build from the contents of a vocab.txt file.
        #[new]
        #[pyo3(signature = (vocab_text, lowercase=true, strip_accents=None))]
        fn new(
            py: Python<'_>,
            vocab_text: &str,
            lowercase: bool,
            strip_accents: Option<bool>,
        ) -> NativeResult<Self> {
            let inner = detached(py, "_WordPiece", || {
                WordPiece::from_vocab_text(vocab_text, lowercase, strip_accents)
            })??;
            Ok(PyWordPiece { inner })
        }

        /// WordPiece tokens of `text` (no special tokens added).
        fn tokenize(&self, py: Python<'_>, text: &Bound<'_, PyAny>) -> NativeResult<Vec<String>> {
            let text = utf8_of(text, "text")?;
            detached(py, "_WordPiece.tokenize", || self.inner.tokenize(&text))
        }

        /// Ids of `[CLS] text [SEP]` or `[CLS] text [SEP] pair [SEP]`.
        #[pyo3(signature = (text, pair=None, max_length=None, truncation=true))]
        fn encode(
            &self,
            py: Python<'_>,
            text: &Bound<'_, PyAny>,
            pair: Option<&Bound<'_, PyAny>>,
            max_length: Option<&Bound<'_, PyAny>>,
            truncation: bool,
        ) -> NativeResult<Vec<u32>> {
            let a = utf8_of(text, "text")?;
            let b = pair.map(|p| utf8_of(p, "pair")).transpose()?;
            let max_length = length_arg(max_length)?;
            let ml = if truncation { max_length } else { None };
            let (ids, _types) = detached(py, "_WordPiece.encode", || {
                self.inner.encode(&a, b.as_deref(), ml)
            })??;
            Ok(ids)
        }

        /// (input_ids, token_type_ids, attention_mask): int64 arrays of shape (N, L).
        #[pyo3(signature = (texts, pairs=None, max_length=None, truncation=true, pad_to_max_length=false, num_threads=None))]
        #[allow(clippy::too_many_arguments, clippy::type_complexity)]
        fn encode_batch<'py>(
            &self,
            py: Python<'py>,
            texts: &Bound<'py, PyAny>,
            pairs: Option<&Bound<'py, PyAny>>,
            max_length: Option<&Bound<'py, PyAny>>,
            truncation: bool,
            pad_to_max_length: bool,
            num_threads: Option<&Bound<'py, PyAny>>,
        ) -> NativeResult<(
            Bound<'py, PyArray2<i64>>,
            Bound<'py, PyArray2<i64>>,
            Bound<'py, PyArray2<i64>>,
        )> {
            let a = Texts::collect(texts, "texts")?;
            let b = pairs.map(|p| Texts::collect(p, "pairs")).transpose()?;
            let opts = BatchOptions {
                max_length: length_arg(max_length)?,
                truncation,
                pad_to_max_length,
            };
            let threads = threads_arg(num_threads)?;
            let batch = detached(py, "_WordPiece.encode_batch", || {
                let a = a.strs();
                let b = b.as_ref().map(|b| b.strs());
                self.inner.encode_batch(&a, b.as_deref(), opts, threads)
            })??;
            let shape = (batch.rows, batch.cols);
            let to_np = |v: Vec<i64>| -> NativeResult<Bound<'py, PyArray2<i64>>> {
                // The Vec becomes the array's buffer: no copy.
                let arr = Array2::from_shape_vec(shape, v)
                    .map_err(|e| NativeError::Internal(e.to_string()))?;
                Ok(arr.into_pyarray(py))
            };
            Ok((
                to_np(batch.input_ids)?,
                to_np(batch.token_type_ids)?,
                to_np(batch.attention_mask)?,
            ))
        }

        /// The id of `token`, or None when not in the vocabulary.
        fn token_to_id(&self, token: &str) -> Option<u32> {
            self.inner.token_to_id(token)
        }

        /// Every token, by id.
        fn tokens(&self) -> Vec<String> {
            (0..self.inner.vocab_size() as u32)
                .filter_map(|i| self.inner.id_to_token(i))
                .map(str::to_string)
                .collect()
        }

        #[getter]
        fn vocab_size(&self) -> usize {
            self.inner.vocab_size()
        }
        #[getter]
        fn lowercase(&self) -> bool {
            self.inner.lowercase()
        }
        #[getter]
        fn strip_accents(&self) -> bool {
            self.inner.strip_accents()
        }
        #[getter]
        fn unk_id(&self) -> u32 {
            self.inner.unk_id()
        }
        #[getter]
        fn cls_id(&self) -> u32 {
            self.inner.cls_id()
        }
        #[getter]
        fn sep_id(&self) -> u32 {
            self.inner.sep_id()
        }
        #[getter]
        fn pad_id(&self) -> u32 {
            self.inner.pad_id()
        }
        #[getter]
        fn mask_id(&self) -> Option<u32> {
            self.inner.mask_id()
        }
    }
}
// ==== end WordPiece binding ====

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // ==== PCGrad registrations ====
    pcgrad_binding::register(m)?;
    // ==== end PCGrad registrations ====
    // ==== Gram engine registrations (issue 13) ====
    pcgrad_binding::register_engine(m)?;
    // ==== end Gram engine registrations ====
    // ==== WordPiece registrations ====
    m.add_class::<wordpiece_binding::PyWordPiece>()?;
    // ==== end WordPiece registrations ====
    m.add("MAX_THREADS", crate::pool::MAX_THREADS)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
