//! The server: accepts connections from pinned peers and answers each stream's message with a handler.
//!
//! Handlers are blocking functions run on tokio's blocking pool (never on an I/O worker), so they may take their
//! time, run concurrently, and themselves use a [`super::Client`] (edge forwarding to cloud).
//!
//! Memory: a request's buffers grow as its bytes arrive and are charged to the connection's, the peer's and the
//! server's in-flight budgets ([`super::budget`]); a stream that would overrun one is refused with a limit error
//! and the others carry on. A handler that cannot get a thread is answered with an error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream};

use super::budget::{Budget, PeerBudgets, Reservation};
use super::client::PathInfo;
use super::identity::{self, Identity, Trust};
use super::io::{self, ReadFail, CODE_LIMIT, CODE_OK, CODE_PROTOCOL, CODE_TIMEOUT};
use super::config::{self, PathKind};
use super::Limits;
use super::message::{ErrorCode, Message};
use super::runtime;
use crate::error::{Error, Result};

/// Who sent a request.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub address: SocketAddr,
    /// SHA-256 fingerprint (hex) of the peer's certificate.
    pub fingerprint: String,
    /// Stable id of the connection (requests on the same connection share it).
    pub connection_id: u64,
}

/// A blocking request handler: gets a request, returns the reply (its request and session ids are filled in).
/// An `Err` is sent to the peer as an error reply.
pub type Handler = Arc<dyn Fn(Message, PeerInfo) -> Result<Message> + Send + Sync>;

/// What a server needs to start.
#[derive(Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub identity: Identity,
    pub trust: Trust,
    pub limits: Limits,
}

counters! {
    /// Counters of what a server has seen (for tests, logs and `stats()`).
    struct Counters;
    /// A snapshot of the server's counters.
    pub struct ServerStats {
        connections_accepted,
        connections_active,
        /// Refused before the handshake (over `max_connections`).
        connections_refused,
        /// Handshakes that failed: untrusted certificate, wrong ALPN, garbage.
        handshakes_failed,
        /// Connections closed by the idle timeout.
        connections_timed_out,
        /// Requests answered by the handler.
        requests_ok,
        /// Requests answered with an error (handler failure, limit, malformed, timeout).
        requests_failed,
        protocol_errors,
        limit_errors,
        /// Streams the peer abandoned mid-message (reset, disconnect).
        streams_aborted,
        /// Handlers that could not be started (no thread to be had): answered with an error.
        handler_start_failures,
        /// Bytes of requests held now (received, not yet answered; see `max_inflight_bytes`).
        inflight_bytes,
        /// The most bytes of requests ever held at once.
        inflight_bytes_peak,
    }
}

struct Shared {
    handler: Handler,
    limits: Limits,
    counters: Counters,
    /// In-flight bytes of the whole server, and of each peer (see [`budget`]).
    inflight: Arc<Budget>,
    peers: PeerBudgets,
    last_handshake_error: Mutex<String>,
    configs: PathConfigs,
    /// The open connections by [`PeerInfo::connection_id`], for [`Server::peer_paths`].
    open: Mutex<HashMap<u64, (PeerInfo, Connection)>>,
    /// Handler starts so far (numbers them for [`FAIL_HANDLER_START_ENV`]).
    handler_starts: AtomicU64,
    /// Test only: the handler start (1, 2, ...) that fails as if the OS refused a thread; 0: none.
    fail_handler_start: u64,
    /// Requests of at most this many bytes run their handler on the I/O thread that read them (see
    /// [`INLINE_HANDLER_ENV`]); larger ones on a blocking-pool thread.
    inline_max_bytes: u64,
}

/// TEST ONLY. Environment variable read once when a server starts: `N` (1, 2, ...) makes that server's Nth
/// handler start fail as if the OS refused a thread, the failure tokio reports by panicking (thread or memory
/// limits). Used by tests/test_transport_faults.py to show that the request gets an error reply and the server
/// keeps serving; never set it in production.
pub const FAIL_HANDLER_START_ENV: &str = "AIFLOW_TEST_FAIL_HANDLER_START";

