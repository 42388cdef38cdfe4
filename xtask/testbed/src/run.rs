//! One real transfer on the emulated testbed: the `floodclone` binary in every member's
//! namespace, timed events applied on schedule, every copy verified by hash, and the result
//! set against the floor.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use floodclone_events::{Event, MemberId, Progress, SwarmDone, TxBytesByIface};
use serde::Serialize;

use crate::{
    bound,
    netns::{self, identity_addr, Testbed},
    topology::{Role, Topology},
};

/// How long a run waits for its destinations to be ready before it starts the source.
const READY_WITHIN: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub bytes: u64,
    /// Extra arguments for every `floodclone send`.
    pub send_args: Vec<String>,
    /// Extra arguments for every `floodclone recv`.
    pub recv_args: Vec<String>,
    /// Give up after this long (default: 10 x U_min + 60 s).
    pub timeout: Option<Duration>,
    pub quiet: bool,
    /// Write a picture of the run (SVG) here.
    pub picture: Option<PathBuf>,
    /// Keep every node's log (stderr) in this directory, as `<node>.log`.
    pub logs: Option<PathBuf>,
    /// Send a directory of this many files (`bytes` split evenly, 100 to a subdirectory)
    /// instead of one file: one swarm for the tree (issue 22).
    pub files: u64,
    /// Name the source and destinations by their IPv6 identity addresses (the testbed
    /// gives every node both families), so the whole transfer runs over IPv6.
    pub ipv6: bool,
    /// Destinations (by name) whose own packets to the source are dropped until this many
    /// seconds after `send` starts: members that join late, as one whose network comes up
    /// late (their kernels forward for others all along).
    pub join_late: Vec<(String, f64)>,
}

