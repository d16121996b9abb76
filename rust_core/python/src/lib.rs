//! The Python extension `aiflow_cli._core`: pyo3 conversions over `aiflow-proto` (codec, frames, limits) and
//! `aiflow-net` (transport, link emulator). The only crate that knows about Python, and the only cdylib; each
//! module converts types and errors for one part of the core and registers its functions here.

use pyo3::prelude::*;
use pyo3::types::PyDict;

mod codec;
mod errors;
mod limits;
mod netem;
mod transport;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    codec::register(m)?;
    errors::register(m)?;
    limits::register(m)?;
    transport::register(m)?;
    netem::register(m)?;
    Ok(())
}

/// A core stats snapshot's `(name, value)` counters as a dict.
fn counters_dict<'py>(py: Python<'py>, fields: Vec<(&'static str, u64)>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, value) in fields {
        d.set_item(name, value)?;
    }
    Ok(d)
}
