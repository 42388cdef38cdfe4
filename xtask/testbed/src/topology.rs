//! Emulated networks as files: nodes (source, destinations, non-member routers), links with
//! per-direction rates, and optional timed events.
//!
//! ```toml
//! [[node]]
//! name = "s"
//! role = "source"        # "source" | "dest" | "router"
//! [[link]]
//! a = "s"
//! b = "d1"
//! mbit = 40              # both directions, or mbit_ab / mbit_ba
//! delay_ms = 20          # optional, one way; or delay_ms_ab / delay_ms_ba
//! jitter_ms = 2          # optional: each packet's delay varies by up to this (order kept)
//! loss = 0.005           # optional fraction of packets dropped; or loss_ab / loss_ba
//! [[event]]
//! at_s = 3.0
//! link = ["s", "d1"]
//! mbit = 10              # or: down = true / up = true
//! ```

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::Path,
};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("topology {path} is not valid TOML: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("topology {0}")]
    Invalid(String),
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Dest,
    Router,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub role: Role,
    /// An upload cap (`floodclone --max-rate`, Mbit/s of chunk data) for this member.
    #[serde(default)]
    pub max_mbit: Option<f64>,
}

/// A long-running TCP flow (the kernel's default congestion control) between two nodes,
/// from before the transfer until after it: other people's traffic on links the swarm uses.
/// Its ends may be routers: a router with one link is a host outside the swarm, and a flow
/// from one meets the swarm's packets in a router's queue, as other people's traffic does
/// (a flow from a member shares that member's own qdisc, where Linux's TCP small queues
/// keep TCP to ~1 ms of it and any UDP sender takes the rest).
#[derive(Clone, Debug, PartialEq)]
pub struct CrossFlow {
    pub from: usize,
    pub to: usize,
    /// Its route: (link, the node sending over it), in order.
    pub hops: Vec<(usize, usize)>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCross {
    from: String,
    to: String,
}

// Unknown keys are errors everywhere: a misspelt `delay_ms` must not run with no delay.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    a: String,
    b: String,
    mbit: Option<f64>,
    mbit_ab: Option<f64>,
    mbit_ba: Option<f64>,
    delay_ms: Option<f64>,
    delay_ms_ab: Option<f64>,
    delay_ms_ba: Option<f64>,
    jitter_ms: Option<f64>,
    jitter_ms_ab: Option<f64>,
    jitter_ms_ba: Option<f64>,
    loss: Option<f64>,
    loss_ab: Option<f64>,
    loss_ba: Option<f64>,
}

