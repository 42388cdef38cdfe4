//! The library surface: start a [`send`] or a [`recv`] inside a tokio runtime, read its
//! typed [`Event`]s as they happen, cancel it from anywhere with a [`Cancel`], and await
//! its outcome. The `floodclone` binary is a thin user of it (it prints the events instead
//! of streaming them).
//!
//! ```no_run
//! # async fn example() -> Result<(), floodclone::Error> {
//! use floodclone::{events::Event, recv, RecvOptions, Swarm};
//!
//! let swarm = Swarm::new(std::env::var("FLOODCLONE_TOKEN").unwrap_or_default());
//! let mut transfer = recv(RecvOptions::new(
//!     swarm,
//!     "192.0.2.10:7878".parse().unwrap(),
//!     "/srv/big.iso".into(),
//! ))?;
//! let cancel = transfer.cancel_handle();
//! tokio::spawn(async move {
//!     tokio::time::sleep(std::time::Duration::from_secs(600)).await;
//!     cancel.cancel(); // progress is kept: the same call later resumes
//! });
//! while let Some(event) = transfer.next_event().await {
//!     match event {
//!         Event::Complete { elapsed_s, path, .. } => println!("{path} in {elapsed_s:.2} s"),
//!         Event::Progress(p) => { /* show it */ let _ = p; }
//!         _ => {}
//!     }
//! }
//! let outcome = transfer.finish().await?;
//! println!("verified in {:.2} s", outcome.elapsed_s);
//! # Ok(())
//! # }
//! ```

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};

use crate::{
    events::Event,
    linkstats::LinkStats,
    node::{NodeError, NodeOptions, SharedLinkStats},
    output::Output,
    source::SendOutcome,
    transport::{self, Congestion},
};

/// Why a transfer did not complete.
pub type Error = NodeError;

/// What every node of one swarm shares, and how this one runs.
#[derive(Clone)]
pub struct Swarm {
    /// The swarm's token (at least 16 characters; `floodclone token` makes one).
    pub token: String,
    /// UDP port this node listens on (and, by default, its peers').
    pub port: u16,
    pub congestion: Congestion,
    /// The most chunk data this node uploads, Mbit/s over all its peers.
    pub max_rate_mbit: Option<f64>,
    /// Serve this node's figures for Prometheus at `http://ADDR/metrics`.
    pub metrics: Option<SocketAddr>,
    /// Attach the eBPF link-stats programs (needs CAP_BPF and CAP_NET_ADMIN; without them
    /// the transfer goes on with userspace measurements, after a warning).
    pub link_stats: bool,
    /// How events are delivered: streamed ([`Transfer::next_event`]) or printed.
    pub output: OutputMode,
    #[doc(hidden)]
    /// Testing only: how serving departs from the protocol, so peers must cope.
    pub misbehaviour: crate::Misbehaviour,
}

impl std::fmt::Debug for Swarm {
    /// Everything but the token (which would let anyone who reads a log join the swarm).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swarm")
            .field("token", &"<redacted>")
            .field("port", &self.port)
            .field("congestion", &self.congestion)
            .field("max_rate_mbit", &self.max_rate_mbit)
            .field("metrics", &self.metrics)
            .field("link_stats", &self.link_stats)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

/// Where a transfer's events go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputMode {
    /// As typed values, read with [`Transfer::next_event`]; nothing is printed.
    #[default]
    Stream,
    /// As the `floodclone` binary shows them: plain lines on stderr (progress redrawn in
    /// place at a terminal), or with `json` one JSON object per line on stdout.
    Print { json: bool },
}

impl Swarm {
    /// Defaults: port 7878, the default congestion control, no upload cap, no metrics,
    /// link stats attached, events streamed.
    pub fn new(token: impl Into<String>) -> Self {
        Self {
            token: token.into(),
            port: 7878,
            congestion: Congestion::default(),
            max_rate_mbit: None,
            metrics: None,
            link_stats: true,
            output: OutputMode::Stream,
            misbehaviour: Default::default(),
        }
    }
}

