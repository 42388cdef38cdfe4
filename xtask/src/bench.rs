//! `cargo xtask bench`: every topology on the real testbed, several runs each, against the
//! floor and against the direct baseline (the source sends to every destination over its
//! own connection, nothing relayed), measured in the same run.

use std::{io::Write, path::Path, time::Duration};

use anyhow::Result;
use serde::Serialize;

use floodclone_testbed::{
    run::{render, run_copy, run_transfer, Baseline, CopyReport, RunOptions, RunReport},
    topology::Topology,
};

#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub topology: String,
    pub bytes: u64,
    pub u_min_s: f64,
    pub u_median_s: Option<f64>,
    pub u_min_run_s: Option<f64>,
    pub u_max_run_s: Option<f64>,
    pub ratio_median: Option<f64>,
    pub runs_ok: usize,
    pub runs: usize,
    pub direct_ratio_median: Option<f64>,
    /// Most copies any link direction carried (median run), wire bytes / file bytes.
    pub max_link_copies: Option<f64>,
    /// The simulator's U/U_min on the same network (headers counted; no start-up).
    pub sim_ratio: Option<f64>,
    /// Median U over the floor along the routers' routes ([`RunReport::ratio_routed`]).
    pub ratio_routed_median: Option<f64>,
    /// Work conservation (median run): seconds link directions idled while needed, in all
    /// and on the source's links ([`floodclone_testbed::idle`]).
    pub idle_s: Option<f64>,
    pub source_idle_s: Option<f64>,
    /// With TCP cross flows (median run): the first flow's payload Mbit/s alone and during
    /// the transfer, its share of its narrowest link during, and U over the floor on the
    /// capacity the flows left (median of runs).
    pub cross_before_mbit: Option<f64>,
    pub cross_during_mbit: Option<f64>,
    pub cross_share: Option<f64>,
    pub ratio_left_median: Option<f64>,
    /// CPU cost (medians of runs): user + system seconds of every floodclone process per
    /// GiB delivered (file size times destinations), and the whole machine's busy seconds
    /// per GiB until U; the same for the plain TCP copy, the bare QUIC copy and the bare
    /// copy checked and stored ([`run_copy`]).
    pub cpu_s_per_gib: Option<f64>,
    pub machine_cpu_s_per_gib: Option<f64>,
    pub tcp_ratio_median: Option<f64>,
    pub tcp_cpu_s_per_gib: Option<f64>,
    pub tcp_machine_cpu_s_per_gib: Option<f64>,
    pub quic_ratio_median: Option<f64>,
    pub quic_cpu_s_per_gib: Option<f64>,
    pub checked_quic_ratio_median: Option<f64>,
    pub checked_quic_cpu_s_per_gib: Option<f64>,
    /// Largest peak resident memory of any floodclone process, over the runs.
    pub peak_rss_mib: Option<f64>,
    /// When the source's first chunk left, ms after `send` started (median of runs).
    pub first_chunk_ms: Option<f64>,
    /// The narrowest link's rate, for the rate table.
    pub min_link_mbit: f64,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// CPU seconds of every floodclone process in a run per GiB delivered.
fn cpu_s_per_gib(r: &RunReport) -> Option<f64> {
    let dests: Option<f64> = r.dests.iter().map(|d| d.cpu_s).sum();
    Some((r.source_cpu_s? + dests?) / delivered_gib(r.bytes, r.dests.len()))
}

fn delivered_gib(bytes: u64, dests: usize) -> f64 {
    bytes as f64 * dests as f64 / (1u64 << 30) as f64
}

/// How many runs of each kind a topology gets, and which runs keep their logs.
#[derive(Clone, Copy, Debug)]
pub struct BenchPlan {
    pub runs: usize,
    pub baseline_runs: usize,
    /// Plain TCP copies of the same bytes per topology ([`Baseline::Tcp`]).
    pub tcp_runs: usize,
    /// Bare QUIC copies of the same bytes per topology ([`Baseline::Quic`]).
    pub quic_runs: usize,
    /// The same with every byte hashed and stored ([`Baseline::QuicChecked`]).
    pub checked_quic_runs: usize,
    /// Keep every node's log and events of a floodclone run whose U/U_min is above this,
    /// or that failed: a slow run that comes once in a hundred explains itself.
    pub keep_logs_over: Option<f64>,
}

