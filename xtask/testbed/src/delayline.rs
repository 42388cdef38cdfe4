//! Propagation delay, jitter and random loss for one link, made in userspace because this
//! kernel has no netem (nor fq or etf, which could release packets at a timestamp).
//!
//! A link with propagation is two veth pairs that meet in a middle namespace: `a`'s end
//! pairs with `ea` there, `b`'s end with `eb`. One thread per link reads every frame that
//! arrives on `ea` or `eb` from a packet socket, drops it with the direction's loss
//! probability, and writes it out of the other interface once its due time has come. The
//! node ends keep their names, addresses and HTB shaping, so rates, routes, link events and
//! the in-kernel link stats are the same as on a link without a middle.
//!
//! Frames pass through whole: the sockets carry a virtio-net header (PACKET_VNET_HDR), so a
//! segmentation-offload frame (up to the testbed's GSO size) crosses as one, as on a veth.
//! Lossy links have segmentation offload off at their ends, so a loss drops one packet,
//! not a burst of them.

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{random::Rng, topology::Propagation};

/// Names of the two interfaces in the middle namespace.
pub const END_A: &str = "ea";
pub const END_B: &str = "eb";

/// What a running delay line has done, readable while it runs.
#[derive(Debug, Default)]
pub struct LineCounters {
    /// Frames forwarded a->b and b->a.
    pub forwarded: [AtomicU64; 2],
    /// Frames dropped on purpose (loss) a->b and b->a.
    pub lost: [AtomicU64; 2],
    /// Frames that could not be written out (interface down, queue full).
    pub send_errors: AtomicU64,
    /// CPU time the thread has used, microseconds (updated about once a second).
    pub cpu_us: AtomicU64,
}

/// A delay line's thread; dropping it stops the thread and waits for it.
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    pub counters: Arc<LineCounters>,
    thread: Option<JoinHandle<()>>,
}

