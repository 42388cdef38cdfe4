//! The manifest: file size, chunk size, the BLAKE3 hash of every chunk and of the whole file.
//! Every chunk is verified against it before it is stored or forwarded.
//!
//! A chunk's hash is its BLAKE3 *chaining value*: the hash of its subtree in the file's own
//! BLAKE3 tree (chunks are a power of two bytes, at offsets that are multiples of their
//! size, so each is one whole subtree). The whole-file hash, what `b3sum` prints, is the
//! chunk hashes merged up the tree ([`root_of`]), so each byte is hashed once at the source,
//! and a destination whose every chunk verified holds a file with that hash without reading
//! it again.
//!
//! A directory is sent as its tree's regular files laid end to end ([`crate::tree`]): the
//! manifest then carries the entry list, and the tree's identity (what `send` prints and
//! `recv --expect` takes) binds the files' bytes to their names, modes and times
//! ([`Manifest::content_hash`]).

use std::{path::Path, sync::Arc};

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};

use floodclone_sched::{default_chunk_bytes, ChunkId, MAX_CHUNK_BYTES};

use crate::{
    storage::Backing,
    tree::{Tree, TreeError},
};

/// Smallest chunk a file may be cut into.
pub const MIN_CHUNK_BYTES: u32 = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub size: u64,
    pub chunk_bytes: u32,
    /// The hashes of chunks `0..k`, `k <= chunk_count()`: the source sends them as it hashes
    /// the file, so its first chunks leave before its last are read.
    pub chunk_hashes: Vec<[u8; 32]>,
    /// The whole file's hash, once every chunk's is known.
    pub file_hash: Option<[u8; 32]>,
    /// The source file's permission bits (at most `0o777`): copies get the same, so a
    /// private file stays private. For a tree: its root directory's.
    pub mode: u32,
    /// A directory's entries, whose files' bytes are the `size` bytes chunked here; `None`
    /// for a single file.
    pub tree: Option<Arc<Tree>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("chunk size must be a power of two between 4 KiB and 64 MiB (4KiB, 8KiB, ... 64MiB), got {0}")]
    ChunkSize(u32),
    #[error("{chunks} chunks of {chunk_bytes} bytes are too many (at most {MAX_CHUNKS}): use a larger --chunk-size, or leave it out")]
    TooManyChunks { chunks: u64, chunk_bytes: u32 },
    #[error(
        "{path} changed size while it was being hashed; run send again once the file is stable"
    )]
    Changed { path: String },
    #[error(
        "the source's chunk hashes do not fit together ({0}); nothing from it can be verified"
    )]
    Inconsistent(&'static str),
    #[error("{0}")]
    Tree(#[from] TreeError),
    #[error("the tree's entry list takes {bytes} bytes, more than the {MAX_TREE_BYTES} a manifest may carry: send fewer entries at once (one subdirectory at a time)")]
    TreeTooLarge { bytes: usize },
}

/// Largest entry list a manifest carries (within [`crate::wire::MAX_FRAME`] beside the
/// chunk hashes): ~300,000 entries of typical path lengths.
pub const MAX_TREE_BYTES: usize = 24 << 20;

/// Most chunks a file may have: the manifest (32 bytes of hash per chunk) must fit in one
/// control frame ([`crate::wire::MAX_FRAME`]) with room to spare.
pub const MAX_CHUNKS: u64 = 2_000_000;

impl Manifest {
    /// What is sent, as `b3:<hex>`: a file's hash (what `b3sum` prints) or a tree's
    /// ([`Manifest::content_hash`]); what `recv --expect` takes. `None` until every chunk
    /// is hashed.
    pub fn b3(&self) -> Option<String> {
        self.content_hash().map(|h| b3(&h))
    }

    /// The identity of what is sent, once every chunk is hashed: a single file's BLAKE3;
    /// for a tree, its bytes' hash bound to the entry list and the root's mode
    /// ([`Tree::root_hash`]), so no name, mode, time or link can change without it.
    pub fn content_hash(&self) -> Option<[u8; 32]> {
        let stream = self.file_hash?;
        Some(match &self.tree {
            Some(tree) => tree.root_hash(&stream, self.mode),
            None => stream,
        })
    }

    /// Hashes `path` in one streaming pass; memory stays at one chunk. Without a chunk
    /// size, the default for the file's size ([`default_chunk_bytes`]).
    pub fn from_file(path: &Path, chunk_bytes: Option<u32>) -> Result<Self, ManifestError> {
        let mut hasher = ChunkHasher::open(path, chunk_bytes)?;
        let mut manifest = hasher.layout();
        while let Some(h) = hasher.next_hash()? {
            manifest.chunk_hashes.push(h);
        }
        manifest.seal()?;
        Ok(manifest)
    }

    pub fn chunk_count(&self) -> u32 {
        self.size.div_ceil(self.chunk_bytes as u64) as u32
    }

    /// How many chunks' hashes are known (chunks `0..known()`).
    pub fn known(&self) -> u32 {
        self.chunk_hashes.len() as u32
    }

    pub fn is_complete(&self) -> bool {
        self.file_hash.is_some()
    }

    /// The first `k` chunk hashes of this manifest, and the file's hash if that is all of
    /// them: what a member told of hashes `0..k` knows.
    pub fn prefix(&self, k: u32) -> Manifest {
        let k = k.min(self.known());
        Manifest {
            chunk_hashes: self.chunk_hashes[..k as usize].to_vec(),
            file_hash: self.file_hash.filter(|_| k == self.chunk_count()),
            ..self.clone()
        }
    }

    /// Adds the hashes of chunks `first..` (and the file's, with the last of them). Hashes
    /// already known must be repeated exactly; none may be skipped. Returns whether the
    /// manifest became complete. What it refuses leaves the manifest as it was (a
    /// neighbour's forged list must not stay in it).
    pub fn extend(
        &mut self,
        first: u32,
        hashes: &[[u8; 32]],
        file_hash: Option<[u8; 32]>,
    ) -> Result<bool, ManifestError> {
        if first > self.known() || first as u64 + hashes.len() as u64 > self.chunk_count() as u64 {
            return Err(ManifestError::Inconsistent(
                "chunk hashes skipped or past the end",
            ));
        }
        let known = self.chunk_hashes.len();
        let repeated = (known - first as usize).min(hashes.len());
        if self.chunk_hashes[first as usize..][..repeated] != hashes[..repeated] {
            return Err(ManifestError::Inconsistent("a chunk's hash changed"));
        }
        if self
            .file_hash
            .is_some_and(|old| file_hash.is_some_and(|f| f != old))
        {
            return Err(ManifestError::Inconsistent("the file's hash changed"));
        }
        self.chunk_hashes.extend_from_slice(&hashes[repeated..]);
        let Some(f) = file_hash else {
            return Ok(false);
        };
        if self.known() != self.chunk_count() || root_of(&self.chunk_hashes) != f {
            self.chunk_hashes.truncate(known);
            return Err(ManifestError::Inconsistent(
                "the chunk hashes do not make up the file's hash",
            ));
        }
        Ok(self.file_hash.replace(f).is_none())
    }

    /// The file's hash from its chunk hashes, once all of them are here: the source's own,
    /// computed once (a member is given the file's hash and checks it, [`Manifest::extend`]).
    pub fn seal(&mut self) -> Result<[u8; 32], ManifestError> {
        if self.known() != self.chunk_count() {
            return Err(ManifestError::Inconsistent(
                "sealed before every chunk was hashed",
            ));
        }
        Ok(*self
            .file_hash
            .get_or_insert_with(|| root_of(&self.chunk_hashes)))
    }

    /// Whether `other` can describe the same file: the same layout, the same hashes where
    /// both know them.
    pub fn agrees_with(&self, other: &Manifest) -> bool {
        let common = self.known().min(other.known()) as usize;
        self.size == other.size
            && self.chunk_bytes == other.chunk_bytes
            && self.mode == other.mode
            && self.tree == other.tree
            && self.chunk_hashes[..common] == other.chunk_hashes[..common]
            && (self.file_hash.is_none()
                || other.file_hash.is_none()
                || self.file_hash == other.file_hash)
    }

    /// Bytes held by a node holding `chunks` chunks (exact unless the short last chunk is
    /// among them; for progress reports).
    pub fn bytes_in(&self, chunks: u32) -> u64 {
        (chunks as u64 * self.chunk_bytes as u64).min(self.size)
    }

    /// Byte offset and length of chunk `c`.
    pub fn chunk_range(&self, c: ChunkId) -> (u64, usize) {
        let off = c as u64 * self.chunk_bytes as u64;
        let len = (self.size - off).min(self.chunk_bytes as u64) as usize;
        (off, len)
    }

    /// Whether `data` is chunk `c` (false while its hash is not known).
    pub fn verify_chunk(&self, c: ChunkId, data: &[u8]) -> bool {
        let (off, len) = self.chunk_range(c);
        self.chunk_hashes.get(c as usize).is_some_and(|h| {
            data.len() == len && chunk_hash(self.chunk_count() == 1, off, data) == *h
        })
    }

    /// Consistency of a decoded manifest: a chunk size that makes chunks whole subtrees,
    /// no more hashes than chunks, and with all of them, the file's hash they merge into
    /// (so chunks that verify make up the file `recv --expect` names).
    pub fn is_consistent(&self) -> bool {
        chunk_size_ok(self.chunk_bytes)
            && self
                .tree
                .as_ref()
                .is_none_or(|t| t.total_bytes() == self.size)
            && self.size.div_ceil(self.chunk_bytes as u64) <= MAX_CHUNKS
            && self.known() <= self.chunk_count()
            && match self.file_hash {
                Some(f) => self.known() == self.chunk_count() && root_of(&self.chunk_hashes) == f,
                None => true,
            }
    }
}

/// What the chunk hashes a neighbour gave add up to so far ([`gather_offered`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// More are to come.
    Partial,
    /// Every chunk's hash, making up the file's hash the source sent ahead.
    Whole,
    /// Out of order, past the end, or not the file's: refused.
    Refused,
}

