//! The overlay: which members a node exchanges data with, from how its kernel routes to
//! each of them. Pure, so the daemon and the simulator apply the same rule.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

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

impl Reach {
    /// How a route reaches a member, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Reach::Direct => "directly",
            Reach::Behind => "behind another member",
            Reach::ViaRouter => "through routers",
            Reach::Unreachable => "not at all",
        }
    }
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

/// At most this many paths a sender is asked to trace ([`PathChecks`]): each trace costs
/// a few probes that routers answer at a limited rate (Linux: a burst of 6 ICMP errors
/// per destination, then one a second), and a handful of extra neighbours is all the
/// overlay takes through routers ([`MAX_VIA_ROUTER`]).
pub const MAX_TRACES_PER_SENDER: usize = 2 * MAX_VIA_ROUTER;

/// What the source does for [`PathChecks`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathCheck {
    /// Ask `sender` whether its whole path to each of `receivers` crosses another member.
    Trace {
        sender: MemberId,
        receivers: Vec<MemberId>,
    },
    /// Tell `receiver` the senders whose path to it crosses no other member, among those
    /// its own routes show behind one (the full list each time; it may shrink).
    Tell {
        receiver: MemberId,
        senders: Vec<MemberId>,
    },
}

/// Neighbours that a receiver's own routes hide. A receiver picks whom to pull from by
/// its routes, but the data flows along the sender's route, and routes differ by
/// direction where paths tie: a receiver may reach a sender through another member
/// ([`Reach::Behind`], so it never pulls from it) while the sender's route back runs
/// through routers only, often the receiver's only other way in. The invariant served:
/// a receiver pulls from every member whose path to it crosses no other member (such a
/// path carries nothing a relay could have carried instead).
///
/// A route lookup shows a first hop only; whether the rest crosses a member takes a
/// trace by the sender. The source hears every member's view, so it asks for exactly
/// the pairs in doubt: the receiver sees the sender behind a member while the sender's
/// first hop to it is a router (the source: always in doubt, it keeps no view), at most
/// [`MAX_TRACES_PER_SENDER`] per sender. Pure: the source and the simulator run it alike.
#[derive(Debug, Default)]
pub struct PathChecks {
    /// Each member's reach to every other member, as its last view said.
    views: HashMap<MemberId, HashMap<MemberId, Reach>>,
    /// (sender, receiver) pairs asked, answered or not.
    asked: HashSet<(MemberId, MemberId)>,
    /// Pairs in `asked` per sender.
    asked_of: HashMap<MemberId, usize>,
    /// Receiver -> senders whose traced path to it crosses no member.
    clean_to: BTreeMap<MemberId, BTreeSet<MemberId>>,
}

impl PathChecks {
    /// Member `member` reaches the others as `reach` says: the traces now in doubt, and
    /// the receivers whose answer changed because a pair deciding it did.
    pub fn on_view(&mut self, member: MemberId, reach: &[(MemberId, Reach)]) -> Vec<PathCheck> {
        let new: HashMap<MemberId, Reach> = reach.iter().copied().collect();
        let old = self.views.insert(member, new).unwrap_or_default();
        let new = &self.views[&member];
        // A pair is decided again when the entry that put it in doubt changed.
        let stale: Vec<(MemberId, MemberId)> = self
            .asked
            .iter()
            .filter(|&&(s, r)| {
                (s == member && old.get(&r) != new.get(&r))
                    || (r == member && old.get(&s) != new.get(&s))
            })
            .copied()
            .collect();
        let mut told = BTreeSet::new();
        for (s, r) in stale {
            self.asked.remove(&(s, r));
            if let Some(n) = self.asked_of.get_mut(&s) {
                *n -= 1;
            }
            if self.clean_to.get_mut(&r).is_some_and(|c| c.remove(&s)) {
                told.insert(r);
            }
        }
        let mut pairs: Vec<(MemberId, MemberId)> = new.keys().map(|&r| (member, r)).collect();
        pairs.extend(new.keys().map(|&s| (s, member)));
        pairs.sort_unstable();
        let mut traces: BTreeMap<MemberId, Vec<MemberId>> = BTreeMap::new();
        for (s, r) in pairs {
            if !self.asked.contains(&(s, r)) && self.in_doubt(s, r) {
                let asked_of_s = self.asked_of.entry(s).or_default();
                if *asked_of_s < MAX_TRACES_PER_SENDER {
                    *asked_of_s += 1;
                    self.asked.insert((s, r));
                    traces.entry(s).or_default().push(r);
                }
            }
        }
        let mut out: Vec<PathCheck> = traces
            .into_iter()
            .map(|(sender, receivers)| PathCheck::Trace { sender, receivers })
            .collect();
        out.extend(told.into_iter().map(|r| self.tell(r)));
        out
    }

