//! aiflow's network layer, on top of the I/O-free [`aiflow_proto`] (as `quinn` sits on `quinn-proto`).
//!
//! - [`transport`]: the QUIC tensor transport (quinn + rustls): endpoints, node identities with pinned
//!   fingerprints (mutual TLS), receive buffers, the shared tokio runtime.
//! - [`netem`]: the userspace link emulator's UDP relay (the link model is `aiflow_proto::link`).
//! - `counters!`: event counters of the server and the relay, declared once for both stats and the bindings.

#[macro_use]
mod counters;

pub mod netem;
pub mod transport;

pub use aiflow_proto as proto;
pub use aiflow_proto::{error, Error, Result};
