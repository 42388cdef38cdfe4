//! `floodclone recv`: a destination. It joins the source, learns the file and the members
//! from the source's Welcome, finds its data neighbours from the kernel's routes, pulls
//! chunks from them as its scheduler ([`Puller`]) says, announces every verified chunk so
//! neighbours can pull it at once, and keeps serving until the source says the swarm is
//! done.
//!
//! Read top to bottom: [`run`], then the handlers in the order a transfer meets them
//! (`on_welcome`, `poll_scheduler`, `on_chunk_done`, `maybe_finished`, `on_complete`);
//! who the destination pulls from (`rediscover`, `on_up`, `on_gone`) is in `neighbours`.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use floodclone_sched::{
    overlay::SenderPaths, Action, Arrival, ChunkId, ChunkSet, MemberId, Puller, SchedConfig, SOURCE,
};
use tokio::sync::mpsc;

mod gateways;
mod neighbours;

use neighbours::with_source_addr;

use crate::{
    api::RecvOptions,
    claims::{GatewayChecks, CHECK_TIMEOUT},
    conn::{ChunkOutcome, ConnEvent, ConnHandle, ConnKey, ShortLived},
    discovery::Routes,
    events::{Event, Progress, SwarmDone},
    manifest::{self, Manifest, Offered},
    node::{self, Node, NodeError, NodeOptions, Role, Step},
    progress::{self, FeederRates, RateTracker},
    storage::{self, ChunkStore, StorageError},
    trace,
    transport::{self, CLOSE_DONE, CLOSE_PROTOCOL},
    wire::{Member, Msg},
};

/// Hello id of a destination that has not been told its id yet.
const JOINING: MemberId = MemberId::MAX;
/// Scheduler tick: link rates read from the kernel, progress, the resume state saved.
const TICK: Duration = Duration::from_millis(floodclone_sched::MEASURE_TICK_MS);
/// The resume state is saved every this many ticks (1 s).
const SAVE_STATE_EVERY: u64 = 5;
/// Complete, with the source gone this long: nothing is left to serve for.
const SOURCE_GONE_FOR_GOOD: Duration = Duration::from_secs(10);
/// A failing destination waits this long for its Failed to reach the source.
const FAILED_NOTICE: Duration = Duration::from_millis(300);
/// A neighbour whose chunks fail verification this many times is never pulled from again.
const MAX_BAD_CHUNKS: u32 = 3;
/// Seconds without a verified chunk (or, before one, without a Welcome) after which the log
/// says what this node waits on, and again every this long: a transfer that stops must be
/// diagnosable from its logs.
const STALL_REPORT_S: f64 = 10.0;
/// Seconds without a verified chunk (since the Welcome) and without news from a neighbour
/// (a chunk it now holds or fetches), with nothing in flight that is not already overdue,
/// after which a destination that does not pull from the source does so too: whatever its
/// neighbours hold, withhold or lost track of, the source holds every chunk, so no
/// destination is left with nobody to ask. A live transfer has requests out that are not
/// overdue, stores a chunk every fraction of a second, or hears its neighbours' progress
/// while they wait on theirs (a node behind a slow relay must not pull around it); the
/// source still serves such a node only what no other neighbour holds or is fetching (the
/// scheduler's rule for a source behind a router).
const LAST_RESORT_S: f64 = 5.0;

/// How a member is named to a person: its address (member ids are internal).
fn member_name(members: &[Member], id: MemberId) -> String {
    match members.iter().find(|m| m.id == id) {
        Some(m) if id == SOURCE => format!("{} (the source)", m.addr),
        Some(m) => m.addr.to_string(),
        None => "a member not known yet".into(),
    }
}

/// Joins the source, fetches and re-serves chunks, writes the file. Returns seconds from
/// start until the copy was complete and verified.
pub async fn run(opts: NodeOptions, cfg: RecvOptions) -> Result<f64, NodeError> {
    let mut node = Node::open(&opts, "destination")?;
    let (local_tx, mut local) = mpsc::unbounded_channel();
    let mut dest = Destination::new(cfg, Routes::open()?, local_tx);
    dest.start(&mut node).await?;
    crate::sd_notify::ready();
    let result = node::drive(&mut node, &mut dest, &mut local).await;
    dest.shut_down(&mut node, result).await
}

/// What the destination's own background work reports.
enum Local {
    /// The whole file was checked and renamed into place (or why not).
    Finalized(Result<PathBuf, StorageError>),
    /// Paths the source asked us to trace, traced (a `PathsTraced` for it).
    Traced(Msg),
    /// Which chunks are held could not be recorded (see [`Destination::save_state`]).
    StateNotSaved(StorageError),
}

/// A Welcome's contents (kept as they are while the Welcome is held).
struct HeldWelcome {
    you: MemberId,
    manifest: Manifest,
    members: Vec<Member>,
    relay: bool,
    hash_ahead: Option<[u8; 32]>,
}

