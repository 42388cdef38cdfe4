//! Progress for people: at a destination, bytes, rate, ETA and the neighbours feeding it;
//! at the source, a line per destination. Redrawn in place at a terminal, plain lines every
//! few seconds otherwise, `progress` events with `--json`. Formatting is pure (unit-tested);
//! [`crate::output::Output`] owns the terminal.

use std::collections::HashMap;

use floodclone_sched::MemberId;

use crate::events::{DestProgress, DestState, Feeder};

/// Lines stay within this width so an 80-column terminal never wraps them.
pub const WIDTH: usize = 80;

/// Bytes per second over the last window, smoothed so the ETA does not jump.
#[derive(Clone, Debug, Default)]
pub struct RateTracker {
    last: Option<(u64, f64)>,
    bps: Option<f64>,
}

impl RateTracker {
    /// `bytes` so far at time `t` (s); returns the smoothed rate in bit/s.
    pub fn update(&mut self, bytes: u64, t: f64) -> Option<f64> {
        if let Some((b0, t0)) = self.last {
            if t - t0 > 1e-3 {
                let sample = bytes.saturating_sub(b0) as f64 * 8.0 / (t - t0);
                self.bps = Some(match self.bps {
                    Some(old) => 0.5 * old + 0.5 * sample,
                    None => sample,
                });
            }
        }
        self.last = Some((bytes, t));
        self.bps
    }
}

/// Seconds left at `bps`, if it is moving at all.
pub fn eta_s(remaining_bytes: u64, bps: Option<f64>) -> Option<f64> {
    match bps {
        _ if remaining_bytes == 0 => Some(0.0),
        Some(r) if r > 1.0 => Some(remaining_bytes as f64 * 8.0 / r),
        _ => None,
    }
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

pub fn mbit(bps: Option<f64>) -> String {
    bps.map_or("-".into(), |b| format!("{:.1}", b / 1e6))
}

pub fn duration(s: Option<f64>) -> String {
    match s {
        None => "?".into(),
        Some(s) if s < 60.0 => format!("{s:.0}s"),
        Some(s) if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, s as u64 % 60),
        Some(s) => format!("{}h{:02}m", (s / 3600.0) as u64, (s as u64 % 3600) / 60),
    }
}

/// `[#####.....]` of `width` cells for `frac` (0..=1).
pub fn bar(frac: f64, width: usize) -> String {
    let filled = ((frac.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

fn fit(mut s: String) -> String {
    if s.chars().count() > WIDTH {
        s = s.chars().take(WIDTH - 1).collect();
        s.push('~');
    }
    s
}

/// A destination's progress: one line for the file, one for who feeds it (each named by
/// `name`, an address: member ids are internal).
pub fn dest_lines(
    done: u64,
    total: u64,
    bps: Option<f64>,
    feeders: &[Feeder],
    name: impl Fn(MemberId) -> String,
) -> Vec<String> {
    let frac = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let head = format!(
        "{} {:>3.0}%  {}/{} MiB  {} Mbit/s  ETA {}",
        bar(frac, 20),
        frac * 100.0,
        mib(done),
        mib(total),
        mbit(bps),
        duration(eta_s(total.saturating_sub(done), bps)),
    );
    let mut from: Vec<&Feeder> = feeders.iter().filter(|f| f.rate_bps > 0.0).collect();
    from.sort_by(|a, b| b.rate_bps.total_cmp(&a.rate_bps));
    let feeding = if from.is_empty() {
        "  from: (waiting)".to_string()
    } else {
        let parts: Vec<String> = from
            .iter()
            .map(|f| format!("{} {}", name(f.member), mbit(Some(f.rate_bps))))
            .collect();
        format!("  from (Mbit/s): {}", parts.join(", "))
    };
    vec![fit(head), fit(feeding)]
}

/// The source's view: a header and a line per destination.
pub fn source_lines(total: u64, elapsed_s: f64, dests: &[DestProgress]) -> Vec<String> {
    let done = dests.iter().filter(|d| d.state == DestState::Done).count();
    let mut out = vec![fit(format!(
        "serving {} MiB to {} destinations: {done} done, {:.1}s elapsed",
        mib(total),
        dests.len(),
        elapsed_s
    ))];
    for d in dests {
        let frac = if total == 0 {
            1.0
        } else {
            d.bytes as f64 / total as f64
        };
        out.push(fit(format!(
            "  {:<15} {} {:>3.0}%  {:>7} Mbit/s  {}",
            d.addr,
            bar(frac, 16),
            frac * 100.0,
            mbit(d.rate_bps),
            d.state.as_str()
        )));
    }
    out
}

/// Bytes received per neighbour since the last call, turned into rates.
#[derive(Clone, Debug, Default)]
pub struct FeederRates {
    bytes: HashMap<MemberId, u64>,
    since: f64,
}

impl FeederRates {
    pub fn received(&mut self, peer: MemberId, bytes: u64) {
        *self.bytes.entry(peer).or_default() += bytes;
    }

    /// Rates in bit/s over the window ending at `now`; starts a new window.
    pub fn take(&mut self, now: f64) -> Vec<Feeder> {
        let dt = (now - self.since).max(1e-3);
        self.since = now;
        let mut out: Vec<Feeder> = self
            .bytes
            .drain()
            .map(|(member, b)| Feeder {
                member,
                rate_bps: b as f64 * 8.0 / dt,
            })
            .collect();
        out.sort_by_key(|f| f.member);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_fit_eighty_columns() {
        let feeders: Vec<Feeder> = (0..40)
            .map(|member| Feeder {
                member,
                rate_bps: 12.3e6,
            })
            .collect();
        let d = dest_lines(33 << 20, 64 << 20, Some(31.4e6), &feeders, |m| {
            format!("10.100.0.{m}")
        });
        assert!(d.iter().all(|l| l.chars().count() <= WIDTH), "{d:?}");
        assert!(
            d[0].contains("52%") && d[0].contains("31.4 Mbit/s"),
            "{}",
            d[0]
        );
        let dests: Vec<DestProgress> = (1..4)
            .map(|m| DestProgress {
                member: m,
                addr: "10.100.100.100".into(),
                bytes: 1 << 30,
                rate_bps: Some(1e9),
                state: DestState::Receiving,
            })
            .collect();
        let s = source_lines(2 << 30, 12.0, &dests);
        assert_eq!(s.len(), 4);
        assert!(s.iter().all(|l| l.chars().count() <= WIDTH), "{s:?}");
    }

    #[test]
    fn eta_follows_the_rate() {
        let mut r = RateTracker::default();
        assert_eq!(r.update(0, 0.0), None);
        let bps = r.update(1_000_000, 1.0).unwrap();
        assert!((bps - 8e6).abs() < 1.0);
        assert_eq!(eta_s(1_000_000, Some(bps)).map(|s| s.round()), Some(1.0));
        assert_eq!(eta_s(5, None), None);
        assert_eq!(eta_s(0, None), Some(0.0));
        assert_eq!(duration(Some(125.0)), "2m05s");
        assert_eq!(bar(0.5, 4), "[##..]");
    }
}
