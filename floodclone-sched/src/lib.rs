//! The scheduling core of FloodClone, free of I/O so that the daemon, unit tests and the
//! simulator (`cargo xtask sim`) run the same code: chunk sets, the receiver-side
//! scheduler ([`puller::Puller`]), the source's fresh-chunk server and the overlay rule
//! that picks data neighbours from route lookups ([`overlay`]).

pub mod fresh;
pub mod overlay;
pub mod puller;
pub mod rate;

pub use fresh::FreshServer;
pub use puller::{Action, Arrival, Puller, SchedConfig};

/// A member of the swarm: 0 is the source, destinations are 1..=M in the order `send`
/// was given them. Every crate names members by this type.
pub type MemberId = u16;

/// The source's member id.
pub const SOURCE: MemberId = 0;

/// How often a destination reads its link rates from the kernel and tells the scheduler
/// (the daemon's tick; the simulator measures on the same one).
pub const MEASURE_TICK_MS: u64 = 200;

/// Window of the max filter on measured link rates: long enough to cover a few round trips
/// and queue drains, short enough to forget a link that got slower within seconds.
pub const RATE_WINDOW_S: f64 = 2.0;

/// Index of a chunk in the file.
pub type ChunkId = u32;

/// Smallest default chunk. Each relay forwards a chunk only once it has all of it and has
/// verified it, so a chunk costs one chunk-time of delay per hop while a transfer starts
/// and ends; smaller chunks shorten that ramp, until per-chunk work (a stream, a request,
/// an announcement to every neighbour, a hash) costs more than it wins (measured: README,
/// "Chunk size").
pub const MIN_DEFAULT_CHUNK_BYTES: u32 = 64 * 1024;

/// Chunks a default chunk size cuts a file into, at most, while its chunks are under
/// [`MAX_TARGET_CHUNK_BYTES`]. The ramp a chunk costs per hop is a chunk-time, so 1/1024 of
/// the transfer per hop at the links' rates, whatever those are; per-chunk work instead
/// grows with the rate (2-4 thousand 64 KiB chunks a second at 1-2 Gbit/s). Measured
/// (README, "Chunk size"): 64 MiB files in 256 chunks cost the shipped networks up to 0.06
/// at tens of Mbit/s; 256 MiB files in 1024 chunks did there as 64 MiB files in 1024 do,
/// and at 1-10 Gbit/s used 4-28% less CPU per GiB than in 4096.
pub const TARGET_DEFAULT_CHUNKS: u64 = 1024;

/// Largest chunk [`TARGET_DEFAULT_CHUNKS`] alone leads to (files of 1 GiB and more): a
/// receiver holds a chunk in memory until all of it has come and verified.
pub const MAX_TARGET_CHUNK_BYTES: u32 = 1 << 20;

/// Largest chunk a file may be cut into (and the largest default).
pub const MAX_CHUNK_BYTES: u32 = 64 << 20;

/// Most chunks a default chunk size gives: the manifest (32 bytes of hash per chunk) stays
/// at most 32 MiB and bitfields at most 128 KiB.
pub const MAX_DEFAULT_CHUNKS: u64 = 1 << 20;

/// The chunk size used when none is given: [`MIN_DEFAULT_CHUNK_BYTES`], doubled while the
/// file would have more than [`TARGET_DEFAULT_CHUNKS`] chunks up to
/// [`MAX_TARGET_CHUNK_BYTES`] (64 KiB up to 64 MiB, 256 KiB at 256 MiB, 1 MiB from 1 GiB),
/// then while it would have more than [`MAX_DEFAULT_CHUNKS`] (files over 1 TiB).
pub fn default_chunk_bytes(file_bytes: u64) -> u32 {
    let mut chunk = MIN_DEFAULT_CHUNK_BYTES as u64;
    let too_many = |chunk: u64, most: u64| file_bytes.div_ceil(chunk) > most;
    while too_many(chunk, TARGET_DEFAULT_CHUNKS) && chunk < MAX_TARGET_CHUNK_BYTES as u64 {
        chunk *= 2;
    }
    while too_many(chunk, MAX_DEFAULT_CHUNKS) && chunk < MAX_CHUNK_BYTES as u64 {
        chunk *= 2;
    }
    chunk as u32
}

/// The ids whose bits are set in a sequence of 64-bit words (word `w` holds ids
/// `64 w .. 64 w + 63`), in increasing order.
fn ids_in_words(words: impl Iterator<Item = u64>) -> impl Iterator<Item = ChunkId> {
    words.enumerate().flat_map(|(w, word)| {
        let mut rest = word;
        std::iter::from_fn(move || {
            if rest == 0 {
                return None;
            }
            let bit = rest.trailing_zeros();
            rest &= rest - 1;
            Some(w as ChunkId * 64 + bit)
        })
    })
}

/// A map keyed by chunk id, hashed by one multiplication: the scheduler looks chunks up
/// in these for every candidate it ranks, where SipHash (std's default, made to resist
/// keys chosen by an attacker) was a tenth of the simulator's time. Chunk ids come from
/// a manifest of at most 2^20 chunks; a peer choosing them gains no more than choosing
/// which chunks to announce.
pub type ChunkMap<V> = std::collections::HashMap<ChunkId, V, BuildChunkHasher>;

/// Builds [`ChunkHasher`]s.
pub type BuildChunkHasher = std::hash::BuildHasherDefault<ChunkHasher>;

/// Fibonacci hashing of a chunk id (or of any key written as integers).
#[derive(Clone, Copy, Debug, Default)]
pub struct ChunkHasher(u64);

impl std::hash::Hasher for ChunkHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        // The high bits (which hashbrown's control bytes use) depend on every bit of `n`.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A set of chunk ids as a bitfield.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkSet {
    bits: Vec<u64>,
    len: u32,
    count: u32,
}

