//! The swarm's state and its rules: who is registered, who holds or fetches which shard,
//! where shards go, and when the swarm is ready. No IO: every event returns the messages to
//! send, so the rules are tested without sockets, and fuzzed ([`fuzz`]) without the rest of
//! the coordinator (which links llama.cpp).
//!
//! This crate's root holds the state and the node events (register, progress, loaded,
//! failed, gone); [`node`] what is known of one node, [`claims`] how what a node says it holds
//! comes to count, [`placement`] where shards go, [`route`] readiness and the inference route,
//! and [`status`] the `/status` document.

mod claims;
mod node;
mod placement;
mod reach;
mod route;

pub use claims::{Claim, CLAIM_WAIT};
use node::{bounded_sources, HoldingRules};
pub use node::{NodeState, MAX_MBIT, MAX_SOURCES, RETRY_FAILED_AFTER};

pub use route::machines_in;
mod status;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use protocol::{
    code, Control, Message, RegisterParams, RegisteredParams, ShardFailedParams, ShardLoadedParams,
    ShardProgressParams, COORDINATOR, PROTOCOL_VERSION,
};

pub use protocol::status::{Eviction, Holding, ShardSpec};

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
    /// Hops (caller, callee) that ran through the relay for [`RELAYED_BEATS_TO_MOVE`]
    /// heartbeats in a row: the route puts another holder after the caller where there is
    /// one.
    pub relayed_hops: std::collections::BTreeSet<(String, String)>,
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
    /// Where to reach it over the mesh, in a swarm whose data channel runs there.
    pub mesh: Option<protocol::MeshAddr>,
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
    /// Whether the data channel runs over the mesh (crate `mesh`) to members that give a
    /// mesh address, rather than over TCP.
    pub mesh: bool,
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
    /// Where its caller reaches it over the mesh (None: over TCP at `data_addr`).
    pub mesh: Option<protocol::MeshAddr>,
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
            relayed_hops: Default::default(),
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
        // A signing key goes to the next stage in ROUTE: an Ed25519 public key, hex.
        let key_ok = |k: &String| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit());
        if !p.signing_key.as_ref().is_none_or(key_ok) {
            return Err(Refusal(
                code::BAD_PARAMS,
                "signing_key must be an Ed25519 public key in hex (64 digits)".into(),
            ));
        }
        if let Some(Err(why)) = p.mesh.as_ref().map(protocol::MeshAddr::check) {
            return Err(Refusal(code::BAD_PARAMS, why));
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
            peer_dialable: None,
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
            mesh: p.mesh.clone(),
            next_edge: None,
            relayed_said_at: None,
            relayed_beats: 0,
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
            tls: None,   // the server adds the node's certificate
            relay: None, // and the relay
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
                            mesh: self.mesh_of(node),
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
