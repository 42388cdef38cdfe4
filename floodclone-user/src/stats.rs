//! `floodclone stats`: per-link figures from the in-kernel counters, read from a running
//! floodclone's pinned maps or, when none runs in this network namespace, from programs this
//! command attaches for the measurement.

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use serde::Serialize;

use crate::linkstats::{self, LinkStats, LinkStatsError, PinnedReader, Snapshot};

/// One (interface, peer) row of a stats report.
#[derive(Clone, Debug, Serialize)]
pub struct LinkRow {
    pub iface: String,
    pub peer: Ipv4Addr,
    pub tx_mbit_s: f64,
    pub rx_mbit_s: f64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// Latest spin-bit RTT of a QUIC flow to this peer, if any flow spins.
    pub spin_rtt_ms: Option<f64>,
    pub spin_min_rtt_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub event: &'static str,
    /// "pinned" when read from a running floodclone, "attached" when this command measured.
    pub source: &'static str,
    pub interval_s: f64,
    pub links: Vec<LinkRow>,
}

/// Rows from two snapshots `b` after `a`.
pub fn rows(a: &Snapshot, b: &Snapshot) -> Vec<LinkRow> {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-6);
    let before: HashMap<_, _> = a.peers.iter().map(|p| ((p.ifindex, p.peer), p)).collect();
    let mut out = Vec::new();
    for p in &b.peers {
        let Some(peer) = p.peer else { continue };
        let prev = before.get(&(p.ifindex, p.peer));
        let d = |now: u64, then: Option<u64>| now.saturating_sub(then.unwrap_or(0));
        let tx = d(p.egress.bytes, prev.map(|x| x.egress.bytes));
        let rx = d(p.ingress.bytes, prev.map(|x| x.ingress.bytes));
        let spin = b
            .spin
            .iter()
            .filter(|s| s.peer() == peer && s.key.ifindex == p.ifindex && s.state.samples > 0)
            .max_by_key(|s| s.state.edge_ns);
        out.push(LinkRow {
            iface: linkstats::interface_name(p.ifindex),
            peer,
            tx_mbit_s: tx as f64 * 8.0 / secs / 1e6,
            rx_mbit_s: rx as f64 * 8.0 / secs / 1e6,
            tx_bytes: p.egress.bytes,
            rx_bytes: p.ingress.bytes,
            tx_packets: p.egress.packets,
            rx_packets: p.ingress.packets,
            spin_rtt_ms: spin.map(|s| s.state.last_interval_ns as f64 / 1e6),
            spin_min_rtt_ms: spin.map(|s| s.state.min_interval_ns as f64 / 1e6),
        });
    }
    out
}

/// Measures for `interval` and returns a report.
pub fn measure(interval: Duration) -> Result<Report, LinkStatsError> {
    match PinnedReader::open_in_this_netns() {
        Ok(reader) => {
            let a = reader.snapshot()?;
            std::thread::sleep(interval);
            let b = reader.snapshot()?;
            Ok(Report {
                event: "stats",
                source: "pinned",
                interval_s: interval.as_secs_f64(),
                links: rows(&a, &b),
            })
        }
        Err(LinkStatsError::NoPins(_)) => {
            let own = LinkStats::attach()?;
            let a = own.snapshot()?;
            std::thread::sleep(interval);
            let b = own.snapshot()?;
            Ok(Report {
                event: "stats",
                source: "attached",
                interval_s: interval.as_secs_f64(),
                links: rows(&a, &b),
            })
        }
        Err(e) => Err(e),
    }
}

/// Plain-text table of a report, fitting 80 columns.
pub fn render(r: &Report) -> String {
    let mut s = format!(
        "{:<10} {:<15} {:>9} {:>9} {:>11} {:>11} {:>8}\n",
        "iface", "peer", "tx Mbit/s", "rx Mbit/s", "tx bytes", "rx bytes", "rtt ms"
    );
    for l in &r.links {
        let rtt = l
            .spin_rtt_ms
            .map(|v| format!("{v:.2}"))
            .unwrap_or_else(|| "-".into());
        s += &format!(
            "{:<10} {:<15} {:>9.2} {:>9.2} {:>11} {:>11} {:>8}\n",
            l.iface, l.peer, l.tx_mbit_s, l.rx_mbit_s, l.tx_bytes, l.rx_bytes, rtt
        );
    }
    if r.links.is_empty() {
        s += "(no IPv4 traffic seen)\n";
    }
    s
}
