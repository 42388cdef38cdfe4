//! Chunks on disk. The source reads its file; a destination writes chunks at their offsets
//! into `<out>.floodclone-part`, records verified chunks in `<out>.floodclone-state` (so a
//! restart resumes), and only when every chunk verified (against hashes that make up the
//! whole file's) does it fsync and rename the file to `<out>`. A file at the final path is
//! therefore always complete.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::{
        fd::AsRawFd,
        unix::fs::{FileExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::{Mutex, RwLock},
};

use floodclone_sched::{ChunkId, ChunkSet};

use crate::manifest::{Manifest, ManifestError};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("output {0} already exists; remove it or choose another --out")]
    OutputExists(PathBuf),
    #[error(
        "{0} is a symbolic link or not a regular file; refusing to write through it (remove it)"
    )]
    NotAFile(PathBuf),
    #[error("another recv is writing {0} (its part file is locked); use another --out")]
    Locked(PathBuf),
    #[error("cannot create {path}: {source} (is the directory writable, with room for the file?)")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path} failed: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path} failed: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("finalize called before every chunk is held (a bug in floodclone)")]
    Incomplete,
    #[error("chunk {0} is not held")]
    NotHeld(ChunkId),
    #[error("source file changed: {path} no longer matches what was hashed at start (chunk {chunk}); the swarm stops rather than serve mixed content; run send again once the file is stable")]
    SourceChanged { path: PathBuf, chunk: ChunkId },
    #[error("no room for {bytes} bytes at {path}: {source}; free space or choose another --out")]
    NoRoom {
        path: PathBuf,
        bytes: u64,
        source: std::io::Error,
    },
}

/// Paths of a destination's temporary files for output `out`.
pub fn part_path(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".floodclone-part");
    p.into()
}

pub fn state_path(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".floodclone-state");
    p.into()
}

/// Reserves the file's blocks up front, so a full disk is a clear error at the start, not a
/// failed write halfway through. Filesystems that cannot reserve are left to fail later.
fn reserve(file: &File, bytes: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: a valid open descriptor; fallocate does not touch our memory.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, bytes as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(err),
    }
}

/// A node's chunk store, shared by its connection tasks.
pub struct ChunkStore {
    /// The file's size, chunking and mode: fixed from the start (its hashes are not kept
    /// up to date here; see `manifest`).
    layout: Manifest,
    /// The chunk hashes known so far, and the file's hash once they all are.
    manifest: RwLock<Manifest>,
    /// How many chunk hashes are known, for tasks waiting on one.
    known: tokio::sync::watch::Sender<u32>,
    file: File,
    path: PathBuf,
    /// Destination only: where the file goes when complete.
    out: Option<PathBuf>,
    have: Mutex<ChunkSet>,
    /// Held while a chunk is written (see [`ChunkStore::write_chunk`]).
    writing: Mutex<()>,
}

impl ChunkStore {
    /// The source's store: the whole file, every chunk held.
    pub fn source(path: &Path, manifest: Manifest) -> Result<Self, StorageError> {
        let file = File::open(path).map_err(|source| StorageError::Read {
            path: path.into(),
            source,
        })?;
        let n = manifest.chunk_count();
        Ok(Self::new(
            manifest,
            file,
            path.into(),
            None,
            ChunkSet::full(n),
        ))
    }

    fn new(
        manifest: Manifest,
        file: File,
        path: PathBuf,
        out: Option<PathBuf>,
        have: ChunkSet,
    ) -> Self {
        Self {
            layout: Manifest {
                chunk_hashes: Vec::new(),
                file_hash: None,
                ..manifest.clone()
            },
            known: tokio::sync::watch::Sender::new(manifest.known()),
            manifest: RwLock::new(manifest),
            file,
            path,
            out,
            have: Mutex::new(have),
            writing: Mutex::new(()),
        }
    }

