//! Faults and bad input on the testbed: wrong tokens, an output that cannot be written, a
//! relay killed mid-transfer and restarted, a router silent to traces.

use floodclone_events::Event as JsonEvent;
use floodclone_testbed::{
    run::write_test_file,
    topology::{Event, EventAction, Topology},
    Testbed,
};
use floodclone_tests::{
    addr, assert_copies, by_hand, by_hand_on, line, recv_args, root_or_skip,
    routes_differ_by_direction, send_args, start, strings, Scratch, TOKEN,
};

const MIB: u64 = 1 << 20;

#[test]
fn wrong_token_is_refused_and_nothing_is_written() {
    if !root_or_skip("wrong_token_is_refused_and_nothing_is_written") {
        return;
    }
    let scratch = Scratch::new("token");
    let src = scratch.0.join("src");
    write_test_file(&src, MIB, 1).unwrap();
    let out = scratch.0.join("out");
    let mut bed = Testbed::up(&line(&["s", "d"], 40)).unwrap();
    let s = addr(0).to_string();
    let d = addr(1).to_string();
    let _send = start(
        &mut bed,
        0,
        &strings(&[
            "send",
            src.to_str().unwrap(),
            "--dest",
            &d,
            "--token",
            TOKEN,
        ]),
        &scratch.0,
    );
    let recv = start(
        &mut bed,
        1,
        &strings(&[
            "recv",
            "--source",
            &s,
            "--out",
            out.to_str().unwrap(),
            "--token",
            "a-wrong-token-but-long-enough",
            "--connect-timeout",
            "10",
        ]),
        &scratch.0,
    );
    let status = recv
        .wait_exit(&mut bed, 20.0)
        .expect("recv with a wrong token must exit");
    let err = recv.stderr_text();
    eprintln!("recv said: {err}");
    assert_eq!(status.code(), Some(1), "exit code 1: an error of its own");
    assert!(
        err.contains("token"),
        "the error should name the token: {err}"
    );
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one line, no backtrace: {err}"
    );
    assert!(!out.exists());
    assert!(!scratch.0.join("out.floodclone-part").exists());
}

#[test]
fn unwritable_output_fails_that_destination_only() {
    if !root_or_skip("unwritable_output_fails_that_destination_only") {
        return;
    }
    let scratch = Scratch::new("exists");
    let src = scratch.0.join("src");
    write_test_file(&src, 2 * MIB, 2).unwrap();
    let topo = Topology::parse(
        "star2",
        r#"node = [{name="s",role="source"},{name="d1",role="dest"},{name="d2",role="dest"}]
           link = [{a="s",b="d1",mbit=40},{a="s",b="d2",mbit=40}]"#,
    )
    .unwrap();
    let mut bed = Testbed::up(&topo).unwrap();
    let taken = scratch.0.join("d1.out");
    std::fs::write(&taken, b"precious").unwrap();
    let fine = scratch.0.join("d2.out");
    let send = start(
        &mut bed,
        0,
        &strings(&[
            "send",
            src.to_str().unwrap(),
            "--dest",
            &addr(1).to_string(),
            "--dest",
            &addr(2).to_string(),
            "--token",
            TOKEN,
        ]),
        &scratch.0,
    );
    let mut recvs = Vec::new();
    for (node, out) in [(1, &taken), (2, &fine)] {
        recvs.push(start(
            &mut bed,
            node,
            &strings(&[
                "recv",
                "--source",
                &addr(0).to_string(),
                "--out",
                out.to_str().unwrap(),
                "--token",
                TOKEN,
            ]),
            &scratch.0,
        ));
    }
    let st1 = recvs[0].wait_exit(&mut bed, 30.0).expect("d1 exits");
    assert_eq!(st1.code(), Some(1), "exit code 1: an error of its own");
    assert!(
        recvs[0].stderr_text().contains("already exists"),
        "{}",
        recvs[0].stderr_text()
    );
    assert_eq!(
        std::fs::read(&taken).unwrap(),
        b"precious",
        "existing output untouched"
    );
    recvs[1].expect_complete("d2", 30.0);
    assert_copies(&src, [fine.clone()]);
    let st = send.wait_exit(&mut bed, 30.0).expect("send exits");
    assert!(!st.success(), "send reports the failed destination");
    assert!(
        send.stderr_text().contains("1 of 2 destinations failed"),
        "{}",
        send.stderr_text()
    );
}

#[test]
fn killed_relay_is_routed_around_and_resumes_without_refetching() {
    if !root_or_skip("killed_relay_is_routed_around_and_resumes_without_refetching") {
        return;
    }
    let scratch = Scratch::new("kill");
    let src = scratch.0.join("src");
    let bytes = 24 * MIB;
    write_test_file(&src, bytes, 3).unwrap();
    let mut bed = Testbed::up(&line(&["s", "d1", "d2", "d3"], 40)).unwrap();
    let dests: Vec<String> = (1..=3)
        .flat_map(|i| ["--dest".to_string(), addr(i).to_string()])
        .collect();
    let mut send_args = strings(&["send", src.to_str().unwrap(), "--token", TOKEN]);
    send_args.extend(dests);
    let send = start(&mut bed, 0, &send_args, &scratch.0);
    let out = |i: usize| scratch.0.join(format!("d{i}.out"));
    let recv_args = |i: usize| {
        strings(&[
            "recv",
            "--source",
            &addr(0).to_string(),
            "--out",
            out(i).to_str().unwrap(),
            "--token",
            TOKEN,
        ])
    };
    let mut recvs: Vec<_> = (1..=3)
        .map(|i| start(&mut bed, i, &recv_args(i), &scratch.0))
        .collect();
    // Kill the first relay a third of the way in.
    std::thread::sleep(std::time::Duration::from_millis(1800));
    bed.child(recvs[0].handle).kill().unwrap();
    let _ = bed.child(recvs[0].handle).wait();
    // Its kernel still forwards: d2 and d3 must complete through it.
    for (i, r) in recvs.iter().enumerate().skip(1) {
        r.expect_complete(&format!("d{}", i + 1), 90.0);
    }
    // Restarted, d1 resumes and fetches only what it lacked.
    recvs[0] = start(&mut bed, 1, &recv_args(1), &scratch.0);
    let done = recvs[0].expect_complete("restarted d1", 90.0);
    let chunks = bytes.div_ceil(floodclone_sched::default_chunk_bytes(bytes) as u64);
    let (resumed, received) = (done.resumed_chunks as u64, done.received_chunks);
    eprintln!("d1 resumed {resumed} chunks and received {received} of {chunks}");
    assert!(resumed > 0, "nothing was resumed");
    assert_eq!(
        resumed + received,
        chunks,
        "re-fetched chunks it had verified"
    );
    assert!(send.wait_exit(&mut bed, 30.0).is_some_and(|s| s.success()));
    assert_copies(&src, (1..=3).map(out));
}

