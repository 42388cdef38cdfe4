//! The scheduler: which chunk to ask of which neighbour, and when. A pure state machine in
//! the style of quinn-proto: events in, actions out, no I/O and no clock of its own (time is
//! passed in as seconds), so the daemon, unit tests and the simulator run the same code.
//!
//! Receiver-driven: a node asks each neighbour for chunks that neighbour holds and it lacks,
//! rarest among its neighbours first, keeping each neighbour's pipeline about
//! `queue_target_s` deep at that neighbour's measured delivery rate. A chunk is requested
//! from one neighbour at a time, so nothing arrives twice, except in the end game, when a
//! chunk stuck behind a slow link may be raced by a faster one and the loser is cancelled.
//!
//! From the source a node asks for *fresh* chunks: the source picks ones it has never served
//! ([`crate::FreshServer`]), which no other node can hold or be sending, so the source serves every
//! chunk once before any twice without any race. When none are left the source says so and
//! the node requests from it explicitly, like from any neighbour.

use std::collections::{BTreeMap, HashMap};

use crate::{rate::RateEstimate, ChunkId, ChunkMap, ChunkSet, MemberId};

/// How long a neighbour's "fetching" announcement holds back requests to farther ones.
pub const COMING_TTL_S: f64 = 2.0;

/// A nearer neighbour's "fetching" claim holds back asking a farther neighbour on the same
/// path for that chunk at least [`COMING_TTL_S`], and as long as this many times the
/// farther one's pipeline takes to drain here ([`Peer::expected_delivery_s`]). The nearer
/// one sits behind the same stretch, so its fetch over that path takes about as long; a
/// claim that lapses while its chunk is still on the way brings that chunk over the shared
/// path twice. Where far senders are slow (one uplink shared by many, a narrow router link
/// into a group) a fetch took longer than 2 s: random-1349 in the simulator, whose group
/// behind a 9 Mbit/s router link took 1.6 copies over it, 1.594 x U_min (1.297 with this).
/// 1,000 small random networks each (`cargo xtask sim --shape small --networks 1000
/// --size 32MiB`), over 1.10 x the routed floor / p99, 2 s flat before: seed 1000 22 ->
/// 20 / 1.191 -> 1.148, seed 5000 15 -> 14 / 1.158 -> 1.136, seed 9000 (not looked at
/// while choosing) 20 -> 18 / 1.169 -> 1.155; 2 pipelines gave p99 1.159 on seed 1000, 4
/// and 8 the same. The shipped files, the wan set, the 20 ms set and the testbed's 30
/// random networks are unchanged in the simulator (no far pipeline there takes 0.5 s).
pub const CLAIM_PIPELINES: f64 = 4.0;

/// Most requests outstanding per neighbour: the sender holds what it was asked for in its
/// queues, so with chunks of 256 KiB (files over 64 MiB) and 64 of them a 1 Gbit/s star's
/// source peaked at 80 MiB against 35 (four neighbours at 16 MiB each); at 4 MiB, the
/// same pipeline as 64 chunks of 64 KiB, it used the same CPU per GiB or less (README,
/// "Gigabit links", session 38).
pub const MAX_OUTSTANDING_BYTES: u64 = 4 << 20;
/// Most requests outstanding per neighbour whatever the chunk size.
pub const MAX_OUTSTANDING_CHUNKS: u64 = 64;
/// Fewest requests outstanding per neighbour, whatever its rate or the chunk size.
pub const MIN_OUTSTANDING: u32 = 2;

#[derive(Clone, Debug)]
pub struct SchedConfig {
    pub chunk_bytes: u64,
    /// Requests kept outstanding per neighbour, whatever its rate.
    pub min_outstanding: u32,
    pub max_outstanding: u32,
    /// Depth of each neighbour's pipeline beyond its round trip, in seconds at its
    /// measured rate: the round trip (when known) is added, so a request's way there and
    /// the data's way back never leave the link idle, whatever the propagation delay.
    pub queue_target_s: f64,
    /// Rate assumed for a neighbour before its first delivery.
    pub initial_rate_bps: f64,
    /// A chunk is raced in the end game when it has been in flight this many times longer
    /// than its sender's current per-chunk time.
    pub endgame_slowness: f64,
    /// This node's member id. Breaks ties among equally rare chunks differently on every
    /// node, and designates which of a group of nodes fetches a chunk from afar (see
    /// [`SchedConfig::far_defer_s`]).
    pub member: MemberId,
    /// Nodes that hear of a chunk at the same moment would all fetch it over the same
    /// shared path. For a chunk only a farther neighbour offers, one node among itself and
    /// its nearer neighbours is designated (by a hash of member id and chunk, which all of
    /// them compute alike); the others leave it for this long times their place in the
    /// same order, time enough to hear that an earlier one is fetching it, and fetch it
    /// from nearby instead.
    pub far_defer_s: f64,
}

impl SchedConfig {
    pub fn new(chunk_bytes: u64) -> Self {
        Self {
            chunk_bytes,
            min_outstanding: MIN_OUTSTANDING,
            max_outstanding: (MAX_OUTSTANDING_BYTES / chunk_bytes.max(1))
                .clamp(MIN_OUTSTANDING as u64, MAX_OUTSTANDING_CHUNKS)
                as u32,
            queue_target_s: 0.12,
            initial_rate_bps: 20e6,
            endgame_slowness: 3.0,
            member: 0,
            far_defer_s: 0.25,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask `peer` for these chunks.
    Request {
        peer: MemberId,
        chunks: Vec<ChunkId>,
    },
    /// Ask the source `peer` for up to `count` chunks it has never served.
    RequestFresh { peer: MemberId, count: u32 },
    /// Tell `peer` to stop sending `chunk`.
    Cancel { peer: MemberId, chunk: ChunkId },
}

/// A chunk in flight this many seconds (and [`STALL_FACTOR`] times its expected time) is
/// asked of the same neighbour again: a request or a stream lost somewhere must not hang
/// a node whose only holder is that neighbour.
pub const STALL_MIN_S: f64 = 2.0;
pub const STALL_FACTOR: f64 = 10.0;

/// Flights are checked for stalls at most this often: a stall takes [`STALL_MIN_S`] at
/// least, and the check walks every flight (at every poll it was a seventh of the
/// simulator's time at 1000 nodes).
pub const STALL_SCAN_S: f64 = 0.05;

/// Seconds a chunk asked of a far neighbour may wait unstarted in its queue before it is
/// asked of a nearer neighbour that holds it instead ([`Puller::move_queued_flights_nearer`]).
pub const MOVE_QUEUED_AFTER_S: f64 = 1.0;

/// A neighbour's unstarted requests are trimmed to this many times its pipeline
/// ([`Puller::trim_excess_requests`]); between one and this many, a falling rate only
/// stops new requests.
pub const TRIM_ABOVE_BUDGETS: u32 = 2;

/// Deferrals of a chunk from afar grow with a node's place in its group's order (see
/// [`SchedConfig::far_defer_s`]) up to this many times `far_defer_s`.
pub const MAX_DEFER_PLACE: usize = 4;

/// A chunk designated to another member of a group (see [`SchedConfig::far_defer_s`]) ranks
/// as if more neighbours held it (as many as its place in the group's order, up to this
/// many): each member first asks the far neighbour for the chunks it is designated to
/// fetch, so members that poll at the same moment (fed over the same narrow link, they
/// finish chunks together) ask for different chunks, not the same rarest one twice before
/// either hears of the other's fetch. That news takes a one-way trip between them: with 20
/// ms per link, random-1346 in the simulator had 104 of its 512 chunks cross a 5 Mbit/s
/// router link twice, two members 3 hops apart each asking the source for the same chunk
/// 21 ms apart (1.23 x U_min; 1.04 with this). A rank, not a wait: a member whose
/// designated chunks run out still asks for the others. 1,000 small random networks
/// (`cargo xtask sim --shape small --networks 1000 --size 32MiB`), over 1.10 x the routed
/// floor with `--delay-ms 20`: seed 1000 63 -> 57, seed 5000 43 -> 42, seed 9000 57 -> 53
/// (means -0.0005); without delay 20 -> 21, 14 -> 13, 18 -> 17; the shipped files the same
/// but, with 20 ms, dumbbell (1.060 -> 1.048) and dynamic (1.021 -> 1.023).
pub const DESIGNATED_RANK: u16 = 2;

/// A place's deferral is at least this many round trips to the nearer neighbours (whose
/// Fetching takes half of one to arrive; the rest covers their own decision and jitter).
pub const FAR_DEFER_RTTS: f64 = 2.0;

/// A nearer neighbour's chunks are left to it (not asked of a farther neighbour on the same
/// link) only while it can hand over all it holds that this node lacks within this many
/// seconds at its delivery rate. Fewer router hops on the same link is a guess that the
/// nearer one sits on the farther one's path, past a shared bottleneck (a dumbbell: each
/// chunk should cross the middle once, then spread on the near side). Where the guess is
/// wrong (the nearer one hangs off the same router by a slow link of its own, the farther
/// one by a fast path), the node would take everything over that slow link while the fast
/// path idled: random-1876 in the simulator, 2.27 x U_min. A neighbour that holds a long
/// backlog for us at its rate is no reason to leave another path idle (work conservation);
/// in the dumbbell the near side's members share what they bring in within a fraction of
/// this. 1,000 small random networks (`cargo xtask sim --shape small --networks 1000
/// --seed 1000`): over 1.10 x the routed floor 39 -> 22, p99 1.52 -> 1.20, the same for any
/// value from 0.25 to 1 s; on 1,000 more not looked at while choosing (`--seed 5000`)
/// 38 -> 15; the shipped files unchanged. On the testbed random-1876 went 2.40 -> 1.09.
pub const NEARER_BACKLOG_S: f64 = 0.5;

/// Seconds over which the source's hand-out of fresh chunks is counted (see
/// [`Puller::too_slow_for_fresh`]).
pub const FRESH_WINDOW_S: f64 = 1.0;

/// A node whose fresh chunks arrive at less than this share of the source's average rate
/// per fresh receiver is far behind the others (its path has a bottleneck of its own).
pub const STARVED_SHARE: f64 = 0.25;

#[derive(Clone, Debug)]
struct Peer {
    have: ChunkSet,
    is_source: bool,
    /// The source still has never-served chunks for us (ask it for fresh ones).
    fresh_open: bool,
    /// Counts of our fresh requests not answered yet, oldest first (answers come in order).
    fresh_asked: std::collections::VecDeque<u32>,
    /// Fresh chunks whose stream started before their grant arrived.
    fresh_early: Vec<ChunkId>,
    outstanding: u32,
    rate: RateEstimate,
    /// Externally measured rate (eBPF link stats), used until deliveries give one.
    measured_bps: Option<f64>,
    bad_chunks: u32,
    /// Router hops to this neighbour (from the TTL its packets arrive with).
    hops: Option<u8>,
    /// This neighbour's own hops to the source, as it reports them.
    source_hops: Option<u8>,
    /// The source said this neighbour's route to us does not start at the source, though
    /// it sits next to it ([`Puller::peer_route_avoids_source`]).
    avoids_source: bool,
    /// The link its data arrives on (an interface index, or any id naming the link).
    ingress: Option<u32>,
    /// Least round-trip time to this neighbour, seconds (the transport's).
    rtt_s: Option<f64>,
    /// Chunks this neighbour announced it is fetching, with when.
    coming: ChunkMap<f64>,
    /// Chunks this neighbour told us one of its own neighbours is fetching, with when.
    coming_beyond: ChunkMap<f64>,
    /// Size of `coming_beyond` at which its expired entries are swept.
    sweep_beyond_at: usize,
    /// It let a chunk stall that someone else held (see [`Puller::re_request_stalled`]):
    /// one request at a time until it delivers again.
    on_probation: bool,
    /// What it held when it went on probation, not counted as held meanwhile: each such
    /// chunk counts again once no other neighbour holds it, all of them once it delivers.
    doubted: ChunkSet,
}

impl Peer {
    /// Whether this neighbour's path and `other`'s share the link next to this node (when
    /// unknown, assume they do). Only then is one nearer than the other along a common
    /// path: neighbours on links of their own cost each other nothing.
    fn shares_path_with(&self, other: &Peer) -> bool {
        match (self.ingress, other.ingress) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }

    /// Whether the path to this neighbour plausibly runs through the source (and its links,
    /// which the source would better fill with fresh chunks), the source being
    /// `source_hops` away through routers: our hops to it add up to ours to the source plus
    /// its own to the source. Without its figure, a neighbour farther than the source is
    /// taken to lie beyond it.
    fn lies_beyond_source(&self, source_hops: Option<u8>) -> bool {
        if self.avoids_source {
            return false;
        }
        match (self.hops, source_hops) {
            (Some(h), Some(sh)) if !self.is_source => match self.source_hops {
                Some(qs) => h >= sh.saturating_add(qs),
                None => h > sh,
            },
            _ => false,
        }
    }

    fn rate_bps(&self, cfg: &SchedConfig) -> f64 {
        self.rate
            .bps()
            .or(self.measured_bps)
            .unwrap_or(cfg.initial_rate_bps)
            .max(1e5)
    }

    /// Requests kept outstanding: twice the bandwidth-delay product of the round trip
    /// plus `queue_target_s`, in chunks, plus one. Twice, as BBR's window gain: the rate is
    /// measured on what the pipeline let through, and a pipeline of exactly one round trip
    /// at that rate would hold a rising sender (a slow start) to it.
    fn budget(&self, cfg: &SchedConfig) -> u32 {
        if self.on_probation {
            return 1;
        }
        let depth_s = cfg.queue_target_s + 2.0 * self.rtt_s.unwrap_or(0.0);
        let chunks = self.rate_bps(cfg) / 8.0 * depth_s / cfg.chunk_bytes as f64;
        (chunks.ceil() as u32 + 1).clamp(cfg.min_outstanding, cfg.max_outstanding)
    }

    fn in_use(&self) -> u32 {
        self.outstanding + self.fresh_asked.iter().sum::<u32>()
    }

    /// This neighbour announced, less than [`COMING_TTL_S`] ago, that it is fetching `c`.
    fn is_fetching(&self, c: ChunkId, now: f64) -> bool {
        self.claims_within(c, now, COMING_TTL_S)
    }

    /// This neighbour announced, less than `ttl` seconds ago, that it is fetching `c`.
    fn claims_within(&self, c: ChunkId, now: f64, ttl: f64) -> bool {
        self.coming.get(&c).is_some_and(|&t| now - t < ttl)
    }

    /// This neighbour said, less than [`COMING_TTL_S`] ago, that one of its own
    /// neighbours is fetching `c`.
    fn hears_fetching(&self, c: ChunkId, now: f64) -> bool {
        self.coming_beyond
            .get(&c)
            .is_some_and(|&t| now - t < COMING_TTL_S)
    }

    /// Seconds one chunk takes from this neighbour at its measured rate.
    fn chunk_time_s(&self, cfg: &SchedConfig) -> f64 {
        cfg.chunk_bytes as f64 * 8.0 / self.rate_bps(cfg)
    }

    /// Seconds until a chunk requested from this neighbour now should have arrived: its
    /// pipeline (at least one chunk) at its measured rate.
    fn expected_delivery_s(&self, cfg: &SchedConfig) -> f64 {
        self.chunk_time_s(cfg) * self.in_use().max(1) as f64
    }

    /// Seconds after which a chunk requested from this neighbour has stalled: far longer
    /// than its pipeline takes at the rate it delivered at (before its first delivery, the
    /// prior rate: the link's measured rate would be what the neighbour chooses to send,
    /// and one that sends nothing would never stall).
    fn stall_after_s(&self, cfg: &SchedConfig) -> f64 {
        let bps = self.rate.bps().unwrap_or(cfg.initial_rate_bps).max(1e5);
        let pipeline_s = cfg.chunk_bytes as f64 * 8.0 / bps * self.in_use().max(1) as f64;
        STALL_MIN_S.max(STALL_FACTOR * pipeline_s)
    }
}

#[derive(Clone, Debug)]
struct Flight {
    peer: MemberId,
    since: f64,
    /// Asked again of the same sender after it stalled (see [`Puller::re_request_stalled`]).
    asked_again: bool,
    /// Its stream has started arriving ([`Puller::chunk_started`]).
    started: bool,
    /// Order of asking, over all flights (a sender serves in that order).
    seq: u64,
}

/// What to do with a chunk whose stream has started arriving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Expected: read it.
    Accept,
    /// Already held: stop the stream.
    Reject,
}

/// The receiving side of one node.
#[derive(Clone, Debug)]
pub struct Puller {
    cfg: SchedConfig,
    have: ChunkSet,
    flights: ChunkMap<Vec<Flight>>,
    peers: BTreeMap<MemberId, Peer>,
    /// What members that are not neighbours now hold, as far as they told us: restored
    /// when they become neighbours (again), so this is the one record of peer holdings.
    dormant: HashMap<MemberId, ChunkSet>,
    /// For each chunk, how many neighbours hold it (rarest first).
    holders: Vec<u16>,
    actions: Vec<Action>,
    /// Chunks this node was not designated to fetch from afar, since when.
    deferred: ChunkMap<f64>,
    /// Chunks known to have left the source: held or fetched here or by a neighbour.
    seen: ChunkSet,
    /// Chunks whose fetching this node has passed on (see [`Puller::pass_on_fetching`]).
    passed_on: ChunkSet,
    /// Fetches of chunks not seen before (fresh ones, as far as this node can tell) in the
    /// last [`FRESH_WINDOW_S`]: when, and by whom (`None`: this node).
    fresh_log: std::collections::VecDeque<(f64, Option<MemberId>)>,
    /// Chunks `0..verifiable` can be verified here (their hashes are known): only those are
    /// requested. The source sends hashes as it reads its file ([`Puller::set_verifiable`]).
    verifiable: u32,
    /// When the flights are next looked over ([`Puller::re_request_stalled`],
    /// [`Puller::move_queued_flights_nearer`]; see [`STALL_SCAN_S`]).
    next_stall_scan_s: f64,
    /// The last [`Flight::seq`] given.
    next_flight_seq: u64,
    /// Chunks that arrived and were not needed (raced copies, refused streams).
    pub duplicates: u64,
    /// Chunks received and verified.
    pub received: u64,
}

impl Puller {
    pub fn new(cfg: SchedConfig, have: ChunkSet) -> Self {
        let n = have.len() as usize;
        Self {
            cfg,
            have,
            flights: ChunkMap::default(),
            peers: BTreeMap::new(),
            dormant: HashMap::new(),
            holders: vec![0; n],
            actions: Vec::new(),
            deferred: ChunkMap::default(),
            seen: ChunkSet::new(n as u32),
            passed_on: ChunkSet::new(n as u32),
            fresh_log: Default::default(),
            verifiable: n as u32,
            next_stall_scan_s: 0.0,
            next_flight_seq: 0,
            duplicates: 0,
            received: 0,
        }
    }

