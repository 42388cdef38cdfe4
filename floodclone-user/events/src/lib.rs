//! Every event `send` and `recv` print with `--json`, one JSON object per line, as one
//! type: the daemon emits it, `cargo xtask run` and the tests parse it back through the
//! same type, and a unit test checks the README's table against it. A crate of its own so
//! the testbed reads events without building the daemon (and its eBPF programs). Fields may be added,
//! never renamed (scripts depend on them). Times are seconds since the process started,
//! rates bit/s, sizes bytes.

use std::collections::BTreeMap;

pub mod units;

pub use floodclone_sched::MemberId;
use serde::{Deserialize, Serialize};

/// Wire bytes this process sent, by interface name (from the in-kernel counters; empty
/// without them).
pub type TxBytesByIface = BTreeMap<String, u64>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Both: start-up work is done; whether the eBPF programs are attached.
    Ready { link_stats: bool },
    /// Source: the port is open; the file is hashed as it is served.
    Serving {
        bytes: u64,
        chunks: u32,
        chunk_bytes: u32,
        destinations: usize,
        port: u16,
        /// The whole file's BLAKE3 as `b3:<hex>` (what `b3sum` prints), for `recv
        /// --expect`: `null` while the file is still being read (see `hashed`).
        blake3: Option<String>,
    },
    /// Source: every chunk is hashed, `elapsed_s` after `send` started.
    Hashed { elapsed_s: f64, blake3: String },
    /// Source: a destination joined.
    Joined { member: MemberId, addr: String },
    /// Both: an address a member claimed as its own is not believed. At a destination: its
    /// gateway there is not that member's (nothing answered, or another member did), so
    /// what lies beyond is no longer taken as behind it. At the source: a Join claiming a
    /// `--dest` address it does not come from could not prove it.
    ClaimRefused {
        member: MemberId,
        addr: String,
        reason: String,
    },
    /// Source: how a member's kernel routes to every other member.
    View {
        member: Option<MemberId>,
        routes: Vec<Route>,
    },
    /// Source: fresh chunks are handed out, `held_ms` after the Welcomes went out; `silent`
    /// were welcomed at the start and had not answered.
    FreshOpen { held_ms: u64, silent: Vec<MemberId> },
    /// Both, every second (at a terminal or with `--json`; every 5 s otherwise).
    Progress(Progress),
    /// Source: a destination holds a verified copy. `elapsed_s` is the destination's own
    /// count, `at_s` the time since this `send` started.
    DestDone {
        member: MemberId,
        addr: String,
        elapsed_s: f64,
        at_s: f64,
    },
    /// Source: a destination gave up.
    DestFailed {
        member: MemberId,
        addr: String,
        reason: String,
    },
    /// Destination: the source's manifest arrived.
    Welcome {
        member: MemberId,
        bytes: u64,
        chunks: u32,
        chunk_bytes: u32,
        resumed_chunks: u32,
    },
    /// Destination: its data neighbours and how it reaches every member.
    Neighbours {
        member: MemberId,
        ids: Vec<MemberId>,
        routes: Vec<Route>,
    },
    /// Destination: its copy is complete and verified at `path`.
    Complete {
        elapsed_s: f64,
        bytes: u64,
        path: String,
        duplicates: u64,
        received_chunks: u64,
        resumed_chunks: u32,
    },
    /// Both: every destination is done; the process exits.
    SwarmDone(SwarmDone),
}

/// `progress`: the source's per-destination view, or a destination's own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Progress {
    Source {
        elapsed_s: f64,
        total_bytes: u64,
        destinations: Vec<DestProgress>,
        tx_bytes_by_iface: TxBytesByIface,
    },
    Destination {
        elapsed_s: f64,
        bytes: u64,
        total_bytes: u64,
        rate_bps: Option<f64>,
        eta_s: Option<f64>,
        from: Vec<Feeder>,
        tx_bytes_by_iface: TxBytesByIface,
    },
}

/// `swarm_done`: the source lists the verified destinations; a destination only its own
/// figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SwarmDone {
    Source {
        elapsed_s: f64,
        destinations: Vec<DestResult>,
        peak_rss_bytes: u64,
        /// CPU seconds the process used, user and system.
        #[serde(default)]
        cpu_s: f64,
        /// When the first chunk left, seconds after `send` started.
        #[serde(default)]
        first_chunk_s: Option<f64>,
        tx_bytes_by_iface: TxBytesByIface,
    },
    Destination {
        peak_rss_bytes: u64,
        #[serde(default)]
        cpu_s: f64,
        tx_bytes_by_iface: TxBytesByIface,
    },
}

