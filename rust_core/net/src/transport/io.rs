//! Reading and writing one [`Message`] on a QUIC stream, and the mapping of quinn's errors onto ours.

use bytes::Bytes;
use quinn::{ConnectionError, ReadError, ReadExactError, RecvStream, SendStream, VarInt, WriteError};

use super::budget::Reservation;
use super::buffers;
use super::Limits;
use super::message::{self, Message, PREAMBLE_LEN};
use crate::error::{Error, Result};

/// Application error codes we close connections and stop streams with.
pub const CODE_OK: VarInt = VarInt::from_u32(0);
pub const CODE_PROTOCOL: VarInt = VarInt::from_u32(1);
pub const CODE_LIMIT: VarInt = VarInt::from_u32(2);
pub const CODE_TIMEOUT: VarInt = VarInt::from_u32(3);
pub const CODE_CANCELLED: VarInt = VarInt::from_u32(4);
/// A client dropped its connection (`Client::reset`), typically after a failure on it.
pub const CODE_RESET: VarInt = VarInt::from_u32(5);

fn alert_name(alert: u64) -> &'static str {
    match alert {
        40 => "handshake_failure",
        42 => "bad_certificate",
        46 => "certificate_unknown",
        48 => "unknown_ca",
        49 => "access_denied",
        80 => "internal_error",
        116 => "certificate_required",
        120 => "no_application_protocol",
        _ => "other",
    }
}

/// Maps a lost connection to the error the user should see. TLS failures (QUIC crypto errors 0x100-0x1ff) are
/// `PeerRejected`: the handshake refused an identity or the ALPN.
pub fn conn_err(e: &ConnectionError) -> Error {
    match e {
        ConnectionError::TransportError(te) => {
            let code = u64::from(te.code);
            if (0x100..0x200).contains(&code) {
                Error::PeerRejected(format!("TLS handshake refused the peer: {}", te.reason))
            } else {
                Error::Transport(format!("QUIC protocol error: {te}"))
            }
        }
        ConnectionError::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            if (0x100..0x200).contains(&code) {
                let alert = code - 0x100;
                Error::PeerRejected(format!(
                    "the peer refused the TLS handshake (alert {alert} {}): is this node's fingerprint in the peer's trust list, and does it speak ALPN aiflow/1?",
                    alert_name(alert)
                ))
            } else {
                Error::Transport(format!("connection aborted by the peer: {c}"))
            }
        }
        ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            if c.error_code == CODE_LIMIT {
                Error::LimitExceeded(format!("the peer closed the connection: {reason}"))
            } else {
                Error::Transport(format!("the peer closed the connection (code {}): {reason}", c.error_code))
            }
        }
        // A dead peer, not a deadline: with keep-alives a live one is never silent that long.
        ConnectionError::TimedOut => {
            Error::Transport("the peer went silent past the idle timeout (idle_timeout_ms): it died or the path to it is down".into())
        }
        ConnectionError::LocallyClosed => Error::Transport("the connection was closed locally".into()),
        other => Error::Transport(format!("connection lost: {other}")),
    }
}

pub fn read_err(e: ReadError) -> Error {
    match e {
        ReadError::ConnectionLost(c) => conn_err(&c),
        ReadError::Reset(code) => Error::Transport(format!("the peer abandoned the message (stream reset, code {code})")),
        other => Error::Transport(format!("stream read failed: {other}")),
    }
}

fn read_exact_err(e: ReadExactError, what: &str) -> Error {
    match e {
        ReadExactError::FinishedEarly(n) => {
            Error::Transport(format!("the stream ended inside the message {what} after {n} bytes (peer disconnected mid-message?)"))
        }
        ReadExactError::ReadError(r) => read_err(r),
    }
}

pub fn write_err(e: WriteError) -> Error {
    match e {
        WriteError::ConnectionLost(c) => conn_err(&c),
        WriteError::Stopped(code) if code == CODE_LIMIT => Error::LimitExceeded("the peer refused the message (limit exceeded)".into()),
        WriteError::Stopped(code) => Error::Transport(format!("the peer stopped reading the message (code {code})")),
        other => Error::Transport(format!("stream write failed: {other}")),
    }
}

/// Writes `msg` and finishes the stream. The frames are handed to quinn as they are (reference-counted, no copy
/// into an intermediate buffer).
pub async fn write_message(send: &mut SendStream, msg: Message, limits: &Limits) -> Result<()> {
    let head = message::encode_head(&msg, limits)?;
    write_encoded(send, Bytes::from(head), msg.frames).await
}

