//! End-to-end tests of server and client on loopback, in pure Rust.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::Error;

fn echo() -> Handler {
    Arc::new(|m: Message, peer: PeerInfo| {
        if m.header.kind == "fail" {
            return Err(Error::Remote("boom".into()));
        }
        let meta = format!(r#"{{"peer":"{}"}}"#, peer.fingerprint);
        Ok(Message::new(format!("re:{}", m.header.kind), meta, m.frames))
    })
}

fn pair(limits: Limits, handler: Handler) -> (Server, Client, Identity) {
    let (s, c) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let server = Server::start(
        ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), identity: s.clone(), trust: Trust::pinned([&c.fingerprint]).unwrap(), limits: limits.clone() },
        handler,
    )
    .unwrap();
    let client = Client::new(ClientConfig {
        server: server.local_addr(),
        identity: c.clone(),
        trust: Trust::pinned([&s.fingerprint]).unwrap(),
        limits: Limits::default(),
    })
    .unwrap();
    (server, client, c)
}

const T: Option<Duration> = Some(Duration::from_secs(10));

#[test]
fn echo_round_trip_and_errors() {
    let (server, client, cid) = pair(Limits { max_message_bytes: 1 << 20, ..Limits::default() }, echo());
    let big = Bytes::from((0..300_000u32).map(|i| i as u8).collect::<Vec<u8>>());
    let msg = Message::new("x", "{}", vec![Bytes::from_static(b"a"), big.clone()]);
    let r = client.request_blocking(msg, T).unwrap();
    assert_eq!(r.header.kind, "re:x");
    assert_eq!(r.frames, vec![Bytes::from_static(b"a"), big]);
    assert!(r.header.meta_json.contains(&cid.fingerprint));
    // Handler error -> Remote.
    let e = client.request_blocking(Message::new("fail", "", vec![]), T).unwrap_err();
    assert!(matches!(e, Error::Remote(ref s) if s.contains("boom")), "{e:?}");
    // Over the server's limit -> LimitExceeded, and the connection still serves.
    let e = client.request_blocking(Message::new("x", "", vec![Bytes::from(vec![0u8; 2 << 20])]), T).unwrap_err();
    assert!(matches!(e, Error::LimitExceeded(_)), "{e:?}");
    assert!(client.request_blocking(Message::new("x", "", vec![]), T).is_ok());
    let st = server.stats();
    assert_eq!((st.requests_ok, st.limit_errors), (2, 1));
    server.close();
}

#[test]
fn untrusted_peers_are_refused_both_ways() {
    let (server, _client, _) = pair(Limits::default(), echo());
    let stranger = Identity::generate().unwrap();
    // The server does not trust the client.
    let c = Client::new(ClientConfig {
        server: server.local_addr(),
        identity: stranger.clone(),
        trust: Trust::InsecureDevAcceptAny,
        limits: Limits::default(),
    })
    .unwrap();
    let e = c.request_blocking(Message::new("x", "", vec![]), T).unwrap_err();
    assert!(matches!(e, Error::PeerRejected(_)), "{e:?}");
    // The client does not trust the server.
    let c = Client::new(ClientConfig {
        server: server.local_addr(),
        identity: stranger.clone(),
        trust: Trust::pinned([&stranger.fingerprint]).unwrap(),
        limits: Limits::default(),
    })
    .unwrap();
    let e = c.request_blocking(Message::new("x", "", vec![]), T).unwrap_err();
    assert!(matches!(e, Error::PeerRejected(ref s) if s.contains("not in the trusted")), "{e:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(server.stats().handshakes_failed >= 1);
}

#[test]
fn handler_can_forward_to_another_server() {
    let (cloud, cloud_client, _) = pair(Limits::default(), echo());
    // The edge's handler uses a blocking client from inside the server: must not deadlock or panic.
    let fwd: Handler = Arc::new(move |m: Message, _p: PeerInfo| cloud_client.request_blocking(m, T));
    let (edge, client, _) = pair(Limits::default(), fwd);
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let c = client.clone();
            std::thread::spawn(move || c.request_blocking(Message::new(format!("k{i}"), "", vec![Bytes::from(vec![i as u8; 1000])]), T).unwrap())
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let r = t.join().unwrap();
        assert_eq!(r.header.kind, format!("re:k{i}"));
        assert_eq!(r.frames[0], Bytes::from(vec![i as u8; 1000]));
    }
    edge.close();
    cloud.close();
}