/// Adds chunk hashes `first..` a neighbour gave (the file's hash with the last of them)
/// to those it gave before (`gathered`, from chunk 0 on). They are kept only whole and
/// making up `ahead`, the file's hash from the source: a token holder may lie.
pub fn gather_offered(
    gathered: &mut Vec<[u8; 32]>,
    first: u32,
    hashes: &[[u8; 32]],
    file_hash: Option<[u8; 32]>,
    ahead: [u8; 32],
    chunk_count: u32,
) -> Offered {
    let count = chunk_count as usize;
    if first as usize != gathered.len() || gathered.len() + hashes.len() > count {
        return Offered::Refused;
    }
    gathered.extend_from_slice(hashes);
    match file_hash {
        None => Offered::Partial,
        Some(f) if f == ahead && gathered.len() == count && root_of(gathered) == ahead => {
            Offered::Whole
        }
        Some(_) => Offered::Refused,
    }
}

/// Reads a file's (or a tree's) chunks in order and hashes each once: the source's one
/// pass over it.
pub struct ChunkHasher {
    input: Backing,
    layout: Manifest,
    next: u32,
    buf: Vec<u8>,
}

impl ChunkHasher {
    /// Opens `path`, a file or a directory (its tree is listed, [`Tree::scan`]), and checks
    /// its chunking (without a chunk size, the default for its size,
    /// [`default_chunk_bytes`]); reads no file's bytes yet.
    pub fn open(path: &Path, chunk_bytes: Option<u32>) -> Result<Self, ManifestError> {
        let err = |source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(err)?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        let (input, tree) = if meta.is_dir() {
            let tree = Arc::new(Tree::scan(path)?);
            (
                Backing::open_tree(path, tree.clone()).map_err(err)?,
                Some(tree),
            )
        } else {
            (Backing::open_file(path).map_err(err)?, None)
        };
        let size = tree.as_ref().map_or(meta.len(), |t| t.total_bytes());
        let chunk_bytes = chunk_bytes.unwrap_or_else(|| default_chunk_bytes(size));
        if !chunk_size_ok(chunk_bytes) {
            return Err(ManifestError::ChunkSize(chunk_bytes));
        }
        let chunks = size.div_ceil(chunk_bytes as u64);
        if chunks > MAX_CHUNKS {
            return Err(ManifestError::TooManyChunks {
                chunks,
                chunk_bytes,
            });
        }
        // The Welcome carries the entry list beside every chunk's hash, in one frame.
        if let Some(bytes) = tree.as_ref().map(|t| t.encode().len()) {
            let welcome = bytes as u64 + 32 * chunks + (1 << 20);
            if bytes > MAX_TREE_BYTES || welcome > crate::wire::MAX_FRAME as u64 {
                return Err(ManifestError::TreeTooLarge { bytes });
            }
        }
        Ok(Self {
            input,
            layout: Manifest {
                size,
                chunk_bytes,
                chunk_hashes: Vec::new(),
                file_hash: None,
                mode,
                tree,
            },
            next: 0,
            buf: vec![0; chunk_bytes as usize],
        })
    }

