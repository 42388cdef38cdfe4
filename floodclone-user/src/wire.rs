//! Messages between nodes and their binary encoding. Control messages travel length-prefixed
//! on one bidirectional stream per connection; each chunk travels on its own unidirectional
//! stream (a 4-byte chunk id, then the bytes).
//!
//! Decoding never panics: every length is checked against the bytes present and against
//! limits, so a malformed message closes that connection only.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use floodclone_sched::{
    overlay::{Reach, SenderPaths},
    ChunkId, MemberId,
};

use crate::manifest::Manifest;

/// Largest control frame accepted: room for a manifest of [`crate::manifest::MAX_CHUNKS`]
/// chunks (the source refuses a chunk size that gives more).
pub const MAX_FRAME: usize = 64 << 20;

/// The family byte before an address.
const ADDR_NONE: u8 = 0;
const ADDR_V4: u8 = 4;
const ADDR_V6: u8 = 6;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message truncated")]
    Truncated,
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    #[error("{0} trailing bytes")]
    Trailing(usize),
    #[error("the manifest's tree is refused: {0}")]
    Tree(#[from] crate::tree::TreeError),
}

/// A member of the swarm as the source describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: MemberId,
    /// The address others dial (identity address in the testbed).
    pub addr: IpAddr,
    pub port: u16,
    /// Every address on the member's interfaces (link-local ones excepted: they name no
    /// host beyond their link): lets others recognise it as a gateway.
    pub local_addrs: Vec<IpAddr>,
    pub joined: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteView {
    pub member: MemberId,
    pub reach: Reach,
    pub ifindex: u32,
    pub gateway: Option<IpAddr>,
    /// With [`Reach::Behind`], the member in the way.
    pub via_member: Option<MemberId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Proof of the key the token's exchange gave, bound to this TLS session (keyed BLAKE3).
    Auth { mac: [u8; 32] },
    /// One side's half of the key exchange on the swarm token (SPAKE2, 33 bytes).
    Pake { msg: Vec<u8> },
    /// Destination -> source: I am here, listening on `port`, with these addresses.
    Join { port: u16, addrs: Vec<IpAddr> },
    /// Source -> destination: your member id, the manifest (the chunk hashes the source has
    /// so far; [`Msg::Hashes`] brings the rest), the members, and whether destinations
    /// relay (false: the "direct" baseline, everyone pulls from the source).
    ///
    /// Once the source has hashed the whole file, the manifest carries no chunk hashes and
    /// `hash_ahead` is the file's hash: the Welcome is a packet or two, not 32 bytes per
    /// chunk, so it gets through a path whose queues turn most packets away; the chunk
    /// hashes follow ([`Msg::Hashes`]) and any neighbour may give them sooner
    /// ([`Msg::AskHashes`]), checked against this hash.
    Welcome {
        you: MemberId,
        manifest: Manifest,
        members: Vec<Member>,
        relay: bool,
        hash_ahead: Option<[u8; 32]>,
    },
    /// Source -> destination: the member list changed.
    Members { members: Vec<Member> },
    /// Destination -> source: how this node reaches every member.
    View { routes: Vec<RouteView> },
    /// Puller -> server, first message after auth: who is pulling.
    Hello { id: MemberId },
    /// Server -> puller: every chunk the server holds (bit i of byte i/8, LSB first).
    Bitfield { bits: Vec<u8> },
    /// Server -> puller: one more chunk held.
    Have { chunk: ChunkId },
    /// Puller -> server: send these chunks.
    Request { chunks: Vec<ChunkId> },
    /// Puller -> source: send up to `count` chunks nobody has been sent yet.
    RequestFresh { count: u32 },
    /// Source -> puller, answering each RequestFresh in order: the chunks picked for it, and
    /// whether every chunk has now been served once (then request explicitly).
    FreshGrant {
        chunks: Vec<ChunkId>,
        exhausted: bool,
    },
    /// Puller -> server: stop sending this chunk.
    Cancel { chunk: ChunkId },
    /// Server -> puller: the requested chunk is not held (any more).
    DontHave { chunk: ChunkId },
    /// Destination -> source: my copy is complete and verified.
    Done { elapsed_ms: u64 },
    /// Destination -> source: chunks held, for progress display.
    Progress { have: u32 },
    /// Source -> everyone: every destination is done; exit.
    SwarmDone,
    /// Destination -> source: this destination cannot complete (output exists, disk full,
    /// ...); the swarm finishes without it.
    Failed { reason: String },
    /// Any node -> its neighbours: I am fetching these chunks (so a farther neighbour need
    /// not be asked for them).
    Fetching { chunks: Vec<ChunkId> },
    /// Destination -> its neighbours: a neighbour of mine is fetching these chunks, which I
    /// lack (so they will soon be near me; better not fetch them into my side twice).
    FetchingBeyond { chunks: Vec<ChunkId> },
    /// Destination -> its neighbours: how many hops I am from the source (so a neighbour
    /// can tell whether its path to me runs through the source).
    SourceDistance { hops: u8 },
    /// Source -> destination: trace your whole path to these members (does it cross
    /// another member?); see `floodclone_sched::overlay::PathChecks`.
    TracePaths { to: Vec<MemberId> },
    /// Destination -> source: the paths traced, by whether they cross no other member
    /// (`clean`: every hop answered), cross one (`crossed`: a member answered on the way),
    /// or may (`unknown`: a hop did not answer, none was a member; asked again later).
    PathsTraced {
        clean: Vec<MemberId>,
        crossed: Vec<MemberId>,
        unknown: Vec<MemberId>,
    },
    /// Source -> destination: what your routes cannot show about members' paths to you:
    /// those behind another member whose own path crosses none (pull from them too), those
    /// through routers whose own route starts at a member they feed over that first link
    /// (do not); see `floodclone_sched::overlay::PathChecks`. The whole lists each time.
    SenderPaths(SenderPaths),
    /// Source -> whoever answers at an address a member claims as its own (on a connection
    /// the source dialed there): send this nonce back to me on your own connection.
    ProveAddress { nonce: [u8; 16] },
    /// Destination -> source, on the connection it dialed to the source: the nonce a
    /// ProveAddress brought to one of my addresses.
    AddressProof { nonce: [u8; 16] },
    /// Destination -> whoever answers at an address a member claims (the destination's
    /// gateway): which member are you?
    WhoAreYou,
    /// Destination -> the asker of a WhoAreYou, on that connection: this member.
    IAm { id: MemberId },
    /// Source -> destination: the hashes of chunks `first..`, as the source reads its file
    /// (it hands out only chunks whose hashes it has sent); with the last of them, the
    /// whole file's hash.
    Hashes {
        first: ChunkId,
        hashes: Vec<[u8; 32]>,
        file_hash: Option<[u8; 32]>,
    },
    /// Puller -> a neighbour it dialed: send me every chunk hash and the file's hash, as
    /// [`Msg::Hashes`] from chunk 0 (answered once per connection, by a member that has
    /// them all). What comes back is kept only if it makes up the file's hash the source
    /// sent ahead (`Welcome::hash_ahead`).
    AskHashes,
}