impl RunOptions {
    pub fn new(bytes: u64) -> Self {
        Self {
            bytes,
            send_args: Vec::new(),
            recv_args: Vec::new(),
            timeout: None,
            quiet: false,
            picture: None,
            logs: None,
            files: 1,
            ipv6: false,
            join_late: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct DestOutcome {
    pub name: String,
    /// Seconds from the start of `floodclone send` (destinations already up and ready)
    /// until the source heard this destination's copy is complete and verified; the
    /// destination's own count (from its start) when the source did not report it.
    pub elapsed_s: Option<f64>,
    pub verified: bool,
    pub duplicates: Option<u64>,
    /// Peak resident memory of the destination's process.
    pub peak_rss_bytes: Option<u64>,
    /// CPU seconds its process used, user and system.
    pub cpu_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub topology: String,
    pub bytes: u64,
    pub dests: Vec<DestOutcome>,
    /// The last destination's time: the score.
    pub u_s: Option<f64>,
    pub u_min_s: f64,
    pub u_min_wire_s: f64,
    pub ratio: Option<f64>,
    /// The floor when routers forward along the testbed's single routes
    /// ([`bound::routed_u_min_s`]), and U over it.
    pub u_min_routed_s: Option<f64>,
    pub ratio_routed: Option<f64>,
    pub send_exit_ok: bool,
    pub source_peak_rss_bytes: Option<u64>,
    /// CPU seconds the source's process used, user and system.
    pub source_cpu_s: Option<f64>,
    /// When the source's first chunk left, seconds after `send` started.
    pub first_chunk_s: Option<f64>,
    /// Busy CPU seconds of the whole machine from `send`'s start until the source heard the
    /// last copy was done (every process, the kernel's forwarding and shaping).
    pub machine_cpu_s: Option<f64>,
    /// Copies of the file sent over each link direction (from -> to): a member's from its
    /// in-kernel counters, a router's from its interface's (wire bytes / file bytes, so
    /// ~1.06 is one copy plus headers; a router's also counts any cross traffic).
    pub link_copies: Vec<(String, String, f64)>,
    /// Where the picture of the run was written.
    pub picture: Option<PathBuf>,
    /// Work conservation: link directions that ran under half their capacity while a
    /// member beyond them lacked data the near end held ([`crate::idle`]), worst first.
    pub idle: Vec<crate::idle::IdleLink>,
    /// Their seconds summed, and those of the source's own link directions.
    pub idle_s: f64,
    pub source_idle_s: f64,
    /// CPU seconds the testbed's delay lines used during the run (0 without propagation):
    /// the same two cores the nodes run on.
    pub delay_line_cpu_s: f64,
    /// The topology's TCP cross flows: what each got before and during the transfer.
    pub cross: Vec<CrossReport>,
    /// With cross flows: the floor on the capacity they left (each link direction they
    /// use less what they carried during the transfer), and U over it.
    pub u_min_left_s: Option<f64>,
    pub ratio_left: Option<f64>,
}

impl RunReport {
    /// Copies of the file link direction `from` -> `to` carried (0 if it carried nothing).
    pub fn copies(&self, from: &str, to: &str) -> f64 {
        self.link_copies
            .iter()
            .find(|(f, t, _)| f == from && t == to)
            .map_or(0.0, |l| l.2)
    }
}

/// One TCP cross flow ([`crate::topology::CrossFlow`]) in a run.
#[derive(Clone, Debug, Serialize)]
pub struct CrossReport {
    pub from: String,
    pub to: String,
    /// The narrowest link rate on the flow's route.
    pub link_mbit: f64,
    /// TCP payload Mbit/s alone on the link (measured for [`CROSS_ALONE`] before the
    /// swarm starts) and while the transfer ran (from `send`'s start until U).
    pub before_mbit: f64,
    pub during_mbit: f64,
}

impl CrossReport {
    /// The share of the link the flow had during the transfer, on the wire: a full TCP
    /// segment carries 1448 bytes of payload in a 1514-byte frame.
    pub fn during_share(&self) -> f64 {
        self.during_mbit * TCP_WIRE_PER_PAYLOAD / self.link_mbit
    }
}

const TCP_WIRE_PER_PAYLOAD: f64 = 1514.0 / 1448.0;
/// Cross flows run this long before they are measured (slow start, queues filled) ...
const CROSS_SETTLE: Duration = Duration::from_secs(2);
/// ... and are measured alone this long.
const CROSS_ALONE: Duration = Duration::from_secs(3);

/// The topology's TCP cross flows during one run: started before the swarm and measured
/// alone, then sampled (seconds from `send`'s start, bytes received) until stopped.
struct CrossTraffic {
    flows: Vec<crate::traffic::BackgroundTcp>,
    alone_mbit: Vec<f64>,
    samples: Vec<Vec<(f64, u64)>>,
}

impl CrossTraffic {
    fn start(topo: &Topology, bed: &Testbed) -> Self {
        let flows: Vec<_> = topo
            .cross
            .iter()
            .enumerate()
            .map(|(i, c)| crate::traffic::BackgroundTcp::start(bed, c.from, c.to, 5101 + i as u16))
            .collect();
        let mut alone_mbit = Vec::new();
        if !flows.is_empty() {
            std::thread::sleep(CROSS_SETTLE);
            let at_start: Vec<u64> = flows.iter().map(|f| f.received()).collect();
            std::thread::sleep(CROSS_ALONE);
            for (f, b0) in flows.iter().zip(at_start) {
                alone_mbit.push((f.received() - b0) as f64 * 8.0 / CROSS_ALONE.as_secs_f64() / 1e6);
            }
        }
        let samples = vec![Vec::new(); flows.len()];
        Self {
            flows,
            alone_mbit,
            samples,
        }
    }

    fn sample(&mut self, t: f64) {
        for (f, samples) in self.flows.iter().zip(&mut self.samples) {
            samples.push((t, f.received()));
        }
    }

    fn stop(&mut self) {
        for f in &mut self.flows {
            f.stop();
        }
    }

    /// Each flow alone and during the transfer (until `u`, when every copy arrived).
    fn report(&self, topo: &Topology, u: Option<f64>) -> Vec<CrossReport> {
        topo.cross
            .iter()
            .zip(&self.alone_mbit)
            .zip(&self.samples)
            .map(|((c, &before_mbit), samples)| CrossReport {
                from: topo.nodes[c.from].name.clone(),
                to: topo.nodes[c.to].name.clone(),
                link_mbit: c
                    .hops
                    .iter()
                    .map(|&(link, from)| topo.links[link].mbit_from(from))
                    .fold(f64::INFINITY, f64::min),
                before_mbit,
                during_mbit: u.map_or(0.0, |u| mbit_between(samples, 0.0, u)),
            })
            .collect()
    }
}

/// The floor on the capacity the cross flows left: every link direction on each flow's
/// route less what it carried (on the wire); `None` without cross flows.
fn floor_left_by(topo: &Topology, flows: &[CrossReport], bytes: u64) -> Option<f64> {
    if flows.is_empty() {
        return None;
    }
    let mut left = topo.clone();
    for (c, r) in topo.cross.iter().zip(flows) {
        for &(link, from) in &c.hops {
            left = left.with_capacity_taken(link, from, r.during_mbit * TCP_WIRE_PER_PAYLOAD);
        }
    }
    bound::floor(&left.with_upload_caps_as_links(), bytes)
        .ok()
        .map(|f| f.u_min_s)
}

/// `--max-rate` for a member with an upload cap.
fn cap_args(topo: &Topology, node: usize) -> Vec<String> {
    topo.nodes[node]
        .max_mbit
        .map(|m| vec!["--max-rate".to_string(), m.to_string()])
        .unwrap_or_default()
}

/// Payload Mbit/s between two samples of (seconds, bytes received), interpolated at `t0`
/// and `t1`.
fn mbit_between(samples: &[(f64, u64)], t0: f64, t1: f64) -> f64 {
    let at = |t: f64| {
        let i = samples.partition_point(|s| s.0 < t);
        match (i.checked_sub(1).map(|j| samples[j]), samples.get(i)) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                a.1 as f64 + (b.1 as f64 - a.1 as f64) * (t - a.0) / (b.0 - a.0)
            }
            (_, Some(b)) => b.1 as f64,
            (Some(a), None) => a.1 as f64,
            (None, None) => 0.0,
        }
    };
    if t1 <= t0 {
        return 0.0;
    }
    (at(t1) - at(t0)) * 8.0 / (t1 - t0) / 1e6
}

/// Fills `path` with `bytes` of reproducible pseudo-random data.
pub fn write_test_file(path: &Path, bytes: u64, seed: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        for w in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// `files` files of `bytes` in all under `root` (100 to a subdirectory), each of
/// reproducible pseudo-random data.
pub fn write_test_files(root: &Path, bytes: u64, files: u64, seed: u64) -> Result<()> {
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        let size = bytes / files + u64::from(i < bytes % files);
        write_test_file(&dir.join(format!("f{i:05}")), size, seed.wrapping_add(i))?;
    }
    Ok(())
}

/// A file's BLAKE3, or for a directory the BLAKE3 of its tree: every entry's relative path
/// and kind in path order, a file's bytes, a link's target.
fn file_hash(path: &Path) -> Option<blake3::Hash> {
    fn walk(h: &mut blake3::Hasher, root: &Path, rel: &Path) -> Option<()> {
        let mut names: Vec<_> = std::fs::read_dir(root.join(rel))
            .ok()?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .ok()?;
        names.sort();
        for name in names {
            let rel = rel.join(name);
            let full = root.join(&rel);
            let meta = std::fs::symlink_metadata(&full).ok()?;
            h.update(rel.as_os_str().as_encoded_bytes());
            if meta.is_dir() {
                h.update(b"/dir");
                walk(h, root, &rel)?;
            } else if meta.is_symlink() {
                h.update(b"/link");
                h.update(
                    std::fs::read_link(&full)
                        .ok()?
                        .as_os_str()
                        .as_encoded_bytes(),
                );
            } else {
                h.update(&meta.len().to_le_bytes());
                h.update_reader(std::fs::File::open(&full).ok()?).ok()?;
            }
        }
        Some(())
    }
    let mut h = blake3::Hasher::new();
    if std::fs::symlink_metadata(path).ok()?.is_dir() {
        walk(&mut h, path, Path::new(""))?;
    } else {
        h.update_reader(std::fs::File::open(path).ok()?).ok()?;
    }
    Some(h.finalize())
}

/// Reads a child's stdout lines into a channel, tagged with `who`.
fn pipe_lines(child: &mut Child, who: usize, tx: mpsc::Sender<(usize, String)>) {
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((who, line)).is_err() {
                break;
            }
        }
    });
}

