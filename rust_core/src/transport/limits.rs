//! Limits and tuning of the transport: what one peer may make us do, and the QUIC settings derived from them.

use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

use crate::error::{Error, Result};

/// ALPN protocol id of aiflow's transport; a peer that does not offer it is refused at the handshake.
pub const ALPN: &[u8] = b"aiflow/1";

/// Limits enforced on every peer, with defaults sized for activations (tens to hundreds of MiB).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest total of frame bytes in one message (bytes).
    pub max_message_bytes: u64,
    /// Most frames in one message.
    pub max_frames: u32,
    /// Largest metadata JSON of one message (bytes).
    pub max_meta_bytes: u64,
    /// Most requests in flight on one connection (QUIC bidirectional streams the peer may open at once).
    pub max_concurrent_streams: u32,
    /// Most connections a server holds at once; further handshakes are refused.
    pub max_connections: u32,
    /// A connection with no traffic for this long is closed (ms). Clients send keep-alives at a third of it.
    pub idle_timeout_ms: u64,
    /// Deadline for one request: on the server, to receive it; on the client, for the whole round trip (ms).
    pub request_timeout_ms: u64,
    /// Flow-control window per stream (bytes): how much one message may have in flight unacknowledged.
    pub stream_window_bytes: u64,
    /// Flow-control window per connection (bytes), shared by its streams.
    pub connection_window_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1 << 30,
            max_frames: 4096,
            max_meta_bytes: 1 << 20,
            max_concurrent_streams: 256,
            max_connections: 1024,
            idle_timeout_ms: 30_000,
            request_timeout_ms: 120_000,
            // 32 MiB per stream and 64 MiB per connection fill a 1 Gbit/s x 250 ms path (31 MB in flight), far
            // above quinn's defaults (1.25 MB per stream), so a 256 MiB message is never window-limited. Memory
            // is only committed while a reader lags, and then bounded by these figures per connection.
            stream_window_bytes: 32 << 20,
            connection_window_bytes: 64 << 20,
        }
    }
}

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

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The QUIC transport settings these limits imply (both endpoints use the same construction).
    pub fn transport_config(&self, keep_alive: bool) -> Result<Arc<TransportConfig>> {
        self.validate()?;
        let mut t = TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_streams));
        t.max_concurrent_uni_streams(VarInt::from_u32(0));
        let idle = IdleTimeout::try_from(self.idle_timeout())
            .map_err(|_| Error::Input(format!("idle_timeout_ms {} is too large", self.idle_timeout_ms)))?;
        t.max_idle_timeout(Some(idle));
        if keep_alive {
            t.keep_alive_interval(Some(self.idle_timeout() / 3));
        }
        let var = |v: u64| VarInt::from_u64(v).map_err(|_| Error::Input(format!("window {v} too large")));
        t.stream_receive_window(var(self.stream_window_bytes)?);
        t.receive_window(var(self.connection_window_bytes)?);
        t.send_window(self.connection_window_bytes);
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(MTU_UPPER_BOUND);
        t.mtu_discovery_config(Some(mtu));
        Ok(Arc::new(t))
    }
}

/// Highest UDP payload that MTU discovery probes for (bytes): quinn's default, Ethernet minus headers.
/// Larger bounds (8952, 65527) were tried: bulk loopback throughput did not improve and 64 KiB messages
/// collapsed to ~1 MB/s (not yet understood; see docs/transport.md), so the bound stays at 1452.
pub const MTU_UPPER_BOUND: u16 = 1452;

/// Requested UDP socket buffer sizes (bytes).
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// A quinn endpoint on `addr` that accepts datagrams up to [`MTU_UPPER_BOUND`] (quinn's default stops at 1472).
/// Must be called inside the runtime's context.
pub fn endpoint(addr: std::net::SocketAddr, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    let mut ec = quinn::EndpointConfig::default();
    ec.max_udp_payload_size(MTU_UPPER_BOUND).map_err(|e| Error::Input(format!("endpoint config: {e}")))?;
    let sock = std::net::UdpSocket::bind(addr).map_err(|e| Error::Transport(format!("cannot bind udp {addr}: {e}")))?;
    // The kernel's default UDP buffers (~208 KiB) overflow under a QUIC window of bursts of large datagrams,
    // which turns into losses and retransmission timeouts; ask for more (the kernel caps it at rmem_max).
    let s2 = socket2::SockRef::from(&sock);
    let _ = s2.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = s2.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let rt = quinn::default_runtime().ok_or_else(|| Error::Transport("no async runtime for the endpoint".into()))?;
    quinn::Endpoint::new(ec, server, sock, rt).map_err(|e| Error::Transport(format!("cannot open a QUIC endpoint on {addr}: {e}")))
}
