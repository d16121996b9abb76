//! aiflow's Rust core.
//!
//! - [`codec`]: codec specs (`int8+zstd3`, ...) and the quantizers (fp16, bf16, int8, int4) and zstd.
//! - [`frame`]: one tensor on the wire: a versioned, validated header plus payload. I/O-free.
//! - [`transport`]: the QUIC tensor transport (quinn + rustls), mutual TLS with pinned fingerprints.
//! - [`netem`]: a userspace link emulator (rate, delay, jitter, loss, bounded queue) for UDP.
//! - `python` (feature `python`): the PyO3 bindings, the only module that knows about Python.

#[macro_use]
mod counters;

pub mod codec;
pub mod error;
pub mod frame;
pub mod netem;
pub mod transport;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