/// What every node has said so far (its JSON events), and with `RunOptions::logs` each
/// line kept too, after the harness clock.
struct Seen {
    nodes: Vec<NodeEvents>,
    files: Vec<Option<std::fs::File>>,
}

impl Seen {
    fn new(topo: &Topology, logs: Option<&Path>) -> Result<Self> {
        let mut files = Vec::new();
        for n in &topo.nodes {
            files.push(match logs {
                Some(dir) => Some(std::fs::File::create(
                    dir.join(format!("{}.events", n.name)),
                )?),
                None => None,
            });
        }
        Ok(Self {
            nodes: vec![NodeEvents::default(); topo.nodes.len()],
            files,
        })
    }

    /// Node `who` said `line` at `t` seconds into the run.
    fn note(&mut self, who: usize, line: &str, t: f64) {
        if let Some(f) = self.files[who].as_mut() {
            let _ = writeln!(f, "{t:.3} {line}");
        }
        self.nodes[who].note(line, t);
    }
}

/// Runs one transfer of `opts.bytes` over `topo` with the binary `bin`.
pub fn run_transfer(topo: &Topology, bin: &Path, opts: &RunOptions) -> Result<RunReport> {
    let floor =
        bound::floor(&topo.with_upload_caps_as_links(), opts.bytes).map_err(anyhow::Error::msg)?;
    let (cleanup, src) = ScratchDir::with_test_file("run", topo, opts.bytes, opts.files)?;
    let work = cleanup.0.clone();
    let files = RunFiles {
        log_dir: opts.logs.clone().unwrap_or_else(|| work.clone()),
        src,
        work,
    };
    std::fs::create_dir_all(&files.log_dir)
        .with_context(|| format!("creating the log directory {}", files.log_dir.display()))?;
    let mut seen = Seen::new(topo, opts.logs.as_deref())?;
    let want = file_hash(&files.src).context("hashing the source file")?;

    netns::ensure_host_bpffs()?;
    let mut bed = Testbed::up(topo)?;
    let late = late_joiners(&bed, topo, opts)?;
    for &(n, _) in &late {
        reach_source(&bed, topo, n, false)?;
    }
    // Other people's traffic first, measured alone, then left running.
    let mut cross = CrossTraffic::start(topo, &bed);
    let swarm = start_swarm(&mut bed, topo, bin, opts, &files, &mut seen)?;
    let s = topo.source();
    let timeout = opts
        .timeout
        .unwrap_or_else(|| default_timeout(floor.u_min_s));
    let running = Running {
        send: swarm.send,
        recvs: &swarm.recvs,
        rx: &swarm.rx,
        started: swarm.started,
        late: &late,
    };
    let Watched {
        send_status,
        machine_cpu_at_u,
    } = running.watch(topo, &mut bed, &mut seen, &mut cross, timeout, opts)?;
    let link_tx = link_tx_bytes(topo, &bed);
    let send_exit_ok = send_status.is_some_and(|s| s.success());
    let delay_line_cpu_s = bed.delay_line_cpu_s() - swarm.delay_cpu_at_start;
    cross.stop();
    bed.down();
    let seen = seen.nodes;
    let outcomes = dest_outcomes(topo, &seen, |d| {
        file_hash(&files.out(topo, d)) == Some(want)
    });
    let all_ok = outcomes.iter().all(|o| o.verified && o.elapsed_s.is_some());
    let u = all_ok.then(|| {
        outcomes
            .iter()
            .filter_map(|o| o.elapsed_s)
            .fold(0.0, f64::max)
    });
    if !all_ok && !opts.quiet {
        print_log_tails(topo, |name| files.log(name));
    }
    drop(cleanup);
    let timeline = timeline(topo, &seen, opts.bytes, floor.u_min_s, u);
    let idle = crate::idle::idle_while_needed(&timeline);
    let cross = cross.report(topo, u);
    let u_min_left_s = u.and_then(|_| floor_left_by(topo, &cross, opts.bytes));
    let picture = match &opts.picture {
        Some(path) => Some(write_picture(&timeline, path)?),
        None => None,
    };
    Ok(RunReport {
        ratio_left: u.zip(u_min_left_s).map(|(u, f)| u / f),
        u_min_left_s,
        cross,
        delay_line_cpu_s,
        picture,
        topology: topo.name.clone(),
        bytes: opts.bytes,
        dests: outcomes,
        u_s: u,
        u_min_s: floor.u_min_s,
        u_min_wire_s: floor.u_min_wire_s,
        ratio: u.map(|u| u / floor.u_min_s),
        u_min_routed_s: floor.u_min_routed_s,
        ratio_routed: u.zip(floor.u_min_routed_s).map(|(u, r)| u / r),
        send_exit_ok,
        source_peak_rss_bytes: seen[s].peak_rss_bytes,
        source_cpu_s: seen[s].cpu_s,
        first_chunk_s: seen[s].first_chunk_s,
        machine_cpu_s: machine_cpu_at_u.map(|c| c - swarm.machine_cpu_at_start),
        link_copies: link_copies(topo, &link_tx, opts.bytes),
        idle_s: idle.iter().fold(0.0, |sum, l| sum + l.seconds),
        source_idle_s: idle
            .iter()
            .filter(|l| l.from == topo.nodes[s].name)
            .fold(0.0, |sum, l| sum + l.seconds),
        idle,
    })
}

