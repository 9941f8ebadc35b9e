//! What the swarm knows of one node: where it is, what it holds or fetches, what it fetched
//! from whom, and the rules read off that (whether a holding counts, whether a shard fits).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use protocol::Capacity;

use crate::{Claim, Holding, ShardSpec};

/// How long a node that failed a shard waits before it is given that shard again (a full
/// disk or a broken download would otherwise fail and be retried as fast as messages go).
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(30);

/// What the swarm rules read off a node's relation to a shard ([`Holding`]).
pub(crate) trait HoldingRules {
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
    /// Whether the coordinator could dial `peer_addr` (None: not tried yet).
    pub peer_dialable: Option<bool>,
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
    /// Where it is reached over the mesh (REGISTER, then HEARTBEAT).
    pub mesh: Option<protocol::MeshAddr>,
    /// How it reaches the next stage of the route, as it last said (HEARTBEAT).
    pub next_edge: Option<protocol::status::Edge>,
    /// When the coordinator last logged that edge turning relayed.
    pub relayed_said_at: Option<Instant>,
    /// Heartbeats in a row that said that edge runs through the relay.
    pub relayed_beats: u32,
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
pub(crate) fn bounded_sources(sources: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
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
    pub(crate) fn was_given(&self, shard: u32) -> bool {
        self.shards.contains_key(&shard)
    }

    /// Whether it may report `what` on `shard` ([`NodeState::was_given`]); a report it may
    /// not make is logged and ignored.
    pub(crate) fn may_report(&self, shard: u32, what: &str) -> bool {
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
    pub(crate) fn failed_recently(&self, shard: u32) -> bool {
        matches!(self.shards.get(&shard), Some(Holding::Failed { .. }))
            && self
                .failed_at
                .get(&shard)
                .is_some_and(|at| at.elapsed() < RETRY_FAILED_AFTER)
    }

    pub(crate) fn assigned_bytes(&self, shards: &[ShardSpec]) -> u64 {
        self.shards
            .iter()
            .filter(|(_, h)| h.counts())
            .map(|(id, _)| shards[*id as usize].size)
            .sum()
    }

    /// Its uplink in Mbit/s: as declared, else the highest rate it was seen uploading, else
    /// unknown (0: ranked after every node with a known uplink).
    pub(crate) fn uplink_mbit(&self) -> u64 {
        match (self.capacity.uplink_mbit, self.measured_uplink_mbit) {
            (Some(declared), _) => u64::from(declared),
            (None, Some(measured)) => u64::from(measured),
            (None, None) => 0,
        }
    }

    pub(crate) fn has_room_for(&self, shard: &ShardSpec, shards: &[ShardSpec]) -> bool {
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
