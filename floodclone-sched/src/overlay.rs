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

/// One entry of a member's view: the member reached, how, and with [`Reach::Behind`] the
/// member in the way.
pub type RouteEntry = (MemberId, Reach, Option<MemberId>);

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

/// Times a pair is traced before an unknown answer stands (as crossing). A trace that
/// finds a member on the path, or every hop and none a member, is final; one that meets a
/// silent hop and no member may only have met a node whose ICMP budget for the sender ran
/// out (Linux: a burst of 6 per destination, then one a second). Members spend theirs at
/// the start answering "port unreachable" to dials that came before they listened (random-27
/// on the testbed: the source and d1 silent in every trace at 0.6 s, answering in every
/// retrace 3 s later); a sender with more than 6 traces through one router spends the
/// router's. Or a probe or an answer was dropped in a full queue, or the request lost with
/// a connection. Taken as final, such a miss keeps a receiver off its only other way in
/// for the whole transfer (random-3: 2.14 x U_min in one run of many, its second path
/// idle from start to end).
pub const MAX_TRACE_ATTEMPTS: u32 = 4;

/// Seconds after an unknown answer before the pair is traced again, doubling with each
/// try (2, 4, 8 s: by the last, a rate-limited router has earned 14 more answers).
pub const RETRACE_AFTER_S: f64 = 2.0;

/// Seconds without an answer before a pair is asked again (the request or its answer was
/// lost): a sender traces one path after another, up to [`MAX_TRACES_PER_SENDER`] of at
/// most 0.6 s each, so an answer may take ~10 s.
pub const UNANSWERED_S: f64 = 20.0;

/// What a sender's trace of its path to a receiver found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traced {
    /// Every node on the way answered, none a member.
    Clean,
    /// A member answered on the way: final.
    Crosses,
    /// No member answered, but some node did not either (or the trace failed): traced
    /// again ([`PathChecks::retrace`]).
    Unknown,
}

/// A pair's traces so far, while none found its path clean or crossing.
#[derive(Clone, Copy, Debug)]
struct Tries {
    /// Times asked.
    asked: u32,
    /// Whether the last ask was answered ([`Traced::Unknown`]).
    answered: bool,
    /// When the last ask or answer was first seen by [`PathChecks::retrace`].
    since_s: Option<f64>,
}

impl Tries {
    const FIRST: Tries = Tries {
        asked: 1,
        answered: false,
        since_s: None,
    };
}

/// What the source does for [`PathChecks`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathCheck {
    /// Ask `sender` whether its whole path to each of `receivers` crosses another member.
    Trace {
        sender: MemberId,
        receivers: Vec<MemberId>,
    },
    /// Tell `receiver` what its own routes cannot show about senders' paths to it (the
    /// full lists each time; they may shrink).
    Tell {
        receiver: MemberId,
        paths: SenderPaths,
    },
}

/// What the source tells a receiver about senders' paths to it, where the receiver's
/// routes (toward the sender) say otherwise ([`PathChecks`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SenderPaths {
    /// Senders its routes show behind a member whose traced path to it crosses none:
    /// pulled from as if reached through routers.
    pub clean: Vec<MemberId>,
    /// Senders it reaches through routers whose own route to it starts at a member that
    /// gets its copies over the same link: not pulled from, as if behind that member.
    pub crossing: Vec<MemberId>,
    /// Senders on a link of the source's, reached through routers like the source, whose
    /// own route to it does not start at the source: their data does not come through
    /// the source, where hop counts alone cannot tell (a path through the source as long
    /// as one around it; [`PathChecks::avoids_source`]).
    pub avoiding_source: Vec<MemberId>,
}

