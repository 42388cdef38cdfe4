//! Small random networks for the testbed (`cargo xtask bench --random N --seed S`): the
//! networks nobody tuned for. A seed reproduces a network exactly; the rules are in the
//! README ("Random networks") and in [`small_network`].

use crate::{
    bound,
    topology::{Link, Node, Role, Topology},
};

/// A deterministic generator (SplitMix64), so a seed reproduces a network.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.range(0.0, 1.0) < p
    }
}

/// Link rates are drawn from this range (Mbit/s, uniform).
pub const MBIT: (f64, f64) = (5.0, 60.0);
/// Share of links whose reverse direction is slower, by a factor of 1 to 4.
pub const ASYMMETRIC: f64 = 0.3;
/// Share of networks where one link is cut to just above the network's min-cut.
pub const NEAR_MIN_CUT: f64 = 0.5;

/// The small network of `seed`:
/// - 4 to 14 nodes, of which 0 to 3 (never more than a third) are non-member routers;
/// - a random tree over all nodes (each joins a random earlier one; routers come first, so
///   they carry subtrees), then 0 to n/2 extra links (cycles); leaves stay pendant;
/// - a router left with one link gets a second (a router on a single link is no router);
/// - the source is a random member: anywhere, a leaf or behind a router;
/// - every link 5-60 Mbit/s, 30% of them slower (1-4x) in one direction;
/// - in half the networks one random link is then set to 1.0-1.1 x the min-cut rate in both
///   directions (a link barely above the min-cut, or the new min-cut).
pub fn small_network(seed: u64) -> Topology {
    let mut rng = Rng::new(seed ^ 0xF100_DC10_4E00_0000);
    let n = 4 + rng.below(11);
    let routers = rng.below(4).min(n / 3);
    let members = n - routers;
    let source = rng.below(members);
    let mut nodes: Vec<Node> = (0..routers)
        .map(|r| Node {
            name: format!("r{}", r + 1),
            role: Role::Router,
            max_mbit: None,
        })
        .collect();
    let mut dest = 0;
    for m in 0..members {
        nodes.push(if m == source {
            Node {
                name: "s".into(),
                role: Role::Source,
                max_mbit: None,
            }
        } else {
            dest += 1;
            Node {
                name: format!("d{dest}"),
                role: Role::Dest,
                max_mbit: None,
            }
        });
    }
    let mut edges: Vec<(usize, usize)> = Vec::new();
    let add = |edges: &mut Vec<(usize, usize)>, a: usize, b: usize| {
        if a != b
            && !edges
                .iter()
                .any(|&(x, y)| (x, y) == (a, b) || (x, y) == (b, a))
        {
            edges.push((a, b));
        }
    };
    for i in 1..n {
        let j = rng.below(i);
        add(&mut edges, j, i);
    }
    for r in 0..routers {
        while edges.iter().filter(|&&(a, b)| a == r || b == r).count() < 2 {
            let other = rng.below(n);
            add(&mut edges, r, other);
        }
    }
    for _ in 0..rng.below(n / 2 + 1) {
        let (a, b) = (rng.below(n), rng.below(n));
        add(&mut edges, a, b);
    }
    let mut links: Vec<Link> = edges
        .into_iter()
        .map(|(a, b)| {
            let ab = rng.range(MBIT.0, MBIT.1).round();
            let ba = if rng.chance(ASYMMETRIC) {
                (ab / rng.range(1.0, 4.0)).round().max(MBIT.0)
            } else {
                ab
            };
            // Either end may be the slower one.
            let (mbit_ab, mbit_ba) = if rng.chance(0.5) { (ab, ba) } else { (ba, ab) };
            Link {
                a,
                b,
                mbit_ab,
                mbit_ba,
                ..Default::default()
            }
        })
        .collect();
    let mut topo = Topology {
        name: format!("random-{seed}"),
        description: format!("cargo xtask bench --random 1 --seed {seed}"),
        nodes,
        links: Vec::new(),
        events: Vec::new(),
        cross: Vec::new(),
        mtu: None,
        gso_max_size: None,
    };
    if rng.chance(NEAR_MIN_CUT) {
        topo.links = links.clone();
        let bits = 8e6;
        let min_cut_mbit = bits / bound::u_min_s(&topo, bits).expect("a connected network") / 1e6;
        let k = rng.below(links.len());
        let rate = (min_cut_mbit * rng.range(1.0, 1.1)).round().max(1.0);
        links[k].mbit_ab = rate;
        links[k].mbit_ba = rate;
    }
    topo.links = links;
    topo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_give_valid_networks_within_the_rules() {
        for seed in 1..=200 {
            let t = small_network(seed);
            let n = t.nodes.len();
            assert!((4..=14).contains(&n), "seed {seed}: {n} nodes");
            let routers = t.nodes.iter().filter(|x| x.role == Role::Router).count();
            assert!(routers <= 3 && routers <= n / 3, "seed {seed}");
            assert_eq!(t.nodes.iter().filter(|x| x.role == Role::Source).count(), 1);
            // Every node reachable from the source: a finite floor.
            let d = t.hop_distances(t.source());
            assert!(d.iter().all(|x| x.is_some()), "seed {seed}: disconnected");
            assert!(bound::u_min_s(&t, 8e6).is_some(), "seed {seed}");
            // Round trip through the file format: the topology parser accepts it.
            let again = Topology::parse(&t.name, &t.to_toml()).unwrap();
            assert_eq!(again.links, t.links);
        }
        // Reproducible.
        assert_eq!(small_network(7).to_string(), small_network(7).to_string());
    }
}
