//! The QUIC tensor transport: authenticated request/reply messages between tiers, on quinn + rustls (ring).
//!
//! - [`config`]: the QUIC settings derived from [`Limits`] (defined in `aiflow_proto::limits`) and the path.
//! - [`congestion`]: the delivery-rate congestion controller ("rate"): quinn's adapter of
//!   `aiflow_proto::congestion::RateModel`.
//! - [`identity`]: node certificates, SHA-256 fingerprints, and the pinning TLS verifiers (mutual TLS).
//! - [`message`]: the message format on a stream (header + frames), I/O-free: `aiflow_proto::message`.
//! - [`io`]: reading/writing a message on a quinn stream; quinn errors mapped onto [`crate::Error`].
//! - [`buffers`]: receive buffers that grow as bytes arrive (huge pages, a small reuse pool for large frames).
//! - [`budget`]: a server's in-flight byte budgets (per connection, per peer, in all).
//! - [`server`] / [`client`]: the endpoints. One request = one bidirectional stream.
//! - [`runtime`]: the shared tokio runtime, and how blocking threads wait on it without `block_on`.
//!
//! See docs/transport.md for the format, the trust model and the limits.

pub mod budget;
pub mod buffers;
pub mod client;
pub mod config;
pub mod congestion;
pub mod identity;
pub mod io;
pub mod runtime;
pub mod server;

pub use aiflow_proto::limits::{self, Congestion, Limits};
pub use aiflow_proto::message::{self, Header, Message, Meta, ALPN};
pub use client::{Client, ClientConfig, PathInfo};
pub use config::PathKind;
pub use identity::{Identity, Trust};
pub use server::{Handler, PeerInfo, Server, ServerConfig, ServerStats};

#[cfg(test)]
mod tests;
