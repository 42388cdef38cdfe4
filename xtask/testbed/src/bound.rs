//! The floor U_min: N / min over destinations d of maxflow(S -> d) (Edmonds' broadcast
//! theorem). With timed rate events, the floor is the earliest T by which every destination
//! can have received N bits through a time-expanded network in which members (source and
//! destinations) may hold data between intervals and routers may not.

use crate::topology::{EventAction, Topology};

/// Dinic's max-flow on a small dense-enough graph with f64 capacities.
pub struct FlowNetwork {
    adj: Vec<Vec<usize>>,
    to: Vec<usize>,
    cap: Vec<f64>,
}

const EPS: f64 = 1e-9;

impl FlowNetwork {
    pub fn new(nodes: usize) -> Self {
        Self {
            adj: vec![Vec::new(); nodes],
            to: Vec::new(),
            cap: Vec::new(),
        }
    }

    /// Adds a directed edge u -> v.
    pub fn add_edge(&mut self, u: usize, v: usize, cap: f64) {
        self.adj[u].push(self.to.len());
        self.to.push(v);
        self.cap.push(cap);
        self.adj[v].push(self.to.len());
        self.to.push(u);
        self.cap.push(0.0);
    }

    /// Maximum flow from `s` to `t`. Consumes the residual capacities.
    pub fn max_flow(&mut self, s: usize, t: usize) -> f64 {
        let n = self.adj.len();
        let mut total = 0.0;
        loop {
            let mut level = vec![usize::MAX; n];
            level[s] = 0;
            let mut queue = std::collections::VecDeque::from([s]);
            while let Some(u) = queue.pop_front() {
                for &e in &self.adj[u] {
                    let v = self.to[e];
                    if self.cap[e] > EPS && level[v] == usize::MAX {
                        level[v] = level[u] + 1;
                        queue.push_back(v);
                    }
                }
            }
            if level[t] == usize::MAX {
                return total;
            }
            let mut next = vec![0usize; n];
            loop {
                let pushed = self.augment(s, t, f64::INFINITY, &level, &mut next);
                if pushed <= EPS {
                    break;
                }
                total += pushed;
            }
        }
    }

    fn augment(
        &mut self,
        u: usize,
        t: usize,
        limit: f64,
        level: &[usize],
        next: &mut [usize],
    ) -> f64 {
        if u == t {
            return limit;
        }
        while next[u] < self.adj[u].len() {
            let e = self.adj[u][next[u]];
            let v = self.to[e];
            if self.cap[e] > EPS && level[v] == level[u] + 1 {
                let pushed = self.augment(v, t, limit.min(self.cap[e]), level, next);
                if pushed > EPS {
                    self.cap[e] -= pushed;
                    self.cap[e ^ 1] += pushed;
                    return pushed;
                }
            }
            next[u] += 1;
        }
        0.0
    }
}

/// Per-direction capacities (bit/s) of every link, as (u, v, bps), in one interval.
type Rates = Vec<(usize, usize, f64)>;

fn static_rates(topo: &Topology, up: &[bool], mbit: &[(f64, f64)]) -> Rates {
    let mut r = Vec::new();
    for (i, l) in topo.links.iter().enumerate() {
        if up[i] {
            r.push((l.a, l.b, mbit[i].0 * 1e6));
            r.push((l.b, l.a, mbit[i].1 * 1e6));
        }
    }
    r
}

/// Constant-rate intervals: (start time, rates), from the topology's events.
fn intervals(topo: &Topology) -> Vec<(f64, Rates)> {
    let mut up = vec![true; topo.links.len()];
    let mut mbit: Vec<(f64, f64)> = topo.links.iter().map(|l| (l.mbit_ab, l.mbit_ba)).collect();
    let mut out = vec![(0.0, static_rates(topo, &up, &mbit))];
    for e in &topo.events {
        match e.action {
            EventAction::SetRate { mbit_ab, mbit_ba } => mbit[e.link] = (mbit_ab, mbit_ba),
            EventAction::Down => up[e.link] = false,
            EventAction::Up => up[e.link] = true,
        }
        let rates = static_rates(topo, &up, &mbit);
        match out.last_mut() {
            Some(last) if (last.0 - e.at_s).abs() < EPS => last.1 = rates,
            _ => out.push((e.at_s, rates)),
        }
    }
    out
}