/// `hashes` (of chunks `first..`) as [`Msg::Hashes`] of at most [`MAX_HASHES_PER_MSG`]
/// each, the file's hash with the last (alone, for an empty file).
pub fn hashes_msgs(first: ChunkId, hashes: &[[u8; 32]], file_hash: Option<[u8; 32]>) -> Vec<Msg> {
    let pieces: Vec<&[[u8; 32]]> = hashes.chunks(MAX_HASHES_PER_MSG).collect();
    let n = pieces.len().max(1);
    (0..n)
        .map(|i| Msg::Hashes {
            first: first + (i * MAX_HASHES_PER_MSG) as ChunkId,
            hashes: pieces.get(i).map_or_else(Vec::new, |p| p.to_vec()),
            file_hash: file_hash.filter(|_| i == n - 1),
        })
        .collect()
}

/// Most chunk hashes in one [`Msg::Hashes`] (128 KiB of them).
pub const MAX_HASHES_PER_MSG: usize = 4096;

/// Most chunk ids queued to serve on one connection. A scheduler keeps about 0.12 s of a
/// neighbour's rate asked for (README, "Scheduler rules"): some 5,700 chunks of 64 KiB at
/// 25 Gbit/s. A peer asking for more is flooding, and is cut off.
pub const MAX_QUEUED_CHUNKS: usize = 16_384;

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn hashes(&mut self, hashes: &[[u8; 32]]) {
        self.u32(hashes.len() as u32);
        for h in hashes {
            self.0.extend_from_slice(h);
        }
    }
    fn file_hash(&mut self, h: &Option<[u8; 32]>) {
        self.u8(h.is_some() as u8);
        if let Some(h) = h {
            self.0.extend_from_slice(h);
        }
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    /// An address: its family (4 or 6), then its bytes. An IPv4-mapped IPv6 address
    /// travels as the IPv4 one, so each host has one spelling on the wire.
    fn addr(&mut self, a: IpAddr) {
        match a.to_canonical() {
            IpAddr::V4(a) => {
                self.u8(ADDR_V4);
                self.0.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                self.u8(ADDR_V6);
                self.0.extend_from_slice(&a.octets());
            }
        }
    }
    fn opt_addr(&mut self, a: Option<IpAddr>) {
        match a {
            Some(a) => self.addr(a),
            None => self.u8(ADDR_NONE),
        }
    }
    fn addrs(&mut self, v: &[IpAddr]) {
        self.u32(v.len() as u32);
        for a in v {
            self.addr(*a);
        }
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn chunk_ids(&mut self, ids: &[ChunkId]) {
        self.u32(ids.len() as u32);
        for c in ids {
            self.u32(*c);
        }
    }
    fn member_ids(&mut self, ids: &[MemberId]) {
        self.u32(ids.len() as u32);
        for m in ids {
            self.u16(*m);
        }
    }
    fn members(&mut self, ms: &[Member]) {
        self.u32(ms.len() as u32);
        for m in ms {
            self.u16(m.id);
            self.addr(m.addr);
            self.u16(m.port);
            self.addrs(&m.local_addrs);
            self.u8(m.joined as u8);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn opt_addr(&mut self) -> Result<Option<IpAddr>, WireError> {
        Ok(match self.u8()? {
            ADDR_NONE => None,
            ADDR_V4 => Some(IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(self.take(4)?).unwrap(),
            ))),
            ADDR_V6 => Some(
                IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(self.take(16)?).unwrap(),
                ))
                .to_canonical(),
            ),
            _ => return Err(WireError::Invalid("address family")),
        })
    }
    fn addr(&mut self) -> Result<IpAddr, WireError> {
        self.opt_addr()?
            .ok_or(WireError::Invalid("missing address"))
    }
    /// A count of items of at least `min_item` bytes each, checked against what is left.
    fn count(&mut self, min_item: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item.max(1)) > self.0.len() {
            return Err(WireError::Truncated);
        }
        Ok(n)
    }
    fn addrs(&mut self) -> Result<Vec<IpAddr>, WireError> {
        let n = self.count(5)?;
        (0..n).map(|_| self.addr()).collect()
    }
    fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let n = self.count(1)?;
        Ok(self.take(n)?.to_vec())
    }
    fn hash(&mut self) -> Result<[u8; 32], WireError> {
        Ok(self.take(32)?.try_into().unwrap())
    }
    fn hashes(&mut self) -> Result<Vec<[u8; 32]>, WireError> {
        let n = self.count(32)?;
        (0..n).map(|_| self.hash()).collect()
    }
    /// A flag, then the hash when there is one.
    fn file_hash(&mut self) -> Result<Option<[u8; 32]>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.hash()?)),
            _ => Err(WireError::Invalid("file hash flag")),
        }
    }
    fn nonce(&mut self) -> Result<[u8; 16], WireError> {
        Ok(self.take(16)?.try_into().unwrap())
    }
    fn chunk_ids(&mut self) -> Result<Vec<ChunkId>, WireError> {
        let n = self.count(4)?;
        (0..n).map(|_| self.u32()).collect()
    }
    fn member_ids(&mut self) -> Result<Vec<MemberId>, WireError> {
        let n = self.count(2)?;
        (0..n).map(|_| self.u16()).collect()
    }
    /// A Welcome's fields: who we are, whether we relay, the manifest (checked for
    /// consistency) and the members.
    fn welcome(&mut self) -> Result<Msg, WireError> {
        let you = self.u16()?;
        let relay = self.u8()? != 0;
        let size = self.u64()?;
        let chunk_bytes = self.u32()?;
        let file_hash = self.file_hash()?;
        let mode = self.u32()? & 0o777;
        let chunk_hashes = self.hashes()?;
        let members = self.members()?;
        let tree = match self.u8()? {
            0 => None,
            1 => {
                let bytes = self.bytes()?;
                if bytes.len() > crate::manifest::MAX_TREE_BYTES {
                    return Err(WireError::Invalid("tree larger than a manifest takes"));
                }
                Some(std::sync::Arc::new(crate::tree::Tree::decode(&bytes)?))
            }
            _ => return Err(WireError::Invalid("tree flag")),
        };
        let hash_ahead = self.file_hash()?;
        if hash_ahead.is_some() && file_hash.is_some() {
            return Err(WireError::Invalid(
                "a file's hash both ahead and in the manifest",
            ));
        }
        let manifest = Manifest {
            size,
            chunk_bytes,
            chunk_hashes,
            file_hash,
            mode,
            tree,
        };
        if !manifest.is_consistent() {
            return Err(WireError::Invalid("manifest"));
        }
        Ok(Msg::Welcome {
            you,
            manifest,
            members,
            relay,
            hash_ahead,
        })
    }
    /// A View's routes.
    fn route_views(&mut self) -> Result<Vec<RouteView>, WireError> {
        // member, reach, ifindex, no gateway, via.
        let n = self.count(10)?;
        (0..n)
            .map(|_| {
                let member = self.u16()?;
                let reach = match self.u8()? {
                    0 => Reach::Direct,
                    1 => Reach::Behind,
                    2 => Reach::ViaRouter,
                    3 => Reach::Unreachable,
                    _ => return Err(WireError::Invalid("reach")),
                };
                let ifindex = self.u32()?;
                let gateway = self.opt_addr()?;
                let via = self.u16()?;
                Ok(RouteView {
                    member,
                    reach,
                    ifindex,
                    gateway,
                    via_member: (via != MemberId::MAX).then_some(via),
                })
            })
            .collect()
    }
    fn members(&mut self) -> Result<Vec<Member>, WireError> {
        // id, an IPv4 address, port, no local address, joined.
        let n = self.count(14)?;
        (0..n)
            .map(|_| {
                Ok(Member {
                    id: self.u16()?,
                    addr: self.addr()?,
                    port: self.u16()?,
                    local_addrs: self.addrs()?,
                    joined: self.u8()? != 0,
                })
            })
            .collect()
    }
}