#[test]
fn link_down_and_back_up_mid_transfer_completes() {
    if !root_or_skip("link_down_and_back_up_mid_transfer_completes") {
        return;
    }
    // The only path to d2 goes down for 6 s, longer than QUIC's idle timeout, so the
    // connection across it dies and must be re-established when the link is back.
    let mut topo = line(&["s", "d1", "d2"], 40);
    topo.events = [(1.5, EventAction::Down), (7.5, EventAction::Up)]
        .into_iter()
        .map(|(at_s, action)| Event {
            at_s,
            link: 1,
            action,
        })
        .collect();
    let report =
        floodclone_tests::transfer(&topo, &floodclone_testbed::run::RunOptions::new(16 * MIB));
    let d2 = report.dests.iter().find(|d| d.name == "d2").unwrap();
    let t = d2.elapsed_s.expect("d2 completed");
    assert!(
        t > 6.0,
        "d2 cannot have finished while its only link was down ({t} s)"
    );
}

/// A relay whose own packets cannot reach the source for its first 3 s (`--join-late`: its
/// kernel forwards for the member behind it all along) joins then and still ends with a
/// whole copy; the member behind it is served meanwhile.
#[test]
fn a_relay_that_joins_late_gets_a_whole_copy() {
    if !root_or_skip("a_relay_that_joins_late_gets_a_whole_copy") {
        return;
    }
    let topo = line(&["s", "d1", "d2"], 40);
    let mut opts = floodclone_testbed::run::RunOptions::new(16 * MIB);
    opts.join_late = vec![("d1".into(), 3.0)];
    let report = floodclone_tests::transfer(&topo, &opts);
    let d1 = report.dests.iter().find(|d| d.name == "d1").unwrap();
    let t = d1.elapsed_s.expect("d1 completed");
    assert!(
        t > 3.0,
        "d1 cannot have finished before it could join ({t} s)"
    );
}

#[test]
fn source_killed_and_restarted_destinations_keep_what_they_have() {
    if !root_or_skip("source_killed_and_restarted_destinations_keep_what_they_have") {
        return;
    }
    let scratch = Scratch::new("srcrestart");
    let src = scratch.0.join("src");
    let bytes = 24 * MIB;
    write_test_file(&src, bytes, 5).unwrap();
    let mut bed = Testbed::up(&line(&["s", "d1", "d2"], 40)).unwrap();
    let out = |i: usize| scratch.0.join(format!("d{i}.out"));
    let mut send = start(&mut bed, 0, &send_args(&src, 1..=2), &scratch.0);
    let recvs: Vec<_> = (1..=2)
        .map(|i| start(&mut bed, i, &recv_args(0, &out(i), &[]), &scratch.0))
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    bed.child(send.handle).kill().unwrap();
    let _ = bed.child(send.handle).wait();
    std::thread::sleep(std::time::Duration::from_secs(2));
    for (i, r) in recvs.iter().enumerate() {
        assert!(
            r.wait_exit(&mut bed, 0.1).is_none(),
            "d{} gave up while the source was away: {}",
            i + 1,
            r.stderr_text()
        );
    }
    send = start(&mut bed, 0, &send_args(&src, 1..=2), &scratch.0);
    let chunks = bytes.div_ceil(floodclone_sched::default_chunk_bytes(bytes) as u64);
    for (i, r) in recvs.iter().enumerate() {
        let done = r.expect_complete(&format!("d{}", i + 1), 90.0);
        let received = done.received_chunks;
        eprintln!("d{} received {received} of {chunks} chunks", i + 1);
        assert_eq!(received, chunks, "d{}: a chunk was fetched twice", i + 1);
    }
    let st = send
        .wait_exit(&mut bed, 30.0)
        .expect("the restarted source exits");
    assert!(st.success(), "{}", send.stderr_text());
    assert_copies(&src, (1..=2).map(out));
}

/// `recv` on node `i` from the source; d1 (node 1) with the testing flag `d1_flag` (how it
/// misbehaves).
fn start_recv_d1_with(
    bed: &mut Testbed,
    i: usize,
    out: &std::path::Path,
    scratch: &std::path::Path,
    d1_flag: &str,
) -> floodclone_tests::NodeProc {
    let extra: &[&str] = if i == 1 { &[d1_flag] } else { &[] };
    start(bed, i, &recv_args(0, out, extra), scratch)
}

/// A swarm on `topo` where d1 runs with the testing flag `d1_flag`: the source sends a
/// file of `mib` MiB (content from `seed`) to d1..=d`dests`; every destination must end
/// with an identical copy within `within_s` and the source exit cleanly. Returns each
/// destination's log (d1 first).
fn swarm_with_d1_flag(
    name: &str,
    topo: &Topology,
    mib: u64,
    seed: u64,
    dests: usize,
    d1_flag: &str,
    within_s: f64,
) -> Vec<String> {
    let scratch = Scratch::new(name);
    let src = scratch.0.join("src");
    write_test_file(&src, mib * MIB, seed).unwrap();
    let mut bed = Testbed::up(topo).unwrap();
    let out = |i: usize| scratch.0.join(format!("d{i}.out"));
    let send = start(&mut bed, 0, &send_args(&src, 1..=dests), &scratch.0);
    let recvs: Vec<_> = (1..=dests)
        .map(|i| start_recv_d1_with(&mut bed, i, &out(i), &scratch.0, d1_flag))
        .collect();
    for (i, r) in recvs.iter().enumerate() {
        r.expect_complete(&format!("d{}", i + 1), within_s);
    }
    assert!(send.wait_exit(&mut bed, 30.0).is_some_and(|s| s.success()));
    assert_copies(&src, (1..=dests).map(out));
    recvs.iter().map(|r| r.stderr_text()).collect()
}

#[test]
fn corrupt_chunks_are_rejected_refetched_and_their_sender_cut_off() {
    if !root_or_skip("corrupt_chunks_are_rejected_refetched_and_their_sender_cut_off") {
        return;
    }
    // Ring plus star: d1 flips a bit in everything it serves. Its ring neighbours d2 and d4
    // must reject those chunks, stop pulling from d1, and get them elsewhere.
    let topo = floodclone_tests::shipped("ring-plus-star");
    let recvs = swarm_with_d1_flag("corrupt", &topo, 8, 6, 4, "--corrupt-served-chunks", 90.0);
    let logs: String = [1, 3].iter().map(|&k| recvs[k].as_str()).collect();
    eprintln!("{logs}");
    assert!(logs.contains("failed verification"), "no rejection logged");
    assert!(
        logs.contains("not pulling from it again"),
        "d1 was not cut off"
    );
}

