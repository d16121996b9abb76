//! The model of a delivery-rate congestion controller ("rate"), after BBR's model: the window is twice the
//! bandwidth-delay product measured on the path, so random loss does not shrink it.
//!
//! Why: a loss-based controller (CUBIC, NewReno) halves or cuts its window on every loss, so on a path with
//! random loss its average window is bounded near 1.2 / sqrt(p) packets (Mathis et al.): 39 packets, 56 KB,
//! at 0.1 % loss, where a 20 Mbit/s x 40 ms path needs 100 KB in flight. quinn 0.11 ships a BBR, but its
//! bandwidth estimate is the largest *instantaneous* rate between two consecutive sends or acks, which bursts
//! inflate many times over: through the link emulator it held a window of 1-8 MB and had the 100 ms queue drop
//! more datagrams than it delivered.
//!
//! The model, per path:
//! - **Delivery rate** (draft-cheng-iccrg-delivery-rate-estimation): each packet remembers how much had been
//!   delivered when it was sent; when it is acknowledged, (delivered now - delivered then) over the longer of
//!   the send and ack intervals is one sample. `bw` is the largest sample of the last [`BW_WINDOW_ROUNDS`] round
//!   trips; samples taken while the sender was application-limited only count when they raise it.
//! - **Window** = [`CWND_GAIN`] x `bw` x the smallest RTT seen, plus BBR's ack-aggregation allowance (how far
//!   bursts of acknowledgements ran ahead of `bw`, largest of the last [`BW_WINDOW_ROUNDS`] round trips; bursts
//!   are the norm on loopback, where a round trip is mostly processing), at least [`MIN_WINDOW_PACKETS`]
//!   packets. quinn paces at 1.25 window / smoothed RTT, so in steady state a path holds
//!   one BDP in flight plus one BDP queued.
//! - **Startup**: slow start (the window grows by what is acknowledged), but never above [`STARTUP_GAIN`] x the
//!   bandwidth-delay product measured so far (BBR's startup gain), so that it stops growing when the bottleneck
//!   is full instead of overshooting into its queue; it ends when `bw` has not grown by 25 % for three round
//!   trips, or a round trip loses heavily.
//! - **Loss**: isolated losses are retransmitted but do not change the window. A round trip that loses more than
//!   [`HEAVY_LOSS`] of its bytes, and at least two packets (a queue overflowing, a policer), caps the window at
//!   0.7 x what was in use; the cap then grows back one packet per round trip without heavy loss (as Reno
//!   would) and is lifted once above twice the model's window. Persistent congestion (RFC 9002) resets the
//!   model.
//!
//! The model is I/O-free ([`RateModel`]); `aiflow_net::transport::congestion::RateController` adapts it to
//! quinn's `Controller` trait.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Window over the bandwidth-delay product.
pub const CWND_GAIN: f64 = 2.0;
/// Largest window over the bandwidth-delay product during startup (2 / ln 2, as BBR).
pub const STARTUP_GAIN: f64 = 2.89;
/// Round trips over which the largest delivery-rate sample is kept.
pub const BW_WINDOW_ROUNDS: u64 = 10;
/// Share of a round trip's bytes whose loss counts as congestion rather than noise.
pub const HEAVY_LOSS: f64 = 0.02;
/// Smallest window, in full-size packets.
pub const MIN_WINDOW_PACKETS: u64 = 4;
/// Startup ends when the bandwidth has not grown by this factor ...
const STARTUP_GROWTH: f64 = 1.25;
/// ... for this many round trips.
const STARTUP_FLAT_ROUNDS: u32 = 3;
/// Multiplicative decrease of the loss cap.
const LOSS_BETA: f64 = 0.7;
/// Bound on remembered send times (one per transmission burst): far above any real window.
const MAX_SNAPSHOTS: usize = 1 << 16;

/// What the path had delivered when a burst of packets left (one entry per distinct send time).
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    sent: Instant,
    delivered: u64,
    delivered_time: Instant,
    first_sent_time: Instant,
}

