//! The nodes a path crosses, as traceroute finds them: UDP probes with rising TTLs to a
//! closed port, and the ICMP errors they raise (time exceeded from each forwarding node,
//! port unreachable from the target) read from the socket's error queue (`IP_RECVERR`,
//! `IPV6_RECVERR` for IPv6 targets: no privilege, no raw socket). A route lookup shows the first hop only; the overlay
//! needs to know whether the rest crosses another member (`overlay::PathChecks`).

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use floodclone_sched::{overlay::Traced, MemberId};

use crate::wire::{Member, Msg};

/// The traceroute port: nothing listens there, so the target answers "port unreachable".
const PROBE_PORT: u16 = 33434;

/// Longest path traced.
pub const MAX_HOPS: u8 = 16;

/// How long a trace waits for answers. Routers answer within a round trip; one that
/// stays silent (ICMP rate-limited or filtered) leaves its hop unknown.
pub const TRACE_WAIT: Duration = Duration::from_millis(600);

/// What a trace found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    /// The address each forwarding node answered from, by hop (None: no answer).
    pub hops: Vec<Option<IpAddr>>,
    /// Whether the target answered (then `hops` lists every node before it).
    pub reached: bool,
}

impl Trace {
    /// Whether the path crosses a node `is_member` picks: no when the target answered and
    /// every hop before it did, from an address no member owns; yes when one answered from
    /// a member's address; unknown otherwise (a silent hop may be anything).
    pub fn verdict(&self, is_member: impl Fn(IpAddr) -> bool) -> Traced {
        if self.hops.iter().flatten().any(|&a| is_member(a)) {
            Traced::Crosses
        } else if self.reached && self.hops.iter().all(Option::is_some) {
            Traced::Clean
        } else {
            Traced::Unknown
        }
    }
}

/// Traces the path to each of `targets` among `members`, one after another (routers
/// rate-limit their answers to us, so traces in parallel would starve each other), and
/// answers the source: which paths cross no other member, which cross one, and which are
/// unknown (a silent hop and no member, or a failed trace: the source asks again later).
pub async fn check_paths(targets: Vec<MemberId>, members: Vec<Member>) -> Msg {
    let work = move || {
        let member_addrs: HashSet<IpAddr> = members
            .iter()
            .flat_map(|m| std::iter::once(m.addr).chain(m.local_addrs.iter().copied()))
            .collect();
        let (mut clean, mut crossed, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
        for t in targets {
            let Some(target) = members.iter().find(|m| m.id == t) else {
                continue;
            };
            let found = trace(target.addr, TRACE_WAIT);
            tracing::debug!(member = t, ?found, "path traced");
            let verdict = found.map_or(Traced::Unknown, |tr| {
                tr.verdict(|a| member_addrs.contains(&a))
            });
            match verdict {
                Traced::Clean => clean.push(t),
                Traced::Crosses => crossed.push(t),
                Traced::Unknown => unknown.push(t),
            }
        }
        Msg::PathsTraced {
            clean,
            crossed,
            unknown,
        }
    };
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or(Msg::PathsTraced {
            clean: Vec::new(),
            crossed: Vec::new(),
            unknown: Vec::new(),
        })
}

/// Traces the path to `target` (blocking, up to `wait`).
pub fn trace(target: IpAddr, wait: Duration) -> io::Result<Trace> {
    let target = target.to_canonical();
    let v6 = target.is_ipv6();
    let sock = if v6 {
        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?
    } else {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?
    };
    sock.set_nonblocking(true)?;
    let fd = sock.as_raw_fd();
    let (level, recverr, hops_option) = if v6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVERR,
            libc::IPV6_UNICAST_HOPS,
        )
    } else {
        (libc::IPPROTO_IP, libc::IP_RECVERR, libc::IP_TTL)
    };
    crate::transport::set_int_option(fd, level, recverr, 1)?;
    for ttl in 1..=MAX_HOPS {
        crate::transport::set_int_option(fd, level, hops_option, ttl.into())?;
        // The payload names the probe: ICMP errors quote it back.
        let to = SocketAddr::new(target, PROBE_PORT);
        // A send reports (and clears) the error an earlier probe's answer left pending, and
        // sends nothing; answers may land between resends, so a few tries.
        let mut sent = sock.send_to(&[ttl], to);
        for _ in 0..3 {
            if sent.is_ok() {
                break;
            }
            sent = sock.send_to(&[ttl], to);
        }
        sent?;
    }
    let mut hops: Vec<Option<IpAddr>> = vec![None; MAX_HOPS as usize];
    let mut reached_at: Option<u8> = None;
    let deadline = Instant::now() + wait;
    loop {
        while let Some((ttl, origin)) = read_error(fd)? {
            match origin {
                Answer::Forwarded(addr) => hops[ttl as usize - 1] = Some(addr),
                Answer::Reached => reached_at = Some(reached_at.map_or(ttl, |r| r.min(ttl))),
            }
        }
        let done = reached_at.is_some_and(|r| hops[..r as usize - 1].iter().all(Option::is_some));
        let left = deadline.saturating_duration_since(Instant::now());
        if done || left.is_zero() {
            break;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd; POLLERR is reported whatever `events` asks.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
    }
    Ok(match reached_at {
        Some(r) => Trace {
            hops: hops[..r as usize - 1].to_vec(),
            reached: true,
        },
        None => Trace {
            hops,
            reached: false,
        },
    })
}