impl RawLink {
    /// Delay, jitter and loss a->b and b->a.
    fn propagation(&self, what: &str) -> Result<(Propagation, Propagation), TopologyError> {
        let ms = 0.0..=10_000.0;
        let (delay_ab, delay_ba) = per_direction(
            what,
            "delay_ms",
            self.delay_ms,
            self.delay_ms_ab,
            self.delay_ms_ba,
            ms.clone(),
        )?;
        let (jitter_ab, jitter_ba) = per_direction(
            what,
            "jitter_ms",
            self.jitter_ms,
            self.jitter_ms_ab,
            self.jitter_ms_ba,
            ms,
        )?;
        let (loss_ab, loss_ba) = per_direction(
            what,
            "loss",
            self.loss,
            self.loss_ab,
            self.loss_ba,
            0.0..=0.5,
        )?;
        let direction = |delay_ms, jitter_ms, loss| Propagation {
            delay_ms,
            jitter_ms,
            loss,
        };
        Ok((
            direction(delay_ab, jitter_ab, loss_ab),
            direction(delay_ba, jitter_ba, loss_ba),
        ))
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    at_s: f64,
    link: [String; 2],
    mbit: Option<f64>,
    mbit_ab: Option<f64>,
    mbit_ba: Option<f64>,
    #[serde(default)]
    down: bool,
    #[serde(default)]
    up: bool,
}

impl RawEvent {
    /// The event on its link of `links` (rates given a-to-b in the file turned to the
    /// link's own direction), at a time >= 0, `down`, `up` or a new rate.
    fn resolve(
        &self,
        links: &[Link],
        lookup: impl Fn(&str) -> Result<usize, TopologyError>,
    ) -> Result<Event, TopologyError> {
        let what = format!(
            "event at {} s on {}-{}",
            self.at_s, self.link[0], self.link[1]
        );
        let (a, b) = (lookup(&self.link[0])?, lookup(&self.link[1])?);
        let (link, flipped) = link_between(links, a, b)
            .ok_or_else(|| TopologyError::Invalid(format!("{what}: no such link")))?;
        if !(self.at_s >= 0.0 && self.at_s.is_finite()) {
            return Err(TopologyError::Invalid(format!("{what}: at_s must be >= 0")));
        }
        let action = match (self.down, self.up) {
            (true, false) => EventAction::Down,
            (false, true) => EventAction::Up,
            (false, false) => {
                let (x, y) = rates(&what, self.mbit, self.mbit_ab, self.mbit_ba)?;
                let (mbit_ab, mbit_ba) = if flipped { (y, x) } else { (x, y) };
                EventAction::SetRate { mbit_ab, mbit_ba }
            }
            (true, true) => {
                return Err(TopologyError::Invalid(format!(
                    "{what}: `down` and `up` together"
                )))
            }
        };
        Ok(Event {
            at_s: self.at_s,
            link,
            action,
        })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    #[serde(default)]
    description: String,
    #[serde(rename = "node")]
    nodes: Vec<Node>,
    #[serde(rename = "link")]
    links: Vec<RawLink>,
    #[serde(default, rename = "event")]
    events: Vec<RawEvent>,
    #[serde(default)]
    cross: Vec<RawCross>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    gso_max_size: Option<u32>,
}

/// A link between node indices `a` and `b` with a rate per direction in Mbit/s.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Link {
    pub a: usize,
    pub b: usize,
    pub mbit_ab: f64,
    pub mbit_ba: f64,
    /// What happens to packets a->b and b->a besides the rate.
    pub prop_ab: Propagation,
    pub prop_ba: Propagation,
}

impl Link {
    /// Whether either direction has delay, jitter or loss (the testbed then puts a delay
    /// line in the middle of the link).
    pub fn has_propagation(&self) -> bool {
        !self.prop_ab.is_none() || !self.prop_ba.is_none()
    }

    /// The initial rate (Mbit/s) of the direction leaving `from`, one of its ends.
    pub fn mbit_from(&self, from: usize) -> f64 {
        if self.a == from {
            self.mbit_ab
        } else {
            self.mbit_ba
        }
    }
}

/// Propagation of one direction of a link: one-way delay, jitter and random loss.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Propagation {
    pub delay_ms: f64,
    /// Each packet's delay is `delay_ms` plus a uniform draw in [-jitter_ms, +jitter_ms]
    /// (not below 0), and never earlier than the packet before it: order is kept.
    pub jitter_ms: f64,
    /// Fraction of packets dropped at random, 0..1.
    pub loss: f64,
}

impl Propagation {
    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }
}

/// One value for both directions, or one per direction (`<key>_ab`, `<key>_ba`; a missing
/// one is 0), checked to lie in `range`.
fn per_direction(
    what: &str,
    key: &str,
    both: Option<f64>,
    ab: Option<f64>,
    ba: Option<f64>,
    range: std::ops::RangeInclusive<f64>,
) -> Result<(f64, f64), TopologyError> {
    let (ab, ba) = match (both, ab, ba) {
        (Some(v), None, None) => (v, v),
        (None, ab, ba) => (ab.unwrap_or(0.0), ba.unwrap_or(0.0)),
        _ => {
            return Err(TopologyError::Invalid(format!(
                "{what}: give either `{key}` or `{key}_ab`/`{key}_ba`, not both"
            )))
        }
    };
    for v in [ab, ba] {
        if !range.contains(&v) {
            return Err(TopologyError::Invalid(format!(
                "{what}: `{key}` must lie in {}..={}, not {v}",
                range.start(),
                range.end()
            )));
        }
    }
    Ok((ab, ba))
}

