//! Who sits behind which link, from the kernel's own routing: for every member, the
//! equivalent of `ip route get ADDR` (rtnetlink RTM_GETROUTE) gives the output interface and
//! gateway. A member reached on-link, or whose own address is the gateway, is a direct
//! neighbour; one reached through another member's address is behind that member; one
//! reached through a non-member gateway is an overlay neighbour over a path it may share
//! with others behind the same gateway.
//!
//! Both families: a member's address family is its `--dest` one, and the lookup is made in
//! it. An IPv6 route whose next hop is link-local (as router advertisements make them)
//! names no member: members claim only addresses beyond their link, so such a gateway
//! reads as a router, and its members as overlay neighbours through it.

use std::{collections::HashMap, net::IpAddr};

use futures_util::TryStreamExt;
use netlink_packet_route::{
    address::AddressAttribute,
    route::{RouteAddress, RouteAttribute},
};
use rtnetlink::RouteMessageBuilder;

use floodclone_sched::{
    overlay::{self, FirstHop, Reach, SenderPaths},
    MemberId,
};

use crate::wire::{Member, RouteView};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("netlink request failed: {0}")]
    Netlink(String),
}

/// What the kernel says about the way to one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteLookup {
    pub ifindex: u32,
    pub gateway: Option<IpAddr>,
}

/// Route and address lookups in this host's kernel (a netlink handle).
#[derive(Clone)]
pub struct Routes {
    handle: rtnetlink::Handle,
}

impl Routes {
    /// Opens a netlink connection (must run inside a tokio runtime).
    pub fn open() -> Result<Self, DiscoveryError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(DiscoveryError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Every address on this host's interfaces that names it beyond one link: loopback and
    /// link-local addresses excluded.
    pub async fn local_addrs(&self) -> Result<Vec<IpAddr>, DiscoveryError> {
        let mut out = Vec::new();
        let mut stream = self.handle.address().get().execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|e| DiscoveryError::Netlink(e.to_string()))?
        {
            for attr in msg.attributes {
                if let AddressAttribute::Address(a) = attr {
                    if is_claimable(a) && !out.contains(&a) {
                        out.push(a);
                    }
                }
            }
        }
        Ok(out)
    }

    /// `ip route get addr`.
    pub async fn route_to(&self, addr: IpAddr) -> Result<Option<RouteLookup>, DiscoveryError> {
        let addr = addr.to_canonical();
        let host_prefix = if addr.is_ipv4() { 32 } else { 128 };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(addr, host_prefix)
            .map_err(|e| DiscoveryError::Netlink(e.to_string()))?
            .build();
        let mut stream = self.handle.route().get(msg).execute();
        let reply = match stream.try_next().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            // ENETUNREACH and friends: no route.
            Err(rtnetlink::Error::NetlinkError(_)) => return Ok(None),
            Err(e) => return Err(DiscoveryError::Netlink(e.to_string())),
        };
        let mut lookup = RouteLookup {
            ifindex: 0,
            gateway: None,
        };
        for attr in reply.attributes {
            match attr {
                RouteAttribute::Oif(i) => lookup.ifindex = i,
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => lookup.gateway = Some(gw.into()),
                RouteAttribute::Gateway(RouteAddress::Inet6(gw)) => {
                    lookup.gateway = Some(IpAddr::V6(gw).to_canonical())
                }
                _ => {}
            }
        }
        Ok(Some(lookup))
    }

    /// Route lookups for every member but `me`.
    pub async fn lookups(
        &self,
        members: &[Member],
        me: MemberId,
    ) -> Result<Vec<(MemberId, Option<RouteLookup>)>, DiscoveryError> {
        let mut out = Vec::new();
        for m in members.iter().filter(|m| m.id != me) {
            out.push((m.id, self.route_to(m.addr).await?));
        }
        Ok(out)
    }
}

/// Whether `addr` may be claimed as a member's own: it names one host beyond its link (not
/// loopback, not link-local, not unspecified or multicast).
pub fn is_claimable(addr: IpAddr) -> bool {
    let addr = addr.to_canonical();
    let link_local = match addr {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.is_unicast_link_local(),
    };
    !(addr.is_loopback() || addr.is_unspecified() || addr.is_multicast() || link_local)
}

/// Classifies each member from the route lookups (pure: unit-tested).
pub fn classify(members: &[Member], lookups: &[(MemberId, Option<RouteLookup>)]) -> Vec<RouteView> {
    // Each address to its member, the first listed where two claim one.
    let mut owners: HashMap<IpAddr, MemberId> = HashMap::new();
    for m in members {
        for &a in std::iter::once(&m.addr).chain(&m.local_addrs) {
            owners.entry(a).or_insert(m.id);
        }
    }
    let owner = |addr: IpAddr| owners.get(&addr).copied();
    lookups
        .iter()
        .map(|&(member, lookup)| {
            let first = match lookup {
                None => FirstHop::NoRoute,
                Some(RouteLookup { gateway: None, .. }) => FirstHop::OnLink,
                Some(RouteLookup {
                    gateway: Some(gw), ..
                }) => FirstHop::Gateway(owner(gw)),
            };
            let (reach, via_member) = overlay::reach(member, first);
            RouteView {
                member,
                reach,
                ifindex: lookup.map_or(0, |l| l.ifindex),
                gateway: lookup.and_then(|l| l.gateway),
                via_member,
            }
        })
        .collect()
}

