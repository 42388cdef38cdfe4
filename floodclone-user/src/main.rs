//! The `floodclone` command: `send`, `recv`, `stats` and `token`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use floodclone::{
    events::{
        units::{parse_duration, parse_size},
        Event, SwarmDone,
    },
    hosts::{self, HostPort},
    node::{self, DEFAULT_PORT},
    output::Output,
    stats, transport,
    transport::Congestion,
    Misbehaviour, OutputMode, RecvOptions, SendOptions, Swarm, Transfer,
};

#[derive(Parser)]
#[command(
    name = "floodclone",
    version,
    about = "Deliver a file or a directory tree from a source to many hosts at the speed of the \
             network's min-cut",
    long_about = "Deliver a file or a directory tree from a source to many hosts at the speed of \
                  the network's min-cut. Run `floodclone send` on the source and `floodclone \
                  recv` on every destination, in any order, with the same --token."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct NodeArgs {
    /// Shared secret of the swarm (at least 16 characters; `floodclone token` makes one);
    /// peers without it are refused. Also read from FLOODCLONE_TOKEN.
    #[arg(long, env = "FLOODCLONE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the token from this file instead (its first line), so it stays out of the
    /// process list.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// UDP port this node listens on.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// One JSON object per line on stdout instead of human-readable lines on stderr.
    #[arg(long)]
    json: bool,
    /// Testing only: flip a bit in every chunk this node serves (peers must detect it).
    #[arg(long, hide = true)]
    corrupt_served_chunks: bool,
    /// Testing only: announce chunks as usual, send none of them (peers must fetch
    /// elsewhere).
    #[arg(long, hide = true, conflicts_with = "corrupt_served_chunks")]
    withhold_served_chunks: bool,
    /// Testing only: answer a neighbour asking for the chunk hashes with altered ones
    /// (it must refuse them).
    #[arg(long, hide = true, conflicts_with_all = ["corrupt_served_chunks", "withhold_served_chunks"])]
    forge_given_hashes: bool,
    /// Testing only: tell every neighbour that dials this node that it is the source, and
    /// welcome it to another file (it must refuse the connection).
    #[arg(long, hide = true, conflicts_with_all = ["corrupt_served_chunks", "withhold_served_chunks", "forge_given_hashes"])]
    claim_source: bool,
    /// Congestion controller of this node's connections: veno (additive increase, a cut
    /// to 85% on a loss with a queue behind it, none on a random one), reno (a cut on
    /// every loss) or bbr (quinn's BBR v1; unfair where paths are shared).
    #[arg(long, value_enum, default_value_t = Congestion::Veno)]
    congestion: Congestion,
    /// Upload cap: the most chunk data this node sends, over all its peers, in Mbit/s
    /// (20, 20M, 500k, 1.5G). QUIC and IP headers add ~4% on the wire. Its peers fetch the
    /// rest elsewhere; on the source it bounds the whole swarm.
    #[arg(long, value_parser = floodclone::upload_cap::parse_mbit)]
    max_rate: Option<f64>,
    /// Serve this node's figures for Prometheus at http://ADDR/metrics (ADDR as
    /// 127.0.0.1:9100): per-link bytes and packets from the kernel, RTTs, progress, chunks.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve FILE (or the tree under a directory) until every destination holds a verified
    /// copy.
    Send {
        /// The file to deliver, or a directory: its tree (files, directories, symlinks
        /// inside it, modes and modification times) goes as one swarm, its files' bytes
        /// end to end in path order so chunks cross file boundaries.
        #[arg(value_name = "FILE|DIR")]
        file: PathBuf,
        /// A destination, as ADDR, HOST, ADDR:PORT, HOST:PORT or [IPV6]:PORT, IPv4 or IPv6
        /// (port defaults to --port; a name is resolved at start to its first address).
        /// Repeat for each.
        #[arg(long = "dest", value_parser = floodclone::hosts::parse_host)]
        dests: Vec<HostPort>,
        /// A file of destinations, one per line as --dest takes them; `#` starts a comment.
        /// Adds to --dest.
        #[arg(long)]
        dests_file: Option<PathBuf>,
        /// Chunk size, a power of two from 4 KiB to 64 MiB (65536, 64KiB, 1MiB; a plain
        /// number is bytes) [default: 64 KiB, doubled while the file has more than 1024
        /// chunks up to 1 MiB (1 MiB from 1 GiB), and beyond that for files over 1 TiB so it
        /// has at most 2^20 chunks].
        #[arg(long, value_parser = parse_chunk_size)]
        chunk_size: Option<u32>,
        /// How long to wait for every destination before starting with those present
        /// (3, 3s, 500ms, 2m; a plain number is seconds). By default the transfer starts
        /// with the destinations joined at the first tick after one joins (100 ms); each
        /// later one gets its Welcome as it joins.
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        join_grace: Duration,
        /// How long until a destination that never joined, or lost its connection and
        /// did not come back, is given up: reported failed by name, the others finish,
        /// and send exits non-zero (60, 90s, 2m).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        dest_timeout: Duration,
        /// Baseline for comparisons: every destination fetches from the source only, over
        /// its own connection, and nothing is relayed.
        #[arg(long)]
        direct: bool,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Fetch the file from a source (and from other destinations), write it to --out, and
    /// keep serving others until the source says everyone is done.
    Recv {
        /// The source, as ADDR, HOST, ADDR:PORT, HOST:PORT or [IPV6]:PORT.
        #[arg(long, value_parser = floodclone::hosts::parse_host)]
        source: HostPort,
        /// Where the file (or the tree, as a directory) goes. Written there only once
        /// complete and verified (a tree: in `OUT.floodclone-part/`, renamed to OUT at
        /// once); an existing OUT is never replaced.
        #[arg(long)]
        out: PathBuf,
        /// How long to keep trying to reach the source at start, and to wait for it to
        /// come back if it goes away before the copy is complete (progress is kept)
        /// (60, 90s, 2m; a plain number is seconds).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        connect_timeout: Duration,
        /// The file's BLAKE3 as `send` prints it (`b3:<hex>`, or what `b3sum` prints), or
        /// the tree's as `send` prints it: refuse anything else, whoever offers it.
        #[arg(long, value_parser = parse_expect)]
        expect: Option<[u8; 32]>,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Print a fresh random swarm token (256 bits, hex) to pass as --token everywhere.
    Token,
    /// Live per-link statistics measured in the kernel (eBPF): rates, bytes, QUIC RTT.
    Stats {
        /// Measurement interval (1, 500ms, 2s; a plain number is seconds).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
        /// Refresh in place until interrupted.
        #[arg(long)]
        watch: bool,
        /// One JSON object per snapshot on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions for SHELL (bash: `floodclone completions bash >
    /// /usr/share/bash-completion/completions/floodclone`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; `floodclone man > floodclone.1 && man -l floodclone.1`).
    Man,
}

fn parse_expect(s: &str) -> Result<[u8; 32], String> {
    floodclone::manifest::parse_b3(s)
        .ok_or_else(|| format!("{s:?}: expected b3: and 64 hex digits, as `send` prints it"))
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let bytes = parse_size(s)?;
    u32::try_from(bytes)
        .ok()
        .filter(|&b| (4096..=64 << 20).contains(&b) && b.is_power_of_two())
        .ok_or_else(|| {
            format!("chunk size {s:?}: must be a power of two from 4KiB to 64MiB (each chunk is one subtree of the file's BLAKE3 tree)")
        })
}

/// Exit statuses (README, "Exit codes"): 0 done, 1 any other error, 2 a usage error (clap),
/// and these.
const EXIT_SOME_FAILED: i32 = 3;
const EXIT_INTERRUPTED: i32 = 130;
const EXIT_TERMINATED: i32 = 143;
const EXIT_HUNG_UP: i32 = 129;

/// An error that ends the command with a status of its own (otherwise 1).
#[derive(Debug)]
struct ExitWith {
    code: i32,
    message: String,
}

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitWith {}

/// Ctrl-C, or SIGTERM (what `systemctl stop` and `kill` send): either way the command
/// returns, so link-stats pins and status files are removed on the way out. The error to
/// end with, `then` appended to what happened.
async fn stop_signal(then: &str) -> ExitWith {
    use tokio::signal::unix::{signal, SignalKind};
    // A closed terminal (SIGHUP) stops it like the others, cleanly: its pins and status
    // file would otherwise stay until the next start.
    let (code, why) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(mut term), Ok(mut hup)) => tokio::select! {
            _ = tokio::signal::ctrl_c() => (EXIT_INTERRUPTED, "interrupted"),
            _ = term.recv() => (EXIT_TERMINATED, "terminated"),
            _ = hup.recv() => (EXIT_HUNG_UP, "hung up"),
        },
        _ => {
            let _ = tokio::signal::ctrl_c().await;
            (EXIT_INTERRUPTED, "interrupted")
        }
    };
    ExitWith {
        code,
        message: format!("{why}{then}"),
    }
}

/// Most async worker threads a node runs: what every host ran before session 36 (more
/// were never measured).
const MAX_WORKERS: usize = 2;

/// Async worker threads: half the host's cores, at least one and at most [`MAX_WORKERS`].
/// A node's packet work shares the cores with the kernel's (segmentation, receive offload,
/// checksums and copies, in softirqs), and its tasks (quinn's endpoint and connection
/// drivers, the scheduler) wake each other at every batch of packets: across two workers
/// each wake-up is a futex call and a context switch (16-24k a second per process at 2
/// Gbit/s). On this project's 2-core machine, one worker against two (README, "Gigabit
/// links", session 36; five runs each, alternating): CPU per delivered GiB 7.1 -> 6.5 at 2
/// Gbit/s, a 10 Gbit/s link 1.96 -> 1.71 x U_min (the TCP copy: 1.72-2.57), the star of
/// four 1 Gbit/s links 1.41 -> 1.11 (its source's four connections had the two workers'
/// time unequally); the shipped files at tens of Mbit/s unchanged.
fn worker_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).clamp(1, MAX_WORKERS)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        // Fewer wake-ups at gigabit rates (see the module).
        .on_thread_park(floodclone::park::before_park)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        // stderr, above the live progress lines (not erased by their next redraw).
        .with_writer(floodclone::output::LogWriter)
        // Colour codes only for a terminal: logs kept in files stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("floodclone: {e:#}");
        std::process::exit(e.downcast_ref::<ExitWith>().map_or(1, |x| x.code));
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Send {
            file,
            mut dests,
            dests_file,
            chunk_size,
            join_grace,
            dest_timeout,
            direct,
            node,
        } => {
            if let Some(path) = dests_file {
                dests.extend(hosts::read_dests_file(&path).map_err(anyhow::Error::msg)?);
            }
            if dests.is_empty() {
                bail!("no destinations: give --dest ADDR (repeated) or --dests-file FILE");
            }
            hosts::check_unique(&dests).map_err(anyhow::Error::msg)?;
            let dests = dests
                .into_iter()
                .map(|(ip, port)| SocketAddr::new(ip, port.unwrap_or(node.port)))
                .collect();
            send(
                node,
                file,
                dests,
                chunk_size,
                (join_grace, dest_timeout),
                direct,
            )
        }
        Cmd::Recv {
            source,
            out,
            connect_timeout,
            expect,
            node,
        } => {
            let source = SocketAddr::new(source.0, source.1.unwrap_or(node.port));
            recv(node, source, out, connect_timeout, expect)
        }
        Cmd::Stats {
            interval,
            watch,
            json,
        } => show_stats(interval, watch, json),
        Cmd::Token => {
            println!("{}", transport::new_token()?);
            Ok(())
        }
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "floodclone", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .context("writing the manual page")
        }
    }
}

