//! Issue 14's attack at a bounded scale, in its own process so that its memory figures are its own: one trusted
//! peer opens many connections of many streams, each declaring a ~1 GiB message and then stalling. The server's
//! memory must follow the bytes received (not the bytes declared), and another peer must still be served
//! promptly.

mod common;

use std::time::{Duration, Instant};

use aiflow_net::proto::message::Message;
use aiflow_net::transport::{runtime, Client, Identity, Limits};
use bytes::Bytes;
use common::*;

const CONNECTIONS: usize = 16;
const STREAMS: usize = 255;
/// Payload bytes each stalled stream actually sends.
const SENT: usize = 100;

#[test]
fn stalled_streams_declaring_1gib_cost_what_they_sent_and_others_are_served() {
    let (attacker, honest) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let (server, cfgs) = server_for(Limits::default(), &[attacker, honest]);
    let good = Client::new(cfgs[1].clone()).unwrap();
    let payload = Bytes::from(vec![5u8; 1 << 20]);
    let t = Instant::now();
    let r = good.request_blocking(Message::new("x", "{}", vec![payload.clone()]), Some(Duration::from_secs(10))).unwrap();
    let (quiet_ms, _) = (t.elapsed().as_secs_f64() * 1e3, r);
    let (rss0, maps0) = (status_kib("VmRSS:"), mappings());

    // The attack: CONNECTIONS x STREAMS streams, each declaring ~1 GiB, sending SENT bytes of it and stalling.
    let clients: Vec<Client> = (0..CONNECTIONS).map(|_| Client::new(cfgs[0].clone()).unwrap()).collect();
    let head = head_declaring(DECLARED);
    let streams = runtime::block_on(async move {
        let mut held = Vec::new();
        for c in &clients {
            for _ in 0..STREAMS {
                let (mut send, recv) = c.open_stream().await.unwrap();
                send.write_all(&head).await.unwrap();
                send.write_all(&[9u8; SENT]).await.unwrap();
                held.push((send, recv));
            }
        }
        (clients, held)
    })
    .unwrap();
    let total = (CONNECTIONS * STREAMS) as u64;
    wait_until("the server to receive every stalled stream", 20, || server.stats().inflight_bytes >= total * SENT as u64);

    // A well-behaved peer is still served, promptly.
    let t = Instant::now();
    let r = good.request_blocking(Message::new("x", "{}", vec![payload.clone()]), Some(Duration::from_secs(10))).unwrap();
    let attack_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(r.frames, vec![payload]);
    let st = server.stats();
    let (rss1, maps1) = (status_kib("VmRSS:"), mappings());
    let per_stream = st.inflight_bytes as f64 / total as f64;
    println!(
        "attack: {total} streams declaring {DECLARED} bytes each ({:.0} GiB declared), {SENT} bytes sent each; server holds {} bytes in flight \
         ({per_stream:.0} per stream, peak {}); process RSS +{} KiB, memory mappings +{}; 1 MiB echo by another peer: {attack_ms:.1} ms \
         during the attack, {quiet_ms:.1} ms before",
        (total * DECLARED) as f64 / (1u64 << 30) as f64,
        st.inflight_bytes,
        st.inflight_bytes_peak,
        rss1.saturating_sub(rss0),
        maps1 as i64 - maps0 as i64
    );
    // Memory follows the bytes received: a few KiB per stream (the first growth step), not the declared GiB.
    assert!(st.inflight_bytes <= total * 8192, "{} bytes in flight", st.inflight_bytes);
    assert!(rss1.saturating_sub(rss0) < 64 << 10, "RSS grew by {} KiB", rss1 - rss0);
    // Pre-sized buffers cost about two mappings per stream; growing ones come from the allocator's heaps.
    assert!(maps1 < maps0 + 1000, "{maps0} -> {maps1} memory mappings");
    assert!(attack_ms < 5000.0, "a well-behaved peer waited {attack_ms:.0} ms");
    assert_eq!(st.requests_ok, 2);

    // When the attacker goes away, its bytes are given back.
    let (clients, held) = streams;
    drop(held);
    for c in &clients {
        c.close();
    }
    wait_until("the attacker's bytes to be released", 20, || server.stats().inflight_bytes == 0);
    server.close();
}

