//! `cargo xtask`: setup, build, the emulated testbed, the floor, runs and tests.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use floodclone_events::units::parse_size;
use floodclone_testbed::{
    bound,
    build::{cargo_with_env, floodclone_binary as build_floodclone, workspace_root},
    netns as testbed, run, setup, Testbed, Topology,
};

mod bench;
mod sim;

#[derive(Parser)]
#[command(about = "FloodClone development tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, bpf-linker, rust-src); instant when present.
    Setup,
    /// Setup, then build the floodclone binary (release).
    Build,
    /// Setup, build, then a Debian package: the binary, its systemd units, manual page and
    /// shell completions (`dpkg -i` it on any Debian host; no Rust needed there).
    Dist {
        /// Directory to write `floodclone_<version>_<arch>.deb` in.
        #[arg(long, default_value = "target/dist")]
        out: PathBuf,
    },
    /// Emulated testbed from a topology file.
    Testbed {
        #[command(subcommand)]
        action: TestbedCmd,
    },
    /// Print maxflow(S -> d) for every destination and the floor U_min.
    Bound {
        /// Topology file.
        file: PathBuf,
        /// File size, e.g. 64MiB.
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        size: u64,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Setup, build, then one real transfer on the emulated testbed: per-destination times,
    /// U, U_min and their ratio. Everything is torn down afterwards.
    Run(RunArgs),
    /// Every topology on the real testbed, several runs each, against the floor and the
    /// direct baseline; prints a markdown table and writes JSON lines and the table under
    /// results/.
    Bench(BenchArgs),
    /// Cost of the in-kernel link stats: TCP throughput and CPU seconds per GB on an
    /// unshaped veth, with and without the programs attached, in the same run.
    BenchOverhead {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
    /// The scheduler over a modelled network in virtual time (no testbed, no root): a
    /// topology file or a generated network; prints U, U_min and their ratio per network.
    Sim(SimArgs),
    /// Setup, then run every test (the README's test command).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(clap::Args)]
struct SimArgs {
    /// Topology file; without it, networks are generated (--shape, --nodes, ...).
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Shape of generated networks.
    #[arg(long, value_enum, default_value = "random")]
    shape: sim::Shape,
    /// Nodes in a generated network (routers included).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Average links per node (random shape).
    #[arg(long, default_value_t = 4.0)]
    degree: f64,
    /// Slowest link rate drawn, Mbit/s.
    #[arg(long, default_value_t = 10.0)]
    min_mbit: f64,
    /// Fastest link rate drawn, Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    max_mbit: f64,
    /// Share of links whose reverse direction is up to 4x slower.
    #[arg(long, default_value_t = 0.3)]
    asymmetric: f64,
    /// Random links that change rate (x0.25 to x1.5) during the transfer.
    #[arg(long, default_value_t = 0)]
    rate_changes: usize,
    /// First seed; networks use seeds seed..seed+networks.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How many generated networks.
    #[arg(long, default_value_t = 1)]
    networks: u64,
    /// File size, e.g. 64MiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    size: u64,
    /// Chunk size, e.g. 64KiB [default: floodclone's for the file size].
    #[arg(long, value_parser = parse_size)]
    chunk_size: Option<u64>,
    /// Forwarding delay per link, milliseconds, on top of a link's own `delay_ms`.
    #[arg(long, default_value_t = 1.0)]
    hop_delay_ms: f64,
    /// Add this one-way delay (ms) to every link that has none (as `run` and `bench`).
    #[arg(long)]
    delay_ms: Option<f64>,
    /// One JSON object per network instead of text.
    #[arg(long)]
    json: bool,
    /// Write every network simulated as a topology file in this directory.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Count QUIC/UDP/IP/Ethernet headers on every link, as the testbed's wire does
    /// (by default links carry payload only, the ideal the floor assumes).
    #[arg(long)]
    wire: bool,
    /// Connections that start or stop within this many milliseconds share their links
    /// anew once (0: at every start and stop, exact but slow on large router networks).
    #[arg(long, default_value_t = sim::RESHARE_BATCH_S * 1e3)]
    reshare_ms: f64,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Topology file.
    #[arg(long, default_value = "topologies/ring-plus-star.toml")]
    topology: PathBuf,
    /// File size, e.g. 64MiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    size: u64,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Chunk size for `floodclone send` (default: floodclone's).
    #[arg(long, value_parser = parse_size)]
    chunk_size: Option<u64>,
    /// Keep every node's log here as `<node>.log` (their level: RUST_LOG, e.g.
    /// `floodclone::chunks=trace` for every chunk requested and received).
    #[arg(long)]
    logs: Option<PathBuf>,
    /// Run this floodclone binary instead of building one (to compare two builds).
    #[arg(long)]
    floodclone: Option<PathBuf>,
    /// Add this one-way delay (ms) to every link that has none.
    #[arg(long)]
    delay_ms: Option<f64>,
    /// An argument for every `floodclone send` and `recv` (repeat for more), e.g.
    /// `--node-arg=--congestion=bbr`.
    #[arg(long, allow_hyphen_values = true)]
    node_arg: Vec<String>,
    /// Send a directory of this many files, --size bytes in all, as one swarm (1: one
    /// file).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    files: u64,
    /// Run the transfer over IPv6: the source and destinations are named by their IPv6
    /// addresses (every testbed node has both families).
    #[arg(long)]
    ipv6: bool,
    /// Keep destination NAME from the source until SECONDS after the source starts (its own
    /// packets to the source are dropped; it forwards for others all along): a member that
    /// joins late. Repeatable.
    #[arg(long, value_name = "NAME=SECONDS", value_parser = parse_join_late)]
    join_late: Vec<(String, f64)>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Topology files (default: every file in topologies/; a shell glob works:
    /// `--topology topologies/gigabit/*.toml`).
    #[arg(long = "topology", num_args = 1..)]
    topologies: Vec<PathBuf>,
    /// File size, e.g. 64MiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    size: u64,
    /// Runs of floodclone per topology.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Runs of the direct baseline per topology.
    #[arg(long, default_value_t = 1)]
    baseline_runs: usize,
    /// Runs of a plain TCP copy (sendfile, from the source to every destination at once)
    /// per topology, with the CPU cost of both (README, "Gigabit links").
    #[arg(long, default_value_t = 0)]
    tcp_runs: usize,
    /// Runs of a bare QUIC copy per topology: a node's QUIC endpoint and configuration
    /// from the source to every destination at once, none of FloodClone's own work (the
    /// example `quic_copy`): what the transport alone costs (README, "Gigabit links").
    #[arg(long, default_value_t = 0)]
    quic_runs: usize,
    /// Runs of the bare QUIC copy with the per-byte work no verified, stored copy can
    /// skip (every byte hashed at both ends, written and synced by each receiver): the
    /// floor of FloodClone's CPU over its transport (README, "Gigabit links").
    #[arg(long, default_value_t = 0)]
    checked_quic_runs: usize,
    /// Instead of topology files: this many small random networks (README, "Random
    /// networks"), seeds --seed, --seed+1, ...
    #[arg(long)]
    random: Option<u64>,
    /// First seed of --random.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Add this one-way delay (ms) to every link that has none (the WAN variants).
    #[arg(long)]
    delay_ms: Option<f64>,
    /// Run this floodclone binary instead of building one (to compare two builds).
    #[arg(long)]
    floodclone: Option<PathBuf>,
    /// Send a directory of this many files, --size bytes in all, as one swarm (1: one
    /// file): `--files 10000 --size 40000KiB` is 10,000 files of 4 KiB.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    files: u64,
    /// Keep every node's log and JSON events of each run whose U/U_min is above this (or
    /// that failed), next to its picture as `<topology>-run<N>-logs/`: a rare slow run
    /// explains itself. Their level: RUST_LOG, as for `run --logs`.
    #[arg(long)]
    keep_logs_over: Option<f64>,
    /// Keep destination NAME of every network from the source until SECONDS after the
    /// source starts (as `run --join-late`). Repeatable.
    #[arg(long, value_name = "NAME=SECONDS", value_parser = parse_join_late)]
    join_late: Vec<(String, f64)>,
}

#[derive(Subcommand)]
enum TestbedCmd {
    /// Build the testbed; it stays up until `down`.
    Up { file: PathBuf },
    /// Remove the testbed of FILE, and any testbed left by a process that died. With --all,
    /// every FloodClone testbed namespace.
    Down {
        file: Option<PathBuf>,
        #[arg(long)]
        all: bool,
    },
    /// Namespaces, addresses, routes and shaping of the testbed of FILE.
    Show { file: PathBuf },
}

/// Prefix of the long-lived testbed `testbed up FILE` builds.
fn named_prefix(topo: &Topology) -> String {
    format!("{}up-{}-", testbed::NETNS_PREFIX, topo.name)
}

/// Removes this process's testbeds on Ctrl-C or SIGTERM, then exits as interrupted.
fn install_signal_cleanup() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("\ninterrupted: removing the testbed");
            testbed::remove_live_testbeds();
            std::process::exit(128 + sig);
        }
    });
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    install_signal_cleanup()?;
    match cli.cmd {
        Cmd::Setup => setup::ensure(false)?,
        Cmd::Build => {
            build_floodclone()?;
        }
        Cmd::Dist { out } => {
            let bin = build_floodclone()?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let deb = floodclone_testbed::dist::build_deb(&bin, &out)?;
            println!("{}", deb.display());
            eprintln!("install it with: sudo apt install ./{}", deb.display());
        }
        Cmd::Sim(args) => sim_command(args)?,
        Cmd::Bound { file, size, json } => bound_command(&file, size, json)?,
        Cmd::Testbed { action } => testbed_command(action)?,
        Cmd::Run(args) => run_command(args)?,
        Cmd::Bench(args) => bench_command(args)?,
        Cmd::BenchOverhead { secs } => {
            if !testbed::is_root() {
                bail!("`cargo xtask bench-overhead` builds network namespaces and loads eBPF: run it as root");
            }
            let bin = build_floodclone()?;
            let (without, with, cpu_without, cpu_with) = bench::ebpf_overhead(&bin, secs)?;
            println!("TCP over an unshaped veth, {secs} s each, same run:");
            println!("  without link stats: {without:8.0} Mbit/s  {cpu_without:6.2} CPU s/GB");
            println!("  with link stats:    {with:8.0} Mbit/s  {cpu_with:6.2} CPU s/GB");
            println!(
                "  throughput ratio with/without = {:.3}; CPU per GB ratio = {:.3}",
                with / without,
                cpu_with / cpu_without
            );
        }
        Cmd::Test { args } => {
            setup::ensure(true)?;
            if !testbed::is_root() {
                eprintln!("note: not root: tests that need network namespaces or BPF will skip");
            }
            // The binary the tests run, built first and named to them: left to the tests,
            // its build (floodclone-user's own dependency features, where `cargo test`
            // unifies every member's, and another environment) recompiled ring, rustls and
            // quinn in the middle of the first test suite, taking both cores for ~40 s
            // from tests that wait with deadlines.
            let bin = build_floodclone()?;
            let quic_copy = floodclone_testbed::build::quic_copy_binary()?;
            let mut full = vec!["test", "--release"];
            full.extend(args.iter().map(String::as_str));
            cargo_with_env(
                &full,
                &[
                    (floodclone_testbed::build::BIN_ENV, bin.as_os_str()),
                    (
                        floodclone_testbed::build::QUIC_COPY_ENV,
                        quic_copy.as_os_str(),
                    ),
                ],
            )?;
        }
    }
    Ok(())
}

