//! The coordinator's `/status` document.

use std::collections::BTreeMap;
use std::time::Instant;

use super::{Holding, NodeState, Swarm};

impl Swarm {
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
        let (from_seeder, from_peers) = self.fetched_bytes();
        let now = Instant::now();
        let nodes: Vec<serde_json::Value> = self
            .nodes
            .values()
            .map(|n| {
                let mut v = serde_json::to_value(n).expect("node serialises");
                v["last_heartbeat_secs_ago"] = now.duration_since(n.last_seen).as_secs_f64().into();
                v["fetched_from"] = self.fetched_from(n).into();
                v["stage"] = self.stage_loaded.get(&n.node_id).copied().into();
                v
            })
            .collect();
        serde_json::json!({
            "ready": self.ready,
            "min_nodes": self.settings.min_nodes,
            "model_sha256": self.settings.model_sha256,
            "split_id": self.settings.split_id,
            "shards": self.shards,
            "shards_loaded": self.loaded_count(),
            "nodes": nodes,
            "placement": placement,
            "bytes": {"from_seeder": from_seeder, "from_peers": from_peers},
            "route": self.route,
            "serving": self.serving_route().is_some(),
            "evicted": self.evicted,
        })
    }

    /// A node's bytes per shard by source: `seeder`, another node's id (a peer address it
    /// registered), or the address itself (a node that connected to this one comes from a port
    /// of its own choosing).
    fn fetched_from(&self, n: &NodeState) -> serde_json::Map<String, serde_json::Value> {
        let name = |addr: &str| -> String {
            if self.settings.seeder_peer.as_deref() == Some(addr) {
                return "seeder".into();
            }
            self.nodes
                .values()
                .find(|m| m.peer_addr.to_string() == addr)
                .map_or_else(|| addr.to_string(), |m| m.node_id.clone())
        };
        n.fetched_from
            .iter()
            .map(|(shard, sources)| {
                let mut named = BTreeMap::<String, u64>::new();
                for (addr, bytes) in sources {
                    *named.entry(name(addr)).or_default() += bytes;
                }
                (shard.to_string(), serde_json::json!(named))
            })
            .collect()
    }
}