impl Msg {
    fn tag(&self) -> u8 {
        match self {
            Msg::Auth { .. } => 1,
            Msg::Join { .. } => 2,
            Msg::Welcome { .. } => 3,
            Msg::Members { .. } => 4,
            Msg::View { .. } => 5,
            Msg::Hello { .. } => 6,
            Msg::Bitfield { .. } => 7,
            Msg::Have { .. } => 8,
            Msg::Request { .. } => 9,
            Msg::RequestFresh { .. } => 10,
            Msg::FreshGrant { .. } => 11,
            Msg::Cancel { .. } => 12,
            Msg::DontHave { .. } => 13,
            Msg::Done { .. } => 14,
            Msg::Progress { .. } => 15,
            Msg::SwarmDone => 16,
            Msg::Fetching { .. } => 17,
            Msg::Failed { .. } => 18,
            Msg::SourceDistance { .. } => 19,
            Msg::TracePaths { .. } => 20,
            Msg::PathsTraced { .. } => 21,
            Msg::SenderPaths(_) => 22,
            Msg::Pake { .. } => 23,
            Msg::ProveAddress { .. } => 24,
            Msg::AddressProof { .. } => 25,
            Msg::WhoAreYou => 26,
            Msg::IAm { .. } => 27,
            Msg::FetchingBeyond { .. } => 28,
            Msg::Hashes { .. } => 29,
            Msg::AskHashes => 30,
        }
    }

