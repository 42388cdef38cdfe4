//! The connection layer, the same for both roles: dialing and accepting, the token check,
//! and one [`Conn`] per QUIC connection with two halves: serving the chunks its peer
//! requests, and receiving the chunk streams its peer sends. Everything else a connection
//! hears is passed up to the node's role as a [`ConnEvent`]; the role answers through the
//! connection's [`ConnHandle`]. Nothing here knows whether it runs at the source.
//!
//! Whoever dials a connection pulls data over it and whoever accepts serves, so each
//! direction of a link has its own connection (and congestion controller).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use floodclone_sched::{ChunkId, ChunkSet, MemberId, SOURCE};
use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::{mpsc, oneshot};

use crate::{
    storage::{ChunkStore, StorageError},
    transport::{self, Control, TransportError, CLOSE_DONE, CLOSE_PROTOCOL},
    wire::{hashes_msgs, Msg, MAX_QUEUED_CHUNKS},
};

/// Every chunk hash of `store` and the file's, as [`Msg::Hashes`] from chunk 0; `None`
/// until the file's hash is known (a part could not be checked against it).
pub fn every_hash(store: &ChunkStore) -> Option<Vec<Msg>> {
    let file_hash = store.file_hash()?;
    Some(hashes_msgs(
        0,
        &store.hashes(0, store.known()),
        Some(file_hash),
    ))
}

/// A member that has not answered dials for this long is reported unreachable (and routed
/// around until it answers; it is still dialed).
const UNREACHABLE_AFTER: Duration = Duration::from_secs(5);
/// Interval between overlapping dial attempts to a peer that has not answered yet, for the
/// first [`DIAL_EARLY_FOR`]: members usually start within seconds of each other, and each
/// interval is start-up time every destination waits (one 1200-byte packet per attempt).
pub const DIAL_SPACING_EARLY: Duration = Duration::from_millis(25);
const DIAL_EARLY_FOR: Duration = Duration::from_secs(5);
/// Interval between attempts after that.
const DIAL_SPACING: Duration = Duration::from_millis(100);
/// How long one dial attempt waits for the handshake and the token exchange.
const DIAL_PATIENCE: Duration = Duration::from_secs(3);
/// Attempts in flight at once (DIAL_PATIENCE / DIAL_SPACING_EARLY).
const DIAL_MAX_PENDING: usize =
    (DIAL_PATIENCE.as_millis() / DIAL_SPACING_EARLY.as_millis()) as usize;

/// Names one connection for as long as the node runs.
pub type ConnKey = u64;

/// What a connection tells the node's role.
pub enum ConnEvent {
    /// A connection finished its handshake and token exchange.
    Up(ConnHandle),
    /// A control message the connection does not handle itself.
    Msg { key: ConnKey, msg: Msg },
    /// A chunk stream began: may it be read? (A copy already held or coming is refused.)
    ChunkStarted {
        key: ConnKey,
        chunk: ChunkId,
        reply: oneshot::Sender<bool>,
    },
    /// A chunk stream ended: [`ChunkOutcome::Stored`] when it verified and was stored.
    ChunkDone {
        key: ConnKey,
        chunk: ChunkId,
        outcome: ChunkOutcome,
    },
    /// Storing a verified chunk failed: a local problem (disk), not the peer's fault.
    StoreFailed(StorageError),
    Gone {
        key: ConnKey,
        reason: String,
        /// We closed it: the peer sent a malformed message, or one it may not send.
        refused: bool,
    },
    /// A member has not answered dials for a while (it is still being dialed).
    Unreachable { peer: MemberId },
    /// Dialing a member gave up or failed for good.
    DialFailed {
        peer: MemberId,
        error: TransportError,
    },
}

/// Testing only: how a node's serving departs from the protocol, so that tests show its
/// peers cope.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Misbehaviour {
    #[default]
    None,
    /// Flips a bit in every chunk served: peers must reject them.
    CorruptServed,
    /// Announces what it holds as usual and sends nothing it is asked for: peers must
    /// fetch elsewhere.
    WithholdServed,
    /// Answers [`Msg::AskHashes`] with every chunk hash altered (the file's hash kept):
    /// askers must refuse the list and get the hashes elsewhere.
    ForgeGivenHashes,
    /// On every connection a neighbour dials to pull from it, says it is the source (a
    /// Hello with the source's id) and welcomes the neighbour to another file: the
    /// neighbour must refuse the connection, not take it for its way to the source. Its
    /// own dials to pull say so too (their Hello names the source): not to be believed.
    ClaimSource,
}

/// What every connection of a node shares.
pub struct ConnContext {
    token: String,
    /// Testing only: how serving departs from the protocol, so peers must cope.
    misbehaviour: Misbehaviour,
    /// `--max-rate`: chunks served wait for it, over all connections.
    upload_cap: Option<crate::upload_cap::UploadCap>,
    /// The chunks this node holds (the source's from the start, a destination's once it
    /// is welcomed).
    pub store: OnceLock<Arc<ChunkStore>>,
    /// When this node's first chunk stream opened (time to first byte).
    pub first_chunk: OnceLock<Instant>,
    events: mpsc::UnboundedSender<ConnEvent>,
    next_key: AtomicU64,
}

