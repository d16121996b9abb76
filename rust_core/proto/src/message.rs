//! The message format on one QUIC stream, I/O-free so it can be tested and fuzzed alone.
//!
//! One request or reply is one message, written on one stream and ended by the stream's FIN:
//!
//! ```text
//! offset  size  field
//!  0      4     magic b"AFM1"
//!  4      1     version (1)
//!  5      1     flags: bit 0 = error reply; bit 1 = binary meta; other bits must be 0
//!  6      2     kind_len (u16 LE), 1..=MAX_KIND_BYTES
//!  8      8     request_id (u64 LE)
//! 16      8     session_id (u64 LE)
//! 24      4     meta_len (u32 LE)
//! 28      4     n_frames (u32 LE)
//! 32      ...   kind (UTF-8), meta, n_frames x u64 LE frame lengths
//! ...     ...   the frames, back to back, then FIN
//! ```
//!
//! The meta is a JSON object (UTF-8), validated here, or, with flag bit 1, the application's own binary header
//! (the tier protocol's `Infer` and `Result`, aiflow_cli/runtime/headers.py): opaque bytes here, bounded by
//! `max_meta_bytes` like JSON, and validated field by field by the application.
//!
//! Everything the receiver needs to bound its memory (header size, frame count, total payload) is in the first
//! 32 bytes plus the frame table, so a message is validated against [`Limits`] before a byte of payload is read
//! or allocated, and a peer that sends more or less than it declared is caught.

use bytes::Bytes;

use crate::limits::Limits;
use crate::error::{Error, Result};

/// ALPN protocol id of aiflow's transport; a peer that does not offer it is refused at the TLS handshake.
pub const ALPN: &[u8] = b"aiflow/1";

pub const MAGIC: [u8; 4] = *b"AFM1";
pub const VERSION: u8 = 1;
/// Size of the fixed part of every message (bytes).
pub const PREAMBLE_LEN: usize = 32;
/// Longest `kind` string (bytes).
pub const MAX_KIND_BYTES: usize = 256;
/// Flag bit: this reply carries an error (its meta has `error` and `code`).
pub const FLAG_ERROR: u8 = 1;
/// Flag bit: the meta is binary (the application's header), not JSON.
pub const FLAG_BINARY_META: u8 = 2;

/// A message's meta: a JSON object as text (validated on decode; empty means `{}`), or binary bytes that only
/// the application interprets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Meta {
    Json(String),
    Binary(Bytes),
}

impl Meta {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Meta::Json(s) => s.as_bytes(),
            Meta::Binary(b) => b,
        }
    }

    /// The JSON text, or "" for a binary meta.
    pub fn json(&self) -> &str {
        match self {
            Meta::Json(s) => s,
            Meta::Binary(_) => "",
        }
    }
}

/// What a message says about itself besides its frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub request_id: u64,
    pub session_id: u64,
    pub kind: String,
    pub meta: Meta,
    /// True for an error reply.
    pub is_error: bool,
}

/// One message: a header plus opaque frames (in practice codec frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub frames: Vec<Bytes>,
}

/// The parsed fixed part of a message: tells the reader how many more header bytes to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub flags: u8,
    pub kind_len: usize,
    pub request_id: u64,
    pub session_id: u64,
    pub meta_len: usize,
    pub n_frames: usize,
}

impl Preamble {
    /// Bytes of kind + meta + frame table that follow the preamble.
    pub fn rest_len(&self) -> usize {
        self.kind_len + self.meta_len + 8 * self.n_frames
    }
}

/// The well-known error codes carried in an error reply's meta (`code`), so the client raises the right class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The handler failed (Python: RemoteError).
    Handler,
    /// A limit was exceeded (LimitExceeded).
    Limit,
    /// The request was malformed (TransportError).
    BadMessage,
    /// The request took too long to arrive (Timeout).
    Timeout,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Handler => "handler",
            ErrorCode::Limit => "limit_exceeded",
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::Timeout => "timeout",
        }
    }

    /// The core error a client raises for an error reply with this code.
    pub fn to_error(code: &str, msg: String) -> Error {
        match code {
            "limit_exceeded" => Error::LimitExceeded(format!("refused by peer: {msg}")),
            "bad_message" => Error::Transport(format!("refused by peer: {msg}")),
            "timeout" => Error::Timeout(format!("peer timed out: {msg}")),
            _ => Error::Remote(msg),
        }
    }
}