/// The controller's state, I/O-free: fed with sends, acknowledgements, losses and the minimum RTT.
#[derive(Debug, Clone)]
pub struct RateModel {
    mtu: u64,
    initial_window: u64,
    window: u64,
    startup: bool,
    min_rtt: Duration,
    // Delivery-rate estimation.
    delivered: u64,
    delivered_time: Option<Instant>,
    first_sent_time: Option<Instant>,
    snapshots: VecDeque<Snapshot>,
    // Round trips: a round ends when a packet sent after it began is acknowledged.
    round: u64,
    next_round_delivered: u64,
    round_start_delivered: u64,
    round_lost: u64,
    round_app_limited: bool,
    /// (round, largest sample of that round), newest last.
    bw_samples: VecDeque<(u64, u64)>,
    full_bw: u64,
    flat_rounds: u32,
    /// Cap on the window after heavy loss (`u64::MAX`: none).
    loss_cap: u64,
    acked_in_batch: u64,
    batch_app_limited: bool,
    // Ack aggregation (BBR's extra_acked): acknowledgements that arrive in bursts, faster than `bw`, need window
    // beyond the BDP to keep the sender busy between the bursts.
    aggregation_start: Option<Instant>,
    aggregation_delivered: u64,
    /// (round, largest excess of that round), newest last.
    extra_acked: VecDeque<(u64, u64)>,
}

impl RateModel {
    /// A model for a path whose datagrams are `mtu` bytes, starting with `initial_window` bytes.
    pub fn new(initial_window: u64, mtu: u16) -> RateModel {
        RateModel {
            mtu: u64::from(mtu),
            initial_window,
            window: initial_window,
            startup: true,
            min_rtt: Duration::ZERO,
            delivered: 0,
            delivered_time: None,
            first_sent_time: None,
            snapshots: VecDeque::new(),
            round: 0,
            next_round_delivered: 0,
            round_start_delivered: 0,
            round_lost: 0,
            round_app_limited: false,
            bw_samples: VecDeque::new(),
            full_bw: 0,
            flat_rounds: 0,
            loss_cap: u64::MAX,
            acked_in_batch: 0,
            batch_app_limited: false,
            aggregation_start: None,
            aggregation_delivered: 0,
            extra_acked: VecDeque::new(),
        }
    }

    /// Bytes that may be in flight.
    pub fn window(&self) -> u64 {
        self.window.max(self.min_window())
    }

    /// The bandwidth estimate (bytes/s); 0 before the first sample.
    pub fn bandwidth(&self) -> u64 {
        self.bw_samples.iter().map(|&(_, b)| b).max().unwrap_or(0)
    }

    /// The window before the first measurement (bytes).
    pub fn initial_window(&self) -> u64 {
        self.initial_window
    }

    /// Whether the model is still in slow start.
    pub fn in_startup(&self) -> bool {
        self.startup
    }

    fn min_window(&self) -> u64 {
        MIN_WINDOW_PACKETS * self.mtu
    }

    /// `gain` x bandwidth x min RTT plus the recent ack aggregation (the initial window before any sample),
    /// capped after heavy loss.
    fn model_window(&self, gain: f64) -> u64 {
        let bdp = self.bandwidth() as f64 * self.min_rtt.as_secs_f64();
        let extra = self.extra_acked.iter().map(|&(_, e)| e).max().unwrap_or(0);
        let target = if bdp > 0.0 { (gain * bdp) as u64 + extra } else { self.initial_window };
        target.min(self.loss_cap).max(self.min_window())
    }

    /// BBR's ack-aggregation estimate: how far the bytes acknowledged since the current burst of acks began run
    /// ahead of what `bw` would have delivered in that time.
    fn update_aggregation(&mut self, now: Instant, acked: u64) {
        let bw = self.bandwidth();
        let start = *self.aggregation_start.get_or_insert(now);
        let mut expected = (bw as f64 * now.saturating_duration_since(start).as_secs_f64()) as u64;
        if self.aggregation_delivered <= expected {
            // Acks are arriving no faster than the bandwidth: a new aggregation epoch starts here.
            self.aggregation_start = Some(now);
            self.aggregation_delivered = 0;
            expected = 0;
        }
        self.aggregation_delivered += acked;
        let extra = (self.aggregation_delivered - expected.min(self.aggregation_delivered)).min(self.window);
        match self.extra_acked.back_mut() {
            Some((r, e)) if *r == self.round => *e = (*e).max(extra),
            _ => self.extra_acked.push_back((self.round, extra)),
        }
    }

