//! The QUIC settings of an endpoint: derived from [`Limits`] (flow-control windows, streams, timeouts, the
//! congestion controller), the path (loopback or network) and the UDP socket.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use aiflow_proto::limits::{Congestion, Limits};
use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

use crate::error::{Error, Result};

/// quinn's factory of the controller `c` names.
pub fn controller_factory(c: Congestion) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
    match c {
        Congestion::Cubic => Arc::new(CubicConfig::default()),
        Congestion::Bbr => Arc::new(BbrConfig::default()),
        Congestion::NewReno => Arc::new(NewRenoConfig::default()),
        Congestion::Rate => Arc::new(super::congestion::RateConfig::default()),
    }
}

/// The QUIC transport settings `limits` imply for a path (both endpoints use the same construction).
/// `keep_alive` for clients; `path` says whether the peer is on this host (see [`PathKind`]).
pub fn transport_config(limits: &Limits, keep_alive: bool, path: PathKind) -> Result<Arc<TransportConfig>> {
    limits.validate()?;
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(limits.max_concurrent_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    let idle = IdleTimeout::try_from(limits.idle_timeout())
        .map_err(|_| Error::Input(format!("idle_timeout_ms {} is too large", limits.idle_timeout_ms)))?;
    t.max_idle_timeout(Some(idle));
    if keep_alive {
        t.keep_alive_interval(Some(limits.keep_alive_interval()));
    }
    let var = |v: u64| VarInt::from_u64(v).map_err(|_| Error::Input(format!("window {v} too large")));
    t.stream_receive_window(var(limits.stream_window_bytes)?);
    t.receive_window(var(limits.connection_window_bytes)?);
    t.send_window(limits.connection_window_bytes);
    t.congestion_controller_factory(controller_factory(limits.congestion));
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