    /// A destination's store for `out`, resuming from an earlier run of the same file when
    /// its state is there (which takes a complete manifest: the state names the file by its
    /// hash). Chunks recorded as held are verified again before they count.
    pub fn destination(out: &Path, manifest: Manifest) -> Result<Self, StorageError> {
        if out.exists() {
            return Err(StorageError::OutputExists(out.into()));
        }
        let part = part_path(out);
        let create_err = |source| StorageError::Create {
            path: part.clone(),
            source,
        };
        let resumable = read_state(&state_path(out), &manifest);
        // Never through a symlink planted at the part file's name, never a device or a
        // FIFO, never shared with another recv, never readable by others while partial.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&part)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => StorageError::NotAFile(part.clone()),
                _ => create_err(e),
            })?;
        if !file.metadata().map_err(create_err)?.file_type().is_file() {
            return Err(StorageError::NotAFile(part));
        }
        // SAFETY: a valid open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StorageError::Locked(out.into()));
        }
        if resumable.is_none() {
            file.set_len(0).map_err(create_err)?;
        }
        file.set_len(manifest.size).map_err(create_err)?;
        reserve(&file, manifest.size).map_err(|source| StorageError::NoRoom {
            path: part.clone(),
            bytes: manifest.size,
            source,
        })?;
        let mut have = ChunkSet::new(manifest.chunk_count());
        if let Some(claimed) = resumable {
            let mut buf = Vec::new();
            for c in claimed.iter() {
                let (off, len) = manifest.chunk_range(c);
                buf.resize(len, 0);
                if file.read_exact_at(&mut buf, off).is_ok() && manifest.verify_chunk(c, &buf) {
                    have.insert(c);
                }
            }
        }
        let store = Self::new(manifest, file, part, Some(out.into()), have);
        store.save_state()?;
        Ok(store)
    }

    /// The file's size and chunking (its hashes: [`ChunkStore::manifest`]).
    pub fn layout(&self) -> &Manifest {
        &self.layout
    }

    /// The manifest as far as it is known, its first `k` chunk hashes at most.
    pub fn manifest(&self, k: u32) -> Manifest {
        self.manifest.read().unwrap().prefix(k)
    }

    /// How many chunk hashes are known (chunks `0..known()`).
    pub fn known(&self) -> u32 {
        *self.known.borrow()
    }

    pub fn file_hash(&self) -> Option<[u8; 32]> {
        self.manifest.read().unwrap().file_hash
    }

    /// The hashes of chunks `from..to`.
    pub fn hashes(&self, from: u32, to: u32) -> Vec<[u8; 32]> {
        let m = self.manifest.read().unwrap();
        let to = to.min(m.known()) as usize;
        m.chunk_hashes[(from as usize).min(to)..to].to_vec()
    }

    /// More of the manifest ([`Manifest::extend`]). Returns whether it became complete.
    pub fn add_hashes(
        &self,
        first: u32,
        hashes: &[[u8; 32]],
        file_hash: Option<[u8; 32]>,
    ) -> Result<bool, ManifestError> {
        let mut m = self.manifest.write().unwrap();
        let completed = m.extend(first, hashes, file_hash)?;
        self.known.send_replace(m.known());
        Ok(completed)
    }

    /// The source's last step of hashing: the file's hash from the chunk hashes
    /// ([`Manifest::seal`]).
    pub fn seal_hashes(&self) -> Result<[u8; 32], ManifestError> {
        self.manifest.write().unwrap().seal()
    }

    /// Waits until chunk `c`'s hash is known (it may arrive just after the chunk does: they
    /// travel on different streams).
    pub async fn hash_known(&self, c: ChunkId) {
        let _ = self.known.subscribe().wait_for(|&k| k > c).await;
    }

    fn verify(&self, c: ChunkId, data: &[u8]) -> bool {
        self.manifest.read().unwrap().verify_chunk(c, data)
    }

    pub fn have(&self) -> ChunkSet {
        self.have.lock().unwrap().clone()
    }

    pub fn holds(&self, c: ChunkId) -> bool {
        self.have.lock().unwrap().contains(c)
    }

    pub fn is_complete(&self) -> bool {
        self.have.lock().unwrap().is_full()
    }

    /// Reads a held chunk (at the source: one it has hashed).
    pub fn read_chunk(&self, c: ChunkId) -> Result<Vec<u8>, StorageError> {
        if !self.holds(c) || c >= self.known() {
            return Err(StorageError::NotHeld(c));
        }
        let (off, len) = self.layout.chunk_range(c);
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, off)
            .map_err(|source| StorageError::Read {
                path: self.path.clone(),
                source,
            })?;
        // The source's file may change under it (edited, or a flaky disk): checked on every
        // read, so no destination ever gets a chunk the manifest does not vouch for. A
        // destination's chunks were verified when written.
        if self.out.is_none() && !self.verify(c, &buf) {
            return Err(StorageError::SourceChanged {
                path: self.path.clone(),
                chunk: c,
            });
        }
        Ok(buf)
    }

    /// Verifies and stores a chunk. Returns `Ok(false)` when it does not verify (nothing is
    /// written) and `Ok(true)` when it is now held.
    pub fn write_chunk(&self, c: ChunkId, data: &[u8]) -> Result<bool, StorageError> {
        if !self.verify(c, data) {
            return Ok(false);
        }
        if self.holds(c) {
            return Ok(true);
        }
        let (off, _) = self.layout.chunk_range(c);
        // One writer at a time: ext4 takes the inode's lock for every buffered write, and two
        // workers writing at once spun on it (6.6% of the machine at 2 Gbit/s; a waiting
        // thread sleeps on this lock instead).
        let _one_writer = self.writing.lock().unwrap();
        self.file
            .write_all_at(data, off)
            .map_err(|source| StorageError::Write {
                path: self.path.clone(),
                source,
            })?;
        // Start writing it to disk now, so the fsync before the final rename finds little
        // left to do: the disk keeps up with the network as it goes instead of taking a
        // whole file's write-back onto the end of the transfer (1 GiB: ~0.5 s here).
        // SAFETY: a valid open descriptor; the call only schedules write-back.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                off as i64,
                data.len() as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.have.lock().unwrap().insert(c);
        Ok(true)
    }

    /// Records which chunks are held (atomically: write then rename).
    pub fn save_state(&self) -> Result<(), StorageError> {
        let Some(out) = &self.out else {
            return Ok(());
        };
        // The state names the file by its hash: before that is known there is nothing a
        // restart could resume against.
        let Some(file_hash) = self.file_hash() else {
            return Ok(());
        };
        let state = state_path(out);
        let tmp = state.with_extension("floodclone-state.tmp");
        let mut body = file_hash.to_vec();
        body.extend_from_slice(&self.have().to_bytes());
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.sync_data()?;
            fs::rename(&tmp, &state)
        };
        write().map_err(|source| StorageError::Write {
            path: state.clone(),
            source,
        })
    }

    /// Checks the whole file, makes it durable and moves it to its final path. Returns the
    /// final path.
    pub fn finalize(&self) -> Result<PathBuf, StorageError> {
        let out = self.out.clone().expect("destination store");
        let read_err = |source| StorageError::Read {
            path: self.path.clone(),
            source,
        };
        // Every chunk verified against a manifest whose chunk hashes merge into the file's
        // hash ([`Manifest::is_consistent`]) before it was written: the file has that hash
        // without being read again (a read back would come from the page cache we just
        // wrote, not from the disk). What is left is to make it durable before its name
        // says it is whole; most of it already is ([`ChunkStore::write_chunk`]).
        if !self.is_complete() || self.file_hash().is_none() {
            return Err(StorageError::Incomplete);
        }
        self.file.sync_all().map_err(read_err)?;
        let write_err = |source| StorageError::Write {
            path: out.clone(),
            source,
        };
        self.file
            .set_permissions(fs::Permissions::from_mode(self.layout.mode & 0o777))
            .map_err(write_err)?;
        rename_noreplace(&self.path, &out).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) => StorageError::OutputExists(out.clone()),
            _ => write_err(e),
        })?;
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        let _ = fs::remove_file(state_path(&out));
        Ok(out)
    }
}