    /// Only chunks `0..n` can be verified here for now: the others are not requested (a
    /// chunk that cannot be verified would count against its sender).
    pub fn set_verifiable(&mut self, n: u32) {
        self.verifiable = n.min(self.have.len());
    }

    pub fn have(&self) -> &ChunkSet {
        &self.have
    }

    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Whether some chunk in flight is still within its sender's first stall time: this
    /// node waits on someone who has not yet let it down.
    pub fn waits_on_a_live_flight(&self) -> bool {
        self.flights.values().flatten().any(|f| !f.asked_again)
    }

    /// What this node holds and waits on, for a log line when nothing arrives for long:
    /// held, verifiable and in-flight chunks, and per neighbour (by id) what it holds, what
    /// we asked of it, and whether it still hands out fresh chunks.
    pub fn describe(&self) -> String {
        let peers: Vec<String> = self
            .peers
            .iter()
            .map(|(id, p)| {
                format!(
                    "{id} holds {} asked {}{}",
                    p.have.count(),
                    p.in_use(),
                    if p.fresh_open { " fresh" } else { "" }
                )
            })
            .collect();
        format!(
            "{} of {} chunks held, {} verifiable, {} in flight; neighbours: {}",
            self.have.count(),
            self.have.len(),
            self.verifiable,
            self.flights.len(),
            if peers.is_empty() {
                "none".into()
            } else {
                peers.join(", ")
            }
        )
    }

    pub fn peer_rate_bps(&self, peer: MemberId) -> Option<f64> {
        self.peers.get(&peer).and_then(|p| p.rate.bps())
    }

    pub fn peer_ids(&self) -> impl Iterator<Item = MemberId> + '_ {
        self.peers.keys().copied()
    }

    /// A data neighbour appeared. Its holdings arrive with [`Self::peer_bitfield`] (and
    /// what it told us while it was not a neighbour counts at once).
    pub fn add_peer(&mut self, peer: MemberId, is_source: bool) {
        if self.peers.contains_key(&peer) {
            return;
        }
        let n = self.have.len();
        self.peers.insert(
            peer,
            Peer {
                have: ChunkSet::new(n),
                is_source,
                fresh_open: is_source,
                fresh_asked: Default::default(),
                fresh_early: Vec::new(),
                outstanding: 0,
                rate: RateEstimate::new(),
                measured_bps: None,
                bad_chunks: 0,
                hops: None,
                source_hops: None,
                avoids_source: false,
                ingress: None,
                rtt_s: None,
                coming: ChunkMap::default(),
                coming_beyond: ChunkMap::default(),
                sweep_beyond_at: 1024,
                on_probation: false,
                doubted: ChunkSet::new(n),
            },
        );
        if let Some(held) = self.dormant.remove(&peer) {
            self.peer_bitfield(peer, &held);
        }
    }

    /// A neighbour is no longer one: what it was sending is wanted again; what it holds is
    /// kept for when it is a neighbour again.
    pub fn remove_peer(&mut self, peer: MemberId) {
        let Some(p) = self.peers.remove(&peer) else {
            return;
        };
        for c in p.have.iter() {
            self.holders[c as usize] = self.holders[c as usize].saturating_sub(1);
        }
        self.flights.retain(|_, fl| {
            fl.retain(|f| f.peer != peer);
            !fl.is_empty()
        });
        let mut held = p.have;
        held.insert_all(&p.doubted);
        self.dormant.insert(peer, held);
    }

    /// Our connection to `peer` is gone: it is no neighbour, and what it held is forgotten
    /// (a new connection tells it again).
    pub fn forget_peer(&mut self, peer: MemberId) {
        self.remove_peer(peer);
        self.dormant.remove(&peer);
    }

    /// Holdings told by a member that is not a neighbour now.
    fn dormant_has(&mut self, peer: MemberId) -> &mut ChunkSet {
        let n = self.have.len();
        self.dormant.entry(peer).or_insert_with(|| ChunkSet::new(n))
    }

    pub fn peer_bitfield(&mut self, peer: MemberId, set: &ChunkSet) {
        let Some(p) = self.peers.get_mut(&peer) else {
            let held = self.dormant_has(peer);
            for c in set.iter() {
                held.insert(c);
            }
            return;
        };
        let from_source = p.is_source;
        for c in set.iter() {
            if p.have.insert(c) {
                self.holders[c as usize] += 1;
            }
        }
        if !from_source {
            for c in set.iter() {
                self.mark_seen(c, None);
            }
        }
    }

