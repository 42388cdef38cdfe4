//! Gateways at addresses members claim, checked before they are believed for long
//! ([`crate::claims::GatewayChecks`]): we dial each once and ask who answers; a router does
//! not, another member names itself. And the other side: answering such a question.

use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use floodclone_sched::MemberId;

use super::{Destination, JOINING};
use crate::{
    claims::CHECK_TIMEOUT,
    conn::{ConnHandle, ConnKey},
    discovery::RouteLookup,
    events::Event,
    node::{self, Node},
    transport::CLOSE_DONE,
    wire::Msg,
};

/// The peer id our gateway-check connections carry: who answers is what we ask.
pub(super) const ASKING: MemberId = MemberId::MAX - 1;

/// Questions kept for answering once we are welcomed (one per connection that asked).
const MAX_ASKED_BEFORE_WELCOME: usize = 256;

impl Destination {
    /// Asks who is at every gateway of `lookups` that a member claims and nobody was asked
    /// about yet.
    pub(super) fn ask_gateways(
        &mut self,
        node: &Node,
        lookups: &[(MemberId, Option<RouteLookup>)],
    ) {
        let gateways = lookups
            .iter()
            .filter_map(|(_, l)| l.and_then(|l| l.gateway));
        let ask = self
            .gateway_checks
            .to_ask(&self.members, gateways, Instant::now());
        ask_who_is_at(node, ask);
    }

    /// A gateway-check connection is up: it waits for its answer.
    pub(super) fn on_asking_up(&mut self, handle: ConnHandle) {
        self.asking.push(handle);
    }

    /// `id` answered on connection `key`: if that is one of our checks, its verdict applies.
    pub(super) fn on_i_am(&mut self, node: &Node, key: ConnKey, id: MemberId) {
        let Some(c) = self.asking.remove(key) else {
            return;
        };
        c.close(CLOSE_DONE, b"answered");
        let settled = self.gateway_checks.on_answer(node::remote_ip(c.remote), id);
        if settled {
            self.apply_gateway_checks(node);
        }
    }

    /// Each tick: gateways silent too long are asked again, or nobody's; their
    /// connections are closed.
    pub(super) fn expire_gateway_checks(&mut self, node: &Node) {
        self.asking.close_expired();
        let (settled, again) = self.gateway_checks.expire(Instant::now());
        ask_who_is_at(node, again);
        if settled {
            self.apply_gateway_checks(node);
        }
    }

    /// Claims refuted are dropped from the member list (and said), and the neighbours
    /// follow.
    pub(super) fn apply_gateway_checks(&mut self, node: &Node) {
        for r in self.gateway_checks.drop_refuted(&mut self.members) {
            let reason = r.reason();
            node.out.event(
                &Event::ClaimRefused {
                    member: r.member,
                    addr: r.addr.to_string(),
                    reason: reason.clone(),
                },
                || {
                    format!(
                        "{}'s claim to {} refused: {reason}",
                        super::member_name(&self.members, r.member),
                        r.addr
                    )
                },
            );
            self.rediscover_needed = true;
        }
    }

    /// Someone asks who we are on a connection it dialed to us: we say, once we know.
    pub(super) fn on_who_are_you(&mut self, node: &Node, key: ConnKey) {
        if self.me == JOINING {
            // Once per connection (a peer may repeat the question), and no more connections
            // than a swarm's members would check us from.
            if !self.asked_who.contains(&key) && self.asked_who.len() < MAX_ASKED_BEFORE_WELCOME {
                self.asked_who.push(key);
            }
        } else if let Some(c) = node.conns.get(key).filter(|c| !c.dialed) {
            c.send(Msg::IAm { id: self.me });
        }
    }

    /// Welcomed: those who asked before hear who we are.
    pub(super) fn answer_who_asked(&mut self, node: &Node) {
        for key in std::mem::take(&mut self.asked_who) {
            self.on_who_are_you(node, key);
        }
    }
}

/// Dials each gateway once and asks who answers there.
fn ask_who_is_at(node: &Node, gateways: Vec<(IpAddr, u16)>) {
    for (gw, port) in gateways {
        tracing::debug!(%gw, "asking who is at a claimed gateway");
        let ask = SocketAddr::new(gw, port);
        node.dial_once(ask, ASKING, vec![Msg::WhoAreYou], CHECK_TIMEOUT);
    }
}
