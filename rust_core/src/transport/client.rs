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

use super::identity::{self, Identity, Trust};
use super::io::{self, CODE_OK};
use super::limits::Limits;
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
    server: SocketAddr,
    quic: quinn::ClientConfig,
    limits: Limits,
    conn: tokio::sync::Mutex<Option<Connection>>,
    next_id: AtomicU64,
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
        qc.transport_config(cfg.limits.transport_config(true)?);
        let bind: SocketAddr = if cfg.server.is_ipv6() { "[::]:0".parse().expect("addr") } else { "0.0.0.0:0".parse().expect("addr") };
        let _guard = runtime::handle().enter();
        let endpoint = super::limits::endpoint(bind, None)?;
        Ok(Client {
            inner: Arc::new(Inner {
                endpoint,
                server: cfg.server,
                quic: qc,
                limits: cfg.limits,
                conn: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    pub fn server(&self) -> SocketAddr {
        self.inner.server
    }

    /// The open connection, or a new one (one handshake at a time: concurrent callers wait for it).
    async fn connection(&self) -> Result<Connection> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.quic.clone(), self.inner.server, SERVER_NAME)
            .map_err(|e| Error::Transport(format!("cannot connect to {}: {e}", self.inner.server)))?;
        let conn = connecting.await.map_err(|e| io::conn_err(&e))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Opens the connection now (the handshake), so that the first request does not pay for it.
    pub async fn connect(&self) -> Result<()> {
        self.connection().await.map(|_| ())
    }

    /// Sends `msg` and returns the reply. The request id is assigned here; the session id is the caller's.
    /// An error reply becomes the matching error (`Remote` for a handler failure). `timeout` bounds the whole
    /// round trip, the connection setup included.
    pub async fn request(&self, mut msg: Message, timeout: Duration) -> Result<Message> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        msg.header.request_id = id;
        msg.header.is_error = false;
        // Our own limits are checked before a byte leaves, so an oversized message fails fast and locally.
        let head = Bytes::from(message::encode_head(&msg, &self.inner.limits)?);
        let frames = msg.frames;
        let this = self.clone();
        let exchange = async move {
            let conn = this.connection().await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| io::conn_err(&e))?;
            // Read while writing: a server that refuses the message early (a limit) answers before we are done.
            let write = io::write_encoded(&mut send, head, frames);
            let read = io::read_message(&mut recv, &this.inner.limits);
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
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(format!("no reply from {} within {:.3} s", self.inner.server, timeout.as_secs_f64()))),
        }
    }

    /// Starts a request on the shared runtime; a blocking caller waits on the returned [`Pending`]. Never
    /// blocks on the runtime itself, so it is safe from any thread, a server handler's included.
    pub fn request_pending(&self, msg: Message, timeout: Option<Duration>) -> Pending<Result<Message>> {
        let this = self.clone();
        let timeout = timeout.unwrap_or(self.inner.limits.request_timeout());
        Pending::spawn(async move { this.request(msg, timeout).await })
    }

    /// Blocking [`Client::request`].
    pub fn request_blocking(&self, msg: Message, timeout: Option<Duration>) -> Result<Message> {
        self.request_pending(msg, timeout).wait()?
    }

    /// Closes the connection (in-flight requests fail). The client reconnects if used again.
    pub fn close(&self) {
        let inner = self.inner.clone();
        let _ = runtime::block_on(async move {
            if let Some(c) = inner.conn.lock().await.take() {
                c.close(CODE_OK, b"client closing");
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), inner.endpoint.wait_idle()).await;
        });
    }
}