    /// Whether `peer` told this node it holds `chunk` (false when it is not a neighbour
    /// this node pulls from: then this node cannot tell).
    pub fn peer_holds(&self, peer: MemberId, chunk: ChunkId) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.have.contains(chunk))
    }

    pub fn peer_has(&mut self, peer: MemberId, chunk: ChunkId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            self.dormant_has(peer).insert(chunk);
            return;
        };
        p.coming.remove(&chunk);
        if p.have.insert(chunk) {
            self.holders[chunk as usize] += 1;
        }
        if !p.is_source {
            self.mark_seen(chunk, None);
        }
    }

    /// How many router hops away `peer` is (1: on-link).
    pub fn peer_distance(&mut self, peer: MemberId, hops: u8) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.hops = Some(hops);
        }
    }

    /// How many hops `peer` itself is from the source (it says so). With our own hops to
    /// both, tells whether the path to `peer` plausibly runs through the source.
    pub fn peer_source_distance(&mut self, peer: MemberId, hops: u8) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.source_hops = Some(hops);
        }
    }

    /// `peer` sits on a link of the source's and its route to us does not start at the
    /// source (the source hears every member's first hops): its data does not come
    /// through the source, even where the hop counts cannot tell (two paths of equal
    /// length, one through the source). Under shortest-path routing a route that passed
    /// through a neighbouring source later than at its first hop would be longer than one
    /// through it at once, so the first hop decides.
    pub fn peer_route_avoids_source(&mut self, peer: MemberId, avoids: bool) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.avoids_source = avoids;
        }
    }

    /// The link `peer`'s data arrives on (the interface of the route to it). Neighbours
    /// on different links do not share the path next to this node.
    pub fn peer_ingress(&mut self, peer: MemberId, link: u32) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.ingress = Some(link);
        }
    }

    /// `peer` announced it is fetching `chunk`: a farther neighbour should not be asked for
    /// it, since it will soon be available nearer (so it crosses a shared path once).
    pub fn peer_fetching(&mut self, peer: MemberId, chunk: ChunkId, now: f64) {
        // Only chunks of the file: what a peer says is fetching stays bounded by it.
        if chunk >= self.have.len() {
            return;
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            if !p.have.contains(chunk) {
                p.coming.insert(chunk, now);
            }
            if !p.is_source {
                self.mark_seen(chunk, Some((now, Some(peer))));
            }
        }
    }

    /// Of the chunks a neighbour says it is fetching, those to pass on to the other
    /// neighbours (as news of a fetch beyond them, [`Self::peer_fetching_beyond`]): the
    /// ones this node lacks, each once. Once is what matters (the first fetch into a group
    /// is the one others might repeat), and it bounds what a neighbour repeating its news
    /// can make this node send to everyone.
    pub fn pass_on_fetching(&mut self, chunks: &[ChunkId]) -> Vec<ChunkId> {
        chunks
            .iter()
            .copied()
            .filter(|&c| c < self.have.len() && !self.have.contains(c) && self.passed_on.insert(c))
            .collect()
    }

    /// `peer` relayed that one of its own neighbours is fetching `chunk`: the chunk will
    /// soon be near `peer`, so fetching it here from elsewhere may bring it into the same
    /// group twice. Counts only towards how rare the chunk is, never as a reason to wait.
    pub fn peer_fetching_beyond(&mut self, peer: MemberId, chunk: ChunkId, now: f64) {
        if chunk >= self.have.len() {
            return;
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            if !p.have.contains(chunk) {
                // Expired entries go in sweeps, so the map stays a few seconds' worth.
                if p.coming_beyond.len() >= p.sweep_beyond_at {
                    p.coming_beyond.retain(|_, &mut t| now - t < COMING_TTL_S);
                    p.sweep_beyond_at = (2 * p.coming_beyond.len()).max(1024);
                }
                p.coming_beyond.insert(chunk, now);
            }
        }
    }

    /// A rate measured outside the scheduler (link stats); used until deliveries give one.
    /// The least round trip to `peer` the transport has seen (seconds).
    pub fn peer_rtt(&mut self, peer: MemberId, rtt_s: f64) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.rtt_s = Some(rtt_s.clamp(0.0, 10.0));
        }
    }

    pub fn peer_measured_rate(&mut self, peer: MemberId, bps: f64) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.measured_bps = Some(bps);
        }
    }

    /// The source answered our oldest fresh request with these chunks.
    pub fn fresh_granted(&mut self, peer: MemberId, chunks: &[ChunkId], exhausted: bool, now: f64) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.fresh_asked.pop_front();
        if exhausted {
            p.fresh_open = false;
        }
        let mut coming = Vec::new();
        for &c in chunks {
            if let Some(i) = p.fresh_early.iter().position(|&e| e == c) {
                p.fresh_early.swap_remove(i);
            } else if c < self.have.len() && !self.have.contains(c) {
                coming.push(c);
            }
        }
        for c in coming {
            self.add_flight(peer, c, now);
        }
    }

    /// A chunk's stream from `peer` started. A fresh chunk may start before its grant.
    pub fn chunk_started(&mut self, peer: MemberId, chunk: ChunkId, now: f64) -> Arrival {
        if chunk >= self.have.len() || self.have.contains(chunk) {
            self.duplicates += 1;
            return Arrival::Reject;
        }
        if let Some(f) = self
            .flights
            .get_mut(&chunk)
            .and_then(|fl| fl.iter_mut().find(|f| f.peer == peer))
        {
            f.started = true;
            return Arrival::Accept;
        }
        match self.peers.get_mut(&peer) {
            Some(p) if !p.fresh_asked.is_empty() => {
                p.fresh_early.push(chunk);
                self.add_flight(peer, chunk, now);
                Arrival::Accept
            }
            _ => {
                self.duplicates += 1;
                Arrival::Reject
            }
        }
    }

    /// A chunk from `peer` finished arriving; `ok` says whether it verified.
    pub fn chunk_done(&mut self, peer: MemberId, chunk: ChunkId, ok: bool, now: f64) {
        let fl = self.flights.remove(&chunk).unwrap_or_default();
        let mut from_peer = false;
        for f in &fl {
            if f.peer == peer {
                from_peer = true;
            } else if ok {
                // The race is won: cancel the other copy.
                self.actions.push(Action::Cancel {
                    peer: f.peer,
                    chunk,
                });
                self.release(f.peer);
            }
        }
        if !ok {
            // Keep the other flights; this copy failed verification.
            let rest: Vec<Flight> = fl.into_iter().filter(|f| f.peer != peer).collect();
            if !rest.is_empty() {
                self.flights.insert(chunk, rest);
            }
        }
        // Measured before the release: a delivery that leaves the neighbour idle still
        // spans the time since it became busy.
        if let Some(p) = self.peers.get_mut(&peer) {
            if ok {
                p.rate.delivered(self.cfg.chunk_bytes, now, p.rtt_s);
                if std::mem::take(&mut p.on_probation) {
                    let doubted = std::mem::replace(&mut p.doubted, ChunkSet::new(self.have.len()));
                    for c in doubted.iter() {
                        if p.have.insert(c) {
                            self.holders[c as usize] += 1;
                        }
                    }
                }
            } else {
                p.bad_chunks += 1;
            }
        }
        if from_peer {
            self.release(peer);
        }
        if ok {
            self.deferred.remove(&chunk);
            self.mark_seen(chunk, None);
            if self.have.insert(chunk) {
                self.received += 1;
            } else {
                self.duplicates += 1;
            }
        }
    }

    /// `peer` says it does not hold `chunk` (any more).
    pub fn dont_have(&mut self, peer: MemberId, chunk: ChunkId) {
        self.chunk_broken(peer, chunk);
        if let Some(p) = self.peers.get_mut(&peer) {
            if p.have.remove(chunk) {
                self.holders[chunk as usize] = self.holders[chunk as usize].saturating_sub(1);
            }
        }
    }

    /// `chunk`'s stream from `peer` broke off (reset after a cancel, or its connection
    /// lost): its flight is gone and the chunk may be asked for again. Not a lie, so not
    /// counted against the sender (as a chunk that fails verification is).
    pub fn chunk_broken(&mut self, peer: MemberId, chunk: ChunkId) {
        let mut released = false;
        if let Some(fl) = self.flights.get_mut(&chunk) {
            let before = fl.len();
            fl.retain(|f| f.peer != peer);
            released = fl.len() < before;
            if fl.is_empty() {
                self.flights.remove(&chunk);
            }
        }
        if released {
            self.release(peer);
        }
    }

    /// Tells `peer` to stop sending `chunk` and drops its flight, so the chunk may be asked
    /// for again (anywhere).
    fn cancel_flight(&mut self, peer: MemberId, chunk: ChunkId) {
        self.actions.push(Action::Cancel { peer, chunk });
        self.chunk_broken(peer, chunk);
    }

    /// How many chunks from `peer` failed verification.
    pub fn bad_chunks(&self, peer: MemberId) -> u32 {
        self.peers.get(&peer).map_or(0, |p| p.bad_chunks)
    }

    /// `chunk` is now on its way from `peer`.
    fn add_flight(&mut self, peer: MemberId, chunk: ChunkId, now: f64) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.outstanding += 1;
            p.rate.became_busy(now);
        }
        self.mark_seen(chunk, Some((now, None)));
        self.next_flight_seq += 1;
        self.flights.entry(chunk).or_default().push(Flight {
            peer,
            since: now,
            asked_again: false,
            started: false,
            seq: self.next_flight_seq,
        });
    }

    fn release(&mut self, peer: MemberId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.outstanding = p.outstanding.saturating_sub(1);
            if p.in_use() == 0 {
                p.rate.became_idle();
            }
        }
    }

    /// `chunk` has left the source. A fetch (when, by whom) of one not seen before is, as
    /// far as this node can tell, a fresh chunk handed out by the source.
    fn mark_seen(&mut self, chunk: ChunkId, fetch: Option<(f64, Option<MemberId>)>) {
        if !self.seen.insert(chunk) {
            return;
        }
        if let Some(event) = fetch {
            self.fresh_log.push_back(event);
        }
    }

    /// Whether fresh chunks asked of the source `p` now would reach this node only after
    /// the source has handed out all the rest, while others receive theirs many times
    /// faster: the last fresh chunks would then wait on this node's slow path and hold up
    /// everyone (README, "Design notes"). Such a node leaves the source's
    /// last chunks to the faster receivers and gets them from its neighbours. Nobody stops
    /// for long: the average receiver is never starved, when none are left unseen the
    /// source's answer is that it has no more, and when fresh chunks stop leaving the
    /// source the time left looks endless again.
    /// Only a source behind a router: on a link of our own, what it sends us takes nothing
    /// from anyone, and a slow link of our own (not a crowded path) may be the very one
    /// that sets this node's time.
    fn too_slow_for_fresh(&mut self, p: MemberId, now: f64) -> bool {
        while self
            .fresh_log
            .front()
            .is_some_and(|&(t, _)| now - t > FRESH_WINDOW_S)
        {
            self.fresh_log.pop_front();
        }
        let peer = &self.peers[&p];
        let behind_router = peer.hops.is_some_and(|h| h > 1);
        if !behind_router || self.seen.is_full() || self.fresh_log.is_empty() {
            return false;
        }
        let Some(bps) = peer.rate.bps() else {
            return false;
        };
        let mut receivers: Vec<Option<MemberId>> = self.fresh_log.iter().map(|&(_, q)| q).collect();
        receivers.sort_unstable();
        receivers.dedup();
        let handed_out = self.fresh_log.len() as f64 / FRESH_WINDOW_S;
        let mine = bps / 8.0 / self.cfg.chunk_bytes as f64;
        if mine >= STARVED_SHARE * handed_out / receivers.len() as f64 {
            return false;
        }
        let unseen = (self.seen.len() - self.seen.count()) as f64;
        let source_done_in = unseen / handed_out;
        let arrives_in = peer.chunk_time_s(&self.cfg) * (peer.in_use() + 1) as f64;
        2.0 * arrives_in > source_done_in
    }

    /// Whether the source `p` still hands out fresh chunks, as far as this node can tell:
    /// it has not said it has none left while some chunk has not been seen leaving it, or
    /// a chunk was seen leaving it for the first time within [`FRESH_WINDOW_S`] (the
    /// last ones take that long to clear its uplink).
    fn source_hands_out_fresh(&self, p: &Peer, now: f64) -> bool {
        (p.fresh_open && !self.seen.is_full())
            || self
                .fresh_log
                .back()
                .is_some_and(|&(t, _)| now - t < FRESH_WINDOW_S)
    }

    /// Decides what to request now. Call after every event.
    pub fn poll(&mut self, now: f64) -> Vec<Action> {
        if self.have.is_full() {
            return std::mem::take(&mut self.actions);
        }
        // Nearer neighbours choose first, then faster ones.
        let mut order: Vec<(MemberId, u8, f64)> = self
            .peers
            .iter()
            .map(|(&id, p)| (id, p.hops.unwrap_or(0), p.rate_bps(&self.cfg)))
            .collect();
        order.sort_by(|a, b| a.1.cmp(&b.1).then(b.2.total_cmp(&a.2)).then(a.0.cmp(&b.0)));
        let order: Vec<(MemberId, f64)> = order.into_iter().map(|(id, _, r)| (id, r)).collect();
        // Chunks held or in flight: never candidates outside the end game.
        let mut taken = self.have.clone();
        for &c in self.flights.keys() {
            taken.insert(c);
        }
        for &(id, _) in &order {
            let cfg = self.cfg.clone();
            let p = &self.peers[&id];
            let budget = p.budget(&cfg);
            let mut spare = budget.saturating_sub(p.in_use());
            if spare == 0 {
                continue;
            }
            if p.fresh_open {
                if self.too_slow_for_fresh(id, now) {
                    continue;
                }
                let p = self.peers.get_mut(&id).unwrap();
                p.fresh_asked.push_back(spare);
                p.rate.became_busy(now);
                self.actions.push(Action::RequestFresh {
                    peer: id,
                    count: spare,
                });
                continue;
            }
            let (mut picks, deferred) = self.rarest_candidates(id, spare as usize, &taken, now);
            for c in deferred {
                self.deferred.entry(c).or_insert(now);
            }
            spare -= picks.len() as u32;
            if spare > 0 && self.flights.len() + picks.len() >= self.wanted() {
                picks.extend(self.endgame_candidates(id, spare as usize, now));
            }
            if picks.is_empty() {
                continue;
            }
            for &c in &picks {
                self.add_flight(id, c, now);
                taken.insert(c);
            }
            self.actions.push(Action::Request {
                peer: id,
                chunks: picks,
            });
        }
        // Flights are looked over every STALL_SCAN_S, not at every poll.
        if now >= self.next_stall_scan_s {
            self.next_stall_scan_s = now + STALL_SCAN_S;
            self.trim_excess_requests();
            self.move_queued_flights_nearer(now);
            self.re_request_stalled(now);
        }
        std::mem::take(&mut self.actions)
    }

    /// Chunks in flight far longer than their sender should take (see [`STALL_MIN_S`]).
    /// Held by someone else too, such a chunk is cancelled with its sender and left to
    /// them: no chunk waits on one neighbour while another could send it. The sender then
    /// counts as holding nothing it has not delivered or announced since, except what no
    /// other neighbour holds (see [`Puller::count_doubted_only_copies`]), and gets one
    /// request at a time until it delivers (a neighbour that claims chunks and never sends
    /// them, or has lost its way, must not hold back more). A chunk only its sender holds
    /// (or one from the source, which holds every chunk and lies about none) is asked of it
    /// again, the flight's place kept; if the first copy was merely slow, the second is
    /// refused on arrival.
    fn re_request_stalled(&mut self, now: f64) {
        let mut again: BTreeMap<MemberId, Vec<ChunkId>> = BTreeMap::new();
        let mut stalled: Vec<(MemberId, ChunkId)> = Vec::new();
        // A chunk raced from two neighbours has its remedy already.
        for (&c, fl) in self.flights.iter_mut().filter(|(_, fl)| fl.len() == 1) {
            let f = &mut fl[0];
            let Some(p) = self.peers.get(&f.peer) else {
                continue;
            };
            if now - f.since <= p.stall_after_s(&self.cfg) {
                continue;
            }
            let elsewhere = self
                .peers
                .iter()
                .any(|(&q, qp)| q != f.peer && qp.have.contains(c));
            if elsewhere && !p.is_source {
                stalled.push((f.peer, c));
            } else {
                f.since = now;
                f.asked_again = true;
                again.entry(f.peer).or_default().push(c);
            }
        }
        for (peer, mut chunks) in again {
            chunks.sort_unstable();
            self.actions.push(Action::Request { peer, chunks });
        }
        for (peer, chunk) in stalled {
            self.cancel_flight(peer, chunk);
            if let Some(p) = self.peers.get_mut(&peer) {
                p.on_probation = true;
                for c in p.have.iter() {
                    self.holders[c as usize] = self.holders[c as usize].saturating_sub(1);
                }
                let held = std::mem::replace(&mut p.have, ChunkSet::new(self.have.len()));
                p.doubted.insert_all(&held);
            }
        }
        self.count_doubted_only_copies();
    }

    /// Unstarted requests a neighbour holds beyond [`TRIM_ABOVE_BUDGETS`] times its
    /// pipeline, as its rate reads now, are cancelled, last asked first, down to that many:
    /// they were asked on a rate that has since fallen, and would wait in its queue while
    /// others could bring them (random-702 with 20 ms per link: 55 chunks asked of one
    /// neighbour 3 s in came at 0.35 Mbit/s over 40 s, a fifth of them after another
    /// member behind the same narrow link had brought them in). They become candidates
    /// again, this neighbour's too once its pipeline has room. Not the source's flights: it
    /// holds every chunk and hands out fresh ones by its own count.
    fn trim_excess_requests(&mut self) {
        let excess: BTreeMap<MemberId, usize> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.is_source)
            .filter_map(|(&id, p)| {
                let n = p
                    .outstanding
                    .saturating_sub(TRIM_ABOVE_BUDGETS * p.budget(&self.cfg));
                (n > 0).then_some((id, n as usize))
            })
            .collect();
        if excess.is_empty() {
            return;
        }
        let mut unstarted: BTreeMap<MemberId, Vec<(u64, ChunkId)>> = BTreeMap::new();
        for (&c, fl) in self.flights.iter() {
            for f in fl
                .iter()
                .filter(|f| !f.started && excess.contains_key(&f.peer))
            {
                unstarted.entry(f.peer).or_default().push((f.seq, c));
            }
        }
        for (id, mut flights) in unstarted {
            flights.sort_unstable_by(|a, b| b.cmp(a));
            for &(_, c) in flights.iter().take(excess[&id]) {
                self.cancel_flight(id, c);
            }
        }
    }

    /// A chunk asked of a far neighbour (through routers) that still waits unstarted in its
    /// queue after [`MOVE_QUEUED_AFTER_S`], while a nearer neighbour on another link of
    /// ours now holds it, is cancelled there and asked of the nearer one (the
    /// soonest to deliver; up to twice its pipeline). The far path often is a group's
    /// narrow way in, shared with its other members: its place in that sender's queue goes
    /// to a chunk nobody nearer holds, so what enters the group enters once (random-702: a
    /// chunk waited 12.6 s in a far queue while a neighbour one link away had held it for
    /// 12 s). Only unstarted flights: a started one costs the path either way. Not to a
    /// nearer neighbour on the far one's link: it shares that way in, where the flight's
    /// first bytes may already wait in a queue "unstarted" (on the testbed with 20 ms per
    /// link, 62 such streams were refused on arrival in one run of random-702, after their
    /// first bytes had crossed its 8 Mbit/s way in).
    fn move_queued_flights_nearer(&mut self, now: f64) {
        let mut added: BTreeMap<MemberId, Vec<ChunkId>> = BTreeMap::new();
        let mut moved: Vec<(ChunkId, MemberId)> = Vec::new();
        for (&c, fl) in self.flights.iter().filter(|(_, fl)| fl.len() == 1) {
            let f = &fl[0];
            let far = match self.peers.get(&f.peer) {
                Some(p) if !p.is_source => p.hops.filter(|&h| h > 1).map(|h| (h, p)),
                _ => None,
            };
            let (Some((h, far)), false) = (far, f.started || now - f.since < MOVE_QUEUED_AFTER_S)
            else {
                continue;
            };
            let room = |id: &MemberId, q: &Peer| {
                let more = added.get(id).map_or(0, |v| v.len()) as u32;
                q.in_use() + more < 2 * q.budget(&self.cfg)
            };
            let nearer = self
                .peers
                .iter()
                .filter(|(id, q)| {
                    !q.is_source
                        && !q.on_probation
                        && q.hops.is_some_and(|qh| qh < h)
                        && !q.shares_path_with(far)
                        && q.have.contains(c)
                        && room(id, q)
                })
                .min_by(|a, b| {
                    let soon = |q: &Peer| q.expected_delivery_s(&self.cfg);
                    soon(a.1).total_cmp(&soon(b.1))
                });
            if let Some((&q, _)) = nearer {
                moved.push((c, f.peer));
                added.entry(q).or_default().push(c);
            }
        }
        for (c, from) in moved {
            self.cancel_flight(from, c);
        }
        for (peer, chunks) in added {
            for &c in &chunks {
                self.add_flight(peer, c, now);
            }
            self.actions.push(Action::Request { peer, chunks });
        }
    }

    /// A chunk this node lacks that no neighbour is counted as holding, while one on
    /// probation held it, counts as that one's again: probation limits what a neighbour
    /// may hold back, it must not leave a chunk with nobody to ask (a neighbour that
    /// announced everything before it stalled announces nothing more).
    fn count_doubted_only_copies(&mut self) {
        for p in self.peers.values_mut().filter(|p| p.on_probation) {
            let only_copies: Vec<ChunkId> = p
                .doubted
                .iter_without(&self.have)
                .filter(|&c| self.holders[c as usize] == 0 && !self.flights.contains_key(&c))
                .collect();
            for c in only_copies {
                p.doubted.remove(c);
                if p.have.insert(c) {
                    self.holders[c as usize] += 1;
                }
            }
        }
    }

    fn wanted(&self) -> usize {
        (self.have.len() - self.have.count()) as usize
    }

    /// The neighbours strictly nearer than `p` along the path they share with it (fewer
    /// router hops, same link next to this node). The source is never among them, never a
    /// reason to wait: it holds everything, and behind a router it is asked only for what
    /// nobody else holds (no deadlock).
    fn nearer_on_path(&self, p: &Peer) -> Vec<MemberId> {
        let Some(h) = p.hops else {
            return Vec::new();
        };
        self.peers
            .iter()
            .filter(|(_, q)| {
                !q.is_source && q.hops.is_some_and(|qh| qh < h) && q.shares_path_with(p)
            })
            .map(|(&id, _)| id)
            .collect()
    }

    /// The group among which one member is designated to fetch each chunk from `p`
    /// ([`group_place`]): the neighbours nearer than `p` on the path they share with it
    /// (`nearer_on_path`, from [`Self::nearer_on_path`]) and, when `p` is the source, those as far from this node
    /// as the source is, on the same link, that are no nearer the source than this node:
    /// two members behind the same router, the same distance from the source, each see
    /// the other as no nearer, and would otherwise both ask it for the same chunks. (One
    /// that says it is nearer the source than we are may sit on the source's side.)
    fn fetch_group(&self, p: &Peer, nearer_on_path: &[MemberId]) -> Vec<MemberId> {
        let mut group = nearer_on_path.to_vec();
        if let (true, Some(h)) = (p.is_source, p.hops) {
            group.extend(
                self.peers
                    .iter()
                    .filter(|(_, q)| {
                        !q.is_source
                            && q.hops == Some(h)
                            && q.source_hops.is_some_and(|qs| qs >= h)
                            && q.shares_path_with(p)
                    })
                    .map(|(&id, _)| id),
            );
        }
        group
    }

    /// Who among this node's group for the far neighbour `p` fetches each chunk from it
    /// first ([`Designation`]); `nearer_ids` as [`Self::nearer_on_path`] gives them, and
    /// `source_behind_router` whether the source is reached through routers.
    fn designation(
        &self,
        p: &Peer,
        nearer_ids: &[MemberId],
        source_behind_router: bool,
    ) -> Designation<'_> {
        let group = self.fetch_group(p, nearer_ids);
        // Each place waits long enough to hear that an earlier one fetches the chunk: that
        // news takes half a round trip from another member of the group, so on long paths
        // the wait is counted in their round trips.
        let defer_s = group
            .iter()
            .filter_map(|id| self.peers[id].rtt_s)
            .fold(self.cfg.far_defer_s, |d, rtt| d.max(FAR_DEFER_RTTS * rtt));
        Designation {
            me: self.cfg.member,
            group,
            defer_s,
            // The source is never waited for: asked only by rank.
            waits: !p.is_source && self.cfg.far_defer_s > 0.0,
            // A source on a link of our own costs nobody else: no group shares it.
            ranks: !p.is_source || source_behind_router,
            deferred_since: &self.deferred,
        }
    }

    /// Up to `k` chunks `peer` holds that are not `taken` (held or in flight), rarest first
    /// (ties: in an order of this node's own, see [`SchedConfig::member`]). Chunks a
    /// strictly nearer neighbour holds or is fetching are left to it; those designated to
    /// another member of this node's group for `peer` ([`Self::fetch_group`]) rank after
    /// its own ([`DESIGNATED_RANK`]).
    /// Also returns the chunks held back because another node is designated to fetch
    /// them from afar.
    fn rarest_candidates(
        &self,
        peer: MemberId,
        k: usize,
        taken: &ChunkSet,
        now: f64,
    ) -> (Vec<ChunkId>, Vec<ChunkId>) {
        let p = &self.peers[&peer];
        // How far the source is, when it is reached through routers.
        let source = self.peers.values().find(|q| q.is_source);
        let source_hops = source.and_then(|q| q.hops).filter(|&h| h > 1);
        let via_source = |q: &Peer| q.lies_beyond_source(source_hops);
        if source.is_some_and(|s| s.shares_path_with(p)) && via_source(p) {
            return (Vec::new(), Vec::new());
        }
        let nearer_ids = self.nearer_on_path(p);
        let nearer: Vec<&Peer> = nearer_ids.iter().map(|id| &self.peers[id]).collect();
        let designation = self.designation(p, &nearer_ids, source_hops.is_some());
        let mut deferred = Vec::new();
        // What a nearer neighbour holds is left to it, as what it is fetching (below), but
        // only as much as it can hand over soon (see [`NEARER_BACKLOG_S`]).
        let mut skip = taken.clone();
        for q in &nearer {
            let backlog_s = q.have.count_without(taken) as f64 * q.chunk_time_s(&self.cfg);
            if backlog_s <= NEARER_BACKLOG_S {
                skip.insert_all(&q.have);
            }
        }
        // A nearer neighbour's claim holds as long as a fetch over this path takes.
        let claim_s = COMING_TTL_S.max(CLAIM_PIPELINES * p.expected_delivery_s(&self.cfg));
        let left_to_nearer = |c: ChunkId| nearer.iter().any(|q| q.claims_within(c, now, claim_s));
        // A source behind a router sits on a path shared with everyone behind it, and its
        // uplink is often the min-cut. While it still hands out fresh chunks, each chunk
        // must cross that uplink once before any crosses it twice: ask it only for chunks
        // no other neighbour holds or is fetching. Once it has handed out the last one,
        // its uplink carries nothing new and would idle while others lack data (work
        // conservation): it is asked like any neighbour, except for what a neighbour is
        // fetching (the last fresh chunks, still on their way up that uplink).
        // (A source on a link of our own costs nobody else: use it freely.)
        // Neighbours reached through the source do not count: their copy would come back
        // over the source's own links.
        let spare_the_source = p.is_source && source_hops.is_some();
        let source_hands_out = spare_the_source && self.source_hands_out_fresh(p, now);
        let held_elsewhere = |c: ChunkId| {
            spare_the_source
                && self.peers.iter().any(|(&id, q)| {
                    id != peer
                        && !via_source(q)
                        && (q.is_fetching(c, now) || (source_hands_out && q.have.contains(c)))
                })
        };
        let salt = self.cfg.member as u64;
        let mut cands: Vec<(u16, u32, ChunkId)> = p
            .have
            .iter_without(&skip)
            .take_while(|&c| c < self.verifiable)
            .filter(|&c| !left_to_nearer(c) && !held_elsewhere(c))
            .filter_map(|c| {
                let place = designation.place(c);
                if designation.holds_back(c, place, now, &mut deferred) {
                    return None;
                }
                Some((
                    self.holders[c as usize] + designation.rank(place),
                    tie_rank(salt, c),
                    c,
                ))
            })
            .collect();
        (self.rarest_of(&mut cands, k, p.ingress, now), deferred)
    }

    /// The `k` best of `cands` (holders, tie, id) for a neighbour on link `ingress`,
    /// ranked by (holders + fetching, fetching beyond, tie, id). The last three count
    /// announcements (map lookups over every neighbour), so candidates are taken in the
    /// order of a lower bound, (holders, 0, tie, id), and ranked exactly only until the k
    /// best so far all rank below the next one's bound.
    fn rarest_of(
        &self,
        cands: &mut [(u16, u32, ChunkId)],
        k: usize,
        ingress: Option<u32>,
        now: f64,
    ) -> Vec<ChunkId> {
        let on_other_link = |q: &Peer| matches!((q.ingress, ingress), (Some(a), Some(b)) if a != b);
        // Usually the loop below stops within a few candidates of the k-th: only a head of
        // them is put in order, the rest if it runs past it (sorting every candidate at
        // every poll was a sixth of `poll` at 1 Gbit/s, 16,384 chunks).
        let head = cands.len().min(4 * k + 16);
        if head < cands.len() {
            cands.select_nth_unstable(head);
        }
        cands[..head].sort_unstable();
        let mut best: Vec<(u16, u16, u32, ChunkId)> = Vec::with_capacity(k + 1);
        for i in 0..cands.len() {
            if i == head {
                cands[head..].sort_unstable();
            }
            let (holders, tie, c) = cands[i];
            if best.len() == k
                && best
                    .last()
                    .is_some_and(|&worst| (holders, 0, tie, c) > worst)
            {
                break;
            }
            // A chunk a neighbour is fetching will soon be held there: count it, so that
            // what enters a group of nodes from outside is not the same twice.
            let soon = self
                .peers
                .values()
                .filter(|q| q.is_fetching(c, now))
                .count() as u16;
            // Among equally rare chunks, first those not on their way to a neighbour's
            // neighbour on another link: two members that are not neighbours of each other,
            // on two paths into the same group, would otherwise each bring in the same one.
            // Only news from other links counts: what comes over this one says nothing about
            // what only this one can bring, and members behind the same link hear the same
            // news (it would make them choose alike).
            let beyond = self
                .peers
                .values()
                .filter(|q| on_other_link(q) && q.hears_fetching(c, now))
                .count() as u16;
            let key = (holders + soon, beyond, tie, c);
            let at = best.partition_point(|&b| b < key);
            best.insert(at, key);
            best.truncate(k);
        }
        best.into_iter().map(|(_, _, _, c)| c).collect()
    }

    /// End game: chunks in flight from a slower neighbour for longer than expected, that
    /// `peer` holds and could deliver sooner. At most two copies of a chunk are in flight.
    fn endgame_candidates(&self, peer: MemberId, k: usize, now: f64) -> Vec<ChunkId> {
        let me = &self.peers[&peer];
        let my_time = me.chunk_time_s(&self.cfg) * (me.in_use() + 1) as f64;
        let mut late: Vec<(f64, ChunkId)> = self
            .flights
            .iter()
            .filter(|(c, fl)| fl.len() == 1 && fl[0].peer != peer && me.have.contains(**c))
            .filter_map(|(&c, fl)| {
                let other = self.peers.get(&fl[0].peer)?;
                let expected = other.expected_delivery_s(&self.cfg);
                let age = now - fl[0].since;
                let remaining = (expected - age).max(0.0);
                let stuck = age > self.cfg.endgame_slowness * expected;
                (stuck || remaining > 2.0 * my_time).then_some((age, c))
            })
            .collect();
        late.sort_by(|a, b| b.0.total_cmp(&a.0));
        late.into_iter().take(k).map(|(_, c)| c).collect()
    }
}

