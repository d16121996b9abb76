//! Helpers of the transport's limits tests: a server trusting given peers, and streams written by hand.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use aiflow_net::proto::message::{self, Message};
use aiflow_net::transport::budget::Reservation;
use aiflow_net::transport::{io, runtime, Client, ClientConfig, Handler, Identity, Limits, PeerInfo, Server, ServerConfig, Trust};
use aiflow_net::Error;
use bytes::Bytes;

pub fn echo() -> Handler {
    std::sync::Arc::new(|m: Message, _peer: PeerInfo| Ok(Message::new("echo", "{}", m.frames)))
}

/// A server trusting `peers`, and a client config for each of them.
pub fn server_for(limits: Limits, peers: &[Identity]) -> (Server, Vec<ClientConfig>) {
    let s = Identity::generate().unwrap();
    let trust = Trust::pinned(peers.iter().map(|p| p.fingerprint.as_str())).unwrap();
    let server = Server::start(ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), identity: s.clone(), trust, limits }, echo()).unwrap();
    let cfgs = peers
        .iter()
        .map(|p| ClientConfig {
            server: server.local_addr(),
            identity: p.clone(),
            trust: Trust::pinned([&s.fingerprint]).unwrap(),
            limits: Limits::default(),
        })
        .collect();
    (server, cfgs)
}

/// The head of a one-frame message that declares `declared` bytes of frame.
pub fn head_declaring(declared: u64) -> Vec<u8> {
    let mut head = message::encode_head(&Message::new("x", "{}", vec![Bytes::from_static(b"y")]), &Limits::default()).unwrap();
    let n = head.len();
    head[n - 8..].copy_from_slice(&declared.to_le_bytes());
    head
}

pub fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

pub fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").map(|m| m.lines().count()).unwrap_or(0)
}

pub fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sent` bytes of a message declaring 1 GiB on a new stream of `client`, and leaves it stalled.
pub fn stall(client: &Client, sent: usize) -> (quinn::SendStream, quinn::RecvStream) {
    let (c, head) = (client.clone(), head_declaring(DECLARED));
    runtime::block_on(async move {
        let (mut send, recv) = c.open_stream().await.unwrap();
        send.write_all(&head).await.unwrap();
        // The server may refuse the stream (stop it) before all is written: that is what some cases test.
        let _ = send.write_all(&vec![1u8; sent]).await;
        (send, recv)
    })
    .unwrap()
}

/// The error reply on a refused stream.
pub fn refusal(stream: (quinn::SendStream, quinn::RecvStream)) -> Error {
    let (_send, mut recv) = stream;
    let reply = runtime::block_on(async move {
        let (limits, mut held) = (Limits::default(), Reservation::default());
        tokio::time::timeout(Duration::from_secs(30), io::read_message(&mut recv, &limits, &mut held)).await
    })
    .unwrap()
    .expect("no reply within 30 s")
    .map_err(|e| e.into_error())
    .unwrap();
    reply.as_error().expect("an error reply")
}


/// What the misbehaving streams declare: just under the default max_message_bytes.
pub const DECLARED: u64 = (1 << 30) - 1;
