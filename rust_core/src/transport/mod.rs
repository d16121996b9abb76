//! The QUIC tensor transport: authenticated request/reply messages between tiers, on quinn + rustls (ring).
//!
//! - [`limits`]: [`Limits`] on what a peer may make us do, and the QUIC settings derived from them; ALPN.
//! - [`congestion`]: the delivery-rate congestion controller ("rate"), I/O-free model + quinn adapter.
//! - [`identity`]: node certificates, SHA-256 fingerprints, and the pinning TLS verifiers (mutual TLS).
//! - [`message`]: the message format on a stream (header + frames), I/O-free and fuzzable.
//! - [`io`]: reading/writing a message on a quinn stream; quinn errors mapped onto [`crate::Error`].
//! - [`buffers`]: receive buffers of large frames (huge pages, a small reuse pool).
//! - [`server`] / [`client`]: the endpoints. One request = one bidirectional stream.
//! - [`runtime`]: the shared tokio runtime, and how blocking threads wait on it without `block_on`.
//!
//! See docs/transport.md for the format, the trust model and the limits.

pub mod buffers;
pub mod client;
pub mod congestion;
pub mod identity;
pub mod io;
pub mod limits;
pub mod message;
pub mod runtime;
pub mod server;

pub use client::{Client, ClientConfig, PathInfo};
pub use identity::{Identity, Trust};
pub use limits::{Congestion, Limits, PathKind, ALPN};
pub use message::{Header, Message};
pub use server::{Handler, PeerInfo, Server, ServerConfig, ServerStats};

#[cfg(test)]
mod tests;
