//! Turns in-kernel counters into per-link figures: a smoothed current rate, a windowed-max
//! delivery rate (the BBR-style estimate of the bottleneck: the best the link has recently
//! shown), a short history, and the RTT seen by the QUIC spin bit. Pure: fed snapshots with
//! their times, so it is unit-tested without a kernel.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

use crate::linkstats::Snapshot;

/// Window of the max filter (shared with the simulator).
pub const MAX_WINDOW_S: f64 = floodclone_sched::RATE_WINDOW_S;
/// Shortest interval a rate sample may cover; shorter ones are dominated by bursts.
pub const MIN_SAMPLE_S: f64 = 0.2;
/// Time constant of the smoothed rate.
pub const SMOOTH_TAU_S: f64 = 0.5;
/// Samples kept for display.
pub const HISTORY: usize = 24;

/// One direction of one (interface, peer) link.
#[derive(Clone, Debug, Default)]
pub struct DirectionMeter {
    pub bytes: u64,
    pub packets: u64,
    last_bytes: u64,
    last_at: Option<f64>,
    smoothed_bps: Option<f64>,
    samples: VecDeque<(f64, f64)>,
    pub history_bps: VecDeque<f64>,
}

impl DirectionMeter {
    fn update(&mut self, bytes: u64, packets: u64, at: f64) {
        self.bytes = bytes;
        self.packets = packets;
        let Some(last_at) = self.last_at else {
            self.last_at = Some(at);
            self.last_bytes = bytes;
            return;
        };
        let dt = at - last_at;
        if dt < MIN_SAMPLE_S {
            return;
        }
        // Fewer bytes than last time: the kernel's entry was evicted and started again at
        // zero, so everything it holds is new since then.
        let moved = if bytes >= self.last_bytes {
            bytes - self.last_bytes
        } else {
            bytes
        };
        let bps = moved as f64 * 8.0 / dt;
        let alpha = 1.0 - (-dt / SMOOTH_TAU_S).exp();
        self.smoothed_bps = Some(match self.smoothed_bps {
            Some(old) => old + alpha * (bps - old),
            None => bps,
        });
        self.samples.push_back((at, bps));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| at - t > MAX_WINDOW_S)
        {
            self.samples.pop_front();
        }
        self.history_bps.push_back(bps);
        if self.history_bps.len() > HISTORY {
            self.history_bps.pop_front();
        }
        self.last_at = Some(at);
        self.last_bytes = bytes;
    }

    /// Smoothed current rate, bits per second.
    pub fn rate_bps(&self) -> f64 {
        self.smoothed_bps.unwrap_or(0.0)
    }

    /// Highest rate over the last [`MAX_WINDOW_S`], bits per second.
    pub fn max_bps(&self) -> f64 {
        self.samples.iter().map(|s| s.1).fold(0.0, f64::max)
    }

    /// Latest sample, bits per second.
    pub fn last_bps(&self) -> f64 {
        self.samples.back().map_or(0.0, |s| s.1)
    }
}

/// Where an RTT figure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RttSource {
    /// Spin-bit edges seen in the kernel (an upper estimate under app-limited traffic).
    Spin,
    /// quinn's own estimate (`Connection::rtt()`), from the daemon's status file.
    Quic,
}

impl RttSource {
    /// Its name in a table column (and the JSON).
    pub fn short_name(self) -> &'static str {
        match self {
            RttSource::Spin => "spin",
            RttSource::Quic => "quic",
        }
    }
}

/// Least share of quinn's least RTT a kernel (spin-bit) figure may be: the kernel sees the
/// packets without the hosts' stack delays, so it may read somewhat lower, never a fraction.
/// A flow of random spin values (a peer that does not spin) sent as single packets, not
/// batches, can pass [`floodclone_common::SpinState::is_spinning`] and read a few ms on a
/// 40 ms path.
pub const MIN_SPIN_SHARE_OF_QUIC_RTT: f64 = 0.8;

#[derive(Clone, Debug, Default)]
pub struct LinkMeter {
    pub ifindex: u32,
    pub peer: Option<IpAddr>,
    pub tx: DirectionMeter,
    pub rx: DirectionMeter,
    /// Router hops to the peer, from the TTL of its packets (1 = on-link).
    pub hops: Option<u8>,
    /// Smoothed spin-bit RTT and the smallest edge interval seen, in seconds.
    pub spin_rtt_s: Option<f64>,
    pub spin_min_rtt_s: Option<f64>,
}

/// Meters for every link seen.
#[derive(Clone, Debug, Default)]
pub struct Meters {
    pub links: HashMap<(u32, Option<IpAddr>), LinkMeter>,
}

impl Meters {
    /// Feeds a snapshot taken `at` seconds on some monotonic clock.
    /// Links the kernel no longer holds (evicted, or no longer counted) are dropped, so the
    /// meters are bounded by its maps.
    pub fn update(&mut self, snap: &Snapshot, at: f64) {
        let held: std::collections::HashSet<_> =
            snap.peers.iter().map(|p| (p.ifindex, p.peer)).collect();
        self.links.retain(|key, _| held.contains(key));
        for p in &snap.peers {
            let m = self
                .links
                .entry((p.ifindex, p.peer))
                .or_insert_with(|| LinkMeter {
                    ifindex: p.ifindex,
                    peer: p.peer,
                    ..Default::default()
                });
            m.tx.update(p.egress.bytes, p.egress.packets, at);
            m.rx.update(p.ingress.bytes, p.ingress.packets, at);
            if p.ingress.packets > 0 {
                m.hops = Some(hops_from_ttl(p.ingress.ttl));
            }
        }
        for m in self.links.values_mut() {
            // The most recently spinning flow to this peer on this interface.
            let best = snap
                .spin
                .iter()
                .filter(|s| {
                    Some(s.peer()) == m.peer && s.key.ifindex == m.ifindex && s.state.is_spinning()
                })
                .max_by_key(|s| s.state.edge_ns);
            if let Some(s) = best {
                m.spin_rtt_s = Some(s.state.srtt_ns as f64 / 1e9);
                m.spin_min_rtt_s = Some(s.state.min_interval_ns as f64 / 1e9);
            }
        }
    }