    /// Packets left at `now`.
    pub fn on_sent(&mut self, now: Instant) {
        if self.snapshots.back().is_some_and(|s| s.sent == now) {
            return;
        }
        if self.snapshots.is_empty() {
            // Nothing in flight: the next sample measures from here, not from before the pause.
            self.delivered_time = Some(now);
            self.first_sent_time = Some(now);
        }
        let snap = Snapshot {
            sent: now,
            delivered: self.delivered,
            delivered_time: self.delivered_time.unwrap_or(now),
            first_sent_time: self.first_sent_time.unwrap_or(now),
        };
        if self.snapshots.len() >= MAX_SNAPSHOTS {
            self.snapshots.pop_front();
        }
        self.snapshots.push_back(snap);
    }

    /// `bytes` of a packet sent at `sent` were acknowledged at `now`; `min_rtt` is the path's smallest RTT.
    pub fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, min_rtt: Duration) {
        self.min_rtt = min_rtt;
        self.delivered += bytes;
        self.delivered_time = Some(now);
        self.acked_in_batch += bytes;
        self.batch_app_limited |= app_limited;
        self.round_app_limited |= app_limited;
        // Send times of packets acknowledged or lost before this one are done with.
        while self.snapshots.front().is_some_and(|s| s.sent < sent) {
            self.snapshots.pop_front();
        }
        let Some(snap) = self.snapshots.front().copied().filter(|s| s.sent == sent) else { return };
        if snap.delivered >= self.next_round_delivered {
            self.next_round_delivered = self.delivered;
            self.end_round();
        }
        self.first_sent_time = Some(sent);
        let send_elapsed = sent.saturating_duration_since(snap.first_sent_time);
        let ack_elapsed = now.saturating_duration_since(snap.delivered_time);
        let interval = send_elapsed.max(ack_elapsed);
        // A sample over less than the minimum RTT comes from a compressed burst of acks: not a path rate.
        if interval.is_zero() || interval < min_rtt {
            return;
        }
        let rate = ((self.delivered - snap.delivered) as f64 / interval.as_secs_f64()) as u64;
        if app_limited && rate <= self.bandwidth() {
            return;
        }
        match self.bw_samples.back_mut() {
            Some((r, b)) if *r == self.round => *b = (*b).max(rate),
            _ => self.bw_samples.push_back((self.round, rate)),
        }
    }

    /// The end of a batch of acknowledgements received at `now`: the window moves towards the model.
    pub fn on_end_acks(&mut self, now: Instant) {
        let acked = std::mem::take(&mut self.acked_in_batch);
        let app_limited = std::mem::take(&mut self.batch_app_limited);
        if acked > 0 {
            self.update_aggregation(now, acked);
        }
        if self.startup {
            // Slow start, but never past a loss cap, and not while the sender has too little to send to fill
            // the window it has (as CUBIC: a window that was never used says nothing about the path).
            if !app_limited {
                // Slow start doubles the window per round trip, and so does the model's target while the
                // bandwidth samples keep growing; once they stop (the bottleneck is full) the target stops too,
                // instead of the window overshooting into the bottleneck's queue for the rounds it takes to
                // notice.
                let cap = if self.bandwidth() > 0 { self.model_window(STARTUP_GAIN) } else { self.loss_cap };
                self.window = self.window.max((self.window + acked).min(cap));
            }
        } else {
            let target = self.model_window(CWND_GAIN);
            // Grow by what was acknowledged (no bursts), shrink at once.
            self.window = if self.window < target { (self.window + acked).min(target) } else { target };
        }
        self.window = self.window.max(self.min_window());
    }

    /// `lost_bytes` were declared lost; `persistent` is RFC 9002's persistent congestion.
    pub fn on_loss(&mut self, lost_bytes: u64, persistent: bool) {
        self.round_lost += lost_bytes;
        if persistent {
            // The path may have changed entirely: start over from the minimum.
            self.bw_samples.clear();
            self.extra_acked.clear();
            self.window = self.min_window();
            self.loss_cap = u64::MAX;
            self.startup = true;
            self.full_bw = 0;
            self.flat_rounds = 0;
        }
    }

    pub fn on_mtu_update(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu);
    }

    fn end_round(&mut self) {
        self.round += 1;
        let round_delivered = self.delivered - self.round_start_delivered;
        let heavy = self.round_lost >= 2 * self.mtu && self.round_lost as f64 > HEAVY_LOSS * (self.round_lost + round_delivered) as f64;
        if heavy {
            self.loss_cap = ((self.window as f64 * LOSS_BETA) as u64).max(self.min_window());
            self.window = self.window.min(self.loss_cap);
            self.startup = false;
        } else if self.loss_cap != u64::MAX {
            self.loss_cap = self.loss_cap.saturating_add(self.mtu);
            let model = (CWND_GAIN * self.bandwidth() as f64 * self.min_rtt.as_secs_f64()) as u64;
            if self.loss_cap > 2 * model.max(self.min_window()) {
                self.loss_cap = u64::MAX;
            }
        }
        if self.startup && !self.round_app_limited {
            let bw = self.bandwidth();
            if bw as f64 >= self.full_bw as f64 * STARTUP_GROWTH {
                self.full_bw = bw;
                self.flat_rounds = 0;
            } else {
                self.flat_rounds += 1;
                if self.flat_rounds >= STARTUP_FLAT_ROUNDS {
                    self.startup = false;
                }
            }
        }
        while self.bw_samples.front().is_some_and(|&(r, _)| r + BW_WINDOW_ROUNDS <= self.round) {
            self.bw_samples.pop_front();
        }
        while self.extra_acked.front().is_some_and(|&(r, _)| r + BW_WINDOW_ROUNDS <= self.round) {
            self.extra_acked.pop_front();
        }
        self.round_start_delivered = self.delivered;
        self.round_lost = 0;
        self.round_app_limited = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{Direction, Pipe, Verdict};

    const MTU: u64 = 1452;

    /// What a simulated transfer did.
    struct Outcome {
        /// Goodput over the second half of the run, as a share of the link rate (payload bytes / rate).
        steady_share: f64,
        /// Datagrams the bottleneck queue dropped in the second half.
        steady_queue_drops: u64,
        window: u64,
    }

    /// A bulk sender driven by `RateModel` through one direction of the emulator's link model, with acks
    /// coming back after a fixed delay. Sending is window-limited and paced at 1.25 x window / smoothed RTT, as
    /// quinn does; a packet counts as lost when three later ones are acknowledged.
    fn simulate(rate_mbps: f64, rtt_ms: f64, loss_pct: f64, queue_ms: f64, seconds: f64) -> Outcome {
        let dir = Direction { rate_mbps, delay_ms: rtt_ms / 2.0, jitter_ms: 0.0, loss_pct, queue_ms };
        let mut pipe = Pipe::new(dir, 1472, 7);
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut m = RateModel::new(14_720, MTU as u16);
        // In flight: (packet number, sent at, acked at or None when dropped).
        let mut flight: VecDeque<(u64, f64, Option<f64>)> = VecDeque::new();
        let (mut now, mut next_send, mut pn) = (0.0f64, 0.0f64, 0u64);
        let (mut srtt, mut min_rtt) = (rtt_ms / 1e3, f64::MAX);
        let (mut delivered_half, mut drops_half) = (0u64, 0u64);
        while now < seconds {
            // Acknowledgements due by now (in packet order), then losses: three later packets acknowledged.
            let mut acked_any = false;
            while let Some(&(_, sent, Some(ack))) = flight.front() {
                if ack > now {
                    break;
                }
                flight.pop_front();
                let rtt = ack - sent;
                min_rtt = min_rtt.min(rtt);
                srtt = 0.875 * srtt + 0.125 * rtt;
                m.on_ack(at(ack), at(sent), MTU, false, Duration::from_secs_f64(min_rtt));
                acked_any = true;
                if now >= seconds / 2.0 {
                    delivered_half += MTU;
                }
            }
            if acked_any {
                m.on_end_acks(at(now));
            }
            let mut lost = 0;
            while let Some(&(_, _, None)) = flight.front() {
                if flight.iter().filter(|p| p.2.is_some_and(|a| a <= now)).count() < 3 {
                    break;
                }
                flight.pop_front();
                lost += MTU;
            }
            if lost > 0 {
                m.on_loss(lost, false);
            }
            // Send while the window and the pacer allow.
            while now >= next_send && (flight.len() as u64 + 1) * MTU <= m.window() {
                let verdict = pipe.offer(now, MTU as usize);
                let ack = match verdict {
                    Verdict::Deliver(t) => Some(t + rtt_ms / 2e3),
                    Verdict::QueueFull => {
                        if now >= seconds / 2.0 {
                            drops_half += 1;
                        }
                        None
                    }
                    _ => None,
                };
                m.on_sent(at(now));
                flight.push_back((pn, now, ack));
                pn += 1;
                next_send = now + srtt * MTU as f64 / (1.25 * m.window() as f64);
            }
            // Next event: an acknowledgement or the pacer, at 10 us resolution.
            let next_ack = flight.iter().filter_map(|p| p.2).fold(f64::MAX, f64::min);
            now = (next_ack.min(next_send.max(now + 1e-5))).max(now + 1e-5);
        }
        let rate_bytes = rate_mbps * 1e6 / 8.0;
        // The link counts 28 bytes of IP+UDP per datagram; goodput is of the payload.
        Outcome {
            steady_share: delivered_half as f64 / (seconds / 2.0) / rate_bytes * (MTU + 28) as f64 / MTU as f64,
            steady_queue_drops: drops_half,
            window: m.window(),
        }
    }

    #[test]
    fn random_loss_does_not_shrink_the_window() {
        // Issue 3's link: 20 Mbit/s, 40 ms, 0.1 % loss, 100 ms queue. A loss-based controller averages about
        // 56 KB of window here (Mathis); the model holds two BDPs (200 KB) and keeps the link busy.
        let o = simulate(20.0, 40.0, 0.1, 100.0, 20.0);
        assert!(o.steady_share > 0.95, "link use {:.3}", o.steady_share);
        assert_eq!(o.steady_queue_drops, 0);
        let bdp = 20e6 / 8.0 * 0.040;
        assert!((o.window as f64) > 1.6 * bdp && (o.window as f64) < 2.4 * bdp, "window {}", o.window);
    }

    #[test]
    fn startup_does_not_overflow_a_deep_queue() {
        // Slow start stops at STARTUP_GAIN x BDP, within a queue of 2.5 BDP: no drops at all.
        let dir = simulate(50.0, 80.0, 0.0, 200.0, 10.0);
        assert!(dir.steady_share > 0.95, "{:.3}", dir.steady_share);
        assert_eq!(dir.steady_queue_drops, 0);
    }

    #[test]
    fn heavy_loss_caps_the_window_on_a_shallow_queue() {
        // A queue of a quarter BDP cannot hold the second BDP of the model's window: the overflow is heavy loss,
        // which caps the window near what the path holds; the link stays mostly busy and drops stay rare.
        let o = simulate(20.0, 40.0, 0.0, 10.0, 30.0);
        assert!(o.steady_share > 0.8, "{:.3}", o.steady_share);
        let sent_half = 20e6 / 8.0 * 15.0 / MTU as f64;
        assert!((o.steady_queue_drops as f64) < 0.02 * sent_half, "{} drops", o.steady_queue_drops);
    }

    #[test]
    fn persistent_congestion_resets_the_model() {
        let mut m = RateModel::new(14_720, MTU as u16);
        let t0 = Instant::now();
        // 40 packets, one per ms, each acknowledged 40 ms after it left.
        let sent = |i: u64| t0 + Duration::from_millis(i);
        for i in 0..40 {
            m.on_sent(sent(i));
        }
        for i in 0..40 {
            m.on_ack(sent(i) + Duration::from_millis(40), sent(i), MTU, false, Duration::from_millis(40));
            m.on_end_acks(sent(i) + Duration::from_millis(40));
        }
        assert!(m.bandwidth() > 0);
        m.on_loss(10 * MTU, true);
        assert_eq!((m.bandwidth(), m.window()), (0, MIN_WINDOW_PACKETS * MTU));
        assert!(m.in_startup());
    }
}