impl ConnContext {
    /// The context and the receiver of its connections' events.
    pub fn new(
        token: String,
        misbehaviour: Misbehaviour,
        upload_cap: Option<crate::upload_cap::UploadCap>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<ConnEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let ctx = Arc::new(Self {
            token,
            misbehaviour,
            upload_cap,
            store: OnceLock::new(),
            first_chunk: OnceLock::new(),
            events,
            next_key: AtomicU64::new(0),
        });
        (ctx, rx)
    }

    fn report(&self, event: ConnEvent) -> bool {
        self.events.send(event).is_ok()
    }
}

/// `addr` with an IPv4-mapped IPv6 address (how the dual-stack socket shows IPv4 peers)
/// written as the IPv4 one, as members and logs name it.
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The role's side of one connection.
#[derive(Clone)]
pub struct ConnHandle {
    pub key: ConnKey,
    /// Who is at the other end, once known (a dialer knows it; an acceptor learns it from
    /// the peer's Hello or Join).
    pub peer: Option<MemberId>,
    /// We dialed it: we pull over it. Otherwise we serve over it.
    pub dialed: bool,
    pub remote: SocketAddr,
    pub conn: Connection,
    control: mpsc::UnboundedSender<Msg>,
    serve: ServeQueue,
}

/// Bytes of chunks read and waiting for quinn to take them, per connection: a peer that
/// opens streams and never reads them holds this much of our memory (and quinn's send
/// window, 16 MiB), no more. quinn's window is what keeps the path busy (1 Gbit/s x 134
/// ms); this only has to cover reading the next chunk while it drains. At 64 MiB a relay
/// serving a neighbour that lagged behind could hold 80 MiB of chunks for it: the likely
/// source, with the receive window ([`crate::transport`]), of a 138 MiB peak seen once on
/// a 10 Gbit/s chain (not reproduced since).
const MAX_WRITING_BYTES: u64 = 8 << 20;

/// The chunk ids queued to serve on one connection, counted (so a peer cannot queue
/// without bound).
#[derive(Clone)]
struct ServeQueue {
    tx: mpsc::UnboundedSender<ChunkId>,
    queued: Arc<AtomicUsize>,
}

impl ServeQueue {
    fn new() -> (Self, mpsc::UnboundedReceiver<ChunkId>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        (Self { tx, queued }, rx)
    }