/// Runs the benchmark for each topology (each run as `base` says: its size, one file or
/// a tree of several), appending JSON lines of every run to `jsonl`; pictures, and the
/// logs `plan` keeps, go to `pictures`. `quic_copy` is the program of the bare QUIC
/// copies, needed when `plan` asks for them.
pub fn bench(
    topos: &[Topology],
    bin: &Path,
    quic_copy: Option<&Path>,
    base: &RunOptions,
    plan: BenchPlan,
    jsonl: &mut impl Write,
    pictures: &Path,
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for topo in topos {
        let runs = run_topology(topo, bin, quic_copy, base, plan, jsonl, pictures)?;
        rows.push(row(topo, base, plan.runs, &runs));
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(rows)
}

/// Every run of one topology, by kind.
struct TopologyRuns {
    ours: Vec<RunReport>,
    direct: Vec<RunReport>,
    tcp: Vec<CopyReport>,
    quic: Vec<CopyReport>,
    checked_quic: Vec<CopyReport>,
}

/// The runs `plan` asks of `topo` (floodclone and the direct baseline alternating), each
/// printed and appended to `jsonl` as it ends.
fn run_topology(
    topo: &Topology,
    bin: &Path,
    quic_copy: Option<&Path>,
    base: &RunOptions,
    plan: BenchPlan,
    jsonl: &mut impl Write,
    pictures: &Path,
) -> Result<TopologyRuns> {
    let mut runs = TopologyRuns {
        ours: Vec::new(),
        direct: Vec::new(),
        tcp: Vec::new(),
        quic: Vec::new(),
        checked_quic: Vec::new(),
    };
    let mut opts = base.clone();
    opts.quiet = true;
    let mut direct_opts = opts.clone();
    direct_opts.send_args.push("--direct".into());
    for i in 0..plan.runs.max(plan.baseline_runs) {
        if i < plan.runs {
            let r = run_ours(topo, bin, &opts, i + 1, plan.keep_logs_over, pictures)?;
            write_run(jsonl, "floodclone", &r)?;
            runs.ours.push(r);
        }
        if i < plan.baseline_runs {
            let r = run_transfer(topo, bin, &direct_opts)?;
            eprintln!(
                "[{} direct {}] U/U_min = {}",
                topo.name,
                i + 1,
                r.ratio.map_or("failed".into(), |x| format!("{x:.3}"))
            );
            write_run(jsonl, "direct", &r)?;
            runs.direct.push(r);
        }
    }
    let quic = quic_copy.map(|p| Baseline::Quic(p.to_path_buf()));
    let checked_quic = quic_copy.map(|p| Baseline::QuicChecked(p.to_path_buf()));
    for (baseline, n, reports) in [
        (Some(Baseline::Tcp), plan.tcp_runs, &mut runs.tcp),
        (quic, plan.quic_runs, &mut runs.quic),
        (checked_quic, plan.checked_quic_runs, &mut runs.checked_quic),
    ] {
        let Some(baseline) = baseline else {
            continue;
        };
        for i in 0..n {
            let r = run_copy(topo, base.bytes, &baseline)?;
            eprintln!(
                "[{} {} {}] U/U_min = {:.3}, CPU {:.2} s/GiB (machine {:.2})",
                topo.name,
                baseline.mode(),
                i + 1,
                r.ratio,
                r.cpu_s_per_gib,
                r.machine_cpu_s_per_gib
            );
            write_run(jsonl, baseline.mode(), &r)?;
            reports.push(r);
        }
    }
    Ok(runs)
}

/// One JSON line for a run of kind `mode` (floodclone, direct, tcp).
fn write_run(jsonl: &mut impl Write, mode: &str, report: &impl Serialize) -> Result<()> {
    writeln!(
        jsonl,
        "{}",
        serde_json::json!({"mode": mode, "report": report})
    )?;
    Ok(())
}

/// Floodclone's run number `n` of `topo`, its picture in `pictures`, and its logs too if
/// it took more than `keep_logs_over` x U_min (or failed).
fn run_ours(
    topo: &Topology,
    bin: &Path,
    opts: &RunOptions,
    n: usize,
    keep_logs_over: Option<f64>,
    pictures: &Path,
) -> Result<RunReport> {
    let mut o = opts.clone();
    o.picture = Some(pictures.join(format!("{}-run{n}.svg", topo.name)));
    let logs = pictures.join(format!("{}-run{n}-logs", topo.name));
    if keep_logs_over.is_some() {
        o.logs = Some(logs.clone());
    }
    let r = run_transfer(topo, bin, &o)?;
    eprint!("[{} run {n}] {}", topo.name, render(&r));
    if let Some(over) = keep_logs_over {
        if r.ratio.is_some_and(|x| x <= over) {
            std::fs::remove_dir_all(&logs)?;
        } else {
            eprintln!("  logs kept: {}/", logs.display());
        }
    }
    Ok(r)
}

/// The table's row for `topo`: medians over its runs.
fn row(topo: &Topology, base: &RunOptions, runs: usize, all: &TopologyRuns) -> BenchRow {
    let TopologyRuns {
        ours,
        direct,
        tcp,
        quic,
        checked_quic,
    } = all;
    let bytes = base.bytes;
    let us: Vec<f64> = ours.iter().filter_map(|r| r.u_s).collect();
    let median_run = {
        let m = median(us.clone());
        ours.iter().find(|r| r.u_s == m)
    };
    BenchRow {
        topology: match base.files {
            1 => topo.name.clone(),
            n => format!("{} ({n} files)", topo.name),
        },
        bytes,
        u_min_s: ours.first().map_or(0.0, |r| r.u_min_s),
        u_median_s: median(us.clone()),
        u_min_run_s: us.iter().copied().reduce(f64::min),
        u_max_run_s: us.iter().copied().reduce(f64::max),
        ratio_median: median(ours.iter().filter_map(|r| r.ratio).collect()),
        runs_ok: us.len(),
        runs,
        direct_ratio_median: median(direct.iter().filter_map(|r| r.ratio).collect()),
        max_link_copies: median_run.and_then(|r| r.link_copies.first().map(|c| c.2)),
        sim_ratio: sim_ratio(topo, bytes),
        ratio_routed_median: median(ours.iter().filter_map(|r| r.ratio_routed).collect()),
        idle_s: median_run.map(|r| r.idle_s),
        source_idle_s: median_run.map(|r| r.source_idle_s),
        cross_before_mbit: median_run.and_then(|r| r.cross.first().map(|c| c.before_mbit)),
        cross_during_mbit: median_run.and_then(|r| r.cross.first().map(|c| c.during_mbit)),
        cross_share: median_run.and_then(|r| r.cross.first().map(|c| c.during_share())),
        ratio_left_median: median(ours.iter().filter_map(|r| r.ratio_left).collect()),
        cpu_s_per_gib: median(ours.iter().filter_map(cpu_s_per_gib).collect()),
        machine_cpu_s_per_gib: median(
            ours.iter()
                .filter_map(|r| Some(r.machine_cpu_s? / delivered_gib(r.bytes, r.dests.len())))
                .collect(),
        ),
        tcp_ratio_median: median(tcp.iter().map(|r| r.ratio).collect()),
        tcp_cpu_s_per_gib: median(tcp.iter().map(|r| r.cpu_s_per_gib).collect()),
        tcp_machine_cpu_s_per_gib: median(tcp.iter().map(|r| r.machine_cpu_s_per_gib).collect()),
        quic_ratio_median: median(quic.iter().map(|r| r.ratio).collect()),
        quic_cpu_s_per_gib: median(quic.iter().map(|r| r.cpu_s_per_gib).collect()),
        checked_quic_ratio_median: median(checked_quic.iter().map(|r| r.ratio).collect()),
        checked_quic_cpu_s_per_gib: median(checked_quic.iter().map(|r| r.cpu_s_per_gib).collect()),
        peak_rss_mib: ours
            .iter()
            .flat_map(|r| {
                r.dests
                    .iter()
                    .map(|d| d.peak_rss_bytes)
                    .chain([r.source_peak_rss_bytes])
            })
            .flatten()
            .max()
            .map(|b| b as f64 / (1 << 20) as f64),
        first_chunk_ms: median(
            ours.iter()
                .filter_map(|r| r.first_chunk_s.map(|s| s * 1e3))
                .collect(),
        ),
        min_link_mbit: topo
            .links
            .iter()
            .map(|l| l.mbit_from(l.a).min(l.mbit_from(l.b)))
            .fold(f64::INFINITY, f64::min),
    }
}

/// The simulator's U/U_min for `topo`, counting headers as the testbed's wire does (as
/// `cargo xtask sim --wire` runs it).
fn sim_ratio(topo: &Topology, bytes: u64) -> Option<f64> {
    // The simulator models neither other people's traffic nor upload caps.
    if !topo.cross.is_empty() || topo.nodes.iter().any(|n| n.max_mbit.is_some()) {
        return None;
    }
    let opts = crate::sim::SimOptions {
        bytes,
        chunk_bytes: floodclone_sched::default_chunk_bytes(bytes) as u64,
        hop_delay_s: 1e-3,
        horizon_s: 1e5,
        payload_share: crate::sim::WIRE_PAYLOAD_SHARE,
        reshare_batch_s: crate::sim::RESHARE_BATCH_S,
    };
    let u_min = floodclone_testbed::bound::u_min_with_delay_s(topo, bytes as f64 * 8.0)?;
    crate::sim::simulate(topo, &opts)
        .ok()?
        .u_s
        .map(|u| u / u_min)
}

/// `a` over `b` as "2.1x", or "-" without both.
fn times(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.1}x", a / b),
        _ => "-".into(),
    }
}