/// What one ICMP error said about a probe.
enum Answer {
    /// A node forwarding toward the target dropped it (time exceeded), from this address.
    Forwarded(IpAddr),
    /// The target answered (port unreachable).
    Reached,
}

/// What an ICMP or ICMPv6 error of `ee_type`/`ee_code` from `from` says, if anything.
fn answer(v6: bool, ee_type: u8, ee_code: u8, from: IpAddr) -> Option<Answer> {
    // (time exceeded, destination unreachable, port unreachable) of ICMP and ICMPv6.
    let (time_exceeded, unreachable, port_unreachable) = if v6 { (3, 1, 4) } else { (11, 3, 3) };
    if ee_type == time_exceeded {
        Some(Answer::Forwarded(from))
    } else if (ee_type, ee_code) == (unreachable, port_unreachable) {
        Some(Answer::Reached)
    } else {
        // A router that cannot forward: the hop stays unknown.
        None
    }
}

/// One entry of the socket's error queue: the probe's TTL and what answered; None when
/// the queue is empty.
fn read_error(fd: libc::c_int) -> io::Result<Option<(u8, Answer)>> {
    loop {
        let mut payload = [0u8; 64];
        let mut control = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        // SAFETY: zeroed msghdr is valid; the buffers outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: msg points at live buffers of the sizes given.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
        let Some(&ttl) = payload[..n as usize].first() else {
            continue;
        };
        if !(1..=MAX_HOPS).contains(&ttl) {
            continue;
        }
        // SAFETY: walking the control messages the kernel wrote into `control`.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            let c = unsafe { &*cmsg };
            let v4 = c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_RECVERR;
            let v6 = c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_RECVERR;
            if v4 || v6 {
                // SAFETY: an IP(V6)_RECVERR message holds a sock_extended_err, then the
                // offender's address (sockaddr_in or sockaddr_in6 by the origin).
                let ee = unsafe { &*(libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err) };
                let offender = unsafe { libc::SO_EE_OFFENDER(ee) };
                let from = match ee.ee_origin {
                    libc::SO_EE_ORIGIN_ICMP => {
                        let sa = unsafe { &*(offender as *const libc::sockaddr_in) };
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))))
                    }
                    libc::SO_EE_ORIGIN_ICMP6 => {
                        let sa = unsafe { &*(offender as *const libc::sockaddr_in6) };
                        Some(IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)).to_canonical())
                    }
                    _ => None,
                };
                let six = ee.ee_origin == libc::SO_EE_ORIGIN_ICMP6;
                if let Some(a) = from.and_then(|f| answer(six, ee.ee_type, ee.ee_code, f)) {
                    return Ok(Some((ttl, a)));
                }
            }
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_target_is_reached_with_no_hop_between_in_either_family() {
        for target in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            if target.is_ipv6() && UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_err() {
                eprintln!("skipping ::1: this host has IPv6 off");
                continue;
            }
            let t = trace(target, TRACE_WAIT).unwrap();
            assert_eq!(
                t,
                Trace {
                    hops: vec![],
                    reached: true
                },
                "{target}"
            );
            assert_eq!(t.verdict(|_| true), Traced::Clean);
        }
    }

    #[test]
    fn a_member_hop_crosses_and_a_silent_one_is_unknown() {
        let member: IpAddr = [10, 0, 0, 2].into();
        let other: IpAddr = [10, 0, 0, 9].into();
        let is_member = |a| a == member;
        let via = |hops: Vec<Option<IpAddr>>| Trace {
            hops,
            reached: true,
        };
        assert_eq!(via(vec![Some(other)]).verdict(is_member), Traced::Clean);
        assert_eq!(via(vec![Some(member)]).verdict(is_member), Traced::Crosses);
        assert_eq!(
            via(vec![None, Some(member)]).verdict(is_member),
            Traced::Crosses
        );
        assert_eq!(
            via(vec![None, Some(other)]).verdict(is_member),
            Traced::Unknown
        );
        assert_eq!(Trace::default().verdict(is_member), Traced::Unknown);
    }
}
