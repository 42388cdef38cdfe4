//! The nodes a path crosses, as traceroute finds them: UDP probes with rising TTLs to a
//! closed port, and the ICMP errors they raise (time exceeded from each forwarding node,
//! port unreachable from the target) read from the socket's error queue (`IP_RECVERR`:
//! no privilege, no raw socket). A route lookup shows the first hop only; the overlay
//! needs to know whether the rest crosses another member (`overlay::PathChecks`).

use std::{
    collections::HashSet,
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use floodclone_sched::MemberId;

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
    pub hops: Vec<Option<Ipv4Addr>>,
    /// Whether the target answered (then `hops` lists every node before it).
    pub reached: bool,
}

impl Trace {
    /// Whether the path is known to cross none of the nodes `is_member` picks: the target
    /// answered and every hop before it did, from an address no member owns.
    pub fn crosses_none(&self, is_member: impl Fn(Ipv4Addr) -> bool) -> bool {
        self.reached && self.hops.iter().all(|h| h.is_some_and(|a| !is_member(a)))
    }
}

/// Traces the path to each of `targets` among `members`, one after another (routers
/// rate-limit their answers to us, so traces in parallel would starve each other), and
/// answers the source: which paths cross no other member. A failed trace counts as
/// crossing one (the overlay then stays as the routes show it).
pub async fn check_paths(targets: Vec<MemberId>, members: Vec<Member>) -> Msg {
    let work = move || {
        let member_addrs: HashSet<Ipv4Addr> = members
            .iter()
            .flat_map(|m| std::iter::once(m.addr).chain(m.local_addrs.iter().copied()))
            .collect();
        let (mut clean, mut crossed) = (Vec::new(), Vec::new());
        for t in targets {
            let Some(target) = members.iter().find(|m| m.id == t) else {
                continue;
            };
            let found = trace(target.addr, TRACE_WAIT);
            tracing::debug!(member = t, ?found, "path traced");
            match found {
                Ok(tr) if tr.crosses_none(|a| member_addrs.contains(&a)) => clean.push(t),
                _ => crossed.push(t),
            }
        }
        Msg::PathsTraced { clean, crossed }
    };
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or(Msg::PathsTraced {
            clean: Vec::new(),
            crossed: Vec::new(),
        })
}

/// Traces the path to `target` (blocking, up to `wait`).
pub fn trace(target: Ipv4Addr, wait: Duration) -> io::Result<Trace> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    sock.set_nonblocking(true)?;
    let fd = sock.as_raw_fd();
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    for ttl in 1..=MAX_HOPS {
        sock.set_ttl(ttl.into())?;
        // The payload names the probe: ICMP errors quote it back.
        let to = SocketAddrV4::new(target, PROBE_PORT);
        if sock.send_to(&[ttl], to).is_err() {
            // A pending error from an earlier probe's answer is reported once; resend.
            sock.send_to(&[ttl], to)?;
        }
    }
    let mut hops: Vec<Option<Ipv4Addr>> = vec![None; MAX_HOPS as usize];
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
    Forwarded(Ipv4Addr),
    /// The target answered (port unreachable).
    Reached,
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
            if c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_RECVERR {
                // SAFETY: an IP_RECVERR message holds a sock_extended_err, then the
                // offender's address.
                let ee = unsafe { &*(libc::CMSG_DATA(cmsg) as *const libc::sock_extended_err) };
                if ee.ee_origin == libc::SO_EE_ORIGIN_ICMP {
                    let sa = unsafe { &*(libc::SO_EE_OFFENDER(ee) as *const libc::sockaddr_in) };
                    let from = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
                    const TIME_EXCEEDED: u8 = 11;
                    const UNREACHABLE: u8 = 3;
                    const PORT_UNREACHABLE: u8 = 3;
                    match (ee.ee_type, ee.ee_code) {
                        (TIME_EXCEEDED, _) => return Ok(Some((ttl, Answer::Forwarded(from)))),
                        (UNREACHABLE, PORT_UNREACHABLE) => return Ok(Some((ttl, Answer::Reached))),
                        // A router that cannot forward: the hop stays unknown.
                        _ => {}
                    }
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
    fn a_local_target_is_reached_with_no_hop_between() {
        let t = trace(Ipv4Addr::LOCALHOST, TRACE_WAIT).unwrap();
        assert_eq!(
            t,
            Trace {
                hops: vec![],
                reached: true
            }
        );
        assert!(t.crosses_none(|_| true));
    }

    #[test]
    fn an_unknown_or_member_hop_is_not_clean() {
        let member: Ipv4Addr = [10, 0, 0, 2].into();
        let is_member = |a| a == member;
        let via = |hops: Vec<Option<Ipv4Addr>>| Trace {
            hops,
            reached: true,
        };
        assert!(via(vec![Some([10, 0, 0, 9].into())]).crosses_none(is_member));
        assert!(!via(vec![Some(member)]).crosses_none(is_member));
        assert!(!via(vec![None]).crosses_none(is_member));
        assert!(!Trace::default().crosses_none(is_member));
    }
}