#[derive(Clone, Debug, PartialEq)]
pub enum EventAction {
    /// New rates in Mbit/s (a->b, b->a).
    SetRate {
        mbit_ab: f64,
        mbit_ba: f64,
    },
    Down,
    Up,
}

/// At `at_s` seconds after the transfer starts, `action` applies to link `link` (an index
/// into [`Topology::links`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub at_s: f64,
    pub link: usize,
    pub action: EventAction,
}

#[derive(Clone, Debug)]
pub struct Topology {
    pub name: String,
    pub description: String,
    pub nodes: Vec<Node>,
    pub links: Vec<Link>,
    /// Sorted by time.
    pub events: Vec<Event>,
    pub cross: Vec<CrossFlow>,
    /// Every link's MTU (default: the kernel's 1500); 9000 is a datacenter's jumbo frame.
    pub mtu: Option<u32>,
    /// Every link's GSO limit, the largest packet a sender may hand its interface at once
    /// (default: the testbed's 16 KB, see `netns`); 65536 is the kernel's default, what
    /// a host's gigabit NIC takes.
    pub gso_max_size: Option<u32>,
}

/// Each node's name usable in interface names, each named once, caps only on members;
/// exactly one source and at least one destination.
fn check_nodes(nodes: &[Node]) -> Result<(), TopologyError> {
    let mut names = HashSet::new();
    for n in nodes {
        let valid = !n.name.is_empty()
            && n.name.len() <= 6
            && n.name.chars().all(|c| c.is_ascii_alphanumeric());
        if !valid {
            return Err(TopologyError::Invalid(format!(
                "node name {:?}: use 1 to 6 ASCII letters or digits (it becomes part of \
                 interface names, which the kernel limits to 15 bytes)",
                n.name
            )));
        }
        if n.max_mbit
            .is_some_and(|m| !(m >= 0.01 && m.is_finite()) || n.role == Role::Router)
        {
            return Err(TopologyError::Invalid(format!(
                "node {}: max_mbit is a member's upload cap, at least 0.01 Mbit/s",
                n.name
            )));
        }
        if !names.insert(n.name.as_str()) {
            return Err(TopologyError::Invalid(format!("node {} twice", n.name)));
        }
    }
    let sources = nodes.iter().filter(|n| n.role == Role::Source).count();
    if sources != 1 {
        return Err(TopologyError::Invalid(format!(
            "needs exactly one node with role \"source\", found {sources}"
        )));
    }
    if !nodes.iter().any(|n| n.role == Role::Dest) {
        return Err(TopologyError::Invalid(
            "needs at least one \"dest\" node".into(),
        ));
    }
    Ok(())
}

/// The index of the link between nodes `a` and `b`, and whether it runs `b` to `a`.
fn link_between(links: &[Link], a: usize, b: usize) -> Option<(usize, bool)> {
    links.iter().enumerate().find_map(|(i, l)| {
        if (l.a, l.b) == (a, b) {
            Some((i, false))
        } else if (l.a, l.b) == (b, a) {
            Some((i, true))
        } else {
            None
        }
    })
}

/// The index of the node called `name`.
fn node_named(nodes: &[Node], name: &str) -> Result<usize, TopologyError> {
    nodes
        .iter()
        .position(|x| x.name == name)
        .ok_or_else(|| TopologyError::Invalid(format!("unknown node {name:?}")))
}

/// The file's links, between two different known nodes, at most one per pair.
fn links_of(
    raw: &[RawLink],
    lookup: impl Fn(&str) -> Result<usize, TopologyError>,
) -> Result<Vec<Link>, TopologyError> {
    let mut links: Vec<Link> = Vec::new();
    for l in raw {
        let (a, b) = (lookup(&l.a)?, lookup(&l.b)?);
        if a == b {
            return Err(TopologyError::Invalid(format!("link {} to itself", l.a)));
        }
        if link_between(&links, a, b).is_some() {
            return Err(TopologyError::Invalid(format!(
                "two links between {} and {}",
                l.a, l.b
            )));
        }
        let what = format!("link {}-{}", l.a, l.b);
        let (mbit_ab, mbit_ba) = rates(&what, l.mbit, l.mbit_ab, l.mbit_ba)?;
        let (prop_ab, prop_ba) = l.propagation(&what)?;
        links.push(Link {
            a,
            b,
            mbit_ab,
            mbit_ba,
            prop_ab,
            prop_ba,
        });
    }
    Ok(links)
}

