//! Packets sent and not yet acknowledged or declared lost, in packet-number order.
//!
//! FloodClone's change to quinn-proto (see VENDORED.md): upstream keeps these in a
//! `BTreeMap<u64, SentPacket>`. Packet numbers are handed out in increasing order and
//! acknowledged mostly oldest first, so a map keyed by them is filled at its end and
//! emptied at its start; a B-tree leaf then shifts its ~100-byte values on every removal
//! from its front, which at gigabit rates (thousands of packets in flight, an ACK every 16th
//! packet) was 4-7% of a sender's CPU. A `VecDeque` sorted by packet number takes both ends
//! in O(1) and finds any packet by binary search. A packet removed from the middle (acked
//! while an older one is still out, or declared lost) leaves a hole instead of shifting the
//! others: a peer acknowledging every other packet must not make each removal cost the
//! packets before it. Holes at either end are dropped at once, and once they are more than
//! half the entries they are all dropped in one pass, so memory stays within twice the
//! packets tracked (as the map's did, count-bounded) and every removal O(1) amortized.

use std::{
    collections::VecDeque,
    ops::{Bound, Index, RangeBounds},
};

use super::spaces::SentPacket;

#[derive(Default)]
pub(super) struct SentPackets {
    /// Sorted by packet number; `None` where a packet left from the middle. The first and
    /// last entries are never holes.
    packets: VecDeque<(u64, Option<SentPacket>)>,
    /// How many entries are holes.
    holes: usize,
}

impl SentPackets {
    /// Index of the first entry numbered `number` or above.
    fn position(&self, number: u64) -> usize {
        self.packets.partition_point(|&(pn, _)| pn < number)
    }

    /// Index of the first entry numbered above `number`.
    fn position_after(&self, number: u64) -> usize {
        number
            .checked_add(1)
            .map_or(self.packets.len(), |n| self.position(n))
    }

    /// Index of the packet numbered `number`, if it is tracked.
    fn find(&self, number: u64) -> Option<usize> {
        // Most removals are of the oldest packet (never a hole): no search for it.
        if self.packets.front()?.0 == number {
            return Some(0);
        }
        let at = self.position(number);
        let (pn, packet) = self.packets.get(at)?;
        (*pn == number && packet.is_some()).then_some(at)
    }

    pub(super) fn get(&self, number: &u64) -> Option<&SentPacket> {
        self.packets[self.find(*number)?].1.as_ref()
    }

    /// Adds a packet; a number already present is replaced, as `BTreeMap::insert` would.
    pub(super) fn insert(&mut self, number: u64, packet: SentPacket) {
        match self.packets.back() {
            Some(&(last, _)) if last >= number => {
                let at = self.position(number);
                match self.packets.get_mut(at) {
                    Some((pn, slot)) if *pn == number => {
                        if slot.is_none() {
                            self.holes -= 1;
                        }
                        *slot = Some(packet);
                    }
                    _ => self.packets.insert(at, (number, Some(packet))),
                }
            }
            _ => self.packets.push_back((number, Some(packet))),
        }
    }

    pub(super) fn remove(&mut self, number: &u64) -> Option<SentPacket> {
        let at = self.find(*number)?;
        let packet = if at == 0 {
            self.packets.pop_front()?.1
        } else if at + 1 == self.packets.len() {
            self.packets.pop_back()?.1
        } else {
            self.holes += 1;
            self.packets[at].1.take()
        };
        self.drop_holes();
        packet
    }

    /// Keeps the ends free of holes, and the holes at most half the entries.
    fn drop_holes(&mut self) {
        while self.packets.front().is_some_and(|(_, p)| p.is_none()) {
            self.packets.pop_front();
            self.holes -= 1;
        }
        while self.packets.back().is_some_and(|(_, p)| p.is_none()) {
            self.packets.pop_back();
            self.holes -= 1;
        }
        if self.holes * 2 > self.packets.len() {
            self.packets.retain(|(_, p)| p.is_some());
            self.holes = 0;
        }
    }

