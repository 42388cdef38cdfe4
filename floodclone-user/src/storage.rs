//! Chunks on disk. The source reads its file; a destination writes chunks at their offsets
//! into `<out>.floodclone-part`, records verified chunks in `<out>.floodclone-state` (so a
//! restart resumes), and only when every chunk verified (against hashes that make up the
//! whole file's) does it fsync and rename the file to `<out>`. A file at the final path is
//! therefore always complete.
//!
//! A tree ([`crate::tree`]) is the same with `<out>.floodclone-part` a staging directory:
//! its directories and files are made when the manifest arrives (private, empty, at their
//! sizes), chunks are written into the files they span, and once every chunk verified the
//! files are made durable, given their modes and times, the links made, and the directory
//! renamed to `<out>` in one step.

use std::{
    collections::{HashMap, VecDeque},
    fs::{self, File, OpenOptions},
    io::Write,
    mem::MaybeUninit,
    os::{
        fd::AsRawFd,
        unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
};

use bytes::Bytes;
use floodclone_sched::{ChunkId, ChunkSet};

use crate::{
    manifest::{Manifest, ManifestError},
    tree::{EntryKind, Tree},
};

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
    #[error("source file changed: {path} no longer matches what was hashed at start (chunk {chunk}: edited, or its disk returned other bytes); the swarm stops rather than serve mixed content; run send again once the file is stable")]
    SourceChanged { path: PathBuf, chunk: ChunkId },
    #[error("{0} is left from receiving something else; remove it (or choose another --out)")]
    Leftover(PathBuf),
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

/// Where a node's bytes are: one file, or a tree's regular files laid end to end. A tree's
/// files are opened relative to its directory's descriptor, so a destination keeps serving
/// them after its staging directory is renamed to `--out`; never through a symbolic link
/// at a file's own name (and [`Tree::new`] admits no entry under a link).
pub enum Backing {
    File {
        file: File,
        path: PathBuf,
        /// Bytes written since the last [`drop_behind`].
        unwritten: AtomicU64,
    },
    Tree {
        /// The tree's root directory, open (a destination's holds its `recv`'s lock).
        dir: File,
        /// Where the root was when opened, for messages.
        root: PathBuf,
        tree: Arc<Tree>,
    },
}

impl Backing {
    /// A single file, already open: to be read, or written as a destination writes
    /// ([`Self::write_all_at`]) when opened for writing.
    pub fn from_file(file: File, path: &Path) -> Self {
        Self::File {
            file,
            path: path.into(),
            unwritten: AtomicU64::new(0),
        }
    }

    pub fn open_file(path: &Path) -> std::io::Result<Self> {
        Ok(Self::from_file(File::open(path)?, path))
    }

    /// A source's tree: `root` as the user named it (a link to a directory is followed,
    /// as for a file); nothing under it is.
    pub fn open_tree(root: &Path, tree: Arc<Tree>) -> std::io::Result<Self> {
        Ok(Self::Tree {
            dir: OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY)
                .open(root)?,
            root: root.into(),
            tree,
        })
    }

    /// Bytes `off..off + buf.len()`; an error names the file it came from.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<(), (PathBuf, std::io::Error)> {
        // SAFETY: `[u8]` and `[MaybeUninit<u8>]` have one layout, and `read_uninit_at` only
        // ever writes initialised bytes into it.
        let buf = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
        self.read_uninit_at(buf, off)
    }

    /// Bytes `off..off + len` in a new buffer that is never zeroed first: reading a chunk
    /// into a zeroed one cost the source a memset of every chunk it served (3% of a
    /// source's samples on the 1 Gbit/s chain).
    pub fn read_vec_at(&self, len: usize, off: u64) -> Result<Vec<u8>, (PathBuf, std::io::Error)> {
        let mut buf = Vec::with_capacity(len);
        self.read_uninit_at(&mut buf.spare_capacity_mut()[..len], off)?;
        // SAFETY: `read_uninit_at` returned Ok, so it wrote all `len` bytes.
        unsafe { buf.set_len(len) };
        Ok(buf)
    }

    /// Fills all of `buf` from `off` on: Ok only once every byte is written.
    fn read_uninit_at(
        &self,
        buf: &mut [MaybeUninit<u8>],
        off: u64,
    ) -> Result<(), (PathBuf, std::io::Error)> {
        match self {
            Self::File { file, path, .. } => {
                pread_exact(file, buf, off).map_err(|e| (path.clone(), e))
            }
            Self::Tree { dir, root, tree } => {
                let at = for_each_piece(root, tree, off, buf.len(), |e, piece_off, range| {
                    pread_exact(&open_in_tree(dir, &e.path)?, &mut buf[range], piece_off)
                })?;
                if at < buf.len() {
                    return Err((root.clone(), std::io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(())
            }
        }
    }

    /// Writes `data` at `off` and has it on its way to disk, so the fsync before the final
    /// rename finds little left to do (the disk keeps up with the network as it goes
    /// instead of taking a whole file's write-back onto the end of the transfer: 1 GiB,
    /// ~0.5 s here); a single file's pages leave the cache once on disk ([`drop_behind`]).
    pub fn write_all_at(&self, data: &[u8], off: u64) -> Result<(), (PathBuf, std::io::Error)> {
        match self {
            Self::File {
                file,
                path,
                unwritten,
            } => {
                file.write_all_at(data, off)
                    .map_err(|e| (path.clone(), e))?;
                let pending = unwritten.fetch_add(data.len() as u64, Ordering::Relaxed);
                if pending + data.len() as u64 >= WRITEBACK_BATCH_BYTES {
                    unwritten.store(0, Ordering::Relaxed);
                    drop_behind(file);
                }
                Ok(())
            }
            // A tree's files are many and mostly small: each piece's write-back starts
            // with it.
            Self::Tree { dir, root, tree } => {
                for_each_piece(root, tree, off, data.len(), |e, piece_off, range| {
                    let size = match e.kind {
                        EntryKind::File { size } => size,
                        _ => 0,
                    };
                    let file = open_for_writing(dir, &e.path, size)?;
                    file.write_all_at(&data[range.clone()], piece_off)?;
                    start_writeback(&file, piece_off, range.len() as u64);
                    Ok(())
                })?;
                Ok(())
            }
        }
    }
}

/// A destination's file is handled in batches of this many bytes written ([`drop_behind`]):
/// per 64 KiB chunk, the disk's request queue was notified for every chunk (a quarter of a
/// destination's CPU at 1-2 Gbit/s went to `sync_file_range` and the virtual disk's
/// doorbell); 4 MiB keeps what the final fsync waits for under a few milliseconds of disk
/// time, and the file's footprint in the page cache at two batches.
pub const WRITEBACK_BATCH_BYTES: u64 = 4 << 20;

/// Once per [`WRITEBACK_BATCH_BYTES`] written: waits for the write-back started a batch
/// ago (long done, unless the disk is slower than the network), drops the file's clean
/// pages from the cache, and starts write-back of what was written since. A destination
/// writes each byte once and reads little of it back (what it passes on comes mostly from
/// [`RecentChunks`]), so its pages are worth nothing in the cache once on disk: dropped,
/// the same few megabytes are reused, and a multi-gigabyte transfer does not push other
/// programs' data out of the cache. On this machine (a VM whose host backs a fresh guest
/// page on first touch and takes freed memory back) a page the cache takes anew costs ~2.5
/// ns a byte: 4 GiB written in 64 KiB pieces took 19.0 s, 17.5 s of it system time (1 GiB:
/// 0.3-6.4 s, depending on what ran before); written so, 2.6 s and 0.85 s. (Linux 6.14's
/// `RWF_DONTCACHE` writes do the same per write, measured alike here, but start write-back
/// per chunk: 7% of a relay's CPU.)
fn drop_behind(file: &File) {
    let fd = file.as_raw_fd();
    // SAFETY: a valid open descriptor; these calls wait on, drop or schedule write-back of
    // the file's own pages and touch none of our memory.
    unsafe {
        libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WAIT_BEFORE);
        libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED);
    }
    // Dirty pages are not dropped: what was written since the last batch stays until the
    // next one, its write-back started now.
    start_writeback(file, 0, 0);
}

