//! Addresses a member claims as its own, believed only once checked. Others act on these
//! claims: a Join from an unexpected address is matched to a member by the addresses it
//! claims, and a destination whose gateway is a member's address takes whatever lies
//! beyond it as "behind that member", pulled only through it. A token holder could claim
//! another member's address before that member joins (take its id, report its copy done),
//! or the LAN's router (everyone behind it then pulls only from the claimer, which
//! withholds).
//!
//! Two checks, each by whoever relies on the claim, by dialing the claimed address once:
//! - [`JoinProofs`], at the source: a Join matched by a claimed `--dest` address. The
//!   source sends a random nonce to that address; whoever answers sends it back on its own
//!   connection to the source, which must be the joining one. The member's id waits.
//! - [`GatewayChecks`], at a destination: a gateway its routes show at an address a member
//!   claims (a member's link addresses are often routed nowhere but on that link, so only
//!   its neighbours can reach them). It asks whoever answers there who it is. A router does
//!   not answer QUIC, another member names itself. A claim counts meanwhile (so an honest
//!   swarm's start is what it was) and is dropped when refuted; a claim the check cannot
//!   refute comes from the host at that address, which carries the traffic anyway.
//!
//! Pure bookkeeping, unit-tested here; the roles dial and send.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use floodclone_sched::{MemberId, SOURCE};

use crate::{conn::ConnKey, wire::Member};

/// How long a check may take: one QUIC handshake and token exchange (about 3 round trips)
/// and one message, which quinn retransmits on its own when a packet is lost (first after
/// ~1 s). 5 s covers several losses on a 400 ms path; it is also how long a false claim can
/// steer its neighbours.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Most addresses one member may list as its own (a host with one address per link has a
/// handful); the source lists no more, so a claimer cannot make others dial without bound.
pub const MAX_CLAIMED_ADDRS: usize = 16;

pub type Nonce = [u8; 16];

/// A Join on connection `key` that claims member `member`'s `--dest` address `addr`
/// without coming from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedJoin {
    pub member: MemberId,
    pub addr: IpAddr,
    pub key: ConnKey,
    pub port: u16,
    pub addrs: Vec<IpAddr>,
}

/// The source's Joins waiting for their proof, by nonce.
#[derive(Default)]
pub struct JoinProofs {
    pending: HashMap<Nonce, (ClaimedJoin, Instant)>,
}

impl JoinProofs {
    /// Starts proving `join` with `nonce` (random: the caller sends it to `join.addr`).
    /// False if a Join for that member is being proven already.
    pub fn start(&mut self, join: ClaimedJoin, nonce: Nonce, now: Instant) -> bool {
        if self.pending.values().any(|(j, _)| j.member == join.member) {
            return false;
        }
        self.pending.insert(nonce, (join, now + CHECK_TIMEOUT));
        true
    }

    /// A nonce came back on connection `key`: the Join, and whether that is the joining
    /// connection. `None` for a nonce that is not pending (stale or forged: ignored).
    pub fn on_proof(&mut self, nonce: &Nonce, key: ConnKey) -> Option<(ClaimedJoin, bool)> {
        let (join, _) = self.pending.remove(nonce)?;
        let proven = join.key == key;
        Some((join, proven))
    }

    /// Joins not proven by `now`.
    pub fn expired(&mut self, now: Instant) -> Vec<ClaimedJoin> {
        let (late, pending): (HashMap<_, _>, _) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(_, (_, expires))| *expires <= now);
        self.pending = pending;
        late.into_values().map(|(j, _)| j).collect()
    }
}

/// How many times a gateway is asked (each a fresh dial, [`CHECK_TIMEOUT`] apart) before
/// silence makes it nobody's. A claimant behind a full link may not answer within one
/// timeout: its handshake queues behind the data it sends us and is lost twice (random-25:
/// the 5 Mbit/s d2->d1, refused at 5.2 s), and a claim refused wrongly turns the view
/// around (the source and every member behind the claimant become overlay neighbours
/// through a "router"). A router never answers: three silences, 15 s, make it one; a
/// false claim steers its neighbours as long.
pub const GATEWAY_ASKS: u32 = 3;

