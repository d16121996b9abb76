//! The link model, I/O-free: what happens to one datagram offered to one direction of a link at a given time.
//!
//! Per direction, like mahimahi's or ns-3's point-to-point links:
//! - random loss (each datagram independently, `loss_pct`);
//! - a drop-tail queue holding at most `queue_ms` worth of bytes at the link rate;
//! - a rate limit: datagrams leave the queue back to back at `rate_mbps` (a token bucket whose burst is one
//!   datagram), each counted with its IP + UDP header overhead;
//! - a one-way propagation delay plus normally distributed jitter (`jitter_ms` is its standard deviation).
//!   Delivery stays in order (no reordering): a datagram is never delivered before the one ahead of it, which
//!   biases the delay slightly upwards under jitter.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Bytes of IPv4 + UDP header a datagram carries on the wire besides its payload.
pub const WIRE_OVERHEAD_BYTES: usize = 28;

/// One direction of a link. Rates in Mbit/s (10^6 bit/s), times in ms, loss in percent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Direction {
    pub rate_mbps: f64,
    pub delay_ms: f64,
    pub jitter_ms: f64,
    pub loss_pct: f64,
    pub queue_ms: f64,
}

impl Direction {
    pub fn validate(&self, name: &str) -> crate::Result<()> {
        let ok = self.rate_mbps > 0.0
            && self.rate_mbps.is_finite()
            && self.delay_ms >= 0.0
            && self.delay_ms.is_finite()
            && self.jitter_ms >= 0.0
            && self.jitter_ms.is_finite()
            && (0.0..100.0).contains(&self.loss_pct)
            && self.queue_ms > 0.0
            && self.queue_ms.is_finite();
        if ok {
            Ok(())
        } else {
            Err(crate::Error::Input(format!("{name}: invalid link direction {self:?} (rate > 0, delay/jitter >= 0, 0 <= loss < 100, queue > 0)")))
        }
    }

    fn bytes_per_s(&self) -> f64 {
        self.rate_mbps * 1e6 / 8.0
    }

    /// Queue capacity in bytes: `queue_ms` at the link rate, at least one full-size datagram.
    pub fn queue_bytes(&self, max_datagram_bytes: usize) -> f64 {
        (self.queue_ms / 1e3 * self.bytes_per_s()).max((max_datagram_bytes + WIRE_OVERHEAD_BYTES) as f64)
    }
}

/// What the link does with one datagram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Delivered at this time (seconds, on the caller's clock).
    Deliver(f64),
    /// Lost at random.
    Lost,
    /// The queue was full.
    QueueFull,
    /// Larger than the link's largest datagram (MTU).
    TooBig,
}

/// One direction's state.
pub struct Pipe {
    dir: Direction,
    max_datagram_bytes: usize,
    queue_bytes: f64,
    /// When the transmitter is free again (s).
    busy_until: f64,
    /// Delivery time of the last datagram (s), to keep order.
    last_delivery: f64,
    rng: StdRng,
}

impl Pipe {
    pub fn new(dir: Direction, max_datagram_bytes: usize, seed: u64) -> Pipe {
        Pipe {
            dir,
            max_datagram_bytes,
            queue_bytes: dir.queue_bytes(max_datagram_bytes),
            busy_until: 0.0,
            last_delivery: 0.0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Offers a datagram of `len` payload bytes at time `now` (s, non-decreasing between calls).
    pub fn offer(&mut self, now: f64, len: usize) -> Verdict {
        if len > self.max_datagram_bytes {
            return Verdict::TooBig;
        }
        if self.dir.loss_pct > 0.0 && self.rng.gen::<f64>() * 100.0 < self.dir.loss_pct {
            return Verdict::Lost;
        }
        let wire = (len + WIRE_OVERHEAD_BYTES) as f64;
        let start = self.busy_until.max(now);
        let backlog_bytes = (start - now) * self.dir.bytes_per_s();
        // The tolerance keeps float rounding from refusing a datagram that exactly fills the queue.
        if backlog_bytes + wire > self.queue_bytes + 1e-6 {
            return Verdict::QueueFull;
        }
        self.busy_until = start + wire / self.dir.bytes_per_s();
        let mut delay = self.dir.delay_ms / 1e3;
        if self.dir.jitter_ms > 0.0 {
            delay = (delay + self.normal() * self.dir.jitter_ms / 1e3).max(0.0);
        }
        let at = (self.busy_until + delay).max(self.last_delivery);
        self.last_delivery = at;
        Verdict::Deliver(at)
    }

    /// A standard normal sample (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1: f64 = self.rng.gen::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = self.rng.gen();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(rate_mbps: f64, delay_ms: f64) -> Direction {
        Direction { rate_mbps, delay_ms, jitter_ms: 0.0, loss_pct: 0.0, queue_ms: 1000.0 }
    }

    #[test]
    fn rate_and_delay() {
        // 1000 datagrams of 972 B (1000 B on the wire) at 8 Mbit/s = 1 MB/s take 1 s, then 20 ms of delay.
        let mut p = Pipe::new(dir(8.0, 20.0), 1472, 1);
        let mut last = 0.0;
        for _ in 0..1000 {
            match p.offer(0.0, 972) {
                Verdict::Deliver(t) => last = t,
                v => panic!("{v:?}"),
            }
        }
        assert!((last - 1.020).abs() < 1e-9, "{last}");
        // An idle link delivers after serialisation + delay only.
        match p.offer(10.0, 972) {
            Verdict::Deliver(t) => assert!((t - (10.0 + 0.001 + 0.020)).abs() < 1e-9),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn drop_tail_and_mtu() {
        // 10 ms of queue at 8 Mbit/s = 10 kB = 10 datagrams of 1000 wire bytes.
        let mut p = Pipe::new(Direction { queue_ms: 10.0, ..dir(8.0, 0.0) }, 1472, 1);
        let verdicts: Vec<_> = (0..20).map(|_| p.offer(0.0, 972)).collect();
        assert_eq!(verdicts.iter().filter(|v| matches!(v, Verdict::Deliver(_))).count(), 10);
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::QueueFull).count(), 10);
        assert_eq!(p.offer(100.0, 1473), Verdict::TooBig);
    }

    #[test]
    fn loss_rate_and_order_under_jitter() {
        let mut p = Pipe::new(Direction { loss_pct: 10.0, jitter_ms: 5.0, ..dir(1000.0, 20.0) }, 1472, 7);
        let (mut delivered, mut last) = (0, 0.0);
        for i in 0..20_000 {
            if let Verdict::Deliver(t) = p.offer(i as f64 * 1e-3, 100) {
                assert!(t >= last);
                last = t;
                delivered += 1;
            }
        }
        let loss = 1.0 - delivered as f64 / 20_000.0;
        assert!((loss - 0.10).abs() < 0.01, "{loss}");
    }
}
