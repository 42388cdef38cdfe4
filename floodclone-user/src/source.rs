//! `floodclone send`: the source. It admits the destinations named on its command line,
//! welcomes them all at once with the manifest and the member list, hands out *fresh*
//! chunks (ones it never served) to whoever asks, serves explicit requests like any
//! neighbour once none are left, and ends the swarm when every destination holds a verified
//! copy or has failed. It reads and hashes its file while it does so (one thread, in file
//! order), sends each chunk's hash before it hands the chunk out, so the first chunk
//! leaves before the last is read, whatever the file's size.
//!
//! Read top to bottom: [`run`], then the handlers in the order a transfer meets them
//! (`on_join`, `start`, `on_request_fresh`, `grant_fresh`, `on_view`, `on_done`,
//! `maybe_finished`).

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use floodclone_sched::{
    overlay::{PathCheck, PathChecks, Traced},
    ChunkId, ChunkSet, FreshServer, MemberId, SOURCE,
};
use tokio::sync::mpsc;

use crate::{
    api::SendOptions,
    claims::{self, ClaimedJoin, JoinProofs},
    conn::{self, ConnEvent, ConnKey, ShortLived},
    discovery::{self, RouteLookup, Routes},
    events::{DestProgress, DestResult, DestState, Event, Progress, Route, TxBytesByIface},
    manifest::{self, ChunkHasher, Manifest, ManifestError},
    node::{self, Node, NodeError, NodeOptions, Role, Step},
    progress::{self, RateTracker},
    storage::ChunkStore,
    trace,
    transport::{self, CLOSE_DONE, CLOSE_NOT_MEMBER},
    wire::{hashes_msgs, Member, Msg, RouteView},
};

/// The source hands out no fresh chunk until every member it welcomed at the start has
/// answered (with its first View), or this long: a Welcome (the manifest, 32 bytes per
/// chunk) to a member several hops away crosses links the first data would otherwise
/// already fill, and lost in that data's slow-start overshoot it arrived seconds late
/// (README, "Start"). Waiting costs the start the time the last Welcome takes on quiet
/// links (tens of ms).
const FRESH_HOLD_MAX: Duration = Duration::from_millis(500);
/// Largest fresh grant, whatever a destination asks for.
const MAX_FRESH_GRANT: u32 = 1024;
/// The hashing thread reports after 1, 2, 4, ... chunks, then every this many: the first
/// chunks can leave at once, and later reports cost one message per destination per
/// 16 MiB (at 64 KiB chunks).
const HASH_REPORT_MAX: u32 = 256;
/// After the swarm is done, how long the source waits for destinations to hang up.
const FINISH_GRACE: Duration = Duration::from_secs(3);

/// What the source reports when the swarm is done.
pub struct SendOutcome {
    pub dests: Vec<DestResult>,
    /// Destinations that gave up, with their reason.
    pub failed: Vec<(IpAddr, String)>,
    /// Bytes this node sent per interface (in-kernel counters; empty without them).
    pub tx_bytes_by_iface: TxBytesByIface,
    /// When the first chunk left, seconds after `send` started.
    pub first_chunk_s: Option<f64>,
}

/// Serves the file (or tree) until every destination holds a verified copy or has failed
/// (`cfg.swarm` is already in `opts`).
pub async fn run(opts: NodeOptions, cfg: SendOptions) -> Result<SendOutcome, NodeError> {
    // Listen first: destinations may join while the file is being hashed.
    let mut node = Node::open(&opts, "source")?;
    let hasher = ChunkHasher::open(&cfg.path, cfg.chunk_bytes)?;
    let layout = hasher.layout();
    let store = Arc::new(ChunkStore::source(&cfg.path, layout.clone())?);
    let _ = node.ctx.store.set(store.clone());
    let routes = Routes::open()?;
    let local_addrs = routes.local_addrs().await?;
    let (local_tx, mut local) = mpsc::unbounded_channel();
    hash_in_background(hasher, store, local_tx.clone());
    let mut source = Source::new(&opts, &cfg, layout, local_addrs, routes, local_tx);
    node.watch(source.members.iter().skip(1).map(|m| m.addr));
    node.out.event(
        &Event::Serving {
            bytes: source.layout.size,
            chunks: source.layout.chunk_count(),
            chunk_bytes: source.layout.chunk_bytes,
            destinations: cfg.dests.len(),
            port: opts.port,
            blake3: None,
        },
        || {
            let what = match &source.layout.tree {
                Some(t) => format!(
                    "the tree {} ({} files, ",
                    cfg.path.display(),
                    t.file_count()
                ),
                None => format!("{} (", cfg.path.display()),
            };
            format!(
                "serving {what}{} bytes) in {} chunks to {} destinations on UDP port {} \
                 (hashing it as it goes)",
                source.layout.size,
                source.layout.chunk_count(),
                cfg.dests.len(),
                opts.port,
            )
        },
    );
    crate::sd_notify::ready();
    let result = node::drive(&mut node, &mut source, &mut local).await;
    let first_chunk_s = node
        .ctx
        .first_chunk
        .get()
        .map(|t| t.saturating_duration_since(opts.started).as_secs_f64());
    let tx_bytes_by_iface = node.close().await;
    result?;
    Ok(source.outcome(tx_bytes_by_iface, first_chunk_s))
}