/// `views` with every member behind one that is `gone` (its process, not its host) read as
/// reached through routers: its kernel still forwards, but it holds no copy to relay.
pub fn route_around(views: &mut [RouteView], gone: impl Fn(MemberId) -> bool) {
    for v in views {
        if v.reach == Reach::Behind && v.via_member.is_some_and(&gone) {
            v.reach = Reach::ViaRouter;
        }
    }
}

/// Members `me` exchanges data with ([`floodclone_sched::overlay::data_neighbours`]), our
/// routes corrected by what the source said of the senders' paths to us
/// ([`floodclone_sched::overlay::PathChecks`]).
pub fn data_neighbours(
    me: MemberId,
    views: &[RouteView],
    sender_paths: &SenderPaths,
) -> Vec<MemberId> {
    let reach: Vec<(MemberId, Reach)> = views.iter().map(|v| (v.member, v.reach)).collect();
    overlay::told_data_neighbours(me, reach, sender_paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: MemberId, addr: [u8; 4], links: &[[u8; 4]]) -> Member {
        Member {
            id,
            addr: addr.into(),
            port: 7878,
            local_addrs: links.iter().map(|a| (*a).into()).collect(),
            joined: true,
        }
    }

    #[test]
    fn direct_behind_and_via_router() {
        // Seen from d1 on a chain s - d1 - d2 - d3, plus d4 behind a router r.
        let members = vec![
            member(0, [10, 100, 0, 1], &[[10, 200, 0, 1]]),
            member(1, [10, 100, 0, 2], &[[10, 200, 0, 2], [10, 200, 0, 5]]),
            member(2, [10, 100, 0, 3], &[[10, 200, 0, 6], [10, 200, 0, 9]]),
            member(3, [10, 100, 0, 4], &[[10, 200, 0, 10]]),
            member(4, [10, 100, 0, 5], &[[10, 200, 0, 14]]),
        ];
        let via = |gw: [u8; 4], ifindex| {
            Some(RouteLookup {
                ifindex,
                gateway: Some(gw.into()),
            })
        };
        let lookups = vec![
            (0, via([10, 200, 0, 1], 2)),
            (2, via([10, 200, 0, 6], 3)),
            (3, via([10, 200, 0, 6], 3)),
            (4, via([10, 200, 0, 13], 4)),
            (9, None),
        ];
        let views = classify(&members, &lookups);
        let reach: Vec<_> = views
            .iter()
            .map(|v| (v.member, v.reach, v.via_member))
            .collect();
        assert_eq!(
            reach,
            vec![
                (0, Reach::Direct, None),
                (2, Reach::Direct, None),
                (3, Reach::Behind, Some(2)),
                (4, Reach::ViaRouter, None),
                (9, Reach::Unreachable, None),
            ]
        );
        let told = |clean: &[MemberId], crossing: &[MemberId]| SenderPaths {
            clean: clean.to_vec(),
            crossing: crossing.to_vec(),
            avoiding_source: vec![],
        };
        assert_eq!(data_neighbours(1, &views, &told(&[], &[])), vec![0, 2, 4]);
        assert_eq!(
            data_neighbours(1, &views, &told(&[3], &[])),
            vec![0, 2, 3, 4]
        );
        // 4's route to us starts at another destination: not pulled from.
        assert_eq!(data_neighbours(1, &views, &told(&[], &[4])), vec![0, 2]);
    }

    #[test]
    fn ipv6_gateways_name_members_and_link_local_ones_read_as_routers() {
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let members = vec![
            Member {
                id: 0,
                addr: v6("fd00:100::1"),
                port: 7878,
                local_addrs: vec![v6("fd00:200::1")],
                joined: true,
            },
            Member {
                id: 1,
                addr: v6("fd00:100::2"),
                port: 7878,
                local_addrs: vec![v6("fd00:200::2"), v6("fd00:200::5")],
                joined: true,
            },
            Member {
                id: 2,
                addr: v6("fd00:100::3"),
                port: 7878,
                local_addrs: vec![],
                joined: true,
            },
        ];
        let via = |gw: &str| {
            Some(RouteLookup {
                ifindex: 2,
                gateway: Some(v6(gw)),
            })
        };
        // Seen from member 2: the source behind member 1, member 1 through a link-local hop.
        let views = classify(&members, &[(0, via("fd00:200::5")), (1, via("fe80::1"))]);
        let reach: Vec<_> = views.iter().map(|v| (v.member, v.reach)).collect();
        assert_eq!(reach, vec![(0, Reach::Behind), (1, Reach::ViaRouter)]);
        for (addr, claimable) in [
            ("fd00:100::1", true),
            ("2001:db8::1", true),
            ("10.0.0.1", true),
            ("fe80::1", false),
            ("::1", false),
            ("127.0.0.1", false),
            ("169.254.1.1", false),
            ("::", false),
        ] {
            assert_eq!(is_claimable(v6(addr)), claimable, "{addr}");
        }
    }
}
