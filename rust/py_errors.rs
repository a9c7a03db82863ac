//! Errors at the Python boundary: the one error type [`NativeError`], the conversion of
//! the core's errors into it and of it into Python exceptions, and [`detached`], which
//! runs the work without the GIL and turns a panic into an exception.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// The binding's one error type: each variant names the Python exception it becomes.
pub(super) enum NativeError {
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

pub(super) type NativeResult<T> = Result<T, NativeError>;

/// A `ValueError` with `msg`.
pub(super) fn value(msg: impl Into<String>) -> NativeError {
    NativeError::Value(msg.into())
}

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

/// The tokenizer's errors: out of memory is a `MemoryError`, the rest `ValueError`.
impl From<crate::wordpiece::Error> for NativeError {
    fn from(e: crate::wordpiece::Error) -> Self {
        match e {
            crate::wordpiece::Error::OutOfMemory(m) => NativeError::Memory(m),
            other => NativeError::Value(other.to_string()),
        }
    }
}

/// Runs `f` with the GIL released; a panic becomes `NativeError::Internal`, never an abort.
pub(super) fn detached<T: Send, F: Send + FnOnce() -> T>(
    py: Python<'_>,
    what: &str,
    f: F,
) -> NativeResult<T> {
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