/// Starts writing `file`'s dirty pages in `off..off + len` (`len` 0: to its end) to disk,
/// without waiting.
fn start_writeback(file: &File, off: u64, len: u64) {
    // SAFETY: a valid open descriptor; the call only schedules write-back.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            off as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Runs `io` on each piece of a tree's stream bytes `off..off + len`, in order: the file's
/// entry, the piece's offset in that file, its range within the `len` bytes. Returns how
/// many bytes the pieces covered; an error names the file.
fn for_each_piece(
    root: &Path,
    tree: &Tree,
    off: u64,
    len: usize,
    mut io: impl FnMut(&crate::tree::Entry, u64, std::ops::Range<usize>) -> std::io::Result<()>,
) -> Result<usize, (PathBuf, std::io::Error)> {
    let mut at = 0;
    for (i, piece_off, n) in tree.spans(off, len as u64) {
        let e = &tree.entries()[i];
        let range = at..at + n as usize;
        io(e, piece_off, range).map_err(|err| (root.join(&e.path), err))?;
        at += n as usize;
    }
    Ok(at)
}

/// Fills all of `buf` from `file` at `off` (as `FileExt::read_exact_at`, into memory not
/// yet initialised): Ok only once every byte is written.
fn pread_exact(file: &File, buf: &mut [MaybeUninit<u8>], mut off: u64) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let rest = &mut buf[at..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which this
        // function owns mutably; nothing reads them before they are written.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                rest.as_mut_ptr().cast(),
                rest.len(),
                off as libc::off_t,
            )
        };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => {
                at += n as usize;
                off += n as u64;
            }
        }
    }
    Ok(())
}