fn rates(
    what: &str,
    mbit: Option<f64>,
    ab: Option<f64>,
    ba: Option<f64>,
) -> Result<(f64, f64), TopologyError> {
    let (ab, ba) = match (mbit, ab, ba) {
        (Some(m), None, None) => (m, m),
        (None, Some(ab), Some(ba)) => (ab, ba),
        _ => {
            return Err(TopologyError::Invalid(format!(
                "{what}: give either `mbit` or both `mbit_ab` and `mbit_ba`"
            )))
        }
    };
    if !(ab > 0.0 && ba > 0.0 && ab.is_finite() && ba.is_finite()) {
        return Err(TopologyError::Invalid(format!(
            "{what}: rates must be positive Mbit/s"
        )));
    }
    Ok((ab, ba))
}

impl Topology {
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::parse(&name, &text).map_err(|e| match e {
            TopologyError::Parse { source, .. } => TopologyError::Parse {
                path: path.display().to_string(),
                source,
            },
            TopologyError::Invalid(m) => TopologyError::Invalid(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn parse(name: &str, text: &str) -> Result<Self, TopologyError> {
        let raw: RawTopology = toml::from_str(text).map_err(|source| TopologyError::Parse {
            path: name.to_string(),
            source: Box::new(source),
        })?;
        check_nodes(&raw.nodes)?;
        let lookup = |n: &str| node_named(&raw.nodes, n);
        let links = links_of(&raw.links, lookup)?;
        let mut events = raw
            .events
            .iter()
            .map(|e| e.resolve(&links, lookup))
            .collect::<Result<Vec<_>, _>>()?;
        events.sort_by(|x, y| x.at_s.total_cmp(&y.at_s));
        let mut topo = Self {
            name: name.to_string(),
            description: raw.description,
            nodes: raw.nodes,
            links,
            events,
            cross: Vec::new(),
            mtu: raw.mtu,
            gso_max_size: raw.gso_max_size,
        };
        topo.check_veth_setting("mtu", topo.mtu, 1280..=65535, "1500-byte frames")?;
        let gso = topo.gso_max_size;
        topo.check_veth_setting("gso_max_size", gso, 4096..=65536, "single frames")?;
        for d in topo.destinations() {
            if topo.hop_distances(topo.source())[d].is_none() {
                return Err(TopologyError::Invalid(format!(
                    "destination {} is not connected to the source",
                    topo.nodes[d].name
                )));
            }
        }
        topo.cross = topo.cross_flows(&raw.cross)?;
        Ok(topo)
    }

    /// The file's cross flows, each with its route (the testbed's, with every link up).
    fn cross_flows(&self, raw: &[RawCross]) -> Result<Vec<CrossFlow>, TopologyError> {
        let lookup = |n: &str| node_named(&self.nodes, n);
        let next = crate::routing::next_hops(self, &vec![true; self.links.len()]);
        raw.iter()
            .map(|c| {
                let (from, to) = (lookup(&c.from)?, lookup(&c.to)?);
                let invalid = |why: &str| {
                    TopologyError::Invalid(format!("cross flow {}->{}: {why}", c.from, c.to))
                };
                if from == to {
                    return Err(invalid("from and to must differ"));
                }
                let path = crate::routing::path(&next, from, to)
                    .ok_or_else(|| invalid("no route between them"))?;
                let hops = path
                    .windows(2)
                    .map(|w| (next[w[0]][to].expect("on the path").1, w[0]))
                    .collect();
                Ok(CrossFlow { from, to, hops })
            })
            .collect()
    }

    pub fn source(&self) -> usize {
        self.nodes
            .iter()
            .position(|n| n.role == Role::Source)
            .expect("validated")
    }

    pub fn destinations(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].role == Role::Dest)
            .collect()
    }

    /// Members are the nodes that run floodclone: the source and the destinations.
    pub fn is_member(&self, i: usize) -> bool {
        self.nodes[i].role != Role::Router
    }

    /// Per-direction capacities in bits per second: `cap[(u, v)]`.
    pub fn capacities_bps(&self) -> HashMap<(usize, usize), f64> {
        let mut cap = HashMap::new();
        for l in &self.links {
            cap.insert((l.a, l.b), l.mbit_ab * 1e6);
            cap.insert((l.b, l.a), l.mbit_ba * 1e6);
        }
        cap
    }

    /// Neighbours of `u` as (neighbour, link index).
    pub fn neighbours(&self, u: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.links.iter().enumerate().filter_map(move |(i, l)| {
            if l.a == u {
                Some((l.b, i))
            } else if l.b == u {
                Some((l.a, i))
            } else {
                None
            }
        })
    }

    /// Hop counts from `from` (breadth first); `None` where unreachable.
    pub fn hop_distances(&self, from: usize) -> Vec<Option<usize>> {
        let mut dist = vec![None; self.nodes.len()];
        dist[from] = Some(0);
        let mut queue = std::collections::VecDeque::from([from]);
        while let Some(u) = queue.pop_front() {
            for (v, _) in self.neighbours(u) {
                if dist[v].is_none() {
                    dist[v] = Some(dist[u].unwrap() + 1);
                    queue.push_back(v);
                }
            }
        }
        dist
    }
}

impl Topology {
    /// Capacity of link direction `from -> to` at `t` seconds into the transfer, in bit/s
    /// (0 when down, or when there is no such link).
    pub fn capacity_bps(&self, from: usize, to: usize, t: f64) -> f64 {
        let Some((i, _)) = link_between(&self.links, from, to) else {
            return 0.0;
        };
        let l = &self.links[i];
        let (mut ab, mut ba, mut up) = (l.mbit_ab, l.mbit_ba, true);
        for e in self.events.iter().filter(|e| e.link == i && e.at_s <= t) {
            match e.action {
                EventAction::SetRate { mbit_ab, mbit_ba } => (ab, ba) = (mbit_ab, mbit_ba),
                EventAction::Down => up = false,
                EventAction::Up => up = true,
            }
        }
        match (up, l.a == from) {
            (false, _) => 0.0,
            (true, true) => ab * 1e6,
            (true, false) => ba * 1e6,
        }
    }