    /// The packets numbered within `range`, in order.
    pub(super) fn range(
        &self,
        range: impl RangeBounds<u64>,
    ) -> impl Iterator<Item = (&u64, &SentPacket)> {
        let start = match range.start_bound() {
            Bound::Included(&n) => self.position(n),
            Bound::Excluded(&n) => self.position_after(n),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&n) => self.position_after(n),
            Bound::Excluded(&n) => self.position(n),
            Bound::Unbounded => self.packets.len(),
        };
        self.packets
            .range(start..end.max(start))
            .filter_map(|(pn, packet)| Some((pn, packet.as_ref()?)))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &SentPacket> {
        self.packets
            .iter()
            .filter_map(|(_, packet)| packet.as_ref())
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut SentPacket> {
        self.packets
            .iter_mut()
            .filter_map(|(_, packet)| packet.as_mut())
    }

    pub(super) fn into_values(self) -> impl Iterator<Item = SentPacket> {
        self.packets.into_iter().filter_map(|(_, packet)| packet)
    }
}

impl Index<&u64> for SentPackets {
    type Output = SentPacket;
    fn index(&self, number: &u64) -> &SentPacket {
        self.get(number).expect("no sent packet with this number")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{Instant, connection::spaces::ThinRetransmits, frame::StreamMetaVec};

    fn packet(size: u16) -> SentPacket {
        SentPacket {
            path_generation: 0,
            time_sent: Instant::now(),
            size,
            ack_eliciting: true,
            largest_acked: None,
            retransmits: ThinRetransmits::default(),
            stream_frames: StreamMetaVec::new(),
        }
    }

    /// xorshift64: the same sequence on every run, no dependency on `rand`'s API.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn bound(rng: &mut Rng, around: u64) -> Bound<u64> {
        let n = around.saturating_sub(5) + rng.below(12);
        match rng.below(3) {
            0 => Bound::Included(n),
            1 => Bound::Excluded(n),
            _ => Bound::Unbounded,
        }
    }

    /// What upstream's `BTreeMap` would hold and answer, after every kind of operation the
    /// connection makes: packets sent in order with numbers skipped, acknowledged oldest
    /// first, out of order and twice, declared lost from the middle, a number reused.
    #[test]
    fn behaves_as_the_btree_map_it_replaces() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..200 {
            let mut reference = BTreeMap::new();
            let mut sent = SentPackets::default();
            let mut next = rng.below(1000);
            for step in 0..400u16 {
                match rng.below(10) {
                    0..=3 => {
                        next += 1 + rng.below(3) / 2;
                        reference.insert(next, step);
                        sent.insert(next, packet(step));
                    }
                    4..=5 => {
                        let oldest = reference.keys().next().copied().unwrap_or(next);
                        let n = oldest + rng.below(3);
                        let want = reference.remove(&n);
                        assert_eq!(sent.remove(&n).map(|p| p.size), want);
                    }
                    6 => {
                        let n = next.saturating_sub(rng.below(40));
                        let want = reference.remove(&n);
                        assert_eq!(sent.remove(&n).map(|p| p.size), want);
                    }
                    7 => {
                        let n = next.saturating_sub(rng.below(40));
                        reference.insert(n, step);
                        sent.insert(n, packet(step));
                    }
                    _ => {
                        let range = (bound(&mut rng, next - 20), bound(&mut rng, next));
                        let want: Vec<_> = match range {
                            (Bound::Included(a) | Bound::Excluded(a), Bound::Excluded(b))
                            | (Bound::Excluded(a), Bound::Included(b))
                                if a >= b =>
                            {
                                Vec::new() // BTreeMap panics on these; the connection never asks
                            }
                            (Bound::Included(a), Bound::Included(b)) if a > b => Vec::new(),
                            _ => reference.range(range).map(|(&n, &s)| (n, s)).collect(),
                        };
                        let got: Vec<_> = sent.range(range).map(|(&n, p)| (n, p.size)).collect();
                        assert_eq!(got, want);
                    }
                }
                assert!(sent.packets.len() <= 2 * reference.len() + 1);
                assert_eq!(
                    sent.holes,
                    sent.packets.iter().filter(|e| e.1.is_none()).count()
                );
                let n = next.saturating_sub(rng.below(10));
                assert_eq!(sent.get(&n).map(|p| p.size), reference.get(&n).copied());
                if let Some(&s) = reference.get(&n) {
                    assert_eq!(sent[&n].size, s);
                }
            }
            let want: Vec<_> = reference.values().copied().collect();
            assert_eq!(sent.values().map(|p| p.size).collect::<Vec<_>>(), want);
            for p in sent.values_mut() {
                p.size += 1;
            }
            let bumped: Vec<_> = sent.into_values().map(|p| p.size - 1).collect();
            assert_eq!(bumped, want);
        }
    }

    /// A peer acknowledging every other packet of a long flight: each removal is O(1)
    /// (a hole, not a shift of the packets before it) and memory stays within twice what
    /// is tracked.
    #[test]
    fn every_other_packet_acknowledged() {
        let mut sent = SentPackets::default();
        for n in 0..10_000 {
            sent.insert(n, packet(0));
        }
        for n in (1..10_000).step_by(2) {
            assert!(sent.remove(&n).is_some());
            let live = 10_000 - n.div_ceil(2) as usize;
            assert!(sent.packets.len() <= 2 * live + 1);
        }
        assert_eq!(sent.values().count(), 5_000);
        let evens: Vec<u64> = sent.range(..).map(|(&n, _)| n).collect();
        assert_eq!(evens, (0..10_000).step_by(2).collect::<Vec<_>>());
        for n in (0..10_000).step_by(2) {
            assert!(sent.remove(&n).is_some());
        }
        assert!(sent.packets.is_empty());
        assert_eq!(sent.holes, 0);
    }
}
