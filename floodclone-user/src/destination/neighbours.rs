//! Who a destination pulls from: the kernel's routes to every member, the data neighbours
//! they give, dials to them, and connections coming and going (a vanished neighbour is
//! routed around, the source is dialed again).

use std::{net::SocketAddr, time::Instant};

use floodclone_sched::{MemberId, SOURCE};

use super::Destination;
use crate::{
    conn::{ConnHandle, ConnKey},
    discovery,
    events::{Event, Route},
    node::{Node, NodeError, Step},
    transport::{TransportError, CLOSE_DONE},
    wire::{Member, Msg},
};

impl Destination {
    /// Route lookups for every joined member, the view sent to the source, and the data
    /// neighbours updated (new ones dialed, ones now behind another member dropped).
    pub(super) async fn rediscover(&mut self, node: &mut Node) -> Result<(), NodeError> {
        let joined: Vec<Member> = self.members.iter().filter(|m| m.joined).cloned().collect();
        node.watch(
            joined
                .iter()
                .flat_map(|m| m.local_addrs.iter().copied().chain([m.addr])),
        );
        let lookups = self.routes.lookups(&joined, self.me).await?;
        self.ask_gateways(node, &lookups);
        let mut views = discovery::classify(&self.members, &lookups);
        self.ingress = views.iter().map(|v| (v.member, v.ifindex)).collect();
        discovery::route_around(&mut views, |m| self.dead.contains(&m));
        if let Some(c) = node.conns.dialed_to(SOURCE) {
            c.send(Msg::View {
                routes: views.clone(),
            });
        }
        let mut next = if self.relay {
            discovery::data_neighbours(self.me, &views, &self.sender_paths)
        } else {
            vec![SOURCE]
        };
        next.retain(|n| !self.banned.contains(n));
        if self.source_as_last_resort && !next.contains(&SOURCE) {
            next.push(SOURCE);
        }
        for &gone in self.neighbours.iter().filter(|n| !next.contains(n)) {
            if let Some(pl) = self.puller.as_mut() {
                pl.remove_peer(gone);
            }
            if gone != SOURCE {
                if let Some(c) = node.conns.dialed_to(gone) {
                    c.close(CLOSE_DONE, b"not a neighbour");
                }
            }
        }
        // Fresh counters for the hops of neighbours whose connections are already up.
        node.read_link_counters();
        let added: Vec<MemberId> = next
            .iter()
            .copied()
            .filter(|n| !self.neighbours.contains(n))
            .collect();
        for new in added {
            if node.conns.dialed_to(new).is_some() {
                if let Some(pl) = self.puller.as_mut() {
                    pl.add_peer(new, new == SOURCE);
                }
                self.tell_path(node, new);
            } else if new != SOURCE {
                self.dial_member(node, new);
            }
        }
        self.neighbours = next;
        let neighbours = &self.neighbours;
        node.out.event(
            &Event::Neighbours {
                member: self.me,
                ids: neighbours.clone(),
                routes: views.iter().map(Route::from).collect(),
            },
            || {
                let names: Vec<String> = neighbours
                    .iter()
                    .map(|&id| super::member_name(&self.members, id))
                    .collect();
                match names.is_empty() {
                    true => "no data neighbours yet".into(),
                    false => format!("pulling from {}", names.join(", ")),
                }
            },
        );
        Ok(())
    }

    /// Dials member `id` to pull from it, unless already dialing it.
    pub(super) fn dial_member(&mut self, node: &Node, id: MemberId) {
        if let Some(m) = self.members.iter().find(|m| m.id == id) {
            if self.dialing.insert(id) {
                node.dial(
                    SocketAddr::new(m.addr, m.port),
                    id,
                    vec![Msg::Hello { id: self.me }],
                    None,
                );
            }
        }
    }

    /// A connection is up: it hears what we hold; one we dialed to a neighbour joins the
    /// scheduler.
    pub(super) fn on_up(&mut self, node: &mut Node, handle: ConnHandle) {
        let (dialed, peer) = (handle.dialed, handle.peer);
        if let Some(p) = peer.filter(|_| dialed) {
            self.dialing.remove(&p);
            // A member we had given up for dead is back: route through it again.
            self.rediscover_needed |= self.dead.remove(&p);
        }
        if let Some(store) = node.ctx.store.get() {
            handle.send(Msg::Bitfield {
                bits: store.have().to_bytes(),
            });
        }
        if let Some(hops) = self.source_hops {
            handle.send(Msg::SourceDistance { hops });
        }
        self.ask_for_hashes(node, &handle);
        if dialed && peer == Some(SOURCE) {
            self.source_lost_at = None;
            // A restarted source must hear again that we are done.
            if let Some(elapsed) = self.complete {
                handle.send(Msg::Done {
                    elapsed_ms: (elapsed * 1000.0) as u64,
                });
            }
        }
        node.conns.insert(handle);
        if let (true, Some(p)) = (dialed, peer) {
            if let Some(pl) = self
                .puller
                .as_mut()
                .filter(|_| self.neighbours.contains(&p))
            {
                pl.add_peer(p, p == SOURCE);
                // The handshake's packets already tell the hops: the scheduler needs them
                // from its first requests on (which member of a group fetches a chunk from
                // afar), not one tick later.
                node.read_link_counters();
                self.tell_path(node, p);
            }
        }
    }