    /// Links sorted by interface and peer.
    pub fn sorted(&self) -> Vec<&LinkMeter> {
        let mut v: Vec<_> = self.links.values().collect();
        v.sort_by_key(|m| (m.ifindex, m.peer));
        v
    }

    /// The least round trip to `peer` the kernel measured from spin-bit edges (over its
    /// interfaces and its connections' flows), once one of them spins.
    pub fn spin_min_rtt_to(&self, peer: IpAddr) -> Option<f64> {
        self.links
            .values()
            .filter(|m| m.peer == Some(peer))
            .filter_map(|m| m.spin_min_rtt_s)
            .min_by(f64::total_cmp)
    }

    /// Router hops to `peer` (the fewest over interfaces), once it has sent something.
    pub fn hops_to(&self, peer: IpAddr) -> Option<u8> {
        self.links
            .values()
            .filter(|m| m.peer == Some(peer))
            .filter_map(|m| m.hops)
            .min()
    }

    /// The interface `peer`'s packets arrive on: `expected` (our route's) if any arrive
    /// there or none have arrived yet, else the one most arrived on (routes can differ by
    /// direction).
    pub fn ingress_of(&self, peer: IpAddr, expected: Option<u32>) -> Option<u32> {
        let arrived = self
            .links
            .values()
            .filter(|m| m.peer == Some(peer) && m.rx.bytes > 0);
        if arrived.clone().any(|m| Some(m.ifindex) == expected) {
            return expected;
        }
        arrived
            .max_by_key(|m| m.rx.bytes)
            .map(|m| m.ifindex)
            .or(expected)
    }

    /// The receive rate from `peer` summed over interfaces: (smoothed, windowed max).
    pub fn rx_from(&self, peer: IpAddr) -> (f64, f64) {
        self.links
            .values()
            .filter(|m| m.peer == Some(peer))
            .fold((0.0, 0.0), |(r, x), m| {
                (r + m.rx.rate_bps(), x + m.rx.max_bps())
            })
    }
}

/// Hops a packet travelled, from its TTL: senders start at 64 (Linux, macOS), 128
/// (Windows) or 255; each router takes one. 1 means on-link.
pub fn hops_from_ttl(ttl: u8) -> u8 {
    let initial: u16 = if ttl <= 64 {
        64
    } else if ttl <= 128 {
        128
    } else {
        255
    };
    (initial - ttl as u16 + 1).min(255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_from_common_initial_ttls() {
        assert_eq!(hops_from_ttl(64), 1);
        assert_eq!(hops_from_ttl(62), 3);
        assert_eq!(hops_from_ttl(127), 2);
        assert_eq!(hops_from_ttl(255), 1);
    }

    #[test]
    fn a_counter_evicted_and_started_again_still_reads_its_rate() {
        let mut d = DirectionMeter::default();
        d.update(0, 0, 0.0);
        d.update(5_000_000, 0, 1.0); // 40 Mbit/s
        d.update(2_500_000, 0, 1.5); // evicted, then 2.5 MB in 0.5 s: 40 Mbit/s again
        assert!((d.last_bps() - 40e6).abs() < 1e3, "{}", d.last_bps());
    }

    #[test]
    fn links_the_kernel_no_longer_holds_are_dropped() {
        use crate::linkstats::PeerCounters;
        let peer = |last: u8| PeerCounters {
            ifindex: 2,
            peer: Some(IpAddr::from([10, 0, 0, last])),
            ..Default::default()
        };
        let snap = |peers| Snapshot {
            at: std::time::Instant::now(),
            peers,
            spin: Vec::new(),
        };
        let mut meters = Meters::default();
        meters.update(&snap(vec![peer(1), peer(2)]), 0.0);
        assert_eq!(meters.links.len(), 2);
        meters.update(&snap(vec![peer(2)]), 1.0);
        let left: Vec<_> = meters.links.keys().collect();
        assert_eq!(left, vec![&(2, Some(IpAddr::from([10, 0, 0, 2])))]);
    }

    #[test]
    fn windowed_max_follows_the_best_recent_rate_and_forgets_it() {
        let mut d = DirectionMeter::default();
        let mut bytes = 0u64;
        // 1 s at 40 Mbit/s, then 3 s at 10 Mbit/s, sampled every 100 ms (samples cover 200 ms).
        let mut t = 0.0;
        d.update(0, 0, t);
        for step in 1..=40 {
            t = step as f64 * 0.1;
            let mbit = if t <= 1.0 { 40.0 } else { 10.0 };
            bytes += (mbit * 1e6 / 8.0 * 0.1) as u64;
            d.update(bytes, 0, t);
            if (t - 1.0).abs() < 1e-9 {
                assert!((d.max_bps() - 40e6).abs() < 1e5, "{}", d.max_bps());
                assert!((d.rate_bps() - 40e6).abs() < 4e6);
            }
        }
        // More than the window after the drop, the max is the new rate.
        assert!((d.max_bps() - 10e6).abs() < 1e5, "{}", d.max_bps());
        assert!((d.rate_bps() - 10e6).abs() < 1e6, "{}", d.rate_bps());
        assert!(d.history_bps.len() <= HISTORY);
    }
}
