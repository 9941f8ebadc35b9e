//! The swarm's state and its rules: who is registered, who holds or fetches which shard,
//! where shards go, and when the swarm is ready. No IO: every event returns the messages to
//! send, so the rules are tested without sockets.
//!
//! Placement: a node keeps the verified shards it registers with; every shard without a holder
//! goes to a node with room that holds nothing, else to one holding only replicas, else (once
//! `min_nodes` are registered, so no more are awaited) to the least loaded; a node holding
//! nothing gets a replica of the least-covered shard. A replica first
//! fetches from the nodes already holding or fetching its shard and not from the seeder's
//! tracker, so the seeder sends each shard about once; if those nodes go away it is told to use
//! the tracker again.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use protocol::{
    cmd, code, Capacity, Command, LoadShardParams, RegisterParams, RegisteredParams, RouteParams,
    ShardFailedParams, ShardLoadedParams, ShardProgressParams, SwarmStateParams, BROADCAST,
    COORDINATOR, PROTOCOL_VERSION,
};
use serde::Serialize;

/// One shard of the served split, as the seeder lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ShardSpec {
    pub shard_id: u32,
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub info_hash: String,
    pub magnet: String,
    pub torrent_url: String,
}

/// A node's relation to one shard.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Holding {
    /// A replica waiting for a node to finish the shard, to fetch it from that node.
    Waiting,
    Fetching {
        bytes: u64,
        total: u64,
        from_seeder: u64,
        from_peers: u64,
        use_tracker: bool,
    },
    Loaded {
        from_seeder: u64,
        from_peers: u64,
    },
    Failed {
        code: String,
        message: String,
    },
}

impl Holding {
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
#[derive(Debug, Clone, Serialize)]
pub struct NodeState {
    pub node_id: String,
    pub name: String,
    /// Where other nodes reach its shards over BitTorrent.
    pub peer_addr: SocketAddr,
    pub data_addr: Option<String>,
    pub capacity: Capacity,
    pub shards: BTreeMap<u32, Holding>,
    /// Which connection it registered on (a reconnect replaces it).
    #[serde(skip)]
    pub conn: u64,
    #[serde(skip)]
    pub last_seen: Instant,
}

impl NodeState {
    fn assigned_bytes(&self, shards: &[ShardSpec]) -> u64 {
        self.shards
            .iter()
            .filter(|(_, h)| h.counts())
            .map(|(id, _)| shards[*id as usize].size)
            .sum()
    }

    fn has_room_for(&self, shard: &ShardSpec, shards: &[ShardSpec]) -> bool {
        let used = self.assigned_bytes(shards);
        let disk_ok = self.capacity.disk_free_bytes >= used + shard.size;
        // A stage is mapped into memory when it is served: it must fit in RAM too.
        let ram_ok = self.capacity.ram_bytes == 0 || self.capacity.ram_bytes >= used + shard.size;
        disk_ok && ram_ok
    }
}

/// Messages to send: to one node id, or to [`BROADCAST`].
pub type Outbox = Vec<(String, Command)>;

/// The swarm.
pub struct Swarm {
    pub shards: Vec<ShardSpec>,
    pub nodes: BTreeMap<String, NodeState>,
    pub min_nodes: usize,
    pub ready: bool,
    pub model_sha256: String,
    pub split_id: String,
    pub seeder_peer: Option<String>,
    pub token: Option<String>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// The inference pipeline while ready: one node per shard, in order.
    pub route: Option<Vec<RouteHop>>,
    /// Route nodes that have loaded their stage (acknowledged ROUTE).
    pub route_loaded: std::collections::BTreeSet<String>,
    /// Until then only empty nodes are given shards: after a coordinator restart the nodes
    /// re-register one by one, and a shard whose holder has not come back yet must not be
    /// fetched again by a node that has come back.
    pub settle_until: Instant,
}

/// One stage of the inference route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteHop {
    pub shard_id: u32,
    pub node_id: String,
    /// The node's data-channel address.
    pub data_addr: String,
}

