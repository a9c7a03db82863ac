//! The Python binding, `mtbert._native`: these files are the only ones that touch pyo3.
//!
//! By domain: [`errors`] (the one error type, the core's errors as Python exceptions, the
//! GIL-free panic boundary), [`args`] (argument checks the entry points share: integers,
//! thread counts, numpy arrays), [`engine`] (the Gram-space engine: `gram`, `combine`,
//! `pcgrad`) and [`tokenizer`] (the `_WordPiece` class); this file registers them.
//!
//! Each entry point checks its arguments here or in the core (types, shapes, dtypes,
//! ranges, sizes; the Python wrappers do not repeat these checks), extracts its inputs
//! while holding the GIL, then runs the work with the GIL released in
//! [`errors::detached`].
//!
//! Guarantees at this boundary: every failure is a Python exception, never an abort.
//! [`errors::NativeError`] is the one error type; its variant is the exception raised
//! (`ValueError`, `TypeError`, `MemoryError`; a Rust panic, which would be a bug,
//! becomes `RuntimeError`). Allocations sized by a caller's numbers are fallible, thread
//! counts are at most `pool::MAX_THREADS`, task counts (`pcgrad`, `gram`, `combine`) at
//! most `gram::MAX_TASKS`.

// Flat files next to this one (rust/py_*.rs), so that the Makefile's `rust/*.rs`
// rebuild rule sees every binding source.
#[path = "py_args.rs"]
mod args;
#[path = "py_engine.rs"]
mod engine;
#[path = "py_errors.rs"]
mod errors;
#[path = "py_tokenizer.rs"]
mod tokenizer;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    engine::register(m)?;
    tokenizer::register(m)?;
    m.add("MAX_THREADS", crate::pool::MAX_THREADS)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
