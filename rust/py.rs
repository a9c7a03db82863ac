//! The Python binding: the only file that touches pyo3.
//!
//! Each entry point checks shapes, dtypes and types, raises `ValueError` with a
//! clear message, extracts its inputs while holding the GIL, then releases the
//! GIL (`py.detach`) for the work.

use pyo3::prelude::*;

// ==== PCGrad binding (owned by the PCGrad work) ====
// ==== end PCGrad binding ====

// ==== WordPiece binding (owned by the tokenizer work) ====
// ==== end WordPiece binding ====

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // ==== PCGrad registrations ====
    // ==== end PCGrad registrations ====
    // ==== WordPiece registrations ====
    // ==== end WordPiece registrations ====
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
