//! Link statistics measured in the kernel, on tc ingress and egress of every interface.
//!
//! Kept deliberately small: per (interface, direction, peer) wire bytes and packets (IPv4
//! and IPv6; an IPv4 peer keyed by its IPv4-mapped address), and
//! for QUIC short-header packets the spin-bit edge times per flow. Everything derived (rates,
//! windowed maxima, RTT filtering) is computed in userspace.
#![no_std]
#![no_main]
// BPF has atomic add (`lock xadd`) but no compare-and-swap, so `core::sync::atomic` offers no
// `fetch_add` for this target; the intrinsic is what lowers to the instruction. The crate is
// built with RUSTC_BOOTSTRAP already (`-Z build-std`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_PIPE},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{HashMap, LruHashMap, RingBuf},
    programs::TcContext,
};
use floodclone_common::{
    FirstPacket, LinkCounters, LinkKey, PeerAddr, SpinKey, SpinState, DIR_EGRESS, DIR_INGRESS,
    FIRST_PACKET_RING_BYTES, LINK_MAP_ENTRIES, SPIN_BATCHES_CHECKED, SPIN_DCID_LEN,
    SPIN_MAP_ENTRIES, WATCH_ALL, WATCH_MAP_ENTRIES,
};

/// One shared copy per key, added to atomically. Not per-CPU: a per-CPU LRU map allocates
/// every entry's value for every possible CPU when it is created, under a kernel-wide lock
/// (10 ms and 1.3 MB for 16,384 entries on 2 CPUs; both grow with the CPU count, to ~0.6 s
/// and ~80 MB on a 128-CPU host, by estimate), where this one costs 0.4 ms whatever the host.
#[map(name = "LINK_STATS")]
static LINK_STATS: LruHashMap<LinkKey, LinkCounters> =
    LruHashMap::with_max_entries(LINK_MAP_ENTRIES, 0);

/// Not per-CPU: edges must be compared across all packets of a flow, whichever CPU sees them.
#[map(name = "SPIN_STATS")]
static SPIN_STATS: LruHashMap<SpinKey, SpinState> =
    LruHashMap::with_max_entries(SPIN_MAP_ENTRIES, 0);

/// The peers given counters (see [`PeerAddr`]), written by userspace: a daemon lists the
/// swarm's members, so packets from anyone else (spoofed sources included) cannot create
/// entries that evict a member's counters from the LRU maps. The key [`WATCH_ALL`] gives
/// every peer counters (what `floodclone stats` on its own wants). Counters once made keep
/// counting (the list is consulted only to make them).
#[map(name = "WATCHED_PEERS")]
static WATCHED_PEERS: HashMap<PeerAddr, u8> = HashMap::with_max_entries(WATCH_MAP_ENTRIES, 0);

/// The first packet from each peer on each interface, for the daemon's log. A fixed record
/// rather than a formatted log line (aya-log, until session 46): its formatting code was
/// ~4 KB of program a call site, verified at every process start (~7 ms of CPU here).
#[map(name = "FIRST_PACKETS")]
static FIRST_PACKETS: RingBuf = RingBuf::with_byte_size(FIRST_PACKET_RING_BYTES, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// The IPv6 fixed header. Extension headers are not walked: a packet with one counts
/// toward its peer but not as UDP or TCP (neither QUIC nor TCP send them).
const IPV6_HLEN: usize = 40;
/// The IPv4 header without options.
const IPV4_HLEN: usize = 20;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const UDP_HLEN: usize = 8;
/// QUIC short header: form bit (0x80) clear; spin bit is 0x20 (RFC 9000 section 17.3.1).
const QUIC_LONG_HEADER: u8 = 0x80;
const QUIC_SPIN_BIT: u8 = 0x20;

#[classifier]
pub fn floodclone_egress(ctx: TcContext) -> i32 {
    let _ = account(&ctx, DIR_EGRESS);
    TC_ACT_PIPE
}

#[classifier]
pub fn floodclone_ingress(ctx: TcContext) -> i32 {
    let _ = account(&ctx, DIR_INGRESS);
    TC_ACT_PIPE
}

/// The header of `N` bytes at `offset` of the packet: read in place when it lies in the
/// skb's linear part (the headers of what a UDP or TCP socket sends, and of what a veth
/// delivers, do), else through the `bpf_skb_load_bytes` helper. A helper call per field
/// had made these programs cost ~0.9 us a packet. Whole headers, never single bytes: LLVM
/// turns `p + 1 <= end` into `p < end`, from which the verifier learns no readable range.
#[inline(always)]
fn header<const N: usize>(ctx: &TcContext, offset: usize) -> Result<[u8; N], i64> {
    let start = ctx.data();
    if start + offset + N <= ctx.data_end() {
        // SAFETY: the bounds check above (which the verifier also checks) keeps the read
        // inside the packet; `read_unaligned` as headers sit at any alignment.
        return Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) });
    }
    ctx.load(offset)
}

/// Bytes `at..at + M` of a header.
#[inline(always)]
fn field<const N: usize, const M: usize>(h: &[u8; N], at: usize) -> [u8; M] {
    let mut f = [0u8; M];
    f.copy_from_slice(&h[at..at + M]);
    f
}