/// Neighbours that a receiver's own routes hide, or show wrongly. A receiver picks whom to
/// pull from by its routes, but the data flows along the sender's route, and routes differ
/// by direction where paths tie. The invariants served: a receiver pulls from every member
/// whose path to it crosses no other member (such a path carries nothing a relay could
/// have carried instead), and from no member whose path to it carries each chunk over a
/// link that already carries it.
///
/// Hidden: a receiver may reach a sender through another member ([`Reach::Behind`], so it
/// never pulls from it) while the sender's route back runs through routers only, often
/// the receiver's only other way in. A route lookup shows a first hop only; whether the
/// rest crosses a member takes a trace by the sender. The source hears every member's
/// view, so it asks for exactly the pairs in doubt: the receiver sees the sender behind a
/// member while the sender's first hop to it is a router (the source: always in doubt, it
/// keeps no view), at most [`MAX_TRACES_PER_SENDER`] per sender, each traced again a few
/// times while not found clean ([`PathChecks::retrace`]).
///
/// Shown wrongly: a receiver may reach a sender through routers while the sender's route
/// to it starts at member `m`, whose own way to the source starts at the sender. Then
/// `m`'s copies come in over the sender -> `m` link, and the receiver's over it again
/// (random-25: a destination beyond the 5 Mbit/s min-cut link pulled from one on its near
/// side, so chunks crossed it twice). No trace needed: first hops say it. Where `m`'s way
/// to the source runs elsewhere, the link into `m` is one it leaves idle, and the path is
/// kept. Where `m` is the source, the link into it is idle too, but the route leaves the
/// source again: if the source's own route on starts at a member on a link of the
/// source's (which its copies come in over), that link carries the chunk twice (random-25
/// again: the source's leaves d8 and d10 served a destination beyond the min-cut through
/// the source and its neighbour d2, and the source -> d2 link carried 1.2-1.4 copies of
/// the file, the 5 Mbit/s d2 -> d1 1.2-1.3). Told so, the receiver takes the source itself
/// for that sender. Where the route leaves the source through a router, the source's own
/// copies to the receiver would take that link as well, and the path is kept (in the
/// simulator, dropping those too cost random-8 +0.015). The source as a sender too: its
/// own view comes from its own route lookups (a destination whose first hop to the source
/// is the source is fed by it). A receiver left with no neighbour at all still pulls from
/// the source ([`told_data_neighbours`]).
///
/// Pure: the source and the simulator run it alike.
#[derive(Debug, Default)]
pub struct PathChecks {
    /// Each member's reach to every other member (and the member in the way, if any), as
    /// its last view said.
    views: HashMap<MemberId, HashMap<MemberId, (Reach, Option<MemberId>)>>,
    /// (sender, receiver) pairs asked, answered or not.
    asked: HashSet<(MemberId, MemberId)>,
    /// Pairs in `asked` per sender.
    asked_of: HashMap<MemberId, usize>,
    /// Receiver -> senders whose traced path to it crosses no member.
    clean_to: BTreeMap<MemberId, BTreeSet<MemberId>>,
    /// Receiver -> senders whose path to it carries chunks twice ([`PathChecks::crosses`]).
    crossing_to: BTreeMap<MemberId, BTreeSet<MemberId>>,
    /// Receiver -> senders beside the source whose route to it avoids the source
    /// ([`PathChecks::avoids_source`]).
    avoiding_to: BTreeMap<MemberId, BTreeSet<MemberId>>,
    /// Member -> the (sender, receiver) pairs whose route starts at it.
    entered_at: HashMap<MemberId, HashSet<(MemberId, MemberId)>>,
    /// Pairs in `asked` with no final answer yet, tried fewer than [`MAX_TRACE_ATTEMPTS`]
    /// times.
    tries: BTreeMap<(MemberId, MemberId), Tries>,
}

