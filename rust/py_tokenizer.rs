//! The BERT WordPiece tokenizer as Python sees it: the private class `_WordPiece`
//! (`crate::wordpiece`; `mtbert.WordPieceTokenizer` is the public API).

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::prelude::*;
use pyo3::types::PyString;

use super::args::{int_arg, threads_arg, type_name};
use super::errors::{detached, NativeError, NativeResult};
use crate::wordpiece::{BatchOptions, WordPiece};

/// UTF-8 of one Python str; `what` names the argument in errors.
fn utf8_of(obj: &Bound<'_, PyAny>, what: &str) -> NativeResult<String> {
    let s = obj
        .cast::<PyString>()
        .map_err(|_| NativeError::Type(format!("{what} must be str, not {}", type_name(obj))))?;
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
struct PyWordPiece {
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

/// Adds the class `_WordPiece` to `m`.
pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyWordPiece>()
}
