//! The daemon: one core task owns the scheduler, the member list and the connection table;
//! one task per QUIC connection speaks the control protocol, serves chunk requests and
//! receives chunks (verified and written before the core hears of them).
//!
//! Whoever dials a connection pulls data over it and whoever accepts serves, so each
//! direction of a link has its own connection (and congestion controller). Every
//! destination also keeps a connection to the source for joining and completion; it pulls
//! over it only when the source is one of its overlay neighbours.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use quinn::{Connection, Endpoint, VarInt};
use serde_json::json;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::{
    discovery::{self, Kernel},
    manifest::{ChunkId, Manifest},
    progress::{self, DestProgress, FeederRates, RateTracker},
    sched::{Action, Arrival, FreshServer, Puller, SchedConfig},
    storage::{ChunkStore, StorageError},
    transport::{self, Control, TransportError, CLOSE_DONE, CLOSE_NOT_MEMBER, CLOSE_PROTOCOL},
    wire::{ChunkSet, Member, Msg, Reach, RouteView},
};

pub const DEFAULT_PORT: u16 = 7878;
/// Member id of the source; destinations are 1..=M in the order of `--dest`.
pub const SOURCE_ID: u16 = 0;
/// A member that has not answered dials for this long is routed around until it does.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(5);
/// Interval between overlapping dial attempts to a peer that has not answered yet, for the
/// first [`DIAL_EARLY_FOR`]: members usually start within seconds of each other, and each
/// interval is start-up time every destination waits (one 1200-byte packet per attempt).
const DIAL_SPACING_EARLY: Duration = Duration::from_millis(25);
const DIAL_EARLY_FOR: Duration = Duration::from_secs(5);
/// Interval between attempts after that.
const DIAL_SPACING: Duration = Duration::from_millis(100);
/// How long one dial attempt waits for the handshake and the token exchange.
const DIAL_PATIENCE: Duration = Duration::from_secs(3);
/// Attempts in flight at once (DIAL_PATIENCE / DIAL_SPACING_EARLY).
const DIAL_MAX_PENDING: usize =
    (DIAL_PATIENCE.as_millis() / DIAL_SPACING_EARLY.as_millis()) as usize;
/// Hello id of a destination that has not been told its id yet.
const JOINING: u16 = u16::MAX;

/// The source hands out no fresh chunk until every member it welcomed at the start has
/// answered (with its first View), or this long. The Welcome carries the manifest (32 bytes
/// per chunk: 32 KB for 64 MiB), and a member several hops away receives it through links
/// the first data may already fill: traced on the mesh, once in about seven runs the
/// source's connection to such a member lost 40% of its packets in the slow-start
/// overshoot of the data beside it, its window fell to the 2-packet minimum and the Welcome
/// took 3.4 s (U 1.28 x U_min instead of 1.10). Waiting costs the start the time the last
/// Welcome takes on quiet links (tens of ms).
const FRESH_HOLD_MAX: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Discovery(#[from] discovery::DiscoveryError),
    #[error("{0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("the source at {addr} did not answer within {secs} s (is `floodclone send` running there, on that port?)")]
    SourceUnreachable { addr: SocketAddrV4, secs: u64 },
    #[error("the source refused this node: {0}")]
    NotMember(String),
    #[error("{0}")]
    Other(String),
}

/// How events are shown: JSON lines on stdout, or plain lines on stderr, with progress
/// redrawn in place when stderr is a terminal.
#[derive(Clone)]
pub struct Output {
    pub json: bool,
    /// At a terminal: how many progress lines are drawn (to redraw them in place).
    live: Option<Arc<Mutex<usize>>>,
}

impl Output {
    pub fn new(json: bool) -> Self {
        use std::io::IsTerminal;
        Self {
            json,
            live: (!json && std::io::stderr().is_terminal()).then(Default::default),
        }
    }

    /// An event only JSON readers care about (nothing in plain mode).
    pub fn json_event(&self, value: serde_json::Value) {
        if self.json {
            println!("{value}");
        }
    }

    /// Progress redraws in place (a terminal) rather than printing plain lines.
    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    pub fn event(&self, value: serde_json::Value, plain: impl FnOnce() -> String) {
        if self.json {
            println!("{value}");
        } else {
            self.clear_progress();
            eprintln!("{}", plain());
        }
    }

    /// A `progress` event: the JSON object, or `lines` drawn over the previous ones.
    pub fn progress(&self, value: serde_json::Value, lines: &[String]) {
        if self.json {
            println!("{value}");
            return;
        }
        let mut text = String::new();
        if let Some(drawn) = &self.live {
            let mut drawn = drawn.lock().unwrap();
            text.push_str(&erase_lines(*drawn));
            *drawn = lines.len();
        }
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        eprint!("{text}");
    }

    fn clear_progress(&self) {
        if let Some(drawn) = &self.live {
            let mut drawn = drawn.lock().unwrap();
            if *drawn > 0 {
                eprint!("{}", erase_lines(*drawn));
                *drawn = 0;
            }
        }
    }
}

/// Terminal codes that move to the start of the `n` lines drawn last and clear from there
/// to the end of the screen.
fn erase_lines(n: usize) -> String {
    if n > 0 {
        format!("\x1b[{n}F\x1b[J")
    } else {
        "\x1b[J".to_string()
    }
}

/// The in-kernel link stats, once (and if) the programs are attached.
pub type SharedLinkStats = Arc<Mutex<Option<crate::linkstats::LinkStats>>>;

#[derive(Clone)]
pub struct Common {
    pub port: u16,
    pub token: String,
    pub output: Output,
    pub link_stats: SharedLinkStats,
    /// Testing only: flip a bit in every chunk served, so peers must reject them.
    pub corrupt_served: bool,
    /// When the command started: the source reports each destination's completion from
    /// here, the time the user waited for it.
    pub started: Instant,
}

pub struct SendConfig {
    pub common: Common,
    pub file: PathBuf,
    pub dests: Vec<SocketAddrV4>,
    /// Chunk size in bytes; `None`: the default for the file's size.
    pub chunk_bytes: Option<u32>,
    /// How long the source waits for every destination before it starts with those present.
    pub join_grace: Duration,
    /// Baseline mode: every destination pulls from the source only, nothing is relayed.
    pub direct: bool,
}

pub struct RecvConfig {
    pub common: Common,
    pub source: SocketAddrV4,
    pub out: PathBuf,
    /// How long to keep trying to reach the source at start.
    pub connect_timeout: Duration,
}

/// Per-destination result at the source.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DestResult {
    pub id: u16,
    pub addr: Ipv4Addr,
    pub elapsed_s: f64,
}

/// What the source reports when the swarm is done.
pub struct SendOutcome {
    pub dests: Vec<DestResult>,
    /// Destinations that gave up, with their reason.
    pub failed: Vec<(Ipv4Addr, String)>,
    /// Bytes this node sent per interface (in-kernel counters; empty without them).
    pub tx_bytes_by_iface: serde_json::Value,
}

type ConnKey = u64;

#[derive(Clone, Debug)]
enum Announce {
    Have(ChunkId),
    Fetching(Vec<ChunkId>),
    SourceDistance(u8),
}

