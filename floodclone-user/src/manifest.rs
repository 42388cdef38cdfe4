//! The manifest: file size, chunk size, the BLAKE3 hash of every chunk and of the whole file.
//! Every chunk is verified against it before it is stored or forwarded.
//!
//! A chunk's hash is its BLAKE3 *chaining value*: the hash of its subtree in the file's own
//! BLAKE3 tree (chunks are a power of two bytes, at offsets that are multiples of their
//! size, so each is one whole subtree). The whole-file hash, what `b3sum` prints, is the
//! chunk hashes merged up the tree ([`root_of`]), so each byte is hashed once at the source,
//! and a destination whose every chunk verified holds a file with that hash without reading
//! it again.

use std::{fs::File, io::Read, path::Path};

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};

use floodclone_sched::{default_chunk_bytes, ChunkId, MAX_CHUNK_BYTES};

/// Smallest chunk a file may be cut into.
pub const MIN_CHUNK_BYTES: u32 = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub size: u64,
    pub chunk_bytes: u32,
    pub chunk_hashes: Vec<[u8; 32]>,
    pub file_hash: [u8; 32],
    /// The source file's permission bits (at most `0o777`): copies get the same, so a
    /// private file stays private.
    pub mode: u32,
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
}

/// Most chunks a file may have: the manifest (32 bytes of hash per chunk) must fit in one
/// control frame ([`crate::wire::MAX_FRAME`]) with room to spare.
pub const MAX_CHUNKS: u64 = 2_000_000;

impl Manifest {
    /// The whole file's hash as `b3:<hex>`: what `b3sum` prints, and `recv --expect` takes.
    pub fn b3(&self) -> String {
        format!("b3:{}", hex(&self.file_hash))
    }

    /// Hashes `path` in one streaming pass; memory stays at one chunk. Without a chunk
    /// size, the default for the file's size ([`default_chunk_bytes`]).
    pub fn from_file(path: &Path, chunk_bytes: Option<u32>) -> Result<Self, ManifestError> {
        let err = |source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        };
        let mut file = File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        let file_bytes = meta.len();
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        let chunk_bytes = chunk_bytes.unwrap_or_else(|| default_chunk_bytes(file_bytes));
        if !chunk_size_ok(chunk_bytes) {
            return Err(ManifestError::ChunkSize(chunk_bytes));
        }
        let chunks = file_bytes.div_ceil(chunk_bytes as u64);
        if chunks > MAX_CHUNKS {
            return Err(ManifestError::TooManyChunks {
                chunks,
                chunk_bytes,
            });
        }
        let one_chunk = chunks <= 1;
        let mut chunk_hashes = Vec::new();
        let mut buf = vec![0u8; chunk_bytes as usize];
        let mut size = 0u64;
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                let n = file.read(&mut buf[filled..]).map_err(err)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            chunk_hashes.push(chunk_hash(one_chunk, size, &buf[..filled]));
            size += filled as u64;
            if filled < buf.len() {
                break;
            }
        }
        Ok(Self {
            size,
            chunk_bytes,
            file_hash: root_of(&chunk_hashes),
            chunk_hashes,
            mode,
        })
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunk_hashes.len() as u32
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

    pub fn verify_chunk(&self, c: ChunkId, data: &[u8]) -> bool {
        let (off, len) = self.chunk_range(c);
        self.chunk_hashes.get(c as usize).is_some_and(|h| {
            data.len() == len && chunk_hash(self.chunk_hashes.len() == 1, off, data) == *h
        })
    }

    /// Consistency of a decoded manifest: the chunk count must match size and chunk size,
    /// and the chunk hashes must merge into the whole-file hash (so chunks that verify make
    /// up the file `recv --expect` names).
    pub fn is_consistent(&self) -> bool {
        chunk_size_ok(self.chunk_bytes)
            && self.size.div_ceil(self.chunk_bytes as u64) == self.chunk_hashes.len() as u64
            && root_of(&self.chunk_hashes) == self.file_hash
    }

    /// A short identity of this file (hex of the whole-file hash's first 8 bytes).
    pub fn short_id(&self) -> String {
        self.file_hash[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Lower-case hex of `bytes`.
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
        let m = Manifest {
            size: 0,
            chunk_bytes: MIN_CHUNK_BYTES,
            chunk_hashes: Vec::new(),
            file_hash: h,
            mode: 0o600,
        };
        assert_eq!(parse_b3(&m.b3()), Some(h));
        assert_eq!(parse_b3(m.b3().trim_start_matches("b3:")), Some(h));
        assert_eq!(parse_b3("b3:00"), None);
        assert_eq!(parse_b3(&"zz".repeat(32)), None);
    }

    #[test]
    fn too_many_chunks_is_refused_before_hashing() {
        let p = std::env::temp_dir().join(format!("fc-manifest-big-{}", std::process::id()));
        let f = File::create(&p).unwrap();
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
            assert_eq!(m.file_hash, *blake3::hash(&data).as_bytes());
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
    fn chunk_sizes_are_powers_of_two() {
        let p = std::env::temp_dir().join(format!("fc-manifest-pow-{}", std::process::id()));
        std::fs::write(&p, [7u8; 20_000]).unwrap();
        let e = Manifest::from_file(&p, Some(6000)).unwrap_err();
        assert!(e.to_string().contains("power of two"), "{e}");
        assert!(Manifest::from_file(&p, Some(8192)).unwrap().is_consistent());
        std::fs::remove_file(&p).unwrap();
    }
}