/// Preference of the rule that keeps a late joiner from the source (any free number).
const LATE_JOIN_RULE_PREF: &str = "100";

/// `opts.join_late` as (node, seconds), sorted by time: each name a destination's.
fn late_joiners(bed: &Testbed, topo: &Topology, opts: &RunOptions) -> Result<Vec<(usize, f64)>> {
    let mut late = Vec::new();
    for (name, at_s) in &opts.join_late {
        let Some(n) = bed.node_index(name) else {
            bail!("--join-late {name}: {} has no node of that name", topo.name);
        };
        if !topo.destinations().contains(&n) {
            bail!("--join-late {name}: only a destination can join late");
        }
        late.push((n, *at_s));
    }
    late.sort_by(|a, b| a.1.total_cmp(&b.1));
    Ok(late)
}

/// Lets `node`'s own packets reach the source (`reach`), or drops them (a blackhole rule
/// for locally sent packets, both families: forwarding is untouched).
fn reach_source(bed: &Testbed, topo: &Topology, node: usize, reach: bool) -> Result<()> {
    let s = topo.source();
    let verb = if reach { "del" } else { "add" };
    let ns = bed.netns(node);
    for (family, to) in [
        ("-4", identity_addr(s).to_string()),
        ("-6", netns::identity_addr6(s).to_string()),
    ] {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &ns, family, "rule", verb, "iif", "lo", "to", &to])
            .args(["blackhole", "pref", LATE_JOIN_RULE_PREF]);
        netns::run(&mut cmd, None)?;
    }
    Ok(())
}

/// The swarm's processes, started: the destinations, then (once all are ready) the source.
struct Swarm {
    send: usize,
    recvs: Vec<usize>,
    /// Every process's stdout lines, with the node that printed each.
    rx: mpsc::Receiver<(usize, String)>,
    /// When the source was started, and the CPU counters then.
    started: Instant,
    delay_cpu_at_start: f64,
    machine_cpu_at_start: f64,
}

/// Where one run's files are.
struct RunFiles {
    /// The file (or tree) the source sends.
    src: PathBuf,
    /// The run's scratch directory: each destination's copy.
    work: PathBuf,
    /// Each node's log (`<name>.log`).
    log_dir: PathBuf,
}

impl RunFiles {
    fn out(&self, topo: &Topology, d: usize) -> PathBuf {
        self.work.join(format!("{}.out", topo.nodes[d].name))
    }

    fn log(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }
}

/// Starts `recv` on every destination and, once all say they are ready, `send` on the
/// source, under a token new for this run; each one's stderr goes to its log file.
fn start_swarm(
    bed: &mut Testbed,
    topo: &Topology,
    bin: &Path,
    opts: &RunOptions,
    files: &RunFiles,
    seen: &mut Seen,
) -> Result<Swarm> {
    let log_file = |name: &str| std::fs::File::create(files.log(name));
    // A token of a real one's strength (floodclone refuses short ones), new every run.
    let token = format!(
        "floodclone-run-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    let s = topo.source();
    let dests = topo.destinations();
    let addr_of = |n: usize| {
        if opts.ipv6 {
            netns::identity_addr6(n).to_string()
        } else {
            identity_addr(n).to_string()
        }
    };
    let (tx, rx) = mpsc::channel();
    let mut recvs = Vec::new();
    for &d in &dests {
        let mut cmd = bed.command(d, bin.to_str().unwrap());
        cmd.args(["recv", "--json", "--token", &token, "--source"])
            .arg(addr_of(s))
            .arg("--out")
            .arg(files.out(topo, d))
            .args(&opts.recv_args)
            .args(cap_args(topo, d))
            .stdout(Stdio::piped())
            .stderr(log_file(&topo.nodes[d].name)?);
        let h = bed.spawn(cmd)?;
        pipe_lines(bed.child(h), d, tx.clone());
        recvs.push(h);
    }
    wait_until_ready(bed, &recvs, &dests, &rx, seen)?;
    let mut cmd = bed.command(s, bin.to_str().unwrap());
    cmd.args(["send", "--json", "--token", &token])
        .arg(&files.src)
        .args(
            dests
                .iter()
                .flat_map(|&d| ["--dest".to_string(), addr_of(d)]),
        )
        .args(&opts.send_args)
        .args(cap_args(topo, s))
        .stdout(Stdio::piped())
        .stderr(log_file(&topo.nodes[s].name)?);
    let started = Instant::now();
    let delay_cpu_at_start = bed.delay_line_cpu_s();
    let machine_cpu_at_start = crate::traffic::machine_busy_s();
    let send = bed.spawn(cmd)?;
    pipe_lines(bed.child(send), s, tx);
    Ok(Swarm {
        send,
        recvs,
        rx,
        started,
        delay_cpu_at_start,
        machine_cpu_at_start,
    })
}

/// The processes of a running transfer and where their lines arrive.
struct Running<'a> {
    send: usize,
    recvs: &'a [usize],
    rx: &'a mpsc::Receiver<(usize, String)>,
    started: Instant,
    /// Late joiners and when each may reach the source, by time.
    late: &'a [(usize, f64)],
}