/// One destination as the source sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DestProgress {
    pub member: MemberId,
    pub addr: String,
    pub bytes: u64,
    pub rate_bps: Option<f64>,
    pub state: DestState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestState {
    Joining,
    Receiving,
    Done,
    Failed,
}

/// A verified destination in the source's `swarm_done`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DestResult {
    pub id: MemberId,
    pub addr: String,
    /// The destination's own count, from its start to its verified copy.
    pub elapsed_s: f64,
    /// When the source heard of it, seconds since `send` started.
    pub at_s: f64,
}

/// A neighbour feeding a destination, at what rate over the last interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Feeder {
    pub member: MemberId,
    pub rate_bps: f64,
}

/// How a node's kernel routes to one member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub member: MemberId,
    pub reach: RouteReach,
    pub ifindex: u32,
    pub gateway: Option<String>,
    pub via_member: Option<MemberId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteReach {
    Direct,
    Behind,
    ViaRouter,
    Unreachable,
}

impl DestState {
    pub fn as_str(self) -> &'static str {
        match self {
            DestState::Joining => "joining",
            DestState::Receiving => "receiving",
            DestState::Done => "done",
            DestState::Failed => "failed",
        }
    }
}

impl Event {
    /// The `event` field's value.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Ready { .. } => "ready",
            Event::Serving { .. } => "serving",
            Event::Hashed { .. } => "hashed",
            Event::Joined { .. } => "joined",
            Event::ClaimRefused { .. } => "claim_refused",
            Event::View { .. } => "view",
            Event::FreshOpen { .. } => "fresh_open",
            Event::Progress(_) => "progress",
            Event::DestDone { .. } => "dest_done",
            Event::DestFailed { .. } => "dest_failed",
            Event::Welcome { .. } => "welcome",
            Event::Neighbours { .. } => "neighbours",
            Event::Complete { .. } => "complete",
            Event::SwarmDone(_) => "swarm_done",
        }
    }

    /// One JSON line.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("events always serialize")
    }

    /// Parses one line of `--json` output; `None` for anything that is not an event.
    pub fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where each event is emitted, as the README's table says it.
    fn where_emitted(e: &Event) -> &'static str {
        match e {
            Event::Ready { .. } | Event::ClaimRefused { .. } => "both",
            Event::Serving { .. }
            | Event::Hashed { .. }
            | Event::Joined { .. }
            | Event::View { .. }
            | Event::FreshOpen { .. }
            | Event::DestDone { .. }
            | Event::DestFailed { .. }
            | Event::Progress(Progress::Source { .. })
            | Event::SwarmDone(SwarmDone::Source { .. }) => "source",
            Event::Welcome { .. }
            | Event::Neighbours { .. }
            | Event::Complete { .. }
            | Event::Progress(Progress::Destination { .. })
            | Event::SwarmDone(SwarmDone::Destination { .. }) => "destination",
        }
    }

    /// One of every event (and of both forms of `progress` and `swarm_done`).
    fn samples() -> Vec<Event> {
        let route = Route {
            member: 2,
            reach: RouteReach::ViaRouter,
            ifindex: 3,
            gateway: Some("10.0.0.1".into()),
            via_member: None,
        };
        let tx: TxBytesByIface = [("eth0".to_string(), 10)].into();
        vec![
            Event::Ready { link_stats: true },
            Event::Serving {
                bytes: 1,
                chunks: 1,
                chunk_bytes: 65536,
                destinations: 2,
                port: 7878,
                blake3: Some("b3:00".into()),
            },
            Event::Hashed {
                elapsed_s: 0.5,
                blake3: "b3:00".into(),
            },
            Event::Joined {
                member: 1,
                addr: "10.0.0.2".into(),
            },
            Event::ClaimRefused {
                member: 2,
                addr: "10.0.0.1".into(),
                reason: "nothing answered at that address".into(),
            },
            Event::View {
                member: Some(1),
                routes: vec![route.clone()],
            },
            Event::FreshOpen {
                held_ms: 20,
                silent: vec![3],
            },
            Event::Progress(Progress::Source {
                elapsed_s: 1.0,
                total_bytes: 10,
                destinations: vec![DestProgress {
                    member: 1,
                    addr: "10.0.0.2".into(),
                    bytes: 5,
                    rate_bps: Some(8.0),
                    state: DestState::Receiving,
                }],
                tx_bytes_by_iface: tx.clone(),
            }),
            Event::Progress(Progress::Destination {
                elapsed_s: 1.0,
                bytes: 5,
                total_bytes: 10,
                rate_bps: None,
                eta_s: Some(2.0),
                from: vec![Feeder {
                    member: 0,
                    rate_bps: 8.0,
                }],
                tx_bytes_by_iface: tx.clone(),
            }),
            Event::DestDone {
                member: 1,
                addr: "10.0.0.2".into(),
                elapsed_s: 1.5,
                at_s: 1.6,
            },
            Event::DestFailed {
                member: 1,
                addr: "10.0.0.2".into(),
                reason: "disk full".into(),
            },
            Event::Welcome {
                member: 1,
                bytes: 10,
                chunks: 1,
                chunk_bytes: 65536,
                resumed_chunks: 0,
            },
            Event::Neighbours {
                member: 1,
                ids: vec![0, 2],
                routes: vec![route],
            },
            Event::Complete {
                elapsed_s: 2.0,
                bytes: 10,
                path: "/tmp/x".into(),
                duplicates: 0,
                received_chunks: 1,
                resumed_chunks: 0,
            },
            Event::SwarmDone(SwarmDone::Source {
                elapsed_s: 2.0,
                destinations: vec![DestResult {
                    id: 1,
                    addr: "10.0.0.2".into(),
                    elapsed_s: 1.5,
                    at_s: 1.7,
                }],
                peak_rss_bytes: 1,
                cpu_s: 0.25,
                first_chunk_s: Some(0.01),
                tx_bytes_by_iface: tx.clone(),
            }),
            Event::SwarmDone(SwarmDone::Destination {
                peak_rss_bytes: 1,
                cpu_s: 0.5,
                tx_bytes_by_iface: tx,
            }),
        ]
    }

    #[test]
    fn every_event_round_trips_through_its_json_line() {
        for e in samples() {
            let line = e.to_line();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["event"], e.name(), "{line}");
            assert_eq!(Event::parse(&line).as_ref(), Some(&e), "{line}");
        }
        assert_eq!(Event::parse("not json"), None);
        assert_eq!(Event::parse(r#"{"event":"no_such_event"}"#), None);
    }

    /// The top-level field names of a README cell: the backticked names outside brackets.
    fn readme_fields(cell: &str) -> Vec<String> {
        let mut depth = 0;
        let mut flat = String::new();
        for ch in cell.chars() {
            match ch {
                '[' | '{' | '(' => depth += 1,
                ']' | '}' | ')' => depth -= 1,
                _ if depth == 0 => flat.push(ch),
                _ => {}
            }
        }
        flat.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_readme_event_table_names_every_event_and_field() {
        let readme = include_str!("../../../README.md");
        let table = readme
            .split("### JSON events (`--json`)")
            .nth(1)
            .expect("README has the JSON events section");
        // (event, where) -> fields, from rows like "| `joined` | source | `member`, `addr` |".
        let mut rows: Vec<(String, String, Vec<String>)> = Vec::new();
        for line in table
            .lines()
            .skip_while(|l| !l.starts_with("| event"))
            .skip(2)
        {
            if !line.starts_with('|') {
                break;
            }
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`').to_string();
            let place = cells[2].split([',', ' ']).next().unwrap().to_string();
            rows.push((name, place, readme_fields(cells[3])));
        }
        let samples = samples();
        for e in &samples {
            let v = serde_json::to_value(e).unwrap();
            let mut fields: Vec<String> = v
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "event")
                .cloned()
                .collect();
            fields.sort();
            let place = where_emitted(e);
            let row = rows
                .iter()
                .find(|(n, p, _)| n == e.name() && p == place)
                .unwrap_or_else(|| panic!("README lacks a row for `{}` at {place}", e.name()));
            let mut documented = row.2.clone();
            documented.sort();
            assert_eq!(
                documented,
                fields,
                "README's fields of `{}` ({place})",
                e.name()
            );
        }
        for (name, place, _) in &rows {
            assert!(
                samples
                    .iter()
                    .any(|e| e.name() == name && where_emitted(e) == place),
                "README documents `{name}` at {place}, which the daemon does not emit"
            );
        }
    }
}