impl NodeArgs {
    /// The swarm this node joins, as the options say; events printed (plain or JSON).
    fn swarm(self) -> Result<Swarm> {
        let token = match (self.token, &self.token_file) {
            (Some(t), _) => t,
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("reading --token-file {}", path.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            (None, None) => String::new(),
        };
        // A weak token is refused by `floodclone::send`/`recv` before anything starts.
        Ok(Swarm {
            port: self.port,
            congestion: self.congestion,
            max_rate_mbit: self.max_rate,
            metrics: self.metrics,
            link_stats: true,
            output: OutputMode::Print { json: self.json },
            misbehaviour: match (
                self.corrupt_served_chunks,
                self.withhold_served_chunks,
                self.forge_given_hashes,
                self.claim_source,
            ) {
                (true, _, _, _) => Misbehaviour::CorruptServed,
                (_, true, _, _) => Misbehaviour::WithholdServed,
                (_, _, true, _) => Misbehaviour::ForgeGivenHashes,
                (_, _, _, true) => Misbehaviour::ClaimSource,
                _ => Misbehaviour::None,
            },
            ..Swarm::new(token)
        })
    }
}

/// Runs `transfer` to its end, or until a stop signal cancels it (then the error says
/// which signal, `then` appended).
async fn until_done_or_stopped<T>(transfer: Transfer<T>, then: &str) -> Result<T> {
    let cancel = transfer.cancel_handle();
    let finish = transfer.finish();
    tokio::pin!(finish);
    tokio::select! {
        r = &mut finish => r.map_err(anyhow::Error::from),
        stop = stop_signal(then) => {
            cancel.cancel();
            // Its link stats detached and pins removed before the process ends.
            let _ = finish.await;
            Err(stop.into())
        }
    }
}

fn send(
    node: NodeArgs,
    file: PathBuf,
    dests: Vec<SocketAddr>,
    chunk_bytes: Option<u32>,
    (join_grace, dest_timeout): (Duration, Duration),
    direct: bool,
) -> Result<()> {
    let swarm = node.swarm()?;
    let output = Output::new(matches!(swarm.output, OutputMode::Print { json: true }));
    let opts = SendOptions {
        chunk_bytes,
        join_grace,
        dest_timeout,
        direct,
        ..SendOptions::new(swarm, file, dests)
    };
    let started = std::time::Instant::now();
    let outcome =
        runtime()?.block_on(async { until_done_or_stopped(floodclone::send(opts)?, "").await })?;
    let elapsed = started.elapsed().as_secs_f64();
    if !outcome.failed.is_empty() {
        let list: Vec<String> = outcome
            .failed
            .iter()
            .map(|(a, r)| format!("{a}: {r}"))
            .collect();
        return Err(ExitWith {
            code: EXIT_SOME_FAILED,
            message: format!(
                "{} of {} destinations failed ({}); the others hold verified copies",
                outcome.failed.len(),
                outcome.failed.len() + outcome.dests.len(),
                list.join("; ")
            ),
        }
        .into());
    }
    output.event(
        &Event::SwarmDone(SwarmDone::Source {
            elapsed_s: elapsed,
            destinations: outcome.dests.clone(),
            peak_rss_bytes: node::peak_rss_bytes(),
            cpu_s: node::cpu_s(),
            first_chunk_s: outcome.first_chunk_s,
            tx_bytes_by_iface: outcome.tx_bytes_by_iface,
        }),
        || {
            // One clock: seconds since `send` started, as each `dest_done` line said.
            let last = outcome.dests.iter().map(|r| r.at_s).fold(0.0, f64::max);
            let mut s =
                format!("every destination holds a verified copy, {last:.2} s after send started:");
            for r in &outcome.dests {
                s += &format!("\n  {:15} {:8.2} s", r.addr, r.at_s);
            }
            s
        },
    );
    Ok(())
}

fn recv(
    node: NodeArgs,
    source: SocketAddr,
    out: PathBuf,
    connect_timeout: Duration,
    expect: Option<[u8; 32]>,
) -> Result<()> {
    let opts = RecvOptions {
        connect_timeout,
        expect,
        ..RecvOptions::new(node.swarm()?, source, out)
    };
    runtime()?.block_on(async {
        until_done_or_stopped(
            floodclone::recv(opts)?,
            " (progress is kept: run the same command to resume)",
        )
        .await
    })?;
    Ok(())
}

fn show_stats(interval: Duration, watch: bool, json: bool) -> Result<()> {
    if interval.is_zero() {
        bail!("--interval must be longer than zero");
    }
    let mut sampler = stats::Sampler::open()?;
    if watch && !json {
        print!("\x1b[2J");
    }
    loop {
        let report = sampler.measure(interval)?;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else if watch {
            // Home, redraw each line clearing its tail, clear below: no flicker.
            let mut screen = String::from("\x1b[H");
            for line in stats::render(&report).lines() {
                screen += line;
                screen += "\x1b[K\n";
            }
            print!("{screen}\x1b[J");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        } else {
            print!("{}", stats::render(&report));
        }
        if !watch {
            return Ok(());
        }
    }
}