    /// The message as a frame: 4-byte big-endian length, then type and body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(vec![0, 0, 0, 0]);
        w.u8(self.tag());
        match self {
            Msg::Auth { mac } => w.0.extend_from_slice(mac),
            Msg::Pake { msg } => w.bytes(msg),
            Msg::Join { port, addrs } => {
                w.u16(*port);
                w.addrs(addrs);
            }
            Msg::Welcome {
                you,
                manifest,
                members,
                relay,
                hash_ahead,
            } => {
                w.u16(*you);
                w.u8(*relay as u8);
                w.u64(manifest.size);
                w.u32(manifest.chunk_bytes);
                w.file_hash(&manifest.file_hash);
                w.u32(manifest.mode);
                w.hashes(&manifest.chunk_hashes);
                w.members(members);
                // Last, so a single file's Welcome is as it was.
                if let Some(tree) = &manifest.tree {
                    w.u8(1);
                    w.bytes(&tree.encode());
                } else {
                    w.u8(0);
                }
                w.file_hash(hash_ahead);
            }
            Msg::Hashes {
                first,
                hashes,
                file_hash,
            } => {
                w.u32(*first);
                w.hashes(hashes);
                w.file_hash(file_hash);
            }
            Msg::Members { members } => w.members(members),
            Msg::View { routes } => {
                w.u32(routes.len() as u32);
                for r in routes {
                    w.u16(r.member);
                    w.u8(r.reach as u8);
                    w.u32(r.ifindex);
                    w.opt_addr(r.gateway);
                    w.u16(r.via_member.unwrap_or(MemberId::MAX));
                }
            }
            Msg::Hello { id } => w.u16(*id),
            Msg::Bitfield { bits } => w.bytes(bits),
            Msg::Have { chunk } | Msg::Cancel { chunk } | Msg::DontHave { chunk } => w.u32(*chunk),
            Msg::Request { chunks } | Msg::Fetching { chunks } | Msg::FetchingBeyond { chunks } => {
                w.chunk_ids(chunks)
            }
            Msg::Failed { reason } => w.bytes(reason.as_bytes()),
            Msg::FreshGrant { chunks, exhausted } => {
                w.chunk_ids(chunks);
                w.u8(*exhausted as u8);
            }
            Msg::RequestFresh { count } => w.u32(*count),
            Msg::Done { elapsed_ms } => w.u64(*elapsed_ms),
            Msg::Progress { have } => w.u32(*have),
            Msg::SourceDistance { hops } => w.u8(*hops),
            Msg::TracePaths { to: ids } => w.member_ids(ids),
            Msg::PathsTraced {
                clean,
                crossed,
                unknown,
            } => {
                w.member_ids(clean);
                w.member_ids(crossed);
                w.member_ids(unknown);
            }
            Msg::SenderPaths(SenderPaths {
                clean,
                crossing,
                avoiding_source,
            }) => {
                w.member_ids(clean);
                w.member_ids(crossing);
                w.member_ids(avoiding_source);
            }
            Msg::ProveAddress { nonce } | Msg::AddressProof { nonce } => {
                w.0.extend_from_slice(nonce)
            }
            Msg::IAm { id } => w.u16(*id),
            Msg::SwarmDone | Msg::WhoAreYou | Msg::AskHashes => {}
        }
        let len = (w.0.len() - 4) as u32;
        w.0[..4].copy_from_slice(&len.to_be_bytes());
        w.0
    }

    /// Decodes one frame body (type and fields, without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Msg, WireError> {
        let mut r = Reader(body);
        let msg = match r.u8()? {
            1 => Msg::Auth { mac: r.hash()? },
            23 => Msg::Pake { msg: r.bytes()? },
            2 => Msg::Join {
                port: r.u16()?,
                addrs: r.addrs()?,
            },
            3 => r.welcome()?,
            4 => Msg::Members {
                members: r.members()?,
            },
            5 => Msg::View {
                routes: r.route_views()?,
            },
            6 => Msg::Hello { id: r.u16()? },
            7 => Msg::Bitfield { bits: r.bytes()? },
            8 => Msg::Have { chunk: r.u32()? },
            9 => Msg::Request {
                chunks: r.chunk_ids()?,
            },
            10 => Msg::RequestFresh { count: r.u32()? },
            11 => Msg::FreshGrant {
                chunks: r.chunk_ids()?,
                exhausted: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::Invalid("exhausted flag")),
                },
            },
            12 => Msg::Cancel { chunk: r.u32()? },
            13 => Msg::DontHave { chunk: r.u32()? },
            14 => Msg::Done {
                elapsed_ms: r.u64()?,
            },
            15 => Msg::Progress { have: r.u32()? },
            16 => Msg::SwarmDone,
            17 => Msg::Fetching {
                chunks: r.chunk_ids()?,
            },
            18 => Msg::Failed {
                reason: String::from_utf8(r.bytes()?)
                    .map_err(|_| WireError::Invalid("reason is not UTF-8"))?,
            },
            19 => Msg::SourceDistance { hops: r.u8()? },
            20 => Msg::TracePaths {
                to: r.member_ids()?,
            },
            21 => Msg::PathsTraced {
                clean: r.member_ids()?,
                crossed: r.member_ids()?,
                unknown: r.member_ids()?,
            },
            22 => Msg::SenderPaths(SenderPaths {
                clean: r.member_ids()?,
                crossing: r.member_ids()?,
                avoiding_source: r.member_ids()?,
            }),
            24 => Msg::ProveAddress { nonce: r.nonce()? },
            25 => Msg::AddressProof { nonce: r.nonce()? },
            26 => Msg::WhoAreYou,
            27 => Msg::IAm { id: r.u16()? },
            28 => Msg::FetchingBeyond {
                chunks: r.chunk_ids()?,
            },
            29 => {
                let first = r.u32()?;
                let hashes = r.hashes()?;
                if hashes.len() > MAX_HASHES_PER_MSG {
                    return Err(WireError::Invalid("too many hashes"));
                }
                Msg::Hashes {
                    first,
                    hashes,
                    file_hash: r.file_hash()?,
                }
            }
            30 => Msg::AskHashes,
            t => return Err(WireError::UnknownType(t)),
        };
        if !r.0.is_empty() {
            return Err(WireError::Trailing(r.0.len()));
        }
        Ok(msg)
    }
}

