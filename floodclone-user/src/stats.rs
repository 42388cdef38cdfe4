//! `floodclone stats`: per-link figures from the in-kernel counters, read from a running
//! floodclone's pinned maps or, when none runs in this network namespace, from programs this
//! command attaches for the measurement. RTTs come from the spin bit seen in the kernel, or
//! failing that from the daemon's status file (quinn's own estimate); each says which.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    linkstats::{self, current_netns_inode, LinkStats, LinkStatsError, PinnedReader, Snapshot},
    meter::{Meters, RttSource},
};

/// Where daemons publish what only they know (QUIC RTTs, progress).
pub const STATUS_ROOT: &str = "/run/floodclone/status";

/// What a running daemon publishes about its peers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub role: String,
    pub peers: Vec<PeerStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub addr: Ipv4Addr,
    pub member: Option<floodclone_sched::MemberId>,
    pub rtt_ms: f64,
}

/// Where this network namespace's daemons publish their status.
fn status_dir() -> std::io::Result<PathBuf> {
    Ok(Path::new(STATUS_ROOT).join(current_netns_inode()?.to_string()))
}

pub fn status_path(pid: u32) -> std::io::Result<PathBuf> {
    Ok(status_dir()?.join(format!("{pid}.json")))
}

/// Writes this process's status atomically (best effort: a missing /run is not an error).
/// The first call also removes what dead processes left.
pub fn publish_status(status: &DaemonStatus) {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| linkstats::sweep_dead_instances(Path::new(STATUS_ROOT)));
    let Ok(path) = status_path(std::process::id()) else {
        return;
    };
    let Some(dir) = path.parent() else { return };
    let _ = std::fs::create_dir_all(dir);
    let tmp = path.with_extension("tmp");
    if let Ok(body) = serde_json::to_vec(status) {
        if std::fs::write(&tmp, body).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
}

pub fn remove_status() {
    if let Ok(p) = status_path(std::process::id()) {
        let _ = std::fs::remove_file(p);
    }
}

/// The newest status of a live daemon in this network namespace.
fn read_status() -> Option<DaemonStatus> {
    let newest = linkstats::newest_live_instance(&status_dir().ok()?)?;
    serde_json::from_slice(&std::fs::read(newest).ok()?).ok()
}

/// One (interface, peer) row of a stats report.
#[derive(Clone, Debug, Serialize)]
pub struct LinkRow {
    pub iface: String,
    pub peer: Ipv4Addr,
    /// Average over the report's interval.
    pub tx_mbit_s: f64,
    pub rx_mbit_s: f64,
    /// Highest rate over the last 2 s: the bottleneck estimate when the link is busy.
    pub tx_max_mbit_s: f64,
    pub rx_max_mbit_s: f64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub rtt_ms: Option<f64>,
    pub min_rtt_ms: Option<f64>,
    pub rtt_source: Option<RttSource>,
    /// Recent per-sample rates of the busier direction, Mbit/s, oldest first.
    pub history_mbit_s: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub event: &'static str,
    /// "pinned" when read from a running floodclone, "attached" when this command measured.
    pub source: &'static str,
    pub interval_s: f64,
    pub links: Vec<LinkRow>,
}

enum Reader {
    Pinned(PinnedReader),
    Own(LinkStats),
}

/// Samples the counters and keeps meters across samples.
pub struct Sampler {
    reader: Reader,
    meters: Meters,
    epoch: Instant,
    /// Bytes per link at the start of the current report interval.
    marks: HashMap<(u32, Option<Ipv4Addr>), (u64, u64)>,
    mark_at: Instant,
}

/// How often counters are read while measuring.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

impl Sampler {
    /// Reads a running floodclone's maps in this namespace, or attaches the programs.
    pub fn open() -> Result<Self, LinkStatsError> {
        let reader = match PinnedReader::open_in_this_netns() {
            Ok(r) => Reader::Pinned(r),
            Err(LinkStatsError::NoPins(_)) => Reader::Own(LinkStats::attach()?),
            Err(e) => return Err(e),
        };
        let mut s = Self {
            reader,
            meters: Meters::default(),
            epoch: Instant::now(),
            marks: HashMap::new(),
            mark_at: Instant::now(),
        };
        s.sample()?;
        s.mark();
        Ok(s)
    }

    fn snapshot(&self) -> Result<Snapshot, LinkStatsError> {
        match &self.reader {
            Reader::Pinned(r) => r.snapshot(),
            Reader::Own(o) => o.snapshot(),
        }
    }

    pub fn sample(&mut self) -> Result<(), LinkStatsError> {
        let snap = self.snapshot()?;
        let at = snap.at.duration_since(self.epoch).as_secs_f64();
        self.meters.update(&snap, at);
        Ok(())
    }

    fn mark(&mut self) {
        self.marks = self
            .meters
            .links
            .iter()
            .map(|(k, m)| (*k, (m.tx.bytes, m.rx.bytes)))
            .collect();
        self.mark_at = Instant::now();
    }