#[test]
fn a_neighbour_that_claims_to_be_the_source_is_refused_and_cut_off() {
    if !root_or_skip("a_neighbour_that_claims_to_be_the_source_is_refused_and_cut_off") {
        return;
    }
    // Ring plus star: d1 tells every neighbour that dials it (d2 and d4 pull from it) that
    // it is the source, and welcomes it to another file. What only the source may say
    // counts only on the connection dialed to it; before, that Hello rebound the dialed
    // connection to the source's id, and the forged Welcome stopped d2 and d4 ("the source
    // restarted with a different file"). Now each refuses the connection once and pulls
    // from others. d1's own dials say it is the source too.
    let topo = floodclone_tests::shipped("ring-plus-star");
    let recvs = swarm_with_d1_flag("claimsrc", &topo, 8, 9, 4, "--claim-source", 90.0);
    for k in [1, 3] {
        let log = &recvs[k];
        eprintln!("d{} said: {log}", k + 1);
        let cut = log.matches("it broke the protocol").count();
        assert!(cut <= 1, "d{} refused d1 {cut} times", k + 1);
    }
    let logs: String = [1, 3].iter().map(|&k| recvs[k].as_str()).collect();
    assert!(
        logs.contains("only a dialer says who it is"),
        "no neighbour of d1 refused its Hello"
    );
    // d1's own dials (it pulls from d2 and d4) say it is the source: not believed where
    // they come from d1's address.
    assert!(
        logs.contains("(the source), whose address that is not: not believed"),
        "d1's Hellos as the source were believed"
    );
}

#[test]
fn a_relay_that_announces_chunks_and_sends_none_leaves_its_neighbour_the_source() {
    if !root_or_skip("a_relay_that_announces_chunks_and_sends_none_leaves_its_neighbour_the_source")
    {
        return;
    }
    // A line s - d1 - d2: d2's one data neighbour is d1, which holds the token, announces
    // every chunk it gets and sends none. Before the last resort d2 asked d1 again and
    // again and never completed; now, with nothing arriving and nothing on time in flight,
    // it pulls from the source too.
    let topo = line(&["s", "d1", "d2"], 20);
    let recvs = swarm_with_d1_flag("withhold", &topo, 4, 8, 2, "--withhold-served-chunks", 60.0);
    let log = &recvs[1];
    assert!(log.contains("as a last resort"), "{log}");
}

/// A tmux server of its own (its socket named for this process), killed when dropped.
struct Tmux(String);

