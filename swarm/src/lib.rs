//! The swarm's state and its rules: who is registered, who holds or fetches which shard,
//! where shards go, and when the swarm is ready. No IO: every event returns the messages to
//! send, so the rules are tested without sockets, and fuzzed ([`fuzz`]) without the rest of
//! the coordinator (which links llama.cpp).
//!
//! This crate's root holds the state and the node events (register, progress, loaded, failed, gone);
//! [`placement`] decides where shards go, [`route`] readiness and the inference route, and
//! [`status`] the `/status` document.

mod claims;
mod placement;
mod route;

pub use claims::{Claim, CLAIM_WAIT};

pub use route::machines_in;
mod status;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use protocol::{
    code, Capacity, Control, Message, RegisterParams, RegisteredParams, ShardFailedParams,
    ShardLoadedParams, ShardProgressParams, COORDINATOR, PROTOCOL_VERSION,
};

pub use protocol::status::{Eviction, Holding, ShardSpec};

/// How long a node that failed a shard waits before it is given that shard again (a full
/// disk or a broken download would otherwise fail and be retried as fast as messages go).
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(30);

/// What the swarm rules read off a node's relation to a shard ([`Holding`]).
trait HoldingRules {
    /// Whether it counts as a copy: held, being fetched, or waiting to be fetched.
    fn counts(&self) -> bool;
    /// Bytes fetched (from the seeder, from peers).
    fn bytes(&self) -> (u64, u64);
}

impl HoldingRules for Holding {
    fn counts(&self) -> bool {
        matches!(
            self,
            Holding::Waiting | Holding::Fetching { .. } | Holding::Loaded { .. }
        )
    }

    fn bytes(&self) -> (u64, u64) {
        match *self {
            Holding::Fetching {
                from_seeder,
                from_peers,
                ..
            }
            | Holding::Loaded {
                from_seeder,
                from_peers,
            } => (from_seeder, from_peers),
            Holding::Failed { .. } | Holding::Waiting => (0, 0),
        }
    }
}

/// A registered node.
#[derive(Debug, Clone)]
pub struct NodeState {
    pub node_id: String,
    pub name: String,
    /// Where other nodes reach its shards over BitTorrent.
    pub peer_addr: SocketAddr,
    pub data_addr: Option<String>,
    pub capacity: Capacity,
    pub shards: BTreeMap<u32, Holding>,
    /// When it last failed each shard: it is not given that shard again before
    /// [`RETRY_FAILED_AFTER`].
    pub failed_at: BTreeMap<u32, Instant>,
    /// Per shard, the bytes it fetched from each peer address (as the node saw them); `/status`
    /// shows them by node name.
    pub fetched_from: BTreeMap<u32, BTreeMap<String, u64>>,
    /// Per shard, when it was given the shard (a swarm-wide count): a replica's place in the
    /// shard's chain of holders.
    pub shard_order: BTreeMap<u32, u64>,
    /// Per shard, the peers its last LOAD_SHARD named.
    pub given_peers: BTreeMap<u32, Vec<String>>,
    /// The highest upload rate it reported while fetching (Mbit/s).
    pub measured_uplink_mbit: Option<u32>,
    /// How its stage's decodes use threads (from its `ROUTE` reply).
    pub decode: Option<protocol::DecodeThreads>,
    /// Which connection it registered on (a reconnect replaces it).
    pub conn: u64,
    pub last_seen: Instant,
    /// Its public key for signed steps (from `REGISTER`).
    pub signing_key: Option<String>,
    /// Shards it says it holds (at `REGISTER`, or by `SHARD_LOADED`) and has not proved yet
    /// (`PROVE_SHARD`): they do not count, and the node is given nothing new until they are
    /// settled (or [`CLAIM_WAIT`] is up).
    pub claimed: BTreeMap<u32, Claim>,
}

/// The fastest link rate believed (Mbit/s).
pub const MAX_MBIT: u32 = 400_000;

/// The most sources one shard's byte counts may name (peers of a shard are far fewer): a
/// node cannot grow the coordinator's state with made-up sources.
pub const MAX_SOURCES: usize = 64;

