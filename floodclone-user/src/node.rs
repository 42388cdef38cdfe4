//! What both roles share: the options every node takes, the `Node` a role runs on (its
//! endpoint, connections, output and link meters), and `drive`, the one event loop both
//! roles run in. The roles themselves are [`crate::source`] and [`crate::destination`]; the
//! connections are in `conn`.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use floodclone_sched::MemberId;
use quinn::{Endpoint, VarInt};
use tokio::sync::mpsc;

use crate::{
    conn::{self, ConnContext, ConnEvent, Connections},
    discovery,
    events::TxBytesByIface,
    output::Output,
    storage::StorageError,
    transport::{self, TransportError, CLOSE_DONE},
    wire::Msg,
};

pub const DEFAULT_PORT: u16 = 7878;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Discovery(#[from] discovery::DiscoveryError),
    #[error("{0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("the source at {addr} did not answer within {secs} s (is `floodclone send` running there, on that port?)")]
    SourceUnreachable { addr: SocketAddr, secs: u64 },
    #[error("the source refused this node: {0}")]
    NotMember(String),
    #[error("cannot serve --metrics on {addr}: {source} (is the address this host's, and the port free?)")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
    /// Stopped by its [`crate::api::Cancel`] handle.
    #[error("cancelled")]
    Cancelled,
}

/// The in-kernel link stats, once (and if) the programs are attached.
pub type SharedLinkStats = Arc<Mutex<Option<crate::linkstats::LinkStats>>>;

/// What every node takes, whatever its role.
#[derive(Clone)]
pub struct NodeOptions {
    pub port: u16,
    pub token: String,
    pub output: Output,
    pub link_stats: SharedLinkStats,
    /// Testing only: how serving departs from the protocol.
    pub misbehaviour: crate::Misbehaviour,
    pub congestion: transport::Congestion,
    /// `--max-rate`: the most chunk data this node uploads, Mbit/s over all connections.
    pub max_rate_mbit: Option<f64>,
    /// When the command started: the source reports each destination's completion from
    /// here, the time the user waited for it.
    pub started: Instant,
    /// `--metrics`: serve the node's figures for Prometheus here.
    pub metrics: Option<SocketAddr>,
}

/// What a role runs on: the endpoint and its connections, the output, the link meters.
pub(crate) struct Node {
    pub ctx: Arc<ConnContext>,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    pub ep: Endpoint,
    pub out: Output,
    /// When this node's loop started: the clock of the scheduler and of the events.
    pub start: Instant,
    pub conns: Connections,
    link_stats: SharedLinkStats,
    /// The members' addresses, the only peers the kernel counts once it has them.
    watched: std::collections::HashSet<IpAddr>,
    /// Those of `watched` the kernel has not been given yet.
    watch_pending: Vec<IpAddr>,
    pub meters: crate::meter::Meters,
    role: &'static str,
    /// What the role counts (progress, chunks), for `--metrics`.
    pub counts: crate::metrics::Counts,
    metrics: Option<crate::metrics::Exporter>,
}

impl Node {
    /// Opens the endpoint and starts accepting connections.
    pub fn open(opts: &NodeOptions, role: &'static str) -> Result<Self, NodeError> {
        let (ctx, events) = ConnContext::new(
            opts.token.clone(),
            opts.misbehaviour,
            opts.max_rate_mbit.map(crate::upload_cap::UploadCap::new),
        );
        let ep = transport::endpoint_with(opts.port, opts.congestion)?;
        conn::spawn_acceptor(ep.clone(), ctx.clone());
        let metrics = opts
            .metrics
            .map(|addr| {
                crate::metrics::Exporter::serve(addr)
                    .map_err(|source| NodeError::Metrics { addr, source })
            })
            .transpose()?;
        Ok(Self {
            ctx,
            events,
            ep,
            out: opts.output.clone(),
            start: Instant::now(),
            conns: Connections::default(),
            link_stats: opts.link_stats.clone(),
            watched: Default::default(),
            watch_pending: Vec::new(),
            meters: Default::default(),
            role,
            counts: Default::default(),
            metrics,
        })
    }

