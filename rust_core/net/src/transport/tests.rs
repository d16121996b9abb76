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

/// A server on loopback trusting one fresh client identity, and the configuration of that client.
fn server_and_client_config(limits: Limits, handler: Handler) -> (Server, ClientConfig) {
    let (s, c) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let server = Server::start(
        ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), identity: s.clone(), trust: Trust::pinned([&c.fingerprint]).unwrap(), limits: limits.clone() },
        handler,
    )
    .unwrap();
    let cfg = ClientConfig {
        server: server.local_addr(),
        identity: c,
        trust: Trust::pinned([&s.fingerprint]).unwrap(),
        // The server's limits are under test; the client only shares its congestion controller.
        limits: Limits { congestion: limits.congestion, ..Limits::default() },
    };
    (server, cfg)
}

fn pair(limits: Limits, handler: Handler) -> (Server, Client, Identity) {
    let (server, cfg) = server_and_client_config(limits, handler);
    let client = Client::new(cfg.clone()).unwrap();
    (server, client, cfg.identity)
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
    assert!(r.header.meta.json().contains(&cid.fingerprint));
    // Handler error -> Remote.
    let e = client.request_blocking(Message::new("fail", "", vec![]), T).unwrap_err();
    assert!(matches!(e, Error::Remote(ref s) if s.contains("boom")), "{e:?}");
    // Over the server's limit -> LimitExceeded, and the connection still serves.
    let e = client.request_blocking(Message::new("x", "", vec![Bytes::from(vec![0u8; 2 << 20])]), T).unwrap_err();
    assert!(matches!(e, Error::LimitExceeded(_)), "{e:?}");
    assert!(client.request_blocking(Message::new("x", "", vec![]), T).is_ok());
    // The server counts a request after its reply is on the wire, so the client may read the stats first.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut st = server.stats();
    while (st.requests_ok, st.limit_errors) != (2, 1) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        st = server.stats();
    }
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

#[test]
fn reset_drops_only_the_connection_it_names() {
    let slow: Handler = Arc::new(|m: Message, _p: PeerInfo| {
        if m.header.kind == "sleep" {
            std::thread::sleep(Duration::from_millis(1500));
        }
        Ok(Message::new("ok", "", vec![]))
    });
    let (server, client, _) = pair(Limits::default(), slow);
    assert_eq!(client.connection_id(), None);
    client.request_blocking(Message::new("x", "", vec![]), T).unwrap();
    let first = client.connection_id().expect("connected");
    // A request in flight on the connection fails at once when it is reset, without waiting for the handler.
    let pending = client.request_pending(Message::new("sleep", "", vec![]), T);
    std::thread::sleep(Duration::from_millis(100));
    let t0 = std::time::Instant::now();
    assert!(client.reset(Some(first)));
    let (result, used) = pending.wait().unwrap();
    assert!(matches!(result, Err(Error::Transport(_))), "{result:?}");
    assert_eq!(used, Some(first));
    assert!(t0.elapsed() < Duration::from_millis(500), "reset took {:?}", t0.elapsed());
    // The next request reconnects; a late reset of the old connection leaves the new one alone.
    client.request_blocking(Message::new("x", "", vec![]), T).unwrap();
    let second = client.connection_id().expect("reconnected");
    assert_ne!(first, second);
    assert!(!client.reset(Some(first)));
    assert_eq!(client.connection_id(), Some(second));
    client.request_blocking(Message::new("x", "", vec![]), T).unwrap();
    assert_eq!(client.connection_id(), Some(second));
    // None: whichever connection is open.
    assert!(client.reset(None));
    assert!(!client.reset(None));
    server.close();
}