/// What watching a transfer gave: `send`'s exit status (none if it outlived the timeout)
/// and the machine's busy seconds when the source had heard every destination done.
struct Watched {
    send_status: Option<std::process::ExitStatus>,
    machine_cpu_at_u: Option<f64>,
}

impl Running<'_> {
    /// Until `send` exits or `timeout` passes: the topology's timed events applied on time,
    /// every node's lines noted, each destination's share printed every second, the cross
    /// traffic sampled. Then the destinations have 5 s to hear the swarm end and exit, and
    /// their last lines are noted.
    fn watch(
        &self,
        topo: &Topology,
        bed: &mut Testbed,
        seen: &mut Seen,
        cross: &mut CrossTraffic,
        timeout: Duration,
        opts: &RunOptions,
    ) -> Result<Watched> {
        let (s, dests) = (topo.source(), topo.destinations());
        let mut events = topo.events.clone().into_iter().peekable();
        let mut late = self.late.iter().peekable();
        let mut send_status = None;
        let mut machine_cpu_at_u = None;
        let mut last_live = Instant::now();
        let t = || self.started.elapsed().as_secs_f64();
        while send_status.is_none() && self.started.elapsed() < timeout {
            while let Some(e) = events.next_if(|e| t() >= e.at_s) {
                apply_event(topo, bed, &e, t(), opts.quiet)?;
            }
            while let Some(&(n, _)) = late.next_if(|(_, at)| t() >= *at) {
                reach_source(bed, topo, n, true)?;
                if !opts.quiet {
                    eprintln!("t={:.2} s: {} reaches the source", t(), topo.nodes[n].name);
                }
            }
            while let Ok((who, line)) = self.rx.try_recv() {
                seen.note(who, &line, t());
            }
            if !opts.quiet && last_live.elapsed() >= Duration::from_secs(1) {
                last_live = Instant::now();
                print_live_shares(topo, &dests, &seen.nodes, opts.bytes, t());
            }
            cross.sample(t());
            if machine_cpu_at_u.is_none() && seen.nodes[s].dest_done_at.len() == dests.len() {
                machine_cpu_at_u = Some(crate::traffic::machine_busy_s());
            }
            send_status = bed.child(self.send).try_wait()?;
            std::thread::sleep(Duration::from_millis(10));
        }
        let grace = Instant::now() + Duration::from_secs(5);
        for &h in self.recvs {
            while bed.child(h).try_wait()?.is_none() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        while let Ok((who, line)) = self.rx.recv_timeout(Duration::from_millis(100)) {
            seen.note(who, &line, t());
        }
        Ok(Watched {
            send_status,
            machine_cpu_at_u,
        })
    }
}

/// Applies the topology's timed event `e` to its link, `t` s into the transfer.
fn apply_event(
    topo: &Topology,
    bed: &mut Testbed,
    e: &crate::topology::Event,
    t: f64,
    quiet: bool,
) -> Result<()> {
    bed.apply(e.link, &e.action)?;
    if !quiet {
        let l = &topo.links[e.link];
        eprintln!(
            "  t={t:.2}s link {}-{}: {:?}",
            topo.nodes[l.a].name, topo.nodes[l.b].name, e.action
        );
    }
    Ok(())
}

/// The run's picture (SVG) at `path`.
fn write_picture(timeline: &crate::picture::Timeline, path: &Path) -> Result<PathBuf> {
    let svg = crate::picture::render(timeline);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.to_path_buf())
}

