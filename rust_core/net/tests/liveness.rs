//! Liveness (issue 14): a peer that goes silent (killed, or its path cut) fails the requests in flight on its
//! connection within the idle timeout, naming the peer, not at the request's deadline; a live peer, idle or busy
//! computing for longer than the idle timeout, keeps its connection (the client's keep-alives).

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aiflow_net::netem::{Emulator, LinkParams};
use aiflow_net::proto::link::Direction;
use aiflow_net::proto::message::Message;
use aiflow_net::transport::{Client, Handler, Identity, Limits, PeerInfo, Server, ServerConfig, Trust};
use aiflow_net::Error;
use bytes::Bytes;
use common::*;

/// A fast, lossless relay: closing it silences the server as a SIGKILL (or a cut cable) would, without the
/// CONNECTION_CLOSE a clean shutdown sends.
fn relay_to(server: &Server) -> Emulator {
    let dir = Direction { rate_mbps: 10_000.0, delay_ms: 0.0, jitter_ms: 0.0, loss_pct: 0.0, queue_ms: 100.0 };
    let params = LinkParams { uplink: dir, downlink: dir, max_datagram_bytes: 65_507, seed: 1 };
    Emulator::start("127.0.0.1:0".parse().unwrap(), server.local_addr(), params).unwrap()
}

/// A server whose handler sleeps for the request's first frame (ms, as text) and echoes; plus a client config
/// reaching `via` (the server itself, or a relay in front of it).
fn sleepy_server(limits: Limits, client: &Identity) -> (Server, Identity) {
    let id = Identity::generate().unwrap();
    let handler: Handler = Arc::new(|m: Message, _p: PeerInfo| {
        let ms: u64 = std::str::from_utf8(&m.frames[0]).unwrap().parse().unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        Ok(Message::new("echo", "{}", m.frames))
    });
    let trust = Trust::pinned([client.fingerprint.as_str()]).unwrap();
    let cfg = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), identity: id.clone(), trust, limits };
    (Server::start(cfg, handler).unwrap(), id)
}

fn client(via: std::net::SocketAddr, me: &Identity, server: &Identity, limits: Limits) -> Client {
    let trust = Trust::pinned([server.fingerprint.as_str()]).unwrap();
    Client::new(aiflow_net::transport::ClientConfig { server: via, identity: me.clone(), trust, limits }).unwrap()
}

fn sleep_request(ms: u64) -> Message {
    Message::new("sleep", "{}", vec![Bytes::from(ms.to_string())])
}

#[test]
fn a_request_in_flight_to_a_peer_that_goes_silent_fails_within_the_idle_timeout_naming_it() {
    let limits = Limits::default();
    let me = Identity::generate().unwrap();
    let (server, server_id) = sleepy_server(limits.clone(), &me);
    let relay = Arc::new(Mutex::new(relay_to(&server)));
    let via = relay.lock().unwrap().local_addr();
    let c = client(via, &me, &server_id, limits.clone());
    c.request_blocking(sleep_request(0), None).unwrap(); // connected, the path warm
    // Two requests in flight: the handler computes for 20 s, their deadline is 30 s. The relay dies 300 ms in.
    // Each caller drops the failed connection at once (as a tier does), which must not change what the other
    // one is told.
    let (tx, rx) = mpsc::channel();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (cc, tx) = (c.clone(), tx.clone());
            std::thread::spawn(move || {
                let (r, connection) = cc.request_pending(sleep_request(20_000), Some(Duration::from_secs(30))).wait().unwrap();
                cc.reset(connection);
                tx.send((r, Instant::now())).unwrap();
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    relay.lock().unwrap().close();
    let died = Instant::now();
    for _ in 0..2 {
        let (r, at) = rx.recv_timeout(Duration::from_secs(15)).expect("no answer within 15 s of the peer's death");
        let took = at - died;
        eprintln!("a silent peer failed a request in flight {took:?} after it went silent");
        // At most the idle timeout after the first keep-alive that goes unanswered; 1 s of margin for a loaded machine.
        let bound = limits.idle_timeout() + limits.keep_alive_interval() + Duration::from_secs(1);
        assert!(took < bound, "noticed after {took:?}");
        match r {
            Err(Error::Transport(m)) => {
                assert!(m.contains(&via.to_string()), "the error names the peer: {m}");
                assert!(m.contains("idle_timeout_ms"), "{m}");
            }
            other => panic!("expected a transport error, got {other:?}"),
        }
    }
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn a_live_peer_keeps_its_connection_while_idle_or_computing_past_the_idle_timeout() {
    // A short idle timeout, so that the test is quick; the keep-alives scale with it (a fifth).
    let limits = Limits { idle_timeout_ms: 400, ..Limits::default() };
    let me = Identity::generate().unwrap();
    let (server, server_id) = sleepy_server(limits.clone(), &me);
    let c = client(server.local_addr(), &me, &server_id, limits.clone());
    c.request_blocking(sleep_request(0), None).unwrap();
    let first = c.connection_id().unwrap();
    std::thread::sleep(Duration::from_millis(1_500)); // idle: nearly 4 idle timeouts
    c.request_blocking(sleep_request(1_200), None).unwrap(); // computing: 3 idle timeouts without a reply
    assert_eq!(c.connection_id(), Some(first), "the connection was replaced");
    wait_until("the server to count both replies", 5, || server.stats().requests_ok == 2);
    let st = server.stats();
    assert_eq!((st.connections_accepted, st.connections_timed_out), (1, 0), "{st:?}");
}
