//! The one error type of the Rust core. The Python bindings map each variant onto the exception of the same
//! name in `aiflow_cli.errors` (see `python/errors.rs`), so keep the two in step.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// A codec spec that does not parse, or an input the codec cannot encode.
    #[error("{0}")]
    Codec(String),
    /// A frame that fails validation before or while decoding.
    #[error("{0}")]
    Frame(String),
    /// Bad user input to an API (address, file, config value).
    #[error("{0}")]
    Input(String),
    /// Network failure: connect, I/O, protocol violation, peer closed.
    #[error("{0}")]
    Transport(String),
    /// The peer's certificate, ALPN or identity was not accepted.
    #[error("{0}")]
    PeerRejected(String),
    /// A deadline passed.
    #[error("{0}")]
    Timeout(String),
    /// A configured limit was exceeded (message size, frame count, streams).
    #[error("{0}")]
    LimitExceeded(String),
    /// The remote handler failed; the message is the remote's.
    #[error("{0}")]
    Remote(String),
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