    fn push(&self, c: ChunkId) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(c);
    }

    fn len(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

impl ConnHandle {
    /// Queues a control message (control goes before any chunk data).
    pub fn send(&self, msg: Msg) {
        let _ = self.control.send(msg);
    }

    /// Queues chunks to send, after those already queued.
    pub fn serve(&self, chunks: &[ChunkId]) {
        for &c in chunks {
            self.serve.push(c);
        }
    }

    pub fn close(&self, code: u32, reason: &[u8]) {
        self.conn.close(VarInt::from_u32(code), reason);
    }

    /// Whether the peer reads our announcements (Have, Fetching, SourceDistance) here. A
    /// destination reads them only on the connection it dialed (the one it pulls over), so
    /// they go out on connections dialed to us, and to the source, which counts what each
    /// destination holds. Sent on both connections of a pair, they cost a small packet each
    /// on every link between the two.
    pub fn reads_announcements(&self) -> bool {
        !self.dialed || self.peer == Some(SOURCE)
    }
}

/// The node's connections, and which member each belongs to: the one owner of that map.
#[derive(Default)]
pub struct Connections {
    by_key: HashMap<ConnKey, ConnHandle>,
    /// (member, dialed by us) -> the live connection of that kind to it.
    by_member: HashMap<(MemberId, bool), ConnKey>,
}

impl Connections {
    pub fn insert(&mut self, handle: ConnHandle) {
        if let Some(p) = handle.peer {
            self.by_member.insert((p, handle.dialed), handle.key);
        }
        self.by_key.insert(handle.key, handle);
    }

    /// Names the member at the other end of `key`; returns the connection of the same kind
    /// that member had before (the caller decides whether to close it).
    pub fn bind(&mut self, key: ConnKey, member: MemberId) -> Option<ConnKey> {
        let c = self.by_key.get_mut(&key)?;
        c.peer = Some(member);
        self.by_member
            .insert((member, c.dialed), key)
            .filter(|&old| old != key)
    }

    pub fn remove(&mut self, key: ConnKey) -> Option<ConnHandle> {
        let c = self.by_key.remove(&key)?;
        if let Some(p) = c.peer {
            // Unless a newer connection of that kind is bound to the member by now.
            if self.by_member.get(&(p, c.dialed)) == Some(&key) {
                self.by_member.remove(&(p, c.dialed));
            }
        }
        Some(c)
    }

    pub fn get(&self, key: ConnKey) -> Option<&ConnHandle> {
        self.by_key.get(&key)
    }

    /// The member at the other end of `key`, if known.
    pub fn peer(&self, key: ConnKey) -> Option<MemberId> {
        self.by_key.get(&key).and_then(|c| c.peer)
    }

    /// The connection we dialed to `member` (the one we pull over).
    pub fn dialed_to(&self, member: MemberId) -> Option<&ConnHandle> {
        self.by_member
            .get(&(member, true))
            .and_then(|k| self.by_key.get(k))
    }

    /// The connection `member` dialed to us (the one we serve over).
    pub fn accepted_from(&self, member: MemberId) -> Option<&ConnHandle> {
        self.by_member
            .get(&(member, false))
            .and_then(|k| self.by_key.get(k))
    }

    pub fn iter(&self) -> impl Iterator<Item = &ConnHandle> {
        self.by_key.values()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Connections dialed for one question (an address proof, a gateway check): each lives
/// until it is answered, gone, or `lifetime` is over.
pub struct ShortLived {
    conns: Vec<(Instant, ConnHandle)>,
    lifetime: Duration,
}

impl ShortLived {
    pub fn new(lifetime: Duration) -> Self {
        Self {
            conns: Vec::new(),
            lifetime,
        }
    }

    pub fn push(&mut self, handle: ConnHandle) {
        self.conns.push((Instant::now(), handle));
    }

    /// Takes connection `key` out (it is answered or gone), if it is one of these.
    pub fn remove(&mut self, key: ConnKey) -> Option<ConnHandle> {
        let at = self.conns.iter().position(|(_, c)| c.key == key)?;
        Some(self.conns.swap_remove(at).1)
    }

    /// Closes those whose lifetime is over.
    pub fn close_expired(&mut self) {
        let lifetime = self.lifetime;
        self.conns.retain(|(since, c)| {
            let over = since.elapsed() >= lifetime;
            if over {
                c.close(CLOSE_DONE, b"no answer in time");
            }
            !over
        });
    }
}

/// Accepts connections until the endpoint closes.
pub fn spawn_acceptor(ep: Endpoint, ctx: Arc<ConnContext>) {
    // Connections not yet authenticated, at most: strangers cannot pile them up.
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_UNAUTHENTICATED));
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                tracing::warn!(remote = %unmapped(incoming.remote_address()), "refused: too many connections authenticating");
                incoming.refuse();
                continue;
            };
            let ctx = ctx.clone();
            tokio::spawn(async move {
                // Taken at once (0.5-RTT), so our half of the key exchange leaves with our
                // first flight ([`transport::authenticate_dialer_with`]).
                let Ok(connecting) = incoming.accept() else {
                    return;
                };
                let conn = match connecting.into_0rtt() {
                    Ok((conn, _)) => conn,
                    Err(connecting) => match connecting.await {
                        Ok(conn) => conn,
                        Err(_) => return,
                    },
                };
                let authenticated = transport::authenticate_acceptor(&conn, &ctx.token).await;
                drop(permit);
                match authenticated {
                    Ok(ctl) => Conn::new(ctx, conn, false, None).run(ctl, Vec::new()).await,
                    // A dialer closes its other attempts once one is through.
                    Err(e @ TransportError::Lost(_)) => {
                        tracing::debug!(remote = %unmapped(conn.remote_address()), "dropped: {e}")
                    }
                    Err(e) => {
                        tracing::warn!(remote = %unmapped(conn.remote_address()), "refused: {e}")
                    }
                }
            });
        }
    });
}

/// Most incoming connections authenticating at once (each gets [`transport::AUTH_DEADLINE`]
/// twice at most): far above what a swarm dials at once, far below what exhausts us.
const MAX_UNAUTHENTICATED: usize = 256;

/// Dials `addr` until it answers (or `deadline`), then runs the connection, sending
/// `hello` first.
pub fn spawn_dial(
    ep: Endpoint,
    ctx: Arc<ConnContext>,
    addr: SocketAddr,
    peer: MemberId,
    hello: Vec<Msg>,
    deadline: Option<Instant>,
) {
    tokio::spawn(async move {
        let hello: Arc<[Msg]> = match ctx.misbehaviour {
            Misbehaviour::ClaimSource => hello
                .into_iter()
                .map(|m| match m {
                    Msg::Hello { .. } => Msg::Hello { id: SOURCE },
                    m => m,
                })
                .collect(),
            _ => hello.into(),
        };
        match dial_until_answered(&ep, &ctx, addr, peer, hello.clone(), deadline).await {
            Ok((conn, ctl, carried)) => {
                let rest = if carried { Vec::new() } else { hello.to_vec() };
                Conn::new(ctx, conn, true, Some(peer)).run(ctl, rest).await
            }
            Err(TransportError::Stopping) => {}
            Err(error) => {
                ctx.report(ConnEvent::DialFailed { peer, error });
            }
        }
    });
}

/// Dials `addr` once (quinn resends the handshake itself) and runs the connection,
/// sending `hello` first; nothing is reported if it fails. For a dial whose silence is an
/// answer (an address proof: [`crate::claims`]), where retries would only load the path.
pub fn spawn_dial_once(
    ep: Endpoint,
    ctx: Arc<ConnContext>,
    addr: SocketAddr,
    peer: MemberId,
    hello: Vec<Msg>,
    patience: Duration,
) {
    tokio::spawn(async move {
        let Ok(conn) = transport::dial(&ep, addr, patience).await else {
            return;
        };
        if let Ok(ctl) = transport::authenticate_dialer_with(&conn, &ctx.token, &hello).await {
            Conn::new(ctx, conn, true, Some(peer))
                .run(ctl, Vec::new())
                .await;
        }
    });
}