/// Why a registration is refused: (error code, message).
pub type Refusal = (&'static str, String);

impl Swarm {
    /// The nodes other than `node` that `node` can fetch `shard_id` from: those that have it
    /// or are getting it.
    fn sources<'a>(&'a self, node: &'a str, shard_id: u32) -> impl Iterator<Item = &'a NodeState> {
        self.nodes.values().filter(move |n| {
            n.node_id != node
                && matches!(
                    n.shards.get(&shard_id),
                    Some(Holding::Loaded { .. } | Holding::Fetching { .. })
                )
        })
    }

    fn load_shard(&self, node: &str, shard_id: u32, use_tracker: bool) -> (String, Command) {
        let s = &self.shards[shard_id as usize];
        let peers = self
            .sources(node, shard_id)
            .map(|n| n.peer_addr.to_string())
            .collect();
        let params = LoadShardParams {
            shard_id,
            file: s.file.clone(),
            size: s.size,
            info_hash: s.info_hash.clone(),
            magnet: s.magnet.clone(),
            torrent_url: s.torrent_url.clone(),
            sha256: s.sha256.clone(),
            peers,
            use_tracker,
            seeder_peer: self.seeder_peer.clone(),
        };
        (
            node.to_owned(),
            Command::new(cmd::LOAD_SHARD, COORDINATOR, node, params),
        )
    }

    /// Handle `REGISTER` from a connection at `ip`. On success the node is (re)admitted with
    /// the shards it holds, and the reply and any new placements are returned.
    pub fn register(
        &mut self,
        req: &Command,
        p: &RegisterParams,
        ip: IpAddr,
        conn: u64,
        header_token: Option<&str>,
    ) -> Result<Outbox, Refusal> {
        if let Some(want) = &self.token {
            if p.token.as_deref().or(header_token) != Some(want.as_str()) {
                return Err((code::UNAUTHORIZED, "wrong or missing token".into()));
            }
        }
        if p.protocol_version != PROTOCOL_VERSION {
            return Err((
                code::PROTOCOL_VERSION,
                format!(
                    "this coordinator speaks protocol {PROTOCOL_VERSION}, the node {}",
                    p.protocol_version
                ),
            ));
        }
        if p.node_id.is_empty() || p.node_id.len() > 128 || p.peer_port == 0 {
            return Err((
                code::BAD_PARAMS,
                "node_id must be 1-128 characters and peer_port non-zero".into(),
            ));
        }
        let mut held = BTreeMap::new();
        for h in &p.shards {
            match self.shards.get(h.shard_id as usize) {
                Some(s) if s.sha256 == h.sha256 => {
                    held.insert(h.shard_id, Holding::Loaded { from_seeder: 0, from_peers: 0 });
                }
                _ => {
                    return Err((
                        code::FOREIGN_SHARDS,
                        format!(
                            "shard {} (sha256 {}) is not part of split {} of this model: clear the node's data dir",
                            h.shard_id, h.sha256, self.split_id
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
            shards: held,
            conn,
            last_seen: Instant::now(),
        };
        tracing::info!(
            "node {} ({}) registered from {} with {} shard(s)",
            node.name,
            node.node_id,
            node.peer_addr,
            node.shards.len()
        );
        self.nodes.insert(p.node_id.clone(), node);
        // A node that comes back has lost its loaded stage: send the route again.
        self.route = None;
        let reply = RegisteredParams {
            model_sha256: self.model_sha256.clone(),
            split_id: self.split_id.clone(),
            heartbeat_interval_secs: self.heartbeat_interval.as_secs().max(1),
        };
        let mut out = vec![(
            p.node_id.clone(),
            Command::reply_to(
                &req.request_id,
                cmd::REGISTERED,
                COORDINATOR,
                &p.node_id,
                reply,
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
            (*bytes, *total, *from_seeder, *from_peers) =
                (p.bytes, p.total, p.from_seeder, p.from_peers);
        }
        Vec::new()
    }

    pub fn loaded(&mut self, node: &str, p: &ShardLoadedParams) -> Outbox {
        let Some(n) = self.nodes.get_mut(node) else {
            return Vec::new();
        };
        match self.shards.get(p.shard_id as usize) {
            Some(s) if s.sha256 == p.sha256 => {
                tracing::info!(
                    "node {} loaded shard {} ({} bytes from the seeder, {} from peers)",
                    n.name,
                    p.shard_id,
                    p.from_seeder,
                    p.from_peers
                );
                n.shards.insert(
                    p.shard_id,
                    Holding::Loaded {
                        from_seeder: p.from_seeder,
                        from_peers: p.from_peers,
                    },
                );
            }
            _ => {
                n.shards.insert(
                    p.shard_id,
                    Holding::Failed {
                        code: "wrong_sha256".into(),
                        message: "loaded shard does not match the manifest".into(),
                    },
                );
            }
        }
        self.place()
    }

    pub fn failed(&mut self, node: &str, p: &ShardFailedParams) -> Outbox {
        if let Some(n) = self.nodes.get_mut(node) {
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
        }
        self.place()
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

    /// Drop nodes silent for longer than the heartbeat timeout. Returns the messages and the
    /// dropped node ids (whose connections should be closed).
    pub fn expire(&mut self, now: Instant) -> (Outbox, Vec<String>) {
        let dead: Vec<String> = self
            .nodes
            .values()
            .filter(|n| now.duration_since(n.last_seen) > self.heartbeat_timeout)
            .map(|n| n.node_id.clone())
            .collect();
        if dead.is_empty() {
            // Placement may have waited for the settling time to pass.
            return (self.place(), dead);
        }
        for id in &dead {
            tracing::warn!(
                "node {id} missed its heartbeats: dropping it and re-placing its shards"
            );
            self.nodes.remove(id);
        }
        (self.place(), dead)
    }

    fn coverage(&self, shard_id: u32) -> usize {
        self.nodes
            .values()
            .filter(|n| n.shards.get(&shard_id).is_some_and(Holding::counts))
            .count()
    }

    /// Place uncovered shards and replicas, fix stranded replicas, and update readiness.
    pub fn place(&mut self) -> Outbox {
        let mut out = Vec::new();
        // Every shard on at least one node.
        for shard_id in 0..self.shards.len() as u32 {
            if self.coverage(shard_id) > 0 {
                continue;
            }
            let spec = self.shards[shard_id as usize].clone();
            // Nodes holding nothing first, then nodes holding only replicas; a node that holds
            // a shard nobody else has takes a second one only once no more nodes are awaited.
            let enough_nodes = self.nodes.len() >= self.min_nodes;
            let settled = Instant::now() >= self.settle_until;
            let candidate = self
                .nodes
                .values()
                .filter(|n| {
                    !n.shards.get(&shard_id).is_some_and(Holding::counts)
                        && n.has_room_for(&spec, &self.shards)
                })
                .map(|n| {
                    let counted: Vec<u32> = n
                        .shards
                        .iter()
                        .filter(|(_, h)| h.counts())
                        .map(|(id, _)| *id)
                        .collect();
                    let rank = if counted.is_empty() {
                        0
                    } else if counted.iter().all(|id| self.coverage(*id) >= 2) {
                        1
                    } else {
                        2
                    };
                    (rank, counted.len(), n.node_id.clone())
                })
                .filter(|(rank, _, _)| *rank == 0 || (settled && (*rank < 2 || enough_nodes)))
                .min()
                .map(|(_, _, id)| id);
            match candidate {
                Some(node) => {
                    self.assign(&node, shard_id);
                    out.push(self.load_shard(&node, shard_id, true));
                }
                None if enough_nodes => tracing::warn!(
                    "no node has room for shard {shard_id} ({} bytes)",
                    spec.size
                ),
                None => {} // more nodes are awaited
            }
        }
        // Nodes holding nothing get a replica of the least-covered shard.
        let idle: Vec<String> = self
            .nodes
            .values()
            .filter(|n| !n.shards.values().any(Holding::counts))
            .map(|n| n.node_id.clone())
            .collect();
        for node in idle {
            let best = (0..self.shards.len() as u32)
                .filter(|id| {
                    let n = &self.nodes[&node];
                    !matches!(n.shards.get(id), Some(Holding::Failed { .. }))
                        && n.has_room_for(&self.shards[*id as usize], &self.shards)
                })
                .min_by_key(|id| (self.coverage(*id), *id));
            if let Some(shard_id) = best {
                self.assign(&node, shard_id);
            }
        }
        // Replicas: a waiting one starts as soon as another node holds or fetches the shard,
        // fetching from those nodes only; one whose sources are all gone falls back to the
        // seeder's tracker.
        let replicas: Vec<(String, u32, bool)> = self
            .nodes
            .values()
            .flat_map(|n| {
                n.shards.iter().filter_map(move |(id, h)| match h {
                    Holding::Waiting => Some((n.node_id.clone(), *id, true)),
                    Holding::Fetching {
                        use_tracker: false, ..
                    } => Some((n.node_id.clone(), *id, false)),
                    _ => None,
                })
            })
            .collect();
        for (node, shard_id, waiting) in replicas {
            let has_source = self.sources(&node, shard_id).next().is_some();
            let use_tracker = match (waiting, has_source) {
                (true, true) => false,
                (_, false) => true,
                (false, true) => continue,
            };
            let total = self.shards[shard_id as usize].size;
            self.nodes
                .get_mut(&node)
                .expect("known node")
                .shards
                .insert(
                    shard_id,
                    Holding::Fetching {
                        bytes: 0,
                        total,
                        from_seeder: 0,
                        from_peers: 0,
                        use_tracker,
                    },
                );
            out.push(self.load_shard(&node, shard_id, use_tracker));
        }
        out.extend(self.update_ready());
        out
    }

    /// Give `shard_id` to `node`. The first holder fetches it through the seeder's tracker at
    /// once; a replica (started by [`Swarm::place`]) fetches from the first holder only,
    /// trailing it piece by piece, so the seeder sends each shard once and the replica lands
    /// shortly after its source (bench/swarm.py, N=8: makespan 1.25x the bound, 1.01 copies
    /// from the seeder). Copying only a finished shard was 1.88x: the two big shards took one
    /// more whole transfer over a node's uplink. The node works around three librqbit 9.1
    /// problems for this (`node::fetch`: `STALL_AFTER`, `prime_first_piece`, and replicas added
    /// without announce URLs).
    fn assign(&mut self, node: &str, shard_id: u32) {
        let primary = self.coverage(shard_id) == 0;
        let total = self.shards[shard_id as usize].size;
        let holding = if primary {
            Holding::Fetching {
                bytes: 0,
                total,
                from_seeder: 0,
                from_peers: 0,
                use_tracker: true,
            }
        } else {
            Holding::Waiting
        };
        self.nodes
            .get_mut(node)
            .expect("assigning to a known node")
            .shards
            .insert(shard_id, holding);
        tracing::info!(
            "placing shard {shard_id} on node {node}{}",
            if primary { "" } else { " (replica)" }
        );
    }

    fn loaded_count(&self) -> usize {
        (0..self.shards.len() as u32)
            .filter(|id| {
                self.nodes
                    .values()
                    .any(|n| matches!(n.shards.get(id), Some(Holding::Loaded { .. })))
            })
            .count()
    }

    fn update_ready(&mut self) -> Outbox {
        let mut out = self.update_ready_flag();
        out.extend(self.update_route());
        out
    }

    /// While ready, pick one node per shard (the first by id that has it loaded and a data
    /// address) and send each its `ROUTE` when the route changes.
    fn update_route(&mut self) -> Outbox {
        let route: Option<Vec<RouteHop>> = if self.ready {
            (0..self.shards.len() as u32)
                .map(|id| {
                    self.nodes
                        .values()
                        .find_map(|n| match (n.shards.get(&id), &n.data_addr) {
                            (Some(Holding::Loaded { .. }), Some(addr)) => Some(RouteHop {
                                shard_id: id,
                                node_id: n.node_id.clone(),
                                data_addr: addr.clone(),
                            }),
                            _ => None,
                        })
                })
                .collect()
        } else {
            None
        };
        if route == self.route {
            return Vec::new();
        }
        self.route = route.clone();
        let Some(route) = route else {
            return Vec::new();
        };
        tracing::info!(
            "route: {}",
            route
                .iter()
                .map(|h| h.node_id.as_str())
                .collect::<Vec<_>>()
                .join(" -> ")
        );
        route
            .iter()
            .enumerate()
            .map(|(k, hop)| {
                let params = RouteParams {
                    stage: hop.shard_id,
                    stage_count: route.len() as u32,
                    next: route.get(k + 1).map(|h| h.data_addr.clone()),
                    model_sha256: self.model_sha256.clone(),
                    split_id: self.split_id.clone(),
                };
                (
                    hop.node_id.clone(),
                    Command::new(cmd::ROUTE, COORDINATOR, &hop.node_id, params),
                )
            })
            .collect()
    }

    fn update_ready_flag(&mut self) -> Outbox {
        let loaded = self.loaded_count();
        let ready = self.nodes.len() >= self.min_nodes
            && loaded == self.shards.len()
            && !self.shards.is_empty();
        if ready == self.ready {
            return Vec::new();
        }
        self.ready = ready;
        let params = SwarmStateParams {
            nodes: self.nodes.len(),
            min_nodes: self.min_nodes,
            shards_loaded: loaded,
            shards: self.shards.len(),
        };
        let command = if ready {
            cmd::SWARM_READY
        } else {
            cmd::SWARM_NOT_READY
        };
        tracing::info!(
            "{command}: {} node(s), {loaded}/{} shards loaded",
            self.nodes.len(),
            self.shards.len()
        );
        println!(
            "[{command}] nodes={} shards={}/{}",
            self.nodes.len(),
            loaded,
            self.shards.len()
        );
        vec![(
            BROADCAST.to_owned(),
            Command::new(command, COORDINATOR, BROADCAST, params),
        )]
    }

    /// A node says its stage of the route is loaded.
    pub fn route_acked(&mut self, node: &str) {
        if self
            .route
            .as_ref()
            .is_some_and(|r| r.iter().any(|h| h.node_id == node))
        {
            self.route_loaded.insert(node.to_owned());
        }
    }

    /// The route, when every stage on it is loaded.
    pub fn serving_route(&self) -> Option<Vec<RouteHop>> {
        let route = self.route.as_ref()?;
        (self.ready && route.iter().all(|h| self.route_loaded.contains(&h.node_id)))
            .then(|| route.clone())
    }

    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        let placement: BTreeMap<u32, Vec<&str>> = (0..self.shards.len() as u32)
            .map(|id| {
                let holders = self
                    .nodes
                    .values()
                    .filter(|n| n.shards.get(&id).is_some_and(Holding::counts))
                    .map(|n| n.node_id.as_str())
                    .collect();
                (id, holders)
            })
            .collect();
        let (mut from_seeder, mut from_peers) = (0, 0);
        for h in self.nodes.values().flat_map(|n| n.shards.values()) {
            let (s, p) = h.bytes();
            from_seeder += s;
            from_peers += p;
        }
        let now = Instant::now();
        let nodes: Vec<serde_json::Value> = self
            .nodes
            .values()
            .map(|n| {
                let mut v = serde_json::to_value(n).expect("node serialises");
                v["last_heartbeat_secs_ago"] = now.duration_since(n.last_seen).as_secs_f64().into();
                v
            })
            .collect();
        serde_json::json!({
            "ready": self.ready,
            "min_nodes": self.min_nodes,
            "model_sha256": self.model_sha256,
            "split_id": self.split_id,
            "shards": self.shards,
            "shards_loaded": self.loaded_count(),
            "nodes": nodes,
            "placement": placement,
            "bytes": {"from_seeder": from_seeder, "from_peers": from_peers},
            "route": self.route,
            "serving": self.serving_route().is_some(),
        })
    }
}

#[cfg(test)]
mod tests;