/// The destination's state.
struct Destination {
    cfg: RecvOptions,
    routes: Routes,
    /// Our member id, once welcomed ([`JOINING`] before).
    me: MemberId,
    /// Whether the swarm relays (false: `send --direct`, everyone pulls from the source).
    relay: bool,
    members: Vec<Member>,
    /// Connections dialed to us whose Hello named a member not in our list yet: named
    /// when a list has it ([`Destination::on_hello`]).
    unnamed: HashMap<ConnKey, MemberId>,
    /// The scheduler, once the manifest is known; the one record of what we and our
    /// neighbours hold.
    puller: Option<Puller>,
    /// The members we pull from.
    neighbours: Vec<MemberId>,
    /// The interface each member's route leaves by (its data arrives on the same link).
    ingress: HashMap<MemberId, u32>,
    /// Members being dialed (so each is dialed once at a time).
    dialing: HashSet<MemberId>,
    /// Members whose process is gone (their kernel may still forward): the members behind
    /// them become our neighbours until they are back.
    dead: HashSet<MemberId>,
    /// What the source's path checks say of members' paths to us where our routes say
    /// otherwise: pulled from too, or not at all.
    sender_paths: SenderPaths,
    /// Members that sent chunks failing verification: never pulled from again.
    banned: HashSet<MemberId>,
    /// Our hops to the source as last told to the neighbours.
    source_hops: Option<u8>,
    source_lost_at: Option<Instant>,
    resumed_chunks: u32,
    /// A Welcome held until its manifest is complete (see [`Destination::on_welcome`]).
    held_welcome: Option<HeldWelcome>,
    /// The file's hash the source sent ahead of its chunk hashes (`Msg::Welcome`): chunk
    /// hashes a neighbour gives are kept if they make it up.
    hash_ahead: Option<[u8; 32]>,
    /// Chunk hashes neighbours are giving (from chunk 0), until the file's hash comes.
    offered_hashes: HashMap<MemberId, Vec<[u8; 32]>>,
    /// Neighbours that gave chunk hashes not making up the file's: not asked again (each
    /// new connection to one would get a new answer, and another refusal).
    hash_liars: HashSet<MemberId>,
    /// Seconds from start until the copy was verified.
    complete: Option<f64>,
    finalizing: bool,
    /// Something changed that the neighbour set depends on.
    rediscover_needed: bool,
    rate: RateTracker,
    feeders: FeederRates,
    ticks: u64,
    local: mpsc::UnboundedSender<Local>,
    /// A state save runs (see [`Destination::save_state`]).
    saving_state: Arc<AtomicBool>,
    /// Who answered at gateways that members claim as theirs.
    gateway_checks: GatewayChecks,
    /// Our connections asking who is at such a gateway.
    asking: ShortLived,
    /// Connections that asked who we are before we knew (answered once welcomed).
    asked_who: Vec<ConnKey>,
    /// When (seconds from start) a chunk was last verified here (0 before any).
    last_stored_s: f64,
    /// When a stall was last reported (see [`STALL_REPORT_S`]).
    stall_reported_s: f64,
    /// The source is a data neighbour whatever the routes say (see [`LAST_RESORT_S`]).
    source_as_last_resort: bool,
    /// When (seconds from start) a neighbour we pull from last told of a chunk it holds or
    /// fetches.
    last_news_s: f64,
}

impl Role for Destination {
    type Local = Local;
    const TICK: Duration = TICK;

    async fn on_event(&mut self, node: &mut Node, event: ConnEvent) -> Step {
        let step = match event {
            ConnEvent::Up(handle) if handle.dialed && handle.peer == Some(gateways::ASKING) => {
                self.on_asking_up(handle);
                Step::Continue
            }
            ConnEvent::Up(handle) => {
                self.on_up(node, handle);
                Step::Continue
            }
            ConnEvent::Msg { key, msg } => self.on_msg(node, key, msg),
            ConnEvent::ChunkStarted { key, chunk, reply } => {
                let _ = reply.send(self.wants(node, key, chunk));
                Step::Continue
            }
            ConnEvent::ChunkDone {
                key,
                chunk,
                outcome,
            } => {
                self.on_chunk_done(node, key, chunk, &outcome);
                Step::Continue
            }
            ConnEvent::StoreFailed(e) => Step::Stop(Err(e.into())),
            ConnEvent::Gone {
                key,
                reason,
                refused,
            } => {
                self.asking.remove(key);
                self.unnamed.remove(&key);
                // The source speaks for the whole swarm: what it sends that this node
                // refuses (a manifest naming a path outside the tree, a message of another
                // version) it would send again.
                if refused && node.conns.dialed_to(SOURCE).is_some_and(|c| c.key == key) {
                    let kept = if node.ctx.store.get().is_some() {
                        "what verified so far is kept"
                    } else {
                        "nothing was written"
                    };
                    return self
                        .settle(
                            node,
                            Step::Stop(Err(NodeError::Other(format!(
                                "the source at {} sent what this node refuses ({reason}); \
                                 {kept}: check that both ends run the same floodclone",
                                self.cfg.source
                            )))),
                        )
                        .await;
                }
                // A neighbour we pull from that broke the protocol would break it again.
                if let Some(p) = node
                    .conns
                    .get(key)
                    .filter(|c| refused && c.dialed)
                    .and_then(|c| c.peer)
                    .filter(|p| self.neighbours.contains(p) && *p != SOURCE)
                {
                    self.cut_off(p, &format!("it broke the protocol ({reason})"));
                }
                self.on_gone(node, key, &reason).await;
                Step::Continue
            }
            ConnEvent::Unreachable { peer } => {
                tracing::warn!(
                    "neighbour {} does not answer; routing around it",
                    member_name(&self.members, peer)
                );
                self.rediscover_needed |= self.dead.insert(peer);
                Step::Continue
            }
            ConnEvent::DialFailed { peer, error } => self.on_dial_failed(peer, error),
        };
        self.settle(node, step).await
    }