/// Largest body a message of type `tag` can have: the manifest's hashes for a Welcome;
/// for the others what the largest legitimate one holds (2M chunks, 16,384 requested,
/// 65,535 members), with room.
fn max_body(tag: u8) -> usize {
    match tag {
        3 => MAX_FRAME,              // Welcome: 32 bytes per chunk, and the members
        4 | 5 => 8 << 20,            // Members, View: per member ~20-100 bytes
        7 => 1 << 20,                // Bitfield: a bit per chunk
        9 | 11 | 17 | 28 => 1 << 20, // Request, FreshGrant, Fetching(Beyond): 4 B a chunk
        29 => 256 << 10,             // Hashes: up to MAX_HASHES_PER_MSG of 32 bytes
        20..=22 => 256 << 10,        // path checks: 2 bytes per member
        _ => 64 << 10,               // the rest: a few fields, or a reason to print
    }
}

/// Splits complete frames off the front of `buf`: returns the messages decoded and leaves a
/// partial frame in place.
pub fn drain_frames(buf: &mut Vec<u8>) -> Result<Vec<Msg>, WireError> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 4 {
        let len = u32::from_be_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        // Once the type is known, its own limit: nothing but a Welcome needs megabytes, and
        // a peer must not make us buffer them for a View.
        if let Some(&tag) = buf.get(at + 4) {
            if len > max_body(tag) {
                return Err(WireError::TooLarge(len));
            }
        }
        if buf.len() - at - 4 < len {
            break;
        }
        out.push(Msg::decode(&buf[at + 4..at + 4 + len])?);
        at += 4 + len;
    }
    buf.drain(..at);
    Ok(out)
}