/// Which member of a group fetches a chunk from a far neighbour first, as one node sees it
/// for that neighbour (see [`SchedConfig::far_defer_s`] and [`DESIGNATED_RANK`]).
struct Designation<'a> {
    me: MemberId,
    /// The other members ([`Puller::fetch_group`]); empty: this node fetches everything.
    group: Vec<MemberId>,
    /// How long each place after the first waits for a chunk designated elsewhere.
    defer_s: f64,
    /// Whether a chunk designated elsewhere waits at all, or only ranks after ours.
    waits: bool,
    /// Whether a chunk designated elsewhere ranks after ours.
    ranks: bool,
    /// When each chunk was first held back ([`Puller::deferred`]).
    deferred_since: &'a ChunkMap<f64>,
}

impl Designation<'_> {
    /// This node's place in the group's order for `c` (0: it fetches `c` first).
    fn place(&self, c: ChunkId) -> usize {
        if self.group.is_empty() {
            0
        } else {
            group_place(self.me, &self.group, c)
        }
    }

    /// Whether `c`, at `place`, is still left to an earlier member: for its place's share
    /// of the wait, counted from when it was first held back (chunks held back for the
    /// first time are added to `deferred`).
    fn holds_back(&self, c: ChunkId, place: usize, now: f64, deferred: &mut Vec<ChunkId>) -> bool {
        if place == 0 || !self.waits {
            return false;
        }
        match self.deferred_since.get(&c) {
            Some(&since) => now - since < self.defer_s * place as f64,
            None => {
                deferred.push(c);
                true
            }
        }
    }

    /// How many holders more `c` counts as, at `place`.
    fn rank(&self, place: usize) -> u16 {
        if self.ranks {
            DESIGNATED_RANK.min(place as u16)
        } else {
            0
        }
    }
}