/// Environment variable read once when a server starts: requests of at most this many bytes (frames and header)
/// run their handler on the server's I/O thread itself instead of on a blocking-pool thread: one thread hand-off
/// less per request, but the endpoint's other I/O (every connection of this server) waits while the handler runs,
/// and such a handler must not make requests of its own (refused: it would wait on its own thread). Default 0:
/// every handler on the pool. Measured before the I/O threads became single-threaded runtimes (then
/// `block_in_place`, which hands the worker's other work to another thread): slower on the shared 2-core VM
/// (docs/transport.md, Threads). Kept as a switch to re-measure.
pub const INLINE_HANDLER_ENV: &str = "AIFLOW_INLINE_HANDLER_BYTES";
pub const INLINE_HANDLER_DEFAULT_BYTES: u64 = 0;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok())
}

/// The server's QUIC configuration for each kind of path (see [`PathKind`]).
struct PathConfigs {
    network: Arc<quinn::ServerConfig>,
    loopback_v4: Arc<quinn::ServerConfig>,
    loopback_v6: Arc<quinn::ServerConfig>,
}

impl PathConfigs {
    fn to(&self, peer: SocketAddr) -> Arc<quinn::ServerConfig> {
        match PathKind::to(peer) {
            PathKind::Network => self.network.clone(),
            PathKind::Loopback { ipv6: false } => self.loopback_v4.clone(),
            PathKind::Loopback { ipv6: true } => self.loopback_v6.clone(),
        }
    }
}

/// A running server. Dropping it (or [`Server::close`]) stops it.
pub struct Server {
    endpoint: Endpoint,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds the UDP socket and starts accepting; returns once listening.
    pub fn start(cfg: ServerConfig, handler: Handler) -> Result<Server> {
        cfg.limits.validate()?;
        let tls = identity::server_tls(&cfg.identity, cfg.trust)?;
        let quic = QuicServerConfig::try_from(tls).map_err(|e| Error::Input(format!("QUIC TLS configuration: {e}")))?;
        let quic = Arc::new(quic);
        // One configuration per kind of path: a connection from this host gets the loopback tuning.
        let path_config = |path| -> Result<Arc<quinn::ServerConfig>> {
            let mut sc = quinn::ServerConfig::with_crypto(quic.clone());
            sc.transport_config(config::transport_config(&cfg.limits, false, path)?);
            Ok(Arc::new(sc))
        };
        let network = path_config(PathKind::Network)?;
        let loopback_v4 = path_config(PathKind::Loopback { ipv6: false })?;
        let loopback_v6 = path_config(PathKind::Loopback { ipv6: true })?;
        let loopback_peers = cfg.listen.ip().is_loopback() || cfg.listen.ip().is_unspecified();
        let rt = runtime::next_handle();
        let _guard = rt.enter();
        let endpoint = config::endpoint(cfg.listen, Some((*network).clone()), loopback_peers)?;
        let local_addr = endpoint.local_addr()?;
        let shared = Arc::new(Shared {
            handler,
            inflight: Budget::new("this server (all peers)", "max_inflight_bytes", cfg.limits.max_inflight_bytes),
            limits: cfg.limits,
            counters: Counters::default(),
            peers: PeerBudgets::default(),
            last_handshake_error: Mutex::new(String::new()),
            configs: PathConfigs { network, loopback_v4, loopback_v6 },
            open: Mutex::new(HashMap::new()),
            handler_starts: AtomicU64::new(0),
            fail_handler_start: env_u64(FAIL_HANDLER_START_ENV).unwrap_or(0),
            inline_max_bytes: env_u64(INLINE_HANDLER_ENV).unwrap_or(INLINE_HANDLER_DEFAULT_BYTES),
        });
        rt.spawn(accept_loop(endpoint.clone(), shared.clone()));
        Ok(Server { endpoint, local_addr, shared })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> ServerStats {
        let mut s = self.shared.counters.snapshot();
        s.inflight_bytes = self.shared.inflight.used();
        s.inflight_bytes_peak = self.shared.inflight.peak();
        s
    }

    /// Who is connected now, and quinn's figures of each connection's path (RTT, congestion window, losses).
    pub fn peer_paths(&self) -> Vec<(PeerInfo, PathInfo)> {
        let open = self.shared.open.lock().unwrap_or_else(|p| p.into_inner());
        open.values().map(|(peer, conn)| (peer.clone(), PathInfo::of(conn, peer.connection_id))).collect()
    }

    /// The last handshake failure (empty if none), for a clear log line.
    pub fn last_handshake_error(&self) -> String {
        self.shared.last_handshake_error.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Closes every connection and the socket; waits (up to 2 s) for the peers to be told. Safe to call twice.
    pub fn close(&self) {
        self.endpoint.close(CODE_OK, b"server closing");
        let ep = self.endpoint.clone();
        let _ = runtime::block_on(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
        });
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // No waiting here: a drop may happen on a runtime thread.
        self.endpoint.close(CODE_OK, b"server closing");
    }
}

async fn accept_loop(endpoint: Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let c = &shared.counters;
        if c.connections_active.load(Ordering::Relaxed) >= shared.limits.max_connections as u64 {
            c.connections_refused.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        }
        tokio::spawn(serve_connection(incoming, shared.clone()));
    }
}

