//! `floodclone stats`: per-link figures from the in-kernel counters, read from a running
//! floodclone's pinned maps or, when none runs in this network namespace, from programs this
//! command attaches for the measurement. RTTs come from the spin bit seen in the kernel, or
//! failing that from the daemon's status file (quinn's own estimate); each says which.

use std::{
    collections::HashMap,
    net::IpAddr,
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
    pub addr: IpAddr,
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
    linkstats::hold_liveness_lock();
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
    linkstats::release_liveness_lock();
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
    pub peer: IpAddr,
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
    /// The floodclone read (pinned), by process id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub interval_s: f64,
    pub links: Vec<LinkRow>,
    /// Said once under the table: the floodclone read went away and another is read now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
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
    marks: HashMap<(u32, Option<IpAddr>), (u64, u64)>,
    mark_at: Instant,
    /// What changed in what is read (see [`Sampler::follow_live`]), said under the table.
    note: Option<String>,
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
            note: None,
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

    /// When the floodclone whose pins it reads has exited, reads the newest live one in
    /// this namespace instead (counting from zero), and says so; with none live, says that
    /// and keeps the last figures.
    fn follow_live(&mut self) {
        let Reader::Pinned(r) = &self.reader else {
            return;
        };
        if linkstats::instance_is_live(&r.pin_dir) {
            return;
        }
        let gone = linkstats::instance_pid_of(&r.pin_dir).unwrap_or(0);
        match PinnedReader::open_in_this_netns() {
            Ok(live) => {
                let now = linkstats::instance_pid_of(&live.pin_dir).unwrap_or(0);
                self.note = Some(format!(
                    "floodclone pid {gone} exited; now reading floodclone pid {now} (counting from here)"
                ));
                self.reader = Reader::Pinned(live);
                self.meters = Meters::default();
                self.marks.clear();
                self.mark_at = Instant::now();
            }
            Err(_) => {
                self.note = Some(format!(
                    "floodclone pid {gone} exited and no other runs here; its last figures are shown"
                ));
            }
        }
    }

    /// Samples for `interval`, then reports the interval.
    pub fn measure(&mut self, interval: Duration) -> Result<Report, LinkStatsError> {
        self.follow_live();
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
            pid: match &self.reader {
                Reader::Pinned(r) => linkstats::instance_pid_of(&r.pin_dir),
                Reader::Own(_) => None,
            },
            interval_s: secs,
            links,
            note: self.note.clone(),
        })
    }
}

/// The last `width` values as bars, `top` drawn full (one `top` for every row, so that a
/// link at 0.3 Mbit/s does not look like one at 40).
fn sparkline(values: &[f64], width: usize, top: f64) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let tail = &values[values.len().saturating_sub(width)..];
    let mut s: String = tail
        .iter()
        .map(|&v| {
            if top <= 0.0 || v <= 0.0 {
                ' '
            } else {
                BARS[((v / top).min(1.0) * 7.0).round() as usize]
            }
        })
        .collect();
    while s.chars().count() < width {
        s.insert(0, ' ');
    }
    s
}

const SPARK_WIDTH: usize = 12;

