//! The QUIC tensor transport (see issue 3). Filled in by the transport work.
