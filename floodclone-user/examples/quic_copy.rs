//! A bare QUIC copy: the floor of what FloodClone's transport costs, without FloodClone.
//!
//! The same endpoint as a node (`transport::endpoint`: its TLS suites, congestion
//! controller, ACK frequency, packet sizes and socket), one tokio worker per two cores as
//! the daemon runs, but none of the daemon's work: no hashing, no scheduling, no
//! announcements, no link statistics. The sender reads its file in 64 KiB pieces and
//! writes them, in order, on one stream per receiver; each receiver writes what it reads
//! to a file, or drops it when OUT_FILE is `-` (as the bench runs it: the transport
//! alone). Each process prints one JSON line: its CPU seconds (user + system) and, for a
//! receiver, when it held the whole file.
//!
//!     quic_copy send FILE PORT RECEIVERS
//!     quic_copy recv ADDR:PORT OUT_FILE
//!
//! Run by `cargo xtask bench --quic-runs N` beside each transfer (README, "Gigabit links").

use std::{
    io::Write,
    net::SocketAddr,
    os::unix::fs::FileExt,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use floodclone::transport;

const PIECE: usize = 64 << 10;

fn cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

async fn send(file: String, port: u16, receivers: usize) -> Result<()> {
    let ep = transport::endpoint(port)?;
    let file = Arc::new(std::fs::File::open(&file).with_context(|| format!("opening {file}"))?);
    let len = file.metadata()?.len();
    println!("{{\"listening\":{port}}}");
    std::io::stdout().flush()?;
    let mut sends = Vec::new();
    for _ in 0..receivers {
        let conn = ep
            .accept()
            .await
            .context("endpoint closed")?
            .await
            .context("handshake")?;
        let file = file.clone();
        sends.push(tokio::spawn(async move {
            let mut s = conn.open_uni().await?;
            let mut off = 0u64;
            while off < len {
                let n = (len - off).min(PIECE as u64) as usize;
                let mut buf = vec![0u8; n];
                file.read_exact_at(&mut buf, off)?;
                s.write_chunk(Bytes::from(buf)).await?;
                off += n as u64;
            }
            s.finish()?;
            // Done when the receiver closes the connection, having it all.
            conn.closed().await;
            anyhow::Ok(())
        }));
    }
    for s in sends {
        s.await??;
    }
    println!("{{\"cpu_s\":{}}}", cpu_s());
    Ok(())
}

async fn recv(addr: SocketAddr, out: String) -> Result<()> {
    let start = Instant::now();
    let ep = transport::endpoint(0)?;
    let conn = loop {
        match transport::dial(&ep, addr, Duration::from_secs(1)).await {
            Ok(c) => break c,
            Err(_) if start.elapsed() < Duration::from_secs(10) => continue,
            Err(e) => bail!("dialing {addr}: {e}"),
        }
    };
    let mut s = conn.accept_uni().await?;
    // "-": read and drop (the transport alone).
    let f = (out != "-")
        .then(|| std::fs::File::create(&out).with_context(|| format!("creating {out}")))
        .transpose()?;
    let mut off = 0u64;
    while let Some(chunk) = s.read_chunk(usize::MAX, true).await? {
        if let Some(f) = &f {
            f.write_all_at(&chunk.bytes, off)?;
        }
        off += chunk.bytes.len() as u64;
    }
    let done_s = start.elapsed().as_secs_f64();
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    println!(
        "{{\"done_s\":{done_s},\"bytes\":{off},\"cpu_s\":{}}}",
        cpu_s()
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads((cores / 2).clamp(1, 2))
        .on_thread_park(floodclone::park::before_park)
        .enable_all()
        .build()?;
    // On a worker, as the daemon's work is: `block_on` runs its future on this thread, and
    // every wake-up between it and quinn's drivers on the worker would cross threads.
    let work = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["send", file, port, receivers] => {
            rt.spawn(send(file.into(), port.parse()?, receivers.parse()?))
        }
        ["recv", addr, out] => rt.spawn(recv(addr.parse()?, out.into())),
        _ => bail!("usage: quic_copy send FILE PORT RECEIVERS | quic_copy recv ADDR:PORT OUT_FILE"),
    };
    rt.block_on(work)?
}
