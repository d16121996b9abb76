//! Limits of the transport: what one peer may make an endpoint do. Pure data; the network crate derives the QUIC
//! settings from them (`aiflow_net::transport::config`) and the Python bindings expose the same fields as
//! `aiflow_cli.transport.Limits`: the field list below is the only place where names, types, defaults and
//! documentation are written.

use std::time::Duration;

use crate::error::{Error, Result};

/// Calls `$callback! { $( /// doc \n name: Type = default, )+ }` with every field of [`Limits`], in order.
///
/// This is the one definition of the fields: this crate declares [`Limits`] and its `Default` from it, and the
/// Python bindings declare their `Limits` class (same names, defaults and docstrings) from it.
#[macro_export]
macro_rules! limits_fields {
    ($callback:ident) => {
        $callback! {
            /// Largest total of frame bytes in one message (bytes).
            max_message_bytes: u64 = 1 << 30,
            /// Most frames in one message.
            max_frames: u32 = 4096,
            /// Largest metadata JSON of one message (bytes).
            max_meta_bytes: u64 = 1 << 20,
            /// Most requests in flight on one connection (more wait for a slot).
            max_concurrent_streams: u32 = 256,
            /// Most connections a server holds at once; further handshakes are refused.
            max_connections: u32 = 1024,
            // Liveness (issue 14): a dead tier must be noticed within 3 s, not at the request's deadline, so the
            // idle timeout is short and clients keep it from firing on a live peer with keep-alives (5 per
            // timeout: 4 in a row may be lost). A death is noticed at most one idle timeout plus one keep-alive
            // interval after it (1.8 s). quinn never times out sooner than 3 probe timeouts (about 3 RTTs), so
            // long paths get more.
            /// A peer silent for this long is taken for dead (ms): its connection is closed and the requests in
            /// flight on it fail at once. Clients send a keep-alive every fifth of it, so a live peer, idle or
            /// busy computing, is never that silent; the client reconnects on its next request.
            idle_timeout_ms: u64 = 1_500,
            /// Deadline for one request (ms): on the server, to receive it; on the client, the default deadline
            /// of the whole round trip.
            request_timeout_ms: u64 = 120_000,
            // 32 MiB per stream and 64 MiB per connection fill a 1 Gbit/s x 250 ms path (31 MB in flight), far
            // above quinn's defaults (1.25 MB per stream), so a 256 MiB message is never window-limited. Memory
            // is only committed while a reader lags, and then bounded by these figures per connection.
            /// QUIC flow-control window per stream (bytes): how much one message may have in flight unacknowledged.
            stream_window_bytes: u64 = 32 << 20,
            /// QUIC flow-control window per connection (bytes), shared by its streams.
            connection_window_bytes: u64 = 64 << 20,
            // Bytes of requests a server holds from their first byte until they are answered, charged as they
            // arrive (never from a declared size). One 1 GiB message fits a connection's budget; a peer gets two
            // connections' worth; the whole server four, so a few trusted peers cannot take the host's memory.
            /// Most bytes of requests in flight on one connection (received, not yet answered); a stream whose
            /// next bytes would exceed it is refused with a limit error (server only).
            max_inflight_bytes_per_connection: u64 = (1 << 30) + (64 << 20),
            /// Most bytes of requests in flight from one peer (certificate fingerprint), all its connections
            /// together (server only).
            max_inflight_bytes_per_peer: u64 = 2 << 30,
            /// Most bytes of requests in flight on the whole server, all peers together (server only).
            max_inflight_bytes: u64 = 4 << 30,
            /// Congestion controller of what this endpoint sends: "rate" (aiflow's delivery-rate controller,
            /// BBR's model: keeps a lossy link busy), "cubic", "newreno", or "bbr" (quinn's, experimental).
            congestion: $crate::limits::Congestion = $crate::limits::DEFAULT_CONGESTION,
        }
    };
}