    /// Seconds since this node started.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Dials member `peer` at `addr` until it answers (or `deadline`).
    pub fn dial(
        &self,
        addr: SocketAddr,
        peer: floodclone_sched::MemberId,
        hello: Vec<Msg>,
        deadline: Option<Instant>,
    ) {
        conn::spawn_dial(
            self.ep.clone(),
            self.ctx.clone(),
            addr,
            peer,
            hello,
            deadline,
        );
    }

    /// Dials `addr` once, for `peer` ([`conn::spawn_dial_once`]).
    pub fn dial_once(
        &self,
        addr: SocketAddr,
        peer: floodclone_sched::MemberId,
        hello: Vec<Msg>,
        patience: Duration,
    ) {
        conn::spawn_dial_once(
            self.ep.clone(),
            self.ctx.clone(),
            addr,
            peer,
            hello,
            patience,
        );
    }

    /// Sends `msg` on every connection whose peer reads announcements there.
    pub fn announce(&self, msg: Msg) {
        self.announce_each(|_| Some(msg.clone()));
    }

    /// Sends each peer that reads our announcements what `msg_for` makes for it (the
    /// peer's member id, when known), if anything.
    pub fn announce_each(&self, mut msg_for: impl FnMut(Option<MemberId>) -> Option<Msg>) {
        for c in self.conns.iter().filter(|c| c.reads_announcements()) {
            if let Some(msg) = msg_for(c.peer) {
                c.send(msg);
            }
        }
    }

    /// From now on the kernel counts only members (these addresses and those given before).
    /// Given to the programs at the next reading (they may still be attaching).
    pub fn watch(&mut self, addrs: impl IntoIterator<Item = IpAddr>) {
        for a in addrs {
            if self.watched.insert(a) {
                self.watch_pending.push(a);
            }
        }
    }

    /// Reads the in-kernel counters (when attached) into the link meters.
    pub fn read_link_counters(&mut self) {
        if let Some(ls) = self.link_stats.lock().unwrap().as_mut() {
            // Only the new addresses: a source's joins would otherwise rewrite the whole
            // list each time, quadratic in the members.
            if !self.watch_pending.is_empty() {
                if let Err(e) = ls.watch_only(&self.watch_pending) {
                    tracing::warn!("link stats still count every peer, not only members: {e}");
                }
                self.watch_pending.clear();
            }
            if let Ok(snap) = ls.snapshot() {
                let at = snap.at.duration_since(self.start).as_secs_f64();
                self.meters.update(&snap, at);
            }
        }
    }

    /// Reads the in-kernel counters and publishes what only this process knows (QUIC
    /// RTTs) for `floodclone stats`.
    pub fn measure(&mut self) {
        self.read_link_counters();
        if tracing::enabled!(target: "floodclone::quic", tracing::Level::TRACE) {
            for c in self.conns.iter() {
                let st = c.conn.stats();
                tracing::trace!(target: "floodclone::quic", peer = c.peer, dialed = c.dialed,
                    rtt_ms = st.path.rtt.as_secs_f64() * 1e3, cwnd = st.path.cwnd,
                    lost = st.path.lost_packets, congestion_events = st.path.congestion_events,
                    tx_bytes = st.udp_tx.bytes, tx_datagrams = st.udp_tx.datagrams,
                    mtu = st.path.current_mtu, black_holes = st.path.black_holes_detected,
                    rx_bytes = st.udp_rx.bytes, rx_datagrams = st.udp_rx.datagrams,
                    stream_frames = st.frame_tx.stream, pings = st.frame_tx.ping,
                    acks = st.frame_tx.acks, "connection");
            }
        }
        let peers = self
            .conns
            .iter()
            .map(|c| crate::stats::PeerStatus {
                addr: remote_ip(c.remote),
                member: c.peer,
                rtt_ms: c.conn.rtt().as_secs_f64() * 1e3,
            })
            .collect();
        if let Some(exporter) = &self.metrics {
            exporter.publish(self.metrics_page());
        }
        crate::stats::publish_status(&crate::stats::DaemonStatus {
            role: self.role.into(),
            peers,
        });
    }