impl ChunkSet {
    pub fn new(len: u32) -> Self {
        Self {
            bits: vec![0; (len as usize).div_ceil(64)],
            len,
            count: 0,
        }
    }

    pub fn full(len: u32) -> Self {
        let mut s = Self::new(len);
        for c in 0..len {
            s.insert(c);
        }
        s
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_full(&self) -> bool {
        self.count == self.len
    }

    pub fn contains(&self, c: ChunkId) -> bool {
        c < self.len && self.bits[(c / 64) as usize] & (1 << (c % 64)) != 0
    }

    /// Adds `c`; returns whether it was new. Ids out of range are ignored.
    pub fn insert(&mut self, c: ChunkId) -> bool {
        if c >= self.len || self.contains(c) {
            return false;
        }
        self.bits[(c / 64) as usize] |= 1 << (c % 64);
        self.count += 1;
        true
    }

    pub fn remove(&mut self, c: ChunkId) -> bool {
        if !self.contains(c) {
            return false;
        }
        self.bits[(c / 64) as usize] &= !(1 << (c % 64));
        self.count -= 1;
        true
    }

    /// Members in increasing order, a word at a time.
    pub fn iter(&self) -> impl Iterator<Item = ChunkId> + '_ {
        ids_in_words(self.bits.iter().copied())
    }

    /// Members of this set not in `other`, in increasing order, a word at a time.
    pub fn iter_without<'a>(&'a self, other: &'a ChunkSet) -> impl Iterator<Item = ChunkId> + 'a {
        let others = other.bits.iter().copied().chain(std::iter::repeat(0));
        ids_in_words(
            self.bits
                .iter()
                .zip(others)
                .map(|(&mine, theirs)| mine & !theirs),
        )
    }

    /// How many members of this set are not in `other`.
    pub fn count_without(&self, other: &ChunkSet) -> u32 {
        let others = other.bits.iter().copied().chain(std::iter::repeat(0));
        self.bits
            .iter()
            .zip(others)
            .map(|(&mine, theirs)| (mine & !theirs).count_ones())
            .sum()
    }

    /// Adds every member of `other` (a set of the same length).
    pub fn insert_all(&mut self, other: &ChunkSet) {
        for (mine, theirs) in self.bits.iter_mut().zip(&other.bits) {
            *mine |= theirs;
        }
        self.count = self.bits.iter().map(|w| w.count_ones()).sum();
    }

    /// Bytes for a bitfield message.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; (self.len as usize).div_ceil(8)];
        for c in self.iter() {
            out[(c / 8) as usize] |= 1 << (c % 8);
        }
        out
    }

    /// Parses a bitfield message bytes for a file of `len` chunks; bits past `len` are ignored.
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Self {
        let mut s = Self::new(len);
        for c in 0..len {
            if bytes
                .get((c / 8) as usize)
                .is_some_and(|b| b & (1 << (c % 8)) != 0)
            {
                s.insert(c);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sets_round_trip_as_bitfields() {
        let mut s = ChunkSet::new(70);
        for c in [0, 5, 63, 64, 69, 70, 1000] {
            s.insert(c);
        }
        assert_eq!(s.count(), 5);
        let back = ChunkSet::from_bytes(70, &s.to_bytes());
        assert_eq!(back, s);
        assert!(ChunkSet::full(3).is_full());
    }

    #[test]
    fn iterates_members_in_order() {
        let mut s = ChunkSet::new(200);
        for c in [199, 0, 64, 63, 128] {
            s.insert(c);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 63, 64, 128, 199]);
    }

    #[test]
    fn set_difference_and_union_work_a_word_at_a_time() {
        let mut a = ChunkSet::new(200);
        let mut b = ChunkSet::new(200);
        for c in [0, 1, 63, 64, 130, 199] {
            a.insert(c);
        }
        for c in [1, 64, 65, 199] {
            b.insert(c);
        }
        assert_eq!(a.iter_without(&b).collect::<Vec<_>>(), vec![0, 63, 130]);
        a.insert_all(&b);
        assert_eq!(a.count(), 7);
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            vec![0, 1, 63, 64, 65, 130, 199]
        );
    }

    #[test]
    fn chunk_maps_spread_neighbouring_ids() {
        use std::hash::BuildHasher;
        // hashbrown picks buckets from the low bits and filters by the top 7: consecutive
        // ids must differ in both.
        let h = BuildChunkHasher::default();
        let hashes: Vec<u64> = (0u32..256).map(|c| h.hash_one(c)).collect();
        let tops: std::collections::HashSet<u64> = hashes.iter().map(|x| x >> 57).collect();
        let lows: std::collections::HashSet<u64> = hashes.iter().map(|x| x & 255).collect();
        assert!(tops.len() > 64, "top bits: {}", tops.len());
        assert!(lows.len() > 128, "low bits: {}", lows.len());
    }

    #[test]
    fn default_chunk_size_keeps_a_thousand_chunks_up_to_a_mebibyte() {
        assert_eq!(default_chunk_bytes(0), 64 * 1024);
        assert_eq!(default_chunk_bytes(64 << 20), 64 * 1024);
        assert_eq!(default_chunk_bytes((64 << 20) + 1), 128 * 1024);
        assert_eq!(default_chunk_bytes(256 << 20), 256 * 1024);
        assert_eq!(default_chunk_bytes(1 << 30), 1 << 20);
        assert_eq!(default_chunk_bytes(1 << 40), 1 << 20);
        assert_eq!(default_chunk_bytes((1 << 40) + 1), 2 << 20);
        assert_eq!(default_chunk_bytes(u64::MAX), MAX_CHUNK_BYTES);
    }
}