/// What `send` takes.
#[derive(Clone, Debug)]
pub struct SendOptions {
    pub swarm: Swarm,
    /// A file, or a directory whose tree is sent as one swarm.
    pub path: PathBuf,
    /// The destinations, IPv4 or IPv6 (a swarm may mix them).
    pub dests: Vec<SocketAddr>,
    /// Chunk size in bytes (a power of two, 4 KiB to 64 MiB); `None`: the default for the
    /// size.
    pub chunk_bytes: Option<u32>,
    /// How long to wait for every destination before starting with those present (zero:
    /// start with those joined when the first has; the others are welcomed as they join).
    pub join_grace: Duration,
    /// A destination absent this long is given up; the others finish.
    pub dest_timeout: Duration,
    /// Baseline: every destination pulls from the source only, nothing is relayed.
    pub direct: bool,
}

impl SendOptions {
    /// Defaults: the default chunk size, no join grace, 60 s destination timeout.
    pub fn new(swarm: Swarm, path: PathBuf, dests: Vec<SocketAddr>) -> Self {
        Self {
            swarm,
            path,
            dests,
            chunk_bytes: None,
            join_grace: Duration::ZERO,
            dest_timeout: Duration::from_secs(60),
            direct: false,
        }
    }
}

/// What `recv` takes.
#[derive(Clone, Debug)]
pub struct RecvOptions {
    pub swarm: Swarm,
    pub source: SocketAddr,
    /// Where the file (or tree) goes, once whole and verified; never replaced if there.
    pub out: PathBuf,
    /// How long to keep trying the source at start, and to wait for it if it goes away.
    pub connect_timeout: Duration,
    /// The BLAKE3 (file) or tree hash to accept, as `send` reports it; anything else is
    /// refused before a byte is written.
    pub expect: Option<[u8; 32]>,
}

impl RecvOptions {
    /// Defaults: 60 s to reach the source, any content the source offers.
    pub fn new(swarm: Swarm, source: SocketAddr, out: PathBuf) -> Self {
        Self {
            swarm,
            source,
            out,
            connect_timeout: Duration::from_secs(60),
            expect: None,
        }
    }
}

/// A destination's result.
#[derive(Clone, Debug)]
pub struct RecvOutcome {
    /// Seconds from start until the copy was complete and verified.
    pub elapsed_s: f64,
}

/// Stops a transfer from anywhere (another task, a signal handler); cloned freely. A
/// cancelled `recv` keeps its progress: the same call later resumes it.
#[derive(Clone, Debug)]
pub struct Cancel(Arc<watch::Sender<bool>>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }

    async fn cancelled(mut rx: watch::Receiver<bool>) {
        let _ = rx.wait_for(|&c| c).await;
    }
}

/// A running transfer: its events, its cancel handle, its outcome.
pub struct Transfer<T> {
    events: mpsc::UnboundedReceiver<Event>,
    /// Set once the transfer has ended (its last event is then queued).
    ended: watch::Receiver<bool>,
    cancel: Cancel,
    task: tokio::task::JoinHandle<Result<T, Error>>,
}

impl<T> Transfer<T> {
    /// The next event (with [`OutputMode::Stream`]); `None` once the transfer has ended
    /// and every event was read (at once with [`OutputMode::Print`]).
    pub async fn next_event(&mut self) -> Option<Event> {
        tokio::select! {
            biased;
            e = self.events.recv() => e,
            _ = self.ended.wait_for(|&e| e) => self.events.try_recv().ok(),
        }
    }

    pub fn cancel_handle(&self) -> Cancel {
        self.cancel.clone()
    }

    /// Waits for the outcome. A cancelled transfer ends with [`NodeError::Cancelled`].
    pub async fn finish(self) -> Result<T, Error> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(NodeError::Other(format!("the transfer's task failed: {e}"))),
        }
    }
}

