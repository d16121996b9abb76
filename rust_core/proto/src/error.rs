//! The one error type of the Rust core. The Python bindings map each variant onto the exception class of
//! `aiflow_cli.errors` named by `aiflow-python`'s `errors.rs`; `tests/test_errors_map.py` checks every variant
//! listed in [`Error::VARIANTS`].

use thiserror::Error;

macro_rules! declare_errors {
    ($( $(#[doc = $doc:literal])* $variant:ident, )+) => {
        #[derive(Debug, Error)]
        pub enum Error {
            $( $(#[doc = $doc])* #[error("{0}")] $variant(String), )+
        }

        impl Error {
            /// The name of every variant, in declaration order.
            pub const VARIANTS: &'static [&'static str] = &[$( stringify!($variant), )+];

            /// The name of this error's variant.
            pub fn variant(&self) -> &'static str {
                match self {
                    $( Error::$variant(_) => stringify!($variant), )+
                }
            }

            /// The error of the variant named `variant` (one of [`Error::VARIANTS`]) carrying `msg`.
            pub fn from_variant(variant: &str, msg: String) -> Option<Error> {
                match variant {
                    $( stringify!($variant) => Some(Error::$variant(msg)), )+
                    _ => None,
                }
            }
        }
    };
}

declare_errors! {
    /// A codec spec that does not parse, or an input the codec cannot encode.
    Codec,
    /// A frame that fails validation before or while decoding.
    Frame,
    /// Bad user input to an API (address, file, config value).
    Input,
    /// Network failure: connect, I/O, protocol violation, peer closed.
    Transport,
    /// The peer's certificate, ALPN or identity was not accepted.
    PeerRejected,
    /// A deadline passed.
    Timeout,
    /// A configured limit was exceeded (message size, frame count, streams).
    LimitExceeded,
    /// The remote handler failed; the message is the remote's.
    Remote,
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Transport(format!("I/O error: {e}"))
    }
}

/// Shorthand constructors so call sites read `frame_err!("bad magic {x:?}")`.
#[macro_export]
macro_rules! frame_err {
    ($($arg:tt)*) => { $crate::error::Error::Frame(format!($($arg)*)) };
}

#[macro_export]
macro_rules! codec_err {
    ($($arg:tt)*) => { $crate::error::Error::Codec(format!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_round_trip_by_name() {
        assert_eq!(Error::VARIANTS.len(), 8);
        for &v in Error::VARIANTS {
            let e = Error::from_variant(v, "m".into()).unwrap();
            assert_eq!((e.variant(), e.to_string()), (v, "m".to_string()));
        }
        assert!(Error::from_variant("Nope", String::new()).is_none());
    }
}
