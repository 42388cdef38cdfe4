//! The `floodclone` command: `send`, `recv` and `stats`.

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use floodclone::stats;

#[derive(Parser)]
#[command(
    name = "floodclone",
    version,
    about = "Deliver one file from a source to many hosts at the speed of the network's min-cut"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Live per-link statistics measured in the kernel (eBPF): rates, bytes, QUIC RTT.
    Stats {
        /// Measurement interval in seconds.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Refresh in place until interrupted.
        #[arg(long)]
        watch: bool,
        /// One JSON object per snapshot on stdout.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Stats {
            interval,
            watch,
            json,
        } => {
            if !(interval > 0.0 && interval.is_finite()) {
                anyhow::bail!("--interval must be a positive number of seconds");
            }
            loop {
                let report = stats::measure(Duration::from_secs_f64(interval))?;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    if watch {
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", stats::render(&report));
                }
                if !watch {
                    break;
                }
            }
        }
    }
    Ok(())
}