#[test]
fn loopback_paths_use_large_datagrams_and_a_1472_byte_path_still_works() {
    let (server, cfg) = server_and_client_config(Limits::default(), echo());
    let client = Client::new(cfg.clone()).unwrap();
    let big = Bytes::from(vec![5u8; 8 << 20]);
    for _ in 0..3 {
        client.request_blocking(Message::new("x", "", vec![big.clone()]), T).unwrap();
    }
    let direct = client.path_info().unwrap();
    assert!(direct.mtu_bytes > 16_000, "loopback MTU discovery stopped at {}", direct.mtu_bytes);
    assert_eq!(direct.black_holes, 0);

    // The same server behind the link emulator, which drops datagrams over 1472 bytes: on a loopback address,
    // so the client probes for 64 KiB datagrams too; the probes are lost and the connection stays below 1472.
    let dir = crate::netem::Direction { rate_mbps: 200.0, delay_ms: 1.0, jitter_ms: 0.0, loss_pct: 0.0, queue_ms: 50.0 };
    let params = crate::netem::LinkParams { uplink: dir, downlink: dir, max_datagram_bytes: 1472, seed: 1 };
    let mut emu = crate::netem::Emulator::start("127.0.0.1:0".parse().unwrap(), server.local_addr(), params).unwrap();
    let via = Client::new(ClientConfig { server: emu.local_addr(), ..cfg }).unwrap();
    for _ in 0..3 {
        let r = via.request_blocking(Message::new("x", "", vec![big.clone()]), T).unwrap();
        assert_eq!(r.frames[0].len(), big.len());
    }
    let narrow = via.path_info().unwrap();
    assert!(narrow.mtu_bytes > 1200 && narrow.mtu_bytes <= 1472, "{narrow:?}");
    assert_eq!(narrow.black_holes, 0);
    let (up, _) = emu.stats();
    assert!(up.too_big > 0, "the client never probed above 1472 bytes");
    emu.close();
    server.close();
}

/// CPU time of this process so far (s), from /proc/self/stat (utime + stime, 100 ticks/s).
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Loopback figures of the Rust core alone (no Python), to separate the transport's own cost from the bindings':
/// `cargo test --release -p aiflow-net --lib loopback_figures -- --ignored --nocapture` (`CONGESTION=cubic` to
/// try another controller). Prints 64 MiB throughput with the CPU time it took, the 4 KiB echo round trip, and
/// the path (MTU found, window). Not a pass/fail test.
#[test]
#[ignore]
fn loopback_figures() {
    let handler: Handler = Arc::new(|m: Message, _p: PeerInfo| {
        let frames = if m.header.kind == "echo" { m.frames } else { vec![] };
        Ok(Message::new(m.header.kind, "", frames))
    });
    let mut limits = Limits::default();
    if let Ok(name) = std::env::var("CONGESTION") {
        limits.congestion = Congestion::parse(&name).unwrap();
    }
    let (server, client, _) = pair(limits, handler);
    let big = Bytes::from(vec![7u8; 64 << 20]);
    let small = Bytes::from(vec![7u8; 4096]);
    client.request_blocking(Message::new("ack", "", vec![big.clone()]), T).unwrap();
    for round in 0..3 {
        let (t0, cpu0, n) = (std::time::Instant::now(), cpu_s(), 6);
        for _ in 0..n {
            client.request_blocking(Message::new("ack", "", vec![big.clone()]), T).unwrap();
        }
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_s() - cpu0);
        let mut rtt: Vec<f64> = (0..2000)
            .map(|_| {
                let t0 = std::time::Instant::now();
                client.request_blocking(Message::new("echo", "", vec![small.clone()]), T).unwrap();
                t0.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        rtt.sort_by(|a, b| a.total_cmp(b));
        println!(
            "round {round}: 64 MiB {:.3} GB/s ({cpu:.2} s CPU for {n}); 4 KiB echo p50 {:.1} us p99 {:.1} us; {:?}",
            (n * big.len()) as f64 / wall / 1e9,
            rtt[rtt.len() / 2],
            rtt[rtt.len() * 99 / 100],
            client.path_info().unwrap()
        );
    }
    server.close();
}

