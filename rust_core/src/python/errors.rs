//! Maps the core's [`Error`] onto the exception tree defined in Python (`aiflow_cli/errors.py`).
//! The classes live in Python so that there is one tree; we look them up by name when an error is raised.

use pyo3::prelude::*;
use pyo3::exceptions::PyRuntimeError;

use crate::Error;

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

/// Converts a core error into the matching `aiflow_cli.errors` exception.
pub fn to_pyerr(e: Error) -> PyErr {
    Python::attach(|py| {
        let msg = e.to_string();
        let made = py
            .import("aiflow_cli.errors")
            .and_then(|m| m.getattr(class_name(&e)))
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

impl<T> IntoPyResult<T> for crate::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_pyerr)
    }
}
