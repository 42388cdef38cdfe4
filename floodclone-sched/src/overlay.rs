//! The overlay: which members a node exchanges data with, from how its kernel routes to
//! each of them. Pure, so the daemon and the simulator apply the same rule.

use crate::{MemberId, SOURCE};

/// How a node reaches a member, from a kernel route lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// On-link, or the member's own address is the gateway: a direct neighbour.
    Direct = 0,
    /// Through another member (whose id is given): not a neighbour; data flows through it.
    Behind = 1,
    /// Through a non-member gateway: an overlay neighbour over a possibly shared path.
    ViaRouter = 2,
    /// No route.
    Unreachable = 3,
}

/// The first hop of the route to a member, as a route lookup shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstHop {
    /// No route.
    NoRoute,
    /// On-link: no gateway.
    OnLink,
    /// Through a gateway: one of this member's addresses, or a router's (`None`).
    Gateway(Option<MemberId>),
}

/// How `target` is reached, from the first hop of the route to it: the member behind a
/// gateway that is another member is reached through that member (returned with it).
pub fn reach(target: MemberId, first: FirstHop) -> (Reach, Option<MemberId>) {
    match first {
        FirstHop::NoRoute => (Reach::Unreachable, None),
        FirstHop::OnLink => (Reach::Direct, None),
        FirstHop::Gateway(Some(owner)) if owner == target => (Reach::Direct, None),
        FirstHop::Gateway(Some(owner)) => (Reach::Behind, Some(owner)),
        FirstHop::Gateway(None) => (Reach::ViaRouter, None),
    }
}

/// At most this many neighbours reached through routers (besides the source). Behind a
/// router every member looks one hop away; pulling from all of them would give each node
/// hundreds of connections in a large flat network, while a handful already keeps the
/// router's links busy and mixes chunks well (a random bounded-degree overlay).
pub const MAX_VIA_ROUTER: usize = 8;

/// Members `me` exchanges data with: every member on a link of its own, plus the source
/// and up to [`MAX_VIA_ROUTER`] members reached through routers, picked by a hash of the
/// pair (stable across re-discoveries, different for every node). Members behind another
/// member are reached through that member's copy, so they are not neighbours.
pub fn data_neighbours(me: MemberId, reach: &[(MemberId, Reach)]) -> Vec<MemberId> {
    let mut out: Vec<MemberId> = reach
        .iter()
        .filter(|(m, r)| *r == Reach::Direct || (*r == Reach::ViaRouter && *m == SOURCE))
        .map(|&(m, _)| m)
        .collect();
    let mut via: Vec<MemberId> = reach
        .iter()
        .filter(|(m, r)| *r == Reach::ViaRouter && *m != SOURCE)
        .map(|&(m, _)| m)
        .collect();
    via.sort_by_key(|&m| (pair_hash(me, m), m));
    via.truncate(MAX_VIA_ROUTER);
    out.extend(via);
    out.sort_unstable();
    out
}

/// A well-mixed hash of an unordered pair, so both ends rank each other alike.
fn pair_hash(a: MemberId, b: MemberId) -> u64 {
    let (lo, hi) = (a.min(b) as u64, a.max(b) as u64);
    let mut x = (lo << 16 | hi).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_and_via_router_but_not_behind() {
        let reach = [
            (0, Reach::Direct),
            (2, Reach::Direct),
            (3, Reach::Behind),
            (4, Reach::ViaRouter),
            (9, Reach::Unreachable),
        ];
        assert_eq!(data_neighbours(1, &reach), vec![0, 2, 4]);
    }

    #[test]
    fn bounds_the_members_reached_through_routers() {
        let reach: Vec<(MemberId, Reach)> = (0..200)
            .filter(|&m| m != 7)
            .map(|m| (m, Reach::ViaRouter))
            .collect();
        let n = data_neighbours(7, &reach);
        assert_eq!(n.len(), MAX_VIA_ROUTER + 1);
        assert!(n.contains(&SOURCE));
        // Stable, and different for a different node.
        assert_eq!(n, data_neighbours(7, &reach));
        let reach8: Vec<(MemberId, Reach)> = (0..200)
            .filter(|&m| m != 8)
            .map(|m| (m, Reach::ViaRouter))
            .collect();
        assert_ne!(n, data_neighbours(8, &reach8));
    }
}
