//! Fewer wake-ups at high packet rates: while a node's socket carries hundreds of Mbit/s,
//! an async worker with nothing left to do waits [`PARK_DELAY`] before it blocks, so the
//! packets of that time are handled in one wake-up instead of one wake-up per datagram.
//!
//! Why (README, "Gigabit links", session 39): at 2 Gbit/s a receiver was woken ~15k times
//! a second, each time finding one receive-offloaded datagram of ~5 packets, and half its
//! samples were the scheduler's switch into and out of idle (costly on this virtual
//! machine). A waker does not help: the kernel wakes a thread blocked in `epoll_wait` for
//! every datagram on a registered socket whoever waits on it, so the wait has to be before
//! the thread blocks. The hook is the runtime's `on_thread_park` ([`before_park`]); where
//! it is not installed (a library user's own runtime) nothing changes but a counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A node whose socket carries at least this much (sent and received, over
/// [`RATE_WINDOW`]) coalesces its wake-ups. Below it wake-ups cost little (at 400 Mbit/s
/// ~7k datagrams a second reach a receiver), and every shipped network at tens of Mbit/s
/// stays below it, its timing unchanged by construction.
pub const COALESCE_MIN_BPS: f64 = 400e6;

/// How long a worker with no work waits before it blocks, while coalescing: at 2 Gbit/s
/// the packets of ~50 KB. 100, 200, 500 and 1000 us measured alike on link-2g and star-1g
/// (CPU per GiB within the machine's noise, U unchanged); the least of those that costs
/// nothing measurable keeps the added delay a hundredth of a 20 ms round trip.
pub const PARK_DELAY: Duration = Duration::from_micros(200);

/// The socket's rate is judged over windows this long (long enough that one burst of
/// segmented sends at tens of Mbit/s does not look like hundreds).
pub const RATE_WINDOW: Duration = Duration::from_millis(10);

/// A window at or above [`COALESCE_MIN_BPS`] keeps coalescing on this long after it ends,
/// so a pause in traffic turns it off within two windows.
const BUSY_FOR: Duration = Duration::from_millis(20);

/// Start of the current window, bytes counted in it, and until when to coalesce:
/// nanoseconds since [`epoch`]. One set per process (a node's one endpoint).
static WINDOW_START_NS: AtomicU64 = AtomicU64::new(0);
static WINDOW_BYTES: AtomicU64 = AtomicU64::new(0);
static BUSY_UNTIL_NS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// Whether `bytes` in `elapsed` is a rate to coalesce at.
fn is_busy(bytes: u64, elapsed: Duration) -> bool {
    elapsed >= RATE_WINDOW && bytes as f64 * 8.0 >= COALESCE_MIN_BPS * elapsed.as_secs_f64()
}

/// Counts `bytes` sent or received on the node's socket.
pub(crate) fn count(bytes: usize) {
    let now = now_ns();
    let total = WINDOW_BYTES.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
    let start = WINDOW_START_NS.load(Ordering::Relaxed);
    let elapsed = Duration::from_nanos(now.saturating_sub(start));
    if elapsed < RATE_WINDOW
        || WINDOW_START_NS
            .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    WINDOW_BYTES.fetch_sub(total, Ordering::Relaxed);
    if is_busy(total, elapsed) {
        BUSY_UNTIL_NS.store(now + BUSY_FOR.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// The runtime's `on_thread_park` hook: while the socket is busy, wait [`PARK_DELAY`]
/// before the worker blocks.
pub fn before_park() {
    if now_ns() < BUSY_UNTIL_NS.load(Ordering::Relaxed) {
        std::thread::sleep(PARK_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_only_at_hundreds_of_mbit_over_a_whole_window() {
        let ms = Duration::from_millis;
        // 2 Gbit/s over 10 ms: 2.5 MB.
        assert!(is_busy(2_500_000, ms(10)));
        // 400 Mbit/s exactly, and over a longer window.
        assert!(is_busy(500_000, ms(10)));
        assert!(is_busy(1_000_000, ms(20)));
        // 100 Mbit/s (the fastest shipped link at tens of Mbit/s), and a burst of ten
        // 1452-byte packets, a short window's worth of it, never count.
        assert!(!is_busy(125_000, ms(10)));
        assert!(!is_busy(14_520, ms(1)));
        assert!(!is_busy(2_500_000, ms(5)));
    }
}
