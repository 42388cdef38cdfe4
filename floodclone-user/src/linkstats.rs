//! In-kernel link statistics: loads the tc programs of `floodclone-ebpf`, attaches them to
//! every non-loopback interface, pins their maps so another process (`floodclone stats`) can
//! read them, and turns counters into per-link figures.
//!
//! Pins live under `/run/floodclone/bpf/<netns inode>/<pid>/`: a bpffs outside `/sys` is
//! shared by every `ip netns exec` process (each gets a private `/sys`), and keying by network
//! namespace and process keeps many nodes on one kernel apart.

use std::{
    collections::HashMap,
    ffi::CStr,
    fs,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Instant,
};

use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData, RingBuf},
    programs::{SchedClassifier, TcAttachType},
    Ebpf, EbpfLoader,
};
use floodclone_common::{
    FirstPacket, LinkCounters, LinkKey, SpinKey, SpinState, DIR_EGRESS, FIRST_PACKET_MAP_NAME,
    LINK_MAP_NAME, SPIN_MAP_NAME, WATCH_ALL, WATCH_MAP_NAME,
};

/// The object built by build.rs from `floodclone-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floodclone"));

/// Root of all pins. Mounted as bpffs on first use when it is not one already.
pub const PIN_ROOT: &str = "/run/floodclone/bpf";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, thiserror::Error)]
pub enum LinkStatsError {
    #[error(
        "not permitted to load eBPF programs ({0}); run as root or grant CAP_BPF, \
         CAP_NET_ADMIN and CAP_PERFMON"
    )]
    NotPermitted(String),
    #[error("loading the eBPF programs failed: {0}")]
    Load(String),
    #[error("attaching to interface {iface} failed: {reason}")]
    Attach { iface: String, reason: String },
    #[error("pinning maps under {path} failed: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("reading map {name} failed: {reason}")]
    Read { name: &'static str, reason: String },
    #[error("no running floodclone in this network namespace (no pins under {0})")]
    NoPins(PathBuf),
    #[error(
        "the floodclone whose maps are pinned under {dir} is another version (its map {name} \
         has another type or layout: {reason}); read it with that version's `floodclone stats`"
    )]
    OtherVersion {
        dir: PathBuf,
        name: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn is_permission(e: &dyn std::error::Error) -> bool {
    let text = format!("{e:?}");
    text.contains("EPERM") || text.contains("PermissionDenied") || text.contains("os error 1)")
}

/// Counters of one IPv4 peer seen on one interface, both directions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerCounters {
    pub ifindex: u32,
    pub peer: Option<IpAddr>,
    pub egress: LinkCounters,
    pub ingress: LinkCounters,
}

/// Spin-bit figures of one QUIC flow in one direction.
#[derive(Clone, Copy, Debug)]
pub struct SpinFlow {
    pub key: SpinKey,
    pub state: SpinState,
}

impl SpinFlow {
    pub fn peer(&self) -> IpAddr {
        floodclone_common::peer_addr(self.key.peer)
    }
}

/// One reading of both maps.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub at: Instant,
    pub peers: Vec<PeerCounters>,
    pub spin: Vec<SpinFlow>,
}

/// Where a process's maps are pinned.
pub fn pin_dir_for(netns_inode: u64, pid: u32) -> PathBuf {
    Path::new(PIN_ROOT)
        .join(netns_inode.to_string())
        .join(pid.to_string())
}

/// Inode of this thread's network namespace: the key that tells namespaces apart.
pub fn current_netns_inode() -> std::io::Result<u64> {
    Ok(fs::metadata("/proc/thread-self/ns/net")?.ino())
}

fn ensure_bpffs(root: &Path) -> Result<(), LinkStatsError> {
    fs::create_dir_all(root)?;
    let c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).expect("no NUL in path");
    // SAFETY: statfs on a valid C string into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(LinkStatsError::Pin {
            path: root.to_path_buf(),
            reason: format!("mounting bpffs: {}", std::io::Error::last_os_error()),
        });
    }
    Ok(())
}

