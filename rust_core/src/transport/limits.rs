//! Limits and tuning of the transport: what one peer may make us do, and the QUIC settings derived from them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
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
    /// The congestion controller of the data we send.
    pub congestion: Congestion,
}

/// Congestion controllers: quinn's three and aiflow's own. Each endpoint controls what it sends, so the two sides
/// may differ. docs/transport.md has the measurements behind the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), loss-based; what TCP uses on Linux.
    Cubic,
    /// quinn's BBR (v1), marked experimental by quinn. Its bandwidth estimate takes the largest instantaneous
    /// rate between two sends or two acks, which bursts inflate: through the link emulator it kept a window of
    /// several MB and overflowed the queue constantly (see [`super::congestion`]). Kept for comparison.
    Bbr,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
    /// aiflow's delivery-rate controller (BBR's model, see [`super::congestion`]): the window follows the
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

    fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        match self {
            Congestion::Cubic => Arc::new(CubicConfig::default()),
            Congestion::Bbr => Arc::new(BbrConfig::default()),
            Congestion::NewReno => Arc::new(NewRenoConfig::default()),
            Congestion::Rate => Arc::new(super::congestion::RateConfig::default()),
        }
    }
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
            congestion: DEFAULT_CONGESTION,
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

    /// The QUIC transport settings these limits imply for a path (both endpoints use the same construction).
    /// `keep_alive` for clients; `path` says whether the peer is on this host (see [`PathKind`]).
    pub fn transport_config(&self, keep_alive: bool, path: PathKind) -> Result<Arc<TransportConfig>> {
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
        t.congestion_controller_factory(self.congestion.factory());
        // Every path starts at QUIC's safe 1200 bytes and MTU discovery (RFC 8899) probes upwards; a path that
        // drops large datagrams (the link emulator's 1472) just loses the probes and stays below them.
        let mut mtu = MtuDiscoveryConfig::default();
        match path {
            PathKind::Network => {
                mtu.upper_bound(NETWORK_MTU_UPPER_BOUND);
            }
            PathKind::Loopback { ipv6 } => {
                // Loopback carries 64 KiB datagrams: 45x fewer packets to seal, send, ack and track than at
                // 1452 bytes. GSO must then be off: quinn batches up to 10 datagrams into one GSO send, the kernel
                // refuses a batch over 64 KiB (EMSGSIZE, which quinn-udp swallows), and the silent losses make
                // quinn's black-hole detection fall back to 1200 bytes: the old 'large MTU stalls' symptom.
                mtu.upper_bound(if ipv6 { LOOPBACK_MAX_UDP_PAYLOAD_V6 } else { LOOPBACK_MAX_UDP_PAYLOAD_V4 });
                t.enable_segmentation_offload(false);
            }
        }
        t.mtu_discovery_config(Some(mtu));
        Ok(Arc::new(t))
    }
}

/// The congestion controller unless configured otherwise (see docs/transport.md for the measurements).
pub const DEFAULT_CONGESTION: Congestion = Congestion::Rate;

/// Which kind of path a connection takes; the transport settings differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A real network: datagrams of at most [`NETWORK_MTU_UPPER_BOUND`] bytes, GSO batches.
    Network,
    /// Both ends on this host (127.0.0.0/8, ::1): the loopback device's 64 KiB MTU.
    Loopback { ipv6: bool },
}

impl PathKind {
    /// The path to a peer at `addr`.
    pub fn to(addr: SocketAddr) -> PathKind {
        match addr.ip().to_canonical() {
            IpAddr::V4(a) if a.is_loopback() => PathKind::Loopback { ipv6: false },
            IpAddr::V6(a) if a.is_loopback() => PathKind::Loopback { ipv6: true },
            _ => PathKind::Network,
        }
    }
}

/// Highest UDP payload MTU discovery probes for on a network path (bytes): quinn's default, a 1500-byte
/// Ethernet MTU minus IPv6 and UDP headers, so that the same figure is safe for both families.
pub const NETWORK_MTU_UPPER_BOUND: u16 = 1452;
/// Largest UDP payload over IPv4 loopback (bytes): IPv4's 65535-byte packets minus the IPv4 and UDP headers.
pub const LOOPBACK_MAX_UDP_PAYLOAD_V4: u16 = 65507;
/// Largest UDP payload over IPv6 loopback (bytes): Linux's 65536-byte loopback MTU minus the IPv6 and UDP headers.
pub const LOOPBACK_MAX_UDP_PAYLOAD_V6: u16 = 65488;
/// Largest UDP payload an endpoint that may have loopback peers accepts (bytes): quinn's maximum.
const LOOPBACK_ENDPOINT_MAX_UDP_PAYLOAD: u16 = 65527;

/// Requested UDP socket buffer sizes (bytes).
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// A quinn endpoint on `addr`. With `loopback_peers` it accepts 64 KiB datagrams (see [`PathKind::Loopback`]);
/// otherwise quinn's default 1472 bytes, which also keeps quinn's receive buffers small.
/// Must be called inside the runtime's context.
pub fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>, loopback_peers: bool) -> Result<quinn::Endpoint> {
    let mut ec = quinn::EndpointConfig::default();
    if loopback_peers {
        ec.max_udp_payload_size(LOOPBACK_ENDPOINT_MAX_UDP_PAYLOAD).map_err(|e| Error::Input(format!("endpoint config: {e}")))?;
    }
    let sock = std::net::UdpSocket::bind(addr).map_err(|e| Error::Transport(format!("cannot bind udp {addr}: {e}")))?;
    // The kernel's default UDP buffers (~208 KiB) overflow under a QUIC window of bursts of large datagrams,
    // which turns into losses and retransmission timeouts; ask for more (the kernel caps it at rmem_max).
    let s2 = socket2::SockRef::from(&sock);
    let _ = s2.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = s2.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let rt = quinn::default_runtime().ok_or_else(|| Error::Transport("no async runtime for the endpoint".into()))?;
    quinn::Endpoint::new(ec, server, sock, rt).map_err(|e| Error::Transport(format!("cannot open a QUIC endpoint on {addr}: {e}")))
}