/// U is what a user waits after starting `floodclone send`, with the destinations
/// already running (as services would be): each must first say it is ready (its eBPF
/// programs loaded), at most `READY_WITHIN`, unless one exits first.
fn wait_until_ready(
    bed: &mut Testbed,
    recv_handles: &[usize],
    dests: &[usize],
    rx: &mpsc::Receiver<(usize, String)>,
    seen: &mut Seen,
) -> Result<()> {
    let ready_by = Instant::now() + READY_WITHIN;
    while dests.iter().any(|&d| !seen.nodes[d].ready) && Instant::now() < ready_by {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok((who, line)) => seen.note(who, &line, 0.0),
            Err(_) => {
                let mut exited = false;
                for &h in recv_handles {
                    exited |= bed.child(h).try_wait()?.is_some();
                }
                if exited {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Live: each destination's share, from its progress events.
fn print_live_shares(topo: &Topology, dests: &[usize], seen: &[NodeEvents], bytes: u64, t: f64) {
    let pct = |d: usize| {
        let held = seen[d].progress.last().map_or(0, |p| p.1);
        if bytes == 0 {
            100.0
        } else {
            held as f64 * 100.0 / bytes as f64
        }
    };
    eprintln!(
        "  t={t:5.1}s  {}",
        live_shares(
            &dests
                .iter()
                .map(|&d| (topo.nodes[d].name.as_str(), pct(d)))
                .collect::<Vec<_>>()
        )
    );
}

/// What every link direction carried on the wire ([`Testbed::tx_bytes`]: its shaping's
/// count), read before the testbed goes (sender, receiver, bytes). Not the members' eBPF
/// counters: those count at tc egress, before the link's queue, so what that queue dropped
/// would count as carried (random-213: d1 -> r2 "carried" 1.47 copies by them in 21.3 s,
/// more than its 15 Mbit/s can carry in that time, 1.19; its two connections had lost 21%
/// and 24% of their packets in d1's own queue). Routers run no floodclone to count anyway.
fn link_tx_bytes(topo: &Topology, bed: &Testbed) -> Vec<(usize, usize, u64)> {
    topo.links
        .iter()
        .flat_map(|l| [(l.a, l.b), (l.b, l.a)])
        .filter_map(|(u, v)| bed.tx_bytes(u, v).map(|b| (u, v, b)))
        .collect()
}

/// Each destination's time (the source's count, else its own) and whether its copy
/// `verified`.
fn dest_outcomes(
    topo: &Topology,
    seen: &[NodeEvents],
    verified: impl Fn(usize) -> bool,
) -> Vec<DestOutcome> {
    let s = topo.source();
    topo.destinations()
        .iter()
        .enumerate()
        .map(|(i, &d)| DestOutcome {
            name: topo.nodes[d].name.clone(),
            // Member ids are 1.. in the order of `--dest`.
            elapsed_s: seen[s]
                .dest_done_at
                .get(&(i as MemberId + 1))
                .copied()
                .or(seen[d].elapsed_s),
            verified: verified(d),
            duplicates: seen[d].duplicates,
            peak_rss_bytes: seen[d].peak_rss_bytes,
            cpu_s: seen[d].cpu_s,
        })
        .collect()
}

/// The end of each log: what a node said last is what tells why it stopped or stalled,
/// and thirty whole logs bury it (a CI log keeps its head and tail only).
fn print_log_tails(topo: &Topology, log_path: impl Fn(&str) -> PathBuf) {
    for (i, n) in topo.nodes.iter().enumerate() {
        let p = log_path(&n.name);
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let keep = if i == topo.source() {
            FAILED_LOG_LINES * 4
        } else {
            FAILED_LOG_LINES
        };
        if let Some(tail) = last_lines(&text, keep) {
            eprintln!("--- {} (last {keep} lines at most):\n{tail}", p.display());
        }
    }
}

/// What the picture and the idle measure read: every destination's holdings and the
/// bytes each member sent per link direction over time (interfaces are `v-<peer>`).
fn timeline<'a>(
    topo: &'a Topology,
    seen: &[NodeEvents],
    bytes: u64,
    u_min_s: f64,
    u_s: Option<f64>,
) -> crate::picture::Timeline<'a> {
    let name_of = |n: &str| topo.nodes.iter().position(|x| x.name == n);
    let mut tx = Vec::new();
    for (u, ev) in seen.iter().enumerate() {
        for (iface, samples) in &ev.tx_timeline {
            if let Some(v) = iface.strip_prefix("v-").and_then(name_of) {
                tx.push(((u, v), samples.clone()));
            }
        }
    }
    tx.sort_by_key(|x| x.0);
    crate::picture::Timeline {
        topo,
        bytes,
        u_min_s,
        u_s,
        progress: topo
            .destinations()
            .iter()
            .map(|&d| (d, seen[d].progress.clone()))
            .collect(),
        tx,
    }
}

/// Wire bytes over file bytes for every link direction (`link_tx`: sender, receiver,
/// bytes), most first.
fn link_copies(
    topo: &Topology,
    link_tx: &[(usize, usize, u64)],
    bytes: u64,
) -> Vec<(String, String, f64)> {
    if bytes == 0 {
        return Vec::new();
    }
    let mut out: Vec<(String, String, f64)> = link_tx
        .iter()
        .map(|&(u, v, tx)| {
            (
                topo.nodes[u].name.clone(),
                topo.nodes[v].name.clone(),
                tx as f64 / bytes as f64,
            )
        })
        .collect();
    out.sort_by(|a, b| b.2.total_cmp(&a.2));
    out
}

/// What a node's JSON events said.
#[derive(Clone, Debug, Default)]
struct NodeEvents {
    /// Said it is ready (start-up work done).
    ready: bool,
    elapsed_s: Option<f64>,
    /// At the source: member id -> seconds from its start until that member was done.
    dest_done_at: std::collections::HashMap<MemberId, f64>,
    duplicates: Option<u64>,
    peak_rss_bytes: Option<u64>,
    /// CPU seconds the process used (user + system), as it reported at its end.
    cpu_s: Option<f64>,
    /// At the source: when its first chunk left, seconds after it started.
    first_chunk_s: Option<f64>,
    /// (t, bytes held), from progress events, t on the run's clock.
    progress: Vec<(f64, u64)>,
    /// Per interface: (t, bytes sent so far).
    tx_timeline: std::collections::BTreeMap<String, Vec<(f64, u64)>>,
}

impl NodeEvents {
    /// Notes one JSON line received at `t` seconds into the run.
    fn note(&mut self, line: &str, t: f64) {
        let Some(event) = Event::parse(line) else {
            return;
        };
        let mut sent = |tx: &TxBytesByIface| {
            for (iface, &b) in tx {
                self.tx_timeline
                    .entry(iface.clone())
                    .or_default()
                    .push((t, b));
            }
        };
        match event {
            Event::Progress(Progress::Destination {
                bytes,
                tx_bytes_by_iface,
                ..
            }) => {
                sent(&tx_bytes_by_iface);
                self.progress.push((t, bytes));
            }
            Event::Progress(Progress::Source {
                tx_bytes_by_iface, ..
            }) => sent(&tx_bytes_by_iface),
            Event::Complete {
                elapsed_s,
                duplicates,
                bytes,
                ..
            } => {
                self.elapsed_s = Some(elapsed_s);
                self.duplicates = Some(duplicates);
                self.progress.push((t, bytes));
            }
            Event::Ready { .. } => self.ready = true,
            Event::DestDone { member, at_s, .. } => {
                self.dest_done_at.insert(member, at_s);
            }
            Event::SwarmDone(done) => {
                let (peak_rss_bytes, cpu_s, first_chunk_s, tx_bytes_by_iface) = match done {
                    SwarmDone::Source {
                        peak_rss_bytes,
                        cpu_s,
                        first_chunk_s,
                        tx_bytes_by_iface,
                        ..
                    } => (peak_rss_bytes, cpu_s, first_chunk_s, tx_bytes_by_iface),
                    SwarmDone::Destination {
                        peak_rss_bytes,
                        cpu_s,
                        tx_bytes_by_iface,
                    } => (peak_rss_bytes, cpu_s, None, tx_bytes_by_iface),
                };
                sent(&tx_bytes_by_iface);
                self.peak_rss_bytes = Some(peak_rss_bytes);
                self.cpu_s = Some(cpu_s);
                self.first_chunk_s = first_chunk_s;
            }
            _ => {}
        }
    }
}

/// Removes the run's scratch directory when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    /// A fresh scratch directory for a `kind` of run over `topo`, holding the file to send
    /// (`source.bin`, `bytes` of the same pseudo-random data for every kind), or with
    /// `files` over 1 a directory of that many files (`source.tree`).
    fn with_test_file(
        kind: &str,
        topo: &Topology,
        bytes: u64,
        files: u64,
    ) -> Result<(Self, PathBuf)> {
        // Unique per call, not only per process and topology: two tests of one binary run
        // the same topology at once, and each would remove the other's files.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let work = std::env::temp_dir().join(format!(
            "floodclone-{kind}-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            topo.name
        ));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let dir = Self(work.clone());
        if files > 1 {
            let src = work.join("source.tree");
            write_test_files(&src, bytes, files, 0x5eed ^ bytes)?;
            return Ok((dir, src));
        }
        let src = work.join("source.bin");
        write_test_file(&src, bytes, 0x5eed ^ bytes)?;
        Ok((dir, src))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Human-readable report.
pub fn render(r: &RunReport) -> String {
    let mut s = format!("{} ({} bytes)\n", r.topology, r.bytes);
    for d in &r.dests {
        let t = d.elapsed_s.map_or("-".into(), |t| format!("{t:7.2} s"));
        s += &format!(
            "  {:6} {:>10}  {}{}\n",
            d.name,
            t,
            if d.verified {
                "verified"
            } else {
                "MISSING OR CORRUPT"
            },
            d.duplicates
                .map_or(String::new(), |n| format!("  duplicates {n}"))
        );
    }
    if let Some((from, to, c)) = r.link_copies.first() {
        s += &format!("  busiest link direction: {from}->{to} carried {c:.2} copies (wire bytes / file bytes)\n");
    }
    let worst: Vec<String> = r
        .idle
        .iter()
        .take(3)
        .map(|l| format!("{}->{} {:.1} s", l.from, l.to, l.seconds))
        .collect();
    s += &format!(
        "  idle while needed: {:.1} s in all, {:.1} s on the source's links{}{}\n",
        r.idle_s,
        r.source_idle_s,
        if worst.is_empty() { "" } else { "; worst: " },
        worst.join(", ")
    );
    match (r.u_s, r.ratio) {
        (Some(u), Some(ratio)) => {
            s += &format!(
                "U = {u:.2} s   U_min = {:.2} s   U/U_min = {ratio:.3}   (U/U_min wire-aware = {:.3})\n",
                r.u_min_s,
                u / r.u_min_wire_s
            )
        }
        _ => s += &format!("FAILED: not every copy arrived verified (U_min = {:.2} s)\n", r.u_min_s),
    }
    for c in &r.cross {
        s += &format!(
            "  TCP {}->{} on a {} Mbit/s link: {:.1} Mbit/s alone, {:.1} during the transfer ({:.0}% of the link)\n",
            c.from,
            c.to,
            c.link_mbit,
            c.before_mbit,
            c.during_mbit,
            100.0 * c.during_share()
        );
    }
    if let (Some(left), Some(ratio)) = (r.u_min_left_s, r.ratio_left) {
        s += &format!(
            "  on the capacity the TCP flows left, U_min = {left:.2} s: U/U_min left = {ratio:.3}\n"
        );
    }
    if r.delay_line_cpu_s > 0.0 {
        s += &format!(
            "  the delay lines used {:.1} CPU s{}\n",
            r.delay_line_cpu_s,
            r.u_s.map_or(String::new(), |u| format!(
                " ({:.0}% of one core)",
                100.0 * r.delay_line_cpu_s / u
            ))
        );
    }
    // Routers forward along one route each: a max-flow that needs other paths is out of
    // reach, and this floor says how far.
    if let (Some(routed), Some(u)) = (r.u_min_routed_s, r.u_s) {
        if routed > r.u_min_s * 1.001 {
            s += &format!(
                "  along the routers' routes the floor is {routed:.2} s: U/U_min routed = {:.3}\n",
                u / routed
            );
        }
    }
    s
}

/// Lines of a failed run's node log shown (the source's: four times as many).
const FAILED_LOG_LINES: usize = 15;
/// Up to this many destinations, the live line names each; beyond, it summarises.
const LIVE_NAMED_MAX: usize = 12;

/// The last `n` lines of `text`, or None when it is empty.
pub fn last_lines(text: &str, n: usize) -> Option<String> {
    let lines: Vec<&str> = text.trim().lines().collect();
    (!lines.is_empty()).then(|| lines[lines.len().saturating_sub(n)..].join("\n"))
}

/// One live progress line: each destination's share, or for many of them the least, the
/// median, the most, and how many are done.
fn live_shares(shares: &[(&str, f64)]) -> String {
    if shares.len() <= LIVE_NAMED_MAX {
        let named: Vec<String> = shares
            .iter()
            .map(|(n, p)| format!("{n} {p:3.0}%"))
            .collect();
        return named.join("  ");
    }
    let mut pcts: Vec<f64> = shares.iter().map(|s| s.1).collect();
    pcts.sort_by(f64::total_cmp);
    let done = pcts.iter().filter(|&&p| p >= 100.0).count();
    format!(
        "{} destinations: least {:3.0}%  median {:3.0}%  most {:3.0}%  done {done}",
        pcts.len(),
        pcts[0],
        pcts[pcts.len() / 2],
        pcts[pcts.len() - 1]
    )
}

/// Fails unless every destination holds a verified copy.
pub fn check(r: &RunReport) -> Result<()> {
    if r.u_s.is_none() || !r.send_exit_ok {
        bail!("transfer on {} failed:\n{}", r.topology, render(r));
    }
    Ok(())
}

pub fn member_count(topo: &Topology) -> usize {
    topo.nodes.iter().filter(|n| n.role != Role::Router).count()
}

/// How long a transfer whose floor is `u_min_s` may take before it is given up: ten times
/// the floor, and a minute for the start.
fn default_timeout(u_min_s: f64) -> Duration {
    Duration::from_secs_f64(u_min_s * 10.0 + 60.0)
}

/// A baseline copy of the file from the source to every destination at once, on the same
/// testbed a run uses: the bench's baselines of speed and CPU cost.
#[derive(Clone, Debug)]
pub enum Baseline {
    /// A plain TCP copy ([`crate::traffic::tcp_copy`]).
    Tcp,
    /// A bare QUIC copy with this `quic_copy` program ([`crate::traffic::quic_copy`]).
    Quic(PathBuf),
    /// The same with every byte hashed at both ends and stored by each receiver: the
    /// floor of a verified, stored copy over this transport.
    QuicChecked(PathBuf),
}

impl Baseline {
    /// The name of its runs in the bench's JSON lines.
    pub fn mode(&self) -> &'static str {
        match self {
            Baseline::Tcp => "tcp",
            Baseline::Quic(_) => "quic",
            Baseline::QuicChecked(_) => "quic-checked",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CopyReport {
    pub topology: String,
    pub bytes: u64,
    /// The last receiver's time, over the floor.
    pub u_s: f64,
    pub ratio: f64,
    /// CPU seconds of the copy's threads or processes (user + system) per GiB delivered
    /// (file size times receivers), and the whole machine's busy seconds per GiB delivered.
    pub cpu_s_per_gib: f64,
    pub machine_cpu_s_per_gib: f64,
}

/// Runs `baseline` with a file of `bytes` over `topo`.
pub fn run_copy(topo: &Topology, bytes: u64, baseline: &Baseline) -> Result<CopyReport> {
    let floor =
        bound::floor(&topo.with_upload_caps_as_links(), bytes).map_err(anyhow::Error::msg)?;
    let (scratch, src) = ScratchDir::with_test_file(baseline.mode(), topo, bytes, 1)?;
    let work = scratch.0.clone();
    netns::ensure_host_bpffs()?;
    let mut bed = Testbed::up(topo)?;
    let (from, to) = (topo.source(), topo.destinations());
    let copy = match baseline {
        Baseline::Tcp => crate::traffic::tcp_copy(&bed, &src, from, &to, &work),
        Baseline::Quic(program) | Baseline::QuicChecked(program) => {
            let deadline = default_timeout(floor.u_min_s);
            let checked_into = matches!(baseline, Baseline::QuicChecked(_)).then_some(&*work);
            crate::traffic::quic_copy(&mut bed, program, &src, from, &to, checked_into, deadline)
        }
    };
    bed.down();
    let copy = copy?;
    let u_s = copy.done_s.iter().copied().fold(0.0, f64::max);
    let gib = bytes as f64 * copy.done_s.len() as f64 / (1u64 << 30) as f64;
    Ok(CopyReport {
        topology: topo.name.clone(),
        bytes,
        u_s,
        ratio: u_s / floor.u_min_s,
        cpu_s_per_gib: copy.cpu_s / gib,
        machine_cpu_s_per_gib: copy.machine_cpu_s / gib,
    })
}