    async fn on_local(&mut self, node: &mut Node, event: Local) -> Step {
        let step = match event {
            Local::Finalized(Ok(path)) => {
                self.on_complete(node, &path);
                Step::Continue
            }
            Local::Finalized(Err(e)) | Local::StateNotSaved(e) => Step::Stop(Err(e.into())),
            Local::Traced(answer) => {
                if let Some(c) = node.conns.dialed_to(SOURCE) {
                    c.send(answer);
                }
                Step::Continue
            }
        };
        self.settle(node, step).await
    }

    /// Settled like any event: a check that expired may change the neighbours, and a
    /// neighbour that went silent is noticed only when the scheduler looks.
    async fn on_tick(&mut self, node: &mut Node) -> Step {
        let step = self.tick(node);
        self.settle(node, step).await
    }
}

impl Destination {
    fn tick(&mut self, node: &mut Node) -> Step {
        self.ticks += 1;
        if let (Some(store), Some(pl)) = (node.ctx.store.get(), self.puller.as_ref()) {
            let manifest = store.layout();
            node.counts.file_bytes = manifest.size;
            node.counts.held_bytes = manifest.bytes_in(store.have().count());
            node.counts.chunks_verified = pl.received;
            node.counts.chunks_duplicate = pl.duplicates;
        }
        node.measure();
        self.report_stall(node);
        self.turn_to_the_source(node);
        self.expire_gateway_checks(node);
        // Neighbours compare it with their own hops to us and to the source.
        let hops = node.meters.hops_to(self.cfg.source.ip());
        if let Some(h) = hops.filter(|_| hops != self.source_hops) {
            self.source_hops = hops;
            node.announce(Msg::SourceDistance { hops: h });
        }
        // The plan follows measured rates: each neighbour's receive rate as the kernel sees
        // it (windowed max) informs its pipeline depth.
        let peers: Vec<MemberId> = self.puller.iter().flat_map(|pl| pl.peer_ids()).collect();
        for p in peers {
            self.tell_path(node, p);
        }
        if let Some(store) = node.ctx.store.get() {
            if !store.is_complete() && self.ticks.is_multiple_of(SAVE_STATE_EVERY) {
                self.save_state(store);
            }
            // Progress each second where it is cheap to look at, every 5 s in logs.
            let every = if node.out.json || node.out.is_live() {
                5
            } else {
                25
            };
            if self.ticks.is_multiple_of(every) {
                self.report_progress(node, store);
            }
        }
        if self.complete.is_some()
            && self
                .source_lost_at
                .is_some_and(|t| t.elapsed() > SOURCE_GONE_FOR_GOOD)
        {
            return Step::Stop(Ok(()));
        }
        if self.complete.is_none()
            && self
                .source_lost_at
                .is_some_and(|t| t.elapsed() > self.cfg.connect_timeout)
        {
            return Step::Stop(Err(NodeError::Other(format!(
                "the source at {} has been unreachable for {} s; progress is kept: run the same \
                 command to resume once it is back",
                self.cfg.source,
                self.cfg.connect_timeout.as_secs()
            ))));
        }
        Step::Continue
    }
}

impl Destination {
    fn new(cfg: RecvOptions, routes: Routes, local: mpsc::UnboundedSender<Local>) -> Self {
        Self {
            cfg,
            routes,
            me: JOINING,
            relay: true,
            members: Vec::new(),
            unnamed: HashMap::new(),
            puller: None,
            neighbours: Vec::new(),
            ingress: HashMap::new(),
            dialing: HashSet::new(),
            dead: HashSet::new(),
            banned: HashSet::new(),
            sender_paths: SenderPaths::default(),
            source_hops: None,
            source_lost_at: None,
            resumed_chunks: 0,
            held_welcome: None,
            hash_ahead: None,
            offered_hashes: HashMap::new(),
            hash_liars: HashSet::new(),
            complete: None,
            finalizing: false,
            rediscover_needed: false,
            rate: RateTracker::default(),
            feeders: FeederRates::default(),
            ticks: 0,
            local,
            saving_state: Arc::new(AtomicBool::new(false)),
            gateway_checks: GatewayChecks::default(),
            asking: ShortLived::new(CHECK_TIMEOUT),
            asked_who: Vec::new(),
            last_stored_s: 0.0,
            stall_reported_s: 0.0,
            source_as_last_resort: false,
            last_news_s: 0.0,
        }
    }

    /// Dials the source (until `--connect-timeout`) to join.
    async fn start(&mut self, node: &mut Node) -> Result<(), NodeError> {
        node.watch([self.cfg.source.ip()]);
        let hello = self.join_hello(self.routes.local_addrs().await?);
        node.dial(
            self.cfg.source,
            SOURCE,
            hello,
            Some(Instant::now() + self.cfg.connect_timeout),
        );
        Ok(())
    }

    /// What a connection to the source says first: who we are (if we know), where we are.
    fn join_hello(&self, addrs: Vec<IpAddr>) -> Vec<Msg> {
        vec![
            Msg::Hello { id: self.me },
            Msg::Join {
                port: self.cfg.swarm.port,
                addrs,
            },
        ]
    }

    /// After every event: neighbours re-derived if something they depend on changed, the
    /// file checked once every chunk is here, and the scheduler's actions sent.
    async fn settle(&mut self, node: &mut Node, step: Step) -> Step {
        if let Step::Stop(_) = step {
            return step;
        }
        if self.rediscover_needed && self.me != JOINING {
            self.rediscover_needed = false;
            if let Err(e) = self.rediscover(node).await {
                return Step::Stop(Err(e));
            }
        }
        self.maybe_finished(node);
        self.poll_scheduler(node);
        Step::Continue
    }

