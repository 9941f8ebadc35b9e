//! The `params` of each control command: what the typed [`crate::Message`] variants carry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A shard a node holds and has verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldShard {
    pub shard_id: u32,
    pub sha256: String,
}

/// What a node can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Capacity {
    pub ram_bytes: u64,
    pub disk_free_bytes: u64,
    pub threads: u32,
    /// The node's links as its operator declared them (Mbit/s): first copies of shards go to
    /// fast uplinks, slow nodes trail as replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_mbit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downlink_mbit: Option<u32>,
}

/// `REGISTER`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterParams {
    /// Generated once, persisted in the node's data dir.
    pub node_id: String,
    pub protocol_version: u32,
    pub name: String,
    /// BitTorrent port other nodes reach this node's shards on.
    pub peer_port: u16,
    /// Inference data channel address (null until the node serves one).
    pub data_addr: Option<String>,
    pub shards: Vec<HeldShard>,
    pub capacity: Capacity,
    /// Shared secret (or the HTTP `Authorization: Bearer` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The node's Ed25519 public key (hex), made at start: it signs every step it sends to
    /// the next stage ([`crate::data::seal`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    /// The public half of the node's data-channel TLS key (PEM SubjectPublicKeyInfo), made at
    /// start: in a TLS swarm the coordinator certifies it, so the private half never leaves
    /// the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_public_key: Option<String>,
    /// Where the node is reached over the mesh (crate `mesh`): its endpoint id, and what it
    /// knows of its addresses now (HEARTBEAT brings later ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshAddr>,
}

/// `HEARTBEAT` (node → coordinator; the answer is empty): the node's mesh addresses now,
/// which change as it learns them (the relay it is homed on, the address its NAT maps it to).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshAddr>,
    /// How this stage reaches the next one on the route now (for `/status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_edge: Option<crate::status::Edge>,
}

/// Where a swarm member can be reached over the mesh (iroh, crate `mesh`): its endpoint id
/// (an Ed25519 public key, which every connection to it proves), the relay it is homed on and
/// the direct addresses it knows of itself. The coordinator is how members learn each other's:
/// there is no other discovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshAddr {
    pub endpoint_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_url: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addrs: Vec<String>,
    /// The IP addresses of the member's own interfaces: a path to one of them crosses no NAT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
}

/// The most direct addresses a [`MeshAddr`] may list.
pub const MAX_MESH_ADDRS: usize = 16;

impl MeshAddr {
    /// Whether a member's address is well formed: an endpoint id of 64 hex digits, at most
    /// [`MAX_MESH_ADDRS`] socket addresses, a relay URL of at most 256 bytes. Else why not.
    pub fn check(&self) -> Result<(), String> {
        let id = &self.endpoint_id;
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("mesh.endpoint_id must be 64 hex digits".into());
        }
        if self.addrs.len() > MAX_MESH_ADDRS || self.interfaces.len() > MAX_MESH_ADDRS {
            return Err(format!(
                "mesh.addrs or mesh.interfaces lists more than {MAX_MESH_ADDRS} addresses"
            ));
        }
        if let Some(bad) = self
            .interfaces
            .iter()
            .find(|a| a.parse::<std::net::IpAddr>().is_err())
        {
            return Err(format!("mesh.interfaces: {bad:?} is not an IP address"));
        }
        if let Some(bad) = self
            .addrs
            .iter()
            .find(|a| a.parse::<std::net::SocketAddr>().is_err())
        {
            return Err(format!("mesh.addrs: {bad:?} is not an IP address and port"));
        }
        if self.relay_url.as_ref().is_some_and(|u| u.len() > 256) {
            return Err("mesh.relay_url is longer than 256 bytes".into());
        }
        Ok(())
    }
}

/// The swarm's relay (on the seeder's host): its URL (`https://HOST:PORT`; it serves QUIC
/// address discovery on the same port number over UDP) and its certificate (PEM, self-signed:
/// members trust exactly it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    pub url: String,
    pub cert_pem: String,
}

/// `REGISTERED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredParams {
    /// sha256 of the source model (or the split id when it came in parts).
    pub model_sha256: String,
    pub split_id: String,
    /// Seconds between heartbeats the coordinator expects.
    pub heartbeat_interval_secs: u64,
    /// The node's TLS for the data channel, when the swarm runs TLS: the certificate of the key
    /// it named at REGISTER (signed by the swarm's CA), and the CA it trusts in others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<NodeTls>,
    /// The swarm's relay, when the seeder runs one: the node homes its mesh endpoint on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayInfo>,
}

/// A node's data-channel certificate (chain, the CA last) and the swarm's CA (PEM). No key:
/// the node made its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTls {
    pub ca_pem: String,
    pub cert_pem: String,
}