    /// Which links are up at `t` seconds into the transfer.
    pub fn links_up_at(&self, t: f64) -> Vec<bool> {
        let mut up = vec![true; self.links.len()];
        for e in self.events.iter().take_while(|e| e.at_s <= t) {
            match e.action {
                EventAction::Down => up[e.link] = false,
                EventAction::Up => up[e.link] = true,
                EventAction::SetRate { .. } => {}
            }
        }
        up
    }
}

impl Topology {
    /// The topology as a file [`Topology::parse`] reads back (rate changes only for events
    /// that change rates; links going down and up are written as such).
    /// The same network with `delay_ms` of one-way delay on every link that has none,
    /// named `<name>-<delay>ms` (the WAN variants of the shipped files).
    pub fn with_delay_ms(&self, delay_ms: f64) -> Self {
        let mut t = self.clone();
        for l in &mut t.links {
            for p in [&mut l.prop_ab, &mut l.prop_ba] {
                if p.delay_ms == 0.0 {
                    p.delay_ms = delay_ms;
                }
            }
        }
        t.name = format!("{}-{delay_ms}ms", self.name);
        t
    }

    /// The same network for the floor: each member with an upload cap gets a link of that
    /// rate between itself and a new router that takes over all its links, so everything it
    /// sends crosses the cap (and nothing it receives does).
    pub fn with_upload_caps_as_links(&self) -> Self {
        let mut t = self.clone();
        for v in 0..self.nodes.len() {
            let Some(cap) = self.nodes[v].max_mbit else {
                continue;
            };
            let r = t.nodes.len();
            t.nodes.push(Node {
                name: format!("{}cap", self.nodes[v].name),
                role: Role::Router,
                max_mbit: None,
            });
            for l in &mut t.links {
                if l.a == v {
                    l.a = r;
                }
                if l.b == v {
                    l.b = r;
                }
            }
            t.links.push(Link {
                a: v,
                b: r,
                mbit_ab: cap,
                mbit_ba: 1e6,
                ..Default::default()
            });
        }
        t
    }

