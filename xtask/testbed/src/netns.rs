//! The emulated testbed: one network namespace per node, one veth pair per link (its own
//! IPv4 /30 and IPv6 /126; a link with delay, jitter or loss is two pairs with a
//! [`DelayLine`] between), one identity address per family per node on its loopback
//! (10.100.x.y/32 and fd00:100::n/128) with `src` on every route, HTB on each direction,
//! routes of both families along shortest hop paths (ties to the widest bottleneck),
//! forwarding on and rp_filter and IPv6 duplicate address detection off everywhere. Each
//! node's namespace has its own `/etc/hosts` (`/etc/netns/NS/hosts`, which `ip netns exec`
//! mounts): every node's name gives both identity addresses, `NAME.v4` and `NAME.v6` one
//! each.
//!
//! Namespaces are named `fc-<owner pid>-<seq>-<node>` so parallel runs never collide and a
//! crashed run's leftovers are recognisable (their owner is dead). Everything a [`Testbed`]
//! creates is removed when it is dropped, also on panic; the xtask binary also removes it on
//! Ctrl-C.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
};

use crate::{
    delayline::{self, DelayLine},
    routing::next_hops,
    topology::{EventAction, Topology},
};

/// Prefix of every namespace the testbed creates.
pub const NETNS_PREFIX: &str = "fc-";
/// Queue each shaped direction may hold, in milliseconds at its rate.
pub const QUEUE_MS: f64 = 25.0;
/// Largest packet a sender may hand a veth at once (segmentation offload), unless the
/// topology says otherwise. The shaping FIFO sits before segmentation and counts such a
/// packet whole: with the kernel's default 64 KB a FIFO of 25 ms at 10 Mbit/s (31 KB)
/// could never take one of TCP's, and TCP crawled.
const GSO_MAX_SIZE: u32 = 16384;
/// HTB burst, in milliseconds at the rate (at least one jumbo GSO packet).
pub const BURST_MS: f64 = 4.0;

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("the testbed needs root (network namespaces, veth, tc); run as root")]
    NotRoot,
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("cannot run `{cmd}`: {source} (is iproute2 installed? `cargo xtask setup`)")]
    Spawn { cmd: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, TestbedError>;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command, feeding `stdin` if given; errors carry its stderr.
pub fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| TestbedError::Spawn {
            cmd: shown.clone(),
            source,
        })?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())
            .map_err(|source| TestbedError::Spawn {
                cmd: shown.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| TestbedError::Spawn {
            cmd: shown.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            cmd: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args), None)
}

/// Identity address of node `i` (a /32 on its loopback).
pub fn identity_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// IPv6 identity address of node `i` (a /128 on its loopback, beside the IPv4 one).
pub fn identity_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0)) + i as u128 + 1)
}

/// IPv6 addresses of the two ends of link `k` (its own /126): (a end, b end).
pub fn link_addrs6(k: usize) -> (Ipv6Addr, Ipv6Addr) {
    let base = u128::from(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0)) + 4 * k as u128;
    (Ipv6Addr::from(base + 1), Ipv6Addr::from(base + 2))
}

/// Node `node`'s addresses on link `k` (both families), the end it holds.
fn link_end_addrs(topo: &Topology, k: usize, node: usize) -> (Ipv4Addr, Ipv6Addr) {
    let ((a, b), (a6, b6)) = (link_addrs(k), link_addrs6(k));
    if topo.links[k].a == node {
        (a, a6)
    } else {
        (b, b6)
    }
}

/// Where `ip netns exec` finds namespace `ns`'s own files (its `hosts`).
fn netns_etc(ns: &str) -> std::path::PathBuf {
    std::path::Path::new("/etc/netns").join(ns)
}

/// Addresses of the two ends of link `k` (its own /30): (a end, b end).
pub fn link_addrs(k: usize) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + 4 * k as u32;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