/// Member `me`'s place, among itself and `group`, in the order all of them compute alike
/// for chunk `c` (at most [`MAX_DEFER_PLACE`]): the first fetches it at once, the others
/// one after the other, `far_defer_s` apart, so that when the first is too busy to fetch
/// it, one (not all) of the rest does.
fn group_place(me: MemberId, group: &[MemberId], c: ChunkId) -> usize {
    let mine = tie_rank(me as u64 + 1, c);
    group
        .iter()
        .filter(|&&q| tie_rank(q as u64 + 1, c) < mine)
        .count()
        .min(MAX_DEFER_PLACE)
}

/// A node's own order of chunks: a mix of the salt and the id (salt 0: id order).
///
/// Two members' orders must be independent of each other: members that pick from the same
/// equally rare chunks at once (two ways into one group, each hearing of the other's picks
/// only when the news has crossed the group) otherwise pick the same ones in the same
/// order. The mix is splitmix64's finalizer, in which every bit of salt and id moves every
/// bit of the result. The mix before (the id XORed into a multiple of the salt, then one
/// multiply) gave some pairs of salts nearly one order of ids, one the other's rotated:
/// the first 32 of 512 chunks in two members' orders shared up to 16 (2 expected). Members
/// 2 and 6 of random-1102 asked two different senders for the same chunks in the same
/// sequence; with 20 ms per link 126 of its 512 chunks came into their group both ways
/// (simulator: 1.295 x U_min, 1.079 with this).
fn tie_rank(salt: u64, c: ChunkId) -> u32 {
    if salt == 0 {
        return c;
    }
    let mut x = salt
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((x ^ (x >> 31)) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FreshServer;

    #[test]
    fn requests_outstanding_hold_at_most_4_mib_per_neighbour_in_2_to_64_chunks() {
        let most = |chunk: u64| SchedConfig::new(chunk).max_outstanding;
        assert_eq!(most(4 << 10), 64);
        assert_eq!(most(64 << 10), 64);
        assert_eq!(most(256 << 10), 16);
        assert_eq!(most(1 << 20), 4);
        assert_eq!(most(64 << 20), 2);
    }

    fn cfg() -> SchedConfig {
        SchedConfig::new(1000)
    }

    #[test]
    fn a_broken_stream_is_asked_again_without_a_mark_against_its_sender() {
        let mut p = Puller::new(cfg(), ChunkSet::new(4));
        p.add_peer(1, false);
        p.peer_bitfield(1, &ChunkSet::full(4));
        let asked: Vec<ChunkId> = match &p.poll(0.0)[..] {
            [Action::Request { peer: 1, chunks }] => chunks.clone(),
            a => panic!("{a:?}"),
        };
        for _ in 0..5 {
            p.chunk_broken(1, asked[0]);
        }
        assert_eq!(p.bad_chunks(1), 0);
        let again = p.poll(0.1);
        assert!(
            again.iter().any(
                |a| matches!(a, Action::Request { peer: 1, chunks } if chunks.contains(&asked[0]))
            ),
            "{again:?}"
        );
    }

    #[test]
    fn a_fresh_chunk_that_fails_is_asked_of_the_source_again() {
        let mut p = Puller::new(cfg(), ChunkSet::new(4));
        p.add_peer(0, true);
        p.peer_bitfield(0, &ChunkSet::full(4));
        let _ = p.poll(0.0);
        p.fresh_granted(0, &[0, 1], false, 0.1);
        p.chunk_done(0, 0, false, 0.2);
        p.chunk_done(0, 1, true, 0.2);
        let mut asked = Vec::new();
        for i in 0..20 {
            let t = 0.3 + i as f64;
            for a in p.poll(t) {
                match a {
                    Action::Request { chunks, .. } => {
                        for c in chunks {
                            asked.push(c);
                            p.chunk_done(0, c, true, t + 0.1);
                        }
                    }
                    Action::RequestFresh { .. } => {
                        let rest: Vec<ChunkId> =
                            (2..4).filter(|c| !p.have().contains(*c)).collect();
                        p.fresh_granted(0, &rest, true, t);
                        for c in rest {
                            p.chunk_done(0, c, true, t + 0.1);
                        }
                    }
                    _ => {}
                }
            }
        }
        assert!(p.is_complete(), "asked again: {asked:?}");
    }

    #[test]
    fn asks_the_source_for_fresh_chunks_then_explicitly() {
        let mut p = Puller::new(cfg(), ChunkSet::new(4));
        p.add_peer(0, true);
        let a = p.poll(0.0);
        assert!(matches!(a[..], [Action::RequestFresh { peer: 0, count }] if count >= 2));
        // The chunk may start before its grant arrives, or after.
        assert_eq!(p.chunk_started(0, 2, 0.1), Arrival::Accept);
        p.fresh_granted(0, &[2, 3], true, 0.15);
        assert_eq!(p.chunk_started(0, 3, 0.16), Arrival::Accept);
        p.chunk_done(0, 2, true, 0.2);
        p.chunk_done(0, 3, true, 0.2);
        p.peer_bitfield(0, &ChunkSet::full(4));
        let a = p.poll(0.3);
        let Action::Request { peer: 0, chunks } = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!(chunks, &vec![0, 1]);
        assert_eq!(p.duplicates, 0);
        // An unrequested chunk is refused.
        assert_eq!(p.chunk_started(0, 2, 0.4), Arrival::Reject);
    }

    #[test]
    fn only_chunks_whose_hashes_are_known_are_requested() {
        let mut p = Puller::new(SchedConfig::new(128 << 10), ChunkSet::new(100));
        p.set_verifiable(10);
        p.add_peer(1, false);
        p.peer_bitfield(1, &ChunkSet::full(100));
        let asked = |a: Vec<Action>| -> Vec<ChunkId> {
            a.into_iter()
                .flat_map(|a| match a {
                    Action::Request { chunks, .. } => chunks,
                    _ => Vec::new(),
                })
                .collect()
        };
        // Until more hashes are known, all it asks for are the first ten, each once.
        let mut t = 0.0;
        let mut all = Vec::new();
        loop {
            let got = asked(p.poll(t));
            if got.is_empty() {
                break;
            }
            for &c in &got {
                p.chunk_done(1, c, true, t + 0.01);
            }
            all.extend(got);
            t += 0.1;
        }
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        p.set_verifiable(100);
        let more = asked(p.poll(t));
        assert!(
            !more.is_empty() && more.iter().all(|&c| c >= 10),
            "{more:?}"
        );
    }

    #[test]
    fn never_requests_a_chunk_twice_outside_the_end_game() {
        let mut p = Puller::new(SchedConfig::new(128 << 10), ChunkSet::new(100));
        for peer in 1..=3 {
            p.add_peer(peer, false);
            p.peer_bitfield(peer, &ChunkSet::full(100));
        }
        let mut seen = std::collections::HashSet::new();
        for a in p.poll(0.0) {
            let Action::Request { chunks, .. } = a else {
                panic!()
            };
            for c in chunks {
                assert!(seen.insert(c), "chunk {c} requested twice");
            }
        }
        assert!(seen.len() >= 6);
    }

    #[test]
    fn members_order_equally_rare_chunks_independently() {
        // The first 32 of 512 chunks in two members' orders: 2 in common expected at
        // random, 16 for the worst pair of the mix this replaced.
        let first = |salt: u64| {
            let mut order: Vec<ChunkId> = (0..512).collect();
            order.sort_by_key(|&c| tie_rank(salt, c));
            let mut set = ChunkSet::new(512);
            for &c in &order[..32] {
                set.insert(c);
            }
            set
        };
        let firsts: Vec<ChunkSet> = (1..=33).map(first).collect();
        for (a, fa) in firsts.iter().enumerate() {
            for (b, fb) in firsts.iter().enumerate().skip(a + 1) {
                let common = fa.iter().filter(|&c| fb.contains(c)).count();
                assert!(
                    common <= 8,
                    "salts {} and {}: {common} in common",
                    a + 1,
                    b + 1
                );
            }
        }
    }

    #[test]
    fn of_equally_rare_chunks_one_coming_to_a_neighbours_neighbour_is_asked_last() {
        // A neighbour holds chunks 0-3, equally rare; another neighbour, on another link,
        // says a member beyond it is fetching 0-2 (random-30: two entries into one group
        // that cannot see each other). With room for one request at a time, chunk 3 goes
        // first.
        let mut cfg = cfg();
        cfg.min_outstanding = 1;
        cfg.max_outstanding = 1;
        let mut p = Puller::new(cfg, ChunkSet::new(4));
        p.add_peer(1, false);
        p.add_peer(2, false);
        p.peer_bitfield(1, &ChunkSet::full(4));
        for c in [0, 1, 2, 9] {
            p.peer_fetching_beyond(2, c, 0.0);
        }
        let ask = |chunks: Vec<ChunkId>| vec![Action::Request { peer: 1, chunks }];
        // Behind the same link, the news says nothing about this link: rarity and the
        // node's own order decide (here chunk 0 first).
        p.peer_ingress(1, 7);
        p.peer_ingress(2, 7);
        let mut same_link = p.clone();
        assert_eq!(same_link.poll(0.0), ask(vec![0]));
        p.peer_ingress(2, 8);
        assert_eq!(p.poll(0.0), ask(vec![3]));
        // It is news of a fetch, not a holding: once it is old, rarity alone orders them
        // (and nothing waits for the member beyond).
        p.chunk_done(1, 3, true, 0.1);
        // What this node passes on of a neighbour's Fetching: chunks it lacks, each once
        // (a neighbour repeating itself cannot make it repeat to everyone).
        assert_eq!(p.pass_on_fetching(&[0, 3, 9, 1]), vec![0, 1]);
        assert_eq!(p.pass_on_fetching(&[0, 1, 2]), vec![2]);
        let a = p.poll(0.1);
        assert!(matches!(&a[..], [Action::Request { peer: 1, chunks }] if chunks.len() == 1));
    }

    #[test]
    fn what_a_non_neighbour_told_counts_once_it_is_a_neighbour() {
        let mut p = Puller::new(cfg(), ChunkSet::new(4));
        // Member 3 announces before it is a neighbour (its connection came up first).
        p.peer_has(3, 1);
        p.peer_bitfield(3, &ChunkSet::from_bytes(4, &[0b0100]));
        assert!(p.poll(0.0).is_empty());
        let asks_for_what_it_told = vec![Action::Request {
            peer: 3,
            chunks: vec![1, 2],
        }];
        p.add_peer(3, false);
        assert_eq!(p.poll(0.0), asks_for_what_it_told);
        // No longer a neighbour, then one again: its holdings are kept, its flights not.
        p.remove_peer(3);
        p.add_peer(3, false);
        assert_eq!(p.poll(0.1), asks_for_what_it_told);
        // Its connection is gone: a new one starts from what it tells again.
        p.forget_peer(3);
        p.add_peer(3, false);
        assert!(p.poll(0.2).is_empty());
    }

    #[test]
    fn what_a_neighbour_said_it_holds_is_known_only_of_neighbours_pulled_from() {
        let mut p = Puller::new(cfg(), ChunkSet::new(4));
        p.add_peer(1, false);
        p.peer_has(1, 2);
        assert!(p.peer_holds(1, 2));
        assert!(!p.peer_holds(1, 3));
        // A member this node does not pull from: what it said is kept for later, but news
        // still goes to it (nothing says it holds the chunk).
        p.peer_has(7, 2);
        assert!(!p.peer_holds(7, 2));
        p.remove_peer(1);
        assert!(!p.peer_holds(1, 2));
    }

    #[test]
    fn requests_asked_on_a_rate_that_has_since_fallen_are_trimmed_last_asked_first() {
        let mut p = Puller::new(cfg(), ChunkSet::new(64));
        p.add_peer(1, false);
        p.peer_bitfield(1, &ChunkSet::full(64));
        p.peer_measured_rate(1, 100e6);
        let asked = asked_of(p.poll(0.0), 1);
        assert!(asked.len() > 8, "{asked:?}");
        // Its rate reads a hundredth now: what it holds beyond twice its pipeline goes.
        p.peer_measured_rate(1, 1e6);
        let keep = (TRIM_ABOVE_BUDGETS * p.peers[&1].budget(&p.cfg)) as usize;
        let mut cancelled: Vec<ChunkId> = p
            .poll(1.0)
            .into_iter()
            .filter_map(|a| match a {
                Action::Cancel { peer: 1, chunk } => Some(chunk),
                _ => None,
            })
            .collect();
        // All equally rare, and member 0 breaks ties by id: asked in id order.
        let mut last_asked = asked[keep..].to_vec();
        last_asked.sort_unstable();
        cancelled.sort_unstable();
        assert_eq!(cancelled, last_asked);
        assert_eq!(p.in_flight(), keep);
        // Within twice its pipeline, nothing more is cancelled.
        assert!(!p
            .poll(2.0)
            .iter()
            .any(|a| matches!(a, Action::Cancel { .. })));
    }

    #[test]
    fn rarest_first_and_peer_loss_requeues() {
        let mut config = cfg();
        config.max_outstanding = 2;
        let mut p = Puller::new(config, ChunkSet::new(3));
        p.add_peer(1, false);
        p.add_peer(2, false);
        p.peer_bitfield(1, &ChunkSet::full(3));
        let mut only_c2 = ChunkSet::new(3);
        only_c2.insert(2);
        p.peer_bitfield(2, &only_c2);
        // Peer 1 chooses first (same rate, lower id): the chunks only it holds, 0 and 1,
        // are rarer than chunk 2, which is left to peer 2.
        let a = p.poll(0.0);
        assert_eq!(
            a,
            vec![
                Action::Request {
                    peer: 1,
                    chunks: vec![0, 1]
                },
                Action::Request {
                    peer: 2,
                    chunks: vec![2]
                }
            ]
        );
        // Peer 1 goes away: its chunks are asked of peer 2 once it holds them, within
        // peer 2's budget (2, one in use).
        p.remove_peer(1);
        p.peer_bitfield(2, &ChunkSet::full(3));
        assert_eq!(
            p.poll(0.1),
            vec![Action::Request {
                peer: 2,
                chunks: vec![0]
            }]
        );
    }

    #[test]
    fn end_game_races_a_stuck_chunk_and_cancels_the_loser() {
        let mut p = Puller::new(cfg(), ChunkSet::new(1));
        p.add_peer(1, false);
        p.peer_bitfield(1, &ChunkSet::full(1));
        assert_eq!(p.poll(0.0).len(), 1);
        // Peer 2 appears much later, when chunk 0 is long overdue from peer 1.
        p.add_peer(2, false);
        p.peer_bitfield(2, &ChunkSet::full(1));
        let a = p.poll(10.0);
        assert_eq!(
            a,
            vec![Action::Request {
                peer: 2,
                chunks: vec![0]
            }]
        );
        p.chunk_done(2, 0, true, 10.1);
        assert_eq!(p.poll(10.2), vec![Action::Cancel { peer: 1, chunk: 0 }]);
        assert!(p.is_complete());
    }

    /// A puller of 8 chunks with two neighbours: peer 1 across a shared bottleneck (3 hops)
    /// holding every chunk, peer 2 nearby (2 hops) announcing at 0 s that it is fetching
    /// chunks 0..4 (over the same path).
    fn far_holds_all_near_fetches_0_to_4(cfg: SchedConfig) -> Puller {
        let mut p = Puller::new(cfg, ChunkSet::new(8));
        for (peer, hops) in [(1, 3), (2, 2)] {
            p.add_peer(peer, false);
            p.peer_distance(peer, hops);
        }
        p.peer_bitfield(1, &ChunkSet::full(8));
        for c in 0..4 {
            p.peer_fetching(2, c, 0.0);
        }
        p
    }

    #[test]
    fn chunks_a_nearer_neighbour_is_fetching_are_not_asked_of_farther_ones() {
        let cfg = SchedConfig {
            far_defer_s: 0.0,
            ..SchedConfig::new(128 << 10)
        };
        let mut p = far_holds_all_near_fetches_0_to_4(cfg);
        let asked: Vec<ChunkId> = p
            .poll(0.1)
            .into_iter()
            .flat_map(|a| match a {
                Action::Request { peer: 1, chunks } => chunks,
                _ => vec![],
            })
            .collect();
        assert!(
            !asked.is_empty() && asked.iter().all(|&c| c >= 4),
            "{asked:?}"
        );
        for &c in &asked {
            p.chunk_done(1, c, true, 0.2);
        }
        let asked_of_far = |p: &mut Puller, now: f64| -> Vec<ChunkId> {
            p.poll(now)
                .into_iter()
                .flat_map(|a| match a {
                    Action::Request { peer: 1, chunks } => chunks,
                    _ => vec![],
                })
                .collect()
        };
        // The far neighbour has room again, but chunks 0..4 are still coming nearby.
        assert_eq!(asked_of_far(&mut p, 0.3), Vec::<ChunkId>::new());
        // Once the announcement is stale, the far neighbour is asked after all.
        let late = asked_of_far(&mut p, COMING_TTL_S + 1.0);
        assert!(!late.is_empty() && late.iter().all(|&c| c < 4), "{late:?}");
    }

    #[test]
    fn a_nearer_claim_holds_as_long_as_a_fetch_over_a_slow_path_takes() {
        let cfg = SchedConfig {
            far_defer_s: 0.0,
            min_outstanding: 8,
            ..SchedConfig::new(128 << 10)
        };
        let mut p = far_holds_all_near_fetches_0_to_4(cfg);
        // Peer 1 delivers at 1 Mbit/s: a 128 KiB chunk in 1.05 s.
        p.peer_measured_rate(1, 1e6);
        let asked_of_far = |p: &mut Puller, now: f64| -> Vec<ChunkId> {
            let mut asked: Vec<ChunkId> =
                requests_by_peer(p.poll(now)).remove(&1).unwrap_or_default();
            asked.retain(|&c| c < 4);
            asked
        };
        assert_eq!(asked_of_far(&mut p, 0.1), Vec::<ChunkId>::new());
        // Four chunks outstanding from peer 1 take 4.2 s here, so peer 2's fetch over that
        // path takes about as long: its claims hold past the 2 s a claim holds at least...
        assert_eq!(
            asked_of_far(&mut p, COMING_TTL_S + 1.0),
            Vec::<ChunkId>::new()
        );
        // ... and lapse after CLAIM_PIPELINES such pipelines.
        let late = asked_of_far(&mut p, CLAIM_PIPELINES * 4.0 * 1.05 + 0.5);
        assert!(!late.is_empty(), "{late:?}");
    }

    /// A set of `n` chunks holding the first `k`.
    fn first_chunks(k: u32, n: u32) -> ChunkSet {
        let mut set = ChunkSet::new(n);
        (0..k).for_each(|c| {
            set.insert(c);
        });
        set
    }

    /// The chunks `actions` ask of `peer`, in order.
    fn asked_of(actions: Vec<Action>, peer: MemberId) -> Vec<ChunkId> {
        let mut asked = requests_by_peer(actions).remove(&peer).unwrap_or_default();
        asked.sort_unstable();
        asked
    }

    fn requests_by_peer(actions: Vec<Action>) -> BTreeMap<MemberId, Vec<ChunkId>> {
        let mut out: BTreeMap<MemberId, Vec<ChunkId>> = BTreeMap::new();
        for a in actions {
            if let Action::Request { peer, chunks } = a {
                out.entry(peer).or_default().extend(chunks);
            }
        }
        out
    }

    #[test]
    fn a_chunk_waiting_in_a_far_queue_is_asked_of_a_nearer_holder_instead() {
        // Neighbour 3 is 3 hops away through routers, neighbour 4 on another link of ours.
        // Chunk 0 is asked of 3; neighbour 4 then gets it while it still waits unstarted in
        // 3's queue: after MOVE_QUEUED_AFTER_S it is cancelled with 3 and asked of 4.
        // Chunk 1, asked of 3 as well, has started arriving: it stays.
        let setup = || {
            let mut p = Puller::new(SchedConfig::new(128 << 10), ChunkSet::new(64));
            p.add_peer(3, false);
            p.peer_distance(3, 3);
            p.peer_ingress(3, 1);
            p.add_peer(4, false);
            p.peer_distance(4, 1);
            p.peer_ingress(4, 2);
            p.peer_bitfield(3, &first_chunks(2, 64));
            assert_eq!(asked_of(p.poll(0.0), 3), vec![0, 1]);
            assert_eq!(p.chunk_started(3, 1, 0.1), Arrival::Accept);
            p.peer_has(4, 0);
            p.peer_has(4, 1);
            p
        };
        let mut p = setup();
        let early = p.poll(MOVE_QUEUED_AFTER_S - 0.1);
        assert!(
            !early.iter().any(|a| matches!(a, Action::Cancel { .. })),
            "{early:?}"
        );
        let mut p = setup();
        let actions = p.poll(MOVE_QUEUED_AFTER_S + 0.1);
        let cancels: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Cancel { peer, chunk } => Some((*peer, *chunk)),
                _ => None,
            })
            .collect();
        assert_eq!(cancels, vec![(3, 0)]);
        assert_eq!(requests_by_peer(actions).get(&4), Some(&vec![0]));
        // The moved flight is 4's now: its stream is read, one from 3 refused.
        assert_eq!(p.chunk_started(4, 0, 1.2), Arrival::Accept);
        assert_eq!(p.chunk_started(3, 0, 1.2), Arrival::Reject);
        // A nearer holder on the far one's link shares its way in: the chunk is not moved
        // (its first bytes may be in that path's queue already, and would cross it twice).
        let mut p = setup();
        p.peer_ingress(4, 1);
        let same_link = p.poll(MOVE_QUEUED_AFTER_S + 0.1);
        assert!(
            !same_link.iter().any(|a| matches!(a, Action::Cancel { .. })),
            "{same_link:?}"
        );
    }

    #[test]
    fn a_neighbour_that_claims_chunks_and_sends_none_holds_them_back_once_only() {
        // Peers 1 and 2 both claim all 16 chunks; 2 delivers what it is asked, 1 nothing
        // (so the kernel measures nothing coming from it).
        let mut p = Puller::new(SchedConfig::new(64 << 10), ChunkSet::new(16));
        for peer in [1, 2] {
            p.add_peer(peer, false);
            p.peer_bitfield(peer, &ChunkSet::full(16));
        }
        p.peer_measured_rate(1, 1e3);
        let mut asked_of_liar = Vec::new();
        let mut t = 0.0;
        while !p.is_complete() && t < 30.0 {
            let actions = p.poll(t);
            for a in &actions {
                if let Action::Cancel { peer, .. } = a {
                    assert_eq!(*peer, 1, "only the silent one's chunks are cancelled");
                }
            }
            for (peer, chunks) in requests_by_peer(actions) {
                for c in chunks {
                    if peer == 1 {
                        asked_of_liar.push((t, c));
                    } else {
                        p.chunk_started(2, c, t);
                        p.chunk_done(2, c, true, t + 0.01);
                    }
                }
            }
            t += 0.1;
        }
        assert!(p.is_complete(), "complete from peer 2 by {t:.1} s");
        // What the silent one was asked before its first stall is all it held back: after
        // it, it counts as holding nothing.
        let first_stall = STALL_MIN_S;
        assert!(
            asked_of_liar.iter().all(|&(at, _)| at <= first_stall),
            "{asked_of_liar:?}"
        );
        assert!(t < first_stall + 1.0, "done at {t:.1} s");
    }

    #[test]
    fn a_neighbour_on_probation_is_asked_again_once_it_is_the_only_holder() {
        // Peers 1 and 2 hold all 64 chunks. Peer 1 lets what it is asked stall (a busy
        // moment, not a lie), so it goes on probation; then peer 2, which delivers one
        // chunk per 0.1 s, goes away. Peer 1 has announced everything already and will
        // announce nothing more: what it held must still be asked of it, or this node
        // waits forever (seen in CI: a line whose far end was killed, two nodes at 132 of
        // 141 chunks for 80 s).
        let mut p = Puller::new(SchedConfig::new(64 << 10), ChunkSet::new(64));
        for peer in [1, 2] {
            p.add_peer(peer, false);
            p.peer_bitfield(peer, &ChunkSet::full(64));
        }
        let mut t = 0.0;
        let mut queued_at_2 = std::collections::VecDeque::new();
        let mut probation = false;
        while !probation && t < 30.0 {
            let actions = p.poll(t);
            probation = actions
                .iter()
                .any(|a| matches!(a, Action::Cancel { peer: 1, .. }));
            queued_at_2.extend(requests_by_peer(actions).remove(&2).into_iter().flatten());
            if let Some(c) = queued_at_2.pop_front() {
                p.chunk_started(2, c, t);
                p.chunk_done(2, c, true, t + 0.05);
            }
            t += 0.1;
        }
        assert!(probation, "peer 1 never stalled");
        assert!(!p.is_complete(), "peer 2 sent everything by {t:.1} s");
        p.forget_peer(2);
        // Whatever is still missing, only peer 1 holds: it is asked, one at a time while
        // on probation, and the rest once it delivers again.
        let mut asked_of_1 = 0;
        let end = t + 30.0;
        while !p.is_complete() && t < end {
            for (peer, chunks) in requests_by_peer(p.poll(t)) {
                assert_eq!(peer, 1);
                for c in chunks {
                    asked_of_1 += 1;
                    p.chunk_started(1, c, t);
                    p.chunk_done(1, c, true, t + 0.01);
                }
            }
            t += 0.05;
        }
        assert!(
            p.is_complete(),
            "stuck at {t:.1} s; asked of peer 1: {asked_of_1}"
        );
    }

    #[test]
    fn a_stalled_chunk_is_asked_again_of_its_only_holder() {
        let mut p = Puller::new(SchedConfig::new(64 << 10), ChunkSet::new(1));
        p.add_peer(1, false);
        p.peer_bitfield(1, &ChunkSet::full(1));
        assert_eq!(
            requests_by_peer(p.poll(0.0)),
            BTreeMap::from([(1, vec![0])])
        );
        // Nothing arrives: no second request while it could still be on its way...
        assert!(requests_by_peer(p.poll(1.0)).is_empty());
        // ...then the same request again, the flight's place kept (one chunk in flight).
        assert_eq!(
            requests_by_peer(p.poll(2.5)),
            BTreeMap::from([(1, vec![0])])
        );
        assert_eq!(p.in_flight(), 1);
        assert!(requests_by_peer(p.poll(3.0)).is_empty());
        p.chunk_started(1, 0, 3.1);
        p.chunk_done(1, 0, true, 3.2);
        assert!(p.is_complete());
    }

    #[test]
    fn a_nearer_neighbour_on_another_link_is_no_reason_to_wait() {
        // Peer 1 is 2 hops away through a router on link 7, peer 2 on a link of its own
        // (link 8), 1 hop, holding and fetching the same chunks. Their paths share
        // nothing here, so peer 1's link is used for them too.
        let cfg = SchedConfig {
            far_defer_s: 0.0,
            ..SchedConfig::new(128 << 10)
        };
        let mut p = Puller::new(cfg, ChunkSet::new(8));
        for (peer, hops, link) in [(1, 2, 7), (2, 1, 8)] {
            p.add_peer(peer, false);
            p.peer_distance(peer, hops);
            p.peer_ingress(peer, link);
            p.peer_bitfield(peer, &ChunkSet::full(8));
        }
        let asked = requests_by_peer(p.poll(0.0));
        assert!(asked.get(&1).is_some_and(|c| !c.is_empty()), "{asked:?}");
        // On the same link, the farther one waits for the nearer one.
        let mut q = Puller::new(SchedConfig::new(128 << 10), ChunkSet::new(8));
        for (peer, hops) in [(1, 2), (2, 1)] {
            q.add_peer(peer, false);
            q.peer_distance(peer, hops);
            q.peer_ingress(peer, 7);
            q.peer_bitfield(peer, &ChunkSet::full(8));
        }
        let asked = requests_by_peer(q.poll(0.0));
        assert!(!asked.contains_key(&1), "{asked:?}");
    }

    #[test]
    fn a_slow_nearer_neighbour_does_not_keep_a_fast_path_idle() {
        // Peer 2 is one router hop away, peer 1 two, both on link 7, both holding all 32
        // chunks. A nearer neighbour that hands them over quickly is waited for; one that
        // would take seconds (a slow link of its own into the shared router) is not.
        for (near_bps, far_asked) in [(100e6, false), (2e6, true)] {
            let mut p = Puller::new(SchedConfig::new(64 << 10), ChunkSet::new(32));
            for (peer, hops) in [(1, 2), (2, 1)] {
                p.add_peer(peer, false);
                p.peer_distance(peer, hops);
                p.peer_ingress(peer, 7);
                p.peer_bitfield(peer, &ChunkSet::full(32));
            }
            p.peer_measured_rate(2, near_bps);
            let asked = requests_by_peer(p.poll(0.0));
            assert_eq!(asked.contains_key(&1), far_asked, "{near_bps}: {asked:?}");
            assert!(asked.contains_key(&2), "{asked:?}");
        }
    }

    /// A puller of `chunks` chunks whose only neighbour so far is the source, 2 hops away
    /// behind a router, holding everything and having served every chunk once already.
    fn behind_a_router_with_the_source(chunks: u32) -> Puller {
        let mut p = Puller::new(SchedConfig::new(128 << 10), ChunkSet::new(chunks));
        p.add_peer(0, true);
        p.peer_distance(0, 2);
        p.fresh_granted(0, &[], true, 0.0);
        p.peer_bitfield(0, &ChunkSet::full(chunks));
        p
    }

    #[test]
    fn members_as_far_from_a_source_behind_a_router_ask_it_for_different_chunks() {
        // Members 1 and 2 sit behind the same router, 2 hops from the source and from each
        // other, and poll at the same moment, before either hears what the other asked
        // for. Every chunk is as rare as any other, except that a neighbour beyond the
        // source holds the second half: without the designation both would ask for the
        // same rarest chunks. Each asks first for the chunks designated to it.
        const CHUNKS: u32 = 64;
        let ask = |me: MemberId, other: MemberId| {
            let mut cfg = SchedConfig::new(128 << 10);
            cfg.member = me;
            let mut p = Puller::new(cfg, ChunkSet::new(CHUNKS));
            p.add_peer(0, true);
            p.peer_distance(0, 2);
            p.fresh_granted(0, &[], true, 0.0);
            p.peer_bitfield(0, &ChunkSet::full(CHUNKS));
            p.add_peer(other, false);
            p.peer_distance(other, 2);
            p.peer_source_distance(other, 2);
            let mut second_half = ChunkSet::new(CHUNKS);
            (CHUNKS / 2..CHUNKS).for_each(|c| {
                second_half.insert(c);
            });
            p.add_peer(9, false);
            p.peer_distance(9, 3);
            p.peer_source_distance(9, 1);
            p.peer_bitfield(9, &second_half);
            requests_by_peer(p.poll(0.0)).remove(&0).unwrap_or_default()
        };
        let (one, two) = (ask(1, 2), ask(2, 1));
        assert!(!one.is_empty() && !two.is_empty());
        for (me, other, asked) in [(1, 2, &one), (2, 1, &two)] {
            let designated = (0..CHUNKS / 2).filter(|&c| group_place(me, &[other], c) == 0);
            assert!(
                designated.count() >= asked.len(),
                "enough rare chunks designated to {me}"
            );
            assert!(
                asked
                    .iter()
                    .all(|&c| c < CHUNKS / 2 && group_place(me, &[other], c) == 0),
                "member {me} asked for {asked:?}"
            );
        }
        assert!(one.iter().all(|c| !two.contains(c)), "{one:?} and {two:?}");
    }

    #[test]
    fn a_source_behind_a_router_is_spared_without_deadlock() {
        // The source (2 hops) holds everything and still hands out fresh chunks to others
        // (neighbour 5 fetches chunk 2, never seen before). A neighbour as near as it (2
        // hops) holds chunk 0, one beyond it (3 hops) holds chunks 0 and 1. Chunk 0 comes
        // from the equally near neighbour, chunk 1 (held by nobody else that near) from the
        // source, and nothing from the neighbour whose path likely runs through the
        // source's links.
        let mut p = behind_a_router_with_the_source(3);
        let mut only_0 = ChunkSet::new(3);
        only_0.insert(0);
        let mut first_two = only_0.clone();
        first_two.insert(1);
        for (peer, hops, have) in [(3, 2, only_0), (4, 3, first_two), (5, 2, ChunkSet::new(3))] {
            p.add_peer(peer, false);
            p.peer_distance(peer, hops);
            p.peer_bitfield(peer, &have);
        }
        p.peer_fetching(5, 2, 0.0);
        let asked = requests_by_peer(p.poll(0.0));
        assert_eq!(asked, BTreeMap::from([(0, vec![1]), (3, vec![0])]));
    }

    #[test]
    fn a_source_behind_a_router_that_has_handed_out_everything_is_not_left_idle() {
        // Every chunk has left the source, none for the last FRESH_WINDOW_S: its uplink
        // carries nothing new and would idle while we lack what an equally near (and busy)
        // neighbour holds. Both are asked.
        let mut p = behind_a_router_with_the_source(8);
        p.add_peer(3, false);
        p.peer_distance(3, 2);
        p.peer_bitfield(3, &ChunkSet::full(8));
        let asked = requests_by_peer(p.poll(FRESH_WINDOW_S + 0.1));
        assert!(asked.get(&0).is_some_and(|c| !c.is_empty()), "{asked:?}");
        assert!(asked.get(&3).is_some_and(|c| !c.is_empty()), "{asked:?}");
    }

    #[test]
    fn a_chunk_a_neighbour_fetches_is_not_asked_of_a_source_behind_a_router() {
        // The source ran out of fresh chunks while its last ones are still on their way to
        // others: chunk 1 to neighbour 3 (which announced it). Asking the source for it
        // again would send it up the source's uplink twice; we wait for neighbour 3's copy,
        // unless its announcement grows stale.
        let mut p = behind_a_router_with_the_source(2);
        p.add_peer(3, false);
        p.peer_distance(3, 2);
        p.peer_fetching(3, 1, 0.0);
        let asked = requests_by_peer(p.poll(0.0));
        assert_eq!(asked, BTreeMap::from([(0, vec![0])]));
        p.chunk_done(0, 0, true, 0.5);
        let asked = requests_by_peer(p.poll(COMING_TTL_S + 0.1));
        assert_eq!(asked, BTreeMap::from([(0, vec![1])]));
    }

    #[test]
    fn a_neighbour_beyond_the_source_is_skipped_one_beside_it_is_not() {
        // The source is 2 hops away behind a router and holds everything. Neighbour 3 is 3
        // hops away and 1 hop from the source: our path to it runs through the source, so it
        // is not pulled from. Neighbour 4 is as far from us but 3 hops from the source (the
        // far side of a dumbbell): its path does not touch the source's links, and while the
        // source still hands out fresh chunks (neighbour 4 fetches chunk 3, never seen
        // before) what neighbour 4 holds is not asked of the source.
        let mut p = behind_a_router_with_the_source(4);
        let first_two = first_chunks(2, 4);
        for (peer, hops, to_source) in [(3, 3, 1), (4, 3, 3)] {
            p.add_peer(peer, false);
            p.peer_distance(peer, hops);
            p.peer_source_distance(peer, to_source);
            p.peer_bitfield(peer, &first_two);
        }
        p.peer_fetching(4, 3, 0.0);
        let asked = requests_by_peer(p.poll(0.0));
        assert_eq!(asked.get(&3), None);
        assert_eq!(asked.get(&0), Some(&vec![2]));
        let mut from_4 = asked.get(&4).cloned().unwrap_or_default();
        from_4.sort_unstable();
        assert_eq!(from_4, vec![0, 1]);
    }

    #[test]
    fn a_neighbour_beside_the_source_whose_route_avoids_it_is_pulled_from() {
        // As above, neighbour 3 is 3 hops away and 1 hop from the source, 2 hops away: by
        // hop counts its path may run through the source. The source says its route to us
        // starts elsewhere (random-9750: the other way, through a second router, is as
        // long): it is pulled from (that network's idle 34 Mbit/s path: 3.8 x U_min). (64
        // chunks: with few, the end game would race what it holds anyway.)
        let asked_of_3 = |avoids: bool| {
            let mut p = behind_a_router_with_the_source(64);
            p.add_peer(3, false);
            p.peer_distance(3, 3);
            p.peer_source_distance(3, 1);
            p.peer_route_avoids_source(3, avoids);
            p.peer_bitfield(3, &first_chunks(2, 64));
            asked_of(p.poll(0.0), 3)
        };
        assert_eq!(asked_of_3(false), Vec::<ChunkId>::new());
        assert_eq!(asked_of_3(true), vec![0, 1]);
    }

    #[test]
    fn one_of_a_group_fetches_a_chunk_from_afar_the_others_wait() {
        // Members 5 and 6 sit together (2 hops apart); member 1 is far (3 hops) and holds
        // everything. Each fetches from afar only the chunks it is designated for, at once;
        // the rest after `far_defer_s`, unless the other announced it is fetching them.
        let pullers: Vec<Puller> = [5u16, 6]
            .iter()
            .map(|&me| {
                let other = if me == 5 { 6 } else { 5 };
                let mut p = Puller::new(
                    SchedConfig {
                        member: me,
                        max_outstanding: 64,
                        queue_target_s: 100.0,
                        ..SchedConfig::new(128 << 10)
                    },
                    ChunkSet::new(32),
                );
                for (peer, hops) in [(1, 3), (other, 2)] {
                    p.add_peer(peer, false);
                    p.peer_distance(peer, hops);
                }
                p.peer_bitfield(1, &ChunkSet::full(32));
                p
            })
            .collect();
        let mut first = Vec::new();
        for mut p in pullers {
            let now: Vec<ChunkId> = requests_by_peer(p.poll(0.0)).remove(&1).unwrap_or_default();
            assert!(!now.is_empty() && now.len() < 32, "{now:?}");
            let later = requests_by_peer(p.poll(0.3)).remove(&1).unwrap_or_default();
            assert_eq!(now.len() + later.len(), 32);
            first.push(now);
        }
        // Between them, every chunk was designated to exactly one.
        let mut all: Vec<ChunkId> = first.concat();
        all.sort_unstable();
        assert_eq!(all, (0..32).collect::<Vec<_>>());
    }

    #[test]
    fn a_group_fetches_a_chunk_from_afar_in_order_not_all_at_once() {
        // Three members sit together (5, 6, 7); member 1 is far and holds everything. For
        // each chunk the group's order (a hash all compute alike) gives member 5 a place:
        // it fetches its first-place chunks at once, its second-place ones after
        // `far_defer_s` and its third-place ones after twice that, so that two who were
        // not first do not fetch the same chunk together. Where the group's own round trips
        // are long (0.3 s), the step is counted in them instead (FAR_DEFER_RTTS of them).
        for group_rtt in [None, Some(0.3)] {
            let cfg = SchedConfig {
                member: 5,
                max_outstanding: 64,
                queue_target_s: 100.0,
                ..SchedConfig::new(128 << 10)
            };
            let defer = group_rtt.map_or(cfg.far_defer_s, |r| FAR_DEFER_RTTS * r);
            assert!(defer >= cfg.far_defer_s);
            let mut p = Puller::new(cfg, ChunkSet::new(32));
            for (peer, hops) in [(1, 3), (6, 2), (7, 2)] {
                p.add_peer(peer, false);
                p.peer_distance(peer, hops);
            }
            if let Some(rtt) = group_rtt {
                p.peer_rtt(6, rtt);
                p.peer_rtt(7, rtt / 2.0);
            }
            p.peer_bitfield(1, &ChunkSet::full(32));
            let place = |c: ChunkId| {
                let mine = tie_rank(6, c);
                [7u64, 8].iter().filter(|&&q| tie_rank(q, c) < mine).count()
            };
            let mut asked = Vec::new();
            for (now, upto) in [
                (0.0, 0),
                (defer - 0.01, 0),
                (defer + 0.01, 1),
                (2.0 * defer + 0.01, 2),
            ] {
                let mut got = requests_by_peer(p.poll(now)).remove(&1).unwrap_or_default();
                got.sort_unstable();
                let want: Vec<ChunkId> = (0..32)
                    .filter(|&c| place(c) == upto && !asked.contains(&c))
                    .collect();
                assert_eq!(got, want, "place {upto} at {now} s (rtt {group_rtt:?})");
                asked.extend(got);
            }
            assert_eq!(asked.len(), 32);
        }
    }

    /// A puller of `chunks` 1 MB chunks whose first fresh chunk from the source (peer 0,
    /// behind two routers) took 4 s, and whose neighbours 1 and 2 announced fetching chunks
    /// 1..=40 (unseen before: fresh ones) in the second before t = 4 s.
    fn slow_from_the_source(chunks: u32) -> Puller {
        let mut p = Puller::new(SchedConfig::new(1 << 20), ChunkSet::new(chunks));
        p.add_peer(0, true);
        p.peer_distance(0, 3);
        p.peer_bitfield(0, &ChunkSet::full(chunks));
        p.add_peer(1, false);
        p.add_peer(2, false);
        assert!(matches!(
            p.poll(0.0)[..],
            [Action::RequestFresh { peer: 0, .. }]
        ));
        p.fresh_granted(0, &[0], false, 0.0);
        p.chunk_done(0, 0, true, 4.0);
        for c in 1..=40 {
            p.peer_fetching(1 + c as MemberId % 2, c, 3.0 + c as f64 / 40.0);
        }
        p
    }

    fn asks_fresh(actions: &[Action]) -> bool {
        actions
            .iter()
            .any(|a| matches!(a, Action::RequestFresh { peer: 0, .. }))
    }

    #[test]
    fn a_starved_receiver_leaves_the_last_fresh_chunks_to_faster_ones() {
        // 40 fresh chunks a second leave the source, 20 for each neighbour; ours took 4 s.
        // With 59 left (1.5 s of the source's work) a chunk asked now would come last.
        let mut p = slow_from_the_source(100);
        assert!(!asks_fresh(&p.poll(4.0)));
        // Once fresh chunks stop leaving the source, the time left looks endless: ask.
        assert!(asks_fresh(&p.poll(5.5)));
        // With 959 left (24 s of work), a 4 s chunk is in time.
        let mut p = slow_from_the_source(1000);
        assert!(asks_fresh(&p.poll(4.0)));
        // A source on a link of our own is asked whatever it costs us.
        let mut p = slow_from_the_source(100);
        p.peer_distance(0, 1);
        assert!(asks_fresh(&p.poll(4.0)));
        // Nothing left unseen: the source will say it has no more fresh chunks.
        let mut p = slow_from_the_source(41);
        assert!(asks_fresh(&p.poll(4.0)));
    }

    #[test]
    fn fresh_server_serves_each_chunk_once() {
        let mut f = FreshServer::new(5);
        f.known_held(1);
        assert_eq!(f.pick(2), vec![0, 2]);
        // Only chunks whose hashes are out.
        assert_eq!(f.pick_below(5, 4), vec![3]);
        assert!(f.pick_below(5, 4).is_empty() && !f.exhausted());
        assert_eq!(f.pick(5), vec![4]);
        assert!(f.exhausted());
        assert!(f.pick(1).is_empty());
    }
}