/// Names of every interface in this network namespace except loopback.
pub fn non_loopback_interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            if name != "lo" {
                out.push(((*p).if_index, name));
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Name of an interface by index, for display.
pub fn interface_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        format!("if{ifindex}")
    } else {
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// The pid an instance entry belongs to: `<pid>` (pin directory) or `<pid>.json` (status
/// file); `None` for anything else.
fn instance_pid(name: &std::ffi::OsStr) -> Option<u32> {
    let name = name.to_string_lossy();
    name.strip_suffix(".json").unwrap_or(&name).parse().ok()
}

/// The pid of the instance whose entry (pin directory or status file) is `path`.
pub fn instance_pid_of(path: &Path) -> Option<u32> {
    instance_pid(path.file_name()?)
}

/// Whether the instance whose pins are in `dir` still runs (and has not removed them).
pub fn instance_is_live(dir: &Path) -> bool {
    dir.exists() && instance_pid_of(dir).is_some_and(pid_alive)
}

/// Where each running floodclone holds its liveness lock, `<pid>.lock`.
pub const LIVE_ROOT: &str = "/run/floodclone/live";

fn lock_path(root: &Path, pid: u32) -> PathBuf {
    root.join(format!("{pid}.lock"))
}

/// Takes this process's liveness lock (once; held until the process exits), before it
/// pins maps or publishes a status: others tell it is alive by the lock being held, which a
/// dead process's reused pid cannot fake. Without permission to write `LIVE_ROOT`, it has
/// no pins or status either.
pub fn hold_liveness_lock() {
    static HELD: std::sync::OnceLock<Option<fs::File>> = std::sync::OnceLock::new();
    HELD.get_or_init(|| take_liveness_lock(Path::new(LIVE_ROOT), std::process::id()));
}

fn take_liveness_lock(root: &Path, pid: u32) -> Option<fs::File> {
    use std::os::fd::AsRawFd;
    fs::create_dir_all(root).ok()?;
    sweep_free_locks(root);
    // Locked under a private name, then renamed into place: no one ever sees the file
    // unlocked (a sweep would take it for a dead process's).
    let tmp = root.join(format!(".{pid}.lock.new"));
    let file = fs::File::create(&tmp).ok()?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return None;
    }
    fs::rename(&tmp, lock_path(root, pid)).ok()?;
    Some(file)
}

/// Removes this process's liveness lock file (at its end; the lock itself goes with it).
pub fn release_liveness_lock() {
    let _ = fs::remove_file(lock_path(Path::new(LIVE_ROOT), std::process::id()));
}

/// Whether the lock file at `path` is held by a live process.
fn lock_held(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; a shared lock we get is released on drop.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
}

/// Removes lock files no process holds (left by processes killed with SIGKILL).
fn sweep_free_locks(root: &Path) {
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "lock") && !lock_held(&path) {
            let _ = fs::remove_file(path);
        }
    }
}

/// Whether floodclone `pid` runs: it holds its liveness lock (a pid alone may name another
/// process by now).
fn pid_alive(pid: u32) -> bool {
    lock_held(&lock_path(Path::new(LIVE_ROOT), pid))
}

/// The newest instance entry under `dir` whose process is alive (what a process that died
/// without cleaning up left is skipped).
pub fn newest_live_instance(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| instance_pid(&e.file_name()).is_some_and(pid_alive))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// Removes what processes that no longer exist left under `root/<netns>/<pid>[.json]`
/// (a process killed with SIGKILL cannot clean up after itself; pinned maps would hold
/// kernel memory for good). Empty namespace directories go too.
pub fn sweep_dead_instances(root: &Path) {
    sweep_dead_instances_by(root, pid_alive)
}