/// What was found at a gateway address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Found {
    /// Asked (`asks` times so far) at the claimant's `port`, no answer yet (until the
    /// instant given).
    Asking {
        until: Instant,
        asks: u32,
        port: u16,
    },
    /// This member answered there; `None`: nothing did.
    Member(Option<MemberId>),
}

/// A destination's checks of the gateways its routes show at addresses members claim.
#[derive(Default)]
pub struct GatewayChecks {
    found: HashMap<IpAddr, Found>,
}

impl GatewayChecks {
    /// The gateways in `gateways` that are a member's claimed address, not its `--dest`
    /// one (the source proved that at the Join), and not asked about yet: to dial. The
    /// source's own addresses are not checked: the member list comes from it.
    pub fn to_ask(
        &mut self,
        members: &[Member],
        gateways: impl IntoIterator<Item = IpAddr>,
        now: Instant,
    ) -> Vec<(IpAddr, u16)> {
        let mut ask = Vec::new();
        for gw in gateways {
            if self.found.contains_key(&gw) || members.iter().any(|m| m.addr == gw) {
                continue;
            }
            let claimant = members
                .iter()
                .find(|m| m.id != SOURCE && m.local_addrs.contains(&gw));
            if let Some(m) = claimant {
                let (until, asks, port) = (now + CHECK_TIMEOUT, 1, m.port);
                self.found.insert(gw, Found::Asking { until, asks, port });
                ask.push((gw, m.port));
            }
        }
        ask
    }

    /// `member` answered at `gw`. True if it settled a check (apply: [`Self::drop_refuted`]).
    pub fn on_answer(&mut self, gw: IpAddr, member: MemberId) -> bool {
        if !matches!(self.found.get(&gw), Some(Found::Asking { .. })) {
            return false;
        }
        self.found.insert(gw, Found::Member(Some(member)));
        true
    }

    /// Gateways that did not answer by `now`: asked again (returned, to dial) up to
    /// [`GATEWAY_ASKS`] times, then nobody's. True if any became nobody's (apply:
    /// [`Self::drop_refuted`]).
    pub fn expire(&mut self, now: Instant) -> (bool, Vec<(IpAddr, u16)>) {
        let (mut settled, mut again) = (false, Vec::new());
        for (&gw, found) in self.found.iter_mut() {
            let Found::Asking { until, asks, port } = *found else {
                continue;
            };
            if until > now {
                continue;
            }
            if asks < GATEWAY_ASKS {
                let (until, asks) = (now + CHECK_TIMEOUT, asks + 1);
                *found = Found::Asking { until, asks, port };
                again.push((gw, port));
            } else {
                *found = Found::Member(None);
                settled = true;
            }
        }
        (settled, again)
    }

    /// Drops from `members` every claimed address where someone else (or nothing)
    /// answered; returns what it dropped: (claimant, address, who answered there). Claims
    /// being asked about stay.
    pub fn drop_refuted(&self, members: &mut [Member]) -> Vec<Refuted> {
        let mut dropped = Vec::new();
        for m in members.iter_mut().filter(|m| m.id != SOURCE) {
            m.local_addrs.retain(|&addr| match self.found.get(&addr) {
                Some(&Found::Member(answered)) if answered != Some(m.id) => {
                    dropped.push(Refuted {
                        member: m.id,
                        addr,
                        answered,
                    });
                    false
                }
                _ => true,
            });
        }
        dropped
    }
}

/// A member's claim to an address, refuted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refuted {
    pub member: MemberId,
    pub addr: IpAddr,
    /// Who answered there instead (`None`: nothing did).
    pub answered: Option<MemberId>,
}

