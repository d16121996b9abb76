//! The client: one QUIC connection to one server, opened on first use and reopened after it closes; each
//! request is one bidirectional stream, so any number of threads may share a client and requests run in
//! parallel on the one connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint};

use super::budget::Reservation;
use super::identity::{self, Identity, Trust};
use super::io::{self, CODE_OK, CODE_RESET};
use super::config::{self, PathKind};
use super::Limits;
use super::message::{self, Message};
use super::runtime::{self, Pending};
use crate::error::{Error, Result};

/// The TLS server name we ask for. Trust is by fingerprint, so the name carries no meaning.
const SERVER_NAME: &str = "aiflow";

#[derive(Clone)]
pub struct ClientConfig {
    pub server: SocketAddr,
    pub identity: Identity,
    pub trust: Trust,
    pub limits: Limits,
}

struct Inner {
    endpoint: Endpoint,
    /// The I/O thread the endpoint lives on; requests run there (see [`runtime`]).
    rt: &'static tokio::runtime::Handle,
    server: SocketAddr,
    quic: quinn::ClientConfig,
    limits: Limits,
    /// The connection requests use, if open. A std mutex: held only to clone or swap, never across an await.
    current: std::sync::Mutex<Option<Live>>,
    /// Serialises handshakes, so that concurrent callers after a loss open one connection, not many.
    connecting: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    /// Numbers the connections this client opens (1, 2, ...), so that a reset names the one it means.
    next_generation: AtomicU64,
}

/// A connection and its number among this client's connections.
#[derive(Clone)]
struct Live {
    conn: Connection,
    generation: u64,
}

/// What the transport knows of the path of a client's current connection.
#[derive(Debug, Clone, PartialEq)]
pub struct PathInfo {
    /// The connection's number among this client's connections (see [`Client::reset`]).
    pub connection_id: u64,
    /// Smoothed round-trip time (µs) and the smallest one seen (µs).
    pub rtt_us: u64,
    pub min_rtt_us: u64,
    /// Congestion window (bytes).
    pub cwnd_bytes: u64,
    /// Largest UDP payload the path is known to carry (bytes), as found by MTU discovery.
    pub mtu_bytes: u16,
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub congestion_events: u64,
    /// Times MTU discovery found that large datagrams stopped getting through.
    pub black_holes: u64,
}

impl PathInfo {
    /// quinn's statistics of `conn`'s path, as connection `connection_id`.
    pub(crate) fn of(conn: &Connection, connection_id: u64) -> PathInfo {
        let p = conn.stats().path;
        PathInfo {
            connection_id,
            rtt_us: p.rtt.as_micros() as u64,
            min_rtt_us: p.min_rtt.as_micros() as u64,
            cwnd_bytes: p.cwnd,
            mtu_bytes: p.current_mtu,
            sent_packets: p.sent_packets,
            lost_packets: p.lost_packets,
            congestion_events: p.congestion_events,
            black_holes: p.black_holes_detected,
        }
    }
}