    /// The `--metrics` page as of now: each peer's RTT from the spin bit where the kernel
    /// saw one, else quinn's.
    fn metrics_page(&self) -> String {
        use crate::{meter::RttSource, metrics::PeerRtt};
        // One row per peer (two connections may join a pair): the lesser RTT.
        let mut by_peer: std::collections::BTreeMap<IpAddr, PeerRtt> = Default::default();
        let rtts = self.conns.iter().map(|c| {
            let peer = remote_ip(c.remote);
            let spin = self
                .meters
                .links
                .values()
                .filter(|m| m.peer == Some(peer))
                .filter_map(|m| m.spin_rtt_s)
                .reduce(f64::min);
            match spin {
                Some(rtt_s) => PeerRtt {
                    peer,
                    rtt_s,
                    source: RttSource::Spin,
                },
                None => PeerRtt {
                    peer,
                    rtt_s: c.conn.rtt().as_secs_f64(),
                    source: RttSource::Quic,
                },
            }
        });
        for r in rtts {
            let kept = by_peer.entry(r.peer).or_insert(r);
            if r.rtt_s < kept.rtt_s {
                *kept = r;
            }
        }
        let rtts: Vec<PeerRtt> = by_peer.into_values().collect();
        let peers = self.conns.iter().count();
        crate::metrics::render(self.role, &self.counts, &self.meters, peers, &rtts)
    }

    /// Bytes sent per interface as of the last [`Self::measure`], from the in-kernel
    /// counters (empty without them).
    pub fn tx_bytes_by_iface(&self) -> TxBytesByIface {
        let mut by = TxBytesByIface::new();
        for m in self.meters.links.values() {
            *by.entry(crate::linkstats::interface_name(m.ifindex))
                .or_default() += m.tx.bytes;
        }
        by
    }

    /// Closes every connection, waits up to a second for peers to hear it, takes the last
    /// counter reading and withdraws the status file; returns the bytes sent per interface.
    pub async fn close(&mut self) -> TxBytesByIface {
        self.ep.close(VarInt::from_u32(CLOSE_DONE), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ep.wait_idle()).await;
        // Last reading before the status file goes (measuring publishes it again).
        self.measure();
        crate::stats::remove_status();
        self.tx_bytes_by_iface()
    }
}

/// What a handler tells the loop.
pub(crate) enum Step {
    Continue,
    Stop(Result<(), NodeError>),
}

/// A role: its state as fields, one handler per kind of event. [`drive`] runs it.
pub(crate) trait Role {
    /// What the role's own background work (a file check) reports back.
    type Local: Send + 'static;
    /// How often [`Role::on_tick`] runs.
    const TICK: Duration;
    async fn on_event(&mut self, node: &mut Node, event: ConnEvent) -> Step;
    async fn on_local(&mut self, node: &mut Node, event: Self::Local) -> Step;
    async fn on_tick(&mut self, node: &mut Node) -> Step;
}

/// The event loop both roles run: connection events, the role's own events, ticks, until a
/// handler says stop.
pub(crate) async fn drive<R: Role>(
    node: &mut Node,
    role: &mut R,
    local: &mut mpsc::UnboundedReceiver<R::Local>,
) -> Result<(), NodeError> {
    enum Next<L> {
        Conn(Option<ConnEvent>),
        Local(L),
        Tick,
    }
    let mut tick = tokio::time::interval(R::TICK);
    loop {
        let next = tokio::select! {
            ev = node.events.recv() => Next::Conn(ev),
            Some(ev) = local.recv() => Next::Local(ev),
            _ = tick.tick() => Next::Tick,
        };
        let step = match next {
            Next::Conn(Some(ev)) => role.on_event(node, ev).await,
            Next::Conn(None) => Step::Stop(Err(NodeError::Other("event channel closed".into()))),
            Next::Local(ev) => role.on_local(node, ev).await,
            Next::Tick => role.on_tick(node).await,
        };
        if let Step::Stop(result) = step {
            return result;
        }
    }
}

/// Peak resident memory of this process, in bytes.
pub fn peak_rss_bytes() -> u64 {
    rusage().ru_maxrss as u64 * 1024
}

/// CPU seconds this process has used, user and system.
pub fn cpu_s() -> f64 {
    let ru = rusage();
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

fn rusage() -> libc::rusage {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru
}

/// A connection's peer address as members are listed ([`crate::conn::unmapped`]).
pub(crate) fn remote_ip(addr: SocketAddr) -> IpAddr {
    crate::conn::unmapped(addr).ip()
}