/// maxflow(S -> d) in bit/s with the initial rates.
pub fn max_flow_bps(topo: &Topology, dest: usize) -> f64 {
    max_flow_at(topo, &intervals(topo)[0].1, dest)
}

/// maxflow(S -> d) in bit/s with the given rates.
fn max_flow_at(topo: &Topology, rates: &Rates, dest: usize) -> f64 {
    let mut net = FlowNetwork::new(topo.nodes.len());
    for &(u, v, c) in rates {
        net.add_edge(u, v, c);
    }
    net.max_flow(topo.source(), dest)
}

/// Bits that can reach `dest` by time `t` through the time-expanded network.
fn deliverable_bits_by(topo: &Topology, ivs: &[(f64, Rates)], dest: usize, t: f64) -> f64 {
    let n = topo.nodes.len();
    let layers: Vec<(f64, &Rates)> = ivs
        .iter()
        .enumerate()
        .filter(|(_, (start, _))| *start < t)
        .map(|(k, (start, rates))| {
            let end = ivs.get(k + 1).map_or(t, |(next, _)| next.min(t));
            (end - start, rates)
        })
        .collect();
    let source = layers.len() * n;
    let mut net = FlowNetwork::new(source + 1);
    for (k, (dur, rates)) in layers.iter().enumerate() {
        net.add_edge(source, k * n + topo.source(), f64::INFINITY);
        for &(u, v, c) in rates.iter() {
            net.add_edge(k * n + u, k * n + v, c * dur);
        }
        if k + 1 < layers.len() {
            for v in 0..n {
                if topo.is_member(v) {
                    net.add_edge(k * n + v, (k + 1) * n + v, f64::INFINITY);
                }
            }
        }
    }
    net.max_flow(source, (layers.len() - 1) * n + dest)
}