/// `LOAD_SHARD`: fetch and verify a shard, then keep seeding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadShardParams {
    pub shard_id: u32,
    /// File name (`shard-K.gguf`).
    pub file: String,
    pub size: u64,
    pub info_hash: String,
    pub magnet: String,
    pub torrent_url: String,
    pub sha256: String,
    /// Nodes (ip:port) that hold or are fetching this shard: connect to them first.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Use the seeder's tracker too. False makes a replica fetch from `peers` only, so the
    /// seeder sends the shard once; the coordinator turns it back on if those peers go away.
    #[serde(default = "yes")]
    pub use_tracker: bool,
    /// The seeder's own peer address, to count bytes from it apart from bytes from nodes.
    #[serde(default)]
    pub seeder_peer: Option<String>,
}

fn yes() -> bool {
    true
}

/// `SHARD_PROGRESS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardProgressParams {
    pub shard_id: u32,
    /// Bytes of the shard verified so far.
    pub bytes: u64,
    pub total: u64,
    /// Bytes fetched this session from the seeder and from other nodes.
    pub from_seeder: u64,
    pub from_peers: u64,
    /// Bytes fetched this session from each peer, by its BitTorrent address (the seeder's
    /// included): where the shard came from, shown per node in `/status`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_source: BTreeMap<String, u64>,
    /// The node's upload rate over all its shards right now (Mbit/s, librqbit's estimate): a
    /// measured uplink for nodes that declared none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_mbit: Option<u32>,
}

/// `SHARD_LOADED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLoadedParams {
    pub shard_id: u32,
    pub sha256: String,
    pub from_seeder: u64,
    pub from_peers: u64,
    /// As in `SHARD_PROGRESS`: bytes from each peer address.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_source: BTreeMap<String, u64>,
}

/// `SHARD_FAILED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardFailedParams {
    pub shard_id: u32,
    pub code: String,
    pub message: String,
}

/// `UNLOAD_SHARD`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnloadShardParams {
    pub shard_id: u32,
    /// Delete the file too (default: keep it).
    #[serde(default)]
    pub delete: bool,
}

/// `SWARM_READY` / `SWARM_NOT_READY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmStateParams {
    pub nodes: usize,
    pub min_nodes: usize,
    pub shards_loaded: usize,
    pub shards: usize,
}

/// `ROUTE`: the inference pipeline, one node per shard in order; sent to each of them when the
/// swarm becomes ready (and again whenever the route changes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteParams {
    /// The stage this node runs (its shard id).
    pub stage: u32,
    pub stage_count: u32,
    /// Data address of the next stage; None on the last stage.
    pub next: Option<String>,
    /// The next stage's node id: its data-channel certificate names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_node: Option<String>,
    pub model_sha256: String,
    pub split_id: String,
    /// Sequences (requests) each stage keeps at once: the coordinator's `--parallel`.
    #[serde(default = "one")]
    pub parallel: u32,
    /// Stages of the route on this node's machine (by the host of their data addresses), this
    /// one included: such stages share the machine's cores when they work at the same time.
    #[serde(default = "one")]
    pub co_located: u32,
    /// The key the caller of this stage must prove on the data channel (and this stage proves
    /// back): made by the coordinator for this hop of this route, known only to the two ends.
    #[serde(default)]
    pub key: String,
    /// The key of the hop to the next stage; None on the last stage (and on a node that
    /// holds the stage only as a replica: it runs probes, not the pipeline).
    #[serde(default)]
    pub next_key: Option<String>,
    /// The key the coordinator proves when it probes this node's stage (replays a request
    /// through it to compare its output with other holders').
    #[serde(default)]
    pub probe_key: String,
    /// The previous stage's public key (stage 0 and replicas: none): every step this stage
    /// gets on the route must be signed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_signer: Option<String>,
    /// The next stage over the mesh: when set, this stage dials it there (by endpoint id,
    /// through the relay if nothing direct works) instead of TCP to `next`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_mesh: Option<MeshAddr>,
}

fn one() -> u32 {
    1
}

/// How a node runs its stage's decode threads, and why: the node measures the candidates when
/// it loads a stage and keeps the fastest, unless `--threads`/`--pin-threads` fixed them. Sent
/// in the `ROUTE` reply; `/status` shows it per node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeThreads {
    /// `one` (the decoding thread alone), `team` (an OpenMP team, threads free to run
    /// anywhere) or `team-pinned` (a team, each thread on a core of its own).
    pub policy: String,
    /// The most threads a decode uses (fewer while co-located stages work at once).
    pub threads: u32,
    /// The cores a pinned team runs on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpus: Vec<usize>,
    /// `measured` (the fastest of `measured_ms`), `flags` (fixed by the node's settings, or
    /// the machine left one choice) or `default` (measuring failed: one thread).
    pub chosen_by: String,
    /// Milliseconds per decode of this stage under each candidate, by policy name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub measured_ms: BTreeMap<String, f64>,
}

/// `ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorParams {
    pub code: String,
    pub message: String,
}
