//! Helpers shared by the end-to-end tests: root checks, the release `floodclone` binary, and
//! traffic generators owned by the tests.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::OnceLock,
    time::{Duration, Instant},
};

use floodclone_events::Event;
use floodclone_testbed::{
    netns::{self, identity_addr},
    run::{RunOptions, RunReport},
    Testbed, Topology,
};

/// The swarm token every test process uses (a real one must be at least 16 characters).
pub const TOKEN: &str = "floodclone-tests-token";

/// True when the test may touch namespaces and BPF; otherwise prints why it skips.
pub fn root_or_skip(test: &str) -> bool {
    if netns::is_root() {
        let _ = netns::remove_stale();
        let _ = netns::ensure_host_bpffs();
        true
    } else {
        eprintln!("SKIP {test}: needs root (network namespaces, veth, tc, BPF); run as root");
        false
    }
}

/// The release `floodclone` binary: the one `cargo xtask test` built, else built once per
/// test process.
pub fn floodclone_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        floodclone_testbed::build::floodclone_binary_for_tests().expect("building floodclone")
    })
    .clone()
}

/// Sends TCP from node `from` to node `to` for `secs`; returns the payload rate in Mbit/s
/// the receiver saw after a warm-up.
pub fn tcp_rate_mbit(bed: &Testbed, from: usize, to: usize, secs: f64) -> f64 {
    floodclone_testbed::traffic::tcp_transfer(bed, from, to, secs).0
}

/// The identity address of `node`.
pub fn addr(node: usize) -> Ipv4Addr {
    identity_addr(node)
}

/// A topology shipped in `topologies/`.
pub fn shipped(name: &str) -> Topology {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../topologies")
        .join(format!("{name}.toml"));
    Topology::load(&path).unwrap()
}

/// Runs one transfer and fails the test unless every copy arrived verified.
pub fn transfer(topo: &Topology, opts: &RunOptions) -> RunReport {
    use floodclone_testbed::run;
    let report = run::run_transfer(topo, &floodclone_bin(), opts).unwrap();
    eprint!("{}", run::render(&report));
    run::check(&report).unwrap();
    report
}

/// A floodclone process in a testbed node, with its JSON events on a channel.
pub struct NodeProc {
    pub handle: usize,
    pub events: std::sync::mpsc::Receiver<Event>,
    pub stderr: PathBuf,
}

/// Starts `floodclone ARGS --json` in `node`'s namespace.
pub fn start(
    bed: &mut Testbed,
    node: usize,
    args: &[String],
    scratch: &std::path::Path,
) -> NodeProc {
    start_with(bed, node, args, scratch, true)
}

/// Starts `floodclone ARGS` in `node`'s namespace, with `--json` or as a person would
/// (plain lines on stderr, no events).
pub fn start_with(
    bed: &mut Testbed,
    node: usize,
    args: &[String],
    scratch: &std::path::Path,
    json: bool,
) -> NodeProc {
    use std::{io::BufRead, process::Stdio};
    let stderr = scratch.join(format!("{}-{}.err", bed.topo.nodes[node].name, args[0]));
    let mut cmd = bed.command(node, floodclone_bin().to_str().unwrap());
    cmd.args(args);
    if json {
        cmd.arg("--json");
    }
    cmd.stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap());
    let handle = bed.spawn(cmd).unwrap();
    let out = bed.child(handle).stdout.take().unwrap();
    let (tx, events) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(event) = Event::parse(&line) {
                if tx.send(event).is_err() {
                    break;
                }
            }
        }
    });
    NodeProc {
        handle,
        events,
        stderr,
    }
}