/// A directory, open for `openat` (not through a link at its own name).
fn open_dir(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
}

/// File `rel` of the tree whose root is open as `dir`, for reading, not through a link at
/// its own name.
fn open_in_tree(dir: &File, rel: &str) -> std::io::Result<File> {
    open_at(dir, rel, libc::O_RDONLY)
}

/// File `rel` (of `size` bytes when whole) for writing; made private with its blocks
/// reserved if it is not there yet, as a single file's are up front: chunks arrive in any
/// order, and a sparse file would get its blocks one chunk at a time in arrival order (no
/// speed difference measured: 8 files of 512 MiB at 2 Gbit/s, 21.97 s against 22.03 s,
/// medians of 3).
fn open_for_writing(dir: &File, rel: &str, size: u64) -> std::io::Result<File> {
    match open_at(dir, rel, libc::O_WRONLY) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match open_at(dir, rel, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) {
                Ok(f) => {
                    reserve(&f, size)?;
                    Ok(f)
                }
                // Another writer made it first.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    open_at(dir, rel, libc::O_WRONLY)
                }
                Err(e) => Err(e),
            }
        }
        other => other,
    }
}

/// `openat(dir, rel, flags | O_NOFOLLOW | O_CLOEXEC)`; a file it creates is private (0600).
fn open_at(dir: &File, rel: &str, flags: libc::c_int) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let c = c_path(rel)?;
    // SAFETY: a valid directory descriptor and a NUL-terminated path that outlive the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn c_path(rel: &str) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(rel).map_err(|_| std::io::ErrorKind::InvalidInput.into())
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
    /// [`Manifest::content_hash`], once known (a tree's takes its entry list to compute).
    content_hash: std::sync::OnceLock<[u8; 32]>,
    backing: Backing,
    /// The source's file or tree; a destination's part file or staging directory.
    path: PathBuf,
    /// Destination only: where the file goes when complete.
    out: Option<PathBuf>,
    have: Mutex<ChunkSet>,
    /// Held while a chunk is written (see [`ChunkStore::write_chunk`]).
    writing: Mutex<()>,
    /// Held while the state file is written or the file finalized (saves run on blocking
    /// threads beside the loop); true once finalized, when no state is saved any more.
    state: Mutex<bool>,
    /// Destination only: the chunks written last, to pass on from memory.
    recent: Mutex<RecentChunks>,
}

/// The chunks a destination stored last, up to [`RECENT_CHUNK_BYTES`]: what it passes on
/// is mostly what it just received (its neighbours ask for a chunk once they hear it holds
/// it), and its file's pages leave the cache once on disk ([`drop_behind`]), so without
/// these a relay would read most chunks it serves back from disk.
#[derive(Default)]
struct RecentChunks {
    chunks: HashMap<ChunkId, Bytes>,
    /// Oldest first.
    order: VecDeque<ChunkId>,
    bytes: usize,
}

/// How much of what a destination received last it keeps in memory to pass on: at 1
/// Gbit/s, 134 ms (a neighbour asks for a chunk a round trip after the news, mostly well
/// within that; [`floodclone_sched::SchedConfig::queue_target_s`] is 0.12 s), at tens of
/// Mbit/s several seconds. What is older is read from disk.
pub const RECENT_CHUNK_BYTES: usize = 16 << 20;

impl RecentChunks {
    fn insert(&mut self, c: ChunkId, data: Bytes) {
        self.bytes += data.len();
        match self.chunks.insert(c, data) {
            Some(old) => self.bytes -= old.len(),
            None => self.order.push_back(c),
        }
        while self.bytes > RECENT_CHUNK_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(d) = self.chunks.remove(&old) {
                self.bytes -= d.len();
            }
        }
    }
}

impl ChunkStore {
    /// The source's store: the whole file (or tree), every chunk held.
    pub fn source(path: &Path, manifest: Manifest) -> Result<Self, StorageError> {
        let backing = match &manifest.tree {
            Some(tree) => Backing::open_tree(path, tree.clone()),
            None => Backing::open_file(path),
        }
        .map_err(|source| StorageError::Read {
            path: path.into(),
            source,
        })?;
        let n = manifest.chunk_count();
        Ok(Self::new(
            manifest,
            backing,
            path.into(),
            None,
            ChunkSet::full(n),
        ))
    }

