//! A directory tree as one swarm (issue 22): the entries of the tree, and the tree's
//! regular files laid end to end as one byte stream, which is chunked, hashed and moved
//! exactly as a single file is. Chunks then cross file boundaries, so many small files
//! cost no more than one big one (no chunk is padded, no file waits for its own round
//! trip), and the scheduler keeps every link busy from the first byte of the tree to the
//! last.
//!
//! This module is the part that needs no network: what an entry is, the checks every
//! entry list passes before anything touches a disk ([`Tree::new`]; a receiver runs them
//! on what a peer sent), the entry list's encoding, reading a tree from a directory
//! without following links out of it ([`Tree::scan`]), and where a byte range of the
//! stream lies in the files ([`Tree::spans`]). The files' I/O is
//! [`crate::storage::Backing`]'s; the staging directory and the rename into place are
//! [`crate::storage::ChunkStore`]'s.

use std::{
    os::unix::fs::MetadataExt,
    path::{Component, Path},
};

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    /// A regular file: its bytes are the next `size` bytes of the tree's stream.
    File {
        size: u64,
    },
    /// A symbolic link, recorded as its target (never followed when the tree is read).
    Symlink {
        target: String,
    },
}

/// One entry of a tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the tree's root, components joined by `/`.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits, at most `0o777` (no set-user-id, set-group-id or sticky bit comes
    /// from a peer).
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// A checked list of entries: every path is inside the root, named once, under a
/// directory of the tree; no entry lies under a symlink; every symlink points inside the
/// tree. Entries are in path order; files' bytes follow one another in that order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    entries: Vec<Entry>,
    /// Per entry, where its bytes start in the stream (files only; others: where the
    /// next file's would).
    starts: Vec<u64>,
    total: u64,
}

/// Most entries a tree may have (a peer cannot make a receiver hold more).
pub const MAX_ENTRIES: usize = 1 << 22;
/// Longest path, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("entry {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("entry {path:?} is named twice")]
    Duplicate { path: String },
    #[error("entry {path:?} lies under {parent:?}, which is not a directory of the tree")]
    NoParent { path: String, parent: String },
    #[error("symlink {path:?} points to {target:?}, outside the tree")]
    LinkOutside { path: String, target: String },
    #[error("the tree has more than {MAX_ENTRIES} entries")]
    TooMany,
    #[error("the tree's files add up to more than 2^64 bytes")]
    TooBig,
    #[error("malformed entry list: {0}")]
    Malformed(&'static str),
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
}