    /// The file's size, chunking and mode (a tree's entries), no hashes yet.
    pub fn layout(&self) -> Manifest {
        self.layout.clone()
    }

    /// The next chunk's hash, `None` after the last.
    pub fn next_hash(&mut self) -> Result<Option<[u8; 32]>, ManifestError> {
        if self.next >= self.layout.chunk_count() {
            return Ok(None);
        }
        let (off, len) = self.layout.chunk_range(self.next);
        let buf = &mut self.buf[..len];
        self.input
            .read_exact_at(buf, off)
            .map_err(|(path, e)| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => ManifestError::Changed {
                    path: path.display().to_string(),
                },
                _ => ManifestError::Read {
                    path: path.display().to_string(),
                    source: e,
                },
            })?;
        self.next += 1;
        Ok(Some(chunk_hash(self.layout.chunk_count() == 1, off, buf)))
    }
}

/// `b3:<hex>` of a whole-file hash.
pub fn b3(hash: &[u8; 32]) -> String {
    format!("b3:{}", hex(hash))
}

/// Chunks are whole subtrees of the BLAKE3 tree only when their size is a power of two (of
/// at least BLAKE3's own 1 KiB chunk).
fn chunk_size_ok(chunk_bytes: u32) -> bool {
    (MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes) && chunk_bytes.is_power_of_two()
}

