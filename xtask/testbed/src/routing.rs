//! Routes of an emulated network, one function for the testbed's kernel routes and the
//! simulator's paths: fewest hops, and among equal-hop paths the one with the widest
//! bottleneck in the direction of travel (as a network engineer would set them by hand).

use std::collections::VecDeque;

use crate::topology::Topology;

/// `next[u][v]`: the neighbour and link node `u` forwards to on its way to `v`.
pub type NextHops = Vec<Vec<Option<(usize, usize)>>>;

/// Next hop from every node to every other node: `next[u][v] = Some((neighbour, link))`.
/// Shortest hop paths; among equal-hop paths the one with the widest bottleneck in the
/// direction of travel. Links marked down in `up` are ignored.
pub fn next_hops(topo: &Topology, up: &[bool]) -> NextHops {
    let n = topo.nodes.len();
    let rate = |link: usize, from: usize| topo.links[link].mbit_from(from);
    let mut next = vec![vec![None; n]; n];
    for (u, next_u) in next.iter_mut().enumerate() {
        // BFS levels, then widest bottleneck through the shortest-path DAG, level by level.
        let mut dist = vec![usize::MAX; n];
        let mut width = vec![0.0f64; n];
        let mut first = vec![None; n];
        dist[u] = 0;
        width[u] = f64::INFINITY;
        let mut order = vec![u];
        let mut queue = VecDeque::from([u]);
        while let Some(x) = queue.pop_front() {
            for (y, link) in topo.neighbours(x) {
                if !up[link] {
                    continue;
                }
                if dist[y] == usize::MAX {
                    dist[y] = dist[x] + 1;
                    queue.push_back(y);
                    order.push(y);
                }
            }
        }
        for &x in &order[1..] {
            for (y, link) in topo.neighbours(x) {
                if up[link] && dist[y] != usize::MAX && dist[y] + 1 == dist[x] {
                    let w = width[y].min(rate(link, y));
                    if w > width[x] {
                        width[x] = w;
                        first[x] = if y == u { Some((x, link)) } else { first[y] };
                    }
                }
            }
        }
        *next_u = first;
    }
    next
}

/// Nodes on the path from `a` to `b` along `next` (from [`next_hops`]), both included;
/// `None` when `b` is unreachable.
pub fn path(next: &NextHops, a: usize, b: usize) -> Option<Vec<usize>> {
    let mut out = vec![a];
    let mut x = a;
    while x != b {
        let (hop, _) = next[x][b]?;
        x = hop;
        out.push(x);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_prefer_the_widest_of_equal_hop_paths() {
        // s-a-d at 10, s-b-d at 40: both two hops; s must go through b.
        let t = Topology::parse(
            "t",
            r#"
            node = [{name="s",role="source"},{name="a",role="router"},{name="b",role="router"},
                    {name="d",role="dest"}]
            link = [{a="s",b="a",mbit=10},{a="a",b="d",mbit=10},{a="s",b="b",mbit=40},
                    {a="b",b="d",mbit=40}]
        "#,
        )
        .unwrap();
        let up = vec![true; 4];
        let next = next_hops(&t, &up);
        assert_eq!(next[0][3], Some((2, 2)));
        assert_eq!(next[3][0], Some((2, 3)));
        // With s-b down, d is reached via a.
        let next = next_hops(&t, &[true, true, false, true]);
        assert_eq!(next[0][3], Some((1, 0)));
        assert_eq!(path(&next, 0, 3), Some(vec![0, 1, 3]));
    }
}
