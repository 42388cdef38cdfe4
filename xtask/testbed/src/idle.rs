//! Work conservation, measured: for every link direction a member sends on, the seconds it
//! ran under half its capacity while some member beyond it (reached from the near end
//! through that link) still lacked a chunk the near end held and was itself receiving at
//! under half its max-flow rate (a member already receiving at the rate its own links
//! allow is not waiting on this link). The first thing it must catch is the source's
//! uplink idling while others starve.
//!
//! From what a run records each second: the bytes each member sent on each interface (the
//! in-kernel counters) and the bytes each destination held. Holdings are counts, not sets,
//! so "lacked a chunk the near end held" is taken when the far member held fewer bytes than
//! the near end (then it surely lacks one of the near end's chunks); the source holds all.
//! That makes the figure a lower bound.

use std::collections::HashMap;

use crate::{
    bound,
    picture::{intervals, Timeline},
    routing::{self, NextHops},
};

/// Intervals of a run, (from, to) seconds.
pub type Spans = Vec<(f64, f64)>;

/// Under this share of its capacity a link direction counts as idle.
pub const IDLE_BELOW: f64 = 0.5;

/// Idle seconds of one link direction, `from` -> `to` (node indices).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct IdleLink {
    pub from: String,
    pub to: String,
    pub seconds: f64,
}

/// Idle seconds per link direction, busiest offender first; directions never idle while
/// needed are left out.
pub fn idle_while_needed(r: &Timeline) -> Vec<IdleLink> {
    let name = |i: usize| r.topo.nodes[i].name.clone();
    let mut out: Vec<IdleLink> = idle_intervals(r)
        .into_iter()
        .map(|((u, v), spans)| IdleLink {
            from: name(u),
            to: name(v),
            seconds: spans.iter().map(|(t0, t1)| t1 - t0).sum(),
        })
        .collect();
    out.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    out
}

/// The intervals (from, to seconds) in which each link direction, (from node, to node),
/// idled while needed; from what a run recorded each second ([`Timeline`], on the run's
/// clock). Directions never idle while needed are left out.
pub fn idle_intervals(r: &Timeline) -> Vec<((usize, usize), Spans)> {
    let topo = r.topo;
    let source = topo.source();
    let held_at = |node: usize, t: f64| -> u64 {
        if node == source {
            return r.bytes;
        }
        r.progress
            .iter()
            .find(|(d, _)| *d == node)
            .and_then(|(_, s)| s.iter().take_while(|(at, _)| *at <= t).last())
            .map_or(0, |&(_, b)| b)
    };
    // When destination `node` first held the whole file.
    let done_at = |node: usize| -> Option<f64> {
        r.progress
            .iter()
            .find(|(d, _)| *d == node)
            .and_then(|(_, s)| s.iter().find(|&&(_, b)| b >= r.bytes))
            .map(|&(at, _)| at)
    };
    let max_flow_bps: Vec<f64> = (0..topo.nodes.len())
        .map(|m| {
            if m == source || !topo.is_member(m) {
                0.0
            } else {
                bound::max_flow_bps(topo, m)
            }
        })
        .collect();
    // Routes change only when links go down or up: computed once per such state.
    let mut routes: HashMap<Vec<bool>, NextHops> = HashMap::new();
    let mut out = Vec::new();
    for ((u, v), samples) in &r.tx {
        let (u, v) = (*u, *v);
        let mut spans = Vec::new();
        for (t0, t1, rate_bps) in intervals(samples) {
            let cap_bps = topo.capacity_bps(u, v, t0);
            if cap_bps <= 0.0 || rate_bps >= IDLE_BELOW * cap_bps {
                continue;
            }
            let next = routes
                .entry(topo.links_up_at(t0))
                .or_insert_with_key(|up| routing::next_hops(topo, up));
            let near = held_at(u, t0);
            // Its rate while it was still receiving: a member that completes within the
            // interval did not starve for the rest of it.
            let starving = |m: usize| {
                let end = done_at(m).map_or(t1, |d| d.min(t1));
                end > t0 && {
                    let got = held_at(m, end).saturating_sub(held_at(m, t0));
                    (got as f64 * 8.0 / (end - t0)) < IDLE_BELOW * max_flow_bps[m]
                }
            };
            let lacking = (0..topo.nodes.len()).any(|m| {
                m != u
                    && topo.is_member(m)
                    && next[u][m].is_some_and(|(hop, _)| hop == v)
                    && held_at(m, t0) < near
                    && starving(m)
            });
            if lacking {
                spans.push((t0, t1));
            }
        }
        if !spans.is_empty() {
            out.push(((u, v), spans));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{picture::Series, topology::Topology};

    const MB: u64 = 1_000_000;

    fn chain() -> Topology {
        Topology::parse(
            "c",
            r#"node = [{name="s",role="source"},{name="r",role="router"},{name="d1",role="dest"},
                       {name="d2",role="dest"}]
               link = [{a="s",b="r",mbit=8},{a="r",b="d1",mbit=8},{a="r",b="d2",mbit=8}]"#,
        )
        .unwrap()
    }

    #[test]
    fn an_idle_uplink_counts_only_while_someone_beyond_starves() {
        let mut t = chain();
        // The source sends 1 MB/s (full rate) for 2 s, then nothing for 3 s.
        let tx = vec![(
            (0, 1),
            vec![
                (0.0, 0),
                (1.0, MB),
                (2.0, 2 * MB),
                (3.0, 2 * MB),
                (4.0, 2 * MB),
                (5.0, 2 * MB),
            ],
        )];
        // d1 is complete at 2 s; d2 crawls at 0.8 Mbit/s from 2 s to 4 s (it lacks data
        // and is starving), then gets the rest from elsewhere by 5 s.
        let progress = vec![
            (2, vec![(1.0, MB), (2.0, 4 * MB)]),
            (
                3,
                vec![
                    (1.0, MB),
                    (2.0, 2 * MB),
                    (3.0, 2 * MB + 100_000),
                    (4.0, 2 * MB + 200_000),
                    (5.0, 4 * MB),
                ],
            ),
        ];
        fn timeline<'a>(
            topo: &'a Topology,
            progress: &[(usize, Series)],
            tx: &[((usize, usize), Series)],
        ) -> Timeline<'a> {
            Timeline {
                topo,
                bytes: 4 * MB,
                u_min_s: 4.0,
                u_s: Some(5.0),
                progress: progress.to_vec(),
                tx: tx.to_vec(),
            }
        }
        let idle = idle_while_needed(&timeline(&t, &progress, &tx));
        // Idle from 2 s to 5 s, but d2 starved only until 4 s.
        assert_eq!(idle.len(), 1);
        assert_eq!((idle[0].from.as_str(), idle[0].to.as_str()), ("s", "r"));
        assert!((idle[0].seconds - 2.0).abs() < 1e-9, "{idle:?}");
        // One that completes early in a long interval starved only if it crawled until then:
        // here d2 gets its last 2 MB in the first 0.4 s of a 7 s gap between samples.
        let mut done_early = progress.clone();
        done_early[1].1.truncate(2);
        done_early[1].1.push((2.4, 4 * MB));
        let late_tx = vec![(
            (0, 1),
            vec![(0.0, 0), (1.0, MB), (2.0, 2 * MB), (9.0, 2 * MB)],
        )];
        assert!(idle_while_needed(&timeline(&t, &done_early, &late_tx)).is_empty());
        // A member receiving at over half its max-flow rate is not waiting on the link.
        t.links[2].mbit_ab = 1.0;
        assert!(idle_while_needed(&timeline(&t, &progress, &tx)).is_empty());
    }
}