/// `cargo xtask bound`.
fn bound_command(file: &std::path::Path, size: u64, json: bool) -> Result<()> {
    let topo = Topology::load(file)?;
    let floor =
        bound::floor(&topo.with_upload_caps_as_links(), size).map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string(&floor)?);
    } else {
        println!("{} ({} bytes)", topo.name, size);
        for (name, bps, t) in &floor.per_dest {
            println!(
                "  maxflow(S -> {name:6}) = {:8.3} Mbit/s   earliest {t:.2} s",
                bps / 1e6
            );
        }
        println!(
            "U_min = {:.2} s   (wire-aware, QUIC/UDP/IPv4/Ethernet headers: {:.2} s)",
            floor.u_min_s, floor.u_min_wire_s
        );
        if let Some(routed) = floor.u_min_routed_s {
            println!("along the routers' single routes: {routed:.2} s");
        }
    }
    Ok(())
}

/// `cargo xtask testbed`.
fn testbed_command(action: TestbedCmd) -> Result<()> {
    match action {
        TestbedCmd::Up { file } => {
            let topo = Topology::load(&file)?;
            let prefix = named_prefix(&topo);
            if !testbed::list_namespaces()
                .iter()
                .all(|n| !n.starts_with(&prefix))
            {
                bail!(
                    "the testbed of {} is already up; `cargo xtask testbed down {}` first",
                    topo.name,
                    file.display()
                );
            }
            testbed::ensure_host_bpffs()?;
            let bed = Testbed::up_with_prefix(&topo, &prefix)?;
            let nodes: Vec<String> = (0..topo.nodes.len()).map(|i| bed.netns(i)).collect();
            println!("testbed {} up: {}", topo.name, nodes.join(" "));
            println!("enter a node:  ip netns exec {} bash", nodes[0]);
            if bed.delay_lines().is_empty() {
                bed.persist();
            } else {
                // The delay lines are threads of this process: the testbed lives as long
                // as it does (the signal handler removes it).
                println!(
                    "{} links have delay, jitter or loss, made by this process: the \
                 testbed stays up until Ctrl-C",
                    bed.delay_lines().len()
                );
                loop {
                    std::thread::park();
                }
            }
        }
        TestbedCmd::Down { file, all } => {
            if !testbed::is_root() {
                bail!("the testbed needs root; run as root");
            }
            if all {
                testbed::remove_namespaces(testbed::NETNS_PREFIX);
            } else if let Some(file) = file {
                testbed::remove_namespaces(&named_prefix(&Topology::load(&file)?));
            }
            let stale = testbed::remove_stale();
            if !stale.is_empty() {
                println!("removed {} namespaces left by dead runs", stale.len());
            }
            let left = testbed::list_namespaces();
            println!("testbed namespaces left: {}", left.len());
        }
        TestbedCmd::Show { file } => {
            let topo = Topology::load(&file)?;
            print!("{topo}");
            print!("{}", testbed::describe(&named_prefix(&topo)));
        }
    }
    Ok(())
}