impl Tmux {
    fn new() -> Self {
        Self(format!("fc-test-{}", std::process::id()))
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("tmux")
            .args(["-L", &self.0])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// What a person at a terminal sees when a warning is logged while the progress lines are
/// live: `recv` runs in a tmux pane (a real pseudo-terminal, so its progress is drawn in
/// place), a neighbour serves corrupt chunks so it logs warnings mid-transfer. The pane, as
/// tmux renders it (its whole history), shows every warning with one set of progress lines
/// below them while the transfer runs, and no progress line left once the copy is
/// complete: none wiped, none stale above a log line or under the last one.
#[test]
fn a_warning_during_live_progress_stays_visible_on_a_terminal() {
    if !root_or_skip("a_warning_during_live_progress_stays_visible_on_a_terminal") {
        return;
    }
    let scratch = Scratch::new("terminal");
    let src = scratch.0.join("src");
    write_test_file(&src, 16 * MIB, 7).unwrap();
    let topo = floodclone_tests::shipped("ring-plus-star");
    let mut bed = Testbed::up(&topo).unwrap();
    let out = |i: usize| scratch.0.join(format!("d{i}.out"));
    let tmux = Tmux::new();
    // d2 (a ring neighbour of d1) at the terminal; the pane stays after it exits.
    let recv = recv_args(0, &out(2), &[]);
    let command = format!(
        "ip netns exec {} {} {}; echo exit=$?; sleep 600",
        bed.netns(2),
        floodclone_tests::floodclone_bin().display(),
        recv.join(" ")
    );
    let started = tmux.run(&["new-session", "-d", "-x", "120", "-y", "40", &command]);
    assert!(started.status.success(), "{started:?}");
    let others: Vec<_> = [1, 3, 4]
        .iter()
        .map(|&i| start_recv_d1_with(&mut bed, i, &out(i), &scratch.0, "--corrupt-served-chunks"))
        .collect();
    let pane = || {
        String::from_utf8_lossy(&tmux.run(&["capture-pane", "-p", "-S", "-"]).stdout).into_owned()
    };
    let send = start(&mut bed, 0, &send_args(&src, 1..=4), &scratch.0);
    // Mid-transfer, once a warning is out: it is on the screen, and below it one set of
    // progress lines (they name the share held, "NN%").
    let progress_lines = |shown: &str| shown.lines().filter(|l| l.contains('%')).count();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mid = loop {
        let shown = pane();
        if shown.contains("failed verification") && progress_lines(&shown) > 0 {
            break shown;
        }
        assert!(
            !shown.contains("complete:") && std::time::Instant::now() < end,
            "no warning seen with progress live: {shown}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    eprintln!("mid-transfer, the terminal showed:\n{mid}");
    let lines: Vec<&str> = mid.lines().filter(|l| !l.trim().is_empty()).collect();
    let last_warning = lines.iter().rposition(|l| l.contains("WARN")).unwrap();
    let first_progress = lines.iter().position(|l| l.contains('%')).unwrap();
    assert_eq!(progress_lines(&mid), 1, "one set of progress lines: {mid}");
    assert!(
        first_progress > last_warning,
        "the progress lines are below the warnings: {mid}"
    );
    for (r, who) in others.iter().zip(["d1", "d3", "d4"]) {
        r.expect_complete(who, 90.0);
    }
    assert!(send.wait_exit(&mut bed, 60.0).is_some_and(|s| s.success()));
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !pane().contains("exit=") && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let shown = pane();
    eprintln!("at the end, the terminal showed:\n{shown}");
    assert!(shown.contains("exit=0"), "d2's recv succeeded");
    assert!(
        shown.contains("failed verification") && shown.contains("not pulling from it again"),
        "the warnings about d1's chunks stay on the screen"
    );
    // Drawn in place and removed when the copy is complete: no progress line is left,
    // neither a stale one above a log line nor the last one under "complete".
    assert_eq!(progress_lines(&shown), 0, "no stale progress: {shown}");
    assert_copies(&src, (1..=4).map(out));
}

/// A tmpfs mounted for the test's lifetime.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: std::path::PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "fc-test",
                dir.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Self(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_and_unwritable_path_fail_that_destination_only() {
    if !root_or_skip("full_disk_and_unwritable_path_fail_that_destination_only") {
        return;
    }
    let scratch = Scratch::new("disk");
    let src = scratch.0.join("src");
    write_test_file(&src, 4 * MIB, 7).unwrap();
    let disk = SmallDisk::mount(scratch.0.join("small"), "1m");
    let topo = Topology::parse(
        "star3",
        r#"node = [{name="s",role="source"},{name="d1",role="dest"},{name="d2",role="dest"},
                   {name="d3",role="dest"}]
           link = [{a="s",b="d1",mbit=40},{a="s",b="d2",mbit=40},{a="s",b="d3",mbit=40}]"#,
    )
    .unwrap();
    let mut bed = Testbed::up(&topo).unwrap();
    let full = disk.0.join("d1.out");
    let unwritable = std::path::PathBuf::from("/dev/null/d2.out");
    let fine = scratch.0.join("d3.out");
    let send = start(&mut bed, 0, &send_args(&src, 1..=3), &scratch.0);
    let recvs: Vec<_> = [(1, &full), (2, &unwritable), (3, &fine)]
        .iter()
        .map(|&(i, o)| start(&mut bed, i, &recv_args(0, o, &[]), &scratch.0))
        .collect();
    for (r, what) in recvs[..2].iter().zip(["No space left", "Not a directory"]) {
        let st = r
            .wait_exit(&mut bed, 30.0)
            .expect("a failing destination exits");
        let err = r.stderr_text();
        eprintln!("{err}");
        assert!(!st.success());
        assert!(err.contains(what), "expected {what:?} in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    assert!(!full.exists(), "a partial file at the final path");
    recvs[2].expect_complete("d3", 30.0);
    assert_copies(&src, [fine.clone()]);
    let st = send.wait_exit(&mut bed, 30.0).expect("send exits");
    assert!(!st.success());
    assert!(
        send.stderr_text().contains("2 of 3 destinations failed"),
        "{}",
        send.stderr_text()
    );
}

#[test]
fn intruders_are_refused_and_a_malformed_message_closes_one_connection() {
    if !root_or_skip("intruders_are_refused_and_a_malformed_message_closes_one_connection") {
        return;
    }
    use floodclone::transport::{self, TransportError, CLOSE_PROTOCOL};
    use std::net::{SocketAddr, SocketAddrV4};
    let scratch = Scratch::new("intruder");
    let src = scratch.0.join("src");
    write_test_file(&src, 16 * MIB, 8).unwrap();
    let mut bed = Testbed::up(&line(&["s", "d1", "d2"], 40)).unwrap();
    let out = |i: usize| scratch.0.join(format!("d{i}.out"));
    let send = start(&mut bed, 0, &send_args(&src, 1..=2), &scratch.0);
    let recvs: Vec<_> = (1..=2)
        .map(|i| start(&mut bed, i, &recv_args(0, &out(i), &[]), &scratch.0))
        .collect();
    assert!(
        recvs[1].wait_event("welcome", 30.0).is_some(),
        "the swarm started"
    );
    // From d2's namespace, mid-transfer: one stranger with a wrong token, one holder of the
    // token who sends garbage, both at the source's port.
    let source = SocketAddr::V4(SocketAddrV4::new(addr(0), 7878));
    let (stranger, garbler) = by_hand(&bed, 2, move |ep| async move {
        // The path crosses links full of the transfer: a lost handshake packet is resent
        // after a second or two (this test is about what the source admits, not how fast).
        let patience = std::time::Duration::from_secs(10);
        let conn = transport::dial(&ep, source, patience).await.unwrap();
        let stranger =
            match transport::authenticate_dialer(&conn, "a-wrong-token-but-long-enough").await {
                Ok(_) => "admitted".to_string(),
                Err(e @ (TransportError::BadToken | TransportError::Refused)) => e.to_string(),
                Err(e) => format!("unexpected: {e}"),
            };
        let conn = transport::dial(&ep, source, patience).await.unwrap();
        let mut ctl = transport::authenticate_dialer(&conn, TOKEN).await.unwrap();
        // A frame of one byte whose message tag does not exist.
        ctl.send.write_all(&[0, 0, 0, 1, 0xff]).await.unwrap();
        (stranger, closed_within(&conn, 5).await)
    })
    .join()
    .unwrap();
    eprintln!("stranger: {stranger}; garbler: {garbler:?}");
    assert_ne!(stranger, "admitted", "a wrong token got in");
    assert!(!stranger.starts_with("unexpected"), "{stranger}");
    assert_eq!(
        garbler.code,
        Some(quinn::VarInt::from_u32(CLOSE_PROTOCOL)),
        "{garbler:?}"
    );
    for (i, r) in recvs.iter().enumerate() {
        r.expect_complete(&format!("d{}", i + 1), 60.0);
    }
    assert!(send.wait_exit(&mut bed, 30.0).is_some_and(|s| s.success()));
    assert_copies(&src, (1..=2).map(out));
}

#[test]
fn a_member_that_never_answers_holds_the_start_back_half_a_second_only() {
    if !root_or_skip("a_member_that_never_answers_holds_the_start_back_half_a_second_only") {
        return;
    }
    use floodclone::{transport, wire::Msg};
    use std::net::{SocketAddr, SocketAddrV4};
    let scratch = Scratch::new("silent-member");
    let src = scratch.0.join("src");
    write_test_file(&src, 8 * MIB, 9).unwrap();
    let mut bed = Testbed::up(&line(&["s", "d1", "d2"], 40)).unwrap();
    let out = scratch.0.join("d1.out");
    let send = start(&mut bed, 0, &send_args(&src, 1..=2), &scratch.0);
    assert!(
        send.wait_event("serving", 30.0).is_some(),
        "the source serves"
    );
    // d2 holds the token and joins, then says nothing: it never answers its Welcome.
    let source = SocketAddr::V4(SocketAddrV4::new(addr(0), 7878));
    let (joined_tx, joined_rx) = std::sync::mpsc::channel();
    let silent = by_hand(&bed, 2, move |ep| async move {
        let patience = std::time::Duration::from_secs(2);
        let conn = transport::dial(&ep, source, patience).await.unwrap();
        let mut ctl = transport::authenticate_dialer(&conn, TOKEN).await.unwrap();
        ctl.send(&Msg::Hello { id: u16::MAX }).await.unwrap();
        let join = Msg::Join {
            port: 7878,
            addrs: vec![addr(2).into()],
        };
        ctl.send(&join).await.unwrap();
        let _ = joined_tx.send(());
        tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    });
    joined_rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the silent member joined");
    let recv = start(&mut bed, 1, &recv_args(0, &out, &[]), &scratch.0);
    let (held, unanswered) = send
        .wait_for(30.0, |e| match e {
            JsonEvent::FreshOpen { held_ms, silent } => Some((held_ms, silent)),
            _ => None,
        })
        .expect("the source hands out chunks");
    eprintln!("fresh chunks after {held} ms; not answered: {unanswered:?}");
    assert_eq!(unanswered, vec![2]);
    assert!((450..2000).contains(&held), "held {held} ms");
    recv.expect_complete("d1", 60.0);
    assert_copies(&src, [out]);
    silent.join().unwrap();
}

/// Runs `f` with a QUIC endpoint of its own on a thread in `node`'s namespace: a client
/// that speaks to the swarm by hand.
#[test]
fn a_missing_or_short_token_is_refused_before_anything_starts() {
    // No root needed: the command refuses before it opens a socket or a file.
    let scratch = Scratch::new("no-token");
    let out = scratch.0.join("out");
    for token in [None, Some("short")] {
        let mut cmd = std::process::Command::new(floodclone_tests::floodclone_bin());
        cmd.args(["recv", "--source", "127.0.0.1", "--out"])
            .arg(&out)
            .env_remove("FLOODCLONE_TOKEN");
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        let done = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&done.stderr);
        eprintln!("token {token:?}: {err}");
        assert!(!done.status.success());
        assert!(err.contains("floodclone token"), "names the fix: {err}");
        assert!(!out.exists() && !scratch.0.join("out.floodclone-part").exists());
    }
}

#[test]
fn a_forged_welcome_from_a_token_holder_is_ignored() {
    if !root_or_skip("a_forged_welcome_from_a_token_holder_is_ignored") {
        return;
    }
    use floodclone::{manifest::Manifest, transport, wire::Msg};
    use std::net::{SocketAddr, SocketAddrV4};
    let scratch = Scratch::new("forged-welcome");
    let (src, fake) = (scratch.0.join("src"), scratch.0.join("fake"));
    write_test_file(&src, 4 * MIB, 21).unwrap();
    write_test_file(&fake, 4 * MIB, 22).unwrap();
    let fake_manifest = Manifest::from_file(&fake, None).unwrap();
    let mut bed = Testbed::up(&line(&["s", "d1", "d2"], 40)).unwrap();
    let out = scratch.0.join("d1.out");
    // d1 waits for its source; before the source starts, d2 (holding the token) dials d1
    // and hands it a Welcome for another file.
    let recv = start(&mut bed, 1, &recv_args(0, &out, &[]), &scratch.0);
    assert!(recv.wait_event("ready", 30.0).is_some());
    let d1 = SocketAddr::V4(SocketAddrV4::new(addr(1), 7878));
    let forger = by_hand(&bed, 2, move |ep| async move {
        let conn = transport::dial(&ep, d1, std::time::Duration::from_secs(5))
            .await
            .unwrap();
        let mut ctl = transport::authenticate_dialer(&conn, TOKEN).await.unwrap();
        ctl.send(&Msg::Hello { id: 0 }).await.unwrap();
        let welcome = Msg::Welcome {
            you: 1,
            manifest: fake_manifest,
            members: Vec::new(),
            relay: true,
            hash_ahead: None,
        };
        ctl.send(&welcome).await.unwrap();
        ctl.send(&Msg::SwarmDone).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    });
    forger.join().unwrap();
    let send = start(&mut bed, 0, &send_args(&src, 1..=1), &scratch.0);
    recv.expect_complete("d1", 60.0);
    assert_copies(&src, [out]);
    assert!(send.wait_exit(&mut bed, 30.0).is_some_and(|s| s.success()));
}

#[test]
fn chunk_hashes_forged_by_a_neighbour_are_refused() {
    if !root_or_skip("chunk_hashes_forged_by_a_neighbour_are_refused") {
        return;
    }
    // A late member gets the file's hash in its Welcome and asks the neighbours it dials
    // for the chunk hashes. d1 (holding the token, and the file) answers with altered
    // ones; d2 must refuse them and finish with the source's. The source's own hashes
    // (512 of 4 KiB chunks: 16 KB) cross the 2 Mbit/s link s-d1 after the Welcome, so
    // d1's answer, 100 Mbit/s from d2, comes first.
    let scratch = Scratch::new("forged-hashes");
    let src = scratch.0.join("src");
    write_test_file(&src, 2 * MIB, 24).unwrap();
    let topo = Topology::parse(
        "late-member",
        r#"node = [{name="s",role="source"},{name="d1",role="dest"},{name="d2",role="dest"}]
           link = [{a="s",b="d1",mbit=2},{a="d1",b="d2",mbit=100}]"#,
    )
    .unwrap();
    let mut bed = Testbed::up(&topo).unwrap();
    let out = |i: usize| scratch.0.join(format!("d{i}.out"));
    let mut send_cmd = send_args(&src, 1..=2);
    send_cmd.extend(strings(&["--chunk-size", "4KiB"]));
    let send = start(&mut bed, 0, &send_cmd, &scratch.0);
    let liar = start(
        &mut bed,
        1,
        &recv_args(0, &out(1), &["--forge-given-hashes"]),
        &scratch.0,
    );
    liar.expect_complete("d1", 60.0);
    let late = start(&mut bed, 2, &recv_args(0, &out(2), &[]), &scratch.0);
    late.expect_complete("d2", 60.0);
    assert!(send.wait_exit(&mut bed, 30.0).is_some_and(|s| s.success()));
    assert_copies(&src, (1..=2).map(out));
    let said = late.stderr_text();
    eprintln!("d2 said: {said}");
    // Refused once: a liar is not asked again (each connection to it would get a new
    // answer: d2 once redialled d1 and refused it again every 2 ms until the source's
    // hashes came).
    let refusals = said
        .matches("gave chunk hashes that do not make up the file's hash: refused")
        .count();
    assert_eq!(refusals, 1, "d2 refused d1's hashes {refusals} times");
}

#[test]
fn recv_expect_refuses_any_other_file() {
    if !root_or_skip("recv_expect_refuses_any_other_file") {
        return;
    }
    let scratch = Scratch::new("expect");
    let src = scratch.0.join("src");
    write_test_file(&src, 2 * MIB, 23).unwrap();
    let b3 = floodclone::manifest::Manifest::from_file(&src, None)
        .unwrap()
        .b3()
        .unwrap();
    let wrong = format!("b3:{}", "ab".repeat(32));
    let mut bed = Testbed::up(&line(&["s", "d1", "d2"], 40)).unwrap();
    let out = |i: usize| scratch.0.join(format!("d{i}.out"));
    let refuses = start(
        &mut bed,
        1,
        &recv_args(0, &out(1), &["--expect", &wrong]),
        &scratch.0,
    );
    let accepts = start(
        &mut bed,
        2,
        &recv_args(0, &out(2), &["--expect", &b3]),
        &scratch.0,
    );
    let send = start(&mut bed, 0, &send_args(&src, 1..=2), &scratch.0);
    let status = refuses.wait_exit(&mut bed, 30.0).expect("d1 gives up");
    let err = refuses.stderr_text();
    eprintln!("d1 said: {err}");
    assert!(!status.success() && err.contains("--expect"), "{err}");
    assert!(!out(1).exists() && !scratch.0.join("d1.out.floodclone-part").exists());
    accepts.expect_complete("d2", 60.0);
    assert_copies(&src, [out(2)]);
    let status = send.wait_exit(&mut bed, 30.0).expect("send ends");
    assert!(!status.success(), "one destination failed");
}

#[test]
fn a_source_file_changed_mid_send_stops_the_swarm_with_that_reason() {
    if !root_or_skip("a_source_file_changed_mid_send_stops_the_swarm_with_that_reason") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let scratch = Scratch::new("source-changed");
    let src = scratch.0.join("src");
    write_test_file(&src, 8 * MIB, 24).unwrap();
    // 8 MiB over 8 Mbit/s: about 8 s, time to change the file under the source.
    let mut bed = Testbed::up(&line(&["s", "d1"], 8)).unwrap();
    let out = scratch.0.join("d1.out");
    let recv = start(&mut bed, 1, &recv_args(0, &out, &[]), &scratch.0);
    let send = start(&mut bed, 0, &send_args(&src, 1..=1), &scratch.0);
    assert!(recv.wait_event("welcome", 30.0).is_some());
    std::thread::sleep(std::time::Duration::from_secs(1));
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&vec![0x55; 4 * MIB as usize], 4 * MIB)
        .unwrap();
    drop(f);
    let status = send.wait_exit(&mut bed, 30.0).expect("send stops");
    let err = send.stderr_text();
    eprintln!("send said: {err}");
    assert!(!status.success());
    assert!(err.contains("source file changed"), "{err}");
    assert!(!out.exists(), "no copy of mixed content");
}

#[test]
fn a_destination_never_started_is_given_up_by_name_and_the_others_finish() {
    if !root_or_skip("a_destination_never_started_is_given_up_by_name_and_the_others_finish") {
        return;
    }
    let scratch = Scratch::new("never-started");
    let src = scratch.0.join("src");
    write_test_file(&src, 2 * MIB, 25).unwrap();
    let mut bed = Testbed::up(&line(&["s", "d1", "d2"], 40)).unwrap();
    let out = scratch.0.join("d1.out");
    // d2 is named but never started; d1 by --dest, d2 in a --dests-file.
    let recv = start(&mut bed, 1, &recv_args(0, &out, &[]), &scratch.0);
    let dests_file = scratch.0.join("dests");
    let listing = format!("# the rest of the fleet\n\n{}:7878  # d2\n", addr(2));
    std::fs::write(&dests_file, listing).unwrap();
    let mut args = send_args(&src, 1..=1);
    args.extend(strings(&["--dests-file", dests_file.to_str().unwrap()]));
    args.extend(strings(&["--dest-timeout", "5"]));
    let send = start(&mut bed, 0, &args, &scratch.0);
    recv.expect_complete("d1", 60.0);
    let status = send
        .wait_exit(&mut bed, 30.0)
        .expect("send ends once the absent destination is given up");
    let err = send.stderr_text();
    eprintln!("send said: {err}");
    assert_eq!(
        status.code(),
        Some(3),
        "exit code 3: some destinations failed"
    );
    assert!(
        err.contains(&addr(2).to_string()) && err.contains("never joined"),
        "names the absent destination: {err}"
    );
    let status = recv
        .wait_exit(&mut bed, 30.0)
        .expect("d1 is told the swarm is over");
    assert!(status.success());
    assert_copies(&src, [out]);
}

#[test]
fn sigterm_stops_recv_like_ctrl_c_and_leaves_no_pins() {
    if !root_or_skip("sigterm_stops_recv_like_ctrl_c_and_leaves_no_pins") {
        return;
    }
    let scratch = Scratch::new("sigterm");
    let mut bed = Testbed::up(&line(&["s", "d1"], 40)).unwrap();
    // No source: recv waits for it, with its link-stats programs attached and pinned.
    for (signal, code, says) in [
        ("TERM", 143, "terminated"),
        ("INT", 130, "interrupted"),
        ("HUP", 129, "hung up"),
    ] {
        let out = scratch.0.join(format!("d1-{signal}.out"));
        let recv = start(&mut bed, 1, &recv_args(0, &out, &[]), &scratch.0);
        assert!(recv.wait_event("ready", 30.0).is_some());
        let pid = bed.child(recv.handle).id().to_string();
        let pinned = || {
            std::fs::read_dir(floodclone::linkstats::PIN_ROOT)
                .into_iter()
                .flatten()
                .flatten()
                .any(|ns| ns.path().join(&pid).exists())
        };
        assert!(
            pinned(),
            "recv pinned its maps under {}",
            floodclone::linkstats::PIN_ROOT
        );
        let killed = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = recv
            .wait_exit(&mut bed, 10.0)
            .unwrap_or_else(|| panic!("recv exits on SIG{signal}"));
        let err = recv.stderr_text();
        eprintln!("recv said: {err}");
        assert!(err.contains(says), "{err}");
        assert_eq!(status.code(), Some(code), "SIG{signal}'s exit code");
        assert!(!pinned(), "its pins are removed on the way out");
    }
}

#[test]
fn a_silent_stranger_is_dropped_and_a_request_flood_closes_its_connection() {
    if !root_or_skip("a_silent_stranger_is_dropped_and_a_request_flood_closes_its_connection") {
        return;
    }
    use floodclone::{
        transport,
        wire::{Msg, MAX_QUEUED_CHUNKS},
    };
    use std::net::{SocketAddr, SocketAddrV4};
    let scratch = Scratch::new("flood");
    let src = scratch.0.join("src");
    write_test_file(&src, 4 * MIB, 26).unwrap();
    let mut bed = Testbed::up(&line(&["s", "d1", "d2"], 40)).unwrap();
    let out = scratch.0.join("d1.out");
    let send = start(&mut bed, 0, &send_args(&src, 1..=1), &scratch.0);
    assert!(send.wait_event("serving", 30.0).is_some());
    let source = SocketAddr::V4(SocketAddrV4::new(addr(0), 7878));
    let (silent, flood, out_of_range) = by_hand(&bed, 2, move |ep| async move {
        let patience = std::time::Duration::from_secs(2);
        // A stranger that completes the handshake, opens its control stream, sends two
        // bytes of a frame header and then nothing.
        let conn = transport::dial(&ep, source, patience).await.unwrap();
        let (mut half, _recv) = conn.open_bi().await.unwrap();
        half.write_all(&[0, 0]).await.unwrap();
        let silent = closed_within(&conn, 15).await;
        // A token holder asking for more chunks than any scheduler keeps in flight.
        let conn = transport::dial(&ep, source, patience).await.unwrap();
        let mut ctl = transport::authenticate_dialer(&conn, TOKEN).await.unwrap();
        let many: Vec<u32> = (0..MAX_QUEUED_CHUNKS as u32 + 1).map(|i| i % 64).collect();
        ctl.send(&Msg::Request { chunks: many }).await.unwrap();
        let flood = closed_within(&conn, 10).await;
        // And one asking for a chunk the file does not have.
        let conn = transport::dial(&ep, source, patience).await.unwrap();
        let mut ctl = transport::authenticate_dialer(&conn, TOKEN).await.unwrap();
        ctl.send(&Msg::Request {
            chunks: vec![u32::MAX],
        })
        .await
        .unwrap();
        let out_of_range = closed_within(&conn, 10).await;
        (silent, flood, out_of_range)
    })
    .join()
    .unwrap();
    eprintln!("silent {silent:?}, flood {flood:?}, out of range {out_of_range:?}");
    assert!(
        silent.after_s.is_some_and(|s| s < 12.0),
        "a silent stranger is dropped: {silent:?}"
    );
    let protocol = Some(quinn::VarInt::from_u32(
        floodclone::transport::CLOSE_PROTOCOL,
    ));
    assert!(
        flood.after_s.is_some() && flood.code == protocol,
        "{flood:?}"
    );
    assert!(
        out_of_range.after_s.is_some() && out_of_range.code == protocol,
        "{out_of_range:?}"
    );
    // The swarm goes on.
    let recv = start(&mut bed, 1, &recv_args(0, &out, &[]), &scratch.0);
    recv.expect_complete("d1", 60.0);
    assert_copies(&src, [out]);
}

#[test]
fn recv_gives_up_on_a_source_gone_for_good_and_keeps_its_progress() {
    if !root_or_skip("recv_gives_up_on_a_source_gone_for_good_and_keeps_its_progress") {
        return;
    }
    let scratch = Scratch::new("source-gone");
    let src = scratch.0.join("src");
    write_test_file(&src, 8 * MIB, 27).unwrap();
    // 8 MiB over 8 Mbit/s: the source is killed well before the copy is complete.
    let mut bed = Testbed::up(&line(&["s", "d1"], 8)).unwrap();
    let out = scratch.0.join("d1.out");
    let recv = start(
        &mut bed,
        1,
        &recv_args(0, &out, &["--connect-timeout", "4"]),
        &scratch.0,
    );
    let send = start(&mut bed, 0, &send_args(&src, 1..=1), &scratch.0);
    assert!(recv.wait_event("welcome", 30.0).is_some());
    std::thread::sleep(std::time::Duration::from_secs(2));
    bed.child(send.handle).kill().unwrap();
    let status = recv
        .wait_exit(&mut bed, 30.0)
        .expect("recv gives up on its source");
    let err = recv.stderr_text();
    eprintln!("recv said: {err}");
    assert!(!status.success());
    assert!(
        err.contains("unreachable") && err.contains("progress is kept"),
        "{err}"
    );
    assert!(!out.exists());
    assert!(
        scratch.0.join("d1.out.floodclone-state").exists(),
        "progress kept"
    );
}

#[test]
fn claims_to_a_members_address_are_refused_before_and_after_it_joins() {
    if !root_or_skip("claims_to_a_members_address_are_refused_before_and_after_it_joins") {
        return;
    }
    use floodclone::{transport, wire::Msg};
    use std::net::{SocketAddr, SocketAddrV4};
    let scratch = Scratch::new("claimed-address");
    let src = scratch.0.join("src");
    // 8 MiB over 8 Mbit/s: d1 is still receiving when the second claim comes.
    write_test_file(&src, 8 * MIB, 28).unwrap();
    let mut bed = Testbed::up(&line(&["s", "d1", "d2"], 8)).unwrap();
    let out = scratch.0.join("d1.out");
    let send = start(&mut bed, 0, &send_args(&src, 1..=1), &scratch.0);
    // d2 holds the token and joins from its own address claiming d1's, first before d1 is
    // up (the source dials d1's address to check: nothing answers), then once d1 is.
    let source = SocketAddr::V4(SocketAddrV4::new(addr(0), 7878));
    let claim = |bed: &Testbed| {
        by_hand(bed, 2, move |ep| async move {
            let conn = transport::dial(&ep, source, std::time::Duration::from_secs(2))
                .await
                .unwrap();
            let mut ctl = transport::authenticate_dialer(&conn, TOKEN).await.unwrap();
            ctl.send(&Msg::Hello { id: u16::MAX }).await.unwrap();
            let join = Msg::Join {
                port: 7878,
                addrs: vec![addr(1).into()],
            };
            ctl.send(&join).await.unwrap();
            closed_within(&conn, 10).await
        })
        .join()
        .unwrap()
    };
    let not_member = Some(quinn::VarInt::from_u32(
        floodclone::transport::CLOSE_NOT_MEMBER,
    ));
    let early = claim(&bed);
    eprintln!("claim before d1 joined: {early:?}");
    assert_eq!(early.code, not_member, "the early claim is refused");
    let refused = send.wait_for(5.0, |e| match e {
        JsonEvent::ClaimRefused { member, addr, .. } => Some((member, addr)),
        _ => None,
    });
    assert_eq!(refused, Some((1, addr(1).to_string())), "and said");
    let recv = start(&mut bed, 1, &recv_args(0, &out, &[]), &scratch.0);
    assert!(recv.wait_event("welcome", 30.0).is_some());
    let late = claim(&bed);
    eprintln!("claim after d1 joined: {late:?}");
    assert_eq!(late.code, not_member, "the claim is refused");
    recv.expect_complete("d1", 60.0);
    assert_copies(&src, [out]);
    assert!(send.wait_exit(&mut bed, 30.0).is_some_and(|s| s.success()));
}

/// How a connection ended, as its dialer saw it within a wait.
#[derive(Debug)]
struct Closed {
    /// Seconds until it closed, if it did within the wait.
    after_s: Option<f64>,
    /// The application close code, if the peer closed it with one.
    code: Option<quinn::VarInt>,
}

/// Waits up to `secs` for `conn` to close.
async fn closed_within(conn: &quinn::Connection, secs: u64) -> Closed {
    let t = std::time::Instant::now();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(secs), conn.closed()).await;
    Closed {
        after_s: closed.is_ok().then(|| t.elapsed().as_secs_f64()),
        code: match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code),
            _ => None,
        },
    }
}

#[test]
fn a_member_claiming_the_routers_addresses_is_not_believed() {
    if !root_or_skip("a_member_claiming_the_routers_addresses_is_not_believed") {
        return;
    }
    use floodclone::{transport, wire::Msg};
    use floodclone_testbed::netns::link_addrs;
    use std::net::{SocketAddr, SocketAddrV4};
    let scratch = Scratch::new("claimed-router");
    let src = scratch.0.join("src");
    // Large enough that d1, which turns to the source after 5 s of nothing (the last
    // resort), is still running when the claim is refused (10-15 s in).
    write_test_file(&src, 48 * MIB, 29).unwrap();
    // s, d1 and d2 each behind router r. Member d2, holding the token, lists r's addresses
    // as its own: d1's gateway and the hop the source's trace to d1 shows then are "d2",
    // so d1 would pull only from d2, which says it holds everything and sends nothing.
    let topo = Topology::parse(
        "claimed-router",
        r#"node = [{name="s",role="source"},{name="d1",role="dest"},{name="d2",role="dest"},
                   {name="r",role="router"}]
           link = [{a="s",b="r",mbit=20},{a="r",b="d1",mbit=20},{a="r",b="d2",mbit=20}]"#,
    )
    .unwrap();
    let mut bed = Testbed::up(&topo).unwrap();
    let routers = vec![addr(3), link_addrs(0).1, link_addrs(1).0, link_addrs(2).0];
    let source = SocketAddr::V4(SocketAddrV4::new(addr(0), 7878));
    let out = scratch.0.join("d1.out");
    let send = start(&mut bed, 0, &send_args(&src, 1..=2), &scratch.0);
    let recv = start(&mut bed, 1, &recv_args(0, &out, &[]), &scratch.0);
    let liar = by_hand_on(&bed, 2, 7878, move |ep| async move {
        let server = ep.clone();
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok(mut ctl) = transport::authenticate_acceptor(&conn, TOKEN).await else {
                        return;
                    };
                    let all = Msg::Bitfield {
                        bits: vec![0xff; 1024],
                    };
                    let _ = ctl.send(&all).await;
                    conn.closed().await;
                });
            }
        });
        let conn = transport::dial(&ep, source, std::time::Duration::from_secs(5))
            .await
            .unwrap();
        let mut ctl = transport::authenticate_dialer(&conn, TOKEN).await.unwrap();
        ctl.send(&Msg::Hello { id: u16::MAX }).await.unwrap();
        let mut addrs: Vec<std::net::IpAddr> = vec![addr(2).into()];
        addrs.extend(routers.into_iter().map(std::net::IpAddr::from));
        ctl.send(&Msg::Join { port: 7878, addrs }).await.unwrap();
        // Welcomed: its own copy is "done"; it stays until the source ends the swarm.
        let mut told_done = false;
        while let Ok(Some(msgs)) = ctl.recv.recv_batch().await {
            if !told_done && msgs.iter().any(|m| matches!(m, Msg::Welcome { .. })) {
                told_done = true;
                ctl.send(&Msg::Done { elapsed_ms: 1 }).await.unwrap();
            }
        }
    });
    // d1 asks who is at its gateway: nothing answers as d2 there, so d1 stops taking
    // what lies beyond the router as behind d2.
    let refused = recv.wait_for(30.0, |e| match e {
        JsonEvent::ClaimRefused {
            member,
            addr,
            reason,
        } => Some((member, addr, reason)),
        _ => None,
    });
    eprintln!("d1: {refused:?}");
    let (member, gateway, _) = refused.expect("d1 refuses d2's claim to its gateway");
    assert_eq!((member, gateway), (2, link_addrs(1).0.to_string()));
    recv.expect_complete("d1", 60.0);
    assert_copies(&src, [out]);
    assert!(send.wait_exit(&mut bed, 30.0).is_some_and(|s| s.success()));
    liar.join().unwrap();
}