    fn on_msg(&mut self, node: &mut Node, key: ConnKey, msg: Msg) -> Step {
        let from = node.conns.peer(key);
        // Holdings and fetches count only as told on the connection we pull over.
        let pulled_over = from.filter(|&p| node.conns.dialed_to(p).is_some_and(|c| c.key == key));
        match msg {
            // What only the source may say counts only on the connection we dialed to it: a
            // token holder that dials us cannot hand us another file, member list or ending.
            Msg::Welcome { .. }
            | Msg::Hashes { .. }
            | Msg::Members { .. }
            | Msg::FreshGrant { .. }
            | Msg::TracePaths { .. }
            | Msg::SenderPaths(_)
            | Msg::SwarmDone
                if pulled_over == Some(SOURCE) =>
            {
                return self.on_source_msg(node, msg)
            }
            Msg::Hashes {
                first,
                hashes,
                file_hash,
            } => {
                if let Some(p) = pulled_over {
                    self.on_offered_hashes(node, p, first, hashes, file_hash);
                }
            }
            Msg::Bitfield { .. }
            | Msg::Have { .. }
            | Msg::Fetching { .. }
            | Msg::FetchingBeyond { .. }
            | Msg::DontHave { .. }
            | Msg::SourceDistance { .. } => self.on_holdings_msg(node, from, pulled_over, msg),
            Msg::Hello { id } => self.on_hello(node, key, id),
            // Only a source hands out fresh chunks.
            Msg::RequestFresh { .. } => {
                if let Some(c) = node.conns.get(key) {
                    c.close(CLOSE_PROTOCOL, b"not a source");
                }
            }
            // Someone dialed one of our addresses to check that we claimed it: the nonce
            // goes back on our own connection to the source (`crate::claims`), and this
            // connection has served its purpose (one answer per handshake, for a flooder).
            Msg::WhoAreYou => self.on_who_are_you(node, key),
            Msg::IAm { id } => self.on_i_am(node, key, id),
            Msg::ProveAddress { nonce } => {
                if let Some(c) = node.conns.dialed_to(SOURCE) {
                    c.send(Msg::AddressProof { nonce });
                }
                if let Some(c) = node.conns.get(key).filter(|c| !c.dialed) {
                    c.close(CLOSE_DONE, b"proof sent");
                }
            }
            _ => {}
        }
        Step::Continue
    }

    /// A message only the source may send, on the connection we dialed to it.
    fn on_source_msg(&mut self, node: &mut Node, msg: Msg) -> Step {
        match msg {
            Msg::Welcome {
                you,
                manifest,
                members,
                relay,
                hash_ahead,
            } => {
                tracing::debug!(at_ms = (node.now() * 1e3) as u64, "welcome received");
                return self.on_welcome(
                    node,
                    HeldWelcome {
                        you,
                        manifest,
                        members,
                        relay,
                        hash_ahead,
                    },
                );
            }
            Msg::Hashes {
                first,
                hashes,
                file_hash,
            } => return self.on_hashes(node, first, &hashes, file_hash),
            Msg::Members { members } => {
                if let Some(held) = self.held_welcome.as_mut() {
                    held.members = members.clone();
                }
                self.members = with_source_addr(members, self.cfg.source);
                let _ = self.gateway_checks.drop_refuted(&mut self.members);
                self.name_unnamed(node);
                self.rediscover_needed = self.me != JOINING;
            }
            Msg::FreshGrant { chunks, exhausted } => {
                tracing::trace!(target: "floodclone::chunks", peer = ?Some(SOURCE), ?chunks, exhausted, "fresh granted");
                if let Some(pl) = self.puller.as_mut() {
                    pl.fresh_granted(SOURCE, &chunks, exhausted, node.now());
                    announce_fetching(node, pl, &chunks, None);
                }
            }
            Msg::TracePaths { to } => {
                let (members, local) = (self.members.clone(), self.local.clone());
                tokio::spawn(async move {
                    let _ = local.send(Local::Traced(trace::check_paths(to, members).await));
                });
            }
            Msg::SenderPaths(paths) => {
                // Who is a neighbour follows from the first two lists; the third only
                // tells the scheduler where data comes from (`tell_path`).
                let old = &self.sender_paths;
                self.rediscover_needed |=
                    (&paths.clean, &paths.crossing) != (&old.clean, &old.crossing);
                self.sender_paths = paths;
            }
            Msg::SwarmDone if self.complete.is_some() => return Step::Stop(Ok(())),
            _ => {}
        }
        Step::Continue
    }