    fn new(
        manifest: Manifest,
        backing: Backing,
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
            content_hash: Default::default(),
            backing,
            path,
            out,
            have: Mutex::new(have),
            writing: Mutex::new(()),
            state: Mutex::new(false),
            recent: Mutex::default(),
        }
    }

    /// A destination's store for `out`, resuming from an earlier run of the same file (or
    /// tree) when its state is there (which takes a complete manifest: the state names what
    /// is sent by its hash). Chunks recorded as held are verified again before they count.
    pub fn destination(out: &Path, manifest: Manifest) -> Result<Self, StorageError> {
        if out.symlink_metadata().is_ok() {
            return Err(StorageError::OutputExists(out.into()));
        }
        let part = part_path(out);
        let resumable = read_state(&state_path(out), &manifest);
        let backing = match &manifest.tree {
            None => open_part_file(&part, &manifest, resumable.is_some())?,
            Some(tree) => Backing::Tree {
                dir: make_staging_tree(&part, tree, resumable.is_some())?,
                root: part.clone(),
                tree: tree.clone(),
            },
        };
        let mut have = ChunkSet::new(manifest.chunk_count());
        if let Some(claimed) = resumable {
            let mut buf = Vec::new();
            for c in claimed.iter() {
                let (off, len) = manifest.chunk_range(c);
                buf.resize(len, 0);
                if backing.read_exact_at(&mut buf, off).is_ok() && manifest.verify_chunk(c, &buf) {
                    have.insert(c);
                }
            }
        }
        let store = Self::new(manifest, backing, part, Some(out.into()), have);
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

    /// What is sent, by its hash ([`Manifest::content_hash`]), once every chunk's is known.
    pub fn content_hash(&self) -> Option<[u8; 32]> {
        if let Some(h) = self.content_hash.get() {
            return Some(*h);
        }
        let h = self.manifest.read().unwrap().content_hash()?;
        Some(*self.content_hash.get_or_init(|| h))
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

    /// Reads a held chunk (at the source: one it has hashed) to serve it for the first time
    /// to a peer ([`ChunkStore::read_chunk_again`] when that peer asks for it again).
    ///
    /// A source does not check what it reads against the chunk's hash: the receiver checks
    /// every chunk, and asks again for one that fails, which `read_chunk_again` checks. So a
    /// file changed under the source still stops the swarm, one chunk later, and the source
    /// hashes each chunk once instead of twice (that second pass was 9-18% of a source's CPU
    /// at gigabit rates).
    pub fn read_chunk(&self, c: ChunkId) -> Result<Bytes, StorageError> {
        self.read(c, false)
    }

    /// Reads a held chunk that a peer asks for again: it failed that peer's check, or its
    /// stream broke off. At the source it is checked against its hash: the file may have
    /// changed since it was hashed (edited, or a flaky disk), and no destination may get a
    /// chunk the manifest does not vouch for. A destination's chunks were checked when
    /// written.
    pub fn read_chunk_again(&self, c: ChunkId) -> Result<Bytes, StorageError> {
        self.read(c, true)
    }

    fn read(&self, c: ChunkId, check_source: bool) -> Result<Bytes, StorageError> {
        if !self.holds(c) || c >= self.known() {
            return Err(StorageError::NotHeld(c));
        }
        if let Some(data) = self.recent.lock().unwrap().chunks.get(&c) {
            return Ok(data.clone());
        }
        let (off, len) = self.layout.chunk_range(c);
        let buf = self
            .backing
            .read_vec_at(len, off)
            .map_err(|(path, source)| StorageError::Read { path, source })?;
        if check_source && self.out.is_none() && !self.verify(c, &buf) {
            return Err(StorageError::SourceChanged {
                path: self.path.clone(),
                chunk: c,
            });
        }
        Ok(buf.into())
    }

    /// Verifies and stores a chunk. Returns `Ok(false)` when it does not verify (nothing is
    /// written) and `Ok(true)` when it is now held.
    pub fn write_chunk(&self, c: ChunkId, data: Bytes) -> Result<bool, StorageError> {
        if !self.verify(c, &data) {
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
        self.backing
            .write_all_at(&data, off)
            .map_err(|(path, source)| StorageError::Write { path, source })?;
        self.recent.lock().unwrap().insert(c, data);
        self.have.lock().unwrap().insert(c);
        Ok(true)
    }

    /// Records which chunks are held (atomically: write then rename).
    pub fn save_state(&self) -> Result<(), StorageError> {
        let Some(out) = &self.out else {
            return Ok(());
        };
        let finalized = self.state.lock().unwrap();
        if *finalized {
            // A save that started before the file was complete must not leave a state
            // file beside the finished one.
            return Ok(());
        }
        // The state names the file by its hash: before that is known there is nothing a
        // restart could resume against.
        let Some(content_hash) = self.content_hash() else {
            return Ok(());
        };
        let state = state_path(out);
        let tmp = state.with_extension("floodclone-state.tmp");
        let mut body = content_hash.to_vec();
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
        let mut finalized = self.state.lock().unwrap();
        let write_err = |source| StorageError::Write {
            path: out.clone(),
            source,
        };
        match &self.backing {
            Backing::File { file, .. } => {
                file.sync_all().map_err(read_err)?;
                file.set_permissions(fs::Permissions::from_mode(self.layout.mode & 0o777))
                    .map_err(write_err)?;
            }
            Backing::Tree { dir, root, tree } => finish_tree(dir, root, tree, self.layout.mode)
                .map_err(|source| StorageError::Write {
                    path: root.clone(),
                    source,
                })?,
        }
        rename_noreplace(&self.path, &out).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) => StorageError::OutputExists(out.clone()),
            _ => write_err(e),
        })?;
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        *finalized = true;
        let _ = fs::remove_file(state_path(&out));
        Ok(out)
    }
}