impl PathChecks {
    /// Member `member` reaches the others as `reach` says (each with the member in the
    /// way, if any): the traces now in doubt, and the receivers whose answers changed.
    pub fn on_view(&mut self, member: MemberId, reach: &[RouteEntry]) -> Vec<PathCheck> {
        let new: HashMap<MemberId, (Reach, Option<MemberId>)> =
            reach.iter().map(|&(m, r, via)| (m, (r, via))).collect();
        let old = self.views.insert(member, new).unwrap_or_default();
        let new = &self.views[&member];
        // A pair is decided again when the entry that put it in doubt changed (the
        // source's own: never, the source is always in doubt).
        let changed = |m| old.get(&m).map(|e| e.0) != new.get(&m).map(|e| e.0);
        let stale: Vec<(MemberId, MemberId)> = self
            .asked
            .iter()
            .filter(|&&(s, r)| {
                (s == member && member != SOURCE && changed(r)) || (r == member && changed(s))
            })
            .copied()
            .collect();
        let mut told = BTreeSet::new();
        for (s, r) in stale {
            self.asked.remove(&(s, r));
            self.tries.remove(&(s, r));
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
                    self.tries.insert((s, r), Tries::FIRST);
                    traces.entry(s).or_default().push(r);
                }
            }
        }
        told.extend(self.update_crossing(member, &old));
        told.extend(self.update_avoiding(member, &old));
        let mut out: Vec<PathCheck> = traces
            .into_iter()
            .map(|(sender, receivers)| PathCheck::Trace { sender, receivers })
            .collect();
        out.extend(told.into_iter().map(|r| self.tell(r)));
        out
    }

    /// The crossing senders again for the pairs `member`'s new view decides: `member` as
    /// the receiver, as the sender, and as the member in the way (when its own way to the
    /// source changed). The receivers whose list changed.
    fn update_crossing(
        &mut self,
        member: MemberId,
        old: &HashMap<MemberId, (Reach, Option<MemberId>)>,
    ) -> BTreeSet<MemberId> {
        let new = &self.views[&member];
        for (&r, &(_, via)) in old {
            if let Some(set) = via.and_then(|m| self.entered_at.get_mut(&m)) {
                set.remove(&(member, r));
            }
        }
        for (&r, &(_, via)) in new {
            if let Some(m) = via {
                self.entered_at.entry(m).or_default().insert((member, r));
            }
        }
        let named: BTreeSet<MemberId> = old.keys().chain(new.keys()).copied().collect();
        let mut pairs: BTreeSet<(MemberId, MemberId)> = BTreeSet::new();
        pairs.extend(named.iter().map(|&s| (s, member)));
        pairs.extend(named.iter().map(|&r| (member, r)));
        let entered_at_source = self.entered_at.get(&SOURCE).into_iter().flatten();
        if old.get(&SOURCE) != new.get(&SOURCE) {
            pairs.extend(self.entered_at.get(&member).into_iter().flatten().copied());
            // Routes through the source on to `member` ([`PathChecks::crosses`]).
            let through = |r: &MemberId| {
                self.views
                    .get(&SOURCE)
                    .and_then(|v| v.get(r))
                    .is_some_and(|&(_, via)| via == Some(member))
            };
            pairs.extend(
                entered_at_source
                    .clone()
                    .filter(|(_, r)| through(r))
                    .copied(),
            );
        }
        if member == SOURCE {
            // The source's own way on from it.
            let moved = |r: &MemberId| old.get(r) != new.get(r);
            pairs.extend(entered_at_source.filter(|(_, r)| moved(r)).copied());
        }
        let decided: Vec<_> = pairs
            .into_iter()
            .map(|(s, r)| (s, r, self.crosses(s, r)))
            .collect();
        record_pairs(&mut self.crossing_to, decided)
    }

    /// The pairs with `member` at either end decided again ([`PathChecks::avoids_source`])
    /// after its view changed from `old`. The receivers whose list changed.
    fn update_avoiding(
        &mut self,
        member: MemberId,
        old: &HashMap<MemberId, (Reach, Option<MemberId>)>,
    ) -> BTreeSet<MemberId> {
        let named: BTreeSet<MemberId> = old
            .keys()
            .chain(self.views[&member].keys())
            .copied()
            .collect();
        let pairs = (named.iter().map(|&r| (member, r))).chain(named.iter().map(|&s| (s, member)));
        let decided: Vec<_> = pairs
            .map(|(s, r)| (s, r, self.avoids_source(s, r)))
            .collect();
        record_pairs(&mut self.avoiding_to, decided)
    }

    /// Whether `s`, on a link of the source's, has a route to `r` that does not start at
    /// the source, while `r` reaches both through routers: the only case where `r`'s hop
    /// counts cannot tell whether `s`'s data comes through the source (our hops to `s`
    /// equal our hops to the source plus one either way). Under shortest-path routing a
    /// route from beside the source that passed through it later than at its first hop
    /// would be longer than one through it at once, so the first hop decides.
    fn avoids_source(&self, s: MemberId, r: MemberId) -> bool {
        let through_routers = |a, b| matches!(self.entry(a, b), Some((Reach::ViaRouter, _)));
        let first_hop_avoids = match self.entry(s, r) {
            Some((Reach::Unreachable, _)) | None => false,
            Some((_, via)) => via != Some(SOURCE),
        };
        s != SOURCE
            && r != SOURCE
            && s != r
            && matches!(self.entry(s, SOURCE), Some((Reach::Direct, _)))
            && through_routers(r, SOURCE)
            && through_routers(r, s)
            && first_hop_avoids
    }

    /// Whether `s`'s path to `r` carries chunks twice over a link ([`PathChecks`]): `r`
    /// reaches `s` through routers, `s`'s route to `r` starts at member `m`, and `m`'s own
    /// way to the source starts at `s` (so `m`'s copies come in over that link too); or `m`
    /// is the source, whose own route to `r` starts at a member on a link of its own (whose
    /// copies go out over that link).
    fn crosses(&self, s: MemberId, r: MemberId) -> bool {
        let twice = match self.entry(s, r) {
            // The source fetches nothing: the link into it is idle, but the route leaves
            // it again, as the source's own route on to `r` does.
            Some((Reach::Behind, Some(SOURCE))) => self.enters_member_fed_through(SOURCE, r),
            _ => self.enters_member_fed_through(s, r),
        };
        r != SOURCE && s != r && matches!(self.entry(r, s), Some((Reach::ViaRouter, _))) && twice
    }

    /// Whether `s`'s route to `r` starts at member `m` whose own way to the source starts
    /// at `s`: `m`'s copies come in over that link.
    fn enters_member_fed_through(&self, s: MemberId, r: MemberId) -> bool {
        let Some((Reach::Behind, Some(m))) = self.entry(s, r) else {
            return false;
        };
        match self.entry(m, SOURCE) {
            Some((Reach::Direct, _)) => s == SOURCE,
            Some((Reach::Behind, via)) => via == Some(s),
            _ => false,
        }
    }

    /// How `a`'s last view reaches `b`.
    fn entry(&self, a: MemberId, b: MemberId) -> Option<(Reach, Option<MemberId>)> {
        self.views.get(&a).and_then(|v| v.get(&b)).copied()
    }

    /// `sender` traced its path to `receiver` and found it `found` (an unknown path counts
    /// as crossing, until a later try finds it clean: [`PathChecks::retrace`]). What to
    /// tell, if anything changed.
    pub fn on_traced(
        &mut self,
        sender: MemberId,
        receiver: MemberId,
        found: Traced,
    ) -> Option<PathCheck> {
        if !self.asked.contains(&(sender, receiver)) {
            return None;
        }
        if found == Traced::Unknown {
            if let Some(t) = self.tries.get_mut(&(sender, receiver)) {
                (t.answered, t.since_s) = (true, None);
            }
            return None;
        }
        self.tries.remove(&(sender, receiver));
        if found == Traced::Crosses {
            return None;
        }
        self.clean_to
            .entry(receiver)
            .or_default()
            .insert(sender)
            .then(|| self.tell(receiver))
    }

    /// The pairs to trace again at `now_s` (seconds on any steady clock): those answered
    /// unknown [`RETRACE_AFTER_S`] ago (doubling with each try), or not answered for
    /// [`UNANSWERED_S`]; at most [`MAX_TRACE_ATTEMPTS`] tries each. Call it now and then.
    pub fn retrace(&mut self, now_s: f64) -> Vec<PathCheck> {
        let mut traces: BTreeMap<MemberId, Vec<MemberId>> = BTreeMap::new();
        self.tries.retain(|&(s, r), t| {
            let since = *t.since_s.get_or_insert(now_s);
            let wait = match t.answered {
                true => RETRACE_AFTER_S * f64::from(1u32 << (t.asked - 1).min(16)),
                false => UNANSWERED_S,
            };
            if now_s - since < wait {
                return true;
            }
            if t.asked >= MAX_TRACE_ATTEMPTS {
                return false;
            }
            *t = Tries {
                asked: t.asked + 1,
                ..Tries::FIRST
            };
            traces.entry(s).or_default().push(r);
            true
        });
        traces
            .into_iter()
            .map(|(sender, receivers)| PathCheck::Trace { sender, receivers })
            .collect()
    }

    fn in_doubt(&self, sender: MemberId, receiver: MemberId) -> bool {
        let seen_by_receiver = self.views.get(&receiver).and_then(|v| v.get(&sender));
        let senders_first_hop = self.views.get(&sender).and_then(|v| v.get(&receiver));
        sender != receiver
            && receiver != SOURCE
            && matches!(seen_by_receiver, Some((Reach::Behind, _)))
            && (sender == SOURCE || matches!(senders_first_hop, Some((Reach::ViaRouter, _))))
    }

    fn tell(&self, receiver: MemberId) -> PathCheck {
        PathCheck::Tell {
            receiver,
            paths: self.paths_for(receiver),
        }
    }

    /// Whether `receiver` still pulls from the source once told that the source's path
    /// to it crosses (as its last view and what it is told make its neighbours,
    /// [`told_data_neighbours`], the same rule it runs); yes when not told so, or while
    /// its view is unknown. Cheap in that common case: the source asks it of every fresh
    /// request.
    pub fn pulls_from_source(&self, receiver: MemberId) -> bool {
        let told_crossing = self
            .crossing_to
            .get(&receiver)
            .is_some_and(|c| c.contains(&SOURCE));
        let Some(view) = self.views.get(&receiver).filter(|_| told_crossing) else {
            return true;
        };
        let reach: Vec<(MemberId, Reach)> = view.iter().map(|(&m, &(r, _))| (m, r)).collect();
        told_data_neighbours(receiver, reach, &self.paths_for(receiver)).contains(&SOURCE)
    }

    /// What `receiver` is to be told now (the lists a [`PathCheck::Tell`] carries).
    pub fn paths_for(&self, receiver: MemberId) -> SenderPaths {
        let list = |m: &BTreeMap<MemberId, BTreeSet<MemberId>>| {
            m.get(&receiver)
                .map(|c| c.iter().copied().collect())
                .unwrap_or_default()
        };
        SenderPaths {
            clean: list(&self.clean_to),
            crossing: list(&self.crossing_to),
            avoiding_source: list(&self.avoiding_to),
        }
    }
}