/// Writes an already encoded head plus its frames, then finishes the stream.
pub async fn write_encoded(send: &mut SendStream, head: Bytes, frames: Vec<Bytes>) -> Result<()> {
    let mut chunks = Vec::with_capacity(frames.len() + 1);
    chunks.push(head);
    chunks.extend(frames.into_iter().filter(|f| !f.is_empty()));
    send.write_all_chunks(&mut chunks).await.map_err(write_err)?;
    send.finish().map_err(|_| Error::Transport("stream closed before the message was finished".into()))?;
    Ok(())
}

/// Why reading a message failed, so that a server can answer each case the right way.
#[derive(Debug)]
pub enum ReadFail {
    /// The peer went away or abandoned the stream mid-message: nobody to answer.
    Gone(Error),
    /// The bytes are not a valid message: a protocol violation.
    Malformed(Error),
    /// A valid message that declares more than the limits allow.
    Limit(Error),
}

impl ReadFail {
    pub fn into_error(self) -> Error {
        match self {
            ReadFail::Gone(e) | ReadFail::Malformed(e) | ReadFail::Limit(e) => e,
        }
    }
}

fn parse_fail(e: Error) -> ReadFail {
    match e {
        Error::LimitExceeded(_) => ReadFail::Limit(e),
        other => ReadFail::Malformed(other),
    }
}

/// Reads one message, validating its header against `limits` before reading any payload, and checks that the
/// stream ends right after the declared frames. Memory is taken as bytes arrive and charged to `budget` first
/// (a refused or impossible growth is a [`ReadFail::Limit`]); `budget` then holds the message's bytes.
pub async fn read_message(recv: &mut RecvStream, limits: &Limits, budget: &mut Reservation) -> std::result::Result<Message, ReadFail> {
    let mut pre = [0u8; PREAMBLE_LEN];
    recv.read_exact(&mut pre).await.map_err(|e| ReadFail::Gone(read_exact_err(e, "preamble")))?;
    let p = message::parse_preamble(&pre, limits).map_err(parse_fail)?;
    let rest = read_exactly(recv, p.rest_len(), budget, "header").await?;
    let (header, lens) = message::parse_rest(&p, &rest, limits).map_err(parse_fail)?;
    drop(rest);
    let mut frames = Vec::with_capacity(lens.len());
    for n in lens {
        frames.push(read_exactly(recv, n as usize, budget, "frame").await?);
    }
    match recv.read_chunk(1, true).await.map_err(|e| ReadFail::Gone(read_err(e)))? {
        None => Ok(Message { header, frames }),
        Some(_) => Err(ReadFail::Malformed(Error::Transport("the peer sent more bytes than its message declared".into()))),
    }
}

/// Reads exactly `n` bytes (`what`: of the message's header or a frame). What arrives in one chunk is passed on
/// without a copy; otherwise the chunks are copied once into a buffer that grows as they arrive (see
/// [`buffers::Growing`]). Either way the bytes are charged to `budget` before they are kept.
async fn read_exactly(recv: &mut RecvStream, n: usize, budget: &mut Reservation, what: &str) -> std::result::Result<Bytes, ReadFail> {
    if n == 0 {
        return Ok(Bytes::new());
    }
    let ended = |got: usize| ReadFail::Gone(Error::Transport(format!(
        "the stream ended inside a message {what} after {got} of {n} bytes (peer disconnected mid-message?)"
    )));
    let first = recv.read_chunk(n, true).await.map_err(|e| ReadFail::Gone(read_err(e)))?.ok_or_else(|| ended(0))?;
    if first.bytes.len() == n {
        budget.grow(n as u64).map_err(ReadFail::Limit)?;
        return Ok(first.bytes);
    }
    let mut buf = buffers::Growing::new(n);
    let mut charge = |b: u64| budget.grow(b);
    buf.extend(&first.bytes, &mut charge).map_err(ReadFail::Limit)?;
    while buf.len() < n {
        match recv.read_chunk(n - buf.len(), true).await.map_err(|e| ReadFail::Gone(read_err(e)))? {
            Some(c) => buf.extend(&c.bytes, &mut charge).map_err(ReadFail::Limit)?,
            None => return Err(ended(buf.len())),
        }
    }
    Ok(buf.into_bytes())
}