    /// Tells the scheduler what the kernel shows of the path to neighbour `p`: its receive
    /// rate (windowed max), router hops and the link its data arrives on.
    pub(super) fn tell_path(&mut self, node: &Node, p: MemberId) {
        let (Some(pl), Some(m)) = (
            self.puller.as_mut(),
            self.members.iter().find(|m| m.id == p),
        ) else {
            return;
        };
        let (_, max_bps) = node.meters.rx_from(m.addr);
        if max_bps > 0.0 {
            pl.peer_measured_rate(p, max_bps);
        }
        if let Some(hops) = node.meters.hops_to(m.addr) {
            pl.peer_distance(p, hops);
        }
        pl.peer_route_avoids_source(p, self.sender_paths.avoiding_source.contains(&p));
        // The least round trip seen: propagation, without the queueing that a deeper
        // pipeline would itself add (`queue_target_s` covers that). The kernel's, measured
        // on the packets as they leave and arrive, once a connection to `p` spins; until
        // then (or where no connection to `p` spins: a connection spins only if both its
        // ends do, 49 in 64 under quinn's 7 in 8 per end) quinn's. A kernel figure
        // far below quinn's least is not a round trip (see `MIN_SPIN_SHARE_OF_QUIC_RTT`;
        // wan-mesh: 24 ms on a 120 ms path), and it would cut the pipeline to a fifth.
        let kernel_rtt = node.meters.spin_min_rtt_to(m.addr);
        let quic_rtt = node
            .conns
            .dialed_to(p)
            .map(|c| c.conn.min_rtt().as_secs_f64());
        let rtt = match (kernel_rtt, quic_rtt) {
            (Some(k), Some(q)) if k < crate::meter::MIN_SPIN_SHARE_OF_QUIC_RTT * q => Some(q),
            (k, q) => k.or(q),
        };
        if let Some(rtt) = rtt {
            tracing::trace!(target: "floodclone::rtt", peer = p, rtt_ms = rtt * 1e3,
                kernel_ms = kernel_rtt.map(|k| k * 1e3), "least round trip");
            pl.peer_rtt(p, rtt);
        }
        if let Some(ifindex) = node
            .meters
            .ingress_of(m.addr, self.ingress.get(&p).copied())
        {
            pl.peer_ingress(p, ifindex);
        }
    }

    /// A connection closed. The source is dialed again at once; a neighbour that vanished
    /// (timed out, reset) is routed around and dialed again.
    ///
    /// A neighbour has two connections with us, one each way, and a timed-out one is not
    /// enough to call it gone: a connection whose sender sits in a queue our other flows
    /// keep full can hear nothing for the idle timeout (traced: 19% of its packets lost, a
    /// window of 4 packets, silent for 10 s) while its peer lives. So a neighbour is taken
    /// for gone (and the members behind it routed around) once neither connection is left;
    /// while its own connection to us is up, ours to it is only dialed again.
    pub(super) async fn on_gone(&mut self, node: &mut Node, key: ConnKey, reason: &str) {
        let Some(gone) = node.conns.remove(key) else {
            return;
        };
        tracing::debug!(peer = ?gone.peer, %reason, "connection closed");
        let timed_out = reason.contains("timed out");
        let vanished = timed_out || reason.contains("reset");
        if !gone.dialed {
            // Its own connection to us: gone too, after ours to it.
            if let Some(p) = gone.peer.filter(|&p| {
                vanished
                    && p != SOURCE
                    && self.neighbours.contains(&p)
                    && !self.banned.contains(&p)
                    && node.conns.dialed_to(p).is_none()
                    && !self.dead.contains(&p)
            }) {
                self.route_around(p);
            }
            return;
        }
        let Some(p) = gone.peer else {
            return;
        };
        if node.conns.dialed_to(p).is_none() {
            if let Some(pl) = self.puller.as_mut() {
                pl.forget_peer(p);
            }
        }
        if p == SOURCE {
            if self.complete.is_none() {
                // Rare and costly (a new join, a new Welcome): worth a line in any log.
                tracing::info!(%reason, "the connection to the source closed; dialing it again");
            }
            self.source_lost_at = Some(Instant::now());
            // `me` is still JOINING if the source never welcomed us.
            let hello = self.join_hello(self.routes.local_addrs().await.unwrap_or_default());
            node.dial(self.cfg.source, SOURCE, hello, None);
        } else if self.neighbours.contains(&p) && !self.banned.contains(&p) {
            // A reset says its process lost the connection (restarted): gone all the same.
            if timed_out && node.conns.accepted_from(p).is_some() {
                tracing::warn!(
                    %reason,
                    "the connection to neighbour {} went silent while its own to us is up; dialing it again",
                    super::member_name(&self.members, p)
                );
            } else if vanished {
                self.route_around(p);
            }
            self.dial_member(node, p);
        }
    }

    /// Neighbour `p` is taken for gone: the members behind it are routed around until a
    /// connection to it is up again.
    fn route_around(&mut self, p: MemberId) {
        tracing::warn!(
            "neighbour {} vanished; routing around it",
            super::member_name(&self.members, p)
        );
        self.dead.insert(p);
        self.rediscover_needed = true;
    }

    pub(super) fn on_dial_failed(&mut self, peer: MemberId, error: TransportError) -> Step {
        if peer != SOURCE {
            tracing::warn!(
                "giving up on neighbour {}: {error}",
                super::member_name(&self.members, peer)
            );
            return Step::Continue;
        }
        Step::Stop(Err(match error {
            TransportError::Refused | TransportError::BadToken => error.into(),
            _ => NodeError::SourceUnreachable {
                addr: self.cfg.source,
                secs: self.cfg.connect_timeout.as_secs(),
            },
        }))
    }
}

/// The source's own entry carries no dialable address: destinations know it as `--source`.
pub(super) fn with_source_addr(mut members: Vec<Member>, source: SocketAddr) -> Vec<Member> {
    for m in &mut members {
        if m.id == SOURCE {
            m.addr = source.ip();
            m.port = source.port();
        }
    }
    members
}
