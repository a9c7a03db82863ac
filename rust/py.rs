//! The Python binding: the only file that touches pyo3.
//!
//! Each entry point checks shapes, dtypes and types, raises `ValueError` with a
//! clear message, extracts its inputs while holding the GIL, then releases the
//! GIL (`py.detach`) for the work.

use pyo3::prelude::*;

// ==== PCGrad binding (owned by the PCGrad work) ====
// In its own module so that its `use` lines never collide with another section's.
mod pcgrad_binding {
    use crate::pcgrad::{self as core, PcgradError, Reduction};
    use numpy::{
        PyArray1, PyArray2, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray,
        PyUntypedArrayMethods,
    };
    use pyo3::exceptions::{PyRuntimeError, PyValueError};
    use pyo3::prelude::*;
    use std::hash::BuildHasher;
    use std::ops::Range;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    fn value_error(e: PcgradError) -> PyErr {
        PyValueError::new_err(e.to_string())
    }

    /// Runs `f` with the GIL released; a panic becomes a `RuntimeError`, never an abort.
    fn detached<T: Send, F: Send + FnOnce() -> T>(py: Python<'_>, what: &str, f: F) -> PyResult<T> {
        py.detach(|| catch_unwind(AssertUnwindSafe(f)))
            .map_err(|payload| {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_string());
                PyRuntimeError::new_err(format!("internal error in mtbert._native.{what}: {msg}"))
            })
    }

    fn type_name(obj: &Bound<'_, PyAny>) -> String {
        obj.get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".to_string())
    }

    /// `obj` as a numpy array with `ndim` dimensions, dtype `T` (native byte order),
    /// C-contiguous and aligned; `name` and `shape` (e.g. "(T, P)") go into the messages.
    fn checked_array<'py, T: numpy::Element>(
        obj: &Bound<'py, PyAny>,
        name: &str,
        ndim: usize,
        shape: &str,
        dtype: &str,
    ) -> PyResult<Bound<'py, PyUntypedArray>> {
        let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
            PyValueError::new_err(format!(
                "{name} must be a numpy.ndarray of {dtype} with shape {shape}, got {} \
                 (use tensor.numpy() for a CPU torch tensor)",
                type_name(obj)
            ))
        })?;
        if arr.ndim() != ndim {
            return Err(PyValueError::new_err(format!(
                "{name} must have {ndim} dimension(s) {shape}, got shape {:?}",
                arr.shape()
            )));
        }
        if !arr.dtype().is_equiv_to(&numpy::dtype::<T>(obj.py())) {
            return Err(PyValueError::new_err(format!(
                "{name} must have dtype {dtype} (native byte order), got {}",
                arr.dtype()
            )));
        }
        if !arr.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "{name} must be C-contiguous (use numpy.ascontiguousarray or tensor.contiguous())"
            )));
        }
        if !arr.is_aligned() {
            return Err(PyValueError::new_err(format!("{name} must be aligned")));
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

    /// The (T, T) order: an integer array-like, entries in [0, T).
    fn checked_order(
        py: Python<'_>,
        order: &Bound<'_, PyAny>,
        tasks: usize,
    ) -> PyResult<Vec<usize>> {
        let np = py.import("numpy")?;
        let arr = np.call_method1("asarray", (order,)).map_err(|e| {
            PyValueError::new_err(format!(
                "order must be an integer array of shape ({tasks}, {tasks}): {e}"
            ))
        })?;
        let untyped = arr.cast::<PyUntypedArray>()?;
        let kind = untyped.dtype().kind();
        if kind != b'i' && kind != b'u' {
            return Err(PyValueError::new_err(format!(
                "order must be an integer array, got dtype {}",
                untyped.dtype()
            )));
        }
        if untyped.shape() != [tasks, tasks] {
            return Err(PyValueError::new_err(format!(
                "order must have shape ({tasks}, {tasks}), got {:?}",
                untyped.shape()
            )));
        }
        let arr = np.call_method1("ascontiguousarray", (arr, "int64"))?;
        let arr = arr.cast::<PyArray2<i64>>()?;
        let values = arr
            .to_vec()
            .map_err(|e| PyValueError::new_err(format!("order: {e}")))?;
        core::checked_orders(&values, tasks).map_err(value_error)
    }

    fn checked_seed(seed: &Bound<'_, PyAny>) -> PyResult<u64> {
        seed.extract::<u64>().map_err(|_| {
            PyValueError::new_err(format!("seed must be an integer in [0, 2**64), got {seed}"))
        })
    }

    fn checked_threads(num_threads: i64) -> PyResult<usize> {
        usize::try_from(num_threads).map_err(|_| {
            PyValueError::new_err(format!(
                "num_threads must be >= 0 (0: all cores), got {num_threads}"
            ))
        })
    }

    /// PCGrad of the (T, P) float32 `grads`; see `_native.pyi`.
    #[pyfunction]
    #[pyo3(signature = (grads, *, order=None, seed=None, reduction="mean", eps=1e-12, out=None, num_threads=0, gram_out=None))]
    #[allow(clippy::too_many_arguments)]
    fn pcgrad<'py>(
        py: Python<'py>,
        grads: &Bound<'py, PyAny>,
        order: Option<&Bound<'py, PyAny>>,
        seed: Option<&Bound<'py, PyAny>>,
        reduction: &str,
        eps: f64,
        out: Option<&Bound<'py, PyAny>>,
        num_threads: i64,
        gram_out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // 1. Checks and extraction, holding the GIL.
        let untyped = checked_array::<f32>(grads, "grads", 2, "(T, P)", "float32")?;
        let (tasks, p) = (untyped.shape()[0], untyped.shape()[1]);
        if tasks < 1 {
            return Err(value_error(PcgradError::NoTasks));
        }
        let reduction = Reduction::parse(reduction).map_err(value_error)?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(value_error(PcgradError::BadEps(eps)));
        }
        let threads = checked_threads(num_threads)?;
        let orders = match (order, seed) {
            (Some(order), _) => checked_order(py, order, tasks)?,
            (None, Some(seed)) => core::random_orders(tasks, checked_seed(seed)?),
            // No order and no seed: fresh orders from the standard library's random keys.
            (None, None) => core::random_orders(tasks, std::hash::RandomState::new().hash_one(p)),
        };
        let grads_arr = untyped.cast::<PyArray2<f32>>()?;
        let out_arr: Bound<'py, PyArray1<f32>> = match out {
            Some(out) => {
                let shape = format!("({p},)");
                checked_array::<f32>(out, "out", 1, &shape, "float32")?;
                let out = out.cast::<PyArray1<f32>>()?.clone();
                if out.len() != p {
                    return Err(value_error(PcgradError::OutLength {
                        expected: p,
                        got: out.len(),
                    }));
                }
                if p > 0 && overlaps(&byte_range(&out), &byte_range(grads_arr)) {
                    return Err(PyValueError::new_err("out must not overlap grads"));
                }
                out
            }
            None => PyArray1::<f32>::zeros(py, p, false),
        };
        let gram_arr = match gram_out {
            Some(g) => {
                let shape = format!("({tasks}, {tasks})");
                checked_array::<f64>(g, "gram_out", 2, &shape, "float64")?;
                let g = g.cast::<PyArray2<f64>>()?.clone();
                if g.shape() != [tasks, tasks] {
                    return Err(PyValueError::new_err(format!(
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
            .map_err(|e| PyValueError::new_err(format!("grads: {e}")))?;
        let mut out_rw = out_arr
            .try_readwrite()
            .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
        let grads_slice = grads_ro
            .as_slice()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let out_slice = out_rw
            .as_slice_mut()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;

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
        })?
        .map_err(value_error)?;

        // 3. Results.
        if let Some(g) = gram_arr {
            let mut rw = g
                .try_readwrite()
                .map_err(|e| PyValueError::new_err(format!("gram_out: {e}")))?;
            rw.as_slice_mut()
                .map_err(|e| PyValueError::new_err(e.to_string()))?
                .copy_from_slice(&surgery.gram);
        }
        drop(out_rw);
        Ok(out_arr.into_any())
    }

    type MatrixF64<'py> = Bound<'py, PyArray2<f64>>;

    /// Gram and cosine matrices of the (T, P) float32 `grads`; see `_native.pyi`.
    #[pyfunction]
    #[pyo3(signature = (grads, *, num_threads=0))]
    fn gradient_stats<'py>(
        py: Python<'py>,
        grads: &Bound<'py, PyAny>,
        num_threads: i64,
    ) -> PyResult<(MatrixF64<'py>, MatrixF64<'py>)> {
        let untyped = checked_array::<f32>(grads, "grads", 2, "(T, P)", "float32")?;
        let tasks = untyped.shape()[0];
        if tasks < 1 {
            return Err(value_error(PcgradError::NoTasks));
        }
        let threads = checked_threads(num_threads)?;
        let ro = untyped
            .cast::<PyArray2<f32>>()?
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("grads: {e}")))?;
        let slice = ro
            .as_slice()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let gram = detached(py, "gradient_stats", || core::gram(slice, tasks, threads))?
            .map_err(value_error)?;
        let cos = core::cosine(&gram, tasks);
        let to_array = |v: Vec<f64>| PyArray1::from_vec(py, v).reshape([tasks, tasks]);
        Ok((to_array(gram)?, to_array(cos)?))
    }

    /// The (T, T) int64 orders that `pcgrad(..., seed=seed)` uses; see `_native.pyi`.
    #[pyfunction]
    fn pcgrad_orders<'py>(
        py: Python<'py>,
        num_tasks: i64,
        seed: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<i64>>> {
        let tasks = usize::try_from(num_tasks)
            .ok()
            .filter(|&t| t >= 1)
            .ok_or_else(|| {
                PyValueError::new_err(format!("num_tasks must be >= 1, got {num_tasks}"))
            })?;
        let orders: Vec<i64> = core::random_orders(tasks, checked_seed(seed)?)
            .into_iter()
            .map(|v| v as i64)
            .collect();
        PyArray1::from_vec(py, orders).reshape([tasks, tasks])
    }

    // ==== Gram engine binding (owned by the multi-task methods work, issue 13) ====
    // The two P-sized passes every method in `mtbert.aggregation` runs: `gram` and
    // `combine`. Nested here so it calls the helpers above as they are.
    mod engine_binding {
        use super::{byte_range, checked_array, checked_threads, detached, overlaps, value_error};
        use crate::gram::{self as engine, GradError};
        use numpy::{PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
        use pyo3::exceptions::PyValueError;
        use pyo3::prelude::*;

        /// The (T, T) float64 Gram matrix of the (T, P) float32 `grads`; see `_native.pyi`.
        #[pyfunction]
        #[pyo3(signature = (grads, *, num_threads=0))]
        fn gram<'py>(
            py: Python<'py>,
            grads: &Bound<'py, PyAny>,
            num_threads: i64,
        ) -> PyResult<Bound<'py, PyArray2<f64>>> {
            let untyped = checked_array::<f32>(grads, "grads", 2, "(T, P)", "float32")?;
            let tasks = untyped.shape()[0];
            if tasks < 1 {
                return Err(value_error(GradError::NoTasks));
            }
            let threads = checked_threads(num_threads)?;
            let ro = untyped
                .cast::<PyArray2<f32>>()?
                .try_readonly()
                .map_err(|e| PyValueError::new_err(format!("grads: {e}")))?;
            let slice = ro
                .as_slice()
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            let g = detached(py, "gram", || engine::gram(slice, tasks, threads))?
                .map_err(value_error)?;
            PyArray1::from_vec(py, g).reshape([tasks, tasks])
        }

        /// `sum_k weights[k] * grads[k]` of the (T, P) float32 `grads`; see `_native.pyi`.
        #[pyfunction]
        #[pyo3(signature = (grads, weights, *, out=None, num_threads=0))]
        fn combine<'py>(
            py: Python<'py>,
            grads: &Bound<'py, PyAny>,
            weights: &Bound<'py, PyAny>,
            out: Option<&Bound<'py, PyAny>>,
            num_threads: i64,
        ) -> PyResult<Bound<'py, PyAny>> {
            let untyped = checked_array::<f32>(grads, "grads", 2, "(T, P)", "float32")?;
            let (tasks, p) = (untyped.shape()[0], untyped.shape()[1]);
            if tasks < 1 {
                return Err(value_error(GradError::NoTasks));
            }
            let threads = checked_threads(num_threads)?;
            let weights: Vec<f64> = py
                .import("numpy")?
                .call_method1("asarray", (weights, "float64"))
                .and_then(|a| a.call_method1("reshape", (-1,)))
                .and_then(|a| a.call_method0("tolist"))
                .and_then(|a| a.extract())
                .map_err(|e| {
                    PyValueError::new_err(format!(
                        "weights must be {tasks} real numbers (shape ({tasks},)): {e}"
                    ))
                })?;
            let grads_arr = untyped.cast::<PyArray2<f32>>()?;
            let out_arr: Bound<'py, PyArray1<f32>> = match out {
                Some(out) => {
                    let shape = format!("({p},)");
                    checked_array::<f32>(out, "out", 1, &shape, "float32")?;
                    let out = out.cast::<PyArray1<f32>>()?.clone();
                    if out.len() != p {
                        return Err(value_error(GradError::OutLength {
                            expected: p,
                            got: out.len(),
                        }));
                    }
                    if p > 0 && overlaps(&byte_range(&out), &byte_range(grads_arr)) {
                        return Err(PyValueError::new_err("out must not overlap grads"));
                    }
                    out
                }
                None => PyArray1::<f32>::zeros(py, p, false),
            };
            let grads_ro = grads_arr
                .try_readonly()
                .map_err(|e| PyValueError::new_err(format!("grads: {e}")))?;
            let mut out_rw = out_arr
                .try_readwrite()
                .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
            let grads_slice = grads_ro
                .as_slice()
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            let out_slice = out_rw
                .as_slice_mut()
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            detached(py, "combine", || {
                engine::combine_into(grads_slice, tasks, &weights, out_slice, threads)
            })?
            .map_err(value_error)?;
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
        m.add_function(wrap_pyfunction!(pcgrad_orders, m)?)?;
        Ok(())
    }
}
// ==== end PCGrad binding ====