/// Renames `from` to `to` unless `to` exists, atomically (no window between a check and
/// the rename for another process to create `to`).
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt};
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput)
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Chunks recorded as held by an earlier run, if the state belongs to this file.
fn read_state(path: &Path, manifest: &Manifest) -> Option<ChunkSet> {
    let body = fs::read(path).ok()?;
    if body.len() < 32 || manifest.file_hash.is_none_or(|h| body[..32] != h) {
        return None;
    }
    Some(ChunkSet::from_bytes(manifest.chunk_count(), &body[32..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(name: &str, size: usize) -> (PathBuf, Vec<u8>, Manifest) {
        let dir = std::env::temp_dir().join(format!("fc-storage-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 253) as u8).collect();
        let src = dir.join("src");
        fs::write(&src, &data).unwrap();
        let m = Manifest::from_file(&src, Some(4096)).unwrap();
        (dir, data, m)
    }

    #[test]
    fn a_planted_symlink_a_second_writer_and_a_private_source_are_handled() {
        let (dir, data, mut m) = setup("hostile-fs", 4096 + 10);
        let out = dir.join("out");
        // A symlink at the part file's name: refused, its target untouched.
        let victim = dir.join("victim");
        fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, part_path(&out)).unwrap();
        assert!(matches!(
            ChunkStore::destination(&out, m.clone()),
            Err(StorageError::NotAFile(_))
        ));
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        fs::remove_file(part_path(&out)).unwrap();
        // Two writers for one output: the second is refused while the first lives.
        m.mode = 0o600;
        let first = ChunkStore::destination(&out, m.clone()).unwrap();
        assert!(matches!(
            ChunkStore::destination(&out, m.clone()),
            Err(StorageError::Locked(_))
        ));
        for c in 0..m.chunk_count() {
            let (o, l) = m.chunk_range(c);
            first
                .write_chunk(c, &data[o as usize..o as usize + l])
                .unwrap();
        }
        // The copy gets the source's permission bits.
        first.finalize().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[tokio::test]
    async fn a_chunk_verifies_once_its_hash_has_come() {
        let (dir, data, whole) = setup("pieces", 4096 * 3 + 10);
        let out = dir.join("out");
        let store = std::sync::Arc::new(ChunkStore::destination(&out, whole.prefix(1)).unwrap());
        let chunk = |c: u32| {
            let (o, l) = whole.chunk_range(c);
            data[o as usize..o as usize + l].to_vec()
        };
        assert!(store.write_chunk(0, &chunk(0)).unwrap());
        assert!(
            !store.write_chunk(1, &chunk(1)).unwrap(),
            "its hash is not here yet"
        );
        assert!(
            !state_path(&out).exists(),
            "no state before the file's hash is known"
        );
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.hash_known(3).await }
        });
        assert!(!store
            .add_hashes(1, &whole.chunk_hashes[1..3], None)
            .unwrap());
        assert!(!waiting.is_finished());
        assert!(store
            .add_hashes(3, &whole.chunk_hashes[3..], whole.file_hash)
            .unwrap());
        waiting.await.unwrap();
        for c in 1..4 {
            assert!(store.write_chunk(c, &chunk(c)).unwrap());
        }
        store.finalize().unwrap();
        assert_eq!(fs::read(&out).unwrap(), data);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn assembles_resumes_and_renames_only_when_whole() {
        let (dir, data, m) = setup("resume", 4096 * 3 + 10);
        let out = dir.join("out");
        let chunk = |c: u32| {
            let (o, l) = m.chunk_range(c);
            data[o as usize..o as usize + l].to_vec()
        };
        {
            let s = ChunkStore::destination(&out, m.clone()).unwrap();
            let mut bad = chunk(0);
            bad[3] ^= 0x40;
            assert!(!s.write_chunk(0, &bad).unwrap(), "corrupt chunk accepted");
            assert!(s.write_chunk(0, &chunk(0)).unwrap());
            assert!(s.write_chunk(2, &chunk(2)).unwrap());
            s.save_state().unwrap();
            assert!(!out.exists());
        }
        // A restart keeps what was verified.
        let s = ChunkStore::destination(&out, m.clone()).unwrap();
        assert_eq!(s.have().iter().collect::<Vec<_>>(), vec![0, 2]);
        s.write_chunk(1, &chunk(1)).unwrap();
        s.write_chunk(3, &chunk(3)).unwrap();
        assert!(s.is_complete());
        assert_eq!(s.finalize().unwrap(), out);
        assert_eq!(fs::read(&out).unwrap(), data);
        assert!(!part_path(&out).exists() && !state_path(&out).exists());
        // An existing output is refused.
        assert!(matches!(
            ChunkStore::destination(&out, m),
            Err(StorageError::OutputExists(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tampered_part_file_is_not_resumed() {
        let (dir, data, m) = setup("tamper", 4096 * 2);
        let out = dir.join("out");
        {
            let s = ChunkStore::destination(&out, m.clone()).unwrap();
            s.write_chunk(1, &data[4096..]).unwrap();
            s.save_state().unwrap();
        }
        let f = OpenOptions::new()
            .write(true)
            .open(part_path(&out))
            .unwrap();
        f.write_all_at(b"x", 4096 + 7).unwrap();
        let s = ChunkStore::destination(&out, m).unwrap();
        assert_eq!(s.have().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