enum Event {
    /// A connection finished its handshake.
    Up {
        key: ConnKey,
        info: ConnInfo,
    },
    Msg {
        key: ConnKey,
        msg: Msg,
    },
    ChunkStarted {
        key: ConnKey,
        chunk: ChunkId,
        reply: oneshot::Sender<bool>,
    },
    ChunkDone {
        key: ConnKey,
        chunk: ChunkId,
        ok: bool,
    },
    Gone {
        key: ConnKey,
        reason: String,
    },
    /// A member has not answered dials for a while (it is still being dialed).
    Unreachable {
        peer: u16,
    },
    /// A dial attempt gave up or failed for good.
    DialFailed {
        peer: u16,
        error: TransportError,
    },
    Finalized(Result<PathBuf, StorageError>),
    /// Storing a verified chunk failed: a local problem (disk), not the peer's fault.
    StoreFailed(StorageError),
}

/// State shared with connection tasks.
struct Shared {
    token: String,
    corrupt_served: bool,
    store: OnceLock<Arc<ChunkStore>>,
    /// Source only: set once the file is hashed.
    fresh: OnceLock<Mutex<FreshServer>>,
    /// Source only: fresh chunks are handed out once this is true (see [`FRESH_HOLD_MAX`]);
    /// requests that come earlier wait.
    fresh_gate: watch::Sender<bool>,
    /// What this node tells every neighbour: chunks it now holds, chunks it is fetching.
    announce: broadcast::Sender<Announce>,
    events: mpsc::UnboundedSender<Event>,
    next_key: AtomicU64,
}

impl Shared {
    /// Shared state and the core's event receiver; `announce_capacity` bounds how far a
    /// connection may lag behind the announcements.
    fn new(
        common: &Common,
        announce_capacity: usize,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Self {
            token: common.token.clone(),
            corrupt_served: common.corrupt_served,
            store: OnceLock::new(),
            fresh: OnceLock::new(),
            fresh_gate: watch::channel(false).0,
            announce: broadcast::channel(announce_capacity).0,
            events,
            next_key: AtomicU64::new(0),
        });
        (shared, rx)
    }

    fn key(&self) -> ConnKey {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }
}

struct ConnInfo {
    peer: Option<u16>,
    dialed: bool,
    tx: mpsc::UnboundedSender<Msg>,
    conn: Connection,
    remote: SocketAddr,
}

/// Accepts connections until the endpoint closes.
fn spawn_acceptor(ep: Endpoint, shared: Arc<Shared>) {
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                match transport::authenticate_acceptor(&conn, &shared.token).await {
                    Ok(ctl) => connection_task(shared, conn, ctl, false, None, Vec::new()).await,
                    // A dialer closes its other attempts once one is through.
                    Err(e @ TransportError::Lost(_)) => {
                        tracing::debug!(remote = %conn.remote_address(), "dropped: {e}")
                    }
                    Err(e) => tracing::warn!(remote = %conn.remote_address(), "refused: {e}"),
                }
            });
        }
    });
}

/// Dials `addr` until it answers (or `deadline`), then runs the connection.
fn spawn_dial(
    ep: Endpoint,
    shared: Arc<Shared>,
    addr: SocketAddr,
    peer: u16,
    hello: Vec<Msg>,
    deadline: Option<Instant>,
) {
    tokio::spawn(async move {
        // A handshake sent before the peer was up is lost, and quinn resends it only after
        // a second or more. So attempts overlap: a new one every DIAL_SPACING_EARLY (later
        // DIAL_SPACING), each waiting up to DIAL_PATIENCE (time for a far peer's handshake);
        // the first through wins. A peer that comes up is joined within about one spacing.
        let started = Instant::now();
        let mut attempts = tokio::task::JoinSet::new();
        let mut reported = false;
        let mut last_error = None;
        let won = 'dialing: loop {
            if attempts.len() < DIAL_MAX_PENDING {
                let (ep, shared) = (ep.clone(), shared.clone());
                attempts.spawn(async move {
                    let conn = transport::dial(&ep, addr, DIAL_PATIENCE).await?;
                    let ctl = transport::authenticate_dialer(&conn, &shared.token).await?;
                    Ok::<_, TransportError>((conn, ctl))
                });
            }
            let spacing = if started.elapsed() < DIAL_EARLY_FOR {
                DIAL_SPACING_EARLY
            } else {
                DIAL_SPACING
            };
            let next_attempt = tokio::time::sleep(spacing);
            tokio::pin!(next_attempt);
            loop {
                tokio::select! {
                    _ = &mut next_attempt => break,
                    Some(done) = attempts.join_next() => match done {
                        Ok(Ok(won)) => break 'dialing Ok(won),
                        // A node shutting down dials no more (it would retry every
                        // spacing until it exits).
                        Ok(Err(
                            e @ (TransportError::Refused
                            | TransportError::BadToken
                            | TransportError::Stopping),
                        )) => {
                            break 'dialing Err(e);
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, "dial failed, retrying: {e}");
                            last_error = Some(e);
                        }
                        Err(_) => {}
                    },
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break Err(last_error.unwrap_or_else(|| {
                    TransportError::Lost(format!("no answer from {addr} within the deadline"))
                }));
            }
            if !reported && peer != SOURCE_ID && started.elapsed() > UNREACHABLE_AFTER {
                reported = true;
                let _ = shared.events.send(Event::Unreachable { peer });
            }
        };
        // Only one connection to a peer may live: every other attempt is stopped, and one
        // that got through meanwhile is closed (left open, the peer would keep a connection
        // nobody reads, queueing every announcement for it).
        attempts.abort_all();
        while let Some(done) = attempts.join_next().await {
            if let Ok(Ok((conn, _))) = done {
                conn.close(VarInt::from_u32(CLOSE_DONE), b"another attempt won");
            }
        }
        match won {
            Ok((conn, ctl)) => connection_task(shared, conn, ctl, true, Some(peer), hello).await,
            Err(TransportError::Stopping) => {}
            Err(error) => {
                let _ = shared.events.send(Event::DialFailed { peer, error });
            }
        }
    });
}