/// `sources` as kept: the `MAX_SOURCES` largest.
fn bounded_sources(sources: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    if sources.len() <= MAX_SOURCES {
        return sources.clone();
    }
    let mut by_bytes: Vec<(&String, &u64)> = sources.iter().collect();
    by_bytes.sort_by(|a, b| b.1.cmp(a.1));
    by_bytes
        .into_iter()
        .take(MAX_SOURCES)
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

impl NodeState {
    /// Whether the coordinator gave it `shard` (or took its word at REGISTER that it held it,
    /// checked against the manifest's sha256): what it may report on.
    fn was_given(&self, shard: u32) -> bool {
        self.shards.contains_key(&shard)
    }

    /// Whether it may report `what` on `shard` ([`NodeState::was_given`]); a report it may
    /// not make is logged and ignored.
    fn may_report(&self, shard: u32, what: &str) -> bool {
        let given = self.was_given(shard);
        if !given {
            tracing::warn!(
                "node {} reported {what} on shard {shard}, which it was not given: ignored",
                self.name
            );
        }
        given
    }

    /// Whether it failed `shard` less than [`RETRY_FAILED_AFTER`] ago.
    fn failed_recently(&self, shard: u32) -> bool {
        matches!(self.shards.get(&shard), Some(Holding::Failed { .. }))
            && self
                .failed_at
                .get(&shard)
                .is_some_and(|at| at.elapsed() < RETRY_FAILED_AFTER)
    }

    fn assigned_bytes(&self, shards: &[ShardSpec]) -> u64 {
        self.shards
            .iter()
            .filter(|(_, h)| h.counts())
            .map(|(id, _)| shards[*id as usize].size)
            .sum()
    }

    /// Its uplink in Mbit/s: as declared, else the highest rate it was seen uploading, else
    /// unknown (0: ranked after every node with a known uplink).
    fn uplink_mbit(&self) -> u64 {
        match (self.capacity.uplink_mbit, self.measured_uplink_mbit) {
            (Some(declared), _) => u64::from(declared),
            (None, Some(measured)) => u64::from(measured),
            (None, None) => 0,
        }
    }

    fn has_room_for(&self, shard: &ShardSpec, shards: &[ShardSpec]) -> bool {
        if !self.claimed.is_empty() {
            return false; // what it holds is not known yet
        }
        let used = self.assigned_bytes(shards);
        let disk_ok = self.capacity.disk_free_bytes >= used + shard.size;
        // A stage is mapped into memory when it is served: it must fit in RAM too.
        let ram_ok = self.capacity.ram_bytes == 0 || self.capacity.ram_bytes >= used + shard.size;
        disk_ok && ram_ok
    }
}

/// Messages to send: to one node id, or to [`BROADCAST`].
pub type Outbox = Vec<(String, Control)>;

/// The swarm.
pub struct Swarm {
    pub shards: Vec<ShardSpec>,
    pub nodes: BTreeMap<String, NodeState>,
    pub settings: SwarmSettings,
    pub ready: bool,
    /// The inference pipeline while ready: one node per shard, in order.
    pub route: Option<Vec<RouteHop>>,
    /// Route nodes that have loaded their stage (acknowledged ROUTE).
    pub route_loaded: std::collections::BTreeSet<String>,
    /// Until then only empty nodes are given shards: after a coordinator restart the nodes
    /// re-register one by one, and a shard whose holder has not come back yet must not be
    /// fetched again by a node that has come back.
    pub settle_until: Instant,
    /// The next [`NodeState::shard_order`].
    pub next_order: u64,
    /// The `ROUTE` last sent to each node: the route's stages, and every other node that has
    /// a shard loaded runs it as a replica (probed, ready to take over).
    pub assigned: BTreeMap<String, protocol::RouteParams>,
    /// The stage each node has loaded (it acknowledged its `ROUTE`).
    pub stage_loaded: BTreeMap<String, u32>,
    /// Each node's probe key (made at its first `ROUTE`).
    probe_keys: BTreeMap<String, String>,
    /// Nodes caught computing wrong outputs: refused from then on.
    pub evicted: BTreeMap<String, Eviction>,
    /// The digest each open `PROVE_SHARD` challenge expects, by (node, shard) (none while
    /// the coordinator fetches the range it asks for).
    challenges: BTreeMap<(String, u32), Option<String>>,
}

/// A holder of a shard whose stage the coordinator can probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeTarget {
    pub node_id: String,
    pub data_addr: String,
    pub probe_key: String,
    /// Whether it is the route's stage for this shard.
    pub on_route: bool,
}

