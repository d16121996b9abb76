//! aiflow's I/O-free core: everything that can be computed, tested and fuzzed without a socket, a runtime or
//! Python (the way `quinn-proto` sits under `quinn`). The network crate (`aiflow-net`) and the Python bindings
//! (`aiflow-python`) build on it; nothing here depends on them.
//!
//! - [`frame`]: one tensor on the wire: a versioned, validated header plus payload; owns the dtype and quantizer
//!   ids.
//! - [`codec`]: codec specs (`int8+zstd3`, ...), the quantizers (fp16, bf16, int8, int4) and zstd; builds on
//!   [`frame`].
//! - [`message`]: the transport's message format on one stream (header + frames), validated against [`Limits`].
//! - [`limits`]: [`Limits`] on what a peer may make an endpoint do (defined once, also for Python).
//! - [`congestion`]: the model of the delivery-rate congestion controller ("rate").
//! - [`link`]: the link emulator's model of one direction (rate, delay, jitter, loss, bounded queue).
//! - [`error`]: the one error type of the Rust core.

pub mod codec;
pub mod congestion;
pub mod error;
pub mod frame;
pub mod limits;
pub mod link;
pub mod message;

pub use error::{Error, Result};
