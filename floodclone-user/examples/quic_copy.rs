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
//! With `checked` last, both ends also do the per-byte work no design that verifies and
//! stores can skip, and nothing else: the sender reads the file in FloodClone's chunks
//! and hashes each (BLAKE3, as a manifest needs); each receiver gathers a chunk into one
//! buffer, hashes it and writes it as a destination does, and syncs the file at the end.
//! On one link, what this costs is the floor of FloodClone's CPU over this transport.
//!
//!     quic_copy send FILE PORT RECEIVERS [checked]
//!     quic_copy recv ADDR:PORT OUT_FILE [checked]
//!
//! Run by `cargo xtask bench --quic-runs N` (and `--checked-quic-runs N`) beside each
//! transfer (README, "Gigabit links").

use std::{
    io::Write,
    net::SocketAddr,
    os::unix::fs::FileExt,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use floodclone::{storage::Backing, transport};

const PIECE: usize = 64 << 10;

fn cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

async fn send(file: String, port: u16, receivers: usize, checked: bool) -> Result<()> {
    let ep = transport::endpoint(port)?;
    let opened = std::fs::File::open(&file).with_context(|| format!("opening {file}"))?;
    let len = opened.metadata()?.len();
    // Read as a source reads: into buffers never zeroed first.
    let file = Arc::new(Backing::from_file(opened, file.as_ref()));
    // Checked: whole chunks, each hashed as it is read; else the transport's pieces.
    let piece = if checked {
        floodclone_sched::default_chunk_bytes(len) as usize
    } else {
        PIECE
    };
    println!("{{\"listening\":{port}}}");
    std::io::stdout().flush()?;
    let mut sends = Vec::new();
    for receiver in 0..receivers {
        let conn = ep
            .accept()
            .await
            .context("endpoint closed")?
            .await
            .context("handshake")?;
        let file = file.clone();
        // A file's chunks are hashed once, whatever the receivers: on the first one's way.
        let hash = checked && receiver == 0;
        sends.push(tokio::spawn(async move {
            let mut s = conn.open_uni().await?;
            if checked {
                s.write_all(&len.to_be_bytes()).await?;
            }
            let mut off = 0u64;
            while off < len {
                let n = (len - off).min(piece as u64) as usize;
                let buf = file
                    .read_vec_at(n, off)
                    .map_err(|(p, e)| anyhow::anyhow!("reading {}: {e}", p.display()))?;
                if hash {
                    std::hint::black_box(blake3::hash(&buf));
                }
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

async fn recv(addr: SocketAddr, out: String, checked: bool) -> Result<()> {
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
    if checked {
        let f = f.context("checked needs an OUT_FILE to write")?;
        off = receive_checked(&mut s, &Backing::from_file(f.try_clone()?, out.as_ref())).await?;
        f.sync_all()?;
    } else {
        while let Some(chunk) = s.read_chunk(usize::MAX, true).await? {
            if let Some(f) = &f {
                f.write_all_at(&chunk.bytes, off)?;
            }
            off += chunk.bytes.len() as u64;
        }
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

/// Receives the stream as the sender cut it: its length first, then chunks of
/// `default_chunk_bytes(length)`, each gathered into one buffer, hashed and written at its
/// offset as a destination writes (`storage::Backing`: write-back started and the pages
/// dropped behind it, the cheapest way found on this machine). Returns the bytes received.
async fn receive_checked(s: &mut quinn::RecvStream, file: &Backing) -> Result<u64> {
    let mut head = [0u8; 8];
    s.read_exact(&mut head).await?;
    let len = u64::from_be_bytes(head);
    let chunk_bytes = floodclone_sched::default_chunk_bytes(len) as usize;
    let mut chunk = Vec::with_capacity(chunk_bytes);
    let mut off = 0u64;
    let store = |chunk: &mut Vec<u8>, off: &mut u64| -> Result<()> {
        std::hint::black_box(blake3::hash(chunk));
        file.write_all_at(chunk, *off)
            .map_err(|(p, e)| anyhow::anyhow!("writing {}: {e}", p.display()))?;
        *off += chunk.len() as u64;
        chunk.clear();
        Ok(())
    };
    while let Some(piece) = s.read_chunk(chunk_bytes - chunk.len(), true).await? {
        chunk.extend_from_slice(&piece.bytes);
        if chunk.len() == chunk_bytes {
            store(&mut chunk, &mut off)?;
        }
    }
    if !chunk.is_empty() {
        store(&mut chunk, &mut off)?;
    }
    Ok(off)
}

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let checked = args.last().is_some_and(|a| a == "checked");
    if checked {
        args.pop();
    }
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
            rt.spawn(send(file.into(), port.parse()?, receivers.parse()?, checked))
        }
        ["recv", addr, out] => rt.spawn(recv(addr.parse()?, out.into(), checked)),
        _ => bail!(
            "usage: quic_copy send FILE PORT RECEIVERS [checked] | quic_copy recv ADDR:PORT OUT_FILE [checked]"
        ),
    };
    rt.block_on(work)?
}