/// Name of the interface in `node`'s namespace that leads to `peer`.
pub fn iface_name(peer: &str) -> String {
    format!("v-{peer}")
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Prefixes of testbeds alive in this process, for the Ctrl-C handler.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A live testbed. Dropping it kills every process in its namespaces and deletes them.
pub struct Testbed {
    pub topo: Topology,
    pub prefix: String,
    link_up: Vec<bool>,
    children: Vec<Child>,
    /// The delay line of each link with propagation (delay, jitter or loss).
    delay_lines: Vec<(usize, DelayLine)>,
    torn_down: bool,
}

impl Testbed {
    /// Builds the testbed under a prefix unique to this process and call.
    pub fn up(topo: &Topology) -> Result<Self> {
        let prefix = format!(
            "{NETNS_PREFIX}{}-{}-",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        Self::up_with_prefix(topo, &prefix)
    }

    /// Builds the testbed with namespaces named `<prefix><node>`.
    pub fn up_with_prefix(topo: &Topology, prefix: &str) -> Result<Self> {
        if !is_root() {
            return Err(TestbedError::NotRoot);
        }
        LIVE.lock().unwrap().push(prefix.to_string());
        let mut bed = Self {
            topo: topo.clone(),
            prefix: prefix.to_string(),
            link_up: vec![true; topo.links.len()],
            children: Vec::new(),
            delay_lines: Vec::new(),
            torn_down: false,
        };
        // On error, `bed` is dropped and removes what was built so far.
        bed.build()?;
        Ok(bed)
    }

    pub fn netns(&self, node: usize) -> String {
        format!("{}{}", self.prefix, self.topo.nodes[node].name)
    }

    /// The middle namespace of link `k` (only links with propagation have one). Node names
    /// are letters and digits, so a name with `-wire` never is one.
    pub fn wire_netns(&self, k: usize) -> String {
        format!("{}{k}-wire", self.prefix)
    }

    /// The delay lines running, with the link each serves.
    pub fn delay_lines(&self) -> &[(usize, DelayLine)] {
        &self.delay_lines
    }

    /// CPU seconds the delay lines have used so far (they run in this process).
    pub fn delay_line_cpu_s(&self) -> f64 {
        self.delay_lines.iter().map(|(_, l)| l.cpu_s()).sum()
    }

    /// The GSO limit of every veth between two nodes.
    fn gso_max_size(&self) -> u32 {
        self.topo.gso_max_size.unwrap_or(GSO_MAX_SIZE)
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.topo.nodes.iter().position(|n| n.name == name)
    }

    fn build(&mut self) -> Result<()> {
        let topo = self.topo.clone();
        // Each link's loss and jitter draws, new every testbed: with one fixed sequence per
        // link, every run lost the same early frames (on wan-mesh's s-d2, its 6th: often
        // the first ARP reply, which costs a second of ARP retry at every start).
        let mut line_seeds = crate::random::Rng::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64
                ^ u64::from(std::process::id()) << 40,
        );
        for i in 0..topo.nodes.len() {
            ip(&["netns", "add", &self.netns(i)])?;
        }
        for (k, l) in topo.links.iter().enumerate() {
            let (na, nb) = (&topo.nodes[l.a].name, &topo.nodes[l.b].name);
            let (ns_a, ns_b) = (self.netns(l.a), self.netns(l.b));
            if !l.has_propagation() {
                let limits = VethLimits {
                    gso_max_size: self.gso_max_size(),
                    gso_max_segs: 0,
                    mtu: topo.mtu,
                };
                veth(&ns_a, &iface_name(nb), &ns_b, &iface_name(na), limits)?;
                continue;
            }
            // a's end - [ea  delay line  eb] - b's end. A lossy link segments at its ends,
            // so one loss is one packet.
            let wire = self.wire_netns(k);
            ip(&["netns", "add", &wire])?;
            let segs = if l.prop_ab.loss > 0.0 || l.prop_ba.loss > 0.0 {
                1
            } else {
                0
            };
            let limits = VethLimits {
                gso_max_size: GSO_MAX_SIZE,
                gso_max_segs: segs,
                mtu: None,
            };
            veth(&ns_a, &iface_name(nb), &wire, delayline::END_A, limits)?;
            veth(&ns_b, &iface_name(na), &wire, delayline::END_B, limits)?;
            run(
                Command::new("ip").args(["-n", &wire, "-batch", "-"]),
                Some(&format!(
                    "link set lo up\nlink set {} up\nlink set {} up\n",
                    delayline::END_A,
                    delayline::END_B
                )),
            )?;
            // The middle has no addresses; it must not speak on the link either.
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &wire, "sysctl", "-q", "-w"])
                .args([
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ]);
            run(&mut cmd, None)?;
            let line = DelayLine::start(
                &format!("/run/netns/{wire}"),
                l.prop_ab,
                l.prop_ba,
                line_seeds.next_u64(),
            )
            .map_err(|source| TestbedError::Spawn {
                cmd: format!("delay line of link {na}-{nb}"),
                source,
            })?;
            self.delay_lines.push((k, line));
        }
        for i in 0..topo.nodes.len() {
            self.address_node(i)?;
        }
        for k in 0..topo.links.len() {
            self.shape(k, topo.links[k].mbit_ab, topo.links[k].mbit_ba, "add")?;
        }
        self.apply_routes()?;
        Ok(())
    }

    /// Node `i`'s addresses (both families, its identities and one per link), sysctls and
    /// `/etc/hosts`; its links up.
    fn address_node(&self, i: usize) -> Result<()> {
        let topo = &self.topo;
        // Addresses usable at once (no duplicate detection: each is unique by
        // construction) and kept while a link is down (an event), as IPv4 ones are.
        let mut sysctl = vec![
            "net.ipv4.ip_forward=1".to_string(),
            "net.ipv4.conf.all.rp_filter=0".to_string(),
            "net.ipv4.conf.default.rp_filter=0".to_string(),
            "net.ipv4.conf.lo.rp_filter=0".to_string(),
            "net.ipv6.conf.all.disable_ipv6=0".to_string(),
            "net.ipv6.conf.all.forwarding=1".to_string(),
            "net.ipv6.conf.all.accept_dad=0".to_string(),
            "net.ipv6.conf.default.accept_dad=0".to_string(),
            "net.ipv6.conf.all.keep_addr_on_down=1".to_string(),
        ];
        let mut batch = String::from("link set lo up\n");
        batch += &format!("addr add {}/32 dev lo\n", identity_addr(i));
        batch += &format!("addr add {}/128 dev lo nodad\n", identity_addr6(i));
        for (peer, k) in topo.neighbours(i) {
            let dev = iface_name(&topo.nodes[peer].name);
            let (mine, mine6) = link_end_addrs(topo, k, i);
            batch += &format!(
                "addr add {mine}/30 dev {dev}\naddr add {mine6}/126 dev {dev} nodad\n\
                 link set {dev} up\n"
            );
            sysctl.push(format!("net.ipv4.conf.{dev}.rp_filter=0"));
            sysctl.push(format!("net.ipv6.conf.{dev}.accept_dad=0"));
            sysctl.push(format!("net.ipv6.conf.{dev}.keep_addr_on_down=1"));
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns(i), "sysctl", "-q", "-w"]);
        cmd.args(&sysctl);
        run(&mut cmd, None)?;
        run(
            Command::new("ip").args(["-n", &self.netns(i), "-batch", "-"]),
            Some(&batch),
        )?;
        self.write_hosts_file(i)
    }

    /// Node `i`'s `/etc/hosts`: every node by name (both families), `NAME.v4`, `NAME.v6`.
    fn write_hosts_file(&self, i: usize) -> Result<()> {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
        for (j, n) in self.topo.nodes.iter().enumerate() {
            let (v4, v6) = (identity_addr(j), identity_addr6(j));
            text += &format!("{v4} {0} {0}.v4\n{v6} {0} {0}.v6\n", n.name);
        }
        let dir = netns_etc(&self.netns(i));
        let io = |source| TestbedError::Spawn {
            cmd: format!("write {}/hosts", dir.display()),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        std::fs::write(dir.join("hosts"), text).map_err(io)
    }

    /// HTB at `mbit` on the egress of `dev` in `netns`, with a FIFO of [`QUEUE_MS`].
    ///
    /// The FIFO's limit is in bytes: a packet limit counts a GSO super-packet (QUIC and TCP
    /// senders hand the kernel many segments at once) as one, so a packet-limited "25 ms"
    /// FIFO holds several times that.
    fn shape_one(&self, netns: &str, dev: &str, mbit: f64, verb: &str) -> Result<()> {
        let bytes_per_ms = mbit * 1e6 / 8.0 / 1e3;
        let burst = ((bytes_per_ms * BURST_MS) as u64).max(70_000);
        // At least two of the largest packets.
        let limit = ((bytes_per_ms * QUEUE_MS) as u64).max(2 * u64::from(self.gso_max_size()));
        let rate = format!("{}kbit", (mbit * 1000.0).round() as u64);
        let class = format!(
            "class {verb} dev {dev} parent 1: classid 1:10 htb rate {rate} ceil {rate} \
             burst {burst} cburst {burst}\n"
        );
        let batch = if verb == "add" {
            format!(
                "qdisc add dev {dev} root handle 1: htb default 10\n{class}\
                 qdisc add dev {dev} parent 1:10 handle 10: bfifo limit {limit}\n"
            )
        } else {
            format!("{class}qdisc change dev {dev} parent 1:10 handle 10: bfifo limit {limit}\n")
        };
        run(
            Command::new("tc").args(["-n", netns, "-batch", "-"]),
            Some(&batch),
        )
        .map(|_| ())
    }

    fn shape(&self, k: usize, mbit_ab: f64, mbit_ba: f64, verb: &str) -> Result<()> {
        let l = &self.topo.links[k];
        let (na, nb) = (&self.topo.nodes[l.a].name, &self.topo.nodes[l.b].name);
        self.shape_one(&self.netns(l.a), &iface_name(nb), mbit_ab, verb)?;
        self.shape_one(&self.netns(l.b), &iface_name(na), mbit_ba, verb)
    }

    /// (Re)installs every node's routes for the links currently up; unreachable identities
    /// lose their route, as a converged routing protocol would do.
    fn apply_routes(&self) -> Result<()> {
        let topo = &self.topo;
        let next = next_hops(topo, &self.link_up);
        for (u, next_u) in next.iter().enumerate() {
            let mut batch = String::new();
            for (v, hop) in next_u.iter().enumerate() {
                if u == v {
                    continue;
                }
                match *hop {
                    Some((hop, k)) => {
                        let (via, via6) = link_end_addrs(topo, k, hop);
                        let dev = iface_name(&topo.nodes[hop].name);
                        batch += &format!(
                            "route replace {}/32 via {via} dev {dev} src {}\n\
                             route replace {}/128 via {via6} dev {dev} src {}\n",
                            identity_addr(v),
                            identity_addr(u),
                            identity_addr6(v),
                            identity_addr6(u)
                        );
                    }
                    None => {
                        batch += &format!(
                            "route del {}/32\nroute del {}/128\n",
                            identity_addr(v),
                            identity_addr6(v)
                        )
                    }
                }
            }
            // -force: keep going past `route del` of a route the kernel already dropped.
            let _ = run(
                Command::new("ip").args(["-n", &self.netns(u), "-force", "-batch", "-"]),
                Some(&batch),
            );
        }
        Ok(())
    }

    /// Applies one timed event now.
    pub fn apply(&mut self, link: usize, action: &EventAction) -> Result<()> {
        match *action {
            EventAction::SetRate { mbit_ab, mbit_ba } => {
                self.shape(link, mbit_ab, mbit_ba, "change")
            }
            EventAction::Down | EventAction::Up => {
                let up = matches!(action, EventAction::Up);
                let l = &self.topo.links[link];
                let state = if up { "up" } else { "down" };
                for (me, peer) in [(l.a, l.b), (l.b, l.a)] {
                    ip(&[
                        "-n",
                        &self.netns(me),
                        "link",
                        "set",
                        &iface_name(&self.topo.nodes[peer].name),
                        state,
                    ])?;
                }
                self.link_up[link] = up;
                self.apply_routes()
            }
        }
    }

    /// A command that runs `program args..` inside `node`'s namespace.
    pub fn command(&self, node: usize, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns(node), program]);
        cmd
    }

    /// Starts a process in `node`'s namespace; it is killed at teardown at the latest.
    pub fn spawn(&mut self, mut cmd: Command) -> Result<usize> {
        let shown = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .map_err(|source| TestbedError::Spawn { cmd: shown, source })?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    pub fn child(&mut self, handle: usize) -> &mut Child {
        &mut self.children[handle]
    }

    /// Runs `f` on a thread that has entered `node`'s network namespace: sockets it opens
    /// live there. The calling thread is not moved.
    pub fn in_netns<T: Send + 'static>(
        &self,
        node: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.netns(node));
        std::thread::spawn(move || {
            enter_netns(&path).unwrap_or_else(|e| panic!("entering {path}: {e}"));
            f()
        })
    }

    /// Bytes `node` has sent toward `peer` since the testbed was built, as the wire carries
    /// them: the count of the link's root qdisc (its shaping), which counts what it let out,
    /// not what its queue dropped, and a GSO packet as the frames it becomes, headers and
    /// all. The interface's own counter (the fallback, for a link left unshaped) counts a
    /// GSO packet with one set of headers: 1.04 copies of a file on a chain link where the
    /// frames carried 1.06-1.07.
    pub fn tx_bytes(&self, node: usize, peer: usize) -> Option<u64> {
        let dev = iface_name(&self.topo.nodes[peer].name);
        let ns = self.netns(node);
        let json = |args: &[&str], tool: &str| -> Option<serde_json::Value> {
            let out = run(Command::new(tool).args(args), None).ok()?;
            serde_json::from_str(&out).ok()
        };
        let shaped =
            json(&["-n", &ns, "-s", "-j", "qdisc", "show", "dev", &dev], "tc").and_then(|v| {
                let root = v.as_array()?.iter().find(|q| q["root"] == true)?.clone();
                (root["kind"] == "htb").then(|| root["bytes"].as_u64())?
            });
        shaped.or_else(|| {
            let v = json(&["-n", &ns, "-s", "-j", "link", "show", "dev", &dev], "ip")?;
            v.get(0)?.get("stats64")?.get("tx")?.get("bytes")?.as_u64()
        })
    }

    /// Removes everything: kills processes inside the namespaces, deletes them.
    pub fn down(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        self.delay_lines.clear();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_namespaces(&self.prefix);
        LIVE.lock().unwrap().retain(|p| p != &self.prefix);
    }

    /// Leaves the testbed up after this value is gone (`cargo xtask testbed up`); `testbed
    /// down` removes it. Delay lines run in this process: links with propagation carry
    /// nothing once it exits.
    pub fn persist(mut self) {
        self.torn_down = true;
        LIVE.lock().unwrap().retain(|p| p != &self.prefix);
    }

    /// A human-readable description: namespaces, addresses, routes and shaping.
    pub fn show(&self) -> String {
        describe(&self.prefix)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.down();
    }
}

