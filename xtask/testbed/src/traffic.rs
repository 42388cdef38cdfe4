//! Test-owned traffic between testbed nodes, and the machine's CPU use while it runs.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::netns::{identity_addr, Testbed};

/// Sends TCP from node `from` to node `to` for `secs`; returns (payload Mbit/s after a
/// warm-up of a quarter of the time, payload bytes counted).
pub fn tcp_transfer(bed: &Testbed, from: usize, to: usize, secs: f64) -> (f64, u64) {
    let mut flow = BackgroundTcp::start(bed, from, to, 5001);
    std::thread::sleep(Duration::from_secs_f64(secs / 4.0));
    let (warm, since) = (flow.received(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs * 3.0 / 4.0));
    let counted = flow.received() - warm;
    let dur = since.elapsed().as_secs_f64();
    flow.stop();
    (counted as f64 * 8.0 / dur / 1e6, counted)
}

/// Busy CPU time of the whole machine so far, in seconds (all cores, from /proc/stat).
pub fn machine_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    let busy: f64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    busy / hz
}

/// Round-trip times in milliseconds of `count` small UDP datagrams from node `from` to an
/// echo in node `to`, one every `gap` (a ping that needs no ICMP tool).
pub fn udp_rtts_ms(bed: &Testbed, from: usize, to: usize, count: usize, gap: Duration) -> Vec<f64> {
    let dst = SocketAddrV4::new(identity_addr(to), 5002);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let echo = bed.in_netns(to, move || {
        let sock = std::net::UdpSocket::bind(dst).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], peer);
        }
    });
    ready_rx.recv().unwrap();
    let rtts = bed
        .in_netns(from, move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
            sock.connect(dst).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut rtts = Vec::new();
            let mut buf = [0u8; 64];
            for i in 0..count as u64 {
                let sent = Instant::now();
                sock.send(&i.to_be_bytes()).unwrap();
                // Answers to earlier (lost or late) probes are skipped.
                while let Ok(n) = sock.recv(&mut buf) {
                    if buf[..n] == i.to_be_bytes() {
                        rtts.push(sent.elapsed().as_secs_f64() * 1e3);
                        break;
                    }
                }
                std::thread::sleep(gap);
            }
            rtts
        })
        .join()
        .unwrap();
    echo.join().unwrap();
    rtts
}

