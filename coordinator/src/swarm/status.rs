//! The coordinator's `/status` document.

use std::collections::BTreeMap;
use std::time::Instant;

use super::{Holding, Swarm};

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
        })
    }
}