/// Both ends of a veth pair.
#[derive(Clone, Copy)]
struct VethLimits {
    gso_max_size: u32,
    /// Segments per packet when > 0 (1: no offload).
    gso_max_segs: u32,
    /// When not the default 1500.
    mtu: Option<u32>,
}

/// A veth pair: `name_a` in namespace `ns_a`, `name_b` in `ns_b`, both with `limits`.
fn veth(ns_a: &str, name_a: &str, ns_b: &str, name_b: &str, limits: VethLimits) -> Result<()> {
    let VethLimits {
        gso_max_size,
        gso_max_segs,
        mtu,
    } = limits;
    let gso_max_size = gso_max_size.to_string();
    let segs = gso_max_segs.to_string();
    let end = |name: &'static str, ns: &str, dev: &str| {
        let mut v = vec![
            name.to_string(),
            dev.to_string(),
            "netns".into(),
            ns.to_string(),
        ];
        v.extend(["gso_max_size".into(), gso_max_size.clone()]);
        if gso_max_segs > 0 {
            v.extend(["gso_max_segs".into(), segs.clone()]);
        }
        if let Some(m) = mtu {
            v.extend(["mtu".into(), m.to_string()]);
        }
        v
    };
    let mut args = vec!["link".to_string(), "add".into()];
    args.extend(end("name", ns_a, name_a));
    args.extend(["type".into(), "veth".into(), "peer".into()]);
    args.extend(end("name", ns_b, name_b));
    run(Command::new("ip").args(&args), None).map(|_| ())
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &str) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace fd affects only the calling thread for CLONE_NEWNET.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Every testbed namespace present, by name.
pub fn list_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .collect()
}