    /// What a neighbour holds or is fetching, from connection peer `from`; holdings and
    /// fetches count only as told on the connection we pull over (`pulled_over`).
    fn on_holdings_msg(
        &mut self,
        node: &mut Node,
        from: Option<MemberId>,
        pulled_over: Option<MemberId>,
        msg: Msg,
    ) {
        let Some(pl) = self.puller.as_mut() else {
            return;
        };
        let now = node.now();
        if pulled_over.is_some() && matches!(msg, Msg::Have { .. } | Msg::Fetching { .. }) {
            self.last_news_s = now;
        }
        match (msg, pulled_over) {
            (Msg::Bitfield { bits }, Some(p)) => {
                for c in ChunkSet::from_bytes(pl.have().len(), &bits).iter() {
                    pl.peer_has(p, c);
                }
            }
            (Msg::Have { chunk }, Some(p)) => pl.peer_has(p, chunk),
            (Msg::Fetching { chunks }, Some(p)) => {
                for &c in &chunks {
                    pl.peer_fetching(p, c, now);
                }
                // One hop further (see `Puller::peer_fetching_beyond`): what we lack will
                // soon be near us.
                let beyond = pl.pass_on_fetching(&chunks);
                announce_fetching(node, pl, &beyond, Some(p));
            }
            (Msg::FetchingBeyond { chunks }, Some(p)) => {
                for c in chunks {
                    pl.peer_fetching_beyond(p, c, now);
                }
            }
            // A server's answer to our request, on the connection we pull over: from a
            // connection someone dialed to us it would be a dialer's word about another
            // member (its Hello names whom it claims to be), telling us not to ask that
            // member for its chunks.
            (Msg::DontHave { chunk }, Some(p)) => pl.dont_have(p, chunk),
            (Msg::SourceDistance { hops }, _) => {
                if let Some(p) = from {
                    pl.peer_source_distance(p, hops);
                }
            }
            _ => {}
        }
    }

    /// The source's Welcome: the file (the store and the scheduler start here) and the
    /// members. A Welcome after a source restart must name the same file.
    ///
    /// The manifest may still lack chunk hashes (the source sends them as it reads its
    /// file, [`Msg::Hashes`]): the chunks whose hashes are here can be pulled at once. Held
    /// back until it is complete: with `--expect` (the file is checked before anything is
    /// written), and with an earlier run's state to resume (it names the file by its hash).
    fn on_welcome(&mut self, node: &mut Node, welcome: HeldWelcome) -> Step {
        self.relay = welcome.relay;
        if let Some(store) = node.ctx.store.get() {
            if !store.manifest(u32::MAX).agrees_with(&welcome.manifest) {
                return Step::Stop(Err(NodeError::Other(
                    "the source restarted with a different file".into(),
                )));
            }
            let m = &welcome.manifest;
            if let Err(e) = store.add_hashes(0, &m.chunk_hashes, m.file_hash) {
                return Step::Stop(Err(e.into()));
            }
            if let Some(pl) = self.puller.as_mut() {
                pl.set_verifiable(store.known());
            }
        } else if !welcome.manifest.is_complete()
            && (self.cfg.expect.is_some() || storage::state_path(&self.cfg.out).exists())
        {
            self.held_welcome = Some(welcome);
            return Step::Continue;
        } else {
            let (you, manifest) = (welcome.you, &welcome.manifest);
            if let (Some(want), Some(got)) = (self.cfg.expect, manifest.content_hash()) {
                if want != got {
                    let what = if manifest.tree.is_some() {
                        "tree"
                    } else {
                        "file"
                    };
                    return Step::Stop(Err(NodeError::Other(format!(
                        "the source offers a {what} whose BLAKE3 is {}, not the {} given to \
                         --expect: refused, nothing written",
                        manifest::b3(&got),
                        manifest::b3(&want),
                    ))));
                }
            }
            self.me = you;
            let opening = Instant::now();
            let store = match ChunkStore::destination(&self.cfg.out, manifest.clone()) {
                Ok(s) => Arc::new(s),
                Err(e) => return Step::Stop(Err(e.into())),
            };
            tracing::debug!(ms = opening.elapsed().as_millis() as u64, "store opened");
            let resumed = store.have().count();
            self.resumed_chunks = resumed;
            let _ = node.ctx.store.set(store.clone());
            let mut puller = Puller::new(
                SchedConfig {
                    member: you,
                    ..SchedConfig::new(manifest.chunk_bytes as u64)
                },
                store.have(),
            );
            puller.set_verifiable(store.known());
            self.puller = Some(puller);
            self.last_stored_s = node.now();
            let bits = store.have().to_bytes();
            for c in node.conns.iter() {
                c.send(Msg::Bitfield { bits: bits.clone() });
            }
            node.out.event(
                &Event::Welcome {
                    member: you,
                    bytes: manifest.size,
                    chunks: manifest.chunk_count(),
                    chunk_bytes: manifest.chunk_bytes,
                    resumed_chunks: resumed,
                },
                || {
                    format!(
                        "joined the swarm: {} bytes in {} chunks ({resumed} already here)",
                        manifest.size,
                        manifest.chunk_count()
                    )
                },
            );
        }
        self.members = with_source_addr(welcome.members, self.cfg.source);
        let _ = self.gateway_checks.drop_refuted(&mut self.members);
        self.name_unnamed(node);
        self.answer_who_asked(node);
        self.rediscover_needed = true;
        self.hash_ahead = welcome.hash_ahead;
        for c in node.conns.iter() {
            self.ask_for_hashes(node, c);
        }
        Step::Continue
    }

    /// Asks the neighbour at the far end of `c`, a connection we pull over, for the chunk
    /// hashes while they are missing and the source sent the file's hash ahead of them.
    fn ask_for_hashes(&self, node: &Node, c: &ConnHandle) {
        let store = node.ctx.store.get();
        let lacking = self.hash_ahead.is_some() && store.is_some_and(|s| s.file_hash().is_none());
        let askable = c
            .peer
            .is_some_and(|p| p != SOURCE && !self.hash_liars.contains(&p));
        if lacking && c.dialed && askable {
            c.send(Msg::AskHashes);
        }
    }