    /// `sender` traced its path to `receiver`: `clean` if it crosses no other member
    /// (an unknown hop counts as a member). What to tell, if anything changed.
    pub fn on_traced(
        &mut self,
        sender: MemberId,
        receiver: MemberId,
        clean: bool,
    ) -> Option<PathCheck> {
        if !clean || !self.asked.contains(&(sender, receiver)) {
            return None;
        }
        self.clean_to
            .entry(receiver)
            .or_default()
            .insert(sender)
            .then(|| self.tell(receiver))
    }

    fn in_doubt(&self, sender: MemberId, receiver: MemberId) -> bool {
        let seen_by_receiver = self.views.get(&receiver).and_then(|v| v.get(&sender));
        let senders_first_hop = self.views.get(&sender).and_then(|v| v.get(&receiver));
        sender != receiver
            && seen_by_receiver == Some(&Reach::Behind)
            && (sender == SOURCE || senders_first_hop == Some(&Reach::ViaRouter))
    }

    fn tell(&self, receiver: MemberId) -> PathCheck {
        PathCheck::Tell {
            receiver,
            senders: self
                .clean_to
                .get(&receiver)
                .map(|c| c.iter().copied().collect())
                .unwrap_or_default(),
        }
    }
}

/// `reach` with the members whose path to us crosses no other member (see [`PathChecks`])
/// counted as reached through routers rather than behind a member.
pub fn with_clean_senders(reach: &mut [(MemberId, Reach)], clean: &[MemberId]) {
    for (m, r) in reach.iter_mut() {
        if *r == Reach::Behind && clean.contains(m) {
            *r = Reach::ViaRouter;
        }
    }
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
    #[test]
    fn asks_the_sender_whose_route_back_may_avoid_members_and_tells_the_receiver() {
        let mut pc = PathChecks::default();
        // Member 1 reaches 3 behind member 2; 3 reaches 1 through a router.
        assert!(pc
            .on_view(
                1,
                &[(0, Reach::Direct), (2, Reach::Direct), (3, Reach::Behind)]
            )
            .is_empty());
        let out = pc.on_view(
            3,
            &[
                (0, Reach::Direct),
                (1, Reach::ViaRouter),
                (2, Reach::Direct),
            ],
        );
        assert_eq!(
            out,
            vec![PathCheck::Trace {
                sender: 3,
                receivers: vec![1]
            }]
        );
        // The same view again asks nothing; a crossed path tells nothing.
        assert!(pc
            .on_view(
                3,
                &[
                    (0, Reach::Direct),
                    (1, Reach::ViaRouter),
                    (2, Reach::Direct)
                ]
            )
            .is_empty());
        assert_eq!(pc.on_traced(3, 2, true), None, "never asked");
        assert_eq!(
            pc.on_traced(3, 1, true),
            Some(PathCheck::Tell {
                receiver: 1,
                senders: vec![3]
            })
        );
        // Member 3's route to 1 now starts at member 2: the answer is withdrawn.
        let out = pc.on_view(
            3,
            &[(0, Reach::Direct), (1, Reach::Behind), (2, Reach::Direct)],
        );
        assert_eq!(
            out,
            vec![PathCheck::Tell {
                receiver: 1,
                senders: vec![]
            }]
        );
        let mut reach = [(2, Reach::Direct), (3, Reach::Behind), (4, Reach::Behind)];
        with_clean_senders(&mut reach, &[3]);
        assert_eq!(reach[1], (3, Reach::ViaRouter));
        assert_eq!(reach[2], (4, Reach::Behind));
    }

    #[test]
    fn the_source_is_always_asked_and_each_sender_a_bounded_number_of_times() {
        let mut pc = PathChecks::default();
        let mut traced = 0;
        for r in 1..=100 {
            for c in pc.on_view(r, &[(SOURCE, Reach::Behind)]) {
                match c {
                    PathCheck::Trace { sender, receivers } => {
                        assert_eq!((sender, receivers), (SOURCE, vec![r]));
                        traced += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(traced, MAX_TRACES_PER_SENDER);
    }
}