/// The table, as markdown, and for more than one network a summary: median and worst
/// U/U_min, and how far the simulator was from the testbed.
pub fn table(rows: &[BenchRow]) -> String {
    let f = fixed;
    let mut s = String::from(
        "| topology | U_min s | U median s | U min..max s | U/U_min | routed | direct U/U_min | max copies/link | sim U/U_min | idle s (source) | ok |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {:.2} | {} | {}..{} | {} | {} | {} | {} | {} | {} ({}) | {}/{} |\n",
            r.topology,
            r.u_min_s,
            f(r.u_median_s, 2),
            f(r.u_min_run_s, 2),
            f(r.u_max_run_s, 2),
            f(r.ratio_median, 3),
            f(r.ratio_routed_median, 3),
            f(r.direct_ratio_median, 3),
            f(r.max_link_copies, 2),
            f(r.sim_ratio, 3),
            f(r.idle_s, 1),
            f(r.source_idle_s, 1),
            r.runs_ok,
            r.runs
        );
    }
    if rows.iter().any(|r| r.cross_before_mbit.is_some()) {
        s += "\nOther people's traffic (a TCP flow, the kernel's default congestion control):\n\n\
              | topology | TCP alone Mbit/s | TCP during Mbit/s | its share of the link during | U/U_min on what it left |\n\
              |---|---:|---:|---:|---:|\n";
        for r in rows.iter().filter(|r| r.cross_before_mbit.is_some()) {
            s += &format!(
                "| {} | {} | {} | {} | {} |\n",
                r.topology,
                f(r.cross_before_mbit, 1),
                f(r.cross_during_mbit, 1),
                r.cross_share
                    .map_or("-".into(), |x| format!("{:.0}%", 100.0 * x)),
                f(r.ratio_left_median, 3),
            );
        }
    }
    if rows.iter().any(|r| r.tcp_ratio_median.is_some()) {
        s += "\nRate and CPU cost, against a plain TCP copy from the source to every destination \
              at once (sendfile; medians of runs). CPU s/GiB: user + system seconds of the \
              processes (FloodClone: every node's; TCP: the copy's threads) per GiB delivered \
              (file size x destinations); machine: every core's busy seconds until U, the \
              kernel's forwarding and shaping included.\n\n\
              | topology | slowest link Gbit/s | U/U_min | TCP U/U_min | CPU s/GiB | TCP CPU s/GiB | CPU vs TCP | machine s/GiB | TCP machine s/GiB | peak RSS MiB | first chunk ms |\n\
              |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for r in rows.iter().filter(|r| r.tcp_ratio_median.is_some()) {
            s += &format!(
                "| {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.topology,
                r.min_link_mbit / 1e3,
                f(r.ratio_median, 3),
                f(r.tcp_ratio_median, 3),
                f(r.cpu_s_per_gib, 2),
                f(r.tcp_cpu_s_per_gib, 2),
                times(r.cpu_s_per_gib, r.tcp_cpu_s_per_gib),
                f(r.machine_cpu_s_per_gib, 2),
                f(r.tcp_machine_cpu_s_per_gib, 2),
                f(r.peak_rss_mib, 0),
                f(r.first_chunk_ms, 0),
            );
        }
    }
    s += &transport_alone_table(rows);
    if rows.len() > 1 {
        let ratios: Vec<f64> = rows.iter().filter_map(|r| r.ratio_median).collect();
        let routed: Vec<f64> = rows.iter().filter_map(|r| r.ratio_routed_median).collect();
        let diffs: Vec<f64> = rows
            .iter()
            .filter_map(|r| Some((r.ratio_median? - r.sim_ratio?).abs()))
            .collect();
        s += &format!(
            "\n{} networks: U/U_min median {}, worst {} (along the routes: median {}, worst {}); \
             |sim - testbed| median {}, worst {}; {} of {} over 1.10\n",
            rows.len(),
            f(median(ratios.clone()), 3),
            f(ratios.iter().copied().reduce(f64::max), 3),
            f(median(routed.clone()), 3),
            f(routed.iter().copied().reduce(f64::max), 3),
            f(median(diffs.clone()), 3),
            f(diffs.iter().copied().reduce(f64::max), 3),
            ratios.iter().filter(|&&x| x > 1.10).count(),
            rows.len(),
        );
    }
    s
}