/// Serves one connection: control messages both ways, chunk requests (acceptor side), chunk
/// streams (dialer side).
async fn connection_task(
    shared: Arc<Shared>,
    conn: Connection,
    ctl: Control,
    dialed: bool,
    peer: Option<u16>,
    hello: Vec<Msg>,
) {
    let key = shared.key();
    let Control {
        send: mut ctl_send,
        recv: mut ctl_recv,
    } = ctl;
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    for m in hello {
        let _ = tx.send(m);
    }
    // Writer: frames from `tx` onto the control stream, in order.
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if ctl_send.write_all(&m.encode()).await.is_err() {
                break;
            }
        }
    });
    // Subscribe before the main loop hears of the connection: it answers `Up` with our
    // bitfield, and a chunk that arrives after that must reach this connection as a
    // `Have`. Subscribing later lost such a `Have` now and then (a tree leaf never asked
    // for chunk 0, which its only neighbour got while the connection came up).
    // A destination reads announcements only on the connection it dialed (the one it pulls
    // over), so ours go out on the connections dialed to us, and to the source, which
    // counts what each destination holds. Sent on both connections of a pair they cost a
    // small packet each on every link between the two: on the narrow-source dumbbell
    // about 1% of the bottleneck, carrying 2,600 ignored packets per pair.
    let peer_listens = !dialed || peer == Some(SOURCE_ID);
    let mut announcements = peer_listens.then(|| shared.announce.subscribe());
    let _ = shared.events.send(Event::Up {
        key,
        info: ConnInfo {
            peer,
            dialed,
            tx: tx.clone(),
            conn: conn.clone(),
            remote: conn.remote_address(),
        },
    });

    // Serving: a FIFO of requested chunks, sent one stream each with falling priority so
    // the wire carries them in request order (all below the control stream's).
    let (queue_tx, mut queue_rx) = mpsc::unbounded_channel::<ChunkId>();
    let cancelled: Arc<Mutex<HashSet<ChunkId>>> = Arc::default();
    let sender = {
        let conn = conn.clone();
        let shared = shared.clone();
        let cancelled = cancelled.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut seq: i32 = 0;
            while let Some(c) = queue_rx.recv().await {
                if cancelled.lock().unwrap().remove(&c) {
                    continue;
                }
                let Some(store) = shared.store.get() else {
                    continue;
                };
                let mut data = match store.read_chunk(c) {
                    Ok(d) => d,
                    Err(_) => {
                        let _ = tx.send(Msg::DontHave { chunk: c });
                        continue;
                    }
                };
                if shared.corrupt_served {
                    if let Some(b) = data.last_mut() {
                        *b ^= 1;
                    }
                }
                let Ok(mut s) = conn.open_uni().await else {
                    break;
                };
                let _ = s.set_priority(transport::CONTROL_PRIORITY - 1 - seq);
                seq = seq.wrapping_add(1).max(0);
                let conn = conn.clone();
                // Write in the background so the next chunk's stream opens at once.
                tokio::spawn(async move {
                    if s.write_all(&c.to_be_bytes()).await.is_ok()
                        && s.write_all(&data).await.is_ok()
                    {
                        let _ = s.finish();
                    }
                    drop(conn);
                });
            }
        })
    };

    // Receiving chunk streams (dialer side).
    let receiver = if dialed {
        let conn = conn.clone();
        let shared = shared.clone();
        Some(tokio::spawn(async move {
            while let Ok(mut s) = conn.accept_uni().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let mut head = [0u8; 4];
                    if s.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let chunk = u32::from_be_bytes(head);
                    let (reply, wanted) = oneshot::channel();
                    if shared
                        .events
                        .send(Event::ChunkStarted { key, chunk, reply })
                        .is_err()
                    {
                        return;
                    }
                    if !wanted.await.unwrap_or(false) {
                        let _ = s.stop(VarInt::from_u32(0));
                        return;
                    }
                    let Some(store) = shared.store.get() else {
                        return;
                    };
                    let len = store.manifest().chunk_range(chunk).1;
                    let ok = match s.read_to_end(len).await {
                        Ok(data) => match store.write_chunk(chunk, &data) {
                            Ok(ok) => ok,
                            Err(e) => {
                                let _ = shared.events.send(Event::StoreFailed(e));
                                return;
                            }
                        },
                        // Too long counts as corrupt; a reset stream as merely lost.
                        Err(quinn::ReadToEndError::TooLong) => false,
                        Err(_) => {
                            let _ = shared.events.send(Event::ChunkDone {
                                key,
                                chunk,
                                ok: false,
                            });
                            return;
                        }
                    };
                    let _ = shared.events.send(Event::ChunkDone { key, chunk, ok });
                });
            }
        }))
    } else {
        None
    };

    // Source only: fresh requests answered in order, once the gate is open.
    let mut fresh_gate = shared.fresh_gate.subscribe();
    let mut held_fresh: Vec<u32> = Vec::new();
    let serve_fresh = |held: &mut Vec<u32>| {
        let Some(fresh) = shared.fresh.get() else {
            return;
        };
        for count in held.drain(..) {
            let (picks, exhausted) = {
                let mut f = fresh.lock().unwrap();
                let p = f.pick(count.min(1024));
                (p, f.exhausted())
            };
            for &c in &picks {
                let _ = queue_tx.send(c);
            }
            let _ = tx.send(Msg::FreshGrant {
                chunks: picks,
                exhausted,
            });
        }
    };
    let reason = loop {
        tokio::select! {
            batch = ctl_recv.recv_batch() => match batch {
                Ok(Some(msgs)) => {
                    for msg in msgs {
                        match msg {
                            Msg::Request { chunks } => {
                                for c in chunks {
                                    cancelled.lock().unwrap().remove(&c);
                                    let _ = queue_tx.send(c);
                                }
                            }
                            Msg::RequestFresh { count } => {
                                if shared.fresh.get().is_none() {
                                    conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"not a source");
                                    continue;
                                }
                                held_fresh.push(count);
                                if *shared.fresh_gate.borrow() {
                                    serve_fresh(&mut held_fresh);
                                }
                            }
                            Msg::Cancel { chunk } => {
                                cancelled.lock().unwrap().insert(chunk);
                            }
                            other => {
                                let _ = shared.events.send(Event::Msg { key, msg: other });
                            }
                        }
                    }
                }
                Ok(None) => break "control stream ended".to_string(),
                Err(e) => {
                    if let TransportError::Protocol(_) = e {
                        conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"malformed message");
                    }
                    break e.to_string();
                }
            },
            news = next_announcement(&mut announcements) => match news {
                Ok(Announce::Have(c)) => {
                    let _ = tx.send(Msg::Have { chunk: c });
                }
                Ok(Announce::Fetching(chunks)) => {
                    let _ = tx.send(Msg::Fetching { chunks });
                }
                Ok(Announce::SourceDistance(hops)) => {
                    let _ = tx.send(Msg::SourceDistance { hops });
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Some(store) = shared.store.get() {
                        let _ = tx.send(Msg::Bitfield { bits: store.have().to_bytes() });
                    }
                }
                Err(broadcast::error::RecvError::Closed) => break "shutting down".to_string(),
            },
            _ = fresh_gate.wait_for(|open| *open), if !held_fresh.is_empty() => {
                serve_fresh(&mut held_fresh);
            }
            e = conn.closed() => break e.to_string(),
        }
    };
    finish(&shared, key, reason, &writer, &sender, &receiver);
}

/// The next announcement for a connection that forwards them; never, for one that does not.
async fn next_announcement(
    rx: &mut Option<broadcast::Receiver<Announce>>,
) -> Result<Announce, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn finish(
    shared: &Shared,
    key: ConnKey,
    reason: String,
    writer: &tokio::task::JoinHandle<()>,
    sender: &tokio::task::JoinHandle<()>,
    receiver: &Option<tokio::task::JoinHandle<()>>,
) {
    writer.abort();
    sender.abort();
    if let Some(r) = receiver {
        r.abort();
    }
    let _ = shared.events.send(Event::Gone { key, reason });
}

/// Connections, scheduler and helpers shared by both roles' cores.
struct Core {
    shared: Arc<Shared>,
    ep: Endpoint,
    out: Output,
    start: Instant,
    conns: HashMap<ConnKey, ConnInfo>,
    /// What each connection's peer holds, as it told us (kept before a scheduler exists).
    peer_have: HashMap<ConnKey, ChunkSet>,
    link_stats: SharedLinkStats,
    meters: crate::meter::Meters,
    role: &'static str,
    /// Members being dialed (so each is dialed once at a time).
    dialing: HashSet<u16>,
    /// The interface each member's route leaves by (its data arrives on the same link).
    ingress: HashMap<u16, u32>,
}

impl Core {
    fn new(shared: Arc<Shared>, ep: Endpoint, common: &Common, role: &'static str) -> Self {
        Self {
            shared,
            ep,
            out: common.output.clone(),
            start: Instant::now(),
            conns: HashMap::new(),
            peer_have: HashMap::new(),
            link_stats: common.link_stats.clone(),
            meters: Default::default(),
            role,
            dialing: HashSet::new(),
            ingress: HashMap::new(),
        }
    }