/// Each (sender, receiver, in the list) of `decided` recorded in `lists` (receiver ->
/// senders): the receivers whose list changed.
fn record_pairs(
    lists: &mut BTreeMap<MemberId, BTreeSet<MemberId>>,
    decided: Vec<(MemberId, MemberId, bool)>,
) -> BTreeSet<MemberId> {
    let mut changed = BTreeSet::new();
    for (s, r, listed) in decided {
        let set = lists.entry(r).or_default();
        let was = match listed {
            true => !set.insert(s),
            false => set.remove(&s),
        };
        if was != listed {
            changed.insert(r);
        }
    }
    changed
}

/// [`data_neighbours`] from `reach` as the senders' paths to us make it
/// ([`with_sender_paths`]); the source if that leaves none (it holds everything, so a
/// receiver always has someone to pull from).
pub fn told_data_neighbours(
    me: MemberId,
    mut reach: Vec<(MemberId, Reach)>,
    paths: &SenderPaths,
) -> Vec<MemberId> {
    let sees_source = reach
        .iter()
        .any(|&(m, r)| m == SOURCE && matches!(r, Reach::Direct | Reach::ViaRouter));
    with_sender_paths(&mut reach, paths);
    let mut out = data_neighbours(me, &reach);
    if out.is_empty() && sees_source {
        out.push(SOURCE);
    }
    out
}