impl DelayLine {
    /// Starts moving frames between `ea` and `eb` in the namespace at `netns_path`: `ab`
    /// applies to frames arriving on `ea` (sent by `a`), `ba` to those arriving on `eb`.
    /// Returns once the sockets are open, or with the reason they could not be.
    pub fn start(
        netns_path: &str,
        ab: Propagation,
        ba: Propagation,
        seed: u64,
    ) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(LineCounters::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = netns_path.to_string();
        let (flag, shared) = (stop.clone(), counters.clone());
        let thread = std::thread::Builder::new()
            .name("delay-line".into())
            .spawn(move || {
                let opened = crate::netns::enter_netns(&path)
                    .and_then(|()| Ok([packet_socket(END_A)?, packet_socket(END_B)?]));
                match opened {
                    Ok(sockets) => {
                        let _ = ready_tx.send(Ok(()));
                        Line::new([ab, ba], seed, shared).run(&sockets, &flag);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        let opened = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("delay-line thread died")));
        let line = Self {
            stop,
            counters,
            thread: Some(thread),
        };
        opened.map(|()| line)
    }

    /// CPU seconds the thread has used so far.
    pub fn cpu_s(&self) -> f64 {
        self.counters.cpu_us.load(Ordering::Relaxed) as f64 / 1e6
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Room for the largest frame a veth hands over (64 KiB of GSO frame) plus headers.
const FRAME_BUF: usize = 65_536 + 128;
/// Longest the thread sleeps with nothing due, so it sees the stop flag.
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// Frames read from one socket before the thread looks at what is due again.
const READ_BATCH: usize = 64;

/// The state of one link's line: a FIFO of frames with their due times per direction.
struct Line {
    prop: [Propagation; 2],
    queues: [VecDeque<(Instant, Vec<u8>)>; 2],
    /// Due time of the last frame queued per direction: none may leave before it.
    last_due: [Instant; 2],
    rng: Rng,
    counters: Arc<LineCounters>,
}

impl Line {
    fn new(prop: [Propagation; 2], seed: u64, counters: Arc<LineCounters>) -> Self {
        let now = Instant::now();
        Self {
            prop,
            queues: Default::default(),
            last_due: [now; 2],
            rng: Rng::new(seed),
            counters,
        }
    }

    /// When a frame that arrived `now` in direction `dir` leaves; None if it is lost.
    fn due(&mut self, dir: usize, now: Instant) -> Option<Instant> {
        let p = self.prop[dir];
        if p.loss > 0.0 && self.rng.chance(p.loss) {
            return None;
        }
        let jitter = if p.jitter_ms > 0.0 {
            self.rng.range(-1.0, 1.0) * p.jitter_ms
        } else {
            0.0
        };
        let delay_s = ((p.delay_ms + jitter) / 1e3).max(0.0);
        let due = (now + Duration::from_secs_f64(delay_s)).max(self.last_due[dir]);
        self.last_due[dir] = due;
        Some(due)
    }

    fn run(&mut self, sockets: &[OwnedFd; 2], stop: &AtomicBool) {
        // Wake-ups on time to the microsecond, not the default 50 us of slack.
        // SAFETY: prctl with plain integer arguments, on this thread only.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
        let mut buf = vec![0u8; FRAME_BUF];
        let mut cpu_read_at = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            // Frames due leave, in order, out of the other side.
            for dir in 0..2 {
                while self.queues[dir].front().is_some_and(|(due, _)| *due <= now) {
                    let (_, frame) = self.queues[dir].pop_front().expect("checked");
                    if send(&sockets[1 - dir], &frame).is_ok() {
                        self.counters.forwarded[dir].fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let next_due = self
                .queues
                .iter()
                .filter_map(|q| q.front().map(|(due, _)| *due))
                .min();
            let wait = next_due.map_or(IDLE_WAIT, |d| d.saturating_duration_since(now));
            let readable = poll_readable(sockets, wait.min(IDLE_WAIT));
            let arrived = Instant::now();
            for dir in (0..2).filter(|&d| readable[d]) {
                for _ in 0..READ_BATCH {
                    let Some(len) = recv(&sockets[dir], &mut buf) else {
                        break;
                    };
                    match self.due(dir, arrived) {
                        Some(due) => self.queues[dir].push_back((due, buf[..len].to_vec())),
                        None => {
                            self.counters.lost[dir].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            if arrived.duration_since(cpu_read_at) >= Duration::from_secs(1) {
                cpu_read_at = arrived;
                self.counters
                    .cpu_us
                    .store(thread_cpu_us(), Ordering::Relaxed);
            }
        }
        self.counters
            .cpu_us
            .store(thread_cpu_us(), Ordering::Relaxed);
    }
}

/// A packet socket on interface `iface` of this thread's namespace that reads every frame
/// arriving there (not those it sends), with a virtio-net header in front of each.
fn packet_socket(iface: &str) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(iface).map_err(io::Error::other)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::other(format!("no interface {iface}")));
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            proto as i32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    const PACKET_IGNORE_OUTGOING: i32 = 23;
    setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
    setsockopt(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
    // A full bandwidth-delay product may wait in the kernel while the thread sleeps.
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20)?;
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 16 << 20)?;
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind with a sockaddr_ll of the right size.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if bound != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn setsockopt(fd: &OwnedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: an int option, passed by pointer with its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Which of the two sockets have frames waiting, after waiting at most `wait`.
fn poll_readable(sockets: &[OwnedFd; 2], wait: Duration) -> [bool; 2] {
    let mut fds = sockets.each_ref().map(|s| libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    let ts = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: two valid pollfds and a timespec that outlive the call.
    let n = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
    if n <= 0 {
        return [false; 2];
    }
    fds.map(|f| f.revents & libc::POLLIN != 0)
}

/// One frame (virtio-net header included), or None when none is waiting. A frame larger
/// than the buffer cannot be forwarded whole and is skipped.
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    loop {
        // SAFETY: recv into a buffer of the given length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            return None;
        }
        if (n as usize) <= buf.len() {
            return Some(n as usize);
        }
    }
}

fn send(fd: &OwnedFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: send from a buffer of the given length.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CPU time of the calling thread, microseconds.
fn thread_cpu_us() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_keeps_order_and_loss_keeps_its_rate() {
        let prop = Propagation {
            delay_ms: 10.0,
            jitter_ms: 5.0,
            loss: 0.05,
        };
        let mut line = Line::new([prop, Propagation::default()], 7, Default::default());
        let start = Instant::now();
        let (mut lost, mut last) = (0, start);
        for i in 0..100_000u32 {
            let now = start + Duration::from_micros(i as u64 * 100);
            match line.due(0, now) {
                None => lost += 1,
                Some(due) => {
                    assert!(due >= last, "order kept");
                    let delay = due.duration_since(now).as_secs_f64() * 1e3;
                    assert!(
                        (5.0..=15.0 + 0.1).contains(&delay) || due == last,
                        "{delay}"
                    );
                    last = due;
                }
            }
        }
        assert!(
            (4_500..=5_500).contains(&lost),
            "{lost} of 100000 lost at 5%"
        );
        // The other direction has nothing configured: no delay, no loss.
        let now = Instant::now();
        assert_eq!(line.due(1, now), Some(now.max(line.last_due[1])));
    }
}