    /// Samples for `interval`, then reports the interval.
    pub fn measure(&mut self, interval: Duration) -> Result<Report, LinkStatsError> {
        let end = Instant::now() + interval;
        while Instant::now() < end {
            std::thread::sleep(SAMPLE_EVERY.min(end.saturating_duration_since(Instant::now())));
            self.sample()?;
        }
        let secs = self.mark_at.elapsed().as_secs_f64().max(1e-6);
        let status = read_status();
        let mut links = Vec::new();
        for m in self.meters.sorted() {
            let Some(peer) = m.peer else { continue };
            let (tx0, rx0) = self
                .marks
                .get(&(m.ifindex, m.peer))
                .copied()
                .unwrap_or((0, 0));
            let quic_rtt = status
                .as_ref()
                .and_then(|s| s.peers.iter().find(|p| p.addr == peer))
                .map(|p| p.rtt_ms);
            let (rtt_ms, rtt_source) = match (m.spin_rtt_s, quic_rtt) {
                (Some(s), _) => (Some(s * 1e3), Some(RttSource::Spin)),
                (None, Some(q)) => (Some(q), Some(RttSource::Quic)),
                (None, None) => (None, None),
            };
            let busier = if m.tx.bytes >= m.rx.bytes {
                &m.tx
            } else {
                &m.rx
            };
            links.push(LinkRow {
                iface: linkstats::interface_name(m.ifindex),
                peer,
                tx_mbit_s: m.tx.bytes.saturating_sub(tx0) as f64 * 8.0 / secs / 1e6,
                rx_mbit_s: m.rx.bytes.saturating_sub(rx0) as f64 * 8.0 / secs / 1e6,
                tx_max_mbit_s: m.tx.max_bps() / 1e6,
                rx_max_mbit_s: m.rx.max_bps() / 1e6,
                tx_bytes: m.tx.bytes,
                rx_bytes: m.rx.bytes,
                tx_packets: m.tx.packets,
                rx_packets: m.rx.packets,
                rtt_ms,
                min_rtt_ms: m.spin_min_rtt_s.map(|s| s * 1e3),
                rtt_source,
                history_mbit_s: busier.history_bps.iter().map(|b| b / 1e6).collect(),
            });
        }
        self.mark();
        Ok(Report {
            event: "stats",
            source: match self.reader {
                Reader::Pinned(_) => "pinned",
                Reader::Own(_) => "attached",
            },
            interval_s: secs,
            links,
        })
    }
}

fn sparkline(values: &[f64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let tail = &values[values.len().saturating_sub(width)..];
    let top = tail.iter().copied().fold(0.0, f64::max);
    let mut s: String = tail
        .iter()
        .map(|&v| {
            if top <= 0.0 || v <= 0.0 {
                ' '
            } else {
                BARS[((v / top) * 7.0).round() as usize]
            }
        })
        .collect();
    while s.chars().count() < width {
        s.insert(0, ' ');
    }
    s
}

/// Plain-text table of a report, at most 80 columns wide.
pub fn render(r: &Report) -> String {
    let mut s = format!(
        "{:<8} {:<15} {:>6} {:>6} {:>6} {:>6} {:>8}  {:<12}\n",
        "iface", "peer", "tx", "max", "rx", "max", "rtt ms", "busier dir"
    );
    s += &format!(
        "{:<8} {:<15} {:>6} {:>6} {:>6} {:>6} {:>8}  {:<12}\n",
        "", "", "Mbit/s", "", "Mbit/s", "", "", ""
    );
    for l in &r.links {
        let rtt = match (l.rtt_ms, l.rtt_source) {
            (Some(v), Some(RttSource::Spin)) => format!("{v:.1}s"),
            (Some(v), Some(RttSource::Quic)) => format!("{v:.1}q"),
            _ => "-".into(),
        };
        let iface: String = l.iface.chars().take(8).collect();
        s += &format!(
            "{:<8} {:<15} {:>6.1} {:>6.1} {:>6.1} {:>6.1} {:>8}  {}\n",
            iface,
            l.peer.to_string(),
            l.tx_mbit_s,
            l.tx_max_mbit_s,
            l.rx_mbit_s,
            l.rx_max_mbit_s,
            rtt,
            sparkline(&l.history_mbit_s, 12)
        );
    }
    if r.links.is_empty() {
        s += "(no IPv4 traffic seen yet)\n";
    }
    s += &format!(
        "{} over {:.1} s. rtt: s = spin bit, q = QUIC estimate\n",
        if r.source == "pinned" {
            "from the running floodclone"
        } else {
            "measured here"
        },
        r.interval_s
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_fits_80_columns() {
        let row = LinkRow {
            iface: "a-very-long-interface".into(),
            peer: Ipv4Addr::new(255, 255, 255, 255),
            tx_mbit_s: 9999.9,
            rx_mbit_s: 9999.9,
            tx_max_mbit_s: 9999.9,
            rx_max_mbit_s: 9999.9,
            tx_bytes: u64::MAX,
            rx_bytes: 0,
            tx_packets: 0,
            rx_packets: 0,
            rtt_ms: Some(12345.6),
            min_rtt_ms: None,
            rtt_source: Some(RttSource::Quic),
            history_mbit_s: (0..30).map(f64::from).collect(),
        };
        let r = Report {
            event: "stats",
            source: "pinned",
            interval_s: 1.0,
            links: vec![row],
        };
        for line in render(&r).lines() {
            assert!(
                line.chars().count() <= 80,
                "{} chars: {line}",
                line.chars().count()
            );
        }
    }
}
