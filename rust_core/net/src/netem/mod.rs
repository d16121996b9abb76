//! A userspace link emulator for UDP (and so for QUIC): rate, delay, jitter, loss and a bounded queue per
//! direction, without root or kernel qdiscs (the `netem` qdisc is missing on our machines).
//!
//! - [`link`]: the I/O-free model of one direction (what happens to a datagram, and when), from
//!   [`aiflow_proto::link`].
//! - [`relay`]: the relay on the shared tokio runtime: `listen` -> uplink pipe -> `forward`, replies back
//!   through the downlink pipe, one upstream socket per client address.

pub mod relay;

pub use aiflow_proto::link;

pub use link::{Direction, Pipe, Verdict, WIRE_OVERHEAD_BYTES};
pub use relay::{DirStats, Emulator, LinkParams};
