//! Reno that tells random loss from congestion: the default congestion controller.
//!
//! A loss-based controller cuts its window on every loss. On a long path with random loss
//! (0.5% on a 40 Mbit/s, 80 ms path: a loss every ~200 packets, while the window needs 270)
//! additive increase never wins back what the cuts take: measured, quinn's Reno-85 took
//! 6.4 x the floor there. Like TCP Veno, this controller looks at the queue its own window
//! builds when a loss comes: `window x (srtt_recent - srtt_base) / srtt` is what it has
//! queued in the network, where `srtt_recent` is the least smoothed RTT of the last few
//! round trips and `srtt_base` the least of the connection (smoothed values on both sides,
//! so jitter, which spreads single samples, does not pass for a queue). A loss while that
//! is under [`RANDOM_LOSS_BACKLOG`] packets came with no
//! queue to overflow, so it is taken as random and the window is left alone; with a queue
//! behind it, it is congestion and the window is cut to [`LOSS_REDUCTION`] as before (and
//! only such a loss ends slow start). While it holds no queue, the window grows by an
//! eighth per round trip instead of one packet: a cut is won back in a few round trips,
//! not seconds, on a long path. A
//! path that loses more than [`MAX_RANDOM_LOSS`] of its packets is treated as congested
//! whatever the delay says (a policer drops without queueing).
//!
//! When the RTT grows for other reasons (the reverse direction's queue delays our
//! acknowledgements, as on every link used both ways), losses count as congestion: the
//! controller then does what Reno-85 did, never less.

use std::{any::Any, sync::Arc, time::Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

use crate::transport::LOSS_REDUCTION;

/// Packets of our own queued in the network below which a loss is taken as random
/// (TCP Veno's beta).
pub const RANDOM_LOSS_BACKLOG: f64 = 3.0;
/// Lost share of the packets over the last few round trips above which every loss counts
/// as congestion (BBRv2 leaves a path alone at 2% too).
pub const MAX_RANDOM_LOSS: f64 = 0.02;
/// Initial window, as quinn's default (RFC 9002: min(10 x MTU, max(2 x MTU, 14720))).
pub const INITIAL_WINDOW: u64 = 14_720;

#[derive(Debug, Clone)]
pub struct VenoConfig {
    pub initial_window: u64,
}

impl Default for VenoConfig {
    fn default() -> Self {
        Self {
            initial_window: INITIAL_WINDOW,
        }
    }
}

impl ControllerFactory for VenoConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Veno::new(now, current_mtu, self.initial_window))
    }
}

#[derive(Debug, Clone)]
struct Veno {
    mtu: u64,
    initial_window: u64,
    window: u64,
    ssthresh: u64,
    recovery_start: Instant,
    bytes_acked: u64,
    srtt_s: f64,
    /// Least smoothed RTT of the connection, and of the previous and current period.
    srtt_base_s: f64,
    srtt_recent_s: [f64; 2],
    /// Bytes acknowledged and lost in the current and the previous period (a few RTTs).
    acked: [u64; 2],
    lost: [u64; 2],
    period_start: Instant,
}

impl Veno {
    fn new(now: Instant, mtu: u16, initial_window: u64) -> Self {
        Self {
            mtu: mtu as u64,
            initial_window,
            window: initial_window,
            ssthresh: u64::MAX,
            recovery_start: now,
            bytes_acked: 0,
            srtt_s: 0.0,
            srtt_base_s: f64::INFINITY,
            srtt_recent_s: [f64::INFINITY; 2],
            acked: [0; 2],
            lost: [0; 2],
            period_start: now,
        }
    }

    fn minimum_window(&self) -> u64 {
        2 * self.mtu
    }

    /// Starts a new counting period every four round trips (at least 200 ms).
    fn roll_period(&mut self, now: Instant) {
        let period = (4.0 * self.srtt_s).max(0.2);
        if now.duration_since(self.period_start).as_secs_f64() >= period {
            self.acked = [self.acked[1], 0];
            self.lost = [self.lost[1], 0];
            self.srtt_recent_s = [self.srtt_recent_s[1], f64::INFINITY];
            self.period_start = now;
        }
    }

    /// Packets of ours waiting in queues when the smoothed RTT reads `rtt_s`: the window's
    /// share of that RTT above the connection's least.
    fn packets_queued_at(&self, rtt_s: f64) -> f64 {
        if self.srtt_s <= 0.0 || !rtt_s.is_finite() || !self.srtt_base_s.is_finite() {
            return f64::INFINITY;
        }
        let queued_share = ((rtt_s - self.srtt_base_s) / self.srtt_s).max(0.0);
        self.window as f64 / self.mtu as f64 * queued_share
    }

    /// The standing queue over the last round trips (what a loss is judged by).
    fn backlog_packets(&self) -> f64 {
        self.packets_queued_at(self.srtt_recent_s[0].min(self.srtt_recent_s[1]))
    }

    /// The queue now (what growth is judged by).
    fn queued_now_packets(&self) -> f64 {
        self.packets_queued_at(self.srtt_s)
    }

    fn recent_loss(&self) -> f64 {
        let lost = (self.lost[0] + self.lost[1]) as f64;
        let total = lost + (self.acked[0] + self.acked[1]) as f64;
        if total == 0.0 {
            0.0
        } else {
            lost / total
        }
    }
}