/// What the source's own tasks tell it.
enum SourceLocal {
    /// The answers of the source's own path traces (a `PathsTraced`).
    Traced(Msg),
    /// The kernel's route from the source to a member that joined.
    Routed {
        member: MemberId,
        lookup: Option<RouteLookup>,
    },
    /// More chunks are hashed (the store has their hashes); `done`: all of them.
    Hashed {
        done: bool,
    },
    HashFailed(ManifestError),
}

/// Reads and hashes the file on a thread of its own, in file order, putting the hashes in
/// the store and telling the source after 1, 2, 4, ... chunks, then every
/// [`HASH_REPORT_MAX`].
fn hash_in_background(
    mut hasher: ChunkHasher,
    store: Arc<ChunkStore>,
    tell: mpsc::UnboundedSender<SourceLocal>,
) {
    let tell_failure = tell.clone();
    let mut work = move || {
        let count = store.layout().chunk_count();
        let (mut first, mut batch) = (0u32, Vec::new());
        loop {
            match hasher.next_hash() {
                Ok(Some(h)) => batch.push(h),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
            let hashed = first + batch.len() as u32;
            let done = hashed == count;
            if !done && hashed < (2 * first).clamp(1, first + HASH_REPORT_MAX) {
                continue;
            }
            store.add_hashes(first, &batch, None)?;
            if done {
                store.seal_hashes()?;
            }
            (first, batch) = (hashed, Vec::new());
            if tell.send(SourceLocal::Hashed { done }).is_err() || done {
                return Ok(());
            }
        }
    };
    std::thread::Builder::new()
        .name("floodclone-hash".into())
        .spawn(move || {
            if let Err(e) = work() {
                let _ = tell_failure.send(SourceLocal::HashFailed(e));
            }
        })
        .expect("spawning the hashing thread");
}

/// Which destination a Join is from: the one whose `--dest` address the connection comes
/// from, else the first whose address the node claims as its own (a host with several
/// addresses may leave by another one). The address packets come from is proof of a kind;
/// a claim is not, so it never takes a member's id from the host that has its address.
fn member_joining(
    members: &[Member],
    remote_ip: Option<IpAddr>,
    claimed: &[IpAddr],
) -> Option<MemberId> {
    let dests = || members.iter().skip(1);
    dests()
        .find(|m| Some(m.addr) == remote_ip)
        .or_else(|| dests().find(|m| claimed.contains(&m.addr)))
        .map(|m| m.id)
}

/// A destination's verified copy: its own count of seconds, and when the source heard of
/// it (seconds since `send` started, the clock of everything `send` prints).
#[derive(Clone, Copy, Debug)]
struct Done {
    elapsed: f64,
    at_s: f64,
}

/// The source's state.
struct Source {
    /// The file's size and chunking (its hashes are in the store, as they come).
    layout: Manifest,
    /// Chunk hashes sent to the members (every Welcome carries these, `Hashes` the rest).
    announced: u32,
    /// Whether the members were sent the file's hash.
    file_hash_announced: bool,
    /// Every member, the source first; destinations in `--dest` order (id = index).
    members: Vec<Member>,
    relay: bool,
    join_grace: Duration,
    dest_timeout: Duration,
    /// Joined destinations whose connection is gone, and since when.
    lost_since: HashMap<MemberId, Instant>,
    /// When `send` started: destinations' completion is reported from here.
    started: Instant,
    /// What each joined destination holds, as it told us.
    holdings: HashMap<MemberId, ChunkSet>,
    fresh: FreshServer,
    /// Whether the transfer has started (the Welcomes went out).
    welcomed: bool,
    /// Members welcomed at the start that have not answered yet, and since when; `None`
    /// once fresh chunks are handed out.
    fresh_hold: Option<(HashSet<MemberId>, Instant)>,
    fresh_open: bool,
    /// Fresh requests that came while the hold lasted, in order.
    fresh_waiting: Vec<(ConnKey, u32)>,
    done: HashMap<MemberId, Done>,
    failed: HashMap<MemberId, String>,
    /// Since when the swarm is done (SwarmDone sent).
    finishing: Option<Instant>,
    ticks: u64,
    rates: HashMap<MemberId, RateTracker>,
    /// Which senders' whole paths to which receivers to trace, and what to tell them.
    path_checks: PathChecks,
    /// The kernel's routes from the source to the members that joined (the source's own
    /// view in `path_checks`).
    routes: Routes,
    own_lookups: Vec<(MemberId, Option<RouteLookup>)>,
    /// The source's own tasks (path traces, hashing).
    local: mpsc::UnboundedSender<SourceLocal>,
    /// Joins matched by a claimed address, proven by dialing it ([`crate::claims`]).
    join_proofs: JoinProofs,
    /// The connections the source dialed to prove Joins: closed once
    /// [`claims::CHECK_TIMEOUT`] is over (the answerer usually closes first).
    proof_conns: ShortLived,
}

impl Role for Source {
    type Local = SourceLocal;
    const TICK: Duration = Duration::from_millis(100);

    async fn on_event(&mut self, node: &mut Node, event: ConnEvent) -> Step {
        match event {
            // The source dials only to prove claims: those connections carry nothing else.
            ConnEvent::Up(handle) if handle.dialed => self.proof_conns.push(handle),
            ConnEvent::Up(handle) => node.conns.insert(handle),
            ConnEvent::Msg { key, msg } => self.on_msg(node, key, msg),
            ConnEvent::Gone { key, .. } => {
                self.proof_conns.remove(key);
                if let Some(gone) = node.conns.remove(key) {
                    if let Some(p) = gone.peer.filter(|&p| node.conns.accepted_from(p).is_none()) {
                        self.holdings.remove(&p);
                        self.lost_since.entry(p).or_insert_with(Instant::now);
                        self.own_view(node);
                    }
                }
                if self.finishing.is_some() && node.conns.is_empty() {
                    return Step::Stop(Ok(()));
                }
            }
            // The source holds every chunk: it takes none.
            ConnEvent::ChunkStarted { reply, .. } => {
                let _ = reply.send(false);
            }
            // The file changed since it was hashed: nothing more can be served truthfully.
            ConnEvent::StoreFailed(e) => return Step::Stop(Err(e.into())),
            ConnEvent::ChunkDone { .. }
            | ConnEvent::Unreachable { .. }
            | ConnEvent::DialFailed { .. } => {}
        }
        Step::Continue
    }

    async fn on_local(&mut self, node: &mut Node, local: SourceLocal) -> Step {
        match local {
            SourceLocal::Traced(traced) => self.on_paths_traced(node, Some(SOURCE), traced),
            SourceLocal::Routed { member, lookup } => {
                self.own_lookups.retain(|&(m, _)| m != member);
                self.own_lookups.push((member, lookup));
                self.own_view(node);
            }
            SourceLocal::Hashed { done } => self.on_hashed(node, done),
            // The file could not be read (or changed size): nothing more can be served.
            SourceLocal::HashFailed(e) => return Step::Stop(Err(e.into())),
        }
        Step::Continue
    }

    async fn on_tick(&mut self, node: &mut Node) -> Step {
        self.ticks += 1;
        if self.ticks.is_multiple_of(5) {
            node.counts.file_bytes = self.layout.size;
            node.counts.held_bytes = self.layout.size;
            node.measure();
        }
        // Progress each second where it is cheap to look at, every 5 s in logs.
        let every = if node.out.json || node.out.is_live() {
            10
        } else {
            50
        };
        if self.welcomed && self.finishing.is_none() && self.ticks.is_multiple_of(every) {
            self.report_progress(node);
        }
        let joined = self.members.iter().filter(|m| m.joined).count();
        if !self.welcomed && joined > 1 && node.start.elapsed() >= self.join_grace {
            self.start(node);
        }
        if self.finishing.is_none() {
            self.give_up_on_absent(node);
        }
        for join in self.join_proofs.expired(Instant::now()) {
            self.on_join_proof(node, join, Some("nothing answered at that address"));
        }
        self.proof_conns.close_expired();
        if self.finishing.is_none() && self.ticks.is_multiple_of(5) {
            let checks = self.path_checks.retrace(node.now());
            self.do_path_checks(node, checks);
        }
        if self
            .fresh_hold
            .as_ref()
            .is_some_and(|(_, since)| since.elapsed() >= FRESH_HOLD_MAX)
        {
            self.open_fresh(node);
        }
        match self.finishing {
            Some(t) if node.conns.is_empty() || t.elapsed() > FINISH_GRACE => Step::Stop(Ok(())),
            _ => Step::Continue,
        }
    }
}

impl Source {
    fn new(
        opts: &NodeOptions,
        cfg: &SendOptions,
        layout: Manifest,
        local_addrs: Vec<IpAddr>,
        routes: Routes,
        local: mpsc::UnboundedSender<SourceLocal>,
    ) -> Self {
        let mut members = vec![Member {
            id: SOURCE,
            addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            port: opts.port,
            local_addrs,
            joined: true,
        }];
        for (i, d) in cfg.dests.iter().enumerate() {
            members.push(Member {
                id: i as MemberId + 1,
                addr: d.ip(),
                port: d.port(),
                local_addrs: Vec::new(),
                joined: false,
            });
        }
        Self {
            fresh: FreshServer::new(layout.chunk_count()),
            layout,
            announced: 0,
            file_hash_announced: false,
            members,
            relay: !cfg.direct,
            join_grace: cfg.join_grace,
            dest_timeout: cfg.dest_timeout,
            lost_since: HashMap::new(),
            started: opts.started,
            holdings: HashMap::new(),
            welcomed: false,
            fresh_hold: None,
            fresh_open: false,
            fresh_waiting: Vec::new(),
            done: HashMap::new(),
            failed: HashMap::new(),
            finishing: None,
            ticks: 0,
            rates: HashMap::new(),
            path_checks: PathChecks::default(),
            routes,
            own_lookups: Vec::new(),
            local,
            join_proofs: JoinProofs::default(),
            proof_conns: ShortLived::new(claims::CHECK_TIMEOUT),
        }
    }

    fn on_msg(&mut self, node: &mut Node, key: ConnKey, msg: Msg) {
        let from = node.conns.peer(key);
        match msg {
            Msg::Join { port, addrs } => self.on_join(node, key, port, addrs),
            Msg::AddressProof { nonce } => {
                if let Some((join, proven)) = self.join_proofs.on_proof(&nonce, key) {
                    let refused = (!proven).then_some("another host answered at that address");
                    self.on_join_proof(node, join, refused);
                }
            }
            Msg::RequestFresh { count } => self.on_request_fresh(node, key, count),
            Msg::Bitfield { bits } => {
                let set = ChunkSet::from_bytes(self.layout.chunk_count(), &bits);
                for c in set.iter() {
                    self.on_held(from, c);
                }
            }
            Msg::Have { chunk } => self.on_held(from, chunk),
            Msg::View { routes } => self.on_view(node, from, &routes),
            msg @ Msg::PathsTraced { .. } => self.on_paths_traced(node, from, msg),
            Msg::Done { elapsed_ms } => {
                if let Some(id) = from {
                    self.on_done(node, id, elapsed_ms as f64 / 1000.0);
                }
            }
            Msg::Failed { reason } => {
                if let Some(id) = from {
                    self.on_failed(node, id, reason);
                }
            }
            _ => {}
        }
    }

    /// A node asks to join: admitted if it is one of the `--dest` addresses: by the address
    /// it connects from, or (proven first) one it claims as its own.
    fn on_join(&mut self, node: &mut Node, key: ConnKey, port: u16, addrs: Vec<IpAddr>) {
        let refuse = |node: &Node, why: &'static [u8]| {
            if let Some(c) = node.conns.get(key) {
                c.close(CLOSE_NOT_MEMBER, why);
            }
        };
        let remote_ip = node.conns.get(key).map(|c| node::remote_ip(c.remote));
        let Some(id) = member_joining(&self.members, remote_ip, &addrs) else {
            let from = remote_ip.map_or("an unknown address".into(), |a| a.to_string());
            tracing::warn!("refusing {from}: it is not in the --dest list");
            return refuse(node, b"not in the source's --dest list");
        };
        // A member joined and connected keeps its id against a claim from another host: a
        // token holder claiming its address could otherwise take its place (and report
        // its copy done). A claim from the member's own --dest address always wins, and a
        // member that joins again from where it was (a restarted `recv`) replaces its old
        // connection.
        let dest_addr = self.members[id as usize].addr;
        let held_from = node
            .conns
            .accepted_from(id)
            .filter(|c| c.key != key)
            .map(|c| node::remote_ip(c.remote));
        if held_from.is_some_and(|h| Some(h) != remote_ip) && remote_ip != Some(dest_addr) {
            let from = remote_ip.map_or("an unknown address".into(), |a| a.to_string());
            tracing::warn!("refusing {from}: it claims {dest_addr}, joined from another address");
            return refuse(node, b"that member is joined from another address");
        }
        if remote_ip == Some(dest_addr) {
            return self.admit(node, key, id, port, addrs);
        }
        // Matched by a claim only: the member's id is given once its --dest address is
        // proven to be the joiner's.
        let Ok(nonce) = transport::random_bytes() else {
            return refuse(node, b"no randomness to prove the claimed address with");
        };
        let join = ClaimedJoin {
            member: id,
            addr: dest_addr,
            key,
            port,
            addrs,
        };
        if !self.join_proofs.start(join, nonce, Instant::now()) {
            return refuse(
                node,
                b"a join claiming that address is being proven already",
            );
        }
        tracing::debug!(member = id, ?remote_ip, "proving a join's claimed address");
        node.dial_once(
            SocketAddr::new(dest_addr, port),
            id,
            vec![Msg::ProveAddress { nonce }],
            claims::CHECK_TIMEOUT,
        );
    }

    /// A Join's claimed address is proven (admitted) or `refused` (said, and closed).
    fn on_join_proof(&mut self, node: &mut Node, join: ClaimedJoin, refused: Option<&str>) {
        let Some(reason) = refused else {
            if node.conns.get(join.key).is_some() {
                self.admit(node, join.key, join.member, join.port, join.addrs);
            }
            return;
        };
        let (member, addr) = (join.member, join.addr);
        node.out.event(
            &Event::ClaimRefused {
                member,
                addr: addr.to_string(),
                reason: reason.into(),
            },
            || format!("a join claiming {addr} (the address of a destination) refused: {reason}"),
        );
        if let Some(c) = node.conns.get(join.key) {
            c.close(
                CLOSE_NOT_MEMBER,
                b"not proven to be at the address it claims",
            );
        }
    }

    /// The addresses member `id` may list as its own, of those it claims: at most
    /// [`claims::MAX_CLAIMED_ADDRS`], none plainly someone else's (the source's own,
    /// another's `--dest`). The destinations that rely on one check it
    /// ([`claims::GatewayChecks`]).
    fn listed_addrs(&self, id: MemberId, claimed: Vec<IpAddr>) -> Vec<IpAddr> {
        let mut listed = Vec::new();
        for a in claimed.into_iter().take(claims::MAX_CLAIMED_ADDRS) {
            let someone_elses = self.members[0].local_addrs.contains(&a)
                || self.members[1..].iter().any(|m| m.id != id && m.addr == a);
            if !someone_elses && !listed.contains(&a) {
                listed.push(a);
            }
        }
        listed
    }

    /// Admits member `id` on connection `key` (its Join matched, or proven).
    fn admit(
        &mut self,
        node: &mut Node,
        key: ConnKey,
        id: MemberId,
        port: u16,
        addrs: Vec<IpAddr>,
    ) {
        let remote_ip = node.conns.get(key).map(|c| node::remote_ip(c.remote));
        if let Some(old) = node.conns.bind(key, id) {
            if let Some(c) = node.conns.get(old) {
                c.close(CLOSE_DONE, b"replaced");
            }
        }
        self.lost_since.remove(&id);
        let addrs = self.listed_addrs(id, addrs);
        node.watch(addrs.iter().copied().chain(remote_ip));
        let m = &mut self.members[id as usize];
        m.joined = true;
        m.local_addrs = addrs;
        m.port = port;
        let addr = m.addr;
        let (routes, local) = (self.routes.clone(), self.local.clone());
        tokio::spawn(async move {
            // No route (or no answer) reads as unreachable: the view only refines whom
            // receivers pull from.
            let lookup = routes.route_to(addr).await.ok().flatten();
            let _ = local.send(SourceLocal::Routed { member: id, lookup });
        });
        node.out.event(
            &Event::Joined {
                member: id,
                addr: addr.to_string(),
            },
            || format!("{addr} joined"),
        );
        if self.welcomed {
            // A late joiner gets its Welcome alone; the others learn of it.
            self.welcome(node, id);
            self.tell_members(node, Some(id));
        } else if self.members.iter().all(|m| m.joined) {
            // Everyone is here: start now rather than at the next tick.
            self.start(node);
        }
    }

    /// Sends the member list to every joined destination but `except`.
    fn tell_members(&self, node: &Node, except: Option<MemberId>) {
        for c in node.conns.iter().filter(|c| !c.dialed) {
            if c.peer.is_some_and(|p| Some(p) != except && p != SOURCE) {
                c.send(Msg::Members {
                    members: self.members.clone(),
                });
            }
        }
    }

    /// Starts the transfer: every joined member gets the manifest and the member list, and
    /// fresh chunks are held until they answer (see [`FRESH_HOLD_MAX`]).
    fn start(&mut self, node: &mut Node) {
        self.welcomed = true;
        let mut welcomed = HashSet::new();
        for m in 1..self.members.len() as MemberId {
            if self.welcome(node, m) {
                welcomed.insert(m);
            }
        }
        self.fresh_hold = Some((welcomed, Instant::now()));
    }

    /// Sends `id` its Welcome and the source's bitfield; false if it has no connection.
    fn welcome(&self, node: &Node, id: MemberId) -> bool {
        let Some(c) = node.conns.accepted_from(id) else {
            return false;
        };
        let Some(store) = node.ctx.store.get() else {
            return false;
        };
        // Once the whole file is hashed, its hash goes ahead of the chunk hashes (see
        // `Msg::Welcome`): they follow on the same stream, and a neighbour may give them
        // first. An empty file has none: its manifest is whole as it is.
        let count = self.layout.chunk_count();
        let hashes_after =
            conn::every_hash(store).filter(|_| self.file_hash_announced && count > 0);
        let hash_ahead = hashes_after.as_ref().and(store.file_hash());
        let sent = if hash_ahead.is_some() {
            0
        } else {
            self.announced
        };
        c.send(Msg::Welcome {
            you: id,
            manifest: store.manifest(sent),
            members: self.members.clone(),
            relay: self.relay,
            hash_ahead,
        });
        // Every chunk: a destination asks only for those whose hashes it has.
        c.send(Msg::Bitfield {
            bits: ChunkSet::full(count).to_bytes(),
        });
        for msg in hashes_after.into_iter().flatten() {
            c.send(msg);
        }
        true
    }

    /// More chunks are hashed: their hashes go to every member (before any of those chunks
    /// is handed out: the same stream carries the grant after them), and the fresh
    /// requests waiting for them are answered.
    fn on_hashed(&mut self, node: &mut Node, done: bool) {
        let Some(store) = node.ctx.store.get().cloned() else {
            return;
        };
        let known = store.known();
        let count = self.layout.chunk_count();
        // The file's hash goes with the last chunk hashes (alone for an empty file).
        let complete = store.file_hash().is_some();
        if self.announced < known || (complete && !self.file_hash_announced) {
            let file_hash = store.file_hash().filter(|_| known == count);
            let hashes = store.hashes(self.announced, known);
            for msg in hashes_msgs(self.announced, &hashes, file_hash) {
                for c in node.conns.iter().filter(|c| !c.dialed && c.peer.is_some()) {
                    c.send(msg.clone());
                }
            }
            self.announced = known;
            self.file_hash_announced |= file_hash.is_some();
        }
        if let Some(b3) = store
            .content_hash()
            .filter(|_| done)
            .map(|h| manifest::b3(&h))
        {
            let elapsed_s = self.started.elapsed().as_secs_f64();
            let what = if self.layout.tree.is_some() {
                "tree"
            } else {
                "file"
            };
            node.out.event(
                &Event::Hashed {
                    elapsed_s,
                    blake3: b3.clone(),
                },
                || {
                    format!(
                        "hashed the {what} in {elapsed_s:.2} s; its BLAKE3 (for `recv --expect`): \
                         {b3}"
                    )
                },
            );
        }
        if self.fresh_open {
            self.grant_fresh(node);
        }
    }

    /// A destination asks for `count` chunks nobody has had yet.
    fn on_request_fresh(&mut self, node: &mut Node, key: ConnKey, count: u32) {
        self.fresh_waiting.push((key, count));
        if self.fresh_open {
            self.grant_fresh(node);
        }
    }

    /// Answers the fresh requests waiting, in order: the chunks queued on the requester's
    /// connection, then the grant that names them.
    /// A request that finds every chunk hashed so far already handed out waits for the next
    /// hashes.
    ///
    /// A destination that, told what it was told, no longer pulls from the source (its
    /// path from the source crosses another: `overlay::PathChecks`) is answered "no fresh
    /// chunks for you" (exhausted, none): its requests were sent while the views were
    /// coming in, and granted they would cross that link twice.
    fn grant_fresh(&mut self, node: &mut Node) {
        let mut unanswered = Vec::new();
        for (key, count) in std::mem::take(&mut self.fresh_waiting) {
            let Some(c) = node.conns.get(key) else {
                continue;
            };
            if self.relay
                && c.peer
                    .is_some_and(|r| !self.path_checks.pulls_from_source(r))
            {
                c.send(Msg::FreshGrant {
                    chunks: Vec::new(),
                    exhausted: true,
                });
                continue;
            }
            let chunks = self
                .fresh
                .pick_below(count.min(MAX_FRESH_GRANT), self.announced);
            if chunks.is_empty() && !self.fresh.exhausted() {
                unanswered.push((key, count));
                continue;
            }
            c.serve(&chunks);
            c.send(Msg::FreshGrant {
                chunks,
                exhausted: self.fresh.exhausted(),
            });
        }
        self.fresh_waiting = unanswered;
    }

    /// A member answered its Welcome; when all have (or the hold times out), fresh chunks
    /// are handed out.
    fn on_view(&mut self, node: &mut Node, from: Option<MemberId>, routes: &[RouteView]) {
        if let Some(id) = from.filter(|&id| id != SOURCE) {
            let reach: Vec<_> = routes
                .iter()
                .map(|r| (r.member, r.reach, r.via_member))
                .collect();
            let checks = self.path_checks.on_view(id, &reach);
            self.do_path_checks(node, checks);
        }
        // After the path checks took this view in: the grants at the opening see it.
        if let Some((silent, _)) = self.fresh_hold.as_mut() {
            if from.is_some_and(|id| silent.remove(&id)) && silent.is_empty() {
                self.open_fresh(node);
            }
        }
        node.out.event(
            &Event::View {
                member: from,
                routes: routes.iter().map(Route::from).collect(),
            },
            || {
                let name = |id: MemberId| match self.members.get(id as usize) {
                    _ if id == SOURCE => "the source".into(),
                    Some(m) => m.addr.to_string(),
                    None => "an unknown member".into(),
                };
                let reach: Vec<String> = routes
                    .iter()
                    .map(|r| format!("{} {}", name(r.member), r.reach.describe()))
                    .collect();
                let who = from.map_or("an unknown member".into(), name);
                format!("{who} reaches {}", reach.join(", "))
            },
        );
    }

    /// The source's own view, from its route lookups (a member behind one whose connection
    /// is gone reads as reached through routers: its kernel still forwards), into the path
    /// checks.
    fn own_view(&mut self, node: &mut Node) {
        let mut views = discovery::classify(&self.members, &self.own_lookups);
        discovery::route_around(&mut views, |m| self.lost_since.contains_key(&m));
        let reach: Vec<_> = views
            .iter()
            .map(|v| (v.member, v.reach, v.via_member))
            .collect();
        let checks = self.path_checks.on_view(SOURCE, &reach);
        self.do_path_checks(node, checks);
    }

    /// A sender (a destination, or the source itself) traced the paths it was asked to.
    fn on_paths_traced(&mut self, node: &mut Node, from: Option<MemberId>, traced: Msg) {
        let (
            Some(sender),
            Msg::PathsTraced {
                clean,
                crossed,
                unknown,
            },
        ) = (from, traced)
        else {
            return;
        };
        let answers = (clean.iter().map(|&r| (r, Traced::Clean)))
            .chain(crossed.iter().map(|&r| (r, Traced::Crosses)))
            .chain(unknown.iter().map(|&r| (r, Traced::Unknown)));
        let checks: Vec<PathCheck> = answers
            .filter_map(|(r, found)| self.path_checks.on_traced(sender, r, found))
            .collect();
        self.do_path_checks(node, checks);
    }

    /// Asks senders to trace (the source's own traces run here), tells receivers.
    fn do_path_checks(&mut self, node: &mut Node, checks: Vec<PathCheck>) {
        for check in checks {
            match check {
                PathCheck::Trace { sender, receivers } if sender == SOURCE => {
                    let (members, local) = (self.members.clone(), self.local.clone());
                    tokio::spawn(async move {
                        let traced = trace::check_paths(receivers, members).await;
                        let _ = local.send(SourceLocal::Traced(traced));
                    });
                }
                PathCheck::Trace { sender, receivers } => {
                    if let Some(c) = node.conns.accepted_from(sender) {
                        c.send(Msg::TracePaths { to: receivers });
                    }
                }
                PathCheck::Tell { receiver, paths } => {
                    tracing::debug!(receiver, ?paths, "senders' paths that routes hide");
                    if let Some(c) = node.conns.accepted_from(receiver) {
                        c.send(Msg::SenderPaths(paths));
                    }
                }
            }
        }
    }

    /// Opens the source's fresh chunks and says who had not answered.
    fn open_fresh(&mut self, node: &mut Node) {
        let Some((silent, since)) = self.fresh_hold.take() else {
            return;
        };
        self.fresh_open = true;
        self.grant_fresh(node);
        let held_ms = since.elapsed().as_millis() as u64;
        let mut silent: Vec<MemberId> = silent.into_iter().collect();
        silent.sort_unstable();
        node.out.event(
            &Event::FreshOpen {
                held_ms,
                silent: silent.clone(),
            },
            || {
                let silent: Vec<String> = silent
                    .iter()
                    .map(|&id| self.members[id as usize].addr.to_string())
                    .collect();
                match silent.is_empty() {
                    true => format!("handing out chunks after {held_ms} ms"),
                    false => format!(
                        "handing out chunks after {held_ms} ms, not waiting longer for {}",
                        silent.join(", ")
                    ),
                }
            },
        );
    }

    /// A destination holds `chunk` (told by its Bitfield or a Have).
    fn on_held(&mut self, from: Option<MemberId>, chunk: ChunkId) {
        let Some(id) = from.filter(|&id| id != SOURCE) else {
            return;
        };
        let n = self.layout.chunk_count();
        if self
            .holdings
            .entry(id)
            .or_insert_with(|| ChunkSet::new(n))
            .insert(chunk)
        {
            // After a restart of `send`, what destinations already hold is not fresh.
            self.fresh.known_held(chunk);
        }
    }

    fn on_done(&mut self, node: &mut Node, id: MemberId, elapsed: f64) {
        if !self.done.contains_key(&id) {
            let at_s = self.started.elapsed().as_secs_f64();
            self.done.insert(id, Done { elapsed, at_s });
            let addr = self.members[id as usize].addr;
            node.out.event(
                &Event::DestDone {
                    member: id,
                    addr: addr.to_string(),
                    elapsed_s: elapsed,
                    at_s,
                },
                || format!("{addr} has a verified copy, {at_s:.2} s after send started"),
            );
        }
        self.maybe_finished(node);
    }

    fn on_failed(&mut self, node: &mut Node, id: MemberId, reason: String) {
        // A destination's words reach the operator's terminal: no escape sequences, and
        // a line, not a page.
        let reason: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(300)
            .collect();
        let addr = self.members[id as usize].addr;
        node.out.event(
            &Event::DestFailed {
                member: id,
                addr: addr.to_string(),
                reason: reason.clone(),
            },
            || format!("{addr} failed: {reason}"),
        );
        self.failed.insert(id, reason);
        self.maybe_finished(node);
    }

    /// Destinations never joined, or gone, for `dest_timeout` are failed by name, so the
    /// others are told the swarm is over and `send` ends (non-zero, naming them).
    fn give_up_on_absent(&mut self, node: &mut Node) {
        let secs = self.dest_timeout.as_secs_f64();
        let absent: Vec<(MemberId, String)> = self.members[1..]
            .iter()
            .filter(|m| !self.done.contains_key(&m.id) && !self.failed.contains_key(&m.id))
            .filter_map(|m| {
                if !m.joined && node.start.elapsed() >= self.dest_timeout {
                    Some((m.id, format!("never joined within {secs:.0} s (is `floodclone recv` running there, with this token and port?)")))
                } else {
                    self.lost_since
                        .get(&m.id)
                        .filter(|t| t.elapsed() >= self.dest_timeout)
                        .map(|_| (m.id, format!("no connection for {secs:.0} s (host down or unreachable?)")))
                }
            })
            .collect();
        for (id, reason) in absent {
            self.on_failed(node, id, reason);
        }
    }

    /// Every destination is done or failed: everyone is told, and the source waits (up to
    /// [`FINISH_GRACE`]) for them to hang up.
    fn maybe_finished(&mut self, node: &mut Node) {
        if self.finishing.is_none() && self.done.len() + self.failed.len() == self.members.len() - 1
        {
            for c in node.conns.iter() {
                c.send(Msg::SwarmDone);
            }
            self.finishing = Some(Instant::now());
        }
    }

    /// The `progress` event / lines: a line per destination.
    fn report_progress(&mut self, node: &Node) {
        let now = node.now();
        let total = self.layout.size;
        let dests: Vec<DestProgress> = self.members[1..]
            .iter()
            .map(|m| {
                let held = self
                    .holdings
                    .get(&m.id)
                    .map_or(0, |set| self.layout.bytes_in(set.count()));
                let (bytes, state) = if self.done.contains_key(&m.id) {
                    (total, DestState::Done)
                } else if self.failed.contains_key(&m.id) {
                    (held, DestState::Failed)
                } else if m.joined {
                    (held, DestState::Receiving)
                } else {
                    (held, DestState::Joining)
                };
                DestProgress {
                    member: m.id,
                    addr: m.addr.to_string(),
                    bytes,
                    rate_bps: self.rates.entry(m.id).or_default().update(bytes, now),
                    state,
                }
            })
            .collect();
        let lines = progress::source_lines(total, now, &dests);
        node.out.progress(
            &Event::Progress(Progress::Source {
                elapsed_s: now,
                total_bytes: total,
                destinations: dests,
                tx_bytes_by_iface: node.tx_bytes_by_iface(),
            }),
            &lines,
        );
    }

    fn outcome(self, tx_bytes_by_iface: TxBytesByIface, first_chunk_s: Option<f64>) -> SendOutcome {
        let addr = |id: MemberId| self.members[id as usize].addr;
        let mut dests: Vec<DestResult> = self
            .done
            .iter()
            .map(|(&id, done)| DestResult {
                id,
                addr: addr(id).to_string(),
                elapsed_s: done.elapsed,
                at_s: done.at_s,
            })
            .collect();
        dests.sort_by_key(|r| r.id);
        let mut failed: Vec<(IpAddr, String)> = self
            .failed
            .iter()
            .map(|(&id, reason)| (addr(id), reason.clone()))
            .collect();
        failed.sort();
        SendOutcome {
            dests,
            failed,
            tx_bytes_by_iface,
            first_chunk_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_is_matched_by_where_it_comes_from_before_what_it_claims() {
        let member = |id: MemberId, last: u8| Member {
            id,
            addr: IpAddr::from([10, 100, 0, last]),
            port: 7878,
            local_addrs: Vec::new(),
            joined: false,
        };
        let members = vec![member(0, 1), member(1, 2), member(2, 3)];
        let ip = |last| Some(IpAddr::from([10, 100, 0, last]));
        // Member 2 claims member 1's address too: it still is member 2.
        let claims = [IpAddr::from([10, 100, 0, 2]), IpAddr::from([10, 100, 0, 3])];
        assert_eq!(member_joining(&members, ip(3), &claims), Some(2));
        // A host leaving by another address is matched by what it claims.
        assert_eq!(member_joining(&members, ip(9), &claims[..1]), Some(1));
        assert_eq!(member_joining(&members, ip(9), &[]), None);
        // The source's own entry is never joined.
        assert_eq!(member_joining(&members, ip(1), &[]), None);
    }
}
