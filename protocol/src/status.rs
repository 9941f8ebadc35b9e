//! The coordinator's `GET /status` document, typed: the coordinator writes it, and the
//! dashboard, `shard_loader watch` and anything else that reads it share these shapes instead
//! of looking up string keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Capacity, DecodeThreads};

/// The swarm, its serving and the checks of holders' outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Every shard is loaded on enough nodes and `min_nodes` are registered.
    pub ready: bool,
    pub min_nodes: usize,
    pub model_sha256: String,
    pub split_id: String,
    pub shards: Vec<ShardSpec>,
    /// Shards loaded on at least one node.
    pub shards_loaded: usize,
    pub nodes: Vec<NodeStatus>,
    /// Per shard, the nodes holding it.
    pub placement: BTreeMap<u32, Vec<String>>,
    pub bytes: FetchedBytes,
    /// The inference route while ready: one node per shard, in order.
    pub route: Option<Vec<RouteStage>>,
    /// The route's stages are all loaded: requests are served.
    pub serving: bool,
    /// Nodes dropped for wrong outputs, by node id.
    pub evicted: BTreeMap<String, Eviction>,
    /// The serving's counts (absent when the coordinator has no vocabulary, so no API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<Batching>,
    pub verify: Verify,
}

/// One shard of the served split, as the seeder lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    pub shard_id: u32,
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub info_hash: String,
    pub magnet: String,
    pub torrent_url: String,
    /// The seeder's plain HTTP download of the file (BEP 19 web seed).
    pub web_seed: Option<String>,
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub name: String,
    /// Where other nodes reach its shards over BitTorrent.
    pub peer_addr: String,
    /// Whether the coordinator could dial `peer_addr` (None: not tried yet). A node behind
    /// NAT cannot be dialled: it fetches over its own connections, and no replica is left to
    /// fetch from it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_dialable: Option<bool>,
    pub data_addr: Option<String>,
    pub capacity: Capacity,
    /// Its relation to each shard it was given.
    pub shards: BTreeMap<u32, Holding>,
    /// The highest upload rate it reported while fetching (Mbit/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_uplink_mbit: Option<u32>,
    /// How its stage's decodes use threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<DecodeThreads>,
    pub last_heartbeat_secs_ago: f64,
    /// Per shard, the bytes it fetched from each source: `seeder`, a node id, or an address.
    pub fetched_from: BTreeMap<u32, BTreeMap<String, u64>>,
    /// The stage it has loaded for serving, if any.
    pub stage: Option<u32>,
}

/// A node's relation to one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Shard bytes the registered nodes fetched, by source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchedBytes {
    pub from_seeder: u64,
    pub from_peers: u64,
}

/// One stage of the inference route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStage {
    pub shard_id: u32,
    pub node_id: String,
    /// The node's data-channel address.
    pub data_addr: String,
    /// How its caller (the coordinator for stage 0, else the previous stage) reaches it, as
    /// last measured; None until measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<Edge>,
    /// On the last stage of a route of several: how the coordinator's answer lane reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers_edge: Option<Edge>,
}

/// How one hop of the data channel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeKind {
    /// TCP to the callee's data port.
    Tcp,
    /// The mesh, UDP to an address of one of the callee's own interfaces: no NAT between.
    Direct,
    /// The mesh, UDP to an address a NAT mapped for the callee: the two punched a hole.
    Holepunched,
    /// The mesh, through the swarm's relay: nothing direct works (yet).
    Relayed,
}

impl EdgeKind {
    /// Its name, as `/status` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeKind::Tcp => "tcp",
            EdgeKind::Direct => "direct",
            EdgeKind::Holepunched => "holepunched",
            EdgeKind::Relayed => "relayed",
        }
    }
}

/// A hop's kind and measured round-trip time (the mesh measures it; TCP hops have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    pub kind: EdgeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u64>,
}

/// Why a node was dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eviction {
    pub name: String,
    pub shard_id: u32,
    pub reason: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// What `/status` shows of the serving.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Batching {
    /// Requests in a slot now.
    pub running: usize,
    /// Requests waiting for a slot.
    pub waiting: usize,
    pub steps: u64,
    pub generated_tokens: u64,
    /// Prompt tokens served from the cache, all requests together.
    pub cached_prompt_tokens: u64,
    /// Each stage's compute time since the coordinator started, stage 0 first.
    pub stage_busy_seconds: Vec<f64>,
    /// Each stage's busy share of the last few seconds of wall time.
    pub stage_busy_fraction: Vec<f64>,
    /// Micro-batches the pipeline keeps in flight now: `--micro-batches`, or chosen from the
    /// route's machines and its hops' measured delays.
    #[serde(default)]
    pub micro_batches: usize,
}

/// What the checks of holders' outputs found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verify {
    /// The share of finished requests checked (`--verify-fraction`).
    pub fraction: f64,
    pub tolerance: f32,
    pub requests_checked: u64,
    /// Stages compared across two or more holders.
    pub stage_comparisons: u64,
    /// Requests not checked: the checker was busy, or no shard had two holders.
    pub skipped: u64,
    /// Relative errors between holders that agreed: the honest distribution.
    pub honest_error_p50: f32,
    pub honest_error_p99: f32,
    pub honest_error_max: f32,
    /// Two holders that disagreed, with nobody to tell which is right.
    pub disputes: Vec<Dispute>,
    /// Probes that failed (a holder down or refusing).
    pub probe_failures: u64,
    /// Served requests whose every hop (the signed steps the stages received) and every
    /// sampled token were checked against the replay.
    #[serde(default)]
    pub served_checked: u64,
    /// Recalls of signed steps a route's node refused, failed or timed out on (each counts
    /// against the node: two evict it).
    #[serde(default)]
    pub recall_failures: u64,
}

/// Two holders of a shard whose outputs differ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispute {
    pub shard_id: u32,
    pub nodes: Vec<String>,
    pub error: f32,
}