/// A single file's part file: never through a symlink planted at its name, never a device
/// or a FIFO, never shared with another recv, never readable by others while partial; its
/// blocks reserved.
fn open_part_file(part: &Path, manifest: &Manifest, resume: bool) -> Result<Backing, StorageError> {
    let create_err = |source| StorageError::Create {
        path: part.into(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(part)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => StorageError::NotAFile(part.into()),
            _ => create_err(e),
        })?;
    if !file.metadata().map_err(create_err)?.file_type().is_file() {
        return Err(StorageError::NotAFile(part.into()));
    }
    lock(&file, part)?;
    if !resume {
        file.set_len(0).map_err(create_err)?;
    }
    file.set_len(manifest.size).map_err(create_err)?;
    reserve(&file, manifest.size).map_err(|source| StorageError::NoRoom {
        path: part.into(),
        bytes: manifest.size,
        source,
    })?;
    // Chunks are read back in any order, and most of the file is not written yet when one
    // is: readahead would fill the cache with blocks of zeros (29% of a relay's CPU at 1
    // Gbit/s went to zeroing them).
    // SAFETY: a valid open descriptor; advice only.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    Ok(Backing::from_file(file, part))
}

/// Takes `file`'s lock for this recv, or says another recv holds it.
fn lock(file: &File, part: &Path) -> Result<(), StorageError> {
    // SAFETY: a valid open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(StorageError::Locked(part.into()));
    }
    Ok(())
}

/// A tree's staging directory at `part`, private and locked (the returned handle holds
/// the lock), with every directory of `tree` in it. Files are made by the first chunk
/// written into them ([`Backing::write_all_at`]), links at the end: making 10,000 files
/// took 2.5 s of kernel time here (ext4), which would otherwise all come before the first
/// chunk. Without `resume`, whatever an earlier run left there is removed first; a
/// filesystem without room for the tree is an error now, not halfway through.
fn make_staging_tree(part: &Path, tree: &Tree, resume: bool) -> Result<File, StorageError> {
    let create_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StorageError::Create { path, source }
    };
    match fs::symlink_metadata(part) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(StorageError::Leftover(part.into())),
        Err(_) => fs::DirBuilder::new()
            .mode(0o700)
            .create(part)
            .map_err(create_err(part))?,
    }
    let dir = open_dir(part).map_err(create_err(part))?;
    lock(&dir, part)?;
    dir.set_permissions(fs::Permissions::from_mode(0o700))
        .map_err(create_err(part))?;
    if !resume {
        for item in fs::read_dir(part).map_err(create_err(part))? {
            let path = item.map_err(create_err(part))?.path();
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            }
            .map_err(create_err(&path))?;
        }
        let free = free_bytes(&dir).map_err(create_err(part))?;
        if free < tree.total_bytes() {
            return Err(StorageError::NoRoom {
                path: part.into(),
                bytes: tree.total_bytes(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
    }
    for e in tree.entries() {
        if e.kind == EntryKind::Dir {
            let path = part.join(&e.path);
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {}
                Err(_) if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) => {}
                Err(err) => return Err(create_err(&path)(err)),
            }
        }
    }
    Ok(dir)
}