impl Message {
    /// A plain message with a JSON meta.
    pub fn new(kind: impl Into<String>, meta_json: impl Into<String>, frames: Vec<Bytes>) -> Message {
        Message::with_meta(kind, Meta::Json(meta_json.into()), frames)
    }

    /// A plain message with either kind of meta.
    pub fn with_meta(kind: impl Into<String>, meta: Meta, frames: Vec<Bytes>) -> Message {
        Message { header: Header { request_id: 0, session_id: 0, kind: kind.into(), meta, is_error: false }, frames }
    }

    /// An error reply to `request_id`; `msg` is shown to the remote user.
    pub fn error(request_id: u64, session_id: u64, code: ErrorCode, msg: &str) -> Message {
        let meta = serde_json::json!({ "error": msg, "code": code.as_str() }).to_string();
        Message {
            header: Header { request_id, session_id, kind: "error".into(), meta: Meta::Json(meta), is_error: true },
            frames: Vec::new(),
        }
    }

    /// Total payload bytes of the frames.
    pub fn frames_len(&self) -> u64 {
        self.frames.iter().map(|f| f.len() as u64).sum()
    }

    /// For an error reply: the error it carries, as the core error the caller should see.
    pub fn as_error(&self) -> Option<Error> {
        if !self.header.is_error {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(self.header.meta.json()).unwrap_or_default();
        let msg = v.get("error").and_then(|m| m.as_str()).unwrap_or("remote error without a message").to_string();
        let code = v.get("code").and_then(|c| c.as_str()).unwrap_or("handler");
        Some(ErrorCode::to_error(code, msg))
    }
}

/// Encodes everything but the frames (preamble, kind, meta, frame table). The frames follow as they are, so a
/// sender can write them from their own buffers without concatenating. Checks the message against `limits`.
pub fn encode_head(msg: &Message, limits: &Limits) -> Result<Vec<u8>> {
    let h = &msg.header;
    if h.kind.is_empty() || h.kind.len() > MAX_KIND_BYTES {
        return Err(Error::Input(format!("message kind must be 1..={MAX_KIND_BYTES} bytes, got {}", h.kind.len())));
    }
    let meta = h.meta.as_bytes();
    if meta.len() as u64 > limits.max_meta_bytes {
        return Err(Error::LimitExceeded(format!(
            "message meta is {} bytes; the limit is {} (max_meta_bytes)",
            meta.len(),
            limits.max_meta_bytes
        )));
    }
    check_frames(msg.frames.len() as u64, msg.frames_len(), limits)?;
    let mut out = Vec::with_capacity(PREAMBLE_LEN + h.kind.len() + meta.len() + 8 * msg.frames.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    let binary = if matches!(h.meta, Meta::Binary(_)) { FLAG_BINARY_META } else { 0 };
    out.push(if h.is_error { FLAG_ERROR } else { 0 } | binary);
    out.extend_from_slice(&(h.kind.len() as u16).to_le_bytes());
    out.extend_from_slice(&h.request_id.to_le_bytes());
    out.extend_from_slice(&h.session_id.to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&(msg.frames.len() as u32).to_le_bytes());
    out.extend_from_slice(h.kind.as_bytes());
    out.extend_from_slice(meta);
    for f in &msg.frames {
        out.extend_from_slice(&(f.len() as u64).to_le_bytes());
    }
    Ok(out)
}

/// Encodes a whole message into one buffer (tests, fuzzing; the transport writes head and frames separately).
pub fn encode(msg: &Message, limits: &Limits) -> Result<Vec<u8>> {
    let mut out = encode_head(msg, limits)?;
    for f in &msg.frames {
        out.extend_from_slice(f);
    }
    Ok(out)
}

fn check_frames(n_frames: u64, total: u64, limits: &Limits) -> Result<()> {
    if n_frames > limits.max_frames as u64 {
        return Err(Error::LimitExceeded(format!(
            "message has {n_frames} frames; the limit is {} (max_frames)",
            limits.max_frames
        )));
    }
    if total > limits.max_message_bytes {
        return Err(Error::LimitExceeded(format!(
            "message carries {total} bytes of frames; the limit is {} (max_message_bytes)",
            limits.max_message_bytes
        )));
    }
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses and validates the fixed 32-byte part. Errors are `Transport` for a malformed preamble (not our
/// protocol) and `LimitExceeded` for one that declares more than `limits` allow.
pub fn parse_preamble(b: &[u8; PREAMBLE_LEN], limits: &Limits) -> Result<Preamble> {
    if b[0..4] != MAGIC {
        return Err(Error::Transport(format!("not an aiflow message: bad magic {:02x?}", &b[0..4])));
    }
    if b[4] != VERSION {
        return Err(Error::Transport(format!("unsupported message version {} (this build speaks {VERSION})", b[4])));
    }
    let flags = b[5];
    if flags & !(FLAG_ERROR | FLAG_BINARY_META) != 0 {
        return Err(Error::Transport(format!("unknown message flags {flags:#04x}")));
    }
    let kind_len = u16_at(b, 6) as usize;
    if kind_len == 0 || kind_len > MAX_KIND_BYTES {
        return Err(Error::Transport(format!("message kind length {kind_len} outside 1..={MAX_KIND_BYTES}")));
    }
    let meta_len = u32_at(b, 24) as u64;
    if meta_len > limits.max_meta_bytes {
        return Err(Error::LimitExceeded(format!(
            "message meta is {meta_len} bytes; the limit is {} (max_meta_bytes)",
            limits.max_meta_bytes
        )));
    }
    let n_frames = u32_at(b, 28) as u64;
    check_frames(n_frames, 0, limits)?;
    Ok(Preamble {
        flags,
        kind_len,
        request_id: u64_at(b, 8),
        session_id: u64_at(b, 16),
        meta_len: meta_len as usize,
        n_frames: n_frames as usize,
    })
}

/// Parses kind, meta and frame table (`rest` must be exactly `p.rest_len()` bytes); returns the header and the
/// validated frame lengths.
pub fn parse_rest(p: &Preamble, rest: &[u8], limits: &Limits) -> Result<(Header, Vec<u64>)> {
    if rest.len() != p.rest_len() {
        return Err(Error::Transport(format!("message header truncated: {} of {} bytes", rest.len(), p.rest_len())));
    }
    let kind = std::str::from_utf8(&rest[..p.kind_len])
        .map_err(|_| Error::Transport("message kind is not UTF-8".into()))?
        .to_string();
    let meta_bytes = &rest[p.kind_len..p.kind_len + p.meta_len];
    // An empty meta means `{}`; it is kept as sent so that decode(encode(m)) == m.
    let meta = if p.flags & FLAG_BINARY_META != 0 {
        Meta::Binary(Bytes::copy_from_slice(meta_bytes))
    } else if meta_bytes.is_empty() {
        Meta::Json(String::new())
    } else {
        let text = std::str::from_utf8(meta_bytes).map_err(|_| Error::Transport("message meta is not UTF-8".into()))?;
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(_)) => Meta::Json(text.to_string()),
            Ok(_) => return Err(Error::Transport("message meta must be a JSON object".into())),
            Err(e) => return Err(Error::Transport(format!("message meta is not valid JSON: {e}"))),
        }
    };
    let table = &rest[p.kind_len + p.meta_len..];
    let mut lens = Vec::with_capacity(p.n_frames);
    let mut total: u64 = 0;
    for i in 0..p.n_frames {
        let n = u64_at(table, 8 * i);
        total = total.checked_add(n).ok_or_else(|| Error::LimitExceeded("frame lengths overflow".into()))?;
        lens.push(n);
    }
    check_frames(p.n_frames as u64, total, limits)?;
    let header = Header {
        request_id: p.request_id,
        session_id: p.session_id,
        kind,
        meta,
        is_error: p.flags & FLAG_ERROR != 0,
    };
    Ok((header, lens))
}

/// Decodes a whole message from one buffer (tests and fuzzing; the transport reads incrementally).
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Message> {
    let pre: &[u8; PREAMBLE_LEN] = buf
        .get(..PREAMBLE_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| Error::Transport(format!("message truncated: {} bytes, the preamble alone is {PREAMBLE_LEN}", buf.len())))?;
    let p = parse_preamble(pre, limits)?;
    let rest_end = PREAMBLE_LEN + p.rest_len();
    let rest = buf.get(PREAMBLE_LEN..rest_end).ok_or_else(|| Error::Transport("message header truncated".into()))?;
    let (header, lens) = parse_rest(&p, rest, limits)?;
    let mut at = rest_end;
    let mut frames = Vec::with_capacity(lens.len());
    for n in lens {
        let end = at.checked_add(n as usize).filter(|&e| e <= buf.len());
        let end = end.ok_or_else(|| Error::Transport("message ends inside a frame".into()))?;
        frames.push(Bytes::copy_from_slice(&buf[at..end]));
        at = end;
    }
    if at != buf.len() {
        return Err(Error::Transport(format!("{} bytes after the last frame", buf.len() - at)));
    }
    Ok(Message { header, frames })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Message {
        let mut m = Message::new("infer", r#"{"stage":1}"#, vec![Bytes::from_static(b"abc"), Bytes::new(), Bytes::from(vec![7u8; 1000])]);
        m.header.request_id = 42;
        m.header.session_id = 7;
        m
    }

    #[test]
    fn round_trip() {
        let l = Limits::default();
        let m = sample();
        assert_eq!(decode(&encode(&m, &l).unwrap(), &l).unwrap(), m);
        let e = Message::error(3, 4, ErrorCode::Limit, "too big");
        let d = decode(&encode(&e, &l).unwrap(), &l).unwrap();
        assert!(matches!(d.as_error(), Some(Error::LimitExceeded(s)) if s.contains("too big")));
        // A binary meta crosses as it is, even when it is not UTF-8, and keeps its flag.
        let b = Message::with_meta("infer", Meta::Binary(Bytes::from_static(&[3, 0, 0xff, 0xfe])), vec![Bytes::from_static(b"x")]);
        let enc = encode(&b, &l).unwrap();
        assert_eq!(enc[5], FLAG_BINARY_META);
        assert_eq!(decode(&enc, &l).unwrap(), b);
    }

    #[test]
    fn binary_meta_is_bounded_like_json() {
        let l = Limits { max_meta_bytes: 8, ..Limits::default() };
        let b = Message::with_meta("k", Meta::Binary(Bytes::from(vec![0u8; 9])), vec![]);
        assert!(matches!(encode(&b, &l), Err(Error::LimitExceeded(_))));
        let enc = encode(&b, &Limits::default()).unwrap();
        assert!(matches!(decode(&enc, &l), Err(Error::LimitExceeded(_))));
        // Flag bits beyond error and binary are refused.
        let mut bad = enc.clone();
        bad[5] = 4;
        assert!(matches!(decode(&bad, &Limits::default()), Err(Error::Transport(_))));
    }

    #[test]
    fn limits_are_checked_before_payload() {
        let l = Limits { max_message_bytes: 100, max_frames: 2, ..Limits::default() };
        let big = encode(&sample(), &Limits::default()).unwrap();
        // 3 frames > 2: refused from the preamble alone.
        let pre: &[u8; PREAMBLE_LEN] = big[..PREAMBLE_LEN].try_into().unwrap();
        assert!(matches!(parse_preamble(pre, &l), Err(Error::LimitExceeded(_))));
        let l = Limits { max_message_bytes: 100, ..Limits::default() };
        assert!(matches!(decode(&big, &l), Err(Error::LimitExceeded(_))));
        assert!(matches!(encode(&sample(), &l), Err(Error::LimitExceeded(_))));
    }

    #[test]
    fn malformed_is_refused() {
        let l = Limits::default();
        let good = encode(&sample(), &l).unwrap();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad, &l), Err(Error::Transport(_))));
        let mut bad = good.clone();
        bad[5] = 0x80;
        assert!(decode(&bad, &l).is_err());
        let mut bad = good.clone();
        bad.push(0);
        assert!(decode(&bad, &l).is_err());
        assert!(decode(&good[..good.len() - 1], &l).is_err());
        // Meta that is JSON but not an object.
        let m = Message::new("k", "[1,2]", vec![]);
        assert!(decode(&encode(&m, &l).unwrap(), &l).is_err());
        // A frame table whose sum overflows u64.
        let mut m = encode(&Message::new("k", "{}", vec![Bytes::new(), Bytes::new()]), &l).unwrap();
        let t = PREAMBLE_LEN + 1 + 2;
        m[t..t + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        m[t + 8..t + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&m, &l), Err(Error::LimitExceeded(_))));
    }

    proptest! {
        // Fuzz: random bytes and random mutations of a valid message never panic, and anything that decodes
        // re-encodes to the same bytes.
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&data, &Limits::default());
        }

        #[test]
        fn mutations_never_panic(pos in 0usize..1200, val in any::<u8>(), cut in 0usize..1200) {
            let l = Limits::default();
            let mut b = encode(&sample(), &l).unwrap();
            let p = pos % b.len();
            b[p] = val;
            b.truncate(cut.max(1).min(b.len()));
            if let Ok(m) = decode(&b, &l) {
                prop_assert_eq!(encode(&m, &l).unwrap(), b);
            }
        }
    }
}