/// The fields of an IP header the counters need.
struct IpHeader {
    /// TTL or hop limit.
    ttl: u8,
    protocol: u8,
    saddr: PeerAddr,
    daddr: PeerAddr,
    /// Offset of the transport header.
    l4: usize,
}

#[inline(always)]
fn ip_header(ctx: &TcContext) -> Result<Option<IpHeader>, i64> {
    let eth: [u8; ETH_HLEN] = header(ctx, 0)?;
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    if ethertype == ETH_P_IP {
        let ip: [u8; IPV4_HLEN] = header(ctx, ETH_HLEN)?;
        let ip_hlen = ((ip[0] & 0x0f) as usize) * 4;
        if ip_hlen < IPV4_HLEN {
            return Ok(None);
        }
        let mapped = |a: [u8; 4]| {
            let mut k = [0u8; 16];
            k[10] = 0xff;
            k[11] = 0xff;
            k[12..].copy_from_slice(&a);
            k
        };
        return Ok(Some(IpHeader {
            ttl: ip[8],
            protocol: ip[9],
            saddr: mapped(field(&ip, 12)),
            daddr: mapped(field(&ip, 16)),
            l4: ETH_HLEN + ip_hlen,
        }));
    }
    if ethertype == ETH_P_IPV6 {
        let ip: [u8; IPV6_HLEN] = header(ctx, ETH_HLEN)?;
        return Ok(Some(IpHeader {
            protocol: ip[6],
            ttl: ip[7],
            saddr: field(&ip, 8),
            daddr: field(&ip, 24),
            l4: ETH_HLEN + IPV6_HLEN,
        }));
    }
    Ok(None)
}

#[inline(always)]
fn account(ctx: &TcContext, direction: u8) -> Result<(), i64> {
    let Some(IpHeader {
        ttl,
        protocol,
        saddr,
        daddr,
        l4,
    }) = ip_header(ctx)?
    else {
        return Ok(());
    };
    let l4_hlen = match protocol {
        IPPROTO_UDP => UDP_HLEN,
        IPPROTO_TCP => {
            // Data offset: the high nibble of byte 12, in 32-bit words.
            let tcp: [u8; 13] = header(ctx, l4)?;
            ((tcp[12] >> 4) as usize) * 4
        }
        _ => 0,
    };
    let headers = (l4 + l4_hlen) as u64;

    // SAFETY: the context pointer is valid for the whole program run.
    let (len, gso_segs) = unsafe { ((*ctx.skb.skb).len as u64, (*ctx.skb.skb).gso_segs as u64) };
    let segs = if gso_segs > 1 { gso_segs } else { 1 };
    // A GSO super-packet carries its headers once; on the wire each segment repeats them.
    let wire_bytes = len + (segs - 1) * headers;
    let payload = wire_bytes.saturating_sub(segs * headers);
    let now = unsafe { bpf_ktime_get_ns() };

    let peer = if direction == DIR_EGRESS {
        daddr
    } else {
        saddr
    };
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let key = LinkKey {
        ifindex,
        peer,
        direction,
        _pad: [0; 3],
    };
    match LINK_STATS.get_ptr_mut(key) {
        // SAFETY: the map value outlives the program run and is 8-byte aligned.
        Some(c) => unsafe { add_to(c, wire_bytes, segs, payload, now, ttl) },
        None => {
            // Counters exist only for watched peers, so the watch list is looked up only
            // for a peer without them (once per interface and direction), not per packet.
            // SAFETY: plain lookups; the values are not held across anything.
            if unsafe {
                WATCHED_PEERS.get(&peer).is_none() && WATCHED_PEERS.get(&WATCH_ALL).is_none()
            } {
                return Ok(());
            }
            // Once per peer and interface (until the LRU evicts it): rare enough to log, and
            // it tells the daemon's log when traffic from a new peer began and how many
            // routers it is behind. Lost when the ring is full: a log line is not worth a
            // wait.
            if direction == DIR_INGRESS {
                let first = FirstPacket {
                    peer,
                    ifindex,
                    ttl,
                    _pad: [0; 3],
                };
                let _ = FIRST_PACKETS.output::<FirstPacket>(&first, 0);
            }
            let c = LinkCounters {
                bytes: wire_bytes,
                packets: segs,
                payload_bytes: payload,
                last_ns: now,
                ttl,
                _pad: [0; 7],
            };
            // Not over counters another CPU made for the same key in the meantime: add
            // to those instead.
            if LINK_STATS.insert(key, c, BPF_NOEXIST as u64).is_err() {
                if let Some(c) = LINK_STATS.get_ptr_mut(key) {
                    // SAFETY: as above.
                    unsafe { add_to(c, wire_bytes, segs, payload, now, ttl) };
                }
            }
        }
    }

    if protocol == IPPROTO_UDP {
        track_spin(ctx, l4, segs, ifindex, peer, direction, now)?;
    }
    Ok(())
}