/// Bytes an unprivileged writer may still put on `dir`'s filesystem.
fn free_bytes(dir: &File) -> std::io::Result<u64> {
    // SAFETY: a valid descriptor and a statvfs the call fills in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    os_result(unsafe { libc::fstatvfs(dir.as_raw_fd(), &mut st) })?;
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The tree's files given their modes and times, its links made, then its directories'
/// modes and times, deepest first (making a link or a file changes its directory's time,
/// and a directory without write permission takes no new entry); then all of it made
/// durable with one `syncfs` (its data was already on its way: [`Backing::write_all_at`]):
/// one sync for the filesystem, not one `fsync` per file. Everything is reached from the
/// root's descriptor, never through a link.
fn finish_tree(dir: &File, root: &Path, tree: &Tree, root_mode: u32) -> std::io::Result<()> {
    let mode = |m: u32| fs::Permissions::from_mode(m & 0o777);
    for e in tree.entries() {
        match &e.kind {
            EntryKind::File { .. } => {
                // Empty files: no chunk made them.
                open_at(dir, &e.path, libc::O_WRONLY | libc::O_CREAT)?
                    .set_permissions(mode(e.mode))?;
                set_mtime_at(dir, &e.path, e.mtime_ns)?;
            }
            EntryKind::Symlink { target } => {
                let path = root.join(&e.path);
                // A run stopped in this loop made some already.
                if fs::symlink_metadata(&path).is_ok() {
                    fs::remove_file(&path)?;
                }
                std::os::unix::fs::symlink(target, &path)?;
                set_mtime_at(dir, &e.path, e.mtime_ns)?;
            }
            EntryKind::Dir => {}
        }
    }
    for e in tree.entries().iter().rev() {
        if e.kind == EntryKind::Dir {
            open_at(dir, &e.path, libc::O_RDONLY | libc::O_DIRECTORY)?
                .set_permissions(mode(e.mode))?;
            set_mtime_at(dir, &e.path, e.mtime_ns)?;
        }
    }
    dir.set_permissions(mode(root_mode))?;
    // SAFETY: a valid open descriptor.
    os_result(unsafe { libc::syncfs(dir.as_raw_fd()) })
}

/// Sets the modification time of `rel` under `dir` (not through a link at its name; the
/// access time is left alone).
fn set_mtime_at(dir: &File, rel: &str, mtime_ns: i64) -> std::io::Result<()> {
    let c = c_path(rel)?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000),
        },
    ];
    // SAFETY: a valid directory descriptor, a NUL-terminated path and two timespecs that
    // outlive the call.
    let rc = unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    os_result(rc)
}

/// A system call's return code as a result (`errno` when it is not 0).
fn os_result(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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
    os_result(rc)
}