/// Earliest time at which `dest` can hold `bits`, or `None` if never (a link stays down).
pub fn earliest_completion_s(topo: &Topology, dest: usize, bits: f64) -> Option<f64> {
    let ivs = intervals(topo);
    if bits <= 0.0 {
        return Some(0.0);
    }
    // Grow an upper bound, then bisect: delivered bits are monotone in t.
    let mut hi = 1.0f64;
    while deliverable_bits_by(topo, &ivs, dest, hi) < bits {
        hi *= 2.0;
        let last_start = ivs.last().map_or(0.0, |x| x.0);
        if hi > 1e7 && hi > last_start * 4.0 {
            return None;
        }
    }
    let mut lo = 0.0;
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if deliverable_bits_by(topo, &ivs, dest, mid) >= bits {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

/// U_min alone, fast enough for generated networks of a thousand nodes: without events it
/// is N / min maxflow; with events, exact earliest completions are computed only for the
/// destinations that could still be the last (those whose per-interval bound, an upper
/// bound on their earliest completion, exceeds the worst exact one found so far).
pub fn u_min_s(topo: &Topology, bits: f64) -> Option<f64> {
    let ivs = intervals(topo);
    let dests = topo.destinations();
    let mf: Vec<Vec<f64>> = ivs
        .iter()
        .map(|(_, rates)| dests.iter().map(|&d| max_flow_at(topo, rates, d)).collect())
        .collect();
    if ivs.len() == 1 {
        let worst = mf[0].iter().copied().fold(f64::INFINITY, f64::min);
        return (worst > 0.0).then(|| bits / worst);
    }
    // Upper bound: each interval alone delivers its maxflow for its duration.
    let upper = |k: usize| -> f64 {
        let mut got = 0.0;
        for (i, (start, _)) in ivs.iter().enumerate() {
            let rate = mf[i][k];
            let end = ivs.get(i + 1).map_or(f64::INFINITY, |n| n.0);
            if rate > 0.0 && got + rate * (end - start) >= bits {
                return start + (bits - got) / rate;
            }
            if end.is_finite() {
                got += rate * (end - start);
            }
        }
        f64::INFINITY
    };
    let mut order: Vec<(f64, usize)> = (0..dests.len()).map(|k| (upper(k), k)).collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut worst: f64 = 0.0;
    for (ub, k) in order {
        if ub <= worst {
            break;
        }
        worst = worst.max(earliest_completion_s(topo, dests[k], bits)?);
    }
    Some(worst)
}

/// [`u_min_s`] with each destination's least propagation delay added, as [`floor`] counts
/// it (without the routed floor's linear programs: fast on large networks).
pub fn u_min_with_delay_s(topo: &Topology, bits: f64) -> Option<f64> {
    if !topo.links.iter().any(|l| l.has_propagation()) {
        return u_min_s(topo, bits);
    }
    let delay = propagation_from_source_s(topo);
    topo.destinations().iter().try_fold(0.0f64, |worst, &d| {
        Some(worst.max(delay[d].unwrap_or(0.0) + earliest_completion_s(topo, d, bits)?))
    })
}

/// U_min when routers forward as the testbed's kernels do: one route per destination
/// (fewest hops, widest), not any split a max-flow may choose. Members may relay freely,
/// but data between two members crosses routers only along the kernel's path from one to
/// the other. For each destination, the largest flow from the source over such member-to-
/// member paths whose link directions' sums stay within capacity (a small linear program);
/// U is at least N over the smallest of these. Equal to [`u_min_s`] without routers; `None`
/// with timed events (they change rates and routes).
pub fn routed_u_min_s(topo: &Topology, bits: f64) -> Option<f64> {
    if !topo.events.is_empty() {
        return None;
    }
    let up = vec![true; topo.links.len()];
    let next = crate::routing::next_hops(topo, &up);
    let source = topo.source();
    let members: Vec<usize> = (0..topo.nodes.len())
        .filter(|&m| topo.is_member(m))
        .collect();
    // Member-to-member paths that cross routers only, as link directions (2 x link + 0 for
    // a -> b, + 1 for b -> a).
    let mut pairs: Vec<(usize, usize, Vec<usize>)> = Vec::new();
    for &a in &members {
        for &b in members.iter().filter(|&&b| b != a) {
            let Some(path) = crate::routing::path(&next, a, b) else {
                continue;
            };
            if path[1..path.len() - 1].iter().any(|&x| topo.is_member(x)) {
                continue;
            }
            let dirs = path
                .windows(2)
                .map(|w| {
                    let (hop, link) = next[w[0]][b].expect("on the path");
                    debug_assert_eq!(hop, w[1]);
                    2 * link + usize::from(topo.links[link].a != w[0])
                })
                .collect();
            pairs.push((a, b, dirs));
        }
    }
    let capacity = |dir: usize| {
        let l = &topo.links[dir / 2];
        if dir.is_multiple_of(2) {
            l.mbit_ab
        } else {
            l.mbit_ba
        }
    };
    let mut worst = f64::INFINITY;
    for d in topo.destinations() {
        // Variables: the flow on each pair not into the source nor out of d.
        let vars: Vec<&(usize, usize, Vec<usize>)> = pairs
            .iter()
            .filter(|(a, b, _)| *a != d && *b != source)
            .collect();
        let mut rows: Vec<Vec<f64>> = Vec::new();
        let mut bounds: Vec<f64> = Vec::new();
        for dir in 0..2 * topo.links.len() {
            let row: Vec<f64> = vars
                .iter()
                .map(|(_, _, dirs)| if dirs.contains(&dir) { 1.0 } else { 0.0 })
                .collect();
            if row.iter().any(|&x| x > 0.0) {
                rows.push(row);
                bounds.push(capacity(dir));
            }
        }
        // Conservation at every relay: what leaves it equals what enters it.
        for &m in members.iter().filter(|&&m| m != source && m != d) {
            let row: Vec<f64> = vars
                .iter()
                .map(|(a, b, _)| f64::from(u8::from(*a == m)) - f64::from(u8::from(*b == m)))
                .collect();
            bounds.push(0.0);
            bounds.push(0.0);
            rows.push(row.iter().map(|x| -x).collect());
            rows.push(row);
        }
        let gain: Vec<f64> = vars
            .iter()
            .map(|(_, b, _)| if *b == d { 1.0 } else { 0.0 })
            .collect();
        worst = worst.min(simplex_max(&rows, &bounds, &gain));
    }
    (worst > 0.0 && worst.is_finite()).then(|| bits / (worst * 1e6))
}

/// Maximises `c . x` subject to `a x <= b`, `x >= 0`, for `b >= 0` (so the origin is a
/// feasible start): a dense tableau simplex with Bland's rule (no cycling), for the small
/// programs of [`routed_u_min_s`]. Infinite when unbounded.
fn simplex_max(a: &[Vec<f64>], b: &[f64], c: &[f64]) -> f64 {
    const EPS: f64 = 1e-9;
    let (m, n) = (a.len(), c.len());
    let width = n + m + 1;
    let mut t = vec![vec![0.0; width]; m + 1];
    for i in 0..m {
        t[i][..n].copy_from_slice(&a[i]);
        t[i][n + i] = 1.0;
        t[i][width - 1] = b[i];
    }
    for j in 0..n {
        t[m][j] = -c[j];
    }
    let mut basis: Vec<usize> = (n..n + m).collect();
    while let Some(enter) = (0..n + m).find(|&j| t[m][j] < -EPS) {
        let mut leave: Option<(usize, f64)> = None;
        for i in 0..m {
            if t[i][enter] > EPS {
                let ratio = t[i][width - 1] / t[i][enter];
                let better = match leave {
                    None => true,
                    Some((l, best)) => {
                        ratio < best - EPS || (ratio <= best + EPS && basis[i] < basis[l])
                    }
                };
                if better {
                    leave = Some((i, ratio));
                }
            }
        }
        let Some((l, _)) = leave else {
            return f64::INFINITY;
        };
        let pivot = t[l][enter];
        for x in t[l].iter_mut() {
            *x /= pivot;
        }
        let row = t[l].clone();
        for (i, r) in t.iter_mut().enumerate() {
            let f = r[enter];
            if i != l && f != 0.0 {
                for (x, y) in r.iter_mut().zip(&row) {
                    *x -= f * y;
                }
            }
        }
        basis[l] = enter;
    }
    t[m][width - 1]
}

/// The least one-way propagation delay from the source to every node, in seconds (the
/// sum of `delay_ms` along the best path; jitter and loss aside). `None`: not reachable.
pub fn propagation_from_source_s(topo: &Topology) -> Vec<Option<f64>> {
    let n = topo.nodes.len();
    let mut best: Vec<Option<f64>> = vec![None; n];
    best[topo.source()] = Some(0.0);
    // Bellman-Ford: every pass relaxes each link both ways; a testbed has few nodes.
    for _ in 0..n {
        let mut changed = false;
        for l in &topo.links {
            for (u, v, d) in [
                (l.a, l.b, l.prop_ab.delay_ms),
                (l.b, l.a, l.prop_ba.delay_ms),
            ] {
                if let Some(du) = best[u] {
                    let via = du + d / 1e3;
                    if best[v].is_none_or(|dv| via < dv - 1e-12) {
                        best[v] = Some(via);
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    best
}

/// The floor for one transfer of `bytes`. With propagation delay, a destination can hold
/// nothing before the first bit has crossed the least-delay path to it and then receives
/// at most its maxflow: its earliest completion is that delay plus N over its maxflow
/// (exact without timed events; with them the delay is added to the delay-free figure).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Floor {
    /// (destination name, maxflow(S -> d) in bit/s at the start, earliest completion s).
    pub per_dest: Vec<(String, f64, f64)>,
    /// Max over destinations of the earliest completion: U_min in seconds.
    pub u_min_s: f64,
    /// U_min counting per-packet header overhead of QUIC over IPv4 on Ethernet.
    pub u_min_wire_s: f64,
    /// U_min when routers forward along the testbed's single routes
    /// ([`routed_u_min_s`]); `None` with timed events.
    pub u_min_routed_s: Option<f64>,
}

/// Payload share of a full frame: a 1514-byte Ethernet frame carries 1472 bytes of UDP
/// payload, of which QUIC takes ~1 short header (1 + 8 connection id + 4 packet number),
/// a 16-byte AEAD tag and a ~12-byte STREAM frame header.
pub const QUIC_PAYLOAD_PER_FRAME: f64 = 1472.0 - 13.0 - 16.0 - 12.0;
pub const WIRE_BYTES_PER_FRAME: f64 = 1514.0;

pub fn floor(topo: &Topology, bytes: u64) -> Result<Floor, String> {
    let bits = bytes as f64 * 8.0;
    let wire_bits = bits * WIRE_BYTES_PER_FRAME / QUIC_PAYLOAD_PER_FRAME;
    let mut per_dest = Vec::new();
    let (mut u, mut u_wire) = (0.0f64, 0.0f64);
    let delay = propagation_from_source_s(topo);
    for d in topo.destinations() {
        let name = topo.nodes[d].name.clone();
        let d_s = delay[d].unwrap_or(0.0);
        let t = d_s
            + earliest_completion_s(topo, d, bits)
                .ok_or_else(|| format!("destination {name} is cut off from the source for good"))?;
        let tw = d_s + earliest_completion_s(topo, d, wire_bits).unwrap_or(f64::INFINITY);
        per_dest.push((name, max_flow_bps(topo, d), t));
        u = u.max(t);
        u_wire = u_wire.max(tw);
    }
    Ok(Floor {
        per_dest,
        u_min_s: u,
        u_min_wire_s: u_wire,
        // The routed floor's worst destination is not named: add the least delay of all.
        u_min_routed_s: routed_u_min_s(topo, bits).map(|r| {
            r + topo
                .destinations()
                .iter()
                .filter_map(|&d| delay[d])
                .fold(f64::INFINITY, f64::min)
                .min(1e9)
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(text: &str) -> Topology {
        Topology::parse("t", text).unwrap()
    }

    #[test]
    fn the_floor_adds_each_destinations_least_propagation_delay() {
        // s -20ms- d1 -20ms- d2, and a slow direct s-d2 link of 70 ms: d2's least delay is
        // 40 ms through d1; its maxflow is 40 + 10 Mbit/s.
        let t = topo(
            r#"node = [{name="s",role="source"},{name="d1",role="dest"},{name="d2",role="dest"}]
               link = [{a="s",b="d1",mbit=40,delay_ms=20},{a="d1",b="d2",mbit=40,delay_ms=20},
                       {a="s",b="d2",mbit=10,delay_ms=70}]"#,
        );
        let delay = propagation_from_source_s(&t);
        assert_eq!(delay, vec![Some(0.0), Some(0.020), Some(0.040)]);
        let f = floor(&t, 5_000_000).unwrap();
        let d2 = f.per_dest.iter().find(|p| p.0 == "d2").unwrap();
        assert!((d2.2 - (0.040 + 40e6 / 50e6)).abs() < 1e-6, "{d2:?}");
        assert!((f.u_min_s - d2.2).abs() < 1e-9);
    }

    #[test]
    fn routed_floor_equals_the_floor_without_routers_and_bounds_it_with_them() {
        // Members only: every path between members is a link, as in max-flow.
        for file in ["ring-plus-star", "mesh", "tree", "asymmetric"] {
            let path = format!(
                "{}/../../topologies/{file}.toml",
                env!("CARGO_MANIFEST_DIR")
            );
            let t = Topology::load(std::path::Path::new(&path)).unwrap();
            let (u, routed) = (u_min_s(&t, 8e8).unwrap(), routed_u_min_s(&t, 8e8).unwrap());
            assert!(routed >= u * (1.0 - 1e-6), "{file}: {routed} < {u}");
            if !t
                .nodes
                .iter()
                .any(|n| n.role == crate::topology::Role::Router)
            {
                assert!((routed - u).abs() < 1e-6 * u, "{file}: {routed} vs {u}");
            }
        }
        // d reaches s over two disjoint 10 Mbit/s paths: d-a-s through member a, and
        // d-r1-r2-s through routers, but s's single route to d runs through a (fewer hops).
        // Max-flow gives 20 Mbit/s; along the routes only 10 arrive.
        let t = topo(
            r#"node = [{name="s",role="source"},{name="a",role="dest"},{name="d",role="dest"},
                       {name="r1",role="router"},{name="r2",role="router"}]
               link = [{a="s",b="a",mbit=10},{a="a",b="d",mbit=10},{a="s",b="r2",mbit=10},
                       {a="r2",b="r1",mbit=10},{a="r1",b="d",mbit=10}]"#,
        );
        let (u, routed) = (u_min_s(&t, 2e7).unwrap(), routed_u_min_s(&t, 2e7).unwrap());
        assert!((u - 1.0).abs() < 1e-9, "{u}");
        assert!((routed - 2.0).abs() < 1e-6, "{routed}");
    }

    const MIB32: u64 = 32 << 20;

    /// S linked to d1..d4 at 10 Mbit/s, ring d1-d2-d3-d4-d1 at 40: every d has four
    /// edge-disjoint 10 Mbit/s paths from S (its own, two ring neighbours', and the opposite
    /// node's through a neighbour), so maxflow = 40 Mbit/s and 32 MiB take 6.71 s.
    const RING_PLUS_STAR: &str = r#"
        node = [{name="s",role="source"},{name="d1",role="dest"},{name="d2",role="dest"},
                {name="d3",role="dest"},{name="d4",role="dest"}]
        link = [{a="s",b="d1",mbit=10},{a="s",b="d2",mbit=10},{a="s",b="d3",mbit=10},
                {a="s",b="d4",mbit=10},{a="d1",b="d2",mbit=40},{a="d2",b="d3",mbit=40},
                {a="d3",b="d4",mbit=40},{a="d4",b="d1",mbit=40}]
    "#;

    #[test]
    fn ring_plus_star_floor_is_6_71_s_for_32_mib() {
        let t = topo(RING_PLUS_STAR);
        for d in t.destinations() {
            assert!((max_flow_bps(&t, d) - 40e6).abs() < 1.0);
        }
        let f = floor(&t, MIB32).unwrap();
        assert!((f.u_min_s - 6.7109).abs() < 1e-3, "{}", f.u_min_s);
        assert!(f.u_min_wire_s > f.u_min_s * 1.03);
    }

    #[test]
    fn chain_is_limited_by_its_narrowest_link() {
        let t = topo(
            r#"
            node = [{name="s",role="source"},{name="a",role="dest"},{name="r",role="router"},
                    {name="b",role="dest"}]
            link = [{a="s",b="a",mbit=40},{a="a",b="r",mbit_ab=20,mbit_ba=5},{a="r",b="b",mbit=30}]
        "#,
        );
        assert!((max_flow_bps(&t, 1) - 40e6).abs() < 1.0);
        assert!((max_flow_bps(&t, 3) - 20e6).abs() < 1.0);
        // 10 MB at 20 Mbit/s = 4 s.
        let f = floor(&t, 10_000_000).unwrap();
        assert!((f.u_min_s - 4.0).abs() < 1e-6, "{}", f.u_min_s);
    }

    #[test]
    fn rate_drop_mid_transfer_moves_the_floor() {
        // 40 Mbit/s for 1 s, then 10: 80 Mbit need 1 s + 40/10 = 5 s.
        let t = topo(
            r#"
            node = [{name="s",role="source"},{name="d",role="dest"}]
            link = [{a="s",b="d",mbit=40}]
            event = [{at_s=1.0,link=["s","d"],mbit=10}]
        "#,
        );
        let f = floor(&t, 10_000_000).unwrap();
        assert!((f.u_min_s - 5.0).abs() < 1e-6, "{}", f.u_min_s);
    }

    #[test]
    fn members_hold_data_across_intervals_but_routers_do_not() {
        // s-m-d: the second hop is down until the first goes down. A member in the middle
        // can store and forward later; a router cannot.
        let text = |role: &str| {
            format!(
                r#"
                node = [{{name="s",role="source"}},{{name="m",role="{role}"}},{{name="d",role="dest"}}]
                link = [{{a="s",b="m",mbit=8}},{{a="m",b="d",mbit=8}}]
                event = [{{at_s=0.0,link=["m","d"],down=true}},{{at_s=1.0,link=["m","d"],up=true}},
                         {{at_s=1.0,link=["s","m"],down=true}}]
            "#
            )
        };
        let member = topo(&text("dest"));
        let d = 2;
        assert!((earliest_completion_s(&member, d, 8e6).unwrap() - 2.0).abs() < 1e-6);
        let router = topo(&text("router"));
        assert_eq!(earliest_completion_s(&router, d, 8e6), None);
    }
}