/// The hash of the chunk `data` that starts `offset` bytes into the file: its subtree's
/// chaining value, or, when it is the file's only chunk, the file's hash itself.
fn chunk_hash(only_chunk: bool, offset: u64, data: &[u8]) -> [u8; 32] {
    if only_chunk {
        return *blake3::hash(data).as_bytes();
    }
    blake3::Hasher::new()
        .set_input_offset(offset)
        .update(data)
        .finalize_non_root()
}

/// The whole file's BLAKE3 hash from its chunks' hashes: BLAKE3's tree is left-complete,
/// so each parent's left side holds the largest power of two of chunks short of all of
/// them.
pub fn root_of(chunk_hashes: &[[u8; 32]]) -> [u8; 32] {
    fn subtree(cvs: &[[u8; 32]]) -> [u8; 32] {
        if cvs.len() == 1 {
            return cvs[0];
        }
        let (l, r) = cvs.split_at(left_len(cvs.len()));
        merge_subtrees_non_root(&subtree(l), &subtree(r), Mode::Hash)
    }
    fn left_len(n: usize) -> usize {
        1 << (usize::BITS - 1 - (n - 1).leading_zeros())
    }
    match chunk_hashes.len() {
        0 => *blake3::hash(&[]).as_bytes(),
        1 => chunk_hashes[0],
        n => {
            let (l, r) = chunk_hashes.split_at(left_len(n));
            *merge_subtrees_root(&subtree(l), &subtree(r), Mode::Hash).as_bytes()
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A whole-file hash given as `b3:<64 hex digits>` (or the bare digits, as `b3sum` prints).
pub fn parse_b3(s: &str) -> Option<[u8; 32]> {
    let digits = s.strip_prefix("b3:").unwrap_or(s);
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(digits.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b3_round_trips_and_rejects_malformed() {
        let h: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        assert_eq!(parse_b3(&b3(&h)), Some(h));
        assert_eq!(parse_b3(b3(&h).trim_start_matches("b3:")), Some(h));
        assert_eq!(parse_b3("b3:00"), None);
        assert_eq!(parse_b3(&"zz".repeat(32)), None);
    }

    #[test]
    fn too_many_chunks_is_refused_before_hashing() {
        let p = std::env::temp_dir().join(format!("fc-manifest-big-{}", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        // Sparse: nothing is written, and the check comes before the first read.
        f.set_len((MAX_CHUNKS + 1) * 4096).unwrap();
        let e = Manifest::from_file(&p, Some(4096)).unwrap_err();
        std::fs::remove_file(&p).unwrap();
        assert!(
            matches!(e, ManifestError::TooManyChunks { chunks, .. } if chunks == MAX_CHUNKS + 1)
        );
        assert!(e.to_string().contains("--chunk-size"));
    }

    #[test]
    fn chunking_covers_the_file_exactly() {
        let dir = std::env::temp_dir().join(format!("fc-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Up to 13 chunks: trees of several levels, complete and not, the last chunk short
        // or whole.
        let sizes = [
            0usize,
            1,
            4096,
            4097,
            3 * 4096 + 5,
            4 * 4096,
            5 * 4096,
            13 * 4096 - 1,
        ];
        for size in sizes {
            let p = dir.join(format!("f{size}"));
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(&p, &data).unwrap();
            let m = Manifest::from_file(&p, Some(4096)).unwrap();
            assert!(m.is_consistent(), "size {size}");
            assert_eq!(m.size, size as u64);
            assert_eq!(m.file_hash, Some(*blake3::hash(&data).as_bytes()));
            for c in 0..m.chunk_count() {
                let (off, len) = m.chunk_range(c);
                assert!(m.verify_chunk(c, &data[off as usize..off as usize + len]));
            }
            if size > 0 {
                let mut bad = data[..m.chunk_range(0).1].to_vec();
                bad[0] ^= 1;
                assert!(!m.verify_chunk(0, &bad));
            }
            if m.chunk_count() > 1 {
                // A chunk's hash is bound to its place: chunk 0's bytes are not chunk 1.
                assert!(!m.verify_chunk(1, &data[..4096]));
                // Chunk hashes that do not merge into the file's hash are refused.
                let mut lying = m.clone();
                lying.chunk_hashes.swap(0, 1);
                assert!(!lying.is_consistent());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hashes_come_in_pieces_that_must_fit() {
        let dir = std::env::temp_dir().join(format!("fc-manifest-pieces-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        let data: Vec<u8> = (0..5 * 4096 + 9).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let whole = Manifest::from_file(&p, Some(4096)).unwrap();
        let h = &whole.chunk_hashes;
        let mut m = ChunkHasher::open(&p, Some(4096)).unwrap().layout();
        assert!(m.is_consistent() && !m.is_complete() && m.b3().is_none());
        assert!(!m.verify_chunk(0, &data[..4096]), "no hash yet");
        assert!(!m.extend(0, &h[..2], None).unwrap());
        assert!(m.verify_chunk(1, &data[4096..8192]));
        assert!(!m.verify_chunk(2, &data[8192..12288]));
        // A gap, a changed hash, or a file hash the chunks do not make are refused.
        // Each leaves the manifest as it was.
        let before = m.clone();
        assert!(m.extend(3, &h[3..4], None).is_err());
        assert!(m.extend(1, &[[0; 32]], None).is_err());
        assert!(m.extend(2, &h[2..], Some([7; 32])).is_err());
        let mut forged = h[2..].to_vec();
        forged[1][0] ^= 1;
        assert!(m.extend(2, &forged, whole.file_hash).is_err());
        assert_eq!(m, before);
        // Repeats are fine; the last piece brings the file's hash.
        assert!(m.agrees_with(&whole) && whole.agrees_with(&m));
        assert!(m.extend(1, &h[1..], whole.file_hash).unwrap());
        assert_eq!(m, whole);
        assert_eq!(whole.prefix(whole.chunk_count()), whole);
        // The source seals its own: only with every chunk hashed.
        let mut own = whole.prefix(3);
        assert!(own.seal().is_err());
        own.extend(3, &h[3..], None).unwrap();
        assert_eq!(Some(own.seal().unwrap()), whole.file_hash);
        assert_eq!(own, whole);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_neighbours_hashes_are_kept_only_whole_and_making_up_the_files_hash() {
        let hashes: Vec<[u8; 32]> = (0..5u8).map(|i| [i; 32]).collect();
        let ahead = root_of(&hashes);
        // In two pieces, the file's hash with the last: whole.
        let mut g = Vec::new();
        assert_eq!(
            gather_offered(&mut g, 0, &hashes[..3], None, ahead, 5),
            Offered::Partial
        );
        assert_eq!(
            gather_offered(&mut g, 3, &hashes[3..], Some(ahead), ahead, 5),
            Offered::Whole
        );
        assert_eq!(g, hashes);
        // One hash changed, with the true file's hash or a matching forged one: refused.
        let mut forged = hashes.clone();
        forged[2] = [9; 32];
        let mut g = Vec::new();
        let refused = gather_offered(&mut g, 0, &forged, Some(ahead), ahead, 5);
        assert_eq!(refused, Offered::Refused);
        let mut g = Vec::new();
        let own = root_of(&forged);
        assert_eq!(
            gather_offered(&mut g, 0, &forged, Some(own), ahead, 5),
            Offered::Refused
        );
        // A gap, too many, or the file's hash before every chunk's: refused.
        let mut g = Vec::new();
        assert_eq!(
            gather_offered(&mut g, 1, &hashes[1..], Some(ahead), ahead, 5),
            Offered::Refused
        );
        let mut g = Vec::new();
        let six = [hashes.clone(), vec![[7; 32]]].concat();
        assert_eq!(
            gather_offered(&mut g, 0, &six, Some(ahead), ahead, 5),
            Offered::Refused
        );
        let mut g = Vec::new();
        assert_eq!(
            gather_offered(&mut g, 0, &hashes[..4], Some(ahead), ahead, 5),
            Offered::Refused
        );
    }

    #[test]
    fn chunk_sizes_are_powers_of_two() {
        let p = std::env::temp_dir().join(format!("fc-manifest-pow-{}", std::process::id()));
        std::fs::write(&p, [7u8; 20_000]).unwrap();
        let e = Manifest::from_file(&p, Some(6000)).unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
        assert!(Manifest::from_file(&p, Some(8192)).unwrap().is_consistent());
        std::fs::remove_file(&p).unwrap();
    }
}