    /// Chunk hashes from neighbour `from` (answering our [`Msg::AskHashes`]): gathered
    /// from chunk 0 on, and kept once the file's hash they come with is the one the source
    /// sent ahead and they make it up. A neighbour that gives others is refused as a liar
    /// and not asked again (the source's own follow anyway); its chunks are still
    /// welcome, checked against the hashes we keep.
    fn on_offered_hashes(
        &mut self,
        node: &mut Node,
        from: MemberId,
        first: ChunkId,
        hashes: Vec<[u8; 32]>,
        file_hash: Option<[u8; 32]>,
    ) {
        let (Some(ahead), Some(store)) = (self.hash_ahead, node.ctx.store.get().cloned()) else {
            return;
        };
        if store.file_hash().is_some() {
            self.offered_hashes.clear();
            return;
        }
        let count = store.layout().chunk_count();
        let gathered = self.offered_hashes.entry(from).or_default();
        match manifest::gather_offered(gathered, first, &hashes, file_hash, ahead, count) {
            Offered::Partial => return,
            Offered::Refused => {
                self.offered_hashes.remove(&from);
                self.hash_liars.insert(from);
                tracing::warn!(
                    "{} gave chunk hashes that do not make up the file's hash: refused",
                    member_name(&self.members, from)
                );
                if let Some(c) = node.conns.dialed_to(from) {
                    c.close(CLOSE_PROTOCOL, b"chunk hashes that do not make up the file");
                }
                return;
            }
            Offered::Whole => {}
        }
        let offered = self.offered_hashes.remove(&from).unwrap_or_default();
        if let Err(e) = store.add_hashes(0, &offered, Some(ahead)) {
            tracing::warn!("chunk hashes from a neighbour refused: {e}");
            return;
        }
        tracing::debug!(
            from = member_name(&self.members, from),
            at_ms = (node.now() * 1e3) as u64,
            "chunk hashes from a neighbour"
        );
        self.save_state(&store);
        if let Some(pl) = self.puller.as_mut() {
            pl.set_verifiable(store.known());
        }
    }

    /// More chunk hashes from the source: those chunks can be pulled now.
    fn on_hashes(
        &mut self,
        node: &mut Node,
        first: ChunkId,
        hashes: &[[u8; 32]],
        file_hash: Option<[u8; 32]>,
    ) -> Step {
        if let Some(held) = self.held_welcome.as_mut() {
            return match held.manifest.extend(first, hashes, file_hash) {
                Err(e) => Step::Stop(Err(e.into())),
                Ok(true) => {
                    let held = self.held_welcome.take().expect("held");
                    self.on_welcome(node, held)
                }
                Ok(false) => Step::Continue,
            };
        }
        // Before the Welcome they are not ours to keep: it carries every hash sent before it.
        let Some(store) = node.ctx.store.get() else {
            return Step::Continue;
        };
        match store.add_hashes(first, hashes, file_hash) {
            Err(e) => return Step::Stop(Err(e.into())),
            Ok(completed) => {
                if completed {
                    self.save_state(store);
                }
            }
        }
        if let Some(pl) = self.puller.as_mut() {
            pl.set_verifiable(store.known());
        }
        Step::Continue
    }

    /// Sends what the scheduler asks for; every request is announced as a fetch so
    /// neighbours leave those chunks to us.
    fn poll_scheduler(&mut self, node: &mut Node) {
        let Some(pl) = self.puller.as_mut() else {
            return;
        };
        for action in pl.poll(node.now()) {
            let (peer, msg) = match action {
                Action::Request { peer, chunks } => {
                    tracing::trace!(target: "floodclone::chunks", peer, ?chunks, "requested");
                    announce_fetching(node, pl, &chunks, None);
                    (peer, Msg::Request { chunks })
                }
                Action::RequestFresh { peer, count } => (peer, Msg::RequestFresh { count }),
                Action::Cancel { peer, chunk } => (peer, Msg::Cancel { chunk }),
            };
            if let Some(c) = node.conns.dialed_to(peer) {
                c.send(msg);
            }
        }
    }

    /// Whether a chunk whose stream is starting should be read.
    fn wants(&mut self, node: &Node, key: ConnKey, chunk: ChunkId) -> bool {
        match (node.conns.peer(key), self.puller.as_mut()) {
            (Some(p), Some(pl)) => {
                let arrival = pl.chunk_started(p, chunk, node.now());
                tracing::trace!(target: "floodclone::chunks", peer = p, chunk, ?arrival, "chunk started");
                arrival == Arrival::Accept
            }
            _ => false,
        }
    }