/// Adds one packet (or GSO batch) to counters other CPUs may be adding to at the same time.
///
/// # Safety
/// `c` points to a live, 8-byte aligned map value.
#[inline(always)]
unsafe fn add_to(
    c: *mut LinkCounters,
    wire_bytes: u64,
    segs: u64,
    payload: u64,
    now: u64,
    ttl: u8,
) {
    use core::intrinsics::{atomic_xadd, AtomicOrdering::Relaxed};
    atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*c).bytes, wire_bytes);
    atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*c).packets, segs);
    atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*c).payload_bytes, payload);
    // Last writer wins: either CPU's time is a time of a recent packet.
    (*c).last_ns = now;
    (*c).ttl = ttl;
}

/// Records spin-bit edges of a QUIC short-header flow. Edges are taken from the first packet
/// of a GSO (or GRO) batch; a sender that spins gives every segment of a batch the same
/// value, so the last segment's is compared with it to tell one that sends random values.
///
/// A flow is one connection's packets in one direction: the 4-tuple is not enough, since the
/// two connections between a pair of daemons (each dials the other from its one endpoint)
/// share it, and one that does not spin (1 in 4: quinn leaves 1 in 8 per end without, and
/// a server reflects a client's random values) would
/// scramble the other's edges. The destination connection ID tells them apart.
#[inline(always)]
fn track_spin(
    ctx: &TcContext,
    l4: usize,
    segs: u64,
    ifindex: u32,
    peer: PeerAddr,
    direction: u8,
    now: u64,
) -> Result<(), i64> {
    // The UDP header, the QUIC header's first byte and the connection ID it starts with.
    let udp: [u8; UDP_HLEN + 1 + SPIN_DCID_LEN] = header(ctx, l4)?;
    let first = udp[UDP_HLEN];
    if first & QUIC_LONG_HEADER != 0 {
        return Ok(());
    }
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    let (local_port, remote_port) = if direction == DIR_EGRESS {
        (sport, dport)
    } else {
        (dport, sport)
    };
    let spin = u8::from(first & QUIC_SPIN_BIT != 0);
    let dcid: [u8; SPIN_DCID_LEN] = field(&udp, UDP_HLEN + 1);
    let key = SpinKey {
        ifindex,
        peer,
        local_port,
        remote_port,
        direction,
        _pad: [0; 3],
        dcid,
    };
    match SPIN_STATS.get_ptr_mut(key) {
        Some(s) => unsafe {
            (*s).packets += segs;
            // A flow's first batches tell whether its sender spins (it does not change its
            // mind); reading past the linear part costs a helper call, so no more.
            if (*s).batches < SPIN_BATCHES_CHECKED {
                if let Some(mixed) = batch_mixed(ctx, l4, segs, spin) {
                    (*s).batches += 1;
                    (*s).mixed_batches += u32::from(mixed);
                }
            }
            if (*s).last_spin != spin {
                let interval = now - (*s).edge_ns;
                // A flip far sooner than a round trip is reordering (an older packet with
                // the previous value), not an edge: keep the last real edge as reference,
                // so it neither shortens this sample nor the next one.
                let spurious = (*s).srtt_ns != 0 && interval < (*s).srtt_ns / 8;
                // The first edge after the flow appears ends a partial period: it only
                // starts the clock.
                if (*s).edge_ns != 0 && (*s).first_edge_seen != 0 && !spurious {
                    (*s).last_interval_ns = interval;
                    if (*s).min_interval_ns == 0 || interval < (*s).min_interval_ns {
                        (*s).min_interval_ns = interval;
                    }
                    (*s).samples += 1;
                    (*s).srtt_ns = if (*s).srtt_ns == 0 {
                        interval
                    } else {
                        (*s).srtt_ns - (*s).srtt_ns / 8 + interval / 8
                    };
                }
                if !spurious {
                    if (*s).edge_ns != 0 {
                        (*s).first_edge_seen = 1;
                    }
                    (*s).edge_ns = now;
                }
                (*s).last_spin = spin;
            }
        },
        None => {
            let mixed = batch_mixed(ctx, l4, segs, spin);
            let s = SpinState {
                last_spin: spin,
                packets: segs,
                batches: u64::from(mixed.is_some()),
                mixed_batches: u32::from(mixed == Some(true)),
                ..SpinState::default()
            };
            SPIN_STATS.insert(key, s, 0)?;
        }
    }
    Ok(())
}

/// Whether the last segment of a batch of `segs` carries another spin value than its first
/// (`spin`); None for a single packet, or when the last cannot be read or is not a short
/// header. All segments but the last are `gso_size` long.
#[inline(always)]
fn batch_mixed(ctx: &TcContext, l4: usize, segs: u64, spin: u8) -> Option<bool> {
    if segs < 2 {
        return None;
    }
    // SAFETY: the context pointer is valid for the whole program run.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size } as usize;
    match ctx.load::<u8>(l4 + UDP_HLEN + (segs as usize - 1) * gso_size) {
        Ok(b) if b & QUIC_LONG_HEADER == 0 => Some(u8::from(b & QUIC_SPIN_BIT != 0) != spin),
        _ => None,
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