/// Plain-text table of a report, at most 80 columns wide with IPv4 peers (an IPv6 peer's
/// address widens its column).
pub fn render(r: &Report) -> String {
    let peer_width = r
        .links
        .iter()
        .map(|l| l.peer.to_string().len())
        .fold(15, usize::max);
    let row = |cells: [&str; 9]| {
        format!(
            "{:<8} {:<peer_width$} {:>6} {:>6} {:>6} {:>6} {:>7} {:<4}  {}\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8]
        )
    };
    let mut s = row([
        "iface",
        "peer",
        "tx",
        "max",
        "rx",
        "max",
        "rtt",
        "from",
        "busier dir",
    ]);
    s += &row(["", "", "Mbit/s", "", "Mbit/s", "", "ms", "", ""]);
    // One scale for every row's bars: the busiest sample shown.
    let top = r
        .links
        .iter()
        .flat_map(|l| l.history_mbit_s.iter().rev().take(SPARK_WIDTH))
        .copied()
        .fold(0.0, f64::max);
    for l in &r.links {
        let (rtt, from) = match (l.rtt_ms, l.rtt_source) {
            (Some(v), Some(src)) => (format!("{v:.1}"), src.short_name()),
            _ => ("-".into(), ""),
        };
        let iface: String = l.iface.chars().take(8).collect();
        let f = |v: f64| format!("{v:.1}");
        s += &row([
            &iface,
            &l.peer.to_string(),
            &f(l.tx_mbit_s),
            &f(l.tx_max_mbit_s),
            &f(l.rx_mbit_s),
            &f(l.rx_max_mbit_s),
            &rtt,
            from,
            &sparkline(&l.history_mbit_s, SPARK_WIDTH, top),
        ]);
    }
    if r.links.is_empty() {
        s += "(no traffic seen yet)\n";
    }
    if let Some(note) = &r.note {
        s += note;
        s.push('\n');
    }
    s += &format!(
        "{} over {:.1} s.\n\
         rtt from: spin = the QUIC spin bit seen in the kernel; quic = quinn's estimate.\n\
         Bars: the busier direction, one scale for all rows, full = {top:.1} Mbit/s.\n",
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

    fn row(peer: u8, history_mbit_s: Vec<f64>, rtt: Option<(f64, RttSource)>) -> LinkRow {
        LinkRow {
            iface: "v-s".into(),
            peer: IpAddr::from([10, 0, 0, peer]),
            tx_mbit_s: history_mbit_s.last().copied().unwrap_or(0.0),
            rx_mbit_s: 0.0,
            tx_max_mbit_s: 0.0,
            rx_max_mbit_s: 0.0,
            tx_bytes: 0,
            rx_bytes: 0,
            tx_packets: 0,
            rx_packets: 0,
            rtt_ms: rtt.map(|r| r.0),
            min_rtt_ms: None,
            rtt_source: rtt.map(|r| r.1),
            history_mbit_s,
        }
    }

    fn report(links: Vec<LinkRow>) -> Report {
        Report {
            event: "stats",
            source: "pinned",
            pid: None,
            interval_s: 1.0,
            links,
            note: None,
        }
    }

    /// The rendered row of `peer`'s link.
    fn line_of(table: &str, peer: u8) -> String {
        let addr = format!(" 10.0.0.{peer} ");
        table
            .lines()
            .find(|l| l.contains(&addr))
            .unwrap()
            .to_string()
    }

    #[test]
    fn an_idle_links_bars_are_low_beside_a_busy_ones() {
        let busy = row(1, vec![40.0; 12], None);
        let idle = row(2, vec![0.3; 12], None);
        let table = render(&report(vec![busy, idle]));
        let bars = |l: String| l.chars().rev().take(12).collect::<String>();
        assert_eq!(bars(line_of(&table, 1)), "█".repeat(12), "{table}");
        assert_eq!(bars(line_of(&table, 2)), "▁".repeat(12), "{table}");
        assert!(
            table.contains("one scale for all rows, full = 40.0 Mbit/s"),
            "{table}"
        );
    }

    #[test]
    fn the_rtt_and_where_it_came_from_are_separate_columns() {
        let spin = row(1, vec![1.0], Some((5.4, RttSource::Spin)));
        let quic = row(2, vec![1.0], Some((65.7, RttSource::Quic)));
        let none = row(3, vec![1.0], None);
        let table = render(&report(vec![spin, quic, none]));
        let cells = |peer| {
            line_of(&table, peer)
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(cells(1)[6..8], ["5.4", "spin"], "{table}");
        assert_eq!(cells(2)[6..8], ["65.7", "quic"], "{table}");
        assert_eq!(cells(3)[6], "-", "{table}");
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(header[6..8], ["rtt", "from"]);
    }

    #[test]
    fn table_fits_80_columns() {
        let row = LinkRow {
            iface: "a-very-long-interface".into(),
            peer: IpAddr::from([255, 255, 255, 255]),
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
        let r = report(vec![row]);
        for line in render(&r).lines() {
            assert!(
                line.chars().count() <= 80,
                "{} chars: {line}",
                line.chars().count()
            );
        }
    }
}
