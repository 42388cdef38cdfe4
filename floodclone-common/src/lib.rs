//! Types shared by the kernel-side tc programs and the userspace link-stats reader.
//!
//! Every struct is `repr(C)` with explicit padding so both sides agree on the layout and the
//! verifier never sees uninitialised bytes in a map key.
#![no_std]

/// Traffic leaving the interface.
pub const DIR_EGRESS: u8 = 0;
/// Traffic arriving on the interface.
pub const DIR_INGRESS: u8 = 1;

/// Capacity of the per-peer counter map. LRU: a busy host with many peers evicts the coldest.
/// Only watched peers get entries (a daemon's members, up to [`WATCH_MAP_ENTRIES`]), on the
/// interfaces their traffic crosses, both directions.
pub const LINK_MAP_ENTRIES: u32 = 16384;
/// Capacity of the spin-bit flow map (LRU): one entry per connection, direction and
/// interface.
pub const SPIN_MAP_ENTRIES: u32 = 4096;
/// Bytes of the destination connection ID that key a spin flow. A short header does not
/// carry the ID's length; the daemon's endpoints issue IDs of exactly this length
/// (quinn's default, set explicitly by `transport`). Another stack's shorter IDs put
/// packet-number bytes in the key: its packets split into one-packet flows that never count
/// as spinning (and churn the LRU, which matters only where every peer is counted).
pub const SPIN_DCID_LEN: usize = 8;
/// Batches of a spin flow whose first and last spin values the kernel compares
/// ([`SpinState::mixed_batches`]): a sender that sends random values differs within half of
/// them, so 64 tell it apart beyond doubt (one that spins: none), and each comparison past
/// the skb's linear part is a helper call.
pub const SPIN_BATCHES_CHECKED: u64 = 64;

/// Capacity of the map of peers counted (a swarm's members' addresses).
pub const WATCH_MAP_ENTRIES: u32 = 8192;
/// Key of the watched-peers map that means "count every peer" (`::` never is one).
pub const WATCH_ALL: PeerAddr = [0; 16];

/// A peer's address as the maps key it: IPv6 as is, IPv4 as its IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`), network byte order. One key shape for both families keeps one map
/// and one lookup per packet.
pub type PeerAddr = [u8; 16];

/// The map key of `addr` (an IPv4-mapped IPv6 address keys as the IPv4 one it maps).
pub fn peer_key(addr: core::net::IpAddr) -> PeerAddr {
    match addr {
        core::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        core::net::IpAddr::V6(a) => a.octets(),
    }
}

/// The address a map key stands for (IPv4-mapped keys give IPv4).
pub fn peer_addr(key: PeerAddr) -> core::net::IpAddr {
    core::net::Ipv6Addr::from(key).to_canonical()
}

/// Names of the maps as they appear in the object and under the pin directory.
pub const LINK_MAP_NAME: &str = "LINK_STATS";
pub const SPIN_MAP_NAME: &str = "SPIN_STATS";
pub const WATCH_MAP_NAME: &str = "WATCHED_PEERS";
pub const FIRST_PACKET_MAP_NAME: &str = "FIRST_PACKETS";

/// Bytes of the ring buffer of [`FirstPacket`] records (a page: 170 records, once per peer
/// and interface; when userspace falls behind the rest are dropped, not waited for).
pub const FIRST_PACKET_RING_BYTES: u32 = 4096;

/// The first packet received from a peer on an interface: the kernel's one log record,
/// formatted and logged by userspace (target `floodclone_ebpf`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FirstPacket {
    pub peer: PeerAddr,
    pub ifindex: u32,
    /// IPv4 TTL or IPv6 hop limit: how many routers the peer is behind.
    pub ttl: u8,
    pub _pad: [u8; 3],
}

/// One direction of traffic on one interface to or from one peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LinkKey {
    pub ifindex: u32,
    /// The remote address (destination on egress, source on ingress), see [`PeerAddr`].
    pub peer: PeerAddr,
    /// [`DIR_EGRESS`] or [`DIR_INGRESS`].
    pub direction: u8,
    pub _pad: [u8; 3],
}

/// Counters for a [`LinkKey`], one copy shared by all CPUs (the kernel adds atomically).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Bytes on the wire including L2 headers, counting every segment of a GSO packet.
    pub bytes: u64,
    /// Wire packets: a GSO super-packet counts as its number of segments.
    pub packets: u64,
    /// Bytes of UDP/TCP payload (what the application moved).
    pub payload_bytes: u64,
    /// `bpf_ktime_get_ns()` of the last packet.
    pub last_ns: u64,
    /// IPv4 TTL or IPv6 hop limit of the last packet (ingress: tells how many routers the
    /// peer is behind).
    pub ttl: u8,
    pub _pad: [u8; 7],
}

/// One QUIC flow seen on one interface in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SpinKey {
    pub ifindex: u32,
    pub peer: PeerAddr,
    /// UDP ports in host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub direction: u8,
    pub _pad: [u8; 3],
    /// The packets' destination connection ID (its first [`SPIN_DCID_LEN`] bytes).
    pub dcid: [u8; SPIN_DCID_LEN],
}