/// Median, tail and count over 1.10 of a set of U/U_min ratios.
fn ratio_summary(ratios: &[f64]) -> String {
    let mut r = ratios.to_vec();
    r.sort_by(f64::total_cmp);
    let at = |q: f64| r[((r.len() - 1) as f64 * q).round() as usize];
    format!(
        "median {:.3}, p90 {:.3}, p99 {:.3}, worst {:.3}; {} of {} over 1.10",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0),
        r.iter().filter(|&&x| x > 1.10).count(),
        r.len()
    )
}

/// Largest network whose routed floor `cargo xtask sim` computes.
const ROUTED_FLOOR_MAX_NODES: usize = 64;

/// `cargo xtask sim`.
fn sim_command(args: SimArgs) -> Result<()> {
    let size = args.size;
    let opts = sim::SimOptions {
        bytes: size,
        chunk_bytes: args
            .chunk_size
            .unwrap_or_else(|| floodclone_sched::default_chunk_bytes(size) as u64),
        hop_delay_s: args.hop_delay_ms / 1e3,
        horizon_s: 1e5,
        payload_share: if args.wire {
            sim::WIRE_PAYLOAD_SHARE
        } else {
            1.0
        },
        reshare_batch_s: args.reshare_ms / 1e3,
    };
    let topos = sim_networks(&args)?;
    if let Some(dir) = &args.save {
        std::fs::create_dir_all(dir)?;
        for t in &topos {
            std::fs::write(dir.join(format!("{}.toml", t.name)), t.to_toml())?;
        }
    }
    let json = args.json;
    // Each network's U over U_min and over the routed floor (the same where routes cost
    // nothing), for the summary.
    let mut ratios: Vec<(f64, f64)> = Vec::new();
    for topo in &topos {
        let started = std::time::Instant::now();
        let u_min = bound::u_min_with_delay_s(topo, size as f64 * 8.0)
            .ok_or_else(|| anyhow::anyhow!("{}: a destination is cut off for good", topo.name))?;
        let floor_s = started.elapsed().as_secs_f64();
        let report = sim::simulate(topo, &opts).map_err(anyhow::Error::msg)?;
        let wall = started.elapsed().as_secs_f64();
        let ratio = report.u_s.map(|u| u / u_min);
        // Along one route per destination (what routers do) the floor may be higher: say so
        // where it is, so a tail the routes make is not read as the scheduler's (a linear
        // program per destination: small networks only).
        let routed = (topo.nodes.len() <= ROUTED_FLOOR_MAX_NODES)
            .then(|| bound::routed_u_min_s(topo, size as f64 * 8.0))
            .flatten()
            .filter(|r| *r > u_min * 1.001);
        ratios.push(match report.u_s {
            Some(u) => (u / u_min, u / routed.unwrap_or(u_min)),
            None => (f64::INFINITY, f64::INFINITY),
        });
        if json {
            println!(
                "{}",
                serde_json::json!({"network": topo.name, "u_min_s": u_min, "ratio": ratio,
                                   "routed_u_min_s": routed, "wall_s": wall,
                                   "floor_wall_s": floor_s, "report": report})
            );
        } else {
            let u = report.u_s.map_or("never".into(), |u| format!("{u:.2} s"));
            let mut r = ratio.map_or("-".into(), |r| format!("{r:.3}"));
            if let (Some(u), Some(floor)) = (report.u_s, routed) {
                r += &format!(" (routed {:.3})", u / floor);
            }
            println!(
                "{}: {} nodes ({} members, {} links, up to {} data neighbours)  U {u}  \
                 U_min {u_min:.2} s  ratio {r}  copies/needed {:.3}  ({} events, {wall:.1} s wall)",
                topo.name,
                report.nodes,
                report.members,
                report.links,
                report.max_neighbours,
                report.copies_per_needed,
                report.events
            );
        }
    }
    if topos.len() > 1 && !json {
        let raw: Vec<f64> = ratios.iter().map(|r| r.0).collect();
        let routed: Vec<f64> = ratios.iter().map(|r| r.1).collect();
        println!("U/U_min: {}", ratio_summary(&raw));
        println!("U over the routed floor: {}", ratio_summary(&routed));
    }
    Ok(())
}