impl Refuted {
    /// Why, in words (the `claim_refused` event's reason).
    pub fn reason(&self) -> String {
        match self.answered {
            Some(m) => format!("member {m} answered at that address"),
            None => "nothing answered at that address".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const GW: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1));

    fn member(id: MemberId, last: u8, claims: &[IpAddr]) -> Member {
        Member {
            id,
            addr: IpAddr::V4(Ipv4Addr::new(10, 100, 0, last)),
            port: 7000 + id,
            local_addrs: claims.to_vec(),
            joined: true,
        }
    }

    #[test]
    fn a_join_is_proven_on_the_joining_connection_only() {
        let now = Instant::now();
        let mut proofs = JoinProofs::default();
        let join = |key| ClaimedJoin {
            member: 1,
            addr: GW,
            key,
            port: 7878,
            addrs: vec![GW],
        };
        assert!(proofs.start(join(4), [1; 16], now));
        // One proof per member at a time.
        assert!(!proofs.start(join(5), [2; 16], now));
        // A nonce nobody sent is ignored; the one sent, on another connection, refutes.
        assert_eq!(proofs.on_proof(&[9; 16], 4), None);
        assert_eq!(proofs.on_proof(&[1; 16], 6), Some((join(4), false)));
        assert!(proofs.start(join(4), [3; 16], now));
        assert_eq!(proofs.on_proof(&[3; 16], 4), Some((join(4), true)));
        // Silence refuses; the member may join (and be proven) again.
        assert!(proofs.start(join(7), [4; 16], now));
        assert!(proofs.expired(now + CHECK_TIMEOUT / 2).is_empty());
        assert_eq!(proofs.expired(now + CHECK_TIMEOUT), vec![join(7)]);
        assert!(proofs.start(join(8), [5; 16], now));
    }

    #[test]
    fn a_claimed_gateway_counts_until_someone_else_or_nothing_answers() {
        let now = Instant::now();
        let other = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 5));
        let source_link = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 9));
        let mut members = vec![
            member(SOURCE, 1, &[source_link]),
            member(1, 2, &[GW]),
            member(2, 3, &[other]),
        ];
        let mut checks = GatewayChecks::default();
        // The source's and a --dest address are not asked about; a claimed one is, once.
        let gateways = [source_link, members[2].addr, GW, other];
        assert_eq!(
            checks.to_ask(&members, gateways, now),
            vec![(GW, 7001), (other, 7002)]
        );
        assert!(checks.to_ask(&members, gateways, now).is_empty());
        // While asking, claims stand.
        assert!(checks.drop_refuted(&mut members).is_empty());
        assert_eq!(members[1].local_addrs, vec![GW]);
        // Member 2 answers at its own address; nothing answers at member 1's claim.
        assert!(!checks.on_answer(IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)), 2));
        assert!(checks.on_answer(other, 2));
        assert_eq!(checks.expire(now + CHECK_TIMEOUT / 2), (false, vec![]));
        // Silence: asked again, and again, then nobody's.
        let mut at = now;
        for _ in 1..GATEWAY_ASKS {
            at += CHECK_TIMEOUT;
            assert_eq!(checks.expire(at), (false, vec![(GW, 7001)]));
            assert!(checks.drop_refuted(&mut members).is_empty());
        }
        assert_eq!(checks.expire(at + CHECK_TIMEOUT), (true, vec![]));
        let refuted = Refuted {
            member: 1,
            addr: GW,
            answered: None,
        };
        assert_eq!(checks.drop_refuted(&mut members), vec![refuted]);
        assert_eq!(members[1].local_addrs, Vec::<IpAddr>::new());
        assert_eq!(members[2].local_addrs, vec![other]);
        assert_eq!(members[0].local_addrs, vec![source_link]);
        // A later answer does not revive a refuted claim.
        assert!(!checks.on_answer(GW, 1));
    }
}