impl Controller for Veno {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.acked_with_srtt(now, sent, bytes, app_limited, rtt.get().as_secs_f64());
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.lost_bytes(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu as u64;
        self.window = self.window.max(self.minimum_window());
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.window;
        m.ssthresh = Some(self.ssthresh);
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

impl Veno {
    /// `bytes` sent at `sent` were acknowledged; the smoothed RTT is now `srtt_s`.
    fn acked_with_srtt(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        srtt_s: f64,
    ) {
        self.srtt_s = srtt_s;
        self.roll_period(now);
        self.srtt_base_s = self.srtt_base_s.min(self.srtt_s);
        self.srtt_recent_s[1] = self.srtt_recent_s[1].min(self.srtt_s);
        self.acked[1] += bytes;
        if app_limited || sent <= self.recovery_start {
            return;
        }
        if self.window < self.ssthresh {
            self.window += bytes;
            if self.window >= self.ssthresh {
                self.bytes_acked = self.window - self.ssthresh;
            }
        } else {
            // Per window acknowledged (a round trip, RFC 3465 byte counting): one MTU, as
            // Reno, or an eighth of the window while we hold no queue (the window is below
            // the path's bandwidth-delay product: one MTU per round trip would take
            // seconds to win back a cut on a long path).
            self.bytes_acked += bytes;
            if self.bytes_acked >= self.window {
                self.bytes_acked -= self.window;
                let step = if self.queued_now_packets() < RANDOM_LOSS_BACKLOG {
                    (self.window / 8).max(self.mtu)
                } else {
                    self.mtu
                };
                self.window += step;
            }
        }
    }

    /// `lost_bytes` of packets sent at `sent` were declared lost.
    fn lost_bytes(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.roll_period(now);
        self.lost[1] += lost_bytes;
        if is_persistent_congestion {
            self.recovery_start = now;
            self.window = self.minimum_window();
            self.ssthresh = self.window;
            return;
        }
        if sent <= self.recovery_start {
            return;
        }
        let random =
            self.backlog_packets() < RANDOM_LOSS_BACKLOG && self.recent_loss() < MAX_RANDOM_LOSS;
        tracing::trace!(target: "floodclone::cc", random, backlog = self.backlog_packets(),
            recent_loss = self.recent_loss(), window = self.window / self.mtu,
            srtt_ms = self.srtt_s * 1e3, base_ms = self.srtt_base_s * 1e3, "loss");
        if random {
            // No queue of ours to overflow: not congestion, and not the end of slow start
            // either (that comes with the first loss that has a queue behind it).
            return;
        }
        self.recovery_start = now;
        let cut = (self.window as f64 * LOSS_REDUCTION as f64) as u64;
        self.window = cut.max(self.minimum_window());
        self.ssthresh = self.window;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MTU: u64 = 1452;

    /// A controller in congestion avoidance at `window` bytes on a path of `base_s` RTT,
    /// having seen acks for a while at that RTT.
    fn settled(window: u64, base_s: f64) -> (Veno, Instant) {
        let start = Instant::now();
        let mut v = Veno::new(start, MTU as u16, INITIAL_WINDOW);
        v.window = window;
        v.ssthresh = window;
        let mut now = start;
        for _ in 0..200 {
            now += Duration::from_millis(10);
            v.acked_with_srtt(now, now, MTU, true, base_s);
        }
        (v, now)
    }

    #[test]
    fn a_loss_with_no_queue_behind_it_leaves_the_window_alone() {
        let (mut v, now) = settled(400 * MTU, 0.120);
        v.lost_bytes(now, now, false, MTU);
        assert_eq!(v.window, 400 * MTU);
    }

    #[test]
    fn a_loss_with_a_queue_behind_it_cuts_the_window() {
        let (mut v, mut now) = settled(400 * MTU, 0.120);
        // 25 ms of our own packets queued, for several round trips.
        for _ in 0..200 {
            now += Duration::from_millis(10);
            v.acked_with_srtt(now, now, MTU, true, 0.145);
        }
        v.lost_bytes(now, now, false, MTU);
        assert_eq!(
            v.window,
            (400.0 * MTU as f64 * LOSS_REDUCTION as f64) as u64
        );
    }

    #[test]
    fn slow_start_goes_on_through_random_loss_and_much_loss_counts_as_congestion() {
        let start = Instant::now();
        let mut v = Veno::new(start, MTU as u16, INITIAL_WINDOW);
        let mut now = start;
        for _ in 0..200 {
            now += Duration::from_millis(1);
            v.acked_with_srtt(now, now, MTU, false, 0.100);
        }
        v.lost_bytes(now, now, false, MTU);
        assert_eq!(v.ssthresh, u64::MAX, "still in slow start");
        // 10% of what is sent lost: congestion, whatever the delay says.
        let w = v.window;
        v.lost_bytes(now, now, false, 3 * w);
        assert!(v.window < w && v.ssthresh == v.window, "{} {}", v.window, w);
    }

    #[test]
    fn with_no_queue_the_window_grows_an_eighth_per_round_trip() {
        let (mut v, mut now) = settled(400 * MTU, 0.120);
        let w = v.window;
        let mut acked = 0;
        while acked < w {
            now += Duration::from_millis(1);
            v.acked_with_srtt(now, now, MTU, false, 0.120);
            acked += MTU;
        }
        assert_eq!(v.window, w + w / 8);
    }
}