impl Tree {
    /// Checks `entries` (in any order) and puts them in path order.
    pub fn new(mut entries: Vec<Entry>) -> Result<Self, TreeError> {
        if entries.len() > MAX_ENTRIES {
            return Err(TreeError::TooMany);
        }
        for e in &entries {
            check_path(&e.path)?;
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let mut kinds: std::collections::HashMap<&str, &EntryKind> = Default::default();
        for e in &entries {
            if kinds.insert(&e.path, &e.kind).is_some() {
                return Err(TreeError::Duplicate {
                    path: e.path.clone(),
                });
            }
        }
        for e in &entries {
            // Every ancestor a directory of the tree: then none is a symlink, so creating
            // this entry under the staging root can never write through a link.
            let mut at = e.path.as_str();
            while let Some((parent, _)) = at.rsplit_once('/') {
                if kinds.get(parent) != Some(&&EntryKind::Dir) {
                    return Err(TreeError::NoParent {
                        path: e.path.clone(),
                        parent: parent.to_string(),
                    });
                }
                at = parent;
            }
            if let EntryKind::Symlink { target } = &e.kind {
                if !link_stays_inside(&e.path, target) {
                    return Err(TreeError::LinkOutside {
                        path: e.path.clone(),
                        target: target.clone(),
                    });
                }
            }
        }
        let mut starts = Vec::with_capacity(entries.len());
        let mut total: u64 = 0;
        for e in &mut entries {
            e.mode &= 0o777;
            starts.push(total);
            if let EntryKind::File { size } = e.kind {
                total = total.checked_add(size).ok_or(TreeError::TooBig)?;
            }
        }
        Ok(Self {
            entries,
            starts,
            total,
        })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Bytes of all files together: the size of the stream that is chunked.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Where bytes `offset .. offset + len` of the stream lie: (entry index, offset in
    /// that file, length), in stream order. A chunk of a tree of small files spans many.
    pub fn spans(&self, offset: u64, len: u64) -> Vec<(usize, u64, u64)> {
        let end = offset.saturating_add(len).min(self.total);
        // The first file whose bytes reach past `offset`.
        let mut i = self
            .starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1);
        let mut out = Vec::new();
        let mut at = offset;
        while at < end && i < self.entries.len() {
            if let EntryKind::File { size } = self.entries[i].kind {
                let (start, stop) = (self.starts[i], self.starts[i] + size);
                if stop > at {
                    let piece_end = stop.min(end);
                    out.push((i, at - start, piece_end - at));
                    at = piece_end;
                }
            }
            i += 1;
        }
        out
    }

    /// The tree's identity: the hash of its files' bytes (`stream_hash`, which the chunk
    /// hashes merge into) bound to its entry list and its root's mode, under a key of its
    /// own so that no file's plain BLAKE3 can equal a tree's.
    pub fn root_hash(&self, stream_hash: &[u8; 32], root_mode: u32) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("floodclone 2026-12 tree root v1");
        h.update(stream_hash);
        h.update(&(root_mode & 0o777).to_le_bytes());
        h.update(&self.encode());
        *h.finalize().as_bytes()
    }

    /// Length of [`Tree::encode`]'s bytes, without making them.
    pub fn encoded_len(&self) -> usize {
        4 + self
            .entries
            .iter()
            .map(|e| {
                let extra = match &e.kind {
                    EntryKind::Dir => 0,
                    EntryKind::File { .. } => 8,
                    EntryKind::Symlink { target } => 4 + target.len(),
                };
                1 + 4 + 8 + 4 + e.path.len() + extra
            })
            .sum::<usize>()
    }

    /// Regular files, with their sizes: the entries whose bytes make up the stream.
    pub fn file_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::File { .. }))
            .count()
    }

    /// The entry list as bytes (for the manifest): a count, then per entry its kind, mode,
    /// modification time, path and size or link target, lengths as little-endian u32/u64.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            let (kind, extra): (u8, Vec<u8>) = match &e.kind {
                EntryKind::Dir => (0, Vec::new()),
                EntryKind::File { size } => (1, size.to_le_bytes().to_vec()),
                EntryKind::Symlink { target } => (2, string_bytes(target)),
            };
            out.push(kind);
            out.extend_from_slice(&e.mode.to_le_bytes());
            out.extend_from_slice(&e.mtime_ns.to_le_bytes());
            out.extend_from_slice(&string_bytes(&e.path));
            out.extend_from_slice(&extra);
        }
        out
    }

    /// Reads [`Tree::encode`]'s bytes, checking them as [`Tree::new`] does: what a peer
    /// sends is refused whole, with the reason, before anything is created.
    pub fn decode(bytes: &[u8]) -> Result<Self, TreeError> {
        let mut r = Reader(bytes);
        let n = r.u32()? as usize;
        if n > MAX_ENTRIES {
            return Err(TreeError::TooMany);
        }
        let mut entries = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let kind = r.take(1)?[0];
            let mode = r.u32()?;
            let mtime_ns = i64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
            let path = r.string()?;
            let kind = match kind {
                0 => EntryKind::Dir,
                1 => EntryKind::File {
                    size: u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes")),
                },
                2 => EntryKind::Symlink {
                    target: r.string()?,
                },
                _ => return Err(TreeError::Malformed("unknown entry kind")),
            };
            entries.push(Entry {
                path,
                kind,
                mode,
                mtime_ns,
            });
        }
        if !r.0.is_empty() {
            return Err(TreeError::Malformed("bytes after the last entry"));
        }
        Self::new(entries)
    }

    /// The tree under `root`: directories, regular files and symlinks (recorded, never
    /// followed), with their modes and modification times. Anything else (a socket, a
    /// device, a pipe) is an error naming it: a copy could not be made of it.
    pub fn scan(root: &Path) -> Result<Self, TreeError> {
        let mut entries = Vec::new();
        let mut dirs = vec![String::new()];
        while let Some(rel) = dirs.pop() {
            let dir = if rel.is_empty() {
                root.to_path_buf()
            } else {
                root.join(&rel)
            };
            let read_err = |e: std::io::Error| TreeError::Read {
                path: dir.display().to_string(),
                why: e.to_string(),
            };
            for item in std::fs::read_dir(&dir).map_err(read_err)? {
                let item = item.map_err(read_err)?;
                let name = item
                    .file_name()
                    .into_string()
                    .map_err(|n| TreeError::BadPath {
                        path: n.to_string_lossy().into_owned(),
                        why: "its name is not UTF-8",
                    })?;
                let path = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let full = root.join(&path);
                let meta = std::fs::symlink_metadata(&full).map_err(|e| TreeError::Read {
                    path: full.display().to_string(),
                    why: e.to_string(),
                })?;
                let kind = if meta.is_dir() {
                    dirs.push(path.clone());
                    EntryKind::Dir
                } else if meta.is_file() {
                    EntryKind::File { size: meta.len() }
                } else if meta.is_symlink() {
                    let target = std::fs::read_link(&full).map_err(|e| TreeError::Read {
                        path: full.display().to_string(),
                        why: e.to_string(),
                    })?;
                    EntryKind::Symlink {
                        target: target.to_string_lossy().into_owned(),
                    }
                } else {
                    return Err(TreeError::BadPath {
                        path,
                        why: "not a file, directory or symlink",
                    });
                };
                entries.push(Entry {
                    path,
                    kind,
                    mode: meta.mode() & 0o777,
                    mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                });
            }
        }
        Self::new(entries)
    }
}