fn peer_fingerprint(conn: &Connection) -> String {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().map(|c| identity::fingerprint(c)))
        .unwrap_or_default()
}

async fn serve_connection(incoming: Incoming, shared: Arc<Shared>) {
    let c = &shared.counters;
    let config = shared.configs.to(incoming.remote_address());
    let accepted = match incoming.accept_with(config) {
        Ok(connecting) => connecting.await,
        Err(e) => Err(e),
    };
    let conn = match accepted {
        Ok(conn) => conn,
        Err(e) => {
            c.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut last) = shared.last_handshake_error.lock() {
                *last = io::conn_err(&e).to_string();
            }
            return;
        }
    };
    c.connections_accepted.fetch_add(1, Ordering::Relaxed);
    c.connections_active.fetch_add(1, Ordering::Relaxed);
    let peer = PeerInfo { address: conn.remote_address(), fingerprint: peer_fingerprint(&conn), connection_id: conn.stable_id() as u64 };
    shared.open.lock().unwrap_or_else(|p| p.into_inner()).insert(peer.connection_id, (peer.clone(), conn.clone()));
    let limits = &shared.limits;
    let budgets = vec![
        Budget::new("this connection", "max_inflight_bytes_per_connection", limits.max_inflight_bytes_per_connection),
        shared.peers.get(&peer.fingerprint, limits.max_inflight_bytes_per_peer),
        shared.inflight.clone(),
    ];
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let budget = Reservation::new(budgets.clone());
                tokio::spawn(serve_stream(send, recv, conn.clone(), peer.clone(), budget, shared.clone()));
            }
            Err(e) => {
                if matches!(e, quinn::ConnectionError::TimedOut) {
                    c.connections_timed_out.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
        }
    }
    shared.open.lock().unwrap_or_else(|p| p.into_inner()).remove(&peer.connection_id);
    c.connections_active.fetch_sub(1, Ordering::Relaxed);
}