/// The bare QUIC copy beside FloodClone and the TCP copy, when the bench ran it.
fn transport_alone_table(rows: &[BenchRow]) -> String {
    let ran: Vec<&BenchRow> = rows
        .iter()
        .filter(|r| r.quic_ratio_median.is_some() || r.checked_quic_ratio_median.is_some())
        .collect();
    if ran.is_empty() {
        return String::new();
    }
    let f = fixed;
    let mut s = String::from(
        "\nThe transport alone: a bare QUIC copy from the source to every destination at \
         once (`quic_copy`: a node's endpoint and configuration, one stream per receiver, \
         what arrives dropped; no hashing, scheduling, disk or link statistics; medians \
         of runs), and checked: the same copy with every byte hashed (BLAKE3) at both ends \
         and written and synced by each receiver, the least any verified, stored copy does \
         over this transport. CPU s/GiB as above.\n\n\
         | topology | U/U_min | bare QUIC U/U_min | checked QUIC U/U_min | TCP U/U_min | CPU s/GiB | bare QUIC CPU s/GiB | checked QUIC CPU s/GiB | TCP CPU s/GiB | bare QUIC vs TCP | checked QUIC vs TCP | FloodClone vs bare QUIC | FloodClone vs checked QUIC |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in ran {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.topology,
            f(r.ratio_median, 3),
            f(r.quic_ratio_median, 3),
            f(r.checked_quic_ratio_median, 3),
            f(r.tcp_ratio_median, 3),
            f(r.cpu_s_per_gib, 2),
            f(r.quic_cpu_s_per_gib, 2),
            f(r.checked_quic_cpu_s_per_gib, 2),
            f(r.tcp_cpu_s_per_gib, 2),
            times(r.quic_cpu_s_per_gib, r.tcp_cpu_s_per_gib),
            times(r.checked_quic_cpu_s_per_gib, r.tcp_cpu_s_per_gib),
            times(r.cpu_s_per_gib, r.quic_cpu_s_per_gib),
            times(r.cpu_s_per_gib, r.checked_quic_cpu_s_per_gib),
        );
    }
    s
}