/// The networks `cargo xtask sim` runs: the file given or the ones generated, with the
/// delay asked for on every link that has none.
fn sim_networks(args: &SimArgs) -> Result<Vec<Topology>> {
    let topos: Vec<Topology> = match &args.topology {
        Some(file) => vec![Topology::load(file)?],
        None => (args.seed..args.seed + args.networks)
            .map(|seed| {
                let mut g = sim::GenOptions {
                    shape: args.shape,
                    nodes: args.nodes,
                    degree: args.degree,
                    mbit: (args.min_mbit, args.max_mbit),
                    asymmetric: args.asymmetric,
                    rate_changes: 0,
                    until_s: 0.0,
                    seed,
                };
                if args.rate_changes > 0 {
                    // Changes fall within the transfer: before 80% of its floor.
                    let u =
                        bound::u_min_s(&sim::generate(&g), args.size as f64 * 8.0).unwrap_or(1.0);
                    g.rate_changes = args.rate_changes;
                    g.until_s = 0.8 * u;
                }
                sim::generate(&g)
            })
            .collect(),
    };
    Ok(match args.delay_ms {
        Some(d) => topos.iter().map(|t| t.with_delay_ms(d)).collect(),
        None => topos,
    })
}

/// `cargo xtask run`.
fn run_command(args: RunArgs) -> Result<()> {
    let RunArgs {
        topology,
        size,
        json,
        chunk_size,
        logs,
        floodclone,
        delay_ms,
        node_arg,
        files,
        ipv6,
        join_late,
    } = args;
    if !testbed::is_root() {
        bail!("`cargo xtask run` builds network namespaces and loads eBPF: run it as root");
    }
    let bin = floodclone_binary(floodclone)?;
    let topo = Topology::load(
        &workspace_root()
            .join(&topology)
            .canonicalize()
            .unwrap_or(topology),
    )?;
    let topo = match delay_ms {
        Some(d) => topo.with_delay_ms(d),
        None => topo,
    };
    eprintln!(
        "running {} bytes{} over {} ({} members)",
        size,
        if files > 1 {
            format!(" in {files} files")
        } else {
            String::new()
        },
        topo.name,
        run::member_count(&topo)
    );
    let mut opts = run::RunOptions::new(size);
    opts.logs = logs;
    opts.files = files;
    opts.ipv6 = ipv6;
    opts.join_late = join_late;
    if let Some(c) = chunk_size {
        opts.send_args = vec!["--chunk-size".into(), c.to_string()];
    }
    opts.send_args.extend(node_arg.iter().cloned());
    opts.recv_args.extend(node_arg);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    opts.picture = Some(
        workspace_root()
            .join("results")
            .join(format!("run-{}-{stamp}.svg", topo.name)),
    );
    let report = run::run_transfer(&topo, &bin, &opts)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", run::render(&report));
        if let Some(p) = &report.picture {
            println!("picture: {}", p.display());
        }
    }
    run::check(&report)?;
    Ok(())
}

