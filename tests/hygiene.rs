//! Many transfers in a row leave nothing behind: no namespace, pinned map, status file,
//! loaded program, process or file descriptor. Its own test binary, so that no other test
//! runs alongside and the machine-wide counts below are this test's alone.

use std::path::Path;

use floodclone_testbed::{netns, run, run::RunOptions};
use floodclone_tests::{floodclone_bin, root_or_skip};

/// Entries two levels down (`<netns>/<pid>`) under `root`.
fn instances(root: &str) -> usize {
    let Ok(rd) = std::fs::read_dir(root) else {
        return 0;
    };
    rd.flatten()
        .map(|ns| std::fs::read_dir(ns.path()).map_or(0, |d| d.count()))
        .sum()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Running processes whose executable is `bin`.
fn processes_of(bin: &Path) -> usize {
    let bin = bin.canonicalize().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name().to_string_lossy().parse::<u32>().is_ok()
                && std::fs::read_link(e.path().join("exe")).is_ok_and(|exe| exe == bin)
        })
        .count()
}

/// BPF programs loaded machine-wide whose name is one of ours (None: bpftool missing).
fn our_programs() -> Option<usize> {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "list"])
        .output()
        .ok()?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("floodclone_"))
            .count(),
    )
}

#[test]
fn fifty_transfers_leave_nothing_behind() {
    if !root_or_skip("fifty_transfers_leave_nothing_behind") {
        return;
    }
    let topo = floodclone_tests::line(&["s", "d1", "d2"], 40);
    let bin = floodclone_bin();
    let mut opts = RunOptions::new(256 << 10);
    opts.quiet = true;
    let once = || {
        let r = run::run_transfer(&topo, &bin, &opts).unwrap();
        run::check(&r).unwrap();
    };
    // One run first: whatever is created once per test process (thread pools, the built
    // binary's lookup) is not a leak.
    once();
    let (fds, pins, status) = (
        open_fds(),
        instances(floodclone::linkstats::PIN_ROOT),
        instances(floodclone::stats::STATUS_ROOT),
    );
    let prefix = format!("{}{}-", netns::NETNS_PREFIX, std::process::id());
    for _ in 0..50 {
        once();
    }
    let left: Vec<String> = netns::list_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    // Each node's own /etc/hosts goes with its namespace.
    let etc_left: Vec<String> = std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(etc_left.is_empty(), "/etc/netns entries left: {etc_left:?}");
    assert_eq!(processes_of(&bin), 0, "floodclone processes still running");
    // Leftovers of processes killed by earlier tests may be swept meanwhile: fewer is fine.
    let (pins_now, status_now) = (
        instances(floodclone::linkstats::PIN_ROOT),
        instances(floodclone::stats::STATUS_ROOT),
    );
    assert!(
        pins_now <= pins,
        "pinned map directories grew: {pins} -> {pins_now}"
    );
    assert!(
        status_now <= status,
        "status files grew: {status} -> {status_now}"
    );
    match our_programs() {
        Some(n) => assert_eq!(n, 0, "floodclone BPF programs still loaded"),
        None => eprintln!("bpftool not found: loaded programs not checked"),
    }
    let now = open_fds();
    assert!(now <= fds + 2, "file descriptors grew from {fds} to {now}");
}