/// Reads one request, runs the handler, writes the reply. `budget` holds the request's bytes (charged as they
/// arrive) until the reply is written: the handler may send the request's frames back.
async fn serve_stream(mut send: SendStream, mut recv: RecvStream, conn: Connection, peer: PeerInfo, mut budget: Reservation, shared: Arc<Shared>) {
    let c = &shared.counters;
    let limits = &shared.limits;
    let read = tokio::time::timeout(limits.request_timeout(), io::read_message(&mut recv, limits, &mut budget)).await;
    let request = match read {
        Ok(Ok(m)) => m,
        Ok(Err(ReadFail::Limit(e))) => {
            // Refuse this message but keep the connection: tell the peer to stop sending, then say why.
            c.limit_errors.fetch_add(1, Ordering::Relaxed);
            c.requests_failed.fetch_add(1, Ordering::Relaxed);
            let _ = recv.stop(CODE_LIMIT);
            reply_error(&mut send, ErrorCode::Limit, &e.to_string(), limits).await;
            return;
        }
        Ok(Err(ReadFail::Gone(_))) => {
            // The peer went away mid-message; nobody to answer.
            c.streams_aborted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Ok(Err(ReadFail::Malformed(e))) => {
            // Not our protocol (bad magic, version, meta): answer once, then close the connection, since the
            // peer's idea of the stream is unknown. Other connections are unaffected.
            let msg = e.to_string();
            c.protocol_errors.fetch_add(1, Ordering::Relaxed);
            c.requests_failed.fetch_add(1, Ordering::Relaxed);
            let _ = recv.stop(CODE_PROTOCOL);
            reply_error(&mut send, ErrorCode::BadMessage, &msg, limits).await;
            let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
            conn.close(CODE_PROTOCOL, format!("protocol violation: {msg}").as_bytes());
            return;
        }
        Err(_) => {
            c.requests_failed.fetch_add(1, Ordering::Relaxed);
            let _ = recv.stop(CODE_TIMEOUT);
            let msg = format!("the request did not arrive within {} ms (request_timeout_ms)", limits.request_timeout_ms);
            reply_error(&mut send, ErrorCode::Timeout, &msg, limits).await;
            return;
        }
    };
    let (request_id, session_id) = (request.header.request_id, request.header.session_id);
    let handler = shared.handler.clone();
    let size = request.frames_len() + request.header.kind.len() as u64 + request.header.meta.as_bytes().len() as u64;
    let inline = size <= shared.inline_max_bytes;
    let nth = shared.handler_starts.fetch_add(1, Ordering::Relaxed) + 1;
    let injected = nth == shared.fail_handler_start;
    // tokio panics when it needs a new thread (a blocking-pool thread for the handler, or one to take over this
    // I/O worker's other tasks) and the OS refuses one (thread or memory limits): that request is answered with
    // an error and the server keeps serving.
    let outcome = if inline {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if injected {
                std::panic::resume_unwind(Box::new(format!("{FAIL_HANDLER_START_ENV}={nth}: injected thread start failure")));
            }
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || handler(request, peer)))
        }));
        match run {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(panic)) => Err(format!("the handler panicked: {}", panic_text(&panic))),
            Err(panic) => {
                let why = panic_text(&panic).to_string();
                return handler_start_failed(&mut send, &shared, request_id, session_id, &why).await;
            }
        }
    } else {
        let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if injected {
                std::panic::resume_unwind(Box::new(format!("{FAIL_HANDLER_START_ENV}={nth}: injected thread start failure")));
            }
            tokio::task::spawn_blocking(move || handler(request, peer))
        }));
        match spawned {
            Ok(task) => task.await.map_err(|join| format!("the handler panicked: {join}")),
            Err(panic) => {
                let why = panic_text(&panic).to_string();
                return handler_start_failed(&mut send, &shared, request_id, session_id, &why).await;
            }
        }
    };
    let mut reply = match outcome {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            c.requests_failed.fetch_add(1, Ordering::Relaxed);
            let code = if matches!(e, Error::LimitExceeded(_)) { ErrorCode::Limit } else { ErrorCode::Handler };
            Message::error(request_id, session_id, code, &e.to_string())
        }
        Err(panicked) => {
            c.requests_failed.fetch_add(1, Ordering::Relaxed);
            Message::error(request_id, session_id, ErrorCode::Handler, &panicked)
        }
    };
    reply.header.request_id = request_id;
    reply.header.session_id = session_id;
    let is_error = reply.header.is_error;
    match io::write_message(&mut send, reply, limits).await {
        Ok(()) => {
            if !is_error {
                c.requests_ok.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(Error::LimitExceeded(msg)) | Err(Error::Input(msg)) => {
            // The handler's reply breaks our own limits: say so instead.
            c.requests_failed.fetch_add(1, Ordering::Relaxed);
            let m = Message::error(request_id, session_id, ErrorCode::Handler, &format!("the handler's reply was refused: {msg}"));
            let _ = io::write_message(&mut send, m, limits).await;
        }
        Err(_) => {
            c.streams_aborted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("unknown")
}

/// Answers a request whose handler could not be started (no thread to be had) with an error.
async fn handler_start_failed(send: &mut SendStream, shared: &Shared, request_id: u64, session_id: u64, why: &str) {
    let c = &shared.counters;
    c.handler_start_failures.fetch_add(1, Ordering::Relaxed);
    c.requests_failed.fetch_add(1, Ordering::Relaxed);
    let msg = format!("the server could not start the handler ({why}); retry later");
    let _ = io::write_message(send, Message::error(request_id, session_id, ErrorCode::Limit, &msg), &shared.limits).await;
}

async fn reply_error(send: &mut SendStream, code: ErrorCode, msg: &str, limits: &Limits) {
    let _ = io::write_message(send, Message::error(0, 0, code, msg), limits).await;
}
