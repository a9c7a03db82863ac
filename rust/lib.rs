//! Rust core of mtbert.
//!
//! The modules below are plain Rust with no Python in them, so `cargo test`
//! checks them without linking libpython. `py` (rust/py.rs and the rust/py_*.rs
//! files it includes) is the only module that touches pyo3; it is compiled only
//! with the `python` feature (which maturin enables).

pub mod gram;
pub mod pcgrad;
pub mod pool;
pub mod wordpiece;

#[cfg(feature = "python")]
mod py;