/// `cargo xtask bench`.
fn bench_command(args: BenchArgs) -> Result<()> {
    let BenchArgs {
        topologies,
        size,
        runs,
        baseline_runs,
        tcp_runs,
        quic_runs,
        checked_quic_runs,
        random,
        seed,
        delay_ms,
        floodclone,
        files,
        keep_logs_over,
        join_late,
    } = args;
    if !testbed::is_root() {
        bail!("`cargo xtask bench` builds network namespaces and loads eBPF: run it as root");
    }
    let bin = floodclone_binary(floodclone)?;
    let topos = match random {
        Some(n) => (seed..seed + n)
            .map(floodclone_testbed::random::small_network)
            .collect(),
        None => {
            let files = if topologies.is_empty() {
                let mut v: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("topologies"))?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                    .collect();
                v.sort();
                v
            } else {
                topologies
            };
            files
                .iter()
                .map(|f| Topology::load(f))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    let topos: Vec<Topology> = match delay_ms {
        Some(d) => topos.iter().map(|t| t.with_delay_ms(d)).collect(),
        None => topos,
    };
    let dir = workspace_root().join("results");
    std::fs::create_dir_all(&dir)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let jsonl_path = dir.join(format!("bench-{stamp}.jsonl"));
    let mut jsonl = std::fs::File::create(&jsonl_path)?;
    let pictures = dir.join(format!("bench-{stamp}"));
    // Each network as a file, so any run can be repeated with `cargo xtask run`.
    std::fs::create_dir_all(&pictures)?;
    for t in &topos {
        std::fs::write(pictures.join(format!("{}.toml", t.name)), t.to_toml())?;
    }
    let mut base = run::RunOptions::new(size);
    base.files = files;
    base.join_late = join_late;
    let quic_copy = match quic_runs + checked_quic_runs {
        0 => None,
        _ => Some(floodclone_testbed::build::quic_copy_binary()?),
    };
    let plan = bench::BenchPlan {
        runs,
        baseline_runs,
        tcp_runs,
        quic_runs,
        checked_quic_runs,
        keep_logs_over,
    };
    let rows = bench::bench(
        &topos,
        &bin,
        quic_copy.as_deref(),
        &base,
        plan,
        &mut jsonl,
        &pictures,
    )?;
    let table = bench::table(&rows);
    let md_path = dir.join(format!("bench-{stamp}.md"));
    std::fs::write(&md_path, &table)?;
    println!("{table}");
    println!(
        "runs: {}\ntable: {}\npictures: {}/",
        jsonl_path.display(),
        md_path.display(),
        pictures.display()
    );
    Ok(())
}

/// The binary given, or the one built from this tree.
fn floodclone_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(path) if path.is_file() => Ok(path.canonicalize()?),
        Some(path) => bail!("--floodclone {}: no such file", path.display()),
        None => build_floodclone(),
    }
}

/// `NAME=SECONDS` for `--join-late` (SECONDS as any duration: `3`, `500ms`).
fn parse_join_late(s: &str) -> Result<(String, f64), String> {
    let (name, secs) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=SECONDS, got {s:?}"))?;
    let secs = floodclone_events::units::parse_duration(secs)?.as_secs_f64();
    if secs > 3600.0 {
        return Err(format!("{secs} s: give 0 to 3600 seconds"));
    }
    Ok((name.to_string(), secs))
}
