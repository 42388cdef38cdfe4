//! Real transfers on the testbed: every shipped topology, awkward sizes, and a file much
//! larger than the memory a node may use. Speed is not asserted here (see `cargo xtask
//! bench`); what is asserted is that every copy arrives byte-identical.

use floodclone_testbed::{run::RunOptions, Topology};
use floodclone_tests::{root_or_skip, shipped, transfer};

const MIB: u64 = 1 << 20;

macro_rules! topology_test {
    ($name:ident, $file:literal) => {
        #[test]
        fn $name() {
            if !root_or_skip(stringify!($name)) {
                return;
            }
            transfer(&shipped($file), &RunOptions::new(4 * MIB));
        }
    };
}

topology_test!(star_delivers_identical_copies, "star");
topology_test!(chain_delivers_identical_copies, "chain");
topology_test!(tree_delivers_identical_copies, "tree");
topology_test!(ring_plus_star_delivers_identical_copies, "ring-plus-star");
topology_test!(dumbbell_delivers_identical_copies, "dumbbell");
topology_test!(asymmetric_delivers_identical_copies, "asymmetric");
topology_test!(heterogeneous_delivers_identical_copies, "heterogeneous");
topology_test!(mesh_delivers_identical_copies, "mesh");

fn small_chain(mbit: u32) -> Topology {
    Topology::parse(
        "small-chain",
        &format!(
            r#"node = [{{name="s",role="source"}},{{name="d1",role="dest"}},{{name="d2",role="dest"}}]
               link = [{{a="s",b="d1",mbit={mbit}}},{{a="d1",b="d2",mbit={mbit}}}]"#
        ),
    )
    .unwrap()
}

#[test]
fn empty_one_byte_and_ragged_sizes_arrive_intact() {
    if !root_or_skip("empty_one_byte_and_ragged_sizes_arrive_intact") {
        return;
    }
    // 0 bytes (no chunk at all), 1 byte, one chunk and one byte (a 1-byte last chunk).
    for bytes in [0, 1, 128 * 1024 + 1] {
        transfer(&small_chain(40), &RunOptions::new(bytes));
    }
}

#[test]
fn large_file_moves_with_bounded_memory() {
    if !root_or_skip("large_file_moves_with_bounded_memory") {
        return;
    }
    // Links far faster than the CPU: the limit here is the machine, not the network.
    let bytes = 256 * MIB;
    let report = transfer(&small_chain(10_000), &RunOptions::new(bytes));
    let peaks: Vec<u64> = report
        .dests
        .iter()
        .filter_map(|d| d.peak_rss_bytes)
        .chain(report.source_peak_rss_bytes)
        .collect();
    assert_eq!(peaks.len(), 3, "every process reports its peak memory");
    for peak in peaks {
        eprintln!("peak RSS {} MiB for a {} MiB file", peak / MIB, bytes / MIB);
        assert!(
            peak < bytes / 4,
            "peak RSS {peak} bytes is not well below the file size"
        );
    }
}
