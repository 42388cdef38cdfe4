//! Delivery-rate estimate of one neighbour, re-measured on every delivery.

/// Shortest interval a first rate sample is taken to span, in seconds.
const MIN_FIRST_SAMPLE_S: f64 = 0.01;

/// Delivery rate of one neighbour, measured over the time it had requests outstanding.
#[derive(Clone, Debug)]
pub struct RateEstimate {
    bps: Option<f64>,
    busy_since: Option<f64>,
    last_delivery: Option<f64>,
}

impl RateEstimate {
    pub(crate) fn new() -> Self {
        Self {
            bps: None,
            busy_since: None,
            last_delivery: None,
        }
    }

    pub(crate) fn became_busy(&mut self, now: f64) {
        if self.busy_since.is_none() {
            self.busy_since = Some(now);
        }
    }

    pub(crate) fn became_idle(&mut self) {
        self.busy_since = None;
    }

    pub(crate) fn delivered(&mut self, bytes: u64, now: f64) {
        let start = match (self.last_delivery, self.busy_since) {
            (Some(last), Some(busy)) => last.max(busy),
            (None, Some(busy)) => busy,
            (Some(last), None) => last,
            (None, None) => now,
        };
        let dt = now - start;
        if dt > 1e-4 {
            // Deliveries handled back to back (a busy event loop, two streams ending
            // together) give near-zero intervals: a sample may at most double the
            // estimate, and a first one must span a plausible interval.
            let sample = match self.bps {
                Some(old) => (bytes as f64 * 8.0 / dt).min(2.0 * old),
                None => bytes as f64 * 8.0 / dt.max(MIN_FIRST_SAMPLE_S),
            };
            // Quick to follow: re-estimate all the time, never trust an old figure for long.
            self.bps = Some(match self.bps {
                Some(old) => 0.7 * old + 0.3 * sample,
                None => sample,
            });
        }
        self.last_delivery = Some(now);
    }

    pub fn bps(&self) -> Option<f64> {
        self.bps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_to_back_deliveries_do_not_inflate_the_rate() {
        // 128 KiB every 0.1 s is 10.5 Mbit/s; then two deliveries handled 0.2 ms apart
        // (a busy event loop) must not make a 5 Gbit/s neighbour of it.
        let mut r = RateEstimate::new();
        r.became_busy(0.0);
        for i in 1..=5 {
            r.delivered(128 << 10, i as f64 * 0.1);
        }
        let steady = r.bps().unwrap();
        assert!((steady - 10.5e6).abs() < 0.1e6, "{steady}");
        r.delivered(128 << 10, 0.5002);
        assert!(r.bps().unwrap() <= 1.3 * steady + 1.0);
        // A first sample that short is taken to span 10 ms at least.
        let mut first = RateEstimate::new();
        first.became_busy(0.0);
        first.delivered(128 << 10, 0.0002);
        assert!(first.bps().unwrap() <= 128.0 * 1024.0 * 8.0 / MIN_FIRST_SAMPLE_S + 1.0);
    }
}