/// Chunks recorded as held by an earlier run, if the state belongs to this file.
fn read_state(path: &Path, manifest: &Manifest) -> Option<ChunkSet> {
    let body = fs::read(path).ok()?;
    if body.len() < 32 || manifest.content_hash().is_none_or(|h| body[..32] != h) {
        return None;
    }
    Some(ChunkSet::from_bytes(manifest.chunk_count(), &body[32..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_chunks_stay_within_their_budget_oldest_out_first() {
        let mut recent = RecentChunks::default();
        let chunk = RECENT_CHUNK_BYTES / 4;
        for c in 0..6 {
            recent.insert(c, Bytes::from(vec![c as u8; chunk]));
            assert!(recent.bytes <= RECENT_CHUNK_BYTES);
        }
        let mut kept: Vec<ChunkId> = recent.chunks.keys().copied().collect();
        kept.sort();
        assert_eq!(kept, vec![2, 3, 4, 5], "the four newest");
        assert_eq!(recent.order, VecDeque::from(vec![2, 3, 4, 5]));
        assert_eq!(recent.chunks[&5][0], 5);
    }

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

    /// Chunk `c` of the file `data`, as `m` cuts it.
    fn chunk_of(data: &[u8], m: &Manifest, c: u32) -> Vec<u8> {
        let (o, l) = m.chunk_range(c);
        data[o as usize..o as usize + l].to_vec()
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
            first.write_chunk(c, chunk_of(&data, &m, c).into()).unwrap();
        }
        // The copy gets the source's permission bits.
        first.finalize().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_source_checks_a_chunk_asked_for_again_against_its_hash() {
        let (dir, data, m) = setup("source-again", 4096 * 2);
        let source = ChunkStore::source(&dir.join("src"), m.clone()).unwrap();
        assert_eq!(source.read_chunk_again(1).unwrap(), chunk_of(&data, &m, 1));
        // Changed after hashing: a first read serves it as it is now (the receiver's check
        // refuses it), the read for the receiver's second ask stops the swarm.
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new()
            .write(true)
            .open(dir.join("src"))
            .unwrap();
        f.write_all_at(b"edited", 4096).unwrap();
        assert_eq!(&source.read_chunk(1).unwrap()[..6], b"edited");
        assert!(matches!(
            source.read_chunk_again(1),
            Err(StorageError::SourceChanged { chunk: 1, .. })
        ));
        assert_eq!(source.read_chunk_again(0).unwrap(), chunk_of(&data, &m, 0));
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_chunk_verifies_once_its_hash_has_come() {
        let (dir, data, whole) = setup("pieces", 4096 * 3 + 10);
        let out = dir.join("out");
        let store = std::sync::Arc::new(ChunkStore::destination(&out, whole.prefix(1)).unwrap());
        let chunk = |c: u32| chunk_of(&data, &whole, c);
        assert!(store.write_chunk(0, chunk(0).into()).unwrap());
        assert!(
            !store.write_chunk(1, chunk(1).into()).unwrap(),
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
            assert!(store.write_chunk(c, chunk(c).into()).unwrap());
        }
        store.finalize().unwrap();
        assert_eq!(fs::read(&out).unwrap(), data);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Bytes of `path` in the page cache (`mincore` over a mapping of it).
    fn resident_bytes(path: &Path) -> usize {
        let f = File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        let page = 4096;
        // SAFETY: a read-only shared mapping of an open file, unmapped below; `mincore`
        // writes one byte per page into a vector of that many.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            let mut vec = vec![0u8; len.div_ceil(page)];
            assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
            libc::munmap(addr, len);
            vec.iter().filter(|&&b| b & 1 == 1).count() * page
        }
    }

    #[test]
    fn a_destination_leaves_little_of_its_file_in_the_page_cache() {
        let size = 24 << 20;
        let (dir, data, m) = setup("drop-behind", size);
        // SAFETY: a NUL-terminated path and a statfs the call fills.
        let on_tmpfs = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
            libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
        };
        let out = dir.join("out");
        let d = ChunkStore::destination(&out, m.clone()).unwrap();
        let chunk = |c: u32| Bytes::from(chunk_of(&data, &m, c));
        for c in 0..m.chunk_count() {
            assert!(d.write_chunk(c, chunk(c)).unwrap());
        }
        // What a batch ago was written has left the cache; a tmpfs file lives in it.
        let resident = resident_bytes(&part_path(&out));
        if !on_tmpfs {
            assert!(
                resident <= 2 * WRITEBACK_BATCH_BYTES as usize,
                "{resident} bytes of {size} in the cache"
            );
        }
        // The first chunks come back from disk, the last from memory, both intact.
        let last = m.chunk_count() - 1;
        assert_eq!(d.read_chunk(0).unwrap(), chunk(0));
        assert_eq!(d.read_chunk(last).unwrap(), chunk(last));
        assert_eq!(d.finalize().unwrap(), out);
        assert_eq!(fs::read(&out).unwrap(), data);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_state_save_that_ends_after_the_finalize_leaves_no_state_file() {
        // Saves run on blocking threads beside the loop: one begun before the last chunk
        // came may run after the file was renamed into place.
        let (dir, data, m) = setup("late-save", 4096 * 3 + 10);
        let out = dir.join("out");
        let s = ChunkStore::destination(&out, m.clone()).unwrap();
        for c in 0..m.chunk_count() {
            assert!(s.write_chunk(c, chunk_of(&data, &m, c).into()).unwrap());
        }
        s.save_state().unwrap();
        assert!(state_path(&out).exists(), "saved while not yet finalized");
        assert_eq!(s.finalize().unwrap(), out);
        assert!(!state_path(&out).exists());
        s.save_state().unwrap();
        assert!(
            !state_path(&out).exists(),
            "a save after the finalize wrote a state file"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn assembles_resumes_and_renames_only_when_whole() {
        let (dir, data, m) = setup("resume", 4096 * 3 + 10);
        let out = dir.join("out");
        let chunk = |c: u32| chunk_of(&data, &m, c);
        {
            let s = ChunkStore::destination(&out, m.clone()).unwrap();
            let mut bad = chunk(0);
            bad[3] ^= 0x40;
            assert!(
                !s.write_chunk(0, bad.into()).unwrap(),
                "corrupt chunk accepted"
            );
            assert!(s.write_chunk(0, chunk(0).into()).unwrap());
            assert!(s.write_chunk(2, chunk(2).into()).unwrap());
            s.save_state().unwrap();
            assert!(!out.exists());
        }
        // A restart keeps what was verified.
        let s = ChunkStore::destination(&out, m.clone()).unwrap();
        assert_eq!(s.have().iter().collect::<Vec<_>>(), vec![0, 2]);
        s.write_chunk(1, chunk(1).into()).unwrap();
        s.write_chunk(3, chunk(3).into()).unwrap();
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
            s.write_chunk(1, Bytes::copy_from_slice(&data[4096..]))
                .unwrap();
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

    /// A tree with nested and empty directories, empty files, a link, files smaller and
    /// larger than a chunk, and modes and times of its own.
    fn make_tree(root: &Path) {
        use std::os::unix::fs::symlink;
        let _ = fs::remove_dir_all(root);
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::create_dir_all(root.join("empty-dir")).unwrap();
        for (i, (path, size)) in [
            ("a/one", 10),
            ("a/b/two", 4096 * 2 + 100),
            ("a/b/c/three", 4096),
            ("a/empty", 0),
            ("top", 3000),
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..size).map(|j| (j * 7 + i * 13) as u8).collect();
            fs::write(root.join(path), data).unwrap();
        }
        symlink("b/two", root.join("a/link")).unwrap();
        fs::set_permissions(root.join("a/one"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root.join("top"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o750)).unwrap();
        let dir = open_dir(root).unwrap();
        for (k, path) in ["a/one", "a/b/two", "a/b", "empty-dir", "a/link", "a"]
            .iter()
            .enumerate()
        {
            set_mtime_at(
                &dir,
                path,
                1_600_000_000_123_456_789 + k as i64 * 1_000_000_007,
            )
            .unwrap();
        }
        fs::set_permissions(root, fs::Permissions::from_mode(0o711)).unwrap();
    }

    #[test]
    fn a_tree_arrives_entry_by_entry_identical_and_resumes_across_files() {
        let dir = std::env::temp_dir().join(format!("fc-storage-tree-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src");
        make_tree(&src);
        // Named through a link, as `send /srv/current` would be.
        let named = dir.join("current");
        std::os::unix::fs::symlink(&src, &named).unwrap();
        let m = Manifest::from_file(&named, Some(4096)).unwrap();
        let tree = m.tree.clone().expect("a directory is sent as a tree");
        assert_eq!(m.size, 10 + 4096 * 2 + 100 + 4096 + 3000);
        assert_ne!(
            m.content_hash(),
            m.file_hash,
            "a tree's hash names its entries too"
        );
        let source = ChunkStore::source(&named, m.clone()).unwrap();
        let out = dir.join("out");
        // Something an earlier run of other content left in the staging directory goes.
        fs::create_dir_all(part_path(&out)).unwrap();
        fs::write(part_path(&out).join("stray"), b"x").unwrap();
        let n = m.chunk_count();
        {
            let d = ChunkStore::destination(&out, m.clone()).unwrap();
            assert!(!part_path(&out).join("stray").exists());
            for c in (0..n).step_by(2) {
                assert!(d.write_chunk(c, source.read_chunk(c).unwrap()).unwrap());
            }
            d.save_state().unwrap();
            assert!(!out.exists(), "nothing at --out before every chunk is here");
        }
        // Killed and started again: what was verified is kept, in every file.
        let d = ChunkStore::destination(&out, m.clone()).unwrap();
        assert_eq!(d.have().count(), n.div_ceil(2));
        for c in (1..n).step_by(2) {
            let mut bad = source.read_chunk(c).unwrap().to_vec();
            bad[0] ^= 1;
            assert!(
                !d.write_chunk(c, bad.into()).unwrap(),
                "a corrupt chunk is refused"
            );
            assert!(d.write_chunk(c, source.read_chunk(c).unwrap()).unwrap());
        }
        assert_eq!(d.finalize().unwrap(), out);
        assert_eq!(
            Tree::scan(&out).unwrap(),
            *tree,
            "names, kinds, sizes, modes, times"
        );
        // Renamed into place, it still serves its neighbours.
        assert_eq!(
            d.read_chunk(n - 1).unwrap(),
            source.read_chunk(n - 1).unwrap()
        );
        for e in tree.entries() {
            match e.kind {
                EntryKind::File { .. } => assert_eq!(
                    fs::read(out.join(&e.path)).unwrap(),
                    fs::read(src.join(&e.path)).unwrap(),
                    "{}",
                    e.path
                ),
                EntryKind::Symlink { .. } => assert_eq!(
                    fs::read_link(out.join(&e.path)).unwrap(),
                    fs::read_link(src.join(&e.path)).unwrap()
                ),
                EntryKind::Dir => {}
            }
        }
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out), 0o711);
        assert!(!part_path(&out).exists() && !state_path(&out).exists());
        assert!(matches!(
            ChunkStore::destination(&out, m),
            Err(StorageError::OutputExists(_))
        ));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_empty_directory_and_a_tree_of_empty_files_arrive() {
        let dir = std::env::temp_dir().join(format!("fc-storage-empty-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (name, files) in [("none", 0), ("empty-files", 3)] {
            let src = dir.join(name);
            fs::create_dir_all(src.join("sub")).unwrap();
            for i in 0..files {
                fs::write(src.join(format!("sub/e{i}")), b"").unwrap();
            }
            let m = Manifest::from_file(&src, None).unwrap();
            assert_eq!((m.size, m.chunk_count()), (0, 0));
            let out = dir.join(format!("{name}.out"));
            let d = ChunkStore::destination(&out, m.clone()).unwrap();
            assert!(d.is_complete());
            d.finalize().unwrap();
            assert_eq!(Tree::scan(&out).unwrap(), *m.tree.unwrap());
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
