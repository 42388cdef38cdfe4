//! Helpers shared by the end-to-end tests: root checks, the release `floodclone` binary, and
//! traffic generators owned by the tests.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    sync::OnceLock,
    time::{Duration, Instant},
};

use xtask::testbed::{identity_addr, Testbed};

/// True when the test may touch namespaces and BPF; otherwise prints why it skips.
pub fn root_or_skip(test: &str) -> bool {
    if xtask::testbed::is_root() {
        let _ = xtask::testbed::remove_stale();
        let _ = xtask::testbed::ensure_host_bpffs();
        true
    } else {
        eprintln!("SKIP {test}: needs root (network namespaces, veth, tc, BPF); run as root");
        false
    }
}

/// The release `floodclone` binary, built once per test process.
pub fn floodclone_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| xtask::build::floodclone_binary().expect("building floodclone"))
        .clone()
}

/// Sends TCP from node `from` to node `to` for `secs`, and returns the payload rate in
/// Mbit/s the receiver saw after a warm-up of a quarter of the time.
pub fn tcp_rate_mbit(bed: &Testbed, from: usize, to: usize, secs: f64) -> f64 {
    let dst = SocketAddrV4::new(identity_addr(to), 5001);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = bed.in_netns(to, move || {
        let listener = TcpListener::bind(dst).expect("bind");
        ready_tx.send(()).unwrap();
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let start = Instant::now();
        let warm = Duration::from_secs_f64(secs / 4.0);
        let (mut counted, mut since) = (0u64, None);
        loop {
            let n = conn.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            if start.elapsed() >= warm {
                let at = *since.get_or_insert_with(Instant::now);
                let _ = at;
                counted += n as u64;
            }
        }
        let dur = since
            .map(|s: Instant| s.elapsed().as_secs_f64())
            .unwrap_or(1.0);
        counted as f64 * 8.0 / dur / 1e6
    });
    ready_rx.recv().unwrap();
    let sender = bed.in_netns(from, move || {
        let mut conn = TcpStream::connect(dst).expect("connect");
        let chunk = vec![0x5au8; 1 << 16];
        let end = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < end {
            if conn.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    sender.join().unwrap();
    receiver.join().unwrap()
}

/// The identity address of `node`.
pub fn addr(node: usize) -> Ipv4Addr {
    identity_addr(node)
}

/// A topology shipped in `topologies/`.
pub fn shipped(name: &str) -> xtask::topology::Topology {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../topologies")
        .join(format!("{name}.toml"));
    xtask::topology::Topology::load(&path).unwrap()
}

/// Runs one transfer and fails the test unless every copy arrived verified.
pub fn transfer(
    topo: &xtask::topology::Topology,
    opts: &xtask::run::RunOptions,
) -> xtask::run::RunReport {
    let report = xtask::run::run_transfer(topo, &floodclone_bin(), opts).unwrap();
    eprint!("{}", xtask::run::render(&report));
    xtask::run::check(&report).unwrap();
    report
}