/// A router that answers no trace at first must not keep a receiver off its second way in
/// for the whole transfer. Members spend their ICMP budget for a peer (6 errors, then one a
/// second) answering "port unreachable" to dials that came before they listened, so a trace
/// at the start often meets a silent hop; the source asks for it again
/// (`overlay::PathChecks::retrace`). Here router r has spent its budget for d1 and earns
/// none back until 2.5 s in: d1's first trace of its path to d3 (through r only: the way
/// d3's routes hide) is unknown, a later one clean.
#[test]
fn a_path_traced_through_a_silent_router_is_traced_again() {
    if !root_or_skip("a_path_traced_through_a_silent_router_is_traced_again") {
        return;
    }
    let topo = routes_differ_by_direction();
    let scratch = Scratch::new("silent-router");
    let src = scratch.0.join("src");
    let bytes = 24 * MIB;
    write_test_file(&src, bytes, 5).unwrap();
    let mut bed = Testbed::up(&topo).unwrap();
    let (d1, d3, r) = (1, 3, 4);
    let ns = bed.netns(r);
    let sysctl = |v: &str| {
        let ok = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "sysctl", "-qw"])
            .arg(format!("net.ipv4.icmp_ratelimit={v}"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "sysctl in {ns}");
    };
    // One ICMP error a minute from r, and its burst for d1 spent by probes that expire there.
    sysctl("60000");
    let target = addr(d3);
    bed.in_netns(d1, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_ttl(1).unwrap();
        for _ in 0..10 {
            let _ = sock.send_to(b"x", (target, 33434));
        }
    })
    .join()
    .unwrap();
    let d1_to_r_before = bed.tx_bytes(d1, r).unwrap();
    let send = start(&mut bed, 0, &send_args(&src, 1..=3), &scratch.0);
    let out = |i: usize| scratch.0.join(format!("d{i}.out"));
    let recvs: Vec<_> = (1..=3)
        .map(|i| start(&mut bed, i, &recv_args(0, &out(i), &[]), &scratch.0))
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    sysctl("1");
    for (i, rv) in recvs.iter().enumerate() {
        rv.expect_complete(&format!("d{}", i + 1), 90.0);
    }
    assert!(send.wait_exit(&mut bed, 30.0).is_some_and(|s| s.success()));
    assert_copies(&src, (1..=3).map(out));
    let copies = (bed.tx_bytes(d1, r).unwrap() - d1_to_r_before) as f64 / bytes as f64;
    eprintln!("d1 -> r carried {copies:.2} copies of the file");
    assert!(
        copies > 0.4,
        "d3 must pull from d1 over r once r answers again: d1 -> r carried {copies:.2} copies"
    );
}
