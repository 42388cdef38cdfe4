//! Faults and bad input on the testbed: wrong tokens, an output that cannot be written, a
//! relay killed mid-transfer and restarted.

use floodclone_tests::{addr, root_or_skip, start, Scratch};
use xtask::{run::write_test_file, testbed::Testbed, topology::Topology};

const MIB: u64 = 1 << 20;

fn line(names: &[&str], mbit: u32) -> Topology {
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

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

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
            "right",
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
            "wrong",
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
    assert!(!status.success());
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
            "t",
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
                "t",
            ]),
            &scratch.0,
        ));
    }
    let st1 = recvs[0].wait_exit(&mut bed, 30.0).expect("d1 exits");
    assert!(!st1.success());
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
    assert!(
        recvs[1].wait_event("complete", 30.0).is_some(),
        "d2 completes"
    );
    assert_eq!(std::fs::read(&fine).unwrap(), std::fs::read(&src).unwrap());
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
    let mut send_args = strings(&["send", src.to_str().unwrap(), "--token", "t"]);
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
            "t",
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
        let done = r.wait_event("complete", 90.0);
        assert!(
            done.is_some(),
            "d{} did not complete: {}",
            i + 1,
            r.stderr_text()
        );
    }
    // Restarted, d1 resumes and fetches only what it lacked.
    recvs[0] = start(&mut bed, 1, &recv_args(1), &scratch.0);
    let done = recvs[0]
        .wait_event("complete", 90.0)
        .expect("restarted d1 completes");
    let chunks = bytes.div_ceil(128 << 10);
    let resumed = done["resumed_chunks"].as_u64().unwrap();
    let received = done["received_chunks"].as_u64().unwrap();
    eprintln!("d1 resumed {resumed} chunks and received {received} of {chunks}");
    assert!(resumed > 0, "nothing was resumed");
    assert_eq!(
        resumed + received,
        chunks,
        "re-fetched chunks it had verified"
    );
    assert!(send.wait_exit(&mut bed, 30.0).is_some_and(|s| s.success()));
    for i in 1..=3 {
        assert_eq!(
            std::fs::read(out(i)).unwrap(),
            std::fs::read(&src).unwrap(),
            "d{i}"
        );
    }
}
