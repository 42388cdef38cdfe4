//! `--max-rate`: a cap on the chunk bytes a node uploads, over all its connections.
//!
//! Operators of shared networks ask P2P distribution tools for one: the node then leaves the
//! rest of its uplink to other traffic. Chunks enter quinn's send buffers only as fast as
//! the cap allows (a GCRA token bucket), so what leaves the host is the cap plus QUIC and
//! IP headers (~4%), however many peers ask. Peers measure the node as that fast and
//! fetch the rest elsewhere; nothing else in the protocol needs to know.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Shared by all connections of a node.
#[derive(Debug)]
pub struct UploadCap {
    bytes_per_s: f64,
    /// How far ahead of the long-run rate a burst may go: unused allowance older than this
    /// is lost, so an idle node does not then send a long burst at link speed.
    burst: Duration,
    /// The theoretical time the last admitted byte was due (GCRA's TAT).
    due: Mutex<Option<Instant>>,
}

impl UploadCap {
    /// A cap of `mbit` Mbit/s of chunk data.
    pub fn new(mbit: f64) -> Self {
        let bytes_per_s = mbit * 1e6 / 8.0;
        Self {
            bytes_per_s,
            // Two 64 KiB chunks or 20 ms at the rate, whichever is more.
            burst: Duration::from_secs_f64((2.0 * 65_536.0 / bytes_per_s).max(0.02)),
            due: Mutex::new(None),
        }
    }

    /// Reserves `bytes` and returns how long to wait before sending them.
    pub fn reserve(&self, bytes: usize, now: Instant) -> Duration {
        let mut due = self.due.lock().unwrap();
        let tat = due.map_or(now, |d| d.max(now));
        *due = Some(tat + Duration::from_secs_f64(bytes as f64 / self.bytes_per_s));
        tat.saturating_duration_since(now + self.burst)
    }

    /// Waits until `bytes` may be sent.
    pub async fn admit(&self, bytes: usize) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Parses `--max-rate`: Mbit/s, optionally written with a unit (`500k`, `20M`, `1.5G`,
/// `20mbit`).
pub fn parse_mbit(s: &str) -> Result<f64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("bit").unwrap_or(&t);
    let (num, scale) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1e-3),
        Some('m') => (&t[..t.len() - 1], 1.0),
        Some('g') => (&t[..t.len() - 1], 1e3),
        _ => (t, 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v * scale >= 0.01 => Ok(v * scale),
        _ => Err(format!(
            "'{s}' is not a rate: write Mbit/s (e.g. 20, 20M, 500k, 1.5G), at least 10k"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_run_rate_is_the_cap_after_one_burst() {
        let cap = UploadCap::new(8.0); // 1 MB/s
        let t0 = Instant::now();
        // 100 chunks of 64 KiB asked for at once: the k-th may go at about k x 65.5 ms,
        // minus the burst (131 ms).
        let waits: Vec<f64> = (0..100)
            .map(|_| cap.reserve(65_536, t0).as_secs_f64())
            .collect();
        assert_eq!(waits[0], 0.0);
        assert_eq!(waits[1], 0.0);
        assert_eq!(waits[2], 0.0);
        let last = waits[99];
        let expected = 99.0 * 0.065536 - 0.131072;
        assert!((last - expected).abs() < 1e-6, "{last} vs {expected}");
        // Idle for a while: the allowance saved is one burst, not the whole idle time.
        let later = t0 + Duration::from_secs(60);
        let waits: Vec<f64> = (0..4)
            .map(|_| cap.reserve(65_536, later).as_secs_f64())
            .collect();
        assert_eq!(&waits[..3], &[0.0, 0.0, 0.0]);
        assert!(waits[3] > 0.0);
    }

    #[test]
    fn rates_parse_with_or_without_a_unit() {
        assert_eq!(parse_mbit("20"), Ok(20.0));
        assert_eq!(parse_mbit("20M"), Ok(20.0));
        assert_eq!(parse_mbit("20mbit"), Ok(20.0));
        assert_eq!(parse_mbit("500k"), Ok(0.5));
        assert_eq!(parse_mbit("1.5G"), Ok(1500.0));
        assert!(parse_mbit("fast").is_err());
        assert!(parse_mbit("0").is_err());
        assert!(parse_mbit("-5").is_err());
    }
}