    /// A chunk stream ended: a verified chunk is announced to every neighbour at once; a
    /// bad one is fetched again, and its sender cut off after [`MAX_BAD_CHUNKS`].
    fn on_chunk_done(
        &mut self,
        node: &mut Node,
        key: ConnKey,
        chunk: ChunkId,
        outcome: &ChunkOutcome,
    ) {
        let (Some(p), Some(pl)) = (node.conns.peer(key), self.puller.as_mut()) else {
            return;
        };
        tracing::trace!(target: "floodclone::chunks", peer = p, chunk, %outcome, "chunk arrived");
        if let ChunkOutcome::Broken(_) = outcome {
            // Reset by its sender after we cancelled it, or its connection lost: asked for
            // again if still needed, and no mark against the sender.
            pl.chunk_broken(p, chunk);
            return;
        }
        let ok = outcome.is_stored();
        pl.chunk_done(p, chunk, ok, node.now());
        node.counts.chunks_failed += u64::from(!ok);
        if ok {
            self.last_stored_s = node.now();
            if let Some(store) = node.ctx.store.get() {
                self.feeders
                    .received(p, store.layout().chunk_range(chunk).1 as u64);
            }
            // Not to a neighbour that told us it holds the chunk: it neither asks for
            // it nor counts its holders, and each such Have is a small packet on its way in
            // (often its narrowest), and an ACK back.
            node.announce_each(|to| match to {
                Some(p) if p != SOURCE && pl.peer_holds(p, chunk) => None,
                _ => Some(Msg::Have { chunk }),
            });
        } else if p != SOURCE && pl.bad_chunks(p) >= MAX_BAD_CHUNKS {
            // Never the source: without it the swarm cannot finish (and it checks a chunk
            // asked of it again against the manifest, so a bad chunk from it comes from a
            // file changed under it, which the next ask stops the swarm for).
            let why = format!("{} chunks failed verification", pl.bad_chunks(p));
            self.cut_off(p, &why);
            if let Some(c) = node.conns.get(key) {
                c.close(transport::CLOSE_BAD_DATA, b"corrupt chunks");
            }
        } else {
            tracing::warn!(
                "chunk {chunk} from {} {outcome}; fetching it again",
                member_name(&self.members, p)
            );
        }
    }

    /// A dialer says it is member `id` ([`Msg::Hello`] on a connection dialed to us).
    /// Believed only from one of that member's addresses in the source's list (the one
    /// others dial, or one on its interfaces): else a token holder could speak as another
    /// member on its connection (that member's hops to the source, the news we pass on
    /// beyond it). A member not in our list yet is checked once a list names it; until
    /// then, or when not believed, the connection is served unnamed.
    fn on_hello(&mut self, node: &mut Node, key: ConnKey, id: MemberId) {
        let Some(from) = node.conns.get(key).map(|c| c.remote.ip()) else {
            return;
        };
        match self.members.iter().find(|m| m.id == id) {
            None => {
                self.unnamed.insert(key, id);
            }
            Some(m) if m.addr == from || m.local_addrs.contains(&from) => {
                node.conns.bind(key, id);
            }
            Some(_) => tracing::warn!(
                "a peer at {from} says it is {}, whose address that is not: not believed",
                member_name(&self.members, id)
            ),
        }
    }

    /// Checks again the Hellos that named members a new list may have.
    fn name_unnamed(&mut self, node: &mut Node) {
        for (key, id) in std::mem::take(&mut self.unnamed) {
            self.on_hello(node, key, id);
        }
    }

    /// Neighbour `p` lied (`why`): not pulled from again, and its place in the overlay
    /// taken by others.
    fn cut_off(&mut self, p: MemberId, why: &str) {
        tracing::warn!(
            "disconnecting from {}: {why}; not pulling from it again",
            member_name(&self.members, p)
        );
        if let Some(pl) = self.puller.as_mut() {
            pl.remove_peer(p);
        }
        self.banned.insert(p);
        self.rediscover_needed = true;
    }

    /// Nothing arrived for [`STALL_REPORT_S`]: the log says what this node waits on, once
    /// per that period.
    fn report_stall(&mut self, node: &Node) {
        let now = node.now();
        // Waiting for a source not started yet is normal for a service: said once a minute.
        let every = if self.puller.is_none() && self.held_welcome.is_none() {
            6.0 * STALL_REPORT_S
        } else {
            STALL_REPORT_S
        };
        if self.complete.is_some()
            || self.finalizing
            || now - self.last_stored_s < STALL_REPORT_S
            || now - self.stall_reported_s < every
        {
            return;
        }
        self.stall_reported_s = now;
        let idle = now - self.last_stored_s;
        let connected = node.conns.dialed_to(SOURCE).is_some();
        match (&self.puller, &self.held_welcome) {
            (Some(pl), _) => tracing::warn!(
                "no chunk for {idle:.0} s: {}; pulling from {:?}; connected to the source: \
                 {connected}",
                pl.describe(),
                self.neighbours
            ),
            (None, Some(held)) => tracing::warn!(
                "{now:.0} s in, the Welcome is held until its manifest is complete: {} of {} \
                 chunk hashes",
                held.manifest.known(),
                held.manifest.chunk_count()
            ),
            (None, None) => tracing::info!(
                "{now:.0} s in, not welcomed by the source yet; connected to it: {connected}"
            ),
        }
    }

    /// Nothing arrived and no neighbour had news for [`LAST_RESORT_S`] since the Welcome,
    /// nothing in flight is still on time, and the source is not among the data
    /// neighbours: it becomes one.
    fn turn_to_the_source(&mut self, node: &Node) {
        let now = node.now();
        let Some(pl) = self.puller.as_ref() else {
            return;
        };
        // The flight scan last: every tick of a live transfer stops at the clock.
        if self.source_as_last_resort
            || now - self.last_stored_s.max(self.last_news_s) < LAST_RESORT_S
            || self.complete.is_some()
            || self.finalizing
            || self.neighbours.contains(&SOURCE)
            || pl.is_complete()
            || pl.waits_on_a_live_flight()
        {
            return;
        }
        tracing::warn!(
            "no chunk for {:.0} s: pulling from the source too, as a last resort; {}; \
             pulling from {:?}",
            now - self.last_stored_s,
            pl.describe(),
            self.neighbours
        );
        self.source_as_last_resort = true;
        self.rediscover_needed = true;
    }