/// Spin-bit edge tracking for a [`SpinKey`] (one shared copy, not per CPU). Two consecutive edges are one RTT apart when the
/// flow is not application limited (RFC 9000 section 17.4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpinState {
    /// Last spin value seen (0 or 1); 0xff before the first packet.
    pub last_spin: u8,
    /// 1 once the first edge was seen: the period it ends is partial and not sampled.
    pub first_edge_seen: u8,
    pub _pad: [u8; 2],
    /// Batches of segments (GSO or GRO) whose last segment's spin value differed from the
    /// first's. A sender that spins sets one value per batch (it changes only when a packet
    /// arrives, and a batch is built in one go); one that sends random values differs
    /// within half its batches.
    pub mixed_batches: u32,
    /// Time of the last edge.
    pub edge_ns: u64,
    /// Interval between the last two edges: the latest RTT sample.
    pub last_interval_ns: u64,
    /// Smallest interval seen.
    pub min_interval_ns: u64,
    /// Number of intervals measured.
    pub samples: u64,
    /// Smoothed interval (gain 1/8, as TCP's srtt): the RTT estimate shown.
    pub srtt_ns: u64,
    /// Short-header packets seen, each segment of a batch counted. A flow whose peer does not
    /// spin sends random spin values (RFC 9000 section 17.4): about two observations per
    /// edge, against many packets for a real spin.
    pub packets: u64,
    /// Batches of more than one segment whose first and last spin values were compared (the
    /// first [`SPIN_BATCHES_CHECKED`]).
    pub batches: u64,
}

impl SpinState {
    /// Whether the edges look like a real spin rather than random values. A peer that does
    /// not spin sets a random value per packet, and only a batch's first is tracked: an
    /// edge every two to four observations, and the last segment of half its batches
    /// differs from the first. A real spin flips once a round trip: many packets per edge
    /// at any rate worth measuring, and never within a batch. A flow with 315 packets and
    /// 87 edges (3.6 an edge) passed the old bound of 3; counting a batch as one packet, a
    /// real 5 Mbit/s flow on a 40 ms path showed 2.7-4 (a batch of up to ten segments per
    /// pacing interval), so segments are counted and batches compared. (A least interval
    /// far below the smoothed one marks random values too, but real flows of ten round
    /// trips have such intervals as well: `quic_counters_match_quinn_and_spin_rtt_matches_quinn_rtt`
    /// found none spinning with that rule.)
    pub fn is_spinning(&self) -> bool {
        self.samples >= 4
            && self.packets >= 4 * (self.samples + 1)
            && u64::from(self.mixed_batches) * 16 <= self.batches
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C) plain data with explicit padding and no pointers.
    unsafe impl aya::Pod for super::LinkKey {}
    unsafe impl aya::Pod for super::LinkCounters {}
    unsafe impl aya::Pod for super::SpinKey {}
    unsafe impl aya::Pod for super::SpinState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(packets: u64, samples: u64, min_ms: u64, srtt_ms: u64) -> SpinState {
        SpinState {
            packets,
            samples,
            min_interval_ns: min_ms * 1_000_000,
            srtt_ns: srtt_ms * 1_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn both_families_key_one_way_and_come_back() {
        use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 100, 0, 2));
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 100, 0, 2).to_ipv6_mapped());
        assert_eq!(peer_addr(peer_key(v4)), v4);
        assert_eq!(peer_addr(peer_key(v6)), v6);
        assert_eq!(peer_key(mapped), peer_key(v4));
        assert_ne!(peer_key(v4), WATCH_ALL);
    }

    #[test]
    fn a_real_spin_passes_and_random_values_do_not() {
        // A 40 ms round trip at a few hundred packets: 10 a round trip, intervals near it.
        assert!(flow(300, 25, 40, 44).is_spinning());
        // Random values per packet: an edge every other packet.
        assert!(!flow(300, 150, 1, 3).is_spinning());
        // Random values per batch: the flow that once passed (3.6 packets an edge, least
        // interval 2.7 ms against 23 ms smoothed).
        assert!(!flow(315, 87, 3, 23).is_spinning());
        // A short real flow: ten round trips, one interval read short.
        assert!(flow(1760, 10, 5, 22).is_spinning());
        // Too few samples to tell.
        assert!(!flow(100, 3, 40, 40).is_spinning());
        // Random values in batches of ten: many segments per edge, but the batches differ
        // within themselves.
        let batched_random = SpinState {
            batches: 30,
            mixed_batches: 14,
            ..flow(300, 14, 2, 10)
        };
        assert!(!batched_random.is_spinning());
        // A real spin in batches: none differ.
        let batched_real = SpinState {
            batches: 30,
            ..flow(300, 5, 40, 41)
        };
        assert!(batched_real.is_spinning());
    }
}