macro_rules! declare_limits {
    ($( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr, )+) => {
        /// Limits enforced on every peer, with defaults sized for activations (tens to hundreds of MiB).
        /// The server enforces them on requests; the client on its own requests (before sending) and on replies.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Limits {
            $( $(#[doc = $doc])* pub $name: $ty, )+
        }

        impl Default for Limits {
            fn default() -> Self {
                Limits { $( $name: $default, )+ }
            }
        }

        impl Limits {
            /// The field names, in declaration order.
            pub const FIELDS: &'static [&'static str] = &[$( stringify!($name), )+];
        }
    };
}

limits_fields!(declare_limits);

/// Congestion controllers: quinn's three and aiflow's own. Each endpoint controls what it sends, so the two sides
/// may differ. docs/transport.md has the measurements behind the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), loss-based; what TCP uses on Linux.
    Cubic,
    /// quinn's BBR (v1), marked experimental by quinn. Its bandwidth estimate takes the largest instantaneous
    /// rate between two sends or two acks, which bursts inflate: through the link emulator it kept a window of
    /// several MB and overflowed the queue constantly (see [`crate::congestion`]). Kept for comparison.
    Bbr,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
    /// aiflow's delivery-rate controller (BBR's model, see [`crate::congestion`]): the window follows the
    /// measured bandwidth-delay product, so random loss does not shrink it; heavy loss caps it.
    Rate,
}

impl Congestion {
    pub const NAMES: [&'static str; 4] = ["cubic", "bbr", "newreno", "rate"];

    pub fn as_str(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
            Congestion::NewReno => "newreno",
            Congestion::Rate => "rate",
        }
    }

    pub fn parse(name: &str) -> Result<Congestion> {
        match name.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "newreno" | "new_reno" => Ok(Congestion::NewReno),
            "rate" => Ok(Congestion::Rate),
            other => Err(Error::Input(format!("unknown congestion controller {other:?} (expected one of {:?})", Congestion::NAMES))),
        }
    }
}

/// The congestion controller unless configured otherwise (see docs/transport.md for the measurements).
pub const DEFAULT_CONGESTION: Congestion = Congestion::Rate;

impl Limits {
    /// Refuses settings that cannot work (zero limits, windows QUIC cannot express).
    pub fn validate(&self) -> Result<()> {
        let nonzero = [
            ("max_message_bytes", self.max_message_bytes),
            ("max_frames", self.max_frames as u64),
            ("max_meta_bytes", self.max_meta_bytes),
            ("max_concurrent_streams", self.max_concurrent_streams as u64),
            ("max_connections", self.max_connections as u64),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("stream_window_bytes", self.stream_window_bytes),
            ("connection_window_bytes", self.connection_window_bytes),
            ("max_inflight_bytes_per_connection", self.max_inflight_bytes_per_connection),
            ("max_inflight_bytes_per_peer", self.max_inflight_bytes_per_peer),
            ("max_inflight_bytes", self.max_inflight_bytes),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(Error::Input(format!("limit {name} must be > 0")));
            }
        }
        if self.max_meta_bytes > u32::MAX as u64 {
            return Err(Error::Input("max_meta_bytes must fit in 32 bits".into()));
        }
        if self.stream_window_bytes > (1 << 40) || self.connection_window_bytes > (1 << 40) {
            return Err(Error::Input("flow-control windows above 1 TiB are not sensible".into()));
        }
        Ok(())
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// How often a client pings a quiet connection: a fifth of the idle timeout.
    pub fn keep_alive_interval(&self) -> Duration {
        self.idle_timeout() / 5
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_fields_are_listed() {
        let l = Limits::default();
        l.validate().unwrap();
        assert_eq!(l.congestion, DEFAULT_CONGESTION);
        assert_eq!(Limits::FIELDS.len(), 13);
        assert_eq!(Limits::FIELDS[0], "max_message_bytes");
        assert!(matches!(Limits { max_frames: 0, ..l.clone() }.validate(), Err(Error::Input(_))));
        for name in Congestion::NAMES {
            assert_eq!(Congestion::parse(name).unwrap().as_str(), name);
        }
        assert!(Congestion::parse("vegas").is_err());
    }
}