/// Overlapping dial attempts until one gets through. A handshake sent before the peer was
/// up is lost, and quinn resends it only after a second or more. So attempts overlap: a
/// new one every DIAL_SPACING_EARLY (later DIAL_SPACING), each waiting up to DIAL_PATIENCE
/// (time for a far peer's handshake); the first through wins. A peer that comes up is
/// joined within about one spacing. `hello` goes out with the token's proof on the first
/// attempt whose handshake completes (the returned flag says whether that one won; if not,
/// it is still to be sent): one round trip sooner than after the proof, and a lost packet
/// in one attempt's proof is still covered by the next attempt.
async fn dial_until_answered(
    ep: &Endpoint,
    ctx: &Arc<ConnContext>,
    addr: SocketAddr,
    peer: MemberId,
    hello: Arc<[Msg]>,
    deadline: Option<Instant>,
) -> Result<(Connection, Control, bool), TransportError> {
    let claimed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut attempts = tokio::task::JoinSet::new();
    let mut reported = false;
    let mut last_error = None;
    let won = 'dialing: loop {
        if attempts.len() < DIAL_MAX_PENDING {
            let (ep, ctx, hello, claimed) =
                (ep.clone(), ctx.clone(), hello.clone(), claimed.clone());
            attempts.spawn(async move {
                use std::sync::atomic::Ordering::SeqCst;
                let conn = transport::dial(&ep, addr, DIAL_PATIENCE).await?;
                let carries = !claimed.swap(true, SeqCst);
                let said: &[Msg] = if carries { &hello } else { &[] };
                match transport::authenticate_dialer_with(&conn, &ctx.token, said).await {
                    Ok(ctl) => Ok((conn, ctl, carries)),
                    Err(e) => {
                        if carries {
                            claimed.store(false, SeqCst);
                        }
                        Err(e)
                    }
                }
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
                    // A node shutting down dials no more (it would retry every spacing
                    // until it exits).
                    Ok(Err(
                        e @ (TransportError::Refused
                        | TransportError::BadToken
                        | TransportError::Stopping),
                    )) => break 'dialing Err(e),
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
        if !reported && peer != SOURCE && started.elapsed() > UNREACHABLE_AFTER {
            reported = true;
            ctx.report(ConnEvent::Unreachable { peer });
        }
    };
    // Only one connection to a peer may live: every other attempt is stopped, and one that
    // got through meanwhile is closed (left open, the peer would keep a connection nobody
    // reads, queueing every announcement for it).
    attempts.abort_all();
    while let Some(done) = attempts.join_next().await {
        if let Ok(Ok((conn, _, _))) = done {
            conn.close(VarInt::from_u32(CLOSE_DONE), b"another attempt won");
        }
    }
    won
}

/// One authenticated connection: a writer for control messages, a reader for them, the
/// serving half and (when we dialed) the receiving half.
struct Conn {
    ctx: Arc<ConnContext>,
    key: ConnKey,
    conn: Connection,
    dialed: bool,
    peer: Option<MemberId>,
}

/// Writes chunk `c` on its stream `s`: its id, then its bytes, handed over, not copied
/// (quinn keeps the chunk's buffer until it is acknowledged; a copy per chunk was 5% of a
/// source's CPU); under `--max-rate`, piece by piece at the times of its `slot`. `None`
/// when the stream failed.
async fn write_chunk_stream(
    s: &mut quinn::SendStream,
    c: ChunkId,
    data: Bytes,
    slot: Option<crate::upload_cap::Slot>,
) -> Option<()> {
    let id = Bytes::copy_from_slice(&c.to_be_bytes());
    match slot {
        None => s.write_all_chunks(&mut [id, data]).await.ok()?,
        Some(slot) => {
            s.write_chunk(id).await.ok()?;
            for (offset, piece) in crate::upload_cap::pieces(&data) {
                slot.wait(offset).await;
                s.write_chunk(piece).await.ok()?;
            }
        }
    }
    Some(())
}

impl Conn {
    fn new(ctx: Arc<ConnContext>, conn: Connection, dialed: bool, peer: Option<MemberId>) -> Self {
        let key = ctx.next_key.fetch_add(1, Ordering::Relaxed);
        Self {
            ctx,
            key,
            conn,
            dialed,
            peer,
        }
    }

    /// Runs the connection until it closes; `hello` goes out first.
    async fn run(self, ctl: Control, hello: Vec<Msg>) {
        let Control {
            send: mut ctl_send,
            recv: mut ctl_recv,
        } = ctl;
        let (control, mut control_rx) = mpsc::unbounded_channel::<Msg>();
        for m in hello {
            let _ = control.send(m);
        }
        let (serve, serve_rx) = ServeQueue::new();
        let mut hashes_given = false;
        let cancelled: Arc<Mutex<Cancels>> = Arc::default();
        let mut halves = tokio::task::JoinSet::new();
        // Writer: frames from `control` onto the control stream, in order.
        halves.spawn(async move {
            while let Some(m) = control_rx.recv().await {
                if ctl_send.write_all(&m.encode()).await.is_err() {
                    break;
                }
            }
        });
        halves.spawn(self.serving_half(
            serve_rx,
            serve.queued.clone(),
            cancelled.clone(),
            control.clone(),
        ));
        if self.dialed {
            halves.spawn(self.receiving_half());
        }
        if !self.dialed && self.ctx.misbehaviour == Misbehaviour::ClaimSource {
            for m in claim_to_be_the_source(&self.ctx) {
                let _ = control.send(m);
            }
        }
        let replies = control.clone();
        self.ctx.report(ConnEvent::Up(ConnHandle {
            key: self.key,
            peer: self.peer,
            dialed: self.dialed,
            remote: unmapped(self.conn.remote_address()),
            conn: self.conn.clone(),
            control,
            serve: serve.clone(),
        }));
        let (reason, refused) = loop {
            tokio::select! {
                batch = ctl_recv.recv_batch() => match batch {
                    Ok(Some(msgs)) => {
                        if let Err(why) = msgs.into_iter().try_for_each(|m| self.on_msg(m, &serve, &cancelled, &replies, &mut hashes_given)) {
                            self.conn.close(VarInt::from_u32(CLOSE_PROTOCOL), why.as_bytes());
                            break (why.to_string(), true);
                        }
                    }
                    Ok(None) => break ("control stream ended".to_string(), false),
                    Err(e @ TransportError::Protocol(_)) => {
                        self.conn.close(VarInt::from_u32(CLOSE_PROTOCOL), b"malformed message");
                        break (e.to_string(), true);
                    }
                    Err(e) => break (gone_reason(&e, &self.conn), false),
                },
                e = self.conn.closed() => break (e.to_string(), false),
            }
        };
        halves.abort_all();
        if tracing::enabled!(tracing::Level::DEBUG) {
            // What the path did to it: a connection starved on a shared bottleneck shows
            // a window of a few packets and a large share lost.
            let st = self.conn.stats().path;
            let cc = crate::congestion::trace_id(self.conn.congestion_state());
            tracing::debug!(?cc, peer = ?self.peer, dialed = self.dialed, %reason,
                rtt_ms = st.rtt.as_secs_f64() * 1e3, cwnd = st.cwnd, sent = st.sent_packets,
                lost = st.lost_packets, congestion_events = st.congestion_events,
                black_holes = st.black_holes_detected, mtu = st.current_mtu, "connection gone");
        }
        self.ctx.report(ConnEvent::Gone {
            key: self.key,
            reason,
            refused,
        });
    }

    /// Requests, cancels and asks for hashes are served here, in arrival order (replies on
    /// `replies`); the rest goes to the role. A request no scheduler makes (a chunk the
    /// file does not have, more outstanding than [`MAX_QUEUED_CHUNKS`]) is an error: the
    /// connection is closed.
    fn on_msg(
        &self,
        msg: Msg,
        serve: &ServeQueue,
        cancelled: &Mutex<Cancels>,
        replies: &mpsc::UnboundedSender<Msg>,
        hashes_given: &mut bool,
    ) -> Result<(), &'static str> {
        match msg {
            // Only a dialer says who it is: on a connection we dialed we know whom we
            // dialed, and a peer that says otherwise would take that member's place (the
            // source's, whose word on the file and the swarm counts only on the
            // connection we dialed to it).
            Msg::Hello { .. } if self.dialed => {
                return Err("a Hello from the peer we dialed (only a dialer says who it is)")
            }
            Msg::Request { chunks } => {
                let count = self.ctx.store.get().map(|s| s.layout().chunk_count());
                if count.is_some_and(|n| chunks.iter().any(|&c| c >= n)) {
                    return Err("request for a chunk the file does not have");
                }
                if serve.len() + chunks.len() > MAX_QUEUED_CHUNKS {
                    return Err("too many chunks requested at once");
                }
                let mut cancelled = cancelled.lock().unwrap();
                for c in chunks {
                    cancelled.queued.remove(&c);
                    serve.push(c);
                }
            }
            Msg::Cancel { chunk } => cancelled.lock().unwrap().cancel(chunk),
            // Once per connection (32 bytes a chunk: a peer asking again is flooding), and
            // only with every hash here (a part could not be checked against the file's).
            Msg::AskHashes => {
                let store = self.ctx.store.get().filter(|_| !*hashes_given);
                if let Some(msgs) = store.and_then(|s| every_hash(s)) {
                    *hashes_given = true;
                    for mut msg in msgs {
                        if let (Misbehaviour::ForgeGivenHashes, Msg::Hashes { hashes, .. }) =
                            (self.ctx.misbehaviour, &mut msg)
                        {
                            hashes.iter_mut().for_each(|h| h[0] ^= 1);
                        }
                        let _ = replies.send(msg);
                    }
                }
            }
            msg => {
                self.ctx.report(ConnEvent::Msg { key: self.key, msg });
            }
        }
        Ok(())
    }

    /// Serving: a FIFO of requested chunks, sent one stream each with falling priority so
    /// the wire carries them in request order (all below the control stream's).
    fn serving_half(
        &self,
        mut queue: mpsc::UnboundedReceiver<ChunkId>,
        queued: Arc<AtomicUsize>,
        cancelled: Arc<Mutex<Cancels>>,
        control: mpsc::UnboundedSender<Msg>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (ctx, conn) = (self.ctx.clone(), self.conn.clone());
        async move {
            let mut seq: i32 = 0;
            let mut writing: Option<Arc<tokio::sync::Semaphore>> = None;
            // What this peer has been sent: a chunk it asks for again is read with a check.
            let mut sent: Option<ChunkSet> = None;
            while let Some(c) = queue.recv().await {
                queued.fetch_sub(1, Ordering::Relaxed);
                if cancelled.lock().unwrap().queued.remove(&c)
                    || ctx.misbehaviour == Misbehaviour::WithholdServed
                {
                    continue;
                }
                let Some(store) = ctx.store.get() else {
                    continue;
                };
                let writing = writing.get_or_insert_with(|| {
                    let chunk = store.layout().chunk_bytes.max(1) as u64;
                    Arc::new(tokio::sync::Semaphore::new(
                        (MAX_WRITING_BYTES / chunk).max(2) as usize,
                    ))
                });
                let Ok(permit) = writing.clone().acquire_owned().await else {
                    break;
                };
                let sent = sent.get_or_insert_with(|| ChunkSet::new(store.layout().chunk_count()));
                let read = match sent.insert(c) {
                    true => store.read_chunk(c),
                    false => store.read_chunk_again(c),
                };
                let mut data = match read {
                    Ok(d) => d,
                    Err(e @ StorageError::SourceChanged { .. }) => {
                        ctx.report(ConnEvent::StoreFailed(e));
                        break;
                    }
                    Err(_) => {
                        let _ = control.send(Msg::DontHave { chunk: c });
                        continue;
                    }
                };
                if ctx.misbehaviour == Misbehaviour::CorruptServed {
                    let mut bad = data.to_vec();
                    if let Some(b) = bad.last_mut() {
                        *b ^= 1;
                    }
                    data = bad.into();
                }
                // Under `--max-rate` the chunk's place in the cap's schedule: its first
                // piece waits here (chunks stay in order), the rest in the writer below.
                let slot = ctx
                    .upload_cap
                    .as_ref()
                    .map(|cap| cap.reserve(data.len(), Instant::now()));
                if let Some(slot) = &slot {
                    slot.wait(0).await;
                }
                let Ok(mut s) = conn.open_uni().await else {
                    break;
                };
                ctx.first_chunk.get_or_init(Instant::now);
                let _ = s.set_priority(transport::CONTROL_PRIORITY - 1 - seq);
                seq = seq.wrapping_add(1).max(0);
                let conn = conn.clone();
                let cancel = cancelled.lock().unwrap().streaming(c);
                let cancelled = cancelled.clone();
                // Write in the background so the next chunk's stream opens at once. Until
                // the peer has it all, a Cancel resets the stream: what quinn has not sent
                // yet (often all of it: streams wait their turn by priority) is dropped.
                tokio::spawn(async move {
                    // Written (the permit then goes to the next chunk), then acknowledged;
                    // ends early if the write fails or the peer stops the stream.
                    let delivered = async {
                        write_chunk_stream(&mut s, c, data, slot).await?;
                        s.finish().ok()?;
                        drop(permit);
                        s.stopped().await.ok()
                    };
                    let reset = tokio::select! {
                        _ = delivered => false,
                        _ = cancel.notified() => true,
                    };
                    if reset {
                        let _ = s.reset(VarInt::from_u32(0));
                    }
                    cancelled.lock().unwrap().done(c, &cancel);
                    drop(conn);
                });
            }
        }
    }

    /// Receiving (on connections we dialed): each chunk stream is read only if the role
    /// wants it, verified and stored before the role hears it arrived.
    fn receiving_half(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (ctx, conn, key) = (self.ctx.clone(), self.conn.clone(), self.key);
        async move {
            while let Ok(s) = conn.accept_uni().await {
                tokio::spawn(receive_chunk(ctx.clone(), key, s));
            }
        }
    }
}

/// [`Misbehaviour::ClaimSource`]'s first words on a connection it accepted: "I am the
/// source", and a Welcome to a file whose first chunk hash differs from this one's.
fn claim_to_be_the_source(ctx: &ConnContext) -> Vec<Msg> {
    let Some(store) = ctx.store.get() else {
        return Vec::new();
    };
    let mut manifest = store.manifest(u32::MAX);
    if let Some(h) = manifest.chunk_hashes.first_mut() {
        h[0] ^= 1;
    }
    // As a source still hashing would send it (no file hash yet), so it reads as valid.
    manifest.file_hash = None;
    vec![
        Msg::Hello { id: SOURCE },
        Msg::Welcome {
            you: 1,
            manifest,
            members: Vec::new(),
            relay: false,
            hash_ahead: None,
        },
    ]
}

/// Why a connection whose control stream failed with `e` went: the connection's own
/// reason when it has one. The stream says only "connection lost", and a timeout is what
/// tells a vanished neighbour from one that hung up.
fn gone_reason(e: &TransportError, conn: &Connection) -> String {
    conn.close_reason()
        .map_or_else(|| e.to_string(), |c| c.to_string())
}

/// Chunks the receiver cancelled. One still queued is skipped when its turn comes; one
/// already in a stream has that stream reset, so no more of it crosses the network (a
/// cancelled chunk's bytes are pure waste, and over a shared bottleneck they are someone
/// else's time).
#[derive(Default)]
struct Cancels {
    queued: HashSet<ChunkId>,
    /// Chunks in streams not yet fully acknowledged, and how to cancel each.
    in_streams: HashMap<ChunkId, Arc<tokio::sync::Notify>>,
}

impl Cancels {
    fn cancel(&mut self, chunk: ChunkId) {
        if let Some(stream) = self.in_streams.remove(&chunk) {
            stream.notify_one();
        } else if self.queued.len() < MAX_QUEUED_CHUNKS {
            self.queued.insert(chunk);
        }
    }

    /// `chunk` goes into a stream now: the handle its Cancel will notify.
    fn streaming(&mut self, chunk: ChunkId) -> Arc<tokio::sync::Notify> {
        let handle = Arc::new(tokio::sync::Notify::new());
        self.in_streams.insert(chunk, handle.clone());
        handle
    }

    /// `chunk`'s stream is done (acknowledged, stopped or reset).
    fn done(&mut self, chunk: ChunkId, handle: &Arc<tokio::sync::Notify>) {
        if self
            .in_streams
            .get(&chunk)
            .is_some_and(|h| Arc::ptr_eq(h, handle))
        {
            self.in_streams.remove(&chunk);
        }
    }
}

/// Reads one chunk stream: its id, the role's yes or no, its bytes, verified and stored.
async fn receive_chunk(ctx: Arc<ConnContext>, key: ConnKey, mut s: quinn::RecvStream) {
    let mut head = [0u8; 4];
    if s.read_exact(&mut head).await.is_err() {
        return;
    }
    let chunk = u32::from_be_bytes(head);
    let (reply, wanted) = oneshot::channel();
    if !ctx.report(ConnEvent::ChunkStarted { key, chunk, reply }) {
        return;
    }
    if !wanted.await.unwrap_or(false) {
        let _ = s.stop(VarInt::from_u32(0));
        return;
    }
    let Some(store) = ctx.store.get() else {
        return;
    };
    let len = store.layout().chunk_range(chunk).1;
    let outcome = match read_body(&mut s, len).await {
        Err(outcome) => outcome,
        // Almost always the hash is here already: no timer then.
        Ok(_)
            if store.known() <= chunk
                && tokio::time::timeout(HASH_WAIT, store.hash_known(chunk))
                    .await
                    .is_err() =>
        {
            ChunkOutcome::NoHash
        }
        Ok(data) => match store.write_chunk(chunk, data) {
            Ok(true) => ChunkOutcome::Stored,
            Ok(false) => ChunkOutcome::Corrupt,
            Err(e) => {
                ctx.report(ConnEvent::StoreFailed(e));
                return;
            }
        },
    };
    ctx.report(ConnEvent::ChunkDone {
        key,
        chunk,
        outcome,
    });
}

/// The rest of a chunk stream, which must be exactly `len` bytes, in one buffer. Read
/// piece by piece into a buffer it never zeroes: quinn's `read_to_end` zeroes one first,
/// and at 1 Gbit/s that memset was 2.1% of the machine (chain-1g, perf). The pieces (one
/// per packet) are taken up to [`PIECES_PER_READ`] at a time: each read locks the
/// connection and settles flow control once.
async fn read_body(s: &mut quinn::RecvStream, len: usize) -> Result<Bytes, ChunkOutcome> {
    let mut body = BytesMut::with_capacity(len);
    let mut pieces: [Bytes; PIECES_PER_READ] = std::array::from_fn(|_| Bytes::new());
    loop {
        match s.read_chunks(&mut pieces).await {
            Ok(Some(n)) => {
                for piece in pieces[..n].iter_mut().map(std::mem::take) {
                    if body.len() + piece.len() > len {
                        let _ = s.stop(VarInt::from_u32(0));
                        return Err(ChunkOutcome::TooLong);
                    }
                    body.extend_from_slice(&piece);
                }
            }
            Ok(None) if body.len() < len => return Err(ChunkOutcome::Short(body.len())),
            Ok(None) => return Ok(body.freeze()),
            Err(e) => return Err(ChunkOutcome::Broken(e.to_string())),
        }
    }
}

/// How many of a stream's pieces [`read_body`] takes in one read.
const PIECES_PER_READ: usize = 32;

/// How a chunk stream that was read ended. Every outcome but `Stored` means the chunk is
/// fetched again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// Verified against the manifest and written.
    Stored,
    /// All its bytes came and they do not match the manifest's hash.
    Corrupt,
    /// The stream ended after this many bytes, fewer than the chunk has.
    Short(usize),
    /// The stream carried more bytes than the chunk has.
    TooLong,
    /// The stream was reset or its connection lost.
    Broken(String),
    /// The source did not send its hash within [`HASH_WAIT`] of the chunk's arrival.
    NoHash,
}

