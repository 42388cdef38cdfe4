//! The manifest: file size, chunk size, the BLAKE3 hash of every chunk and of the whole file.
//! Every chunk is verified against it before it is stored or forwarded.

use std::{fs::File, io::Read, path::Path};

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
    #[error("chunk size must be between 4 KiB and 64 MiB, got {0}")]
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
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes) {
            return Err(ManifestError::ChunkSize(chunk_bytes));
        }
        let chunks = file_bytes.div_ceil(chunk_bytes as u64);
        if chunks > MAX_CHUNKS {
            return Err(ManifestError::TooManyChunks {
                chunks,
                chunk_bytes,
            });
        }
        let mut whole = blake3::Hasher::new();
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
            whole.update(&buf[..filled]);
            chunk_hashes.push(*blake3::hash(&buf[..filled]).as_bytes());
            size += filled as u64;
            if filled < buf.len() {
                break;
            }
        }
        Ok(Self {
            size,
            chunk_bytes,
            chunk_hashes,
            file_hash: *whole.finalize().as_bytes(),
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
        self.chunk_hashes
            .get(c as usize)
            .is_some_and(|h| data.len() == self.chunk_range(c).1 && blake3::hash(data) == *h)
    }

    /// Consistency of a decoded manifest: the chunk count must match size and chunk size.
    pub fn is_consistent(&self) -> bool {
        (MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&self.chunk_bytes)
            && self.size.div_ceil(self.chunk_bytes as u64) == self.chunk_hashes.len() as u64
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
        for size in [0usize, 1, 4096, 4097, 3 * 4096 + 5] {
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
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
