//! Placement: a node keeps the verified shards it registers with; every shard without a holder
//! goes to a node with room that holds nothing, else to one holding only replicas, else (once
//! `min_nodes` are registered, so no more are awaited) to the least loaded, the fastest uplink
//! first among equals (declared at REGISTER, else measured while fetching), and it takes the
//! uncovered shard that keeps the route's stages of one network together
//! ([`Swarm::network_fit`]); a node holding
//! nothing gets a replica of the least-covered shard. A shard's holders form a chain: each
//! replica fetches from the holder before it and from complete holders ([`Swarm::chain_peers`]),
//! never from the seeder, so the seeder sends each shard about once; if the first holder goes
//! away mid-transfer, the replica furthest along is told to use the tracker.

use std::net::IpAddr;
use std::time::Instant;

use protocol::{Control, LoadShardParams, Message, COORDINATOR};

use super::{Holding, HoldingRules, NodeState, Outbox, Swarm};

impl Swarm {
    /// The nodes `node` can fetch `shard_id` from without the tracker: those that hold or
    /// fetch it and can be dialled. A node behind NAT (its BitTorrent port failed the
    /// coordinator's dial) is no source: a replica told to fetch from it alone would wait
    /// forever, so it fetches through the tracker instead.
    pub(super) fn sources<'a>(
        &'a self,
        node: &'a str,
        shard_id: u32,
    ) -> impl Iterator<Item = &'a NodeState> {
        self.nodes.values().filter(move |n| {
            n.node_id != node
                && n.peer_dialable != Some(false)
                && matches!(
                    n.shards.get(&shard_id),
                    Some(Holding::Loaded { .. } | Holding::Fetching { .. })
                )
        })
    }

    /// The peers `node` fetches `shard_id` from: the shard's holders are a chain in the order
    /// they were given it (fast uplinks first), each fetching from the one before while it is
    /// itself fetching, so every uplink carries the shard about once and pieces flow down the
    /// chain as they arrive. Holders that have the whole shard serve everyone after them.
    /// With no holder before it in the chain, every source.
    fn chain_peers(&self, node: &str, shard_id: u32) -> Vec<String> {
        let mine = self
            .nodes
            .get(node)
            .and_then(|n| n.shard_order.get(&shard_id).copied());
        let before = |n: &NodeState| {
            n.shard_order
                .get(&shard_id)
                .is_some_and(|o| mine.is_none_or(|m| *o < m))
        };
        let mut peers: Vec<&NodeState> = self
            .sources(node, shard_id)
            .filter(|n| matches!(n.shards.get(&shard_id), Some(Holding::Loaded { .. })))
            .collect();
        let predecessor = self
            .sources(node, shard_id)
            .filter(|n| matches!(n.shards.get(&shard_id), Some(Holding::Fetching { .. })))
            .filter(|n| before(n))
            .max_by_key(|n| n.shard_order.get(&shard_id).copied());
        peers.extend(predecessor);
        if peers.is_empty() {
            peers = self.sources(node, shard_id).collect();
        }
        let mut addrs: Vec<String> = peers.iter().map(|n| n.peer_addr.to_string()).collect();
        addrs.sort();
        addrs.dedup();
        addrs
    }

    pub(super) fn load_shard(
        &mut self,
        node: &str,
        shard_id: u32,
        use_tracker: bool,
    ) -> (String, Control) {
        let peers = self.chain_peers(node, shard_id);
        if let Some(n) = self.nodes.get_mut(node) {
            n.given_peers.insert(shard_id, peers.clone());
        }
        let s = &self.shards[shard_id as usize];
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
            seeder_peer: self.settings.seeder_peer.clone(),
        };
        (
            node.to_owned(),
            Control::new(COORDINATOR, node, Message::LoadShard(params)),
        )
    }

    /// Nodes with the shard loaded.
    pub fn holders(&self, shard_id: u32) -> usize {
        self.nodes
            .values()
            .filter(|n| matches!(n.shards.get(&shard_id), Some(Holding::Loaded { .. })))
            .count()
    }

    /// Shard bytes the registered nodes fetched: (from the seeder, from other nodes).
    pub fn fetched_bytes(&self) -> (u64, u64) {
        self.nodes
            .values()
            .flat_map(|n| n.shards.values().map(Holding::bytes))
            .fold((0, 0), |(s, p), (ds, dp)| (s + ds, p + dp))
    }

    /// How many nodes hold or fetch `shard_id`, or claimed it and are being asked to prove
    /// it (for at most [`crate::CLAIM_WAIT`]): placement gives it to nobody else meanwhile.
    pub(super) fn coverage(&self, shard_id: u32) -> usize {
        self.nodes
            .values()
            .filter(|n| {
                n.shards.get(&shard_id).is_some_and(Holding::counts)
                    || n.claimed.contains_key(&shard_id)
            })
            .count()
    }

    /// How well `shard_id` suits a node in the network at `ip` (registered from that
    /// address: one home behind its NAT, or one LAN), lower first: the route runs through
    /// the shards in order, and a hop between two stages of one network stays on its LAN
    /// while a hop between networks crosses the internet (tens of milliseconds a token). So
    /// a shard next to one this network covers comes first; then one with no covered
    /// neighbour, the farther from other networks' shards the better (room for this
    /// network's next nodes); last, one next to another network's shard.
    fn network_fit(&self, ip: IpAddr, shard_id: u32) -> (u8, std::cmp::Reverse<u32>, u32) {
        let covered_by = |id: u32| {
            self.nodes
                .values()
                .filter(|n| n.shards.get(&id).is_some_and(Holding::counts))
                .map(|n| n.peer_addr.ip())
                .collect::<Vec<_>>()
        };
        let neighbours = [shard_id.checked_sub(1), shard_id.checked_add(1)];
        let near: Vec<IpAddr> = neighbours
            .into_iter()
            .flatten()
            .filter(|id| (*id as usize) < self.shards.len())
            .flat_map(covered_by)
            .collect();
        if near.contains(&ip) {
            return (0, std::cmp::Reverse(0), shard_id);
        }
        if !near.is_empty() {
            return (2, std::cmp::Reverse(0), shard_id);
        }
        let farthest = (0..self.shards.len() as u32)
            .filter(|&id| covered_by(id).iter().any(|other| *other != ip))
            .map(|id| id.abs_diff(shard_id))
            .min()
            .unwrap_or(u32::MAX);
        (1, std::cmp::Reverse(farthest), shard_id)
    }

    /// Place uncovered shards and replicas, fix stranded replicas, and update readiness.
    pub fn place(&mut self) -> Outbox {
        let mut out = Vec::new();
        // When nodes declare their links, nothing is placed before the nodes the swarm awaits
        // have come (or the settling time is over), so that first copies go to the fastest
        // uplinks, not to the first nodes to register.
        let links_known = self
            .nodes
            .values()
            .any(|n| n.capacity.uplink_mbit.is_some());
        if links_known
            && self.nodes.len() < self.settings.min_nodes
            && Instant::now() < self.settle_until
        {
            out.extend(self.update_ready());
            return out;
        }
        // Every shard on at least one node: the node first (empty nodes, then fast uplinks),
        // then which uncovered shard it takes (see `network_fit`).
        let enough_nodes = self.nodes.len() >= self.settings.min_nodes;
        let settled = Instant::now() >= self.settle_until;
        loop {
            let uncovered: Vec<u32> = (0..self.shards.len() as u32)
                .filter(|id| self.coverage(*id) == 0)
                .collect();
            if uncovered.is_empty() {
                break;
            }
            let pick = self
                .nodes
                .values()
                .flat_map(|n| uncovered.iter().map(move |&shard_id| (n, shard_id)))
                .filter(|(n, shard_id)| {
                    !(n.shards.get(shard_id).is_some_and(Holding::counts)
                        || n.failed_recently(*shard_id))
                        && n.has_room_for(&self.shards[*shard_id as usize], &self.shards)
                })
                .map(|(n, shard_id)| {
                    // Nodes holding nothing first, then nodes holding only replicas; a node
                    // that holds a shard nobody else has takes a second one only once no more
                    // nodes are awaited.
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
                    let fastest_first = std::cmp::Reverse(n.uplink_mbit());
                    let fit = self.network_fit(n.peer_addr.ip(), shard_id);
                    let key = (rank, counted.len(), fastest_first, n.node_id.clone(), fit);
                    (key, shard_id)
                })
                .filter(|((rank, ..), _)| *rank == 0 || (settled && (*rank < 2 || enough_nodes)))
                .min()
                .map(|((.., node, _), shard_id)| (node, shard_id));
            let Some((node, shard_id)) = pick else {
                if enough_nodes {
                    for shard_id in uncovered {
                        tracing::warn!(
                            "no node has room for shard {shard_id} ({} bytes)",
                            self.shards[shard_id as usize].size
                        );
                    }
                }
                break; // else more nodes are awaited
            };
            self.assign(&node, shard_id);
            out.push(self.load_shard(&node, shard_id, true));
        }
        // Nodes holding nothing get a replica of the least-covered shard.
        // Fast uplinks first: they come earlier in their shard's chain.
        let mut idle: Vec<(std::cmp::Reverse<u64>, String)> = self
            .nodes
            .values()
            .filter(|n| !n.shards.values().any(Holding::counts))
            .map(|n| (std::cmp::Reverse(n.uplink_mbit()), n.node_id.clone()))
            .collect();
        idle.sort();
        let idle: Vec<String> = idle.into_iter().map(|(_, id)| id).collect();
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
        // A shard whose holders are all replicas still fetching has lost what fed them (its
        // first holder went away mid-transfer): the one furthest along goes to the seeder's
        // tracker and feeds the others, which keep what they have.
        let mut promoted: Vec<(String, u32)> = Vec::new();
        for shard_id in 0..self.shards.len() as u32 {
            let fed = self.nodes.values().any(|n| {
                matches!(
                    n.shards.get(&shard_id),
                    Some(
                        Holding::Loaded { .. }
                            | Holding::Fetching {
                                use_tracker: true,
                                ..
                            }
                    )
                )
            });
            let furthest = self
                .nodes
                .values()
                .filter_map(|n| match n.shards.get(&shard_id) {
                    Some(Holding::Fetching { bytes, .. }) => Some((*bytes, n.node_id.clone())),
                    _ => None,
                })
                .max();
            if let (false, Some((_, node))) = (fed, furthest) {
                promoted.push((node, shard_id));
            }
        }
        for (node, shard_id, waiting) in replicas {
            let has_source = self.sources(&node, shard_id).next().is_some();
            // A waiting replica starts once a source has verified a piece: its torrent is then
            // live and takes connections. Started with a source that is still adding its
            // torrent, the replica's connection is refused and librqbit retries only after a
            // back-off (seen: 12 s idle at the start of bench/swarm.py, N=8).
            let chain = self.chain_peers(&node, shard_id);
            let live_source = self.sources(&node, shard_id).any(|n| {
                chain.contains(&n.peer_addr.to_string())
                    && matches!(
                        n.shards.get(&shard_id),
                        Some(Holding::Loaded { .. } | Holding::Fetching { bytes: 1.., .. })
                    )
            });
            // A fetching replica that lost a peer it was given (the holder before it in the
            // chain went away) is told its new peers.
            let current: Vec<String> = self
                .sources(&node, shard_id)
                .map(|n| n.peer_addr.to_string())
                .collect();
            let lost_a_peer = self.nodes[&node]
                .given_peers
                .get(&shard_id)
                .is_some_and(|given| given.iter().any(|p| !current.contains(p)));
            let chain_changed = !waiting && lost_a_peer && live_source;
            let use_tracker = match (waiting, has_source) {
                _ if promoted.contains(&(node.clone(), shard_id)) => true,
                (true, true) if !live_source => continue,
                (true, true) => false,
                (_, false) => true,
                (false, true) if chain_changed => false,
                (false, true) => continue,
            };
            if use_tracker && has_source {
                tracing::info!(
                    "shard {shard_id}: no holder is fed by the seeder any more; {node} fetches the rest through the tracker"
                );
            }
            let total = self.shards[shard_id as usize].size;
            let holding = self
                .nodes
                .get_mut(&node)
                .expect("known node")
                .shards
                .entry(shard_id)
                .or_insert(Holding::Waiting);
            match holding {
                Holding::Fetching {
                    use_tracker: mode, ..
                } => *mode = use_tracker,
                other => {
                    *other = Holding::Fetching {
                        bytes: 0,
                        total,
                        from_seeder: 0,
                        from_peers: 0,
                        use_tracker,
                    }
                }
            }
            out.push(self.load_shard(&node, shard_id, use_tracker));
        }
        out.extend(self.update_ready());
        out
    }

    /// Give `shard_id` to `node`. The first holder fetches it through the seeder's tracker at
    /// once; a replica (started by [`Swarm::place`]) fetches from every node that holds or
    /// fetches the shard, and those that start later fetch from it too: the shard's holders are
    /// a swarm of their own, fed by the first holder, so the seeder sends each shard about once
    /// and every new holder adds its uplink. Before, a replica trailed the first holder alone,
    /// and k replicas shared that one uplink (bench/swarm.py, N=16: 2.08x the bound).
    pub(super) fn assign(&mut self, node: &str, shard_id: u32) {
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
        let order = self.next_order;
        self.next_order += 1;
        let n = self.nodes.get_mut(node).expect("assigning to a known node");
        n.shards.insert(shard_id, holding);
        n.shard_order.insert(shard_id, order);
        tracing::info!(
            "placing shard {shard_id} on node {node}{}",
            if primary { "" } else { " (replica)" }
        );
    }
}
