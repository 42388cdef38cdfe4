//! A directory tree as one swarm (issue 22), on the testbed: a tree with every kind of
//! entry arrives identical entry by entry; a `recv` killed mid-tree resumes without
//! fetching again what it had verified; a source whose manifest names a path outside the
//! tree is refused with the reason and nothing is written.

use floodclone_testbed::Testbed;
use floodclone_tests::{
    assert_tree_copies, by_hand_on, line, recv_args, root_or_skip, send_args, start,
    write_test_tree, Scratch, TOKEN,
};

const MIB: u64 = 1 << 20;

#[test]
fn a_tree_arrives_identical_and_a_killed_recv_resumes_mid_tree() {
    if !root_or_skip("a_tree_arrives_identical_and_a_killed_recv_resumes_mid_tree") {
        return;
    }
    let scratch = Scratch::new("tree");
    let src = scratch.0.join("src");
    write_test_tree(&src, 6 * MIB, 40);
    let mut bed = Testbed::up(&line(&["s", "d1", "d2", "d3"], 40)).unwrap();
    let out = |i: usize| scratch.0.join(format!("d{i}.tree"));
    let send = start(&mut bed, 0, &send_args(&src, 1..=3), &scratch.0);
    // d1 pins the tree by its hash, as `send` prints it.
    let b3 = floodclone::manifest::Manifest::from_file(&src, None)
        .unwrap()
        .b3()
        .unwrap();
    let extra = |i: usize| {
        if i == 1 {
            vec!["--expect", b3.as_str()]
        } else {
            vec![]
        }
    };
    let mut recvs: Vec<_> = (1..=3)
        .map(|i| start(&mut bed, i, &recv_args(0, &out(i), &extra(i)), &scratch.0))
        .collect();
    // d3 (the far end) is killed once it holds part of the tree, then started again.
    let chunks = recvs[2]
        .wait_for(30.0, |e| match e {
            floodclone_events::Event::Welcome { chunks, .. } => Some(chunks as u64),
            _ => None,
        })
        .expect("d3 welcomed");
    let part = scratch.0.join("d3.tree.floodclone-part");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert!(
        part.is_dir() && !out(3).exists(),
        "the tree is staged, not at --out"
    );
    bed.child(recvs[2].handle).kill().unwrap();
    let _ = bed.child(recvs[2].handle).wait();
    assert!(!out(3).exists(), "a killed recv leaves nothing at --out");
    recvs[2] = start(&mut bed, 3, &recv_args(0, &out(3), &[]), &scratch.0);
    // A stall here was seen once in CI (d2 and the restarted d3 both at 132 of 141 chunks
    // for 80 s): every node's last words, to tell who waited on whom.
    let done = recvs[2].complete_within(90.0).unwrap_or_else(|| {
        panic!(
            "restarted d3 did not complete: {}\n--- d2:\n{}\n--- d1:\n{}\n--- s:\n{}",
            recvs[2].stderr_text(),
            recvs[1].stderr_tail(40),
            recvs[0].stderr_tail(40),
            send.stderr_tail(80)
        )
    });
    let (resumed, received) = (done.resumed_chunks as u64, done.received_chunks);
    eprintln!("d3 resumed {resumed} chunks and received {received} of {chunks}");
    assert!(resumed > 0, "nothing was resumed");
    assert_eq!(
        resumed + received,
        chunks,
        "re-fetched chunks it had verified"
    );
    for (i, r) in recvs.iter().enumerate().take(2) {
        r.expect_complete(&format!("d{}", i + 1), 60.0);
    }
    assert!(send.wait_exit(&mut bed, 30.0).is_some_and(|s| s.success()));
    assert_tree_copies(&src, (1..=3).map(out));
}

#[test]
fn a_manifest_naming_a_path_outside_the_tree_is_refused_and_nothing_written() {
    if !root_or_skip("a_manifest_naming_a_path_outside_the_tree_is_refused_and_nothing_written") {
        return;
    }
    use floodclone::{manifest::Manifest, transport, wire::Msg};
    let scratch = Scratch::new("tree-escape");
    let src = scratch.0.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("zzzz"), b"would land at ../x").unwrap();
    let manifest = Manifest::from_file(&src, None).unwrap();
    let mut bed = Testbed::up(&line(&["s", "d1"], 40)).unwrap();
    let out = scratch.0.join("deep").join("d1.tree");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let recv = start(
        &mut bed,
        1,
        &recv_args(0, &out, &["--connect-timeout", "6s"]),
        &scratch.0,
    );
    // A hand-made source holding the token: its Welcome's tree names "../x" (the same
    // checks refuse "/etc/x" and every other name outside the tree: the tree module's unit
    // tests).
    let fake = by_hand_on(&bed, 0, 7878, move |ep| async move {
        let incoming = tokio::time::timeout(std::time::Duration::from_secs(20), ep.accept())
            .await
            .ok()??;
        let conn = incoming.await.ok()?;
        let mut ctl = transport::authenticate_acceptor(&conn, TOKEN).await.ok()?;
        let welcome = Msg::Welcome {
            you: 1,
            manifest,
            members: Vec::new(),
            relay: true,
            hash_ahead: None,
        };
        let mut frame = welcome.encode();
        let at = frame.windows(4).position(|w| w == b"zzzz")?;
        frame[at..at + 4].copy_from_slice(b"../x");
        ctl.send.write_all(&frame).await.ok()?;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), conn.closed()).await;
        Some(())
    });
    let status = recv.wait_exit(&mut bed, 40.0).expect("recv gives up");
    let err = recv.stderr_text();
    eprintln!("d1 said: {err}");
    assert!(
        fake.join().unwrap().is_some(),
        "d1 never got the hand-made Welcome"
    );
    assert!(!status.success());
    assert!(err.contains("../x"), "the reason names the entry: {err}");
    assert!(!scratch.0.join("x").exists() && !scratch.0.join("deep/x").exists());
    assert!(!out.exists(), "nothing at --out");
    assert!(
        !scratch.0.join("deep/d1.tree.floodclone-part").exists(),
        "nothing staged"
    );
}