    /// Bytes sent per interface as of the last [`Self::measure`], from the in-kernel
    /// counters (empty without them).
    fn tx_bytes_by_iface(&self) -> serde_json::Value {
        let mut by: std::collections::BTreeMap<String, u64> = Default::default();
        for m in self.meters.links.values() {
            *by.entry(crate::linkstats::interface_name(m.ifindex))
                .or_default() += m.tx.bytes;
        }
        json!(by)
    }

    /// Tells the scheduler what the kernel shows of the path to neighbour `p`: its receive
    /// rate (windowed max), router hops and the link its data arrives on.
    fn tell_path(&self, pl: &mut Puller, members: &[Member], p: u16) {
        let Some(m) = members.iter().find(|m| m.id == p) else {
            return;
        };
        let (_, max_bps) = self.meters.rx_from(m.addr);
        if max_bps > 0.0 {
            pl.peer_measured_rate(p, max_bps);
        }
        if let Some(hops) = self.meters.hops_to(m.addr) {
            pl.peer_distance(p, hops);
        }
        if let Some(&ifindex) = self.ingress.get(&p) {
            pl.peer_ingress(p, ifindex);
        }
    }

    /// Reads the in-kernel counters (when attached) into the link meters.
    fn read_link_counters(&mut self) {
        if let Some(ls) = self.link_stats.lock().unwrap().as_ref() {
            if let Ok(snap) = ls.snapshot() {
                let at = snap.at.duration_since(self.start).as_secs_f64();
                self.meters.update(&snap, at);
            }
        }
    }