// ==== WordPiece binding (owned by the tokenizer work) ====
mod wordpiece_binding {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::path::PathBuf;

    use numpy::ndarray::Array2;
    use numpy::{IntoPyArray, PyArray2};
    use pyo3::exceptions::{
        PyFileNotFoundError, PyOSError, PyRuntimeError, PyTypeError, PyValueError,
    };
    use pyo3::prelude::*;
    use pyo3::types::PyString;

    use crate::wordpiece::{BatchOptions, Error, WordPiece};

    fn to_py_err(e: Error) -> PyErr {
        PyValueError::new_err(e.to_string())
    }

    /// Run `f`, turning a Rust panic into a Python RuntimeError.
    fn no_panic<T>(f: impl FnOnce() -> T) -> PyResult<T> {
        catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            PyRuntimeError::new_err(format!("internal error in the WordPiece tokenizer: {msg}"))
        })
    }

    fn type_name(obj: &Bound<'_, PyAny>) -> String {
        obj.get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into())
    }

    /// UTF-8 of one Python str; `what` names the argument in errors.
    fn utf8_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
        let s = obj.cast::<PyString>().map_err(|_| {
            PyTypeError::new_err(format!("{what} must be str, not {}", type_name(obj)))
        })?;
        let bytes = s
            .encode_utf8()
            .map_err(|e| PyValueError::new_err(format!("{what} is not valid Unicode text: {e}")))?;
        // Python's UTF-8 encoder only produces valid UTF-8.
        String::from_utf8(bytes.as_bytes().to_vec())
            .map_err(|e| PyValueError::new_err(format!("{what} is not valid UTF-8: {e}")))
    }

    /// The texts of a sequence of str, copied into one UTF-8 arena.
    struct Texts {
        arena: String,
        spans: Vec<(usize, usize)>,
    }

    impl Texts {
        fn collect(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Self> {
            if obj.is_instance_of::<PyString>() {
                return Err(PyTypeError::new_err(format!(
                    "{what} must be a list of str, not a single str"
                )));
            }
            let iter = obj.try_iter().map_err(|_| {
                PyTypeError::new_err(format!(
                    "{what} must be a list of str, not {}",
                    type_name(obj)
                ))
            })?;
            let mut arena = Vec::new();
            let mut spans = Vec::new();
            for (i, item) in iter.enumerate() {
                let item = item?;
                let s = item.cast::<PyString>().map_err(|_| {
                    PyTypeError::new_err(format!(
                        "{what}[{i}] must be str, not {}",
                        type_name(&item)
                    ))
                })?;
                let bytes = s.encode_utf8().map_err(|e| {
                    PyValueError::new_err(format!("{what}[{i}] is not valid Unicode text: {e}"))
                })?;
                let start = arena.len();
                arena.extend_from_slice(bytes.as_bytes());
                spans.push((start, arena.len()));
            }
            let arena = String::from_utf8(arena)
                .map_err(|e| PyValueError::new_err(format!("{what} is not valid UTF-8: {e}")))?;
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
        ) -> PyResult<Self> {
            let inner = py
                .detach(|| {
                    no_panic(|| WordPiece::from_vocab_text(vocab_text, lowercase, strip_accents))
                })?
                .map_err(to_py_err)?;
            Ok(PyWordPiece { inner })
        }

        /// Build from a vocab.txt path.
        #[staticmethod]
        #[pyo3(signature = (path, lowercase=true, strip_accents=None))]
        fn from_file(
            py: Python<'_>,
            path: PathBuf,
            lowercase: bool,
            strip_accents: Option<bool>,
        ) -> PyResult<Self> {
            let text = std::fs::read(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(format!(
                    "vocab file {:?} does not exist",
                    path.display().to_string()
                )),
                _ => PyOSError::new_err(format!(
                    "cannot read vocab file {:?}: {e}",
                    path.display().to_string()
                )),
            })?;
            let text = String::from_utf8(text).map_err(|e| {
                PyValueError::new_err(format!(
                    "vocab file {:?} is not UTF-8: {e}",
                    path.display().to_string()
                ))
            })?;
            Self::new(py, &text, lowercase, strip_accents)
        }

        /// WordPiece tokens of `text` (no special tokens added).
        fn tokenize(&self, py: Python<'_>, text: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
            let text = utf8_of(text, "text")?;
            py.detach(|| no_panic(|| self.inner.tokenize(&text)))
        }

        /// Normalized, pre-tokenized words of `text` (the input of WordPiece).
        fn words(&self, py: Python<'_>, text: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
            let text = utf8_of(text, "text")?;
            py.detach(|| no_panic(|| self.inner.words(&text)))
        }

        /// Ids of `[CLS] text [SEP]` or `[CLS] text [SEP] pair [SEP]`.
        #[pyo3(signature = (text, pair=None, max_length=None, truncation=true))]
        fn encode(
            &self,
            py: Python<'_>,
            text: &Bound<'_, PyAny>,
            pair: Option<&Bound<'_, PyAny>>,
            max_length: Option<usize>,
            truncation: bool,
        ) -> PyResult<Vec<u32>> {
            let a = utf8_of(text, "text")?;
            let b = pair.map(|p| utf8_of(p, "pair")).transpose()?;
            let ml = if truncation { max_length } else { None };
            let (ids, _types) = py
                .detach(|| no_panic(|| self.inner.encode(&a, b.as_deref(), ml)))?
                .map_err(to_py_err)?;
            Ok(ids)
        }

        /// (input_ids, token_type_ids, attention_mask): int64 arrays of shape (N, L).
        #[pyo3(signature = (texts, pairs=None, max_length=None, truncation=true, pad_to_max_length=false, num_threads=0))]
        #[allow(clippy::too_many_arguments, clippy::type_complexity)]
        fn encode_batch<'py>(
            &self,
            py: Python<'py>,
            texts: &Bound<'py, PyAny>,
            pairs: Option<&Bound<'py, PyAny>>,
            max_length: Option<usize>,
            truncation: bool,
            pad_to_max_length: bool,
            num_threads: usize,
        ) -> PyResult<(
            Bound<'py, PyArray2<i64>>,
            Bound<'py, PyArray2<i64>>,
            Bound<'py, PyArray2<i64>>,
        )> {
            let a = Texts::collect(texts, "texts")?;
            let b = pairs.map(|p| Texts::collect(p, "pairs")).transpose()?;
            let opts = BatchOptions {
                max_length,
                truncation,
                pad_to_max_length,
            };
            let batch = py
                .detach(|| {
                    no_panic(|| {
                        let a = a.strs();
                        let b = b.as_ref().map(|b| b.strs());
                        self.inner.encode_batch(&a, b.as_deref(), opts, num_threads)
                    })
                })?
                .map_err(to_py_err)?;
            let shape = (batch.rows, batch.cols);
            let to_np = |v: Vec<i64>| -> PyResult<Bound<'py, PyArray2<i64>>> {
                // The Vec becomes the array's buffer: no copy.
                let arr = Array2::from_shape_vec(shape, v)
                    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
                Ok(arr.into_pyarray(py))
            };
            Ok((
                to_np(batch.input_ids)?,
                to_np(batch.token_type_ids)?,
                to_np(batch.attention_mask)?,
            ))
        }

        /// The token of `id`, or None when out of range.
        fn id_to_token(&self, id: i64) -> Option<String> {
            u32::try_from(id)
                .ok()
                .and_then(|i| self.inner.id_to_token(i))
                .map(str::to_string)
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
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
