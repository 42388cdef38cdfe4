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

use bytes::Bytes;

/// A chunk goes out under the cap in pieces of at most this many bytes, each at its time
/// ([`Slot::due`]): a chunk of 1 MiB (files of 1 GiB and more) handed to quinn whole would
/// leave at line rate, a burst of 1 MiB into whatever queue the cap was meant to spare.
/// 64 KiB: the chunk size the cap was first measured with, so files up to 64 MiB (one
/// piece a chunk) are paced as before.
pub const PIECE_BYTES: usize = 65_536;

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

/// A chunk's place in the cap's schedule (see [`UploadCap::reserve`]).
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// When its first byte may go (possibly already past).
    start: Instant,
    bytes_per_s: f64,
}

impl Slot {
    /// When the byte at `offset` into the chunk may go.
    pub fn due(&self, offset: usize) -> Instant {
        self.start + Duration::from_secs_f64(offset as f64 / self.bytes_per_s)
    }

    /// Waits until the byte at `offset` may go.
    pub async fn wait(&self, offset: usize) {
        tokio::time::sleep_until(self.due(offset).into()).await;
    }
}

impl UploadCap {
    /// A cap of `mbit` Mbit/s of chunk data.
    pub fn new(mbit: f64) -> Self {
        let bytes_per_s = mbit * 1e6 / 8.0;
        Self {
            bytes_per_s,
            // Two pieces or 20 ms at the rate, whichever is more.
            burst: Duration::from_secs_f64((2.0 * PIECE_BYTES as f64 / bytes_per_s).max(0.02)),
            due: Mutex::new(None),
        }
    }

    /// Reserves `bytes` (one chunk) in the schedule: its bytes may go at the cap's rate
    /// from the returned slot's start, which is up to one burst ahead of the long-run rate.
    pub fn reserve(&self, bytes: usize, now: Instant) -> Slot {
        let mut due = self.due.lock().unwrap();
        let tat = due.map_or(now, |d| d.max(now));
        *due = Some(tat + Duration::from_secs_f64(bytes as f64 / self.bytes_per_s));
        let start = tat.checked_sub(self.burst).map_or(now, |s| s.max(now));
        Slot {
            start,
            bytes_per_s: self.bytes_per_s,
        }
    }
}

/// `data` as pieces of at most [`PIECE_BYTES`], with their offsets (no copies).
pub fn pieces(data: &Bytes) -> impl Iterator<Item = (usize, Bytes)> + '_ {
    (0..data.len())
        .step_by(PIECE_BYTES)
        .map(|o| (o, data.slice(o..(o + PIECE_BYTES).min(data.len()))))
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

    /// Seconds from `t0` until the first byte of a chunk of `bytes` may go.
    fn wait_s(cap: &UploadCap, bytes: usize, t0: Instant) -> f64 {
        cap.reserve(bytes, t0)
            .due(0)
            .saturating_duration_since(t0)
            .as_secs_f64()
    }

    #[test]
    fn the_long_run_rate_is_the_cap_after_one_burst() {
        let cap = UploadCap::new(8.0); // 1 MB/s
        let t0 = Instant::now();
        // 100 chunks of 64 KiB asked for at once: the k-th may go at about k x 65.5 ms,
        // minus the burst (131 ms).
        let waits: Vec<f64> = (0..100).map(|_| wait_s(&cap, 65_536, t0)).collect();
        assert_eq!(waits[0], 0.0);
        assert_eq!(waits[1], 0.0);
        assert_eq!(waits[2], 0.0);
        let last = waits[99];
        let expected = 99.0 * 0.065536 - 0.131072;
        assert!((last - expected).abs() < 1e-6, "{last} vs {expected}");
        // Idle for a while: the allowance saved is one burst, not the whole idle time.
        let later = t0 + Duration::from_secs(60);
        let waits: Vec<f64> = (0..4).map(|_| wait_s(&cap, 65_536, later)).collect();
        assert_eq!(&waits[..3], &[0.0, 0.0, 0.0]);
        assert!(waits[3] > 0.0);
    }

    #[test]
    fn a_large_chunk_goes_in_pieces_at_the_rate() {
        let cap = UploadCap::new(8.0); // 1 MB/s
        let t0 = Instant::now();
        let chunk = Bytes::from(vec![7u8; 1 << 20]);
        let slot = cap.reserve(chunk.len(), t0);
        let cut: Vec<(usize, Bytes)> = pieces(&chunk).collect();
        assert_eq!(cut.len(), 16);
        assert!(cut.iter().all(|(_, p)| p.len() == PIECE_BYTES));
        assert_eq!(cut[15].0, 15 * PIECE_BYTES);
        // The first piece at once, the last 0.98 s later: 1 MiB over a second, not a burst.
        let last = slot
            .due(cut[15].0)
            .saturating_duration_since(t0)
            .as_secs_f64();
        assert_eq!(slot.due(0), t0);
        assert!((last - 15.0 * 0.065536).abs() < 1e-6, "{last}");
        // The next chunk starts where this one ends, less the burst allowance.
        let next = wait_s(&cap, 65_536, t0);
        assert!((next - (16.0 * 0.065536 - 0.131072)).abs() < 1e-6, "{next}");
        // A ragged chunk: the last piece is the rest.
        let ragged = Bytes::from(vec![1u8; PIECE_BYTES + 10]);
        let sizes: Vec<usize> = pieces(&ragged).map(|(_, p)| p.len()).collect();
        assert_eq!(sizes, vec![PIECE_BYTES, 10]);
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