/// `v` with `p` decimals, or "-".
fn fixed(v: Option<f64>, p: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.p$}"))
}

/// Cost of the link-stats programs: TCP over an unshaped veth with and without them
/// attached (by `floodclone stats --watch` on both ends), in the same run. Returns
/// (Mbit/s without, Mbit/s with, CPU s per GB without, CPU s per GB with).
pub fn ebpf_overhead(bin: &Path, secs: f64) -> Result<(f64, f64, f64, f64)> {
    use floodclone_testbed::{traffic, Testbed};
    let topo = Topology::parse(
        "overhead",
        r#"node = [{name="s",role="source"},{name="d",role="dest"}]
           link = [{a="s",b="d",mbit=100000}]"#,
    )?;
    floodclone_testbed::netns::ensure_host_bpffs()?;
    let mut bed = Testbed::up(&topo)?;
    let measure = |bed: &Testbed| {
        let cpu0 = traffic::machine_busy_s();
        let (mbit, bytes) = traffic::tcp_transfer(bed, 0, 1, secs);
        let cpu = traffic::machine_busy_s() - cpu0;
        // The CPU window includes the warm-up quarter; scale bytes to the whole run.
        let total_bytes = bytes as f64 * 4.0 / 3.0;
        (mbit, cpu / (total_bytes / 1e9))
    };
    let (without, cpu_without) = measure(&bed);
    for node in 0..2 {
        let mut cmd = bed.command(node, bin.to_str().unwrap());
        cmd.args(["stats", "--watch", "--json", "--interval", "1"])
            .stdout(std::process::Stdio::null());
        bed.spawn(cmd)?;
    }
    std::thread::sleep(Duration::from_millis(1500)); // programs attached
    let (with, cpu_with) = measure(&bed);
    bed.down();
    Ok((without, with, cpu_without, cpu_with))
}