/// Kills every process in, and deletes, each namespace whose name starts with `prefix`.
pub fn remove_namespaces(prefix: &str) {
    for ns in list_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
    {
        // A namespace lives on while a process is inside it: kill them first.
        if let Ok(pids) = ip(&["netns", "pids", &ns]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = ip(&["netns", "del", &ns]);
    }
    // Each namespace's own files, also those of a build that died before its namespace.
    for entry in std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(NETNS_PREFIX) && name.starts_with(prefix) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Removes the testbeds of this process that are still alive (for signal handlers).
pub fn remove_live_testbeds() {
    let prefixes = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
    for p in prefixes {
        remove_namespaces(&p);
    }
}

/// Removes testbeds left by processes that no longer exist. Returns the namespaces removed.
pub fn remove_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let mut by_owner: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ns in list_namespaces() {
        let owner = ns[NETNS_PREFIX.len()..]
            .split('-')
            .next()
            .unwrap_or("")
            .to_string();
        by_owner.entry(owner).or_default().push(ns);
    }
    for (owner, names) in by_owner {
        let alive = owner
            .parse::<u32>()
            .map(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
            .unwrap_or(true); // named testbeds (`testbed up`) are removed by name only
        if !alive {
            for ns in &names {
                remove_namespaces(ns);
            }
            removed.extend(names);
        }
    }
    removed
}

/// Text description of the namespaces starting with `prefix`.
pub fn describe(prefix: &str) -> String {
    let mut out = String::new();
    let mut names: Vec<_> = list_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    for ns in names {
        out += &format!("== {ns}\n");
        for args in [vec!["-n", &ns, "-br", "addr"], vec!["-n", &ns, "route"]] {
            out += &ip(&args).unwrap_or_else(|e| e.to_string());
        }
        if let Ok(t) = run(Command::new("tc").args(["-n", &ns, "class", "show"]), None) {
            for line in t.lines() {
                out += &format!("tc {line}\n");
            }
        }
    }
    out
}

/// Mounts a bpffs at `/run/floodclone/bpf` on the host, where every `ip netns exec` process
/// sees it (each gets a private `/sys`), so pinned maps are readable across processes.
pub fn ensure_host_bpffs() -> Result<()> {
    let dir = "/run/floodclone/bpf";
    std::fs::create_dir_all(dir).map_err(|source| TestbedError::Spawn {
        cmd: format!("mkdir {dir}"),
        source,
    })?;
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(dir));
    if !mounted {
        run(Command::new("mount").args(["-t", "bpf", "bpf", dir]), None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct() {
        assert_ne!(identity_addr(0), identity_addr(250));
        let (a, b) = link_addrs(70);
        assert_eq!(u32::from(b) - u32::from(a), 1);
        assert_eq!(u32::from(a) % 4, 1);
        assert_ne!(identity_addr6(0), identity_addr6(250));
        assert_eq!(identity_addr6(0).to_string(), "fd00:100::1");
        let (a, b) = link_addrs6(70);
        assert_eq!(u128::from(b) - u128::from(a), 1);
        assert_eq!(u128::from(a) % 4, 1);
    }
}
