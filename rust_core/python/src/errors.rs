//! Maps the core's [`Error`] onto the exception tree defined in Python (`aiflow_cli/errors.py`, the only place
//! where aiflow's exception classes are created). The bindings import that module once and raise its classes;
//! `error_classes()` and `raise_core_error()` let `tests/test_errors_map.py` check every variant.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

use aiflow_proto::Error;

/// The `aiflow_cli.errors` class raised for `e`.
fn class_name(e: &Error) -> &'static str {
    match e {
        Error::Codec(_) => "CodecError",
        Error::Frame(_) => "FrameError",
        Error::Input(_) => "InputError",
        Error::Transport(_) => "TransportError",
        Error::PeerRejected(_) => "PeerRejected",
        Error::Timeout(_) => "Timeout",
        Error::LimitExceeded(_) => "LimitExceeded",
        Error::Remote(_) => "RemoteError",
    }
}

static ERRORS_MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// Converts a core error into the matching `aiflow_cli.errors` exception.
pub fn to_pyerr(e: Error) -> PyErr {
    Python::attach(|py| {
        let msg = e.to_string();
        let made = ERRORS_MODULE
            .get_or_try_init(py, || py.import("aiflow_cli.errors").map(Bound::unbind))
            .and_then(|m| m.bind(py).getattr(class_name(&e)))
            .and_then(|cls| cls.call1((msg.clone(),)));
        match made {
            Ok(obj) => PyErr::from_value(obj),
            // Only if the Python package itself is broken: still never lose the message.
            Err(_) => PyRuntimeError::new_err(msg),
        }
    })
}

/// `result.map_err(to_pyerr)` in one word.
pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for aiflow_proto::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_pyerr)
    }
}

/// error_classes() -> list[(variant, class name)]: every variant of the core's error and the `aiflow_cli.errors`
/// class it is raised as.
#[pyfunction]
fn error_classes() -> Vec<(&'static str, &'static str)> {
    Error::VARIANTS
        .iter()
        .filter_map(|&v| Error::from_variant(v, String::new()))
        .map(|e| (e.variant(), class_name(&e)))
        .collect()
}

/// raise_core_error(variant, message): raises the core error `variant` (one of `error_classes()`) with `message`
/// exactly as a failing call would (for tests of the mapping).
#[pyfunction]
fn raise_core_error(variant: &str, message: String) -> PyResult<()> {
    let e = Error::from_variant(variant, message)
        .unwrap_or_else(|| Error::Input(format!("unknown core error variant {variant:?} (expected one of {:?})", Error::VARIANTS)));
    Err(to_pyerr(e))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(error_classes, m)?)?;
    m.add_function(wrap_pyfunction!(raise_core_error, m)?)?;
    Ok(())
}
