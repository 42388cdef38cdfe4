//! The emulated testbed itself: shaping, routing, teardown, and the eBPF programs loading in a
//! namespace.

use floodclone_testbed::{
    netns::{self, list_namespaces},
    Testbed, Topology,
};
use floodclone_tests::{floodclone_bin, root_or_skip, tcp_rate_mbit};

fn two_nodes(ab: u32, ba: u32) -> Topology {
    Topology::parse(
        "pair",
        &format!(
            r#"node = [{{name="s",role="source"}},{{name="d",role="dest"}}]
               link = [{{a="s",b="d",mbit_ab={ab},mbit_ba={ba}}}]"#
        ),
    )
    .unwrap()
}

fn assert_within(measured: f64, configured: f64, tolerance: f64) {
    let err = (measured - configured).abs() / configured;
    assert!(
        err <= tolerance,
        "measured {measured:.2} Mbit/s on a {configured} Mbit/s link ({:.1}% off)",
        err * 100.0
    );
}

#[test]
fn shaped_link_carries_its_configured_rate_in_each_direction() {
    if !root_or_skip("shaped_link_carries_its_configured_rate_in_each_direction") {
        return;
    }
    let bed = Testbed::up(&two_nodes(40, 10)).unwrap();
    let forward = tcp_rate_mbit(&bed, 0, 1, 3.0);
    let backward = tcp_rate_mbit(&bed, 1, 0, 3.0);
    eprintln!("s->d {forward:.2} Mbit/s (40 configured), d->s {backward:.2} (10 configured)");
    assert_within(forward, 40.0, 0.10);
    assert_within(backward, 10.0, 0.10);
    let prefix = bed.prefix.clone();
    drop(bed);
    assert!(
        list_namespaces().iter().all(|n| !n.starts_with(&prefix)),
        "teardown left namespaces"
    );
}

#[test]
fn routes_cross_non_member_routers() {
    if !root_or_skip("routes_cross_non_member_routers") {
        return;
    }
    let topo = Topology::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../topologies/dumbbell.toml"
    )))
    .unwrap();
    let bed = Testbed::up(&topo).unwrap();
    let (s, d5) = (bed.node_index("s").unwrap(), bed.node_index("d5").unwrap());
    // Three hops through two routers; the 30 Mbit/s middle is the bottleneck.
    let rate = tcp_rate_mbit(&bed, s, d5, 2.0);
    eprintln!("s->d5 across the dumbbell: {rate:.2} Mbit/s (30 bottleneck)");
    assert_within(rate, 30.0, 0.10);
}

#[test]
fn teardown_happens_on_panic() {
    if !root_or_skip("teardown_happens_on_panic") {
        return;
    }
    let prefix = std::thread::spawn(|| {
        let bed = Testbed::up(&two_nodes(10, 10)).unwrap();
        let prefix = bed.prefix.clone();
        std::panic::panic_any(prefix);
    })
    .join()
    .unwrap_err()
    .downcast::<String>()
    .unwrap();
    assert!(list_namespaces().iter().all(|n| !n.starts_with(&*prefix)));
}

#[test]
fn persisted_testbed_is_removed_by_name() {
    if !root_or_skip("persisted_testbed_is_removed_by_name") {
        return;
    }
    let chain = Topology::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../topologies/chain.toml"
    )))
    .unwrap();
    let prefix = format!("fc-t{}-chain-", std::process::id());
    Testbed::up_with_prefix(&chain, &prefix).unwrap().persist();
    let count = || {
        list_namespaces()
            .iter()
            .filter(|n| n.starts_with(&prefix))
            .count()
    };
    assert_eq!(count(), 5);
    netns::remove_namespaces(&prefix);
    assert_eq!(count(), 0);
}

#[test]
fn ebpf_programs_load_and_count_inside_a_namespace() {
    if !root_or_skip("ebpf_programs_load_and_count_inside_a_namespace") {
        return;
    }
    let bin = floodclone_bin();
    let bed = Testbed::up(&two_nodes(40, 40)).unwrap();
    // Traffic while `floodclone stats` measures, so the peer shows up with a rate.
    let traffic = {
        let bed_ref = &bed;
        std::thread::scope(|scope| {
            let t = scope.spawn(|| tcp_rate_mbit(bed_ref, 0, 1, 3.0));
            std::thread::sleep(std::time::Duration::from_millis(1000));
            let out = bed_ref
                .command(0, bin.to_str().unwrap())
                .args(["stats", "--json", "--interval", "1"])
                .output()
                .unwrap();
            let rate = t.join().unwrap();
            (out, rate)
        })
    };
    let (out, tcp) = traffic;
    assert!(
        out.status.success(),
        "floodclone stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["source"], "attached");
    let links = report["links"].as_array().unwrap();
    let peer = links
        .iter()
        .find(|l| l["peer"] == "10.100.0.2" && l["iface"] == "v-d")
        .unwrap_or_else(|| panic!("peer missing from {report}"));
    let tx = peer["tx_mbit_s"].as_f64().unwrap();
    eprintln!("eBPF saw {tx:.2} Mbit/s on the wire while TCP moved {tcp:.2} Mbit/s of payload");
    assert_within(tx, 40.0, 0.10);
}
