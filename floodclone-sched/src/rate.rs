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

    /// `bytes` arrived at `now`; `rtt_s` is the round trip to the neighbour, if known.
    pub(crate) fn delivered(&mut self, bytes: u64, now: f64, rtt_s: Option<f64>) {
        let (start, after_request) = match (self.last_delivery, self.busy_since) {
            (Some(last), Some(busy)) => (last.max(busy), busy >= last),
            (None, Some(busy)) => (busy, true),
            (Some(last), None) => (last, false),
            (None, None) => (now, false),
        };
        let mut dt = now - start;
        if after_request {
            // The interval began with a request, so it holds that request's round trip:
            // latency, not transfer time. Left in, a long path reads as a slow one
            // (64 KiB per 123 ms round trip is 4 Mbit/s on a 40 Mbit/s link), and the
            // pipeline sized from that rate never lets more through.
            dt = (dt - rtt_s.unwrap_or(0.0)).max(MIN_FIRST_SAMPLE_S.min(dt));
        }
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
            r.delivered(128 << 10, i as f64 * 0.1, None);
        }
        let steady = r.bps().unwrap();
        assert!((steady - 10.5e6).abs() < 0.1e6, "{steady}");
        r.delivered(128 << 10, 0.5002, None);
        assert!(r.bps().unwrap() <= 1.3 * steady + 1.0);
        // A first sample that short is taken to span 10 ms at least.
        let mut first = RateEstimate::new();
        first.became_busy(0.0);
        first.delivered(128 << 10, 0.0002, None);
        assert!(first.bps().unwrap() <= 128.0 * 1024.0 * 8.0 / MIN_FIRST_SAMPLE_S + 1.0);
    }

    #[test]
    fn a_request_round_trip_is_not_read_as_transfer_time() {
        // 64 KiB at 40 Mbit/s takes 13 ms; asked over a 123 ms round trip, it arrives 136 ms
        // after the request. Read whole, that is 3.9 Mbit/s.
        let (bytes, rtt, transfer) = (64 << 10, 0.123, 64.0 * 1024.0 * 8.0 / 40e6);
        let mut r = RateEstimate::new();
        r.became_busy(1.0);
        r.delivered(bytes, 1.0 + rtt + transfer, Some(rtt));
        let first = r.bps().unwrap();
        assert!((first - 40e6).abs() < 1e6, "{first}");
        // The next, asked while the first was on its way, is timed from the first.
        r.delivered(bytes, 1.0 + rtt + 2.0 * transfer, Some(rtt));
        assert!((r.bps().unwrap() - 40e6).abs() < 1e6);
        // Idle, then asked again: the round trip is left out again.
        r.became_idle();
        r.became_busy(2.0);
        r.delivered(bytes, 2.0 + rtt + transfer, Some(rtt));
        assert!((r.bps().unwrap() - 40e6).abs() < 1e6);
    }
}