/// Sends `count` UDP datagrams of 200 bytes from node `from` to node `to` at `mbit`
/// Mbit/s; returns how many arrived.
pub fn udp_delivered(bed: &Testbed, from: usize, to: usize, count: u64, mbit: f64) -> u64 {
    let dst = SocketAddrV4::new(identity_addr(to), 5003);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = bed.in_netns(to, move || {
        let sock = std::net::UdpSocket::bind(dst).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 256];
        let mut got = 0;
        while sock.recv(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    ready_rx.recv().unwrap();
    bed.in_netns(from, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        let payload = [0u8; 200];
        let start = Instant::now();
        let per_packet_s = (200.0 + 28.0 + 14.0) * 8.0 / (mbit * 1e6);
        for i in 0..count {
            let due = start + Duration::from_secs_f64(i as f64 * per_packet_s);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let _ = sock.send_to(&payload, dst);
        }
    })
    .join()
    .unwrap();
    receiver.join().unwrap()
}

/// A TCP flow from one node to another that runs until stopped (or dropped), counting what
/// arrives: other people's traffic next to a transfer. The kernel's default congestion
/// control, a blocking socket writing as fast as it may.
pub struct BackgroundTcp {
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BackgroundTcp {
    /// Starts the flow on `port` of `to` (distinct ports for several flows).
    pub fn start(bed: &Testbed, from: usize, to: usize, port: u16) -> Self {
        use std::sync::{
            atomic::{AtomicBool, AtomicU64, Ordering},
            Arc,
        };
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let dst = SocketAddrV4::new(identity_addr(to), port);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (count, stopping) = (received.clone(), stop.clone());
        let receiver = bed.in_netns(to, move || {
            let listener = TcpListener::bind(dst).expect("bind");
            ready_tx.send(()).unwrap();
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            // Wakes up now and then to see the stop flag even if the sender is stuck.
            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = vec![0u8; 1 << 16];
            while !stopping.load(Ordering::Relaxed) {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
        });
        ready_rx.recv().unwrap();
        let stopping = stop.clone();
        let sender = bed.in_netns(from, move || {
            let Ok(mut conn) = TcpStream::connect(dst) else {
                return;
            };
            let _ = conn.set_write_timeout(Some(Duration::from_millis(200)));
            let chunk = vec![0x5au8; 1 << 16];
            while !stopping.load(Ordering::Relaxed) {
                match conn.write(&chunk) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
        });
        Self {
            received,
            stop,
            threads: vec![receiver, sender],
        }
    }

    /// Payload bytes received so far.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for BackgroundTcp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A baseline copy of a file from one node to several at once ([`tcp_copy`], [`quic_copy`]):
/// the same files and links as a FloodClone run, for a baseline of speed and CPU cost in
/// the same bench.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BaselineCopy {
    /// Seconds from the start until each receiver held the whole file, in `to` order.
    pub done_s: Vec<f64>,
    /// CPU seconds (user + system) of the sending and receiving threads, summed.
    pub cpu_s: f64,
    /// Busy CPU seconds of the whole machine meanwhile (the kernel's forwarding and
    /// shaping too).
    pub machine_cpu_s: f64,
}

/// User + system CPU seconds of the calling thread.
fn thread_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

/// Copies `file` from node `from` to each node of `to` over TCP, all at once, into
/// `<out_dir>/tcp-<node>.out`; checks every copy's length. What `curl` from an HTTP server
/// does, without HTTP: the sender uses `sendfile` (no copy through user space); each
/// receiver reads into a file of its own, then syncs it to disk (counted in its CPU, not
/// its time).
pub fn tcp_copy(
    bed: &Testbed,
    file: &std::path::Path,
    from: usize,
    to: &[usize],
    out_dir: &std::path::Path,
) -> anyhow::Result<BaselineCopy> {
    use std::os::fd::AsRawFd;
    let len = std::fs::metadata(file)?.len();
    let addr = SocketAddrV4::new(identity_addr(from), 5003);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (file, receivers) = (file.to_path_buf(), to.len());
    let sender = bed.in_netns(from, move || -> anyhow::Result<f64> {
        let listener = TcpListener::bind(addr)?;
        ready_tx.send(()).ok();
        let mut conns = Vec::new();
        for _ in 0..receivers {
            conns.push(listener.accept()?.0);
        }
        // One thread per receiver, as a server would; threads keep this namespace.
        let threads: Vec<_> = conns
            .into_iter()
            .map(|conn| {
                let file = file.clone();
                std::thread::spawn(move || -> anyhow::Result<f64> {
                    let f = std::fs::File::open(&file)?;
                    let mut off: libc::off_t = 0;
                    while (off as u64) < len {
                        let left = (len - off as u64).min(1 << 30) as usize;
                        // SAFETY: two valid descriptors and an offset we own.
                        let n = unsafe {
                            libc::sendfile(conn.as_raw_fd(), f.as_raw_fd(), &mut off, left)
                        };
                        if n <= 0 {
                            anyhow::bail!("sendfile: {}", std::io::Error::last_os_error());
                        }
                    }
                    conn.shutdown(std::net::Shutdown::Write)?;
                    // Wait for the receiver to close: the copy is only done when it has it all.
                    let mut b = [0u8; 1];
                    let _ = (&conn).read(&mut b);
                    Ok(thread_cpu_s())
                })
            })
            .collect();
        let mut cpu = thread_cpu_s();
        for t in threads {
            cpu += t
                .join()
                .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
        }
        Ok(cpu)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow::anyhow!("the TCP sender did not start"))?;
    let cpu0 = machine_busy_s();
    let start = Instant::now();
    let readers: Vec<_> = to
        .iter()
        .map(|&node| {
            let out = out_dir.join(format!("tcp-{node}.out"));
            bed.in_netns(node, move || tcp_receive(addr, &out, len, start))
        })
        .collect();
    let mut done_s = Vec::new();
    let mut cpu_s = 0.0;
    for r in readers {
        let (done, cpu) = r
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        done_s.push(done);
        cpu_s += cpu;
    }
    cpu_s += sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    Ok(BaselineCopy {
        done_s,
        cpu_s,
        machine_cpu_s: machine_busy_s() - cpu0,
    })
}

/// One receiver of [`tcp_copy`]: reads everything `addr` sends into `out`, syncs it and
/// removes it. Returns when the last byte was read (seconds after `start`) and its
/// thread's CPU seconds. Its CPU includes putting the file on disk, which a FloodClone
/// destination does before it reports done (and the kernel's flusher would do later,
/// unaccounted, for a copy left in the page cache); its time ends when the last byte was
/// read, as curl's does.
fn tcp_receive(
    addr: SocketAddrV4,
    out: &std::path::Path,
    len: u64,
    start: Instant,
) -> anyhow::Result<(f64, f64)> {
    let mut conn = TcpStream::connect(addr)?;
    let mut f = std::fs::File::create(out)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n])?;
        got += n as u64;
    }
    let done = start.elapsed().as_secs_f64();
    f.sync_all()?;
    drop(f);
    let _ = std::fs::remove_file(out);
    anyhow::ensure!(got == len, "received {got} of {len} bytes");
    Ok((done, thread_cpu_s()))
}

/// The port [`quic_copy`]'s sender listens on.
const QUIC_COPY_PORT: u16 = 5004;

/// Copies `file` from node `from` to each node of `to` over QUIC, all at once, with
/// `quic_copy` (the example program `floodclone-user/examples/quic_copy.rs`: a node's
/// endpoint and configuration, none of the daemon's work). Without `checked_into`,
/// receivers read what comes and drop it: what the transport alone costs. With it, both
/// ends add the hashing of every byte and each receiver writes its copy into that
/// directory and syncs it (removed after): the floor of a verified, stored copy. Checks
/// every copy's length. Each process's CPU is its own `getrusage`, reported as it exits.
pub fn quic_copy(
    bed: &mut Testbed,
    quic_copy: &std::path::Path,
    file: &std::path::Path,
    from: usize,
    to: &[usize],
    checked_into: Option<&std::path::Path>,
    deadline: Duration,
) -> anyhow::Result<BaselineCopy> {
    use std::process::Stdio;
    let len = std::fs::metadata(file)?.len();
    let program = quic_copy
        .to_str()
        .context("quic_copy's path is not UTF-8")?;
    let mut send = bed.command(from, program);
    send.arg("send")
        .arg(file)
        .args([QUIC_COPY_PORT.to_string(), to.len().to_string()])
        .args(checked_into.map(|_| "checked"))
        .stdout(Stdio::piped());
    let sender = bed.spawn(send)?;
    let mut sender_out = std::io::BufReader::new(
        bed.child(sender)
            .stdout
            .take()
            .context("quic_copy's stdout")?,
    );
    let mut line = String::new();
    std::io::BufRead::read_line(&mut sender_out, &mut line)?;
    anyhow::ensure!(
        line.contains("listening"),
        "quic_copy send did not start: {line:?}"
    );
    let cpu0 = machine_busy_s();
    let start = Instant::now();
    let addr = format!("{}:{QUIC_COPY_PORT}", identity_addr(from));
    let receivers = to
        .iter()
        .map(|&node| {
            let mut recv = bed.command(node, program);
            match checked_into {
                Some(dir) => recv
                    .args(["recv", &addr])
                    .arg(quic_copy_out(dir, node))
                    .arg("checked"),
                None => recv.args(["recv", &addr, "-"]),
            };
            recv.stdout(Stdio::piped());
            Ok((bed.spawn(recv)?, start.elapsed().as_secs_f64()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut done_s = Vec::new();
    let mut cpu_s = 0.0;
    for (handle, started_s) in receivers {
        let report = wait_for_json(bed, handle, start + deadline)?;
        let got = report["bytes"].as_u64().unwrap_or(0);
        anyhow::ensure!(got == len, "a quic_copy receiver got {got} of {len} bytes");
        done_s.push(started_s + report["done_s"].as_f64().unwrap_or(f64::NAN));
        cpu_s += report["cpu_s"].as_f64().unwrap_or(0.0);
    }
    let machine_cpu_s = machine_busy_s() - cpu0;
    // Its receivers are done, so it ends: but never wait on it without a bound.
    let status = exit_status_by(bed.child(sender), start + deadline)?;
    let mut rest = String::new();
    sender_out.read_to_string(&mut rest)?;
    anyhow::ensure!(status.success(), "quic_copy send failed ({status}): {rest}");
    let sent: serde_json::Value = serde_json::from_str(rest.trim())
        .with_context(|| format!("quic_copy send's report: {rest:?}"))?;
    cpu_s += sent["cpu_s"].as_f64().unwrap_or(0.0);
    if let Some(dir) = checked_into {
        for &node in to {
            let _ = std::fs::remove_file(quic_copy_out(dir, node));
        }
    }
    Ok(BaselineCopy {
        done_s,
        cpu_s,
        machine_cpu_s,
    })
}

/// Where a checked [`quic_copy`]'s receiver on `node` writes its copy.
fn quic_copy_out(dir: &std::path::Path, node: usize) -> std::path::PathBuf {
    dir.join(format!("quic-{node}.out"))
}

/// Waits until the process `handle` exits (killing it at `deadline`) and parses the JSON
/// line it printed.
fn wait_for_json(
    bed: &mut Testbed,
    handle: usize,
    deadline: Instant,
) -> anyhow::Result<serde_json::Value> {
    let child = bed.child(handle);
    let status = exit_status_by(child, deadline)?;
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    anyhow::ensure!(status.success(), "quic_copy failed ({status}): {out}");
    serde_json::from_str(out.trim()).with_context(|| format!("quic_copy's report: {out:?}"))
}

/// Waits until `child` exits; kills it at `deadline`.
fn exit_status_by(
    child: &mut std::process::Child,
    deadline: Instant,
) -> anyhow::Result<std::process::ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("quic_copy did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