/// A path a tree may hold: relative, `/`-separated, no empty, `.` or `..` component, no
/// NUL, not too long.
fn check_path(path: &str) -> Result<(), TreeError> {
    let bad = |why| {
        Err(TreeError::BadPath {
            path: path.to_string(),
            why,
        })
    };
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > MAX_PATH_BYTES {
        return bad("longer than PATH_MAX");
    }
    if path.starts_with('/') {
        return bad("absolute");
    }
    if path.contains('\0') {
        return bad("contains NUL");
    }
    for c in path.split('/') {
        match c {
            "" => return bad("has an empty component"),
            "." | ".." => return bad("has a . or .. component"),
            _ => {}
        }
    }
    Ok(())
}

/// Whether symlink `path`'s `target`, resolved from the link's directory without reading
/// the disk, stays inside the tree's root. Links inside the tree point at entries that
/// are themselves checked, so a chain of them stays inside too.
fn link_stays_inside(path: &str, target: &str) -> bool {
    if target.is_empty() || target.contains('\0') || Path::new(target).is_absolute() {
        return false;
    }
    let mut depth: usize = path.matches('/').count();
    for c in Path::new(target).components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

fn string_bytes(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], TreeError> {
        if self.0.len() < n {
            return Err(TreeError::Malformed("cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, TreeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn string(&mut self) -> Result<String, TreeError> {
        let n = self.u32()? as usize;
        if n > MAX_PATH_BYTES {
            return Err(TreeError::Malformed("a name longer than PATH_MAX"));
        }
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| TreeError::Malformed("a name not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime_ns: 1,
        }
    }

    fn file(path: &str, size: u64) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::File { size },
            mode: 0o644,
            mtime_ns: 2,
        }
    }

    fn link(path: &str, target: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Symlink {
                target: target.into(),
            },
            mode: 0o777,
            mtime_ns: 3,
        }
    }

    #[test]
    fn names_that_leave_the_root_are_refused() {
        for path in ["/etc/x", "../x", "a/../../x", "a/./b", "a//b", "", "a/"] {
            let err = Tree::new(vec![dir("a"), file(path, 1)]).unwrap_err();
            assert!(matches!(err, TreeError::BadPath { .. }), "{path}: {err}");
        }
        let err = Tree::new(vec![file("x", 1), file("x", 2)]).unwrap_err();
        assert_eq!(err, TreeError::Duplicate { path: "x".into() });
    }

    #[test]
    fn nothing_lies_under_a_symlink_or_a_missing_directory() {
        // "a" is a link to "b": a file "a/x" would be written through it.
        let err = Tree::new(vec![dir("b"), link("a", "b"), file("a/x", 1)]).unwrap_err();
        assert!(matches!(err, TreeError::NoParent { .. }), "{err}");
        let err = Tree::new(vec![file("d/x", 1)]).unwrap_err();
        assert!(matches!(err, TreeError::NoParent { .. }), "{err}");
        let err = Tree::new(vec![file("f", 1), file("f/x", 1)]).unwrap_err();
        assert!(matches!(err, TreeError::NoParent { .. }), "{err}");
    }

    #[test]
    fn symlinks_must_point_inside_the_tree() {
        let ok = Tree::new(vec![
            dir("a"),
            dir("a/b"),
            link("a/b/up", "../../top"),
            link("a/same", "./b"),
            file("top", 0),
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        for target in ["../x", "/etc/passwd", "a/../../x", ""] {
            let err = Tree::new(vec![dir("a"), link("l", target)]).unwrap_err();
            assert!(
                matches!(err, TreeError::LinkOutside { .. }),
                "{target}: {err}"
            );
        }
        let err = Tree::new(vec![dir("a"), link("a/l", "../../x")]).unwrap_err();
        assert!(matches!(err, TreeError::LinkOutside { .. }), "{err}");
    }

    #[test]
    fn modes_from_a_peer_lose_special_bits() {
        let mut f = file("x", 1);
        f.mode = 0o4755;
        let t = Tree::new(vec![f]).unwrap();
        assert_eq!(t.entries()[0].mode, 0o755);
    }

    #[test]
    fn a_byte_range_maps_to_the_files_it_crosses_skipping_empty_ones() {
        // Path order: a (3), b/ (dir), b/c (0), b/d (5), e -> link, f (2): stream "aaadddddff".
        let t = Tree::new(vec![
            file("f", 2),
            dir("b"),
            file("b/d", 5),
            file("a", 3),
            file("b/c", 0),
            link("e", "a"),
        ])
        .unwrap();
        let names: Vec<&str> = t.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["a", "b", "b/c", "b/d", "e", "f"]);
        assert_eq!(t.total_bytes(), 10);
        assert_eq!(t.spans(0, 4), vec![(0, 0, 3), (3, 0, 1)]);
        assert_eq!(t.spans(4, 100), vec![(3, 1, 4), (5, 0, 2)]);
        assert_eq!(t.spans(8, 2), vec![(5, 0, 2)]);
        assert_eq!(t.spans(10, 4), vec![]);
        // Every byte exactly once, whatever the chunk size.
        for chunk in 1..=11u64 {
            let mut covered = 0;
            let mut at = 0;
            while at < t.total_bytes() {
                covered += t.spans(at, chunk).iter().map(|s| s.2).sum::<u64>();
                at += chunk;
            }
            assert_eq!(covered, 10, "chunk {chunk}");
        }
    }

    #[test]
    fn the_entry_list_round_trips_and_a_bad_one_is_refused_whole() {
        let t = Tree::new(vec![
            dir("d"),
            file("d/x", 7),
            link("l", "d/x"),
            file("e", 0),
        ])
        .unwrap();
        assert_eq!(Tree::decode(&t.encode()).unwrap(), t);
        let bytes = t.encode();
        assert_eq!(t.encoded_len(), bytes.len());
        assert!(Tree::decode(&bytes[..bytes.len() - 1]).is_err());
        // A hand-made list naming ../x: refused by the same checks.
        let evil = Tree {
            entries: vec![file("../x", 1)],
            starts: vec![0],
            total: 1,
        };
        let err = Tree::decode(&evil.encode()).unwrap_err();
        assert!(matches!(err, TreeError::BadPath { .. }), "{err}");
    }

    #[test]
    fn a_directory_is_read_without_following_links_out_of_it() {
        let root = std::env::temp_dir().join(format!("floodclone-tree-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("sub/empty")).unwrap();
        std::fs::write(root.join("sub/x"), b"hello").unwrap();
        std::fs::write(root.join("zero"), b"").unwrap();
        std::os::unix::fs::symlink("sub/x", root.join("inside")).unwrap();
        let t = Tree::scan(&root);
        std::os::unix::fs::symlink("/etc/passwd", root.join("outside")).unwrap();
        let refused = Tree::scan(&root);
        std::fs::remove_dir_all(&root).unwrap();
        let t = t.unwrap();
        let names: Vec<&str> = t.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["inside", "sub", "sub/empty", "sub/x", "zero"]);
        assert_eq!(t.total_bytes(), 5);
        assert!(
            matches!(refused, Err(TreeError::LinkOutside { .. })),
            "{refused:?}"
        );
    }
}