/// The swarm's fixed settings: what was served and what the operator chose.
#[derive(Debug, Clone)]
pub struct SwarmSettings {
    pub min_nodes: usize,
    pub model_sha256: String,
    pub split_id: String,
    /// The seeder's own BitTorrent address (so nodes can count its bytes apart).
    pub seeder_peer: Option<String>,
    /// Shared secret nodes must present.
    pub token: Option<String>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// Sequences each stage keeps at once (`--parallel`), sent in `ROUTE`.
    pub parallel: u32,
}

/// One stage of the inference route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteHop {
    pub shard_id: u32,
    pub node_id: String,
    /// The node's data-channel address.
    pub data_addr: String,
    /// The key the caller of this stage proves on the data channel (never shown).
    pub key: String,
    /// The node's public key, which signs the steps it sends to the next stage.
    pub signer: Option<String>,
}

/// Why a registration is refused: the `ERROR` code and the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{1} ({0})")]
pub struct Refusal(pub &'static str, pub String);

impl Swarm {
    /// An empty swarm serving `shards`. Until one heartbeat timeout has passed only nodes
    /// holding nothing are given shards (see [`Swarm::settle_until`]).
    pub fn new(shards: Vec<ShardSpec>, settings: SwarmSettings) -> Swarm {
        Swarm {
            shards,
            nodes: BTreeMap::new(),
            ready: false,
            route: None,
            route_loaded: Default::default(),
            settle_until: Instant::now() + settings.heartbeat_timeout,
            next_order: 0,
            assigned: BTreeMap::new(),
            stage_loaded: BTreeMap::new(),
            probe_keys: BTreeMap::new(),
            evicted: BTreeMap::new(),
            challenges: BTreeMap::new(),
            settings,
        }
    }

    /// Handle `REGISTER` from a connection at `ip`. On success the node is (re)admitted with
    /// the shards it holds, and the reply and any new placements are returned.
    pub fn register(
        &mut self,
        request_id: &str,
        p: &RegisterParams,
        ip: IpAddr,
        conn: u64,
        header_token: Option<&str>,
    ) -> Result<Outbox, Refusal> {
        if let Some(want) = &self.settings.token {
            let presented = p.token.as_deref().or(header_token);
            if !presented.is_some_and(|got| protocol::secret::same_secret(want, got)) {
                return Err(Refusal(code::UNAUTHORIZED, "wrong or missing token".into()));
            }
        }
        if let Some(e) = self.evicted.get(&p.node_id) {
            return Err(Refusal(
                code::EVICTED,
                format!(
                    "this node was evicted for wrong outputs on shard {}: {}",
                    e.shard_id, e.reason
                ),
            ));
        }
        if p.protocol_version != PROTOCOL_VERSION {
            return Err(Refusal(
                code::PROTOCOL_VERSION,
                format!(
                    "this coordinator speaks protocol {PROTOCOL_VERSION}, the node {}",
                    p.protocol_version
                ),
            ));
        }
        // The node id names the node's data-channel certificate: a DNS label.
        if !protocol::is_node_id(&p.node_id) || p.peer_port == 0 {
            return Err(Refusal(
                code::BAD_PARAMS,
                "node_id must be a DNS label (letters, digits and hyphens, at most 63; nodes \
                 make a UUID) and peer_port non-zero"
                    .into(),
            ));
        }
        // What it says it holds counts once it proves it has the bytes ([`Swarm::proved`]).
        let mut claimed = BTreeMap::new();
        for h in &p.shards {
            match self.shards.get(h.shard_id as usize) {
                Some(s) if s.sha256 == h.sha256 => {
                    claimed.insert(h.shard_id, Claim::new(0, 0));
                }
                _ => {
                    return Err(Refusal(
                        code::FOREIGN_SHARDS,
                        format!(
                            "shard {} (sha256 {}) is not part of split {} of this model: clear the node's data dir",
                            h.shard_id, h.sha256, self.settings.split_id
                        ),
                    ))
                }
            }
        }
        let node = NodeState {
            node_id: p.node_id.clone(),
            name: p.name.clone(),
            peer_addr: SocketAddr::new(ip, p.peer_port),
            // A node listening on every address is reached at the address it connected from.
            data_addr: p
                .data_addr
                .as_deref()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .map(|a| {
                    if a.ip().is_unspecified() {
                        SocketAddr::new(ip, a.port()).to_string()
                    } else {
                        a.to_string()
                    }
                }),
            capacity: p.capacity,
            shards: BTreeMap::new(),
            failed_at: BTreeMap::new(),
            fetched_from: BTreeMap::new(),
            shard_order: BTreeMap::new(),
            given_peers: BTreeMap::new(),
            measured_uplink_mbit: None,
            decode: None,
            conn,
            last_seen: Instant::now(),
            signing_key: p.signing_key.clone(),
            claimed,
        };
        tracing::info!(
            "node {} ({}) registered from {} with {} shard(s)",
            node.name,
            node.node_id,
            node.peer_addr,
            node.shards.len()
        );
        self.nodes.insert(p.node_id.clone(), node);
        // A node that comes back has lost its loaded stage: its ROUTE goes out again, and the
        // route serves once it has loaded it. The other stages keep theirs.
        self.assigned.remove(&p.node_id);
        self.stage_loaded.remove(&p.node_id);
        self.route_loaded.remove(&p.node_id);
        let reply = RegisteredParams {
            model_sha256: self.settings.model_sha256.clone(),
            split_id: self.settings.split_id.clone(),
            heartbeat_interval_secs: self.settings.heartbeat_interval.as_secs().max(1),
            tls: None, // the server adds the node's certificate
        };
        let mut out = vec![(
            p.node_id.clone(),
            Control::reply_to(
                request_id,
                COORDINATOR,
                &p.node_id,
                Message::Registered(reply),
            ),
        )];
        out.extend(self.place());
        Ok(out)
    }

    /// A heartbeat (or any message) from a node.
    pub fn seen(&mut self, node: &str) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.last_seen = Instant::now();
        }
    }

    pub fn progress(&mut self, node: &str, p: &ShardProgressParams) -> Outbox {
        let Some(n) = self.nodes.get_mut(node) else {
            return Vec::new();
        };
        if !n.may_report(p.shard_id, "progress") {
            return Vec::new();
        }
        n.fetched_from
            .insert(p.shard_id, bounded_sources(&p.by_source));
        // A rate no link has (over 400 Gbit/s) is not believed: it would put the node first.
        if let Some(up) = p.upload_mbit.filter(|u| (1..=MAX_MBIT).contains(u)) {
            n.measured_uplink_mbit = Some(n.measured_uplink_mbit.map_or(up, |m| m.max(up)));
        }
        if let Some(Holding::Fetching {
            bytes,
            total,
            from_seeder,
            from_peers,
            ..
        }) = self
            .nodes
            .get_mut(node)
            .and_then(|n| n.shards.get_mut(&p.shard_id))
        {
            let first_piece = *bytes == 0 && p.bytes > 0;
            (*bytes, *total, *from_seeder, *from_peers) =
                (p.bytes, p.total, p.from_seeder, p.from_peers);
            if first_piece {
                // Replicas waiting for a live source can start now.
                return self.place();
            }
        }
        Vec::new()
    }

    pub fn loaded(&mut self, node: &str, p: &ShardLoadedParams) -> Outbox {
        let Some(n) = self.nodes.get_mut(node) else {
            return Vec::new();
        };
        // Only a shard the coordinator gave (or the node proved it held at REGISTER) can be
        // loaded: a claim about any other would make it a holder without a check.
        if !n.may_report(p.shard_id, "it loaded") {
            return Vec::new();
        }
        if !p.by_source.is_empty() {
            n.fetched_from
                .insert(p.shard_id, bounded_sources(&p.by_source));
        }
        match self.shards.get(p.shard_id as usize) {
            Some(s) if s.sha256 == p.sha256 => {
                tracing::info!(
                    "node {} loaded shard {} ({} bytes from the seeder, {} from peers); it \
                     counts once proved",
                    n.name,
                    p.shard_id,
                    p.from_seeder,
                    p.from_peers
                );
                n.claimed
                    .insert(p.shard_id, Claim::new(p.from_seeder, p.from_peers));
            }
            _ => {
                n.shards.insert(
                    p.shard_id,
                    Holding::Failed {
                        code: "wrong_sha256".into(),
                        message: "loaded shard does not match the manifest".into(),
                    },
                );
                n.failed_at.insert(p.shard_id, Instant::now());
            }
        }
        self.place()
    }

    pub fn failed(&mut self, node: &str, p: &ShardFailedParams) -> Outbox {
        if let Some(n) = self
            .nodes
            .get_mut(node)
            .filter(|n| n.may_report(p.shard_id, "a failure"))
        {
            tracing::warn!(
                "node {} failed shard {}: {} ({})",
                n.name,
                p.shard_id,
                p.message,
                p.code
            );
            n.shards.insert(
                p.shard_id,
                Holding::Failed {
                    code: p.code.clone(),
                    message: p.message.clone(),
                },
            );
            n.failed_at.insert(p.shard_id, Instant::now());
        }
        self.place()
    }

    /// Evict `node` for computing wrong outputs on `shard_id`: it is dropped, its shards are
    /// placed elsewhere, and it may not come back. Returns the messages (the caller closes its
    /// connection).
    pub fn evict(&mut self, node: &str, shard_id: u32, reason: String) -> Outbox {
        let Some(n) = self.nodes.remove(node) else {
            return Vec::new();
        };
        tracing::error!(
            "evicting node {node} ({}): shard {shard_id}: {reason}",
            n.name
        );
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.evicted.insert(
            node.to_owned(),
            Eviction {
                name: n.name,
                shard_id,
                reason,
                at,
            },
        );
        self.place()
    }

    /// Every shard's holders that run its stage and can be probed, route holder first.
    pub fn probe_targets(&self) -> Vec<Vec<ProbeTarget>> {
        (0..self.shards.len() as u32)
            .map(|shard| {
                let mut holders: Vec<ProbeTarget> = self
                    .assigned
                    .iter()
                    .filter(|(node, params)| {
                        params.stage == shard
                            && self.stage_loaded.get(*node) == Some(&shard)
                            && self.nodes.contains_key(*node)
                    })
                    .filter_map(|(node, params)| {
                        Some(ProbeTarget {
                            node_id: node.clone(),
                            data_addr: self.nodes[node].data_addr.clone()?,
                            probe_key: params.probe_key.clone(),
                            on_route: !params.key.is_empty(),
                        })
                    })
                    .collect();
                holders.sort_by_key(|t| !t.on_route);
                holders
            })
            .collect()
    }

    /// A registered node's command, as far as it concerns the swarm: the messages it makes
    /// go out, or `None` for a command that is not the swarm's to take (the server answers
    /// those: heartbeats, `LIST_FILES`, anything unknown).
    pub fn take(&mut self, node: &str, message: &Message) -> Option<Outbox> {
        self.seen(node);
        Some(match message {
            Message::Route(protocol::Route::Loaded(p)) if p.loaded => {
                self.route_acked(node, p.stage, p.decode.clone());
                Vec::new()
            }
            Message::Route(_) => Vec::new(),
            Message::ShardProgress(p) => self.progress(node, p),
            Message::ShardLoaded(p) => self.loaded(node, p),
            Message::ShardFailed(p) => self.failed(node, p),
            Message::ProveShard(protocol::ProveShard::Proof(p)) => {
                self.proved(node, p.shard_id, Some(&p.digest))
            }
            _ => return None,
        })
    }

    /// A connection closed: its node is gone (unless it already re-registered elsewhere).
    pub fn disconnected(&mut self, node: &str, conn: u64) -> Outbox {
        if self.nodes.get(node).is_some_and(|n| n.conn == conn) {
            tracing::warn!("node {node} disconnected: dropping it and re-placing its shards");
            self.nodes.remove(node);
            return self.place();
        }
        Vec::new()
    }

    /// Drop nodes silent for longer than the heartbeat timeout, and claims not proved within
    /// [`CLAIM_WAIT`]. Returns the messages and the dropped node ids (whose connections should
    /// be closed).
    pub fn expire(&mut self, now: Instant) -> (Outbox, Vec<String>) {
        self.expire_claims(now);
        let mut out = Vec::new();
        let dead: Vec<String> = self
            .nodes
            .values()
            .filter(|n| now.duration_since(n.last_seen) > self.settings.heartbeat_timeout)
            .map(|n| n.node_id.clone())
            .collect();
        if dead.is_empty() {
            // Placement may have waited for the settling time to pass.
            out.extend(self.place());
            return (out, dead);
        }
        for id in &dead {
            tracing::warn!(
                "node {id} missed its heartbeats: dropping it and re-placing its shards"
            );
            self.nodes.remove(id);
        }
        out.extend(self.place());
        (out, dead)
    }
}

#[cfg(test)]
mod tests;

pub mod fuzz;