/// Starts serving `opts.path` to `opts.dests` (call inside a tokio runtime). Refused at
/// once, before anything starts, if the token is missing or weak.
pub fn send(mut opts: SendOptions) -> Result<Transfer<SendOutcome>, Error> {
    // One spelling per host: an IPv4-mapped address is the IPv4 one.
    for d in &mut opts.dests {
        *d = crate::conn::unmapped(*d);
    }
    let (node, events, link_stats) = start_node(&opts.swarm)?;
    Ok(spawn(events, link_stats, crate::source::run(node, opts)))
}

/// Starts fetching from `opts.source` into `opts.out` (call inside a tokio runtime).
/// Refused at once if the token is missing or weak.
pub fn recv(mut opts: RecvOptions) -> Result<Transfer<RecvOutcome>, Error> {
    opts.source = crate::conn::unmapped(opts.source);
    let (node, events, link_stats) = start_node(&opts.swarm)?;
    let run = async move {
        crate::destination::run(node, opts)
            .await
            .map(|elapsed_s| RecvOutcome { elapsed_s })
    };
    Ok(spawn(events, link_stats, run))
}

fn spawn<T: Send + 'static>(
    events: mpsc::UnboundedReceiver<Event>,
    link_stats: SharedLinkStats,
    run: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
) -> Transfer<T> {
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let (ended_tx, ended) = watch::channel(false);
    let task = tokio::spawn(async move {
        let result = tokio::select! {
            r = run => r,
            _ = Cancel::cancelled(cancel_rx) => Err(NodeError::Cancelled),
        };
        // Detach the programs and remove their pins, whatever the outcome.
        link_stats.lock().unwrap().take();
        ended_tx.send_replace(true);
        result
    });
    Transfer {
        events,
        ended,
        cancel: Cancel(Arc::new(cancel_tx)),
        task,
    }
}

/// A node's options from `swarm`, its event stream, and its link stats attaching in the
/// background (a `ready` event once that is settled).
fn start_node(
    swarm: &Swarm,
) -> Result<(NodeOptions, mpsc::UnboundedReceiver<Event>, SharedLinkStats), Error> {
    transport::check_token(&swarm.token)?;
    let started = Instant::now();
    let (output, events) = match swarm.output {
        OutputMode::Stream => Output::stream(),
        OutputMode::Print { json } => (Output::new(json), mpsc::unbounded_channel().1),
    };
    let link_stats = SharedLinkStats::default();
    if swarm.link_stats {
        attach_link_stats(&output, &link_stats);
    } else {
        output.json_only(&Event::Ready { link_stats: false });
    }
    let opts = NodeOptions {
        port: swarm.port,
        token: swarm.token.clone(),
        output,
        link_stats: link_stats.clone(),
        misbehaviour: swarm.misbehaviour,
        congestion: swarm.congestion,
        max_rate_mbit: swarm.max_rate_mbit,
        started,
        metrics: swarm.metrics,
    };
    Ok((opts, events, link_stats))
}

/// Attaches the link-stats programs on a thread of its own, so the transfer does not wait
/// for it; they stay attached until `slot` is emptied. Without permission the transfer
/// goes on with userspace measurements only, after one warning. Then a `ready` event says
/// this node's start-up work is done (a harness may wait for it before it starts the
/// clock of a transfer).
fn attach_link_stats(output: &Output, slot: &SharedLinkStats) {
    let (output, slot) = (output.clone(), slot.clone());
    std::thread::spawn(move || {
        let attached = match LinkStats::attach() {
            Ok(s) => {
                tracing::debug!(pins = ?s.pin_dir(), "link stats attached");
                *slot.lock().unwrap() = Some(s);
                true
            }
            Err(e) => {
                tracing::warn!(
                    "in-kernel link stats unavailable ({e}); continuing with userspace \
                     measurements"
                );
                false
            }
        };
        output.json_only(&Event::Ready {
            link_stats: attached,
        });
    });
}
