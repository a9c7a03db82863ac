//! The Python binding: the only file that touches pyo3.
//!
//! Each entry point checks shapes, dtypes and types, raises `ValueError` with a
//! clear message, extracts its inputs while holding the GIL, then releases the
//! GIL (`py.detach`) for the work.

use pyo3::prelude::*;

// ==== PCGrad binding (owned by the PCGrad work) ====
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
    // ==== end PCGrad registrations ====
    // ==== WordPiece registrations ====
    m.add_class::<wordpiece_binding::PyWordPiece>()?;
    // ==== end WordPiece registrations ====
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