/// A client of one server. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// Prepares a client; the connection is opened by the first request (or [`Client::connect`]).
    pub fn new(cfg: ClientConfig) -> Result<Client> {
        cfg.limits.validate()?;
        let tls = identity::client_tls(&cfg.identity, cfg.trust)?;
        let quic = QuicClientConfig::try_from(tls).map_err(|e| Error::Input(format!("QUIC TLS configuration: {e}")))?;
        let mut qc = quinn::ClientConfig::new(Arc::new(quic));
        // Keep-alives hold the connection open while a long request computes (longer than the idle timeout).
        let path = PathKind::to(cfg.server);
        qc.transport_config(config::transport_config(&cfg.limits, true, path)?);
        let bind: SocketAddr = if cfg.server.is_ipv6() { "[::]:0".parse().expect("addr") } else { "0.0.0.0:0".parse().expect("addr") };
        let rt = runtime::next_handle();
        let _guard = rt.enter();
        let endpoint = config::endpoint(bind, None, path != PathKind::Network)?;
        Ok(Client {
            inner: Arc::new(Inner {
                endpoint,
                rt,
                server: cfg.server,
                quic: qc,
                limits: cfg.limits,
                current: std::sync::Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                next_id: AtomicU64::new(1),
                next_generation: AtomicU64::new(1),
            }),
        })
    }

    pub fn server(&self) -> SocketAddr {
        self.inner.server
    }

    /// The current connection if it is still open.
    fn live(&self) -> Option<Live> {
        let slot = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().filter(|l| l.conn.close_reason().is_none()).cloned()
    }

    /// The open connection, or a new one (one handshake at a time: concurrent callers wait for it).
    async fn connection(&self) -> Result<Live> {
        if let Some(l) = self.live() {
            return Ok(l);
        }
        let _one = self.inner.connecting.lock().await;
        // Another caller may have connected while we waited for the lock.
        if let Some(l) = self.live() {
            return Ok(l);
        }
        // quinn spawns the connection's driver on the current runtime: make that the endpoint's I/O thread even
        // when the caller runs elsewhere (a test's task), so that the connection's work stays on one thread.
        let connecting = {
            let _on_endpoint_thread = self.inner.rt.enter();
            self.inner.endpoint.connect_with(self.inner.quic.clone(), self.inner.server, SERVER_NAME)
        }
        .map_err(|e| Error::Transport(format!("cannot connect: {e}")))?;
        let conn = connecting.await.map_err(|e| match e {
            // Nobody answered the handshake (no server there, or the path is down): not a peer that died.
            quinn::ConnectionError::TimedOut => Error::Timeout(format!(
                "no answer to the QUIC handshake within the idle timeout ({} ms): is a server listening there?",
                self.inner.limits.idle_timeout_ms
            )),
            other => io::conn_err(&other),
        })?;
        let live = Live { conn, generation: self.inner.next_generation.fetch_add(1, Ordering::Relaxed) };
        *self.inner.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(live.clone());
        Ok(live)
    }

    /// Opens the connection now (the handshake), so that the first request does not pay for it.
    pub async fn connect(&self) -> Result<()> {
        self.connection().await.map(|_| ())
    }

    /// A bare stream on the connection, for tools and tests that write the message format by hand (a
    /// misbehaving peer, in the limits tests).
    pub async fn open_stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream)> {
        let live = self.connection().await?;
        live.conn.open_bi().await.map_err(|e| io::conn_err(&e))
    }

    /// Sends `msg` and returns the reply. The request id is assigned here; the session id is the caller's.
    /// An error reply becomes the matching error (`Remote` for a handler failure). `timeout` bounds the whole
    /// round trip, the connection setup included.
    pub async fn request(&self, msg: Message, timeout: Duration) -> Result<Message> {
        self.request_tracked(msg, timeout).await.0
    }

    /// [`Client::request`], plus the id of the connection the request went out on (`None` if it failed before
    /// one was open), so that a caller can [`Client::reset`] exactly that connection after a failure.
    pub async fn request_tracked(&self, mut msg: Message, timeout: Duration) -> (Result<Message>, Option<u64>) {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        msg.header.request_id = id;
        msg.header.is_error = false;
        // Our own limits are checked before a byte leaves, so an oversized message fails fast and locally.
        let head = match message::encode_head(&msg, &self.inner.limits) {
            Ok(h) => Bytes::from(h),
            Err(e) => return (Err(e), None),
        };
        let frames = msg.frames;
        let used = std::sync::Mutex::new(None);
        let exchange = async {
            let live = self.connection().await?;
            *used.lock().unwrap_or_else(|p| p.into_inner()) = Some(live.generation);
            let (mut send, mut recv) = live.conn.open_bi().await.map_err(|e| io::conn_err(&e))?;
            // Read while writing: a server that refuses the message early (a limit) answers before we are done.
            let write = io::write_encoded(&mut send, head, frames);
            let mut held = Reservation::default();
            let read = io::read_message(&mut recv, &self.inner.limits, &mut held);
            let (w, r) = tokio::join!(write, read);
            let reply = match (w, r) {
                (_, Ok(reply)) => reply,
                (Err(we), Err(io::ReadFail::Gone(_))) => return Err(we),
                (_, Err(rf)) => return Err(rf.into_error()),
            };
            if let Some(e) = reply.as_error() {
                return Err(e);
            }
            if reply.header.request_id != id {
                return Err(Error::Transport(format!("reply to request {} arrived for request {id}", reply.header.request_id)));
            }
            Ok(reply)
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r.map_err(|e| self.naming_server(e)),
            Err(_) => Err(Error::Timeout(format!("no reply from {} within {:.3} s", self.inner.server, timeout.as_secs_f64()))),
        };
        let generation = *used.lock().unwrap_or_else(|p| p.into_inner());
        (result, generation)
    }

    /// `e` with this client's server named, if it is a failure of the connection (a lost peer, a refused
    /// handshake), so that the caller's log says which peer went away. A remote handler's error is the peer's
    /// own and a limit error names its limit: both pass unchanged.
    fn naming_server(&self, e: Error) -> Error {
        let server = self.inner.server;
        match e {
            Error::Transport(m) => Error::Transport(format!("{server}: {m}")),
            Error::PeerRejected(m) => Error::PeerRejected(format!("{server}: {m}")),
            Error::Timeout(m) => Error::Timeout(format!("{server}: {m}")),
            other => other,
        }
    }

    /// Starts a request on the shared runtime; a blocking caller waits on the returned [`Pending`]. Never
    /// blocks on the runtime itself, so it is safe from any thread, a server handler's included.
    pub fn request_pending(&self, msg: Message, timeout: Option<Duration>) -> Pending<(Result<Message>, Option<u64>)> {
        let this = self.clone();
        let timeout = timeout.unwrap_or(self.inner.limits.request_timeout());
        Pending::spawn_on(self.inner.rt, async move { this.request_tracked(msg, timeout).await })
    }

    /// Opens the connection on the client's I/O thread (see [`Client::connect`]); a blocking caller waits on the
    /// returned [`Pending`].
    pub fn connect_pending(&self) -> Pending<Result<()>> {
        let this = self.clone();
        Pending::spawn_on(self.inner.rt, async move { this.connect().await })
    }

    /// Blocking [`Client::request`].
    pub fn request_blocking(&self, msg: Message, timeout: Option<Duration>) -> Result<Message> {
        self.request_pending(msg, timeout).wait()?.0
    }

    /// The id of the open connection, if any (connections are numbered 1, 2, ... per client).
    pub fn connection_id(&self) -> Option<u64> {
        self.live().map(|l| l.generation)
    }

    /// Round-trip time, congestion window, MTU and losses of the open connection, if any.
    pub fn path_info(&self) -> Option<PathInfo> {
        let l = self.live()?;
        Some(PathInfo::of(&l.conn, l.generation))
    }

    /// Drops a connection at once, without waiting for the peer to acknowledge (requests on it fail; the next
    /// request opens a new one). `connection_id` names the connection to drop (from [`Client::connection_id`]
    /// or [`Client::request_tracked`]): if the client has already moved on to a newer connection, that one is
    /// left alone. `None` drops whatever connection is open. Returns whether a connection was dropped.
    pub fn reset(&self, connection_id: Option<u64>) -> bool {
        let mut slot = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
        let matches = slot.as_ref().is_some_and(|l| connection_id.is_none_or(|g| g == l.generation));
        if !matches {
            return false;
        }
        if let Some(l) = slot.take() {
            // quinn's close only queues the CONNECTION_CLOSE; the endpoint driver sends it. No waiting here. A
            // connection already lost is left as it is: closing it would replace its error (the peer went silent)
            // with "closed locally" for the requests on it that have not read their error yet.
            if l.conn.close_reason().is_none() {
                l.conn.close(CODE_RESET, b"client reset");
            }
        }
        true
    }

    /// Closes the connection (in-flight requests fail) and waits up to 500 ms for the peer to be told. The
    /// client reconnects if used again. To drop a failed connection without waiting, use [`Client::reset`].
    pub fn close(&self) {
        let dropped = self.inner.current.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(l) = dropped {
            l.conn.close(CODE_OK, b"client closing");
        }
        let endpoint = self.inner.endpoint.clone();
        let _ = runtime::block_on(async move {
            let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
        });
    }
}