/// A route view as the JSON events show it.
impl From<&RouteView> for floodclone_events::Route {
    fn from(v: &RouteView) -> Self {
        Self {
            member: v.member,
            reach: match v.reach {
                Reach::Direct => floodclone_events::RouteReach::Direct,
                Reach::Behind => floodclone_events::RouteReach::Behind,
                Reach::ViaRouter => floodclone_events::RouteReach::ViaRouter,
                Reach::Unreachable => floodclone_events::RouteReach::Unreachable,
            },
            ifindex: v.ifindex,
            gateway: v.gateway.map(|g| g.to_string()),
            via_member: v.via_member,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_file_tree(path: &str, size: u64) -> crate::tree::Tree {
        crate::tree::Tree::new(vec![crate::tree::Entry {
            path: path.into(),
            kind: crate::tree::EntryKind::File { size },
            mode: 0o644,
            mtime_ns: 0,
        }])
        .unwrap()
    }

    #[test]
    fn a_welcome_naming_a_path_outside_the_tree_is_refused_with_the_reason() {
        let welcome = samples()
            .into_iter()
            .find(|m| matches!(m, Msg::Welcome { manifest, .. } if manifest.tree.is_some()))
            .unwrap();
        let mut frame = welcome.encode();
        let at = frame.windows(4).position(|w| w == b"zzzz").unwrap();
        frame[at..at + 4].copy_from_slice(b"../x");
        let err = Msg::decode(&frame[4..]).unwrap_err();
        assert!(
            matches!(err, WireError::Tree(crate::tree::TreeError::BadPath { .. })),
            "{err}"
        );
        // A tree whose files do not add up to the manifest's size is no manifest either.
        if let Msg::Welcome { mut manifest, .. } = welcome {
            manifest.tree = Some(std::sync::Arc::new(one_file_tree("zzzz", 4999)));
            assert!(!manifest.is_consistent());
        }
    }

    #[test]
    fn hashes_go_in_pieces_with_the_file_hash_last() {
        let hashes = vec![[3; 32]; MAX_HASHES_PER_MSG + 5];
        let msgs = hashes_msgs(2, &hashes, Some([9; 32]));
        let pieces: Vec<_> = msgs
            .iter()
            .map(|m| match m {
                Msg::Hashes {
                    first,
                    hashes,
                    file_hash,
                } => (*first, hashes.len(), file_hash.is_some()),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            pieces,
            vec![
                (2, MAX_HASHES_PER_MSG, false),
                (2 + MAX_HASHES_PER_MSG as u32, 5, true)
            ]
        );
        // An empty file: its hash alone.
        assert_eq!(
            hashes_msgs(0, &[], Some([9; 32])),
            vec![Msg::Hashes {
                first: 0,
                hashes: vec![],
                file_hash: Some([9; 32])
            }]
        );
    }

    fn samples() -> Vec<Msg> {
        let manifest = Manifest {
            size: 5000,
            chunk_bytes: 4096,
            chunk_hashes: vec![[1; 32], [2; 32]],
            file_hash: Some(crate::manifest::root_of(&[[1; 32], [2; 32]])),
            mode: 0o640,
            tree: None,
        };
        let tree_manifest = Manifest {
            tree: Some(std::sync::Arc::new(one_file_tree("zzzz", 5000))),
            ..manifest.clone()
        };
        let member = Member {
            id: 2,
            addr: IpAddr::from([10, 100, 0, 3]),
            port: 7878,
            local_addrs: vec![
                IpAddr::from([10, 200, 0, 6]),
                "fd00:200::6".parse().unwrap(),
            ],
            joined: true,
        };
        let v6_member = Member {
            id: 3,
            addr: "fd00:100::4".parse().unwrap(),
            local_addrs: vec![],
            ..member.clone()
        };
        vec![
            Msg::Auth { mac: [9; 32] },
            Msg::Pake { msg: vec![7; 33] },
            Msg::Join {
                port: 1,
                addrs: vec![
                    IpAddr::from(Ipv4Addr::LOCALHOST),
                    IpAddr::from(Ipv6Addr::LOCALHOST),
                ],
            },
            Msg::Welcome {
                you: 1,
                manifest: manifest.prefix(1),
                members: vec![member.clone()],
                relay: false,
                hash_ahead: None,
            },
            Msg::Welcome {
                you: 1,
                manifest: manifest.clone(),
                members: vec![member.clone(), v6_member],
                relay: true,
                hash_ahead: None,
            },
            Msg::Welcome {
                you: 3,
                manifest: manifest.prefix(0),
                members: vec![member.clone()],
                relay: true,
                hash_ahead: manifest.file_hash,
            },
            Msg::Welcome {
                you: 2,
                manifest: tree_manifest,
                members: vec![member.clone()],
                relay: true,
                hash_ahead: None,
            },
            Msg::Members {
                members: vec![member],
            },
            Msg::View {
                routes: vec![
                    RouteView {
                        member: 3,
                        reach: Reach::Behind,
                        ifindex: 4,
                        gateway: Some(IpAddr::from([10, 200, 0, 1])),
                        via_member: Some(1),
                    },
                    RouteView {
                        member: 4,
                        reach: Reach::ViaRouter,
                        ifindex: 5,
                        gateway: Some("fd00:200::1".parse().unwrap()),
                        via_member: None,
                    },
                    RouteView {
                        member: 5,
                        reach: Reach::Direct,
                        ifindex: 5,
                        gateway: None,
                        via_member: None,
                    },
                ],
            },
            Msg::Hello { id: 7 },
            Msg::Bitfield {
                bits: vec![0xff, 1],
            },
            Msg::Have { chunk: 5 },
            Msg::Request {
                chunks: vec![1, 2, 3],
            },
            Msg::RequestFresh { count: 4 },
            Msg::FreshGrant {
                chunks: vec![4, 5],
                exhausted: true,
            },
            Msg::Cancel { chunk: 9 },
            Msg::DontHave { chunk: 9 },
            Msg::Done { elapsed_ms: 1234 },
            Msg::Progress { have: 3 },
            Msg::SwarmDone,
            Msg::Fetching { chunks: vec![7] },
            Msg::FetchingBeyond { chunks: vec![8, 9] },
            Msg::Hashes {
                first: 2,
                hashes: vec![[4; 32], [5; 32]],
                file_hash: None,
            },
            Msg::Hashes {
                first: 4,
                hashes: vec![[6; 32]],
                file_hash: Some([7; 32]),
            },
            Msg::AskHashes,
            Msg::SourceDistance { hops: 3 },
            Msg::TracePaths { to: vec![2, 5] },
            Msg::PathsTraced {
                clean: vec![2],
                crossed: vec![5, 6],
                unknown: vec![9],
            },
            Msg::SenderPaths(SenderPaths {
                clean: vec![4],
                crossing: vec![7, 8],
                avoiding_source: vec![3],
            }),
            Msg::ProveAddress { nonce: [5; 16] },
            Msg::AddressProof { nonce: [6; 16] },
            Msg::WhoAreYou,
            Msg::IAm { id: 3 },
            Msg::Failed {
                reason: "disk full".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_frames() {
        let mut stream = Vec::new();
        for m in samples() {
            stream.extend(m.encode());
        }
        // Fed in two pieces, split mid-frame.
        let mut buf = stream[..stream.len() / 2].to_vec();
        let mut got = drain_frames(&mut buf).unwrap();
        buf.extend_from_slice(&stream[stream.len() / 2..]);
        got.extend(drain_frames(&mut buf).unwrap());
        assert!(buf.is_empty());
        assert_eq!(got, samples());
    }

    #[test]
    fn truncations_and_garbage_are_errors_not_panics() {
        for m in samples() {
            let frame = m.encode();
            let body = &frame[4..];
            for cut in 0..body.len() {
                assert!(Msg::decode(&body[..cut]).is_err(), "{m:?} cut at {cut}");
            }
        }
        // Lengths that promise more than the frame holds.
        assert_eq!(
            Msg::decode(&[9, 0xff, 0xff, 0xff, 0xff]),
            Err(WireError::Truncated)
        );
        let mut huge = (MAX_FRAME as u32 + 1).to_be_bytes().to_vec();
        huge.push(16);
        assert!(matches!(
            drain_frames(&mut huge),
            Err(WireError::TooLarge(_))
        ));
        // A View may not claim a Welcome's size, even before its bytes arrive.
        let mut view = ((8u32 << 20) + 1).to_be_bytes().to_vec();
        view.push(5);
        assert!(matches!(
            drain_frames(&mut view),
            Err(WireError::TooLarge(_))
        ));
        // Every sample is within its type's limit.
        for m in samples() {
            let frame = m.encode();
            assert!(frame.len() - 4 <= max_body(frame[4]), "{m:?}");
        }
    }

    /// A fuzz loop without a fuzzing engine, so it runs in every `cargo test`: random
    /// bytes and single-byte mutations of every valid frame. Decoding must never panic, and
    /// whatever decodes must re-encode to something that decodes the same.
    #[test]
    fn decoders_survive_random_and_mutated_input() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let check = |body: &[u8]| {
            if let Ok(m) = Msg::decode(body) {
                let frame = m.encode();
                assert_eq!(Msg::decode(&frame[4..]).as_ref(), Ok(&m));
            }
            let mut buf = body.to_vec();
            let _ = drain_frames(&mut buf);
        };
        for _ in 0..200_000 {
            let len = (next() % 64) as usize;
            let mut body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(b) = body.first_mut() {
                *b %= 20; // mostly known message types
            }
            check(&body);
        }
        for m in samples() {
            let frame = m.encode();
            for i in 0..frame.len() {
                for bit in 0..8 {
                    let mut mutated = frame.clone();
                    mutated[i] ^= 1 << bit;
                    check(&mutated[4..]);
                    check(&mutated);
                }
            }
        }
    }
}