impl NodeProc {
    /// Waits up to `secs` for the first event `pick` takes.
    pub fn wait_for<T>(&self, secs: f64, pick: impl Fn(Event) -> Option<T>) -> Option<T> {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.events.recv_timeout(left) {
                Ok(e) => {
                    if let Some(t) = pick(e) {
                        return Some(t);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// Waits for an event named `name`, up to `secs`.
    pub fn wait_event(&self, name: &str, secs: f64) -> Option<Event> {
        self.wait_for(secs, |e| (e.name() == name).then_some(e))
    }

    /// Waits for the process to exit, up to `secs`; `None` if it is still running.
    pub fn wait_exit(&self, bed: &mut Testbed, secs: f64) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < end {
            if let Some(st) = bed.child(self.handle).try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The last `n` lines of its stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        floodclone_testbed::run::last_lines(&self.stderr_text(), n).unwrap_or_default()
    }

    /// Waits up to `secs` for the `complete` event; fails naming `who`, with its stderr.
    pub fn expect_complete(&self, who: &str, secs: f64) -> Completion {
        self.complete_within(secs)
            .unwrap_or_else(|| panic!("{who} did not complete: {}", self.stderr_text()))
    }

    /// Waits up to `secs` for the `complete` event.
    pub fn complete_within(&self, secs: f64) -> Option<Completion> {
        self.wait_for(secs, |e| match e {
            Event::Complete {
                received_chunks,
                resumed_chunks,
                ..
            } => Some(Completion {
                received_chunks,
                resumed_chunks,
            }),
            _ => None,
        })
    }
}

/// What a destination's `complete` event counted.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub received_chunks: u64,
    pub resumed_chunks: u32,
}

/// Fails unless every file in `outs` holds exactly the bytes of `src`.
pub fn assert_copies(src: &std::path::Path, outs: impl IntoIterator<Item = PathBuf>) {
    let want = std::fs::read(src).unwrap();
    for out in outs {
        assert!(
            std::fs::read(&out).unwrap() == want,
            "{} differs from the source",
            out.display()
        );
    }
}

/// A tree under `root` of every kind of entry a tree may hold: nested directories, an
/// empty directory, empty files, small files packed several to a chunk, files larger than
/// a chunk, a symlink inside the tree, modes and modification times of their own. `big`
/// bytes in its largest file; contents from `seed`.
pub fn write_test_tree(root: &std::path::Path, big: u64, seed: u64) {
    use std::{fs, os::unix::fs::PermissionsExt};
    let _ = fs::remove_dir_all(root);
    for d in ["etc/conf.d", "lib/deep/er/still", "empty-dir"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    let files: Vec<(String, u64)> = (0..40)
        .map(|i| (format!("etc/conf.d/small-{i:02}"), 100 + 997 * i))
        .chain([
            ("lib/deep/er/still/weights.bin".to_string(), big),
            ("lib/second.bin".to_string(), big / 3 + 12345),
            ("etc/empty".to_string(), 0),
            ("README".to_string(), 1),
        ])
        .collect();
    for (i, (path, size)) in files.iter().enumerate() {
        floodclone_testbed::run::write_test_file(&root.join(path), *size, seed + i as u64).unwrap();
    }
    std::os::unix::fs::symlink("deep/er/still/weights.bin", root.join("lib/current")).unwrap();
    let chmod =
        |p: &str, m: u32| fs::set_permissions(root.join(p), fs::Permissions::from_mode(m)).unwrap();
    chmod("README", 0o444);
    chmod("lib/second.bin", 0o755);
    chmod("etc/conf.d/small-07", 0o600);
    chmod("lib/deep", 0o750);
    // Distinct modification times, set last (writing into a directory changes its own).
    for (k, p) in [
        "README",
        "lib/second.bin",
        "etc",
        "lib/deep/er",
        "empty-dir",
        "lib/current",
    ]
    .iter()
    .enumerate()
    {
        let t = std::process::Command::new("touch")
            .args([
                "-h",
                "-d",
                &format!("2024-0{}-1{k} 12:34:56.{k}23456789", k + 1),
            ])
            .arg(root.join(p))
            .status()
            .unwrap();
        assert!(t.success());
    }
}

/// Fails unless every tree in `outs` is `src`'s, entry by entry: the same names and kinds,
/// sizes, modes, modification times and link targets (as the source lists them), and every
/// file's bytes.
pub fn assert_tree_copies(src: &std::path::Path, outs: impl IntoIterator<Item = PathBuf>) {
    use floodclone::tree::{EntryKind, Tree};
    let want = Tree::scan(src).unwrap();
    for out in outs {
        let got = Tree::scan(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        for (w, g) in want.entries().iter().zip(got.entries()) {
            assert_eq!(w, g, "{} differs from the source", out.display());
        }
        assert_eq!(
            want.entries().len(),
            got.entries().len(),
            "{}",
            out.display()
        );
        for e in want.entries() {
            if let EntryKind::File { .. } = e.kind {
                assert!(
                    std::fs::read(src.join(&e.path)).unwrap()
                        == std::fs::read(out.join(&e.path)).unwrap(),
                    "{}/{} differs from the source",
                    out.display(),
                    e.path
                );
            }
        }
    }
}

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("fc-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // FC_KEEP=1 keeps logs and files for a post-mortem.
        if std::env::var_os("FC_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Routes that differ by direction (fewest hops, then widest): d3 reaches d1 through member
/// d2 (30 Mbit/s that way), while d1 reaches d3 through router r (50 Mbit/s that way). d3's
/// own routes hide d1; only d1's trace shows its path to d3 crosses no member. Without it
/// d3 gets d1's data only through d2's 10 Mbit/s, and d1 -> r carries none. Nodes: s 0,
/// d1 1, d2 2, d3 3, r 4.
pub fn routes_differ_by_direction() -> Topology {
    Topology::parse(
        "routes-differ-by-direction",
        r#"node = [{name="s",role="source"},{name="d1",role="dest"},{name="d2",role="dest"},
                   {name="d3",role="dest"},{name="r",role="router"}]
           link = [{a="s",b="d1",mbit=40},
                   {a="d1",b="r",mbit_ab=50,mbit_ba=5},{a="r",b="d3",mbit_ab=50,mbit_ba=5},
                   {a="d1",b="d2",mbit_ab=10,mbit_ba=30},{a="d2",b="d3",mbit_ab=10,mbit_ba=30}]"#,
    )
    .unwrap()
}

/// A chain of `names` (the first is the source), every link at `mbit` both ways.
pub fn line(names: &[&str], mbit: u32) -> Topology {
    let nodes: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let role = if i == 0 { "source" } else { "dest" };
            format!(r#"{{name="{n}",role="{role}"}}"#)
        })
        .collect();
    let links: Vec<String> = names
        .windows(2)
        .map(|w| format!(r#"{{a="{}",b="{}",mbit={mbit}}}"#, w[0], w[1]))
        .collect();
    Topology::parse(
        "line",
        &format!("node = [{}]\nlink = [{}]", nodes.join(","), links.join(",")),
    )
    .unwrap()
}

pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `recv` from testbed node `source`, writing `out`, with the tests' token and `extra`.
pub fn recv_args(source: usize, out: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut v = strings(&[
        "recv",
        "--source",
        &addr(source).to_string(),
        "--out",
        out.to_str().unwrap(),
        "--token",
        TOKEN,
    ]);
    v.extend(strings(extra));
    v
}

/// `send src` to testbed nodes `dests`, with the tests' token.
pub fn send_args(src: &std::path::Path, dests: impl IntoIterator<Item = usize>) -> Vec<String> {
    let mut v = strings(&["send", src.to_str().unwrap(), "--token", TOKEN]);
    for d in dests {
        v.extend(["--dest".to_string(), addr(d).to_string()]);
    }
    v
}

/// Runs `f` with a QUIC endpoint of floodclone's own transport in `node`'s namespace, on a
/// thread of its own (a peer made by hand: a liar, a forger, a stranger).
pub fn by_hand<T, F>(
    bed: &Testbed,
    node: usize,
    f: impl FnOnce(quinn::Endpoint) -> F + Send + 'static,
) -> std::thread::JoinHandle<T>
where
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    by_hand_on(bed, node, 0, f)
}

/// [`by_hand`] with the endpoint on `port` (a peer others dial).
pub fn by_hand_on<T, F>(
    bed: &Testbed,
    node: usize,
    port: u16,
    f: impl FnOnce(quinn::Endpoint) -> F + Send + 'static,
) -> std::thread::JoinHandle<T>
where
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    bed.in_netns(node, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let ep = floodclone::transport::endpoint(port).unwrap();
            let out = f(ep.clone()).await;
            ep.close(0u32.into(), b"");
            out
        })
    })
}