fn sweep_dead_instances_by(root: &Path, pid_alive: impl Fn(u32) -> bool) {
    // Entries that are not instances are not ours: leave them.
    let alive = |name: &std::ffi::OsStr| instance_pid(name).is_none_or(&pid_alive);
    for ns in fs::read_dir(root).into_iter().flatten().flatten() {
        for inst in fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            if !alive(&inst.file_name()) {
                let p = inst.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
        let _ = fs::remove_dir(ns.path()); // only succeeds when empty
    }
}

/// The programs attached to this namespace's interfaces, owned by this process. Dropping it
/// detaches them and removes the pins.
pub struct LinkStats {
    ebpf: Ebpf,
    /// None when the maps could not be pinned (no bpffs and no right to mount one): the
    /// daemon still measures, only `floodclone stats` cannot read it from outside.
    pin_dir: Option<PathBuf>,
    interfaces: Vec<(u32, String)>,
    /// The programs count only the peers given to [`Self::watch_only`], not everyone.
    watching_members: bool,
    /// Logs the programs' first-packet records through `tracing` (target `floodclone_ebpf`).
    _log_drain: Option<LogDrain>,
}

/// A thread that waits on the programs' ring buffer of [`FirstPacket`] records and logs each
/// through `tracing`. Stopped and joined on drop, so its descriptor does not outlive the
/// programs.
struct LogDrain {
    /// Closed on drop: the thread's poll wakes on the other end's hang-up and returns, so
    /// it needs no timeout (no wake-ups while idle, no wait at exit).
    stop: Option<std::io::PipeWriter>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogDrain {
    fn start(mut ring: RingBuf<MapData>) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let (stopped, stop) = std::io::pipe()?;
        let thread = std::thread::spawn(move || loop {
            let mut fds = [ring.as_raw_fd(), stopped.as_raw_fd()].map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: two valid pollfds, both descriptors open for the thread's life.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            while let Some(item) = ring.next() {
                if let Some(first) = first_packet(&item) {
                    tracing::debug!(
                        target: "floodclone_ebpf",
                        "first packet from {} on ifindex {} (ttl {})",
                        floodclone_common::peer_addr(first.peer),
                        first.ifindex,
                        first.ttl
                    );
                }
            }
            if n > 0 && fds[1].revents != 0 {
                return;
            }
        });
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// A ring buffer record as the kernel wrote it (None if its size is not a record's).
fn first_packet(bytes: &[u8]) -> Option<FirstPacket> {
    (bytes.len() == std::mem::size_of::<FirstPacket>())
        // SAFETY: exactly a record's bytes; every bit pattern is a valid FirstPacket.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FirstPacket>()) })
}

impl Drop for LogDrain {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl LinkStats {
    /// Loads the programs, attaches them on ingress and egress of every non-loopback
    /// interface, and pins the maps for other processes.
    pub fn attach() -> Result<Self, LinkStatsError> {
        let pin_dir = pin_dir_for(current_netns_inode()?, std::process::id());
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT).map_err(|e| {
            if is_permission(&e) {
                LinkStatsError::NotPermitted(e.to_string())
            } else {
                LinkStatsError::Load(format!("{e:#}"))
            }
        })?;
        let log_drain = ebpf
            .take_map(FIRST_PACKET_MAP_NAME)
            .ok_or_else(|| format!("map {FIRST_PACKET_MAP_NAME} missing"))
            .and_then(|m| RingBuf::try_from(m).map_err(|e| e.to_string()))
            .and_then(|ring| LogDrain::start(ring).map_err(|e| e.to_string()))
            .inspect_err(|e| tracing::debug!("eBPF log lines unavailable: {e}"))
            .ok();
        let interfaces = non_loopback_interfaces();
        for (prog_name, attach_type) in [
            ("floodclone_egress", TcAttachType::Egress),
            ("floodclone_ingress", TcAttachType::Ingress),
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(prog_name)
                .ok_or_else(|| LinkStatsError::Load(format!("program {prog_name} missing")))?
                .try_into()
                .map_err(|e| LinkStatsError::Load(format!("{e}")))?;
            prog.load().map_err(|e| {
                if is_permission(&e) {
                    LinkStatsError::NotPermitted(e.to_string())
                } else {
                    LinkStatsError::Load(format!("{prog_name}: {e:?}"))
                }
            })?;
            for (_, iface) in &interfaces {
                prog.attach(iface, attach_type)
                    .map_err(|e| LinkStatsError::Attach {
                        iface: iface.clone(),
                        reason: format!("{e}"),
                    })?;
            }
        }
        for name in [LINK_MAP_NAME, SPIN_MAP_NAME, WATCH_MAP_NAME] {
            ebpf.map(name)
                .ok_or_else(|| LinkStatsError::Load(format!("map {name} missing")))?;
        }
        // Every peer is counted until a daemon says which ones it cares about.
        watched_peers(&mut ebpf)?
            .insert(WATCH_ALL, 1, 0)
            .map_err(|e| LinkStatsError::Load(format!("{WATCH_MAP_NAME}: {e}")))?;
        hold_liveness_lock();
        let pinned = Self::pin(&ebpf, &pin_dir);
        if let Err(e) = &pinned {
            let _ = fs::remove_dir_all(&pin_dir);
            tracing::warn!("link stats are measured but not published for `floodclone stats`: {e}");
        }
        Ok(Self {
            ebpf,
            pin_dir: pinned.ok().map(|_| pin_dir),
            interfaces,
            watching_members: false,
            _log_drain: log_drain,
        })
    }

    fn pin(ebpf: &Ebpf, pin_dir: &Path) -> Result<(), LinkStatsError> {
        ensure_bpffs(Path::new(PIN_ROOT))?;
        sweep_dead_instances(Path::new(PIN_ROOT));
        fs::create_dir_all(pin_dir)?;
        // This instance's maps are its owner's only (bpffs grants 0755 by default): they
        // say who talks to whom. The directories above are shared by every instance.
        fs::set_permissions(pin_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        for name in [LINK_MAP_NAME, SPIN_MAP_NAME] {
            let map = ebpf.map(name).expect("checked above");
            map.pin(pin_dir.join(name))
                .map_err(|e| LinkStatsError::Pin {
                    path: pin_dir.into(),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    pub fn interfaces(&self) -> &[(u32, String)] {
        &self.interfaces
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// From now on only `peers` (added to those given before) get new counters: packets
    /// from anyone else, spoofed or not, no longer create entries that would evict theirs.
    /// Counters made before keep counting.
    pub fn watch_only(&mut self, peers: &[IpAddr]) -> Result<(), LinkStatsError> {
        let mut map = watched_peers(&mut self.ebpf)?;
        let err = |e: aya::maps::MapError| LinkStatsError::Load(format!("{WATCH_MAP_NAME}: {e}"));
        for p in peers {
            map.insert(floodclone_common::peer_key(*p), 1, 0)
                .map_err(err)?;
        }
        if !self.watching_members {
            map.remove(&WATCH_ALL).map_err(err)?;
            self.watching_members = true;
        }
        Ok(())
    }

    pub fn snapshot(&self) -> Result<Snapshot, LinkStatsError> {
        let link = self.ebpf.map(LINK_MAP_NAME).expect("checked at attach");
        let spin = self.ebpf.map(SPIN_MAP_NAME).expect("checked at attach");
        read_maps(link, spin)
    }
}

impl Drop for LinkStats {
    fn drop(&mut self) {
        let Some(pin_dir) = &self.pin_dir else { return };
        let _ = fs::remove_dir_all(pin_dir);
        if let Some(parent) = pin_dir.parent() {
            let _ = fs::remove_dir(parent); // only succeeds when no other instance is left
        }
    }
}

fn watched_peers(
    ebpf: &mut Ebpf,
) -> Result<BpfHashMap<&mut MapData, floodclone_common::PeerAddr, u8>, LinkStatsError> {
    let map = ebpf.map_mut(WATCH_MAP_NAME).expect("checked at attach");
    BpfHashMap::try_from(map).map_err(|e| LinkStatsError::Load(format!("{WATCH_MAP_NAME}: {e}")))
}

/// Reads another process's pinned maps.
pub struct PinnedReader {
    link: Map,
    spin: Map,
    pub pin_dir: PathBuf,
}

impl PinnedReader {
    /// Opens the pins of a running floodclone in this network namespace (the newest one when
    /// several are running).
    pub fn open_in_this_netns() -> Result<Self, LinkStatsError> {
        let ns_dir = Path::new(PIN_ROOT).join(current_netns_inode()?.to_string());
        let dir =
            newest_live_instance(&ns_dir).ok_or_else(|| LinkStatsError::NoPins(ns_dir.clone()))?;
        Self::open(&dir)
    }

    pub fn open(dir: &Path) -> Result<Self, LinkStatsError> {
        let open = |name: &'static str| -> Result<MapData, LinkStatsError> {
            MapData::from_pin(dir.join(name)).map_err(|e| LinkStatsError::Read {
                name,
                reason: e.to_string(),
            })
        };
        let as_map = |name: &'static str| -> Result<Map, LinkStatsError> {
            Map::from_map_data(open(name)?).map_err(|e| LinkStatsError::Read {
                name,
                reason: e.to_string(),
            })
        };
        let (link, spin) = (as_map(LINK_MAP_NAME)?, as_map(SPIN_MAP_NAME)?);
        // A daemon of another version may keep other maps (session 46 made the link
        // counters shared, not per-CPU): say so now, not as a failed read at every sample.
        let other_version = |name: &'static str| {
            move |e: aya::maps::MapError| LinkStatsError::OtherVersion {
                dir: dir.to_path_buf(),
                name,
                reason: e.to_string(),
            }
        };
        BpfHashMap::<&MapData, LinkKey, LinkCounters>::try_from(&link)
            .map_err(other_version(LINK_MAP_NAME))?;
        BpfHashMap::<&MapData, SpinKey, SpinState>::try_from(&spin)
            .map_err(other_version(SPIN_MAP_NAME))?;
        Ok(Self {
            link,
            spin,
            pin_dir: dir.to_path_buf(),
        })
    }

    pub fn snapshot(&self) -> Result<Snapshot, LinkStatsError> {
        read_maps(&self.link, &self.spin)
    }
}

fn read_maps(link: &Map, spin: &Map) -> Result<Snapshot, LinkStatsError> {
    let at = Instant::now();
    let read_err = |name: &'static str| {
        move |e: aya::maps::MapError| LinkStatsError::Read {
            name,
            reason: e.to_string(),
        }
    };
    let link: BpfHashMap<&MapData, LinkKey, LinkCounters> =
        BpfHashMap::try_from(link).map_err(read_err(LINK_MAP_NAME))?;
    let mut peers: HashMap<(u32, floodclone_common::PeerAddr), PeerCounters> = HashMap::new();
    for entry in link.iter() {
        let (key, counters) = entry.map_err(read_err(LINK_MAP_NAME))?;
        let slot = peers
            .entry((key.ifindex, key.peer))
            .or_insert_with(|| PeerCounters {
                ifindex: key.ifindex,
                peer: Some(floodclone_common::peer_addr(key.peer)),
                ..Default::default()
            });
        if key.direction == DIR_EGRESS {
            slot.egress = counters;
        } else {
            slot.ingress = counters;
        }
    }
    let spin_map: BpfHashMap<&MapData, SpinKey, SpinState> =
        BpfHashMap::try_from(spin).map_err(read_err(SPIN_MAP_NAME))?;
    let mut spin = Vec::new();
    for entry in spin_map.iter() {
        let (key, state) = entry.map_err(read_err(SPIN_MAP_NAME))?;
        spin.push(SpinFlow { key, state });
    }
    let mut peers: Vec<_> = peers.into_values().collect();
    peers.sort_by_key(|p| (p.ifindex, p.peer));
    Ok(Snapshot { at, peers, spin })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_alive_while_it_holds_its_lock_whatever_its_pid() {
        let root = std::env::temp_dir().join(format!("fc-live-{}", std::process::id()));
        let held = take_liveness_lock(&root, 4242).expect("lock taken");
        assert!(lock_held(&lock_path(&root, 4242)));
        // Pid 1 exists but holds no floodclone lock: a reused pid is not taken for alive.
        assert!(!lock_held(&lock_path(&root, 1)));
        // A holder gone (its descriptor closed, as at exit): the file is free, and swept
        // at the next start.
        drop(held);
        assert!(!lock_held(&lock_path(&root, 4242)));
        let _again = take_liveness_lock(&root, 4243).expect("lock taken");
        assert!(
            !lock_path(&root, 4242).exists(),
            "a free lock file is swept"
        );
        assert!(lock_path(&root, 4243).exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn sweep_removes_only_dead_instances() {
        let root = std::env::temp_dir().join(format!("fc-sweep-{}", std::process::id()));
        let live = std::process::id().to_string();
        let dead = "99999999";
        for (ns, inst, dir) in [
            ("1", &live[..], true),
            ("1", dead, true),
            ("2", dead, false),
        ] {
            let p = root.join(ns).join(if dir {
                inst.to_string()
            } else {
                format!("{inst}.json")
            });
            if dir {
                fs::create_dir_all(p.join("LINK_STATS")).unwrap();
            } else {
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, b"{}").unwrap();
            }
        }
        fs::create_dir_all(root.join("1").join("not-a-pid")).unwrap();
        let me = std::process::id();
        sweep_dead_instances_by(&root, |pid| pid == me);
        assert!(root.join("1").join(&live).exists());
        assert!(root.join("1").join("not-a-pid").exists());
        assert!(!root.join("1").join(dead).exists());
        assert!(
            !root.join("2").exists(),
            "empty namespace directory removed"
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
