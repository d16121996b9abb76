//! The in-flight budgets (per connection, per peer, per server) refuse the stream that would overrun them, with
//! an error naming the limit, while other streams and peers carry on.

mod common;

use std::time::Duration;

use aiflow_net::proto::message::Message;
use aiflow_net::transport::{Client, Identity, Limits, Server};
use aiflow_net::Error;
use bytes::Bytes;
use common::*;

/// Payload bytes of each stalled stream: it then holds between S and 2S (its buffer doubles as bytes arrive).
const S: u64 = 300 << 10;
const KIB: u64 = 1 << 10;

type Stream = (quinn::SendStream, quinn::RecvStream);

/// Stalls streams of S bytes, each on `next()`'s connection, until the server refuses one; returns how many it
/// held before, and the refusal.
fn stall_until_refused(server: &Server, mut next: impl FnMut() -> Client, held: &mut Vec<Stream>) -> (usize, Error) {
    for n in 0..8 {
        let before = server.stats();
        let stream = stall(&next(), S as usize);
        wait_until("the server to hold or refuse the stream", 30, || {
            let st = server.stats();
            st.limit_errors > before.limit_errors || st.inflight_bytes >= before.inflight_bytes + S
        });
        if server.stats().limit_errors > before.limit_errors {
            return (n, refusal(stream));
        }
        held.push(stream);
    }
    panic!("no refusal after 8 streams of {S} bytes")
}

#[test]
fn in_flight_budgets_refuse_the_stream_that_overruns_them_and_others_carry_on() {
    // One stream fits a connection (it holds at most 2S); three cannot (at least 3S). Two connections fit the
    // peer (at most 2S + 64 KiB + 2S); six streams cannot.
    let limits = Limits {
        max_inflight_bytes_per_connection: 2 * S + 64 * KIB,
        max_inflight_bytes_per_peer: 5 * S,
        max_inflight_bytes: 64 << 20,
        ..Limits::default()
    };
    let (greedy, other) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let (server, cfgs) = server_for(limits, &[greedy, other]);
    let mut held = Vec::new();
    let a = Client::new(cfgs[0].clone()).unwrap();
    let (n, e) = stall_until_refused(&server, || a.clone(), &mut held);
    assert!((1..=2).contains(&n), "{n} streams held");
    assert!(matches!(e, Error::LimitExceeded(ref m) if m.contains("max_inflight_bytes_per_connection")), "{e}");
    // More connections of the same peer, one stream each, until the peer's budget is spent.
    let (n, e) = stall_until_refused(&server, || Client::new(cfgs[0].clone()).unwrap(), &mut held);
    assert!((1..=5).contains(&n), "{n} streams held");
    assert!(matches!(e, Error::LimitExceeded(ref m) if m.contains("max_inflight_bytes_per_peer")), "{e}");
    // Another peer is served meanwhile.
    let c = Client::new(cfgs[1].clone()).unwrap();
    let payload = Bytes::from(vec![3u8; 600 << 10]);
    let r = c.request_blocking(Message::new("x", "{}", vec![payload.clone()]), Some(Duration::from_secs(10))).unwrap();
    assert_eq!(r.frames, vec![payload]);
    let peak = server.stats().inflight_bytes_peak;
    assert!(peak <= 5 * S + 2 * S, "peak {peak}");
    // Once the stalled streams are gone, their bytes are given back and the greedy peer is served again.
    drop(held);
    a.close();
    wait_until("the stalled streams' bytes to be released", 20, || server.stats().inflight_bytes == 0);
    let a2 = Client::new(cfgs[0].clone()).unwrap();
    assert!(a2.request_blocking(Message::new("x", "{}", vec![Bytes::from(vec![0u8; 1000])]), Some(Duration::from_secs(10))).is_ok());
    server.close();
}
