//! Fewer wake-ups at high packet rates: while a node's socket carries hundreds of Mbit/s,
//! an async worker with nothing left to do waits before it blocks ([`park_delay`]), so the
//! packets of that time are handled in one wake-up instead of one wake-up per datagram.
//!
//! Why (README, "Gigabit links", sessions 39 and 42): at 2 Gbit/s a receiver was woken
//! ~15k times a second, each time finding one receive-offloaded datagram of ~5 packets, and
//! half its samples were the scheduler's switch into and out of idle (costly on this
//! virtual machine). A waker does not help: the kernel wakes a thread blocked in
//! `epoll_wait` for every datagram on a registered socket whoever waits on it, so the wait
//! has to be before the thread blocks. The hook is the runtime's `on_thread_park`
//! ([`before_park`]); where it is not installed (a library user's own runtime) nothing
//! changes but a counter.
//!
//! The wait is set by bytes, not time: a wake-up costs the same whatever it finds, so a
//! fixed wait made a byte cost more the slower the link (a wait of 200 us found 25 KB at 1
//! Gbit/s, 50 KB at 2: CPU per GiB 4.1 against 3.6 on one link). What piles up during a
//! wait (in the receive buffer, in the queue the sender left, in flight waiting for the
//! ACK a wait holds back) is [`PARK_BYTES`] at any rate, and never more than a quarter of
//! what the receive buffer holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A node whose socket carries at least this much (sent and received, over
/// [`RATE_WINDOW`]) coalesces its wake-ups. Below it wake-ups cost little (at 400 Mbit/s
/// ~7k datagrams a second reach a receiver), and every shipped network at tens of Mbit/s
/// stays below it, its timing unchanged by construction.
pub const COALESCE_MIN_BPS: f64 = 400e6;

/// What a wait lets pile up on the node's socket (sent and received): 2 ms at 1 Gbit/s,
/// 1 ms at 2, 200 us at 10. Waits of 0.2, 1, 2 and 5 ms measured on one link at 1, 2 and
/// 10 Gbit/s, a chain, a star and a tree at 1 Gbit/s (session 42): CPU per GiB fell with
/// the wait down to about these bytes (1 Gbit/s: 4.1 at 0.2 ms, 3.3 at 1 ms, 3.0-3.3 at 2),
/// U unchanged; at 10 Gbit/s a wait over ~200 us slowed the transfer (U/U_min 1.55 at
/// 0.2 ms, 1.79 at 2 ms, 2.96 at 5): a sender that waits on an ACK sleeps through its
/// window. It is also under what quinn's pacer lets a sender catch up with in one burst
/// after a wait (256 packets, 371 KB of 1452-byte ones), so a wait costs a paced sender
/// no sending time.
pub const PARK_BYTES: u64 = 256 << 10;

/// Bounds of a wait: under ~50 us a sleep is mostly the timer's slack; over 2 ms (below 1
/// Gbit/s) the wait would outlast what quinn's pacer stores up (2 ms of its rate) and add
/// more to a round trip than was measured.
pub const MIN_PARK_DELAY: Duration = Duration::from_micros(50);
pub const MAX_PARK_DELAY: Duration = Duration::from_millis(2);

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
/// The last busy window's rate, bytes a second.
static BUSY_RATE: AtomicU64 = AtomicU64::new(0);
/// Payload the socket's receive buffer holds ([`set_receive_buffer`]); until told, Linux's
/// default (`net.core.rmem_default`).
static RECEIVE_BUFFER: AtomicU64 = AtomicU64::new(212_992);

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

/// How long a worker with nothing to do waits before it blocks, at `bytes_per_s` on a
/// socket whose receive buffer holds `receive_buffer` bytes of payload: the time
/// [`PARK_BYTES`] take, or a quarter of the buffer if less, within [`MIN_PARK_DELAY`] and
/// [`MAX_PARK_DELAY`].
pub fn park_delay(bytes_per_s: u64, receive_buffer: u64) -> Duration {
    let bytes = PARK_BYTES.min(receive_buffer / 4);
    Duration::from_secs_f64(bytes as f64 / bytes_per_s.max(1) as f64)
        .clamp(MIN_PARK_DELAY, MAX_PARK_DELAY)
}

/// Tells the waits how much payload the node's socket can hold before it drops.
pub(crate) fn set_receive_buffer(bytes: u64) {
    RECEIVE_BUFFER.store(bytes, Ordering::Relaxed);
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
        BUSY_RATE.store(
            (total as f64 / elapsed.as_secs_f64()) as u64,
            Ordering::Relaxed,
        );
        BUSY_UNTIL_NS.store(now + BUSY_FOR.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// The runtime's `on_thread_park` hook: while the socket is busy, wait [`park_delay`]
/// before the worker blocks.
pub fn before_park() {
    if now_ns() < BUSY_UNTIL_NS.load(Ordering::Relaxed) {
        std::thread::sleep(park_delay(
            BUSY_RATE.load(Ordering::Relaxed),
            RECEIVE_BUFFER.load(Ordering::Relaxed),
        ));
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

    #[test]
    fn a_wait_lets_the_same_bytes_pile_up_at_any_rate_within_its_bounds() {
        let big = 16 << 20;
        let gbit = |g: f64| (g * 1e9 / 8.0) as u64;
        // 256 KiB: 2.1 ms at 1 Gbit/s (capped at 2), 1.05 ms at 2, 210 us at 10.
        assert_eq!(park_delay(gbit(1.0), big), MAX_PARK_DELAY);
        assert_eq!(park_delay(gbit(2.0), big).as_micros(), 1048);
        assert_eq!(park_delay(gbit(10.0), big).as_micros(), 209);
        assert_eq!(park_delay(gbit(100.0), big), MIN_PARK_DELAY);
        // A small receive buffer (Linux's default, 208 KiB) shortens the wait to what a
        // quarter of it takes.
        assert_eq!(park_delay(gbit(2.0), 212_992).as_micros(), 212);
        // No rate yet is no division by zero.
        assert_eq!(park_delay(0, big), MAX_PARK_DELAY);
    }
}