/// `reach` as the senders' paths to us make it ([`PathChecks`]): a member whose path
/// crosses no other member counts as reached through routers, one whose path crosses
/// one as behind it.
pub fn with_sender_paths(reach: &mut [(MemberId, Reach)], paths: &SenderPaths) {
    for (m, r) in reach.iter_mut() {
        if *r == Reach::Behind && paths.clean.contains(m) {
            *r = Reach::ViaRouter;
        } else if *r == Reach::ViaRouter && paths.crossing.contains(m) {
            *r = Reach::Behind;
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
                &[
                    (0, Reach::Direct, None),
                    (2, Reach::Direct, None),
                    (3, Reach::Behind, Some(2))
                ]
            )
            .is_empty());
        let out = pc.on_view(
            3,
            &[
                (0, Reach::Direct, None),
                (1, Reach::ViaRouter, None),
                (2, Reach::Direct, None),
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
                    (0, Reach::Direct, None),
                    (1, Reach::ViaRouter, None),
                    (2, Reach::Direct, None)
                ]
            )
            .is_empty());
        assert_eq!(pc.on_traced(3, 2, Traced::Clean), None, "never asked");
        assert_eq!(pc.on_traced(3, 1, Traced::Clean), Some(tell(1, &[3], &[])));
        // Member 3's route to 1 now starts at member 2: the answer is withdrawn.
        let out = pc.on_view(
            3,
            &[
                (0, Reach::Direct, None),
                (1, Reach::Behind, Some(2)),
                (2, Reach::Direct, None),
            ],
        );
        assert_eq!(out, vec![tell(1, &[], &[])]);
        let mut reach = [
            (2, Reach::Direct),
            (3, Reach::Behind),
            (4, Reach::Behind),
            (5, Reach::ViaRouter),
            (6, Reach::ViaRouter),
        ];
        let paths = SenderPaths {
            clean: vec![3],
            crossing: vec![5],
            avoiding_source: vec![],
        };
        with_sender_paths(&mut reach, &paths);
        assert_eq!(reach[1], (3, Reach::ViaRouter));
        assert_eq!(reach[2], (4, Reach::Behind));
        assert_eq!(reach[3], (5, Reach::Behind));
        assert_eq!(reach[4], (6, Reach::ViaRouter));
    }

    fn tell(receiver: MemberId, clean: &[MemberId], crossing: &[MemberId]) -> PathCheck {
        PathCheck::Tell {
            receiver,
            paths: SenderPaths {
                clean: clean.to_vec(),
                crossing: crossing.to_vec(),
                avoiding_source: vec![],
            },
        }
    }

    /// Only the told lists, by receiver, of what `on_view` returned.
    fn crossing_told(out: Vec<PathCheck>) -> Vec<(MemberId, Vec<MemberId>)> {
        out.into_iter()
            .filter_map(|c| match c {
                PathCheck::Tell { receiver, paths } => Some((receiver, paths.crossing)),
                PathCheck::Trace { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_sender_whose_route_starts_at_a_member_fed_through_it_is_not_pulled_from() {
        use Reach::{Behind, Direct, ViaRouter};
        // random-25's shape: s - 2 - 1 - router - 4, with 2 -> 1 the min-cut link. 4
        // reaches 2 through the router, 2's route to 4 starts at 1, and 1's way to the
        // source starts at 2: 1's copies and 4's would both cross 2 -> 1.
        let view_4 = [
            (SOURCE, ViaRouter, None),
            (1, ViaRouter, None),
            (2, ViaRouter, None),
        ];
        let view_2 = [
            (SOURCE, Direct, None),
            (1, Direct, None),
            (4, Behind, Some(1)),
        ];
        let view_1 = [
            (SOURCE, Behind, Some(2)),
            (2, Direct, None),
            (4, ViaRouter, None),
        ];
        // Told once all three views are in, whatever their order.
        for order in [[4, 2, 1], [1, 2, 4], [2, 1, 4], [1, 4, 2]] {
            let mut pc = PathChecks::default();
            let mut told = Vec::new();
            for m in order {
                let view: &[_] = match m {
                    4 => &view_4,
                    2 => &view_2,
                    _ => &view_1,
                };
                told.extend(crossing_told(pc.on_view(m, view)));
            }
            assert_eq!(told.last(), Some(&(4, vec![2])), "order {order:?}");
        }
        let mut pc = PathChecks::default();
        for (m, view) in [(4, &view_4[..]), (2, &view_2[..]), (1, &view_1[..])] {
            pc.on_view(m, view);
        }
        // 1's way to the source changes (now through a router): the link 2 -> 1 no longer
        // carries 1's copies, and 4 may pull from 2 again.
        assert_eq!(
            crossing_told(pc.on_view(
                1,
                &[
                    (SOURCE, ViaRouter, None),
                    (2, Direct, None),
                    (4, ViaRouter, None)
                ]
            )),
            vec![(4, vec![])]
        );
        pc.on_view(1, &view_1);
        // 2 learns that member 1 is gone (its kernel forwards: the route reads as a router's).
        assert_eq!(
            crossing_told(pc.on_view(
                2,
                &[
                    (SOURCE, Direct, None),
                    (1, Direct, None),
                    (4, ViaRouter, None)
                ]
            )),
            vec![(4, vec![])]
        );
    }

    #[test]
    fn a_sender_beside_the_source_is_told_whether_its_route_avoids_the_source() {
        use Reach::{Behind, Direct, ViaRouter};
        // random-9750's shape: 1 - r1 - s - 2, and 2 - r2 - r1: 1 reaches the source and 2
        // through r1, as many hops to 2 as through the source. 2's route to 1 starts at
        // r2: told so, 1 pulls from 2; when it starts at the source, 1 is not told.
        let avoiding = |out: Vec<PathCheck>| -> Vec<(MemberId, Vec<MemberId>)> {
            out.into_iter()
                .filter_map(|c| match c {
                    PathCheck::Tell { receiver, paths } => Some((receiver, paths.avoiding_source)),
                    PathCheck::Trace { .. } => None,
                })
                .collect()
        };
        let view_1 = [(SOURCE, ViaRouter, None), (2, ViaRouter, None)];
        let view_2 = |to_1| [(SOURCE, Direct, None), (1, to_1, None)];
        let via_source = [(SOURCE, Direct, None), (1, Behind, Some(SOURCE))];
        for first_1 in [true, false] {
            let mut pc = PathChecks::default();
            let mut told = Vec::new();
            if first_1 {
                told.extend(avoiding(pc.on_view(1, &view_1)));
            }
            told.extend(avoiding(pc.on_view(2, &view_2(ViaRouter))));
            if !first_1 {
                told.extend(avoiding(pc.on_view(1, &view_1)));
            }
            assert_eq!(told, vec![(1, vec![2])], "1's view first: {first_1}");
            assert_eq!(pc.paths_for(1).avoiding_source, vec![2]);
            // 2's route to 1 now starts at the source: taken back.
            assert_eq!(avoiding(pc.on_view(2, &via_source)), vec![(1, vec![])]);
        }
        // A receiver on a link of the sender's own needs no word: its hop count (1) says.
        let mut pc = PathChecks::default();
        pc.on_view(1, &[(SOURCE, ViaRouter, None), (2, Direct, None)]);
        pc.on_view(2, &view_2(Direct));
        assert!(pc.paths_for(1).avoiding_source.is_empty());
    }

    #[test]
    fn a_route_into_a_member_fed_elsewhere_is_kept_and_one_into_the_source_is_not() {
        use Reach::{Behind, Direct, ViaRouter};
        // 3 hangs below 1 (which is fed by 2); 4 reaches 3 through a router, 3's route to 4
        // starts at 1. The link 3 -> 1 carries none of 1's copies: it is kept.
        let mut pc = PathChecks::default();
        let views: [(MemberId, &[RouteEntry]); 3] = [
            (
                1,
                &[
                    (SOURCE, Behind, Some(2)),
                    (3, Direct, None),
                    (4, ViaRouter, None),
                ],
            ),
            (
                3,
                &[
                    (SOURCE, Behind, Some(1)),
                    (1, Direct, None),
                    (4, Behind, Some(1)),
                ],
            ),
            (
                4,
                &[
                    (SOURCE, ViaRouter, None),
                    (1, ViaRouter, None),
                    (3, ViaRouter, None),
                ],
            ),
        ];
        for (m, view) in views {
            assert!(crossing_told(pc.on_view(m, view))
                .iter()
                .all(|(_, c)| c.is_empty()));
        }
        // The source as the sender: 2 is fed by it directly, and 4 reaches it through
        // a router while its route to 4 starts at 2.
        let mut pc = PathChecks::default();
        pc.on_view(2, &[(SOURCE, Direct, None), (4, Behind, Some(1))]);
        pc.on_view(4, &[(SOURCE, ViaRouter, None), (2, ViaRouter, None)]);
        let out = pc.on_view(SOURCE, &[(2, Direct, None), (4, Behind, Some(2))]);
        assert_eq!(crossing_told(out), vec![(4, vec![SOURCE])]);
        // Told so, 4 pulls from 2 only; told that every sender crosses, from the source
        // still (it holds everything).
        let reach = vec![(SOURCE, ViaRouter), (2, ViaRouter)];
        let told = |crossing: Vec<MemberId>| SenderPaths {
            crossing,
            ..SenderPaths::default()
        };
        assert_eq!(
            told_data_neighbours(4, reach.clone(), &told(vec![SOURCE])),
            vec![2]
        );
        assert_eq!(
            told_data_neighbours(4, reach, &told(vec![SOURCE, 2])),
            vec![SOURCE]
        );
        // The source, knowing 4's view and what it told it, hands it no fresh chunks; 2
        // it does.
        assert!(!pc.pulls_from_source(4));
        assert!(pc.pulls_from_source(2));
        assert!(pc.pulls_from_source(9), "unknown: yes");
        // A route that starts at the source and leaves it through a router: the source's
        // own copies to 4 would take that link too. Kept, in every order of views.
        let views: [(MemberId, &[RouteEntry]); 3] = [
            (4, &[(SOURCE, ViaRouter, None), (2, ViaRouter, None)]),
            (2, &[(SOURCE, Direct, None), (4, Behind, Some(SOURCE))]),
            (SOURCE, &[(2, Direct, None), (4, ViaRouter, None)]),
        ];
        for order in [[0, 1, 2], [2, 0, 1], [1, 2, 0]] {
            let mut pc = PathChecks::default();
            for i in order {
                let out = pc.on_view(views[i].0, views[i].1);
                assert!(crossing_told(out).iter().all(|(_, c)| c.is_empty()));
            }
        }
        // One that leaves it through member 3, on a link of the source's (3 is fed over
        // it): 4 is told 2 crosses (and the source, by the first rule), in every order of
        // views, and neither once 3's way to the source runs elsewhere.
        let views: [(MemberId, &[RouteEntry]); 4] = [
            (4, &[(SOURCE, ViaRouter, None), (2, ViaRouter, None)]),
            (2, &[(SOURCE, Direct, None), (4, Behind, Some(SOURCE))]),
            (
                SOURCE,
                &[(2, Direct, None), (3, Direct, None), (4, Behind, Some(3))],
            ),
            (3, &[(SOURCE, Direct, None), (4, ViaRouter, None)]),
        ];
        for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
            let mut pc = PathChecks::default();
            let mut told = Vec::new();
            for i in order {
                told.extend(crossing_told(pc.on_view(views[i].0, views[i].1)));
            }
            assert_eq!(told.last(), Some(&(4, vec![SOURCE, 2])), "order {order:?}");
            let out = pc.on_view(3, &[(SOURCE, Behind, Some(5)), (4, ViaRouter, None)]);
            assert_eq!(crossing_told(out), vec![(4, vec![])], "order {order:?}");
        }
    }

    #[test]
    fn the_source_is_always_asked_and_each_sender_a_bounded_number_of_times() {
        let mut pc = PathChecks::default();
        let mut traced = 0;
        for r in 1..=100 {
            for c in pc.on_view(r, &[(SOURCE, Reach::Behind, Some(r + 1))]) {
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

    #[test]
    fn a_path_not_found_clean_is_traced_again_a_few_times_then_let_be() {
        let mut pc = PathChecks::default();
        // Member 1 reaches 2 behind 3 and 4 behind 3; 2 and 4 reach 1 through a router.
        let behind = [(2, Reach::Behind, Some(3)), (4, Reach::Behind, Some(3))];
        assert!(pc.on_view(1, &behind).is_empty());
        let via = [(1, Reach::ViaRouter, None)];
        assert_eq!(pc.on_view(2, &via).len(), 1);
        assert_eq!(pc.on_view(4, &via).len(), 1);
        let trace = |sender| PathCheck::Trace {
            sender,
            receivers: vec![1],
        };
        // 2's answer: unknown (a silent hop); 4's never comes.
        assert_eq!(pc.on_traced(2, 1, Traced::Unknown), None);
        assert!(pc.retrace(0.0).is_empty(), "the clocks start");
        assert!(pc.retrace(RETRACE_AFTER_S - 0.1).is_empty());
        assert_eq!(pc.retrace(RETRACE_AFTER_S), vec![trace(2)]);
        // Found clean the second time: the receiver is told, and nothing more is asked.
        assert_eq!(pc.on_traced(2, 1, Traced::Clean), Some(tell(1, &[2], &[])));
        assert_eq!(pc.retrace(UNANSWERED_S), vec![trace(4)]);
        // 4 answers "unknown" each time: asked again after 4 s, 8 s, then let be.
        pc.on_traced(4, 1, Traced::Unknown);
        let mut t = UNANSWERED_S;
        let mut asked_at = vec![];
        pc.retrace(t);
        for _ in 0..100 {
            t += 0.5;
            for c in pc.retrace(t) {
                assert_eq!(c, trace(4));
                asked_at.push(t - UNANSWERED_S);
                pc.on_traced(4, 1, Traced::Unknown);
            }
        }
        assert_eq!(
            asked_at,
            [4.0, 12.5],
            "after 4 s, then 8 s from the next call"
        );
        assert!(pc.tries.is_empty(), "{:?}", pc.tries);
        // A changed view asks afresh (and the old answer is withdrawn); a crossing answer
        // is final.
        pc.on_view(2, &[(1, Reach::Behind, Some(3))]);
        assert_eq!(pc.on_view(2, &via), vec![trace(2)]);
        assert_eq!(pc.on_traced(2, 1, Traced::Crosses), None);
        assert!(pc.retrace(1e6).is_empty());
        assert!(pc.retrace(2e6).is_empty());
    }
}
