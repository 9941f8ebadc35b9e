//! The swarm's part of the `/status` document.

use std::collections::BTreeMap;
use std::time::Instant;

use protocol::status::{Batching, FetchedBytes, NodeStatus, RouteStage, Status, Verify};

use super::{Holding, HoldingRules, NodeState, Swarm};

impl Swarm {
    /// The `/status` document, with the serving's counts and the checks' findings.
    pub fn status(&self, batching: Option<Batching>, verify: Verify) -> Status {
        let placement = (0..self.shards.len() as u32)
            .map(|id| {
                let holders = self
                    .nodes
                    .values()
                    .filter(|n| n.shards.get(&id).is_some_and(Holding::counts))
                    .map(|n| n.node_id.clone())
                    .collect();
                (id, holders)
            })
            .collect();
        let (from_seeder, from_peers) = self.fetched_bytes();
        let now = Instant::now();
        let nodes = self
            .nodes
            .values()
            .map(|n| NodeStatus {
                node_id: n.node_id.clone(),
                name: n.name.clone(),
                peer_addr: n.peer_addr.to_string(),
                peer_dialable: n.peer_dialable,
                data_addr: n.data_addr.clone(),
                capacity: n.capacity,
                shards: n.shards.clone(),
                measured_uplink_mbit: n.measured_uplink_mbit,
                decode: n.decode.clone(),
                last_heartbeat_secs_ago: now.duration_since(n.last_seen).as_secs_f64(),
                fetched_from: self.fetched_from(n),
                stage: self.stage_loaded.get(&n.node_id).copied(),
            })
            .collect();
        // Each stage's caller says how it reaches it (stage 0's caller is the coordinator,
        // which fills that in).
        let route = self.route.as_ref().map(|hops| {
            hops.iter()
                .enumerate()
                .map(|(k, h)| RouteStage {
                    shard_id: h.shard_id,
                    node_id: h.node_id.clone(),
                    data_addr: h.data_addr.clone(),
                    edge: k
                        .checked_sub(1)
                        .and_then(|p| self.nodes.get(&hops[p].node_id))
                        .and_then(|n| n.next_edge),
                    answers_edge: None,
                })
                .collect()
        });
        Status {
            ready: self.ready,
            min_nodes: self.settings.min_nodes,
            model_sha256: self.settings.model_sha256.clone(),
            split_id: self.settings.split_id.clone(),
            shards: self.shards.clone(),
            shards_loaded: self.loaded_count(),
            nodes,
            placement,
            bytes: FetchedBytes {
                from_seeder,
                from_peers,
            },
            route,
            serving: self.serving_route().is_some(),
            evicted: self.evicted.clone(),
            batching,
            verify,
        }
    }

    /// A node's bytes per shard by source: `seeder`, another node's id (a peer address it
    /// registered), or the address itself (a node that connected to this one comes from a port
    /// of its own choosing).
    fn fetched_from(&self, n: &NodeState) -> BTreeMap<u32, BTreeMap<String, u64>> {
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
                (*shard, named)
            })
            .collect()
    }
}