    /// Reads the in-kernel counters and publishes what only this process knows (QUIC
    /// RTTs) for `floodclone stats`.
    fn measure(&mut self) {
        self.read_link_counters();
        if tracing::enabled!(target: "floodclone::quic", tracing::Level::TRACE) {
            for c in self.conns.values() {
                let st = c.conn.stats();
                tracing::trace!(target: "floodclone::quic", peer = c.peer, dialed = c.dialed,
                    rtt_ms = st.path.rtt.as_secs_f64() * 1e3, cwnd = st.path.cwnd,
                    lost = st.path.lost_packets, congestion_events = st.path.congestion_events,
                    tx_bytes = st.udp_tx.bytes, tx_datagrams = st.udp_tx.datagrams,
                    mtu = st.path.current_mtu, black_holes = st.path.black_holes_detected,
                    "connection");
            }
        }
        let peers = self
            .conns
            .values()
            .filter_map(|c| match c.remote {
                SocketAddr::V4(a) => Some(crate::stats::PeerStatus {
                    addr: *a.ip(),
                    member: c.peer,
                    rtt_ms: c.conn.rtt().as_secs_f64() * 1e3,
                }),
                _ => None,
            })
            .collect();
        crate::stats::publish_status(&crate::stats::DaemonStatus {
            role: self.role.into(),
            peers,
        });
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn send(&self, key: ConnKey, msg: Msg) {
        if let Some(c) = self.conns.get(&key) {
            let _ = c.tx.send(msg);
        }
    }

    fn bitfield_to_all(&self) {
        if let Some(store) = self.shared.store.get() {
            let bits = store.have().to_bytes();
            for c in self.conns.values() {
                let _ = c.tx.send(Msg::Bitfield { bits: bits.clone() });
            }
        }
    }

    /// Records a peer's Bitfield or Have; returns the chunks newly known to be held.
    fn note_peer_have(&mut self, key: ConnKey, msg: &Msg) -> Vec<ChunkId> {
        let Some(store) = self.shared.store.get() else {
            return Vec::new();
        };
        let n = store.manifest().chunk_count();
        let set = self
            .peer_have
            .entry(key)
            .or_insert_with(|| ChunkSet::new(n));
        match msg {
            Msg::Bitfield { bits } => ChunkSet::from_bytes(n, bits)
                .iter()
                .filter(|&c| set.insert(c))
                .collect(),
            Msg::Have { chunk } if set.insert(*chunk) => vec![*chunk],
            _ => Vec::new(),
        }
    }
}

/// `floodclone recv`: joins the source, fetches and re-serves chunks, writes the file.
/// Returns seconds from start until the copy was complete and verified.
pub async fn run_recv(cfg: RecvConfig) -> Result<f64, NodeError> {
    // Destinations announce every chunk they receive and fetch; a lagging connection
    // catches up with a whole Bitfield.
    let (shared, mut events) = Shared::new(&cfg.common, 1 << 14);
    let ep = transport::endpoint(cfg.common.port)?;
    spawn_acceptor(ep.clone(), shared.clone());
    let kernel = Kernel::open()?;
    let addrs = kernel.local_addrs().await?;
    let mut core = Core::new(shared.clone(), ep.clone(), &cfg.common, "destination");
    spawn_dial(
        ep.clone(),
        shared.clone(),
        SocketAddr::V4(cfg.source),
        SOURCE_ID,
        vec![
            Msg::Hello { id: JOINING },
            Msg::Join {
                port: cfg.common.port,
                addrs,
            },
        ],
        Some(Instant::now() + cfg.connect_timeout),
    );

    let mut me = JOINING;
    let mut relay = true;
    // Members whose process is gone (their kernel may still forward): the members behind
    // them become our neighbours until they are back.
    let mut rate = RateTracker::default();
    let mut feeders = FeederRates::default();
    let mut dead: HashSet<u16> = HashSet::new();
    // Members that sent chunks failing verification: never pulled from again.
    let mut banned: HashSet<u16> = HashSet::new();
    let mut resumed_chunks = 0u32;
    let mut members: Vec<Member> = Vec::new();
    let mut puller: Option<Puller> = None;
    let mut pull: HashMap<u16, ConnKey> = HashMap::new();
    let mut neighbours: Vec<u16> = Vec::new();
    let mut source_key: Option<ConnKey> = None;
    // Our hops to the source as last told to the neighbours.
    let mut source_hops: Option<u8> = None;
    let mut complete: Option<f64> = None;
    let mut finalizing = false;
    let mut source_lost_at: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut ticks = 0u64;
    let result = loop {
        let event = tokio::select! {
            ev = events.recv() => match ev { Some(ev) => ev, None => break Err(NodeError::Other("event channel closed".into())) },
            _ = tick.tick() => {
                ticks += 1;
                core.measure();
                // Neighbours compare it with their own hops to us and to the source.
                let hops = core.meters.hops_to(*cfg.source.ip());
                if let Some(h) = hops.filter(|_| hops != source_hops) {
                    source_hops = hops;
                    let _ = shared.announce.send(Announce::SourceDistance(h));
                }
                // The plan follows measured rates: each neighbour's receive rate as the
                // kernel sees it (windowed max) informs its pipeline depth.
                if let Some(pl) = puller.as_mut() {
                    for &p in pull.keys() {
                        core.tell_path(pl, &members, p);
                    }
                }
                if let Some(store) = shared.store.get() {
                    if !store.is_complete() && ticks.is_multiple_of(5) {
                        if let Err(e) = store.save_state() { break Err(e.into()); }
                    }
                    // Progress each second where it is cheap to look at, every 5 s in logs.
                    let every = if core.out.json || core.out.is_live() { 5 } else { 25 };
                    if ticks.is_multiple_of(every) {
                        report_progress(&core, store, &mut rate, &mut feeders);
                    }
                }
                // Complete, and the source is gone for good: nothing left to serve for.
                if complete.is_some() && source_lost_at.is_some_and(|t| t.elapsed() > Duration::from_secs(10)) {
                    break Ok(());
                }
                continue;
            }
        };
        let now = core.now();
        let mut need_rediscover = false;
        match event {
            Event::Up { key, info } => {
                let (dialed, peer) = (info.dialed, info.peer);
                // A member we had given up for dead is back: route through it again.
                if let Some(p) = peer.filter(|_| dialed) {
                    core.dialing.remove(&p);
                    need_rediscover |= dead.remove(&p);
                }
                let tx = info.tx.clone();
                if let Some(store) = shared.store.get() {
                    let _ = tx.send(Msg::Bitfield {
                        bits: store.have().to_bytes(),
                    });
                }
                if let Some(hops) = source_hops {
                    let _ = tx.send(Msg::SourceDistance { hops });
                }
                if dialed && peer == Some(SOURCE_ID) {
                    source_key = Some(key);
                    source_lost_at = None;
                    // A restarted source must hear again that we are done.
                    if let Some(elapsed) = complete {
                        let _ = tx.send(Msg::Done {
                            elapsed_ms: (elapsed * 1000.0) as u64,
                        });
                    }
                }
                core.conns.insert(key, info);
                if let (true, Some(p)) = (dialed, peer) {
                    pull.insert(p, key);
                    if let Some(pl) = puller.as_mut().filter(|_| neighbours.contains(&p)) {
                        pl.add_peer(p, p == SOURCE_ID);
                        // The handshake's packets already tell the hops: the scheduler
                        // needs them from its first requests on (which member of a group
                        // fetches a chunk from afar), not one tick later.
                        core.read_link_counters();
                        core.tell_path(pl, &members, p);
                    }
                }
            }
            Event::Msg { key, msg } => {
                let from = core.conns.get(&key).and_then(|c| c.peer);
                match msg {
                    Msg::Welcome {
                        you,
                        manifest,
                        members: list,
                        relay: swarm_relays,
                    } => {
                        relay = swarm_relays;
                        if let Some(store) = shared.store.get() {
                            if store.manifest() != &manifest {
                                break Err(NodeError::Other(
                                    "the source restarted with a different file".into(),
                                ));
                            }
                        } else {
                            me = you;
                            let store = match ChunkStore::destination(&cfg.out, manifest.clone()) {
                                Ok(s) => Arc::new(s),
                                Err(e) => break Err(e.into()),
                            };
                            let resumed = store.have().count();
                            resumed_chunks = resumed;
                            let _ = shared.store.set(store.clone());
                            puller = Some(Puller::new(
                                SchedConfig {
                                    member: me,
                                    ..SchedConfig::new(manifest.chunk_bytes as u64)
                                },
                                store.have(),
                            ));
                            core.bitfield_to_all();
                            core.out.event(
                                json!({"event": "welcome", "member": me, "bytes": manifest.size,
                                       "chunks": manifest.chunk_count(), "chunk_bytes": manifest.chunk_bytes,
                                       "resumed_chunks": resumed}),
                                || format!("joined as member {me}: {} bytes in {} chunks ({resumed} already here)",
                                           manifest.size, manifest.chunk_count()),
                            );
                        }
                        members = with_source_addr(list, cfg.source);
                        need_rediscover = true;
                    }
                    Msg::Members { members: list } => {
                        members = with_source_addr(list, cfg.source);
                        need_rediscover = me != JOINING;
                    }
                    Msg::Hello { id } => {
                        if let Some(c) = core.conns.get_mut(&key) {
                            c.peer = Some(id);
                        }
                    }
                    Msg::Bitfield { .. } | Msg::Have { .. } => {
                        let new = core.note_peer_have(key, &msg);
                        if let (Some(p), Some(pl)) = (from, puller.as_mut()) {
                            if pull.get(&p) == Some(&key) {
                                for c in new {
                                    pl.peer_has(p, c);
                                }
                            }
                        }
                    }
                    Msg::FreshGrant { chunks, exhausted } => {
                        tracing::trace!(target: "floodclone::chunks", peer = ?from, ?chunks, exhausted, "fresh granted");
                        if let (Some(p), Some(pl)) = (from, puller.as_mut()) {
                            pl.fresh_granted(p, &chunks, exhausted, core.now());
                            if !chunks.is_empty() {
                                let _ = shared.announce.send(Announce::Fetching(chunks));
                            }
                        }
                    }
                    Msg::SourceDistance { hops } => {
                        if let (Some(p), Some(pl)) = (from, puller.as_mut()) {
                            pl.peer_source_distance(p, hops);
                        }
                    }
                    Msg::Fetching { chunks } => {
                        if let (Some(p), Some(pl)) = (from, puller.as_mut()) {
                            if pull.get(&p) == Some(&key) {
                                let now = core.now();
                                for c in chunks {
                                    pl.peer_fetching(p, c, now);
                                }
                            }
                        }
                    }
                    Msg::DontHave { chunk } => {
                        if let (Some(p), Some(pl)) = (from, puller.as_mut()) {
                            pl.dont_have(p, chunk);
                        }
                    }
                    Msg::SwarmDone if complete.is_some() => break Ok(()),
                    _ => {}
                }
            }
            Event::ChunkStarted { key, chunk, reply } => {
                let ok = match (core.conns.get(&key).and_then(|c| c.peer), puller.as_mut()) {
                    (Some(p), Some(pl)) => pl.chunk_started(p, chunk, now) == Arrival::Accept,
                    _ => false,
                };
                let _ = reply.send(ok);
            }
            Event::ChunkDone { key, chunk, ok } => {
                let (Some(p), Some(pl)) =
                    (core.conns.get(&key).and_then(|c| c.peer), puller.as_mut())
                else {
                    continue;
                };
                pl.chunk_done(p, chunk, ok, now);
                tracing::trace!(target: "floodclone::chunks", peer = p, chunk, ok, "chunk arrived");
                if ok {
                    if let Some(store) = shared.store.get() {
                        feeders.received(p, store.manifest().chunk_range(chunk).1 as u64);
                    }
                    let _ = shared.announce.send(Announce::Have(chunk));
                } else if pl.bad_chunks(p) >= 3 {
                    tracing::warn!(
                        peer = p,
                        "disconnecting: {} chunks failed verification; not pulling from it again",
                        pl.bad_chunks(p)
                    );
                    pl.remove_peer(p);
                    banned.insert(p);
                    need_rediscover = true;
                    if let Some(c) = core.conns.get(&key) {
                        c.conn.close(
                            VarInt::from_u32(transport::CLOSE_BAD_DATA),
                            b"corrupt chunks",
                        );
                    }
                } else {
                    tracing::warn!(
                        peer = p,
                        chunk,
                        "chunk failed verification; fetching it again"
                    );
                }
            }
            Event::StoreFailed(e) => break Err(e.into()),
            Event::Finalized(res) => {
                let path = match res {
                    Ok(p) => p,
                    Err(e) => break Err(e.into()),
                };
                let elapsed = core.now();
                complete = Some(elapsed);
                let bytes = shared.store.get().map_or(0, |s| s.manifest().size);
                let dups = puller.as_ref().map_or(0, |p| p.duplicates);
                let received = puller.as_ref().map_or(0, |p| p.received);
                core.out.event(
                    json!({"event": "complete", "elapsed_s": elapsed, "bytes": bytes,
                           "path": path.display().to_string(), "duplicates": dups,
                           "received_chunks": received, "resumed_chunks": resumed_chunks}),
                    || {
                        format!(
                            "complete: {bytes} bytes verified in {elapsed:.2} s -> {}",
                            path.display()
                        )
                    },
                );
                if let Some(k) = source_key {
                    core.send(
                        k,
                        Msg::Done {
                            elapsed_ms: (elapsed * 1000.0) as u64,
                        },
                    );
                }
            }
            Event::Gone { key, reason } => {
                let info = core.conns.remove(&key);
                core.peer_have.remove(&key);
                let Some(info) = info else { continue };
                tracing::debug!(peer = ?info.peer, %reason, "connection closed");
                if let (true, Some(p)) = (info.dialed, info.peer) {
                    if pull.get(&p) == Some(&key) {
                        pull.remove(&p);
                        if let Some(pl) = puller.as_mut() {
                            pl.remove_peer(p);
                        }
                    }
                    if p == SOURCE_ID {
                        source_key = None;
                        source_lost_at = Some(Instant::now());
                        // `me` is still JOINING if the source never welcomed us.
                        let hello = vec![
                            Msg::Hello { id: me },
                            Msg::Join {
                                port: cfg.common.port,
                                addrs: kernel.local_addrs().await.unwrap_or_default(),
                            },
                        ];
                        spawn_dial(
                            ep.clone(),
                            shared.clone(),
                            SocketAddr::V4(cfg.source),
                            SOURCE_ID,
                            hello,
                            None,
                        );
                    } else if neighbours.contains(&p) && !banned.contains(&p) {
                        if reason.contains("timed out") || reason.contains("reset") {
                            tracing::warn!(member = p, "neighbour vanished; routing around it");
                            dead.insert(p);
                            need_rediscover = true;
                        }
                        if let Some(m) = members
                            .iter()
                            .find(|m| m.id == p)
                            .filter(|_| core.dialing.insert(p))
                        {
                            spawn_dial(
                                ep.clone(),
                                shared.clone(),
                                SocketAddr::V4(SocketAddrV4::new(m.addr, m.port)),
                                p,
                                vec![Msg::Hello { id: me }],
                                None,
                            );
                        }
                    }
                }
            }
            Event::Unreachable { peer } => {
                tracing::warn!(
                    member = peer,
                    "neighbour does not answer; routing around it"
                );
                need_rediscover |= dead.insert(peer);
            }
            Event::DialFailed { peer, error } => {
                if peer == SOURCE_ID {
                    break Err(match error {
                        TransportError::Refused | TransportError::BadToken => error.into(),
                        _ => NodeError::SourceUnreachable {
                            addr: cfg.source,
                            secs: cfg.connect_timeout.as_secs(),
                        },
                    });
                }
                tracing::warn!(peer, "giving up on neighbour: {error}");
            }
        }
        if need_rediscover && me != JOINING {
            let found = rediscover(
                &kernel,
                &mut core,
                me,
                relay,
                &dead,
                &banned,
                &members,
                &mut neighbours,
                &mut puller,
                &pull,
                source_key,
            )
            .await;
            if let Err(e) = found {
                break Err(e);
            }
        }
        if puller.as_ref().is_some_and(|pl| pl.is_complete()) && !finalizing {
            finalizing = true;
            let store = shared
                .store
                .get()
                .expect("a scheduler implies a store")
                .clone();
            let events = shared.events.clone();
            tokio::task::spawn_blocking(move || {
                let checking = Instant::now();
                let done = store.finalize();
                tracing::debug!(ms = checking.elapsed().as_millis() as u64, "file checked");
                let _ = events.send(Event::Finalized(done));
            });
        }
        if let Some(pl) = puller.as_mut() {
            let now = core.now();
            for action in pl.poll(now) {
                let (peer, msg) = match action {
                    Action::Request { peer, chunks } => {
                        tracing::trace!(target: "floodclone::chunks", peer, ?chunks, "requested");
                        let _ = shared.announce.send(Announce::Fetching(chunks.clone()));
                        (peer, Msg::Request { chunks })
                    }
                    Action::RequestFresh { peer, count } => (peer, Msg::RequestFresh { count }),
                    Action::Cancel { peer, chunk } => (peer, Msg::Cancel { chunk }),
                };
                if let Some(&k) = pull.get(&peer) {
                    core.send(k, msg);
                }
            }
        }
    };
    if let (Err(e), Some(k)) = (&result, source_key) {
        // Let the swarm finish without us, and say why.
        core.send(
            k,
            Msg::Failed {
                reason: e.to_string(),
            },
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ep.close(VarInt::from_u32(CLOSE_DONE), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
    // Last reading before the status file goes (measuring publishes it again).
    core.measure();
    let tx = core.tx_bytes_by_iface();
    crate::stats::remove_status();
    match result {
        Ok(()) => {
            core.out.event(
                json!({"event": "swarm_done", "peak_rss_bytes": peak_rss_bytes(),
                       "tx_bytes_by_iface": tx}),
                || "swarm done".into(),
            );
            Ok(complete.unwrap_or_default())
        }
        Err(e) => Err(e),
    }
}

/// Starts the transfer: every joined member learns the member list and the file. Returns
/// the ids welcomed.
fn welcome_all(
    core: &Core,
    control: &HashMap<u16, ConnKey>,
    members: &[Member],
    welcome: &impl Fn(u16, &[Member]) -> Msg,
    chunks: u32,
) -> HashSet<u16> {
    for (&id, &k) in control {
        core.send(k, welcome(id, members));
        core.send(
            k,
            Msg::Bitfield {
                bits: ChunkSet::full(chunks).to_bytes(),
            },
        );
    }
    control.keys().copied().collect()
}

/// Opens the source's fresh chunks (see [`FRESH_HOLD_MAX`]) and says who had not answered.
fn open_fresh(core: &Core, held_for: Duration, silent: &HashSet<u16>) {
    core.shared.fresh_gate.send_replace(true);
    let mut silent: Vec<u16> = silent.iter().copied().collect();
    silent.sort_unstable();
    core.out.event(
        json!({"event": "fresh_open", "held_ms": held_for.as_millis() as u64, "silent": silent}),
        || {
            format!(
                "handing out chunks after {} ms (not yet answered: {silent:?})",
                held_for.as_millis()
            )
        },
    );
}

/// A destination's `progress` event / lines.
fn report_progress(
    core: &Core,
    store: &ChunkStore,
    rate: &mut RateTracker,
    feeders: &mut FeederRates,
) {
    let now = core.now();
    let have = store.have();
    let total = store.manifest().size;
    let done = store.manifest().bytes_in(have.count());
    let bps = rate.update(done, now);
    let from = feeders.take(now);
    let value = json!({"event": "progress", "elapsed_s": now, "bytes": done, "total_bytes": total,
                       "rate_bps": bps, "eta_s": progress::eta_s(total - done, bps),
                       "from": from.iter().map(|(m, b)| json!({"member": m, "rate_bps": b})).collect::<Vec<_>>(),
                       "tx_bytes_by_iface": core.tx_bytes_by_iface()});
    core.out
        .progress(value, &progress::dest_lines(done, total, bps, &from));
}

/// Peak resident memory of this process, in bytes.
pub fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as u64 * 1024
}

/// The source's own entry carries no dialable address: destinations know it as `--source`.
fn with_source_addr(mut members: Vec<Member>, source: SocketAddrV4) -> Vec<Member> {
    for m in &mut members {
        if m.id == SOURCE_ID {
            m.addr = *source.ip();
            m.port = source.port();
        }
    }
    members
}

/// Route lookups for every joined member, the view sent to the source, and the data
/// neighbours updated (new ones dialed, ones now behind another member dropped).
#[allow(clippy::too_many_arguments)]
async fn rediscover(
    kernel: &Kernel,
    core: &mut Core,
    me: u16,
    relay: bool,
    dead: &HashSet<u16>,
    banned: &HashSet<u16>,
    members: &[Member],
    neighbours: &mut Vec<u16>,
    puller: &mut Option<Puller>,
    pull: &HashMap<u16, ConnKey>,
    source_key: Option<ConnKey>,
) -> Result<(), NodeError> {
    let joined: Vec<Member> = members.iter().filter(|m| m.joined).cloned().collect();
    let lookups = kernel.lookups(&joined, me).await?;
    let mut views = discovery::classify(members, &lookups);
    core.ingress = views.iter().map(|v| (v.member, v.ifindex)).collect();
    for v in &mut views {
        // Behind a member whose process is gone: its kernel still forwards, so the member
        // behind it is reached as if through a router.
        if v.reach == Reach::Behind && v.via_member.is_some_and(|m| dead.contains(&m)) {
            v.reach = Reach::ViaRouter;
        }
    }
    if let Some(k) = source_key {
        core.send(
            k,
            Msg::View {
                routes: views.clone(),
            },
        );
    }
    let mut next = if relay {
        discovery::data_neighbours(me, &views)
    } else {
        vec![SOURCE_ID]
    };
    next.retain(|n| !banned.contains(n));
    for &gone in neighbours.iter().filter(|n| !next.contains(n)) {
        if let Some(pl) = puller.as_mut() {
            pl.remove_peer(gone);
        }
        if gone != SOURCE_ID {
            if let Some(&k) = pull.get(&gone) {
                if let Some(c) = core.conns.get(&k) {
                    c.conn
                        .close(VarInt::from_u32(CLOSE_DONE), b"not a neighbour");
                }
            }
        }
    }
    // Fresh counters for the hops of neighbours whose connections are already up.
    core.read_link_counters();
    for &new in next.iter().filter(|n| !neighbours.contains(n)) {
        match pull.get(&new) {
            Some(&k) => {
                if let Some(pl) = puller.as_mut() {
                    pl.add_peer(new, new == SOURCE_ID);
                    if let Some(set) = core.peer_have.get(&k) {
                        pl.peer_bitfield(new, set);
                    }
                    core.tell_path(pl, members, new);
                }
            }
            None if new != SOURCE_ID && !core.dialing.contains(&new) => {
                if let Some(m) = members.iter().find(|m| m.id == new) {
                    core.dialing.insert(new);
                    spawn_dial(
                        core.ep.clone(),
                        core.shared.clone(),
                        SocketAddr::V4(SocketAddrV4::new(m.addr, m.port)),
                        new,
                        vec![Msg::Hello { id: me }],
                        None,
                    );
                }
            }
            None => {}
        }
    }
    *neighbours = next;
    core.out.event(
        json!({"event": "neighbours", "member": me, "ids": neighbours, "routes": views.iter().map(view_json).collect::<Vec<_>>()}),
        || format!("data neighbours: {neighbours:?}"),
    );
    Ok(())
}

fn view_json(v: &RouteView) -> serde_json::Value {
    let reach = match v.reach {
        Reach::Direct => "direct",
        Reach::Behind => "behind",
        Reach::ViaRouter => "via_router",
        Reach::Unreachable => "unreachable",
    };
    json!({"member": v.member, "reach": reach, "ifindex": v.ifindex,
           "gateway": v.gateway.map(|g| g.to_string()), "via_member": v.via_member})
}

/// `floodclone send`: serves the file until every destination holds a verified copy.
pub async fn run_send(cfg: SendConfig) -> Result<SendOutcome, NodeError> {
    // The source holds everything: it never announces.
    let (shared, mut events) = Shared::new(&cfg.common, 16);
    // Listen first: destinations may join while the file is being hashed.
    let ep = transport::endpoint(cfg.common.port)?;
    spawn_acceptor(ep.clone(), shared.clone());
    let (file, chunk_bytes) = (cfg.file.clone(), cfg.chunk_bytes);
    let hashing = Instant::now();
    let manifest = tokio::task::spawn_blocking(move || Manifest::from_file(&file, chunk_bytes))
        .await
        .map_err(|e| NodeError::Other(e.to_string()))??;
    tracing::debug!(
        chunks = manifest.chunk_count(),
        ms = hashing.elapsed().as_millis() as u64,
        "file hashed"
    );
    let _ = shared
        .store
        .set(Arc::new(ChunkStore::source(&cfg.file, manifest.clone())?));
    let _ = shared
        .fresh
        .set(Mutex::new(FreshServer::new(manifest.chunk_count())));
    let kernel = Kernel::open()?;
    let mut members = vec![Member {
        id: SOURCE_ID,
        addr: Ipv4Addr::UNSPECIFIED,
        port: cfg.common.port,
        local_addrs: kernel.local_addrs().await?,
        joined: true,
    }];
    for (i, d) in cfg.dests.iter().enumerate() {
        members.push(Member {
            id: i as u16 + 1,
            addr: *d.ip(),
            port: d.port(),
            local_addrs: Vec::new(),
            joined: false,
        });
    }
    let mut core = Core::new(shared.clone(), ep.clone(), &cfg.common, "source");
    core.out.event(
        json!({"event": "serving", "bytes": manifest.size, "chunks": manifest.chunk_count(),
               "chunk_bytes": manifest.chunk_bytes, "destinations": cfg.dests.len(), "port": cfg.common.port}),
        || format!("serving {} bytes in {} chunks to {} destinations on UDP port {}",
                   manifest.size, manifest.chunk_count(), cfg.dests.len(), cfg.common.port),
    );
    let welcome = |you: u16, members: &[Member]| Msg::Welcome {
        you,
        manifest: manifest.clone(),
        members: members.to_vec(),
        relay: !cfg.direct,
    };
    // Member id -> its control connection.
    let mut control: HashMap<u16, ConnKey> = HashMap::new();
    let mut started = false;
    // Members welcomed at the start that have not answered yet, and since when.
    let mut fresh_hold: Option<(HashSet<u16>, Instant)> = None;
    let mut done: HashMap<u16, f64> = HashMap::new();
    let mut failed: HashMap<u16, String> = HashMap::new();
    let mut finishing: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut source_ticks = 0u64;
    let mut dest_rates: HashMap<u16, RateTracker> = HashMap::new();
    loop {
        let event = tokio::select! {
            ev = events.recv() => match ev { Some(ev) => ev, None => break },
            _ = tick.tick() => {
                source_ticks += 1;
                if source_ticks.is_multiple_of(5) {
                    core.measure();
                }
                let every = if core.out.json || core.out.is_live() { 10 } else { 50 };
                if started && finishing.is_none() && source_ticks.is_multiple_of(every) {
                    let now = core.now();
                    let total = manifest.size;
                    let dests: Vec<DestProgress> = members[1..]
                        .iter()
                        .map(|m| {
                            let held = control
                                .get(&m.id)
                                .and_then(|k| core.peer_have.get(k))
                                .map_or(0, |set| manifest.bytes_in(set.count()));
                            let (bytes, state) = if done.contains_key(&m.id) {
                                (total, "done")
                            } else if failed.contains_key(&m.id) {
                                (held, "failed")
                            } else if m.joined {
                                (held, "receiving")
                            } else {
                                (held, "joining")
                            };
                            let rate_bps = dest_rates.entry(m.id).or_default().update(bytes, now);
                            DestProgress { member: m.id, addr: m.addr.to_string(), bytes, rate_bps, state }
                        })
                        .collect();
                    core.out.progress(
                        json!({"event": "progress", "elapsed_s": now, "total_bytes": total, "destinations": dests,
                               "tx_bytes_by_iface": core.tx_bytes_by_iface()}),
                        &progress::source_lines(total, now, &dests),
                    );
                }
                let joined = members.iter().filter(|m| m.joined).count();
                if !started && joined > 1 && core.start.elapsed() >= cfg.join_grace {
                    started = true;
                    let welcomed = welcome_all(&core, &control, &members, &welcome, manifest.chunk_count());
                    fresh_hold = Some((welcomed, Instant::now()));
                }
                if let Some((silent, since)) = fresh_hold.take_if(|(_, since)| since.elapsed() >= FRESH_HOLD_MAX) {
                    open_fresh(&core, since.elapsed(), &silent);
                }
                if let Some(t) = finishing {
                    if core.conns.is_empty() || t.elapsed() > Duration::from_secs(3) { break; }
                }
                continue;
            }
        };
        match event {
            Event::Up { key, info } => {
                core.conns.insert(key, info);
            }
            Event::Msg { key, msg } => match msg {
                Msg::Join { port, addrs } => {
                    let remote_ip = match core.conns.get(&key).map(|c| c.remote) {
                        Some(SocketAddr::V4(a)) => Some(*a.ip()),
                        _ => None,
                    };
                    let id = members
                        .iter()
                        .skip(1)
                        .find(|m| addrs.contains(&m.addr) || Some(m.addr) == remote_ip)
                        .map(|m| m.id);
                    let Some(id) = id else {
                        tracing::warn!(
                            ?remote_ip,
                            "refusing a node that is not in the --dest list"
                        );
                        if let Some(c) = core.conns.get(&key) {
                            c.conn.close(
                                VarInt::from_u32(CLOSE_NOT_MEMBER),
                                b"not in the source's --dest list",
                            );
                        }
                        continue;
                    };
                    if let Some(c) = core.conns.get_mut(&key) {
                        c.peer = Some(id);
                    }
                    let m = &mut members[id as usize];
                    m.joined = true;
                    m.local_addrs = addrs;
                    m.port = port;
                    if let Some(old) = control.insert(id, key) {
                        if old != key {
                            if let Some(c) = core.conns.get(&old) {
                                c.conn.close(VarInt::from_u32(CLOSE_DONE), b"replaced");
                            }
                        }
                    }
                    let addr = members[id as usize].addr;
                    core.out.event(
                        json!({"event": "joined", "member": id, "addr": addr.to_string()}),
                        || format!("{addr} joined as member {id}"),
                    );
                    if started {
                        core.send(key, welcome(id, &members));
                        core.send(
                            key,
                            Msg::Bitfield {
                                bits: ChunkSet::full(manifest.chunk_count()).to_bytes(),
                            },
                        );
                        for (&other, &k) in &control {
                            if other != id {
                                core.send(
                                    k,
                                    Msg::Members {
                                        members: members.clone(),
                                    },
                                );
                            }
                        }
                    }
                    // Everyone is here: start now rather than at the next tick.
                    if !started && members.iter().all(|m| m.joined) {
                        started = true;
                        let welcomed = welcome_all(
                            &core,
                            &control,
                            &members,
                            &welcome,
                            manifest.chunk_count(),
                        );
                        fresh_hold = Some((welcomed, Instant::now()));
                    }
                }
                Msg::Bitfield { .. } | Msg::Have { .. } => {
                    let new = core.note_peer_have(key, &msg);
                    if let Some(fresh) = shared.fresh.get() {
                        let mut f = fresh.lock().unwrap();
                        for c in new {
                            f.known_held(c);
                        }
                    }
                }
                Msg::View { routes } => {
                    let from = core.conns.get(&key).and_then(|c| c.peer);
                    if let Some((silent, since)) = fresh_hold.as_mut() {
                        if from.is_some_and(|id| silent.remove(&id)) && silent.is_empty() {
                            open_fresh(&core, since.elapsed(), silent);
                            fresh_hold = None;
                        }
                    }
                    core.out.event(
                        json!({"event": "view", "member": from, "routes": routes.iter().map(view_json).collect::<Vec<_>>()}),
                        || format!("member {from:?} reaches: {}", routes.iter().map(|r| format!("{}:{:?}", r.member, r.reach)).collect::<Vec<_>>().join(" ")),
                    );
                }
                Msg::Failed { reason } => {
                    let Some(id) = core.conns.get(&key).and_then(|c| c.peer) else {
                        continue;
                    };
                    let addr = members[id as usize].addr;
                    core.out.event(
                        json!({"event": "dest_failed", "member": id, "addr": addr.to_string(), "reason": reason}),
                        || format!("{addr} failed: {reason}"),
                    );
                    failed.insert(id, reason);
                    if done.len() + failed.len() == cfg.dests.len() && finishing.is_none() {
                        for c in core.conns.values() {
                            let _ = c.tx.send(Msg::SwarmDone);
                        }
                        finishing = Some(Instant::now());
                    }
                }
                Msg::Done { elapsed_ms } => {
                    let Some(id) = core.conns.get(&key).and_then(|c| c.peer) else {
                        continue;
                    };
                    let elapsed = elapsed_ms as f64 / 1000.0;
                    if done.insert(id, elapsed).is_none() {
                        let addr = members[id as usize].addr;
                        let at = cfg.common.started.elapsed().as_secs_f64();
                        core.out.event(
                            json!({"event": "dest_done", "member": id, "addr": addr.to_string(),
                                   "elapsed_s": elapsed, "at_s": at}),
                            || format!("{addr} has a verified copy ({elapsed:.2} s)"),
                        );
                    }
                    if done.len() + failed.len() == cfg.dests.len() && finishing.is_none() {
                        for c in core.conns.values() {
                            let _ = c.tx.send(Msg::SwarmDone);
                        }
                        finishing = Some(Instant::now());
                    }
                }
                _ => {}
            },
            Event::Gone { key, .. } => {
                core.conns.remove(&key);
                core.peer_have.remove(&key);
                control.retain(|_, k| *k != key);
                if finishing.is_some() && core.conns.is_empty() {
                    break;
                }
            }
            Event::ChunkStarted { reply, .. } => {
                let _ = reply.send(false);
            }
            Event::ChunkDone { .. }
            | Event::DialFailed { .. }
            | Event::Unreachable { .. }
            | Event::Finalized(_)
            | Event::StoreFailed(_) => {}
        }
    }
    core.measure();
    let tx_bytes_by_iface = core.tx_bytes_by_iface();
    ep.close(VarInt::from_u32(CLOSE_DONE), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
    crate::stats::remove_status();
    let mut results: Vec<DestResult> = done
        .into_iter()
        .map(|(id, elapsed_s)| DestResult {
            id,
            addr: members[id as usize].addr,
            elapsed_s,
        })
        .collect();
    results.sort_by_key(|r| r.id);
    let mut failed: Vec<(Ipv4Addr, String)> = failed
        .into_iter()
        .map(|(id, reason)| (members[id as usize].addr, reason))
        .collect();
    failed.sort();
    Ok(SendOutcome {
        dests: results,
        failed,
        tx_bytes_by_iface,
    })
}
