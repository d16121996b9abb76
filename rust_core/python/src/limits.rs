//! `Limits` for Python (`aiflow_cli.transport.Limits`). Its fields, their order, defaults and docstrings come from
//! `aiflow_proto::limits_fields!`, the one definition of the transport's limits; only the conversion of each
//! field's type is written here.

use pyo3::prelude::*;

use aiflow_proto::limits::{Congestion, Limits};
use aiflow_proto::Result;

/// How a field of [`Limits`] looks in Python.
trait Field: Sized {
    type Py;
    fn to_py(&self) -> Self::Py;
    fn from_py(v: &Self::Py) -> Result<Self>;
}

impl Field for u64 {
    type Py = u64;
    fn to_py(&self) -> u64 {
        *self
    }
    fn from_py(v: &u64) -> Result<u64> {
        Ok(*v)
    }
}

impl Field for u32 {
    type Py = u32;
    fn to_py(&self) -> u32 {
        *self
    }
    fn from_py(v: &u32) -> Result<u32> {
        Ok(*v)
    }
}

/// The congestion controller by name (`"rate"`, `"cubic"`, ...); an unknown name is refused when the limits are
/// used, as other invalid settings are.
impl Field for Congestion {
    type Py = String;
    fn to_py(&self) -> String {
        self.as_str().to_string()
    }
    fn from_py(v: &String) -> Result<Congestion> {
        Congestion::parse(v)
    }
}

macro_rules! py_limits {
    ($( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr, )+) => {
        /// What a peer may make an endpoint do. Sizes in bytes, times in milliseconds.
        ///
        /// The server enforces them on requests; the client on its own requests (before sending) and on replies.
        /// Settings that cannot work (a zero limit, an unknown congestion controller) are refused with
        /// InputError when a Server or Client is made with them.
        #[pyclass(module = "aiflow_cli._core", name = "Limits", eq, get_all, set_all)]
        #[derive(Clone, PartialEq)]
        pub struct PyLimits {
            $( $(#[doc = $doc])* $name: <$ty as Field>::Py, )+
        }

        impl PyLimits {
            /// The core's limits, validated.
            pub fn to_limits(&self) -> Result<Limits> {
                let limits = Limits { $( $name: Field::from_py(&self.$name)?, )+ };
                limits.validate()?;
                Ok(limits)
            }
        }

        #[pymethods]
        impl PyLimits {
            // One argument per field, positional or keyword, as the dataclass it replaces took them.
            #[new]
            #[pyo3(signature = ($( $name = Limits::default().$name.to_py() ),+))]
            #[allow(clippy::too_many_arguments)]
            fn new($( $name: <$ty as Field>::Py ),+) -> Self {
                PyLimits { $( $name, )+ }
            }

            fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
                let fields: Vec<String> = vec![
                    $( format!("{}={}", stringify!($name), self.$name.clone().into_pyobject(py)?.repr()?), )+
                ];
                Ok(format!("Limits({})", fields.join(", ")))
            }
        }
    };
}

aiflow_proto::limits_fields!(py_limits);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLimits>()?;
    Ok(())
}