    /// The same network with `mbit` of the link `link`'s `from` -> `to` direction taken by
    /// other traffic (what is left for the swarm; at least 1% of the link stays).
    pub fn with_capacity_taken(&self, link: usize, from: usize, mbit: f64) -> Self {
        let mut t = self.clone();
        let l = &mut t.links[link];
        let rate = if l.a == from {
            &mut l.mbit_ab
        } else {
            &mut l.mbit_ba
        };
        *rate = (*rate - mbit).max(*rate * 0.01);
        t
    }

    /// A top-level setting of every veth (`mtu`, `gso_max_size`): within `range`, and only
    /// where no link has a delay line, which carries `line_carries`.
    fn check_veth_setting(
        &self,
        key: &str,
        value: Option<u32>,
        range: std::ops::RangeInclusive<u32>,
        line_carries: &str,
    ) -> Result<(), TopologyError> {
        let Some(v) = value else {
            return Ok(());
        };
        if !range.contains(&v) {
            return Err(TopologyError::Invalid(format!(
                "{key} {v}: {} to {}",
                range.start(),
                range.end()
            )));
        }
        if self.links.iter().any(|l| l.has_propagation()) {
            return Err(TopologyError::Invalid(format!(
                "{key}: only on links without delay, jitter or loss (the delay line carries \
                 {line_carries})"
            )));
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        let role = |r: Role| match r {
            Role::Source => "source",
            Role::Dest => "dest",
            Role::Router => "router",
        };
        let name = |i: usize| &self.nodes[i].name;
        let mut s = format!("description = {:?}\n", self.description);
        if let Some(m) = self.mtu {
            s += &format!("mtu = {m}\n");
        }
        if let Some(g) = self.gso_max_size {
            s += &format!("gso_max_size = {g}\n");
        }
        s += "\n";
        for n in &self.nodes {
            s += &format!(
                "[[node]]\nname = {:?}\nrole = \"{}\"\n",
                n.name,
                role(n.role)
            );
            if let Some(m) = n.max_mbit {
                s += &format!("max_mbit = {m}\n");
            }
        }
        for l in &self.links {
            s += &format!(
                "\n[[link]]\na = {:?}\nb = {:?}\nmbit_ab = {}\nmbit_ba = {}\n",
                name(l.a),
                name(l.b),
                l.mbit_ab,
                l.mbit_ba
            );
            for (key, ab, ba) in [
                ("delay_ms", l.prop_ab.delay_ms, l.prop_ba.delay_ms),
                ("jitter_ms", l.prop_ab.jitter_ms, l.prop_ba.jitter_ms),
                ("loss", l.prop_ab.loss, l.prop_ba.loss),
            ] {
                if ab != 0.0 || ba != 0.0 {
                    s += &format!("{key}_ab = {ab}\n{key}_ba = {ba}\n");
                }
            }
        }
        for e in &self.events {
            let l = &self.links[e.link];
            s += &format!(
                "\n[[event]]\nat_s = {}\nlink = [{:?}, {:?}]\n",
                e.at_s,
                name(l.a),
                name(l.b)
            );
            s += &match e.action {
                EventAction::SetRate { mbit_ab, mbit_ba } => {
                    format!("mbit_ab = {mbit_ab}\nmbit_ba = {mbit_ba}\n")
                }
                EventAction::Down => "down = true\n".into(),
                EventAction::Up => "up = true\n".into(),
            };
        }
        for c in &self.cross {
            s += &format!(
                "\n[[cross]]\nfrom = {:?}\nto = {:?}\n",
                name(c.from),
                name(c.to)
            );
        }
        s
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "topology {}: {}", self.name, self.description.trim())?;
        for n in &self.nodes {
            writeln!(f, "  node {:6} {:?}", n.name, n.role)?;
        }
        for l in &self.links {
            writeln!(
                f,
                "  link {}-{}: {} Mbit/s ->, {} Mbit/s <-",
                self.nodes[l.a].name, self.nodes[l.b].name, l.mbit_ab, l.mbit_ba
            )?;
        }
        for e in &self.events {
            let l = &self.links[e.link];
            writeln!(
                f,
                "  at {} s: link {}-{} {:?}",
                e.at_s, self.nodes[l.a].name, self.nodes[l.b].name, e.action
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
        [[node]]
        name = "s"
        role = "source"
        [[node]]
        name = "d1"
        role = "dest"
        [[link]]
        a = "s"
        b = "d1"
        mbit_ab = 40
        mbit_ba = 10
        [[event]]
        at_s = 2.0
        link = ["d1", "s"]
        mbit_ab = 5
        mbit_ba = 20
    "#;

    #[test]
    fn parses_rates_and_flips_event_direction() {
        let t = Topology::parse("small", SMALL).unwrap();
        assert_eq!(t.links[0].mbit_ab, 40.0);
        assert_eq!(t.links[0].mbit_ba, 10.0);
        // The event names the link as d1-s: its a->b is the link's b->a.
        assert_eq!(
            t.events[0].action,
            EventAction::SetRate {
                mbit_ab: 20.0,
                mbit_ba: 5.0
            }
        );
    }

    #[test]
    fn cross_flows_follow_the_routes_and_caps_become_links_for_the_floor() {
        let text = r#"
            node = [{name="s",role="source",max_mbit=5},{name="d",role="dest"},
                    {name="r",role="router"},{name="x",role="router"}]
            link = [{a="s",b="r",mbit=40},{a="r",b="d",mbit=30},{a="x",b="r",mbit=100}]
            cross = [{from="x",to="d"}]
        "#;
        let t = Topology::parse("t", text).unwrap();
        // x -> r over link 2, then r -> d over link 1.
        assert_eq!(t.cross[0].hops, vec![(2, 3), (1, 2)]);
        let capped = t.with_upload_caps_as_links();
        assert_eq!(crate::bound::max_flow_bps(&capped, 1), 5e6);
        assert_eq!(Topology::parse("t", &t.to_toml()).unwrap().cross, t.cross);
        let left = t.with_capacity_taken(1, 2, 20.0);
        assert_eq!(left.links[1].mbit_ab, 10.0);
        for (bad, says) in [
            (text.replace("to=\"d\"", "to=\"q\""), "unknown node"),
            (
                text.replace(
                    "name=\"x\",role=\"router\"",
                    "name=\"x\",role=\"router\",max_mbit=3",
                ),
                "max_mbit",
            ),
        ] {
            let e = Topology::parse("t", &bad).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn parses_delay_jitter_and_loss_per_direction() {
        let both = SMALL.replace("mbit_ba = 10", "mbit_ba = 10\ndelay_ms = 20\njitter_ms = 2");
        let l = &Topology::parse("x", &both).unwrap().links[0];
        let want = Propagation {
            delay_ms: 20.0,
            jitter_ms: 2.0,
            loss: 0.0,
        };
        assert_eq!((l.prop_ab, l.prop_ba), (want, want));
        assert!(l.has_propagation());
        let one_way = SMALL.replace(
            "mbit_ba = 10",
            "mbit_ba = 10\ndelay_ms_ab = 30\nloss_ba = 0.01",
        );
        let l = &Topology::parse("x", &one_way).unwrap().links[0];
        assert_eq!((l.prop_ab.delay_ms, l.prop_ba.delay_ms), (30.0, 0.0));
        assert_eq!((l.prop_ab.loss, l.prop_ba.loss), (0.0, 0.01));
        assert!(!Topology::parse("x", SMALL).unwrap().links[0].has_propagation());
    }

    #[test]
    fn an_mtu_and_a_gso_limit_apply_to_every_link_and_survive_a_round_trip() {
        let jumbo = format!("mtu = 9000\n{SMALL}");
        let t = Topology::parse("j", &jumbo).unwrap();
        assert_eq!(t.mtu, Some(9000));
        assert_eq!(Topology::parse("j", &t.to_toml()).unwrap().mtu, Some(9000));
        assert_eq!(Topology::parse("s", SMALL).unwrap().mtu, None);
        assert!(Topology::parse("j", &format!("mtu = 100\n{SMALL}")).is_err());
        let wide = format!("gso_max_size = 65536\n{SMALL}");
        let t = Topology::parse("g", &wide).unwrap();
        assert_eq!(t.gso_max_size, Some(65536));
        assert_eq!(
            Topology::parse("g", &t.to_toml()).unwrap().gso_max_size,
            Some(65536)
        );
        assert!(Topology::parse("g", &format!("gso_max_size = 100000\n{SMALL}")).is_err());
        let delayed = jumbo.replace("mbit_ba = 10", "mbit_ba = 10\ndelay_ms = 20");
        assert!(
            Topology::parse("j", &delayed).is_err(),
            "the delay line carries 1500"
        );
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it_and_its_line() {
        // Line 12 of SMALL (counting the empty first line) is `mbit_ba = 10`.
        let typo = SMALL.replace("mbit_ba = 10", "mbit_ba = 10\ndelay_msec = 20");
        let err = Topology::parse("x", &typo).unwrap_err().to_string();
        assert!(
            err.contains("delay_msec") && err.contains("line 13"),
            "{err}"
        );
        let in_node = SMALL.replace("role = \"dest\"", "role = \"dest\"\ncolour = 1");
        assert!(Topology::parse("x", &in_node)
            .unwrap_err()
            .to_string()
            .contains("colour"));
        let too_lossy = SMALL.replace("mbit_ba = 10", "mbit_ba = 10\nloss = 0.9");
        assert!(Topology::parse("x", &too_lossy)
            .unwrap_err()
            .to_string()
            .contains("loss"));
    }

    #[test]
    fn rejects_bad_files_with_a_reason() {
        let no_source = SMALL.replace("\"source\"", "\"dest\"");
        assert!(Topology::parse("x", &no_source)
            .unwrap_err()
            .to_string()
            .contains("exactly one"));
        let long_name = SMALL.replace("\"d1\"", "\"destination1\"");
        assert!(Topology::parse("x", &long_name)
            .unwrap_err()
            .to_string()
            .contains("1 to 6"));
        let disconnected = format!("{SMALL}\n[[node]]\nname = \"d2\"\nrole = \"dest\"\n");
        assert!(Topology::parse("x", &disconnected)
            .unwrap_err()
            .to_string()
            .contains("not connected"));
        let router = "\n[[node]]\nname = \"r\"\nrole = \"router\"\n";
        let link = |a: &str, b: &str| format!("\n[[link]]\na = \"{a}\"\nb = \"{b}\"\nmbit = 5\n");
        let event = |at: &str, extra: &str| {
            format!("\n[[event]]\nat_s = {at}\nlink = [\"s\", \"d1\"]\n{extra}\n")
        };
        for (text, reason) in [
            (
                format!("{SMALL}\n[[node]]\nname = \"d1\"\nrole = \"dest\"\n"),
                "node d1 twice",
            ),
            (
                format!("{SMALL}{router}")
                    .replace("role = \"router\"", "role = \"router\"\nmax_mbit = 5"),
                "upload cap",
            ),
            (
                SMALL.replace("role = \"dest\"", "role = \"source\""),
                "exactly one",
            ),
            (format!("{SMALL}{}", link("s", "s")), "link s to itself"),
            (
                format!("{SMALL}{}", link("d1", "s")),
                "two links between d1 and s",
            ),
            (format!("{SMALL}{}", link("s", "q")), "unknown node \"q\""),
            (
                format!("{SMALL}{router}{}", event("1", "down = true"))
                    .replace("[\"s\", \"d1\"]\ndown", "[\"s\", \"r\"]\ndown"),
                "no such link",
            ),
            (
                format!("{SMALL}{}", event("-1", "down = true")),
                "at_s must be >= 0",
            ),
            (
                format!("{SMALL}{}", event("1", "down = true\nup = true")),
                "`down` and `up` together",
            ),
        ] {
            let err = Topology::parse("x", &text).unwrap_err().to_string();
            assert!(err.contains(reason), "{reason:?} not in {err:?}");
        }
    }
}