/// How long a chunk that arrived before its hash waits for it (hashes and chunks travel on
/// different streams; the source sends a chunk's hash before it hands the chunk out).
pub const HASH_WAIT: Duration = Duration::from_secs(30);

impl ChunkOutcome {
    pub fn is_stored(&self) -> bool {
        *self == ChunkOutcome::Stored
    }
}

impl std::fmt::Display for ChunkOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkOutcome::Stored => write!(f, "verified"),
            ChunkOutcome::Corrupt => write!(f, "failed verification"),
            ChunkOutcome::Short(n) => write!(f, "ended after {n} bytes"),
            ChunkOutcome::TooLong => write!(f, "was longer than the chunk"),
            ChunkOutcome::Broken(e) => write!(f, "broke off ({e})"),
            ChunkOutcome::NoHash => write!(f, "came, and its hash did not"),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_cancel_resets_a_streaming_chunk_or_skips_a_queued_one() {
        let mut c = Cancels::default();
        let stream = c.streaming(7);
        c.cancel(7);
        // The stream's task is woken (a permit is stored if it is not waiting yet).
        assert!(futures_now(stream.notified()));
        assert!(c.queued.is_empty() && c.in_streams.is_empty());
        c.cancel(8);
        assert!(c.queued.contains(&8));
        // A stream that ended leaves no handle; a newer stream of the same chunk keeps its.
        let old = c.streaming(9);
        let new = c.streaming(9);
        c.done(9, &old);
        assert!(c.in_streams.get(&9).is_some_and(|h| Arc::ptr_eq(h, &new)));
        c.done(9, &new);
        assert!(c.in_streams.is_empty());
    }

    /// Whether `f` is ready at its first poll.
    fn futures_now(f: impl std::future::Future<Output = ()>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        std::pin::pin!(f).poll(&mut cx).is_ready()
    }

    use super::*;

    /// A real QUIC connection over loopback (no namespaces, no root needed): both
    /// endpoints, the dialed side and the accepted side.
    async fn loopback_pair() -> (Endpoint, Endpoint, Connection, Connection) {
        let server = transport::endpoint(0).unwrap();
        let client = transport::endpoint(0).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], server.local_addr().unwrap().port()));
        let accepting = async { server.accept().await.unwrap().await.unwrap() };
        let (dialed, accepted) = tokio::join!(
            transport::dial(&client, addr, Duration::from_secs(5)),
            accepting
        );
        (server, client, dialed.unwrap(), accepted)
    }

    async fn loopback_connection() -> (Endpoint, Endpoint, Connection) {
        let (server, client, dialed, _) = loopback_pair().await;
        (server, client, dialed)
    }

    fn handle(key: ConnKey, peer: Option<MemberId>, dialed: bool, conn: &Connection) -> ConnHandle {
        ConnHandle {
            key,
            peer,
            dialed,
            remote: conn.remote_address(),
            conn: conn.clone(),
            control: mpsc::unbounded_channel().0,
            serve: ServeQueue::new().0,
        }
    }

    #[tokio::test]
    async fn each_member_maps_to_its_newest_connection_of_each_kind() {
        let (_server, _client, c) = loopback_connection().await;
        let mut conns = Connections::default();
        conns.insert(handle(1, Some(3), true, &c));
        conns.insert(handle(2, None, false, &c));
        assert_eq!(conns.dialed_to(3).map(|h| h.key), Some(1));
        assert!(conns.accepted_from(3).is_none(), "not named yet");
        assert_eq!(conns.bind(2, 3), None);
        assert_eq!(conns.accepted_from(3).map(|h| h.key), Some(2));
        // Member 3 connects again: the newer connection is its own, the older one is
        // returned (for the caller to close) and its going away unbinds nothing.
        conns.insert(handle(4, None, false, &c));
        assert_eq!(conns.bind(4, 3), Some(2));
        assert_eq!(conns.accepted_from(3).map(|h| h.key), Some(4));
        assert!(conns.remove(2).is_some());
        assert_eq!(conns.accepted_from(3).map(|h| h.key), Some(4));
        assert!(conns.remove(4).is_some());
        assert!(conns.accepted_from(3).is_none());
        assert_eq!(conns.peer(1), Some(3));
        assert!(conns.remove(4).is_none());
    }

    #[tokio::test]
    async fn a_lost_connection_says_why_it_went() {
        let (_server, _client, dialed, accepted) = loopback_pair().await;
        // What a control stream's read says when its connection goes, whatever the cause.
        let from_stream = TransportError::Lost("connection lost".into());
        assert_eq!(gone_reason(&from_stream, &dialed), from_stream.to_string());
        accepted.close(VarInt::from_u32(7), b"bye");
        dialed.closed().await;
        let why = gone_reason(&from_stream, &dialed);
        assert!(
            why.contains("closed by peer") && why.contains("bye"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn announcements_go_where_the_peer_reads_them() {
        let (_server, _client, c) = loopback_connection().await;
        // A destination reads them only on the connection it dialed; the source on its
        // connections from destinations, which we dialed.
        assert!(handle(1, Some(3), false, &c).reads_announcements());
        assert!(handle(2, None, false, &c).reads_announcements());
        assert!(!handle(3, Some(3), true, &c).reads_announcements());
        assert!(handle(4, Some(SOURCE), true, &c).reads_announcements());
    }
}