    /// Records which chunks are held, on a blocking thread: the state file is synced, and
    /// a sync waits for the file system's journal commit (about a millisecond on this
    /// machine at tens of Mbit/s; as long as the disk likes on a busy or remote one). On
    /// the loop, once a second, that wait held every connection of the node, and with one
    /// async worker (a host of two or three cores) nothing else runs meanwhile. A save asked
    /// for while one runs is skipped: the next comes within a second.
    fn save_state(&self, store: &Arc<ChunkStore>) {
        if self.saving_state.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, saving, local) = (store.clone(), self.saving_state.clone(), self.local.clone());
        tokio::task::spawn_blocking(move || {
            let saved = store.save_state();
            saving.store(false, Ordering::Release);
            if let Err(e) = saved {
                let _ = local.send(Local::StateNotSaved(e));
            }
        });
    }

    /// Every chunk is here and the file's hash known: the copy is made durable and renamed
    /// into place off the loop. The hash comes with the source's last batch of chunk
    /// hashes, which a destination welcomed before the source finished reading (an empty
    /// file has no chunk to wait for) may not have yet; `on_hashes` brings us back here.
    fn maybe_finished(&mut self, node: &Node) {
        if self.finalizing || !self.puller.as_ref().is_some_and(|pl| pl.is_complete()) {
            return;
        }
        let store = node
            .ctx
            .store
            .get()
            .expect("a scheduler implies a store")
            .clone();
        if store.file_hash().is_none() {
            return;
        }
        self.finalizing = true;
        let local = self.local.clone();
        tokio::task::spawn_blocking(move || {
            let checking = Instant::now();
            let done = store.finalize();
            tracing::debug!(ms = checking.elapsed().as_millis() as u64, "file checked");
            let _ = local.send(Local::Finalized(done));
        });
    }

    /// The copy is verified and in place: the user and the source are told.
    fn on_complete(&mut self, node: &Node, path: &std::path::Path) {
        let elapsed = node.now();
        self.complete = Some(elapsed);
        let bytes = node.ctx.store.get().map_or(0, |s| s.layout().size);
        let (duplicates, received) = self
            .puller
            .as_ref()
            .map_or((0, 0), |p| (p.duplicates, p.received));
        node.out.event(
            &Event::Complete {
                elapsed_s: elapsed,
                bytes,
                path: path.display().to_string(),
                duplicates,
                received_chunks: received,
                resumed_chunks: self.resumed_chunks,
            },
            || {
                format!(
                    "complete: {bytes} bytes verified in {elapsed:.2} s -> {}",
                    path.display()
                )
            },
        );
        if let Some(c) = node.conns.dialed_to(SOURCE) {
            c.send(Msg::Done {
                elapsed_ms: (elapsed * 1000.0) as u64,
            });
        }
    }

    /// The destination's `progress` event / lines.
    fn report_progress(&mut self, node: &Node, store: &ChunkStore) {
        let now = node.now();
        let total = store.layout().size;
        let done = store.layout().bytes_in(store.have().count());
        let bps = self.rate.update(done, now);
        let from = self.feeders.take(now);
        let lines = progress::dest_lines(done, total, bps, &from, |id| match id {
            SOURCE => "source".into(),
            _ => member_name(&self.members, id),
        });
        node.out.progress(
            &Event::Progress(Progress::Destination {
                elapsed_s: now,
                bytes: done,
                total_bytes: total,
                rate_bps: bps,
                eta_s: progress::eta_s(total - done, bps),
                from,
                tx_bytes_by_iface: node.tx_bytes_by_iface(),
            }),
            &lines,
        );
    }

    /// The one way out: a failure is told to the source (so the swarm finishes without
    /// us), the endpoint closed, and `swarm_done` printed on success.
    async fn shut_down(
        self,
        node: &mut Node,
        result: Result<(), NodeError>,
    ) -> Result<f64, NodeError> {
        if let (Err(e), Some(c)) = (&result, node.conns.dialed_to(SOURCE)) {
            c.send(Msg::Failed {
                reason: e.to_string(),
            });
            tokio::time::sleep(FAILED_NOTICE).await;
        }
        let tx_bytes_by_iface = node.close().await;
        result?;
        node.out.event(
            &Event::SwarmDone(SwarmDone::Destination {
                peak_rss_bytes: node::peak_rss_bytes(),
                cpu_s: node::cpu_s(),
                tx_bytes_by_iface,
            }),
            || "swarm done".into(),
        );
        Ok(self.complete.unwrap_or_default())
    }
}

/// Tells the neighbours that read our announcements which of `chunks` are being fetched:
/// by this node (`from` None: [`Msg::Fetching`]) or by neighbour `from` ([`Msg::FetchingBeyond`],
/// not back to it). Each neighbour hears only of the chunks it lacks, as far as it told us:
/// it leaves those to us, and has no use for news of a chunk it holds. The source, which
/// does not use this news, hears none.
fn announce_fetching(node: &Node, pl: &Puller, chunks: &[ChunkId], from: Option<MemberId>) {
    node.announce_each(|to| {
        let to = to.filter(|&p| p != SOURCE && Some(p) != from)?;
        let chunks: Vec<ChunkId> = chunks
            .iter()
            .copied()
            .filter(|&c| !pl.peer_holds(to, c))
            .collect();
        match (chunks.is_empty(), from) {
            (true, _) => None,
            (false, None) => Some(Msg::Fetching { chunks }),
            (false, Some(_)) => Some(Msg::FetchingBeyond { chunks }),
        }
    });
}
