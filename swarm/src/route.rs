//! Readiness and the inference route: the swarm is ready once `min_nodes` nodes are registered
//! and every shard is loaded somewhere; while ready, one node per shard forms the route, and
//! it serves once every stage on it has acknowledged its `ROUTE`.

use protocol::{
    host_of, Control, Message, Route, RouteParams, SwarmStateParams, BROADCAST, COORDINATOR,
};

use super::{Holding, NodeState, Outbox, RouteHop, Swarm};

impl Swarm {
    pub(super) fn loaded_count(&self) -> usize {
        (0..self.shards.len() as u32)
            .filter(|&id| self.holders(id) > 0)
            .count()
    }

    pub(super) fn update_ready(&mut self) -> Outbox {
        let mut out = self.update_ready_flag();
        out.extend(self.update_route());
        out
    }

    /// While ready, pick one node per shard and send each its `ROUTE` when the route changes.
    /// A stage keeps its node while that node holds the shard: a replica that finishes later
    /// never takes the place of a working stage (no needless replays, and a newcomer serves
    /// nothing before the checks have seen it). A lost stage goes to the first holder by id
    /// that is not already on the route (else to the first), preferring one in the same network
    /// as the stage before it (registered from the same address: behind the same NAT, so the
    /// hop between them runs on their LAN, never through the relay). A hop that stayed on the
    /// relay ([`Swarm::relayed_hops`]) gives its stage to another holder the caller has not
    /// been relayed to, where there is one.
    pub(super) fn update_route(&mut self) -> Outbox {
        // Hops that stayed on the relay are left when another holder can take the stage
        // (forgotten with their nodes).
        let nodes = &self.nodes;
        self.relayed_hops
            .retain(|(a, b)| nodes.contains_key(a) && nodes.contains_key(b));
        let serves = |n: &NodeState, id: u32| {
            matches!(n.shards.get(&id), Some(Holding::Loaded { .. })) && n.data_addr.is_some()
        };
        let hop = |n: &NodeState, id: u32| RouteHop {
            shard_id: id,
            node_id: n.node_id.clone(),
            data_addr: n.data_addr.clone().unwrap_or_default(),
            key: String::new(),
            signer: n.signing_key.clone(),
            mesh: self.mesh_of(&n.node_id),
        };
        let relayed = |from: Option<&str>, to: &NodeState| {
            from.is_some_and(|f| {
                self.relayed_hops
                    .contains(&(f.to_owned(), to.node_id.clone()))
            })
        };
        let current = |id: u32| {
            let node = &self.route.as_ref()?.get(id as usize)?.node_id;
            self.nodes.get(node).filter(|n| serves(n, id))
        };
        let route: Option<Vec<RouteHop>> = if self.ready {
            // A node runs one stage: a lost stage goes to a holder not already on the route
            // where there is one.
            let mut on_route: Vec<&str> = Vec::new();
            let mut previous: Option<&NodeState> = None;
            (0..self.shards.len() as u32)
                .map(|id| {
                    let caller = previous.map(|p| p.node_id.as_str());
                    let mut holders = self.nodes.values().filter(|n| serves(n, id));
                    let free = holders
                        .clone()
                        .filter(|n| !on_route.contains(&n.node_id.as_str()));
                    let mut unrelayed = free.clone().filter(|n| !relayed(caller, n));
                    let kept = current(id).filter(|n| {
                        let stays = !relayed(caller, n) || unrelayed.clone().next().is_none();
                        if !stays {
                            tracing::warn!(
                                "stage {id}: the hop from node {} to node {} stayed on the relay; the stage moves to another holder of shard {id}",
                                caller.unwrap_or_default(),
                                n.node_id
                            );
                        }
                        stays
                    });
                    let n = kept.or_else(|| {
                        let ip = previous.map(|p| p.peer_addr.ip());
                        let near = unrelayed.clone().find(|n| Some(n.peer_addr.ip()) == ip);
                        near.or_else(|| unrelayed.next())
                            .or_else(|| free.clone().next())
                            .or_else(|| holders.next())
                    })?;
                    on_route.push(&n.node_id);
                    previous = Some(n);
                    Some(hop(n, id))
                })
                .collect()
        } else {
            None
        };
        let same_stages = |a: &[RouteHop], b: &[RouteHop]| {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| {
                    // A mesh address that only learns more addresses is the same stage.
                    let endpoint = |h: &RouteHop| h.mesh.as_ref().map(|m| m.endpoint_id.clone());
                    (x.shard_id, &x.node_id, &x.data_addr, &x.signer, endpoint(x))
                        == (y.shard_id, &y.node_id, &y.data_addr, &y.signer, endpoint(y))
                })
        };
        let changed = match (&route, &self.route) {
            (None, None) => false,
            (Some(new), Some(old)) => !same_stages(new, old),
            _ => true,
        };
        if changed {
            // A new route, new keys: nobody outside it can open its data connections.
            self.route = route.map(|hops| {
                hops.into_iter()
                    .map(|hop| RouteHop {
                        key: protocol::secret::random_hex(32),
                        ..hop
                    })
                    .collect::<Vec<_>>()
            });
            if let Some(route) = &self.route {
                tracing::info!(
                    "route: {}",
                    route
                        .iter()
                        .map(|h| h.node_id.as_str())
                        .collect::<Vec<_>>()
                        .join(" -> ")
                );
            }
        }
        self.send_assignments()
    }

    /// What each node should run: the route's nodes their stage of it; while ready, every
    /// other node with a shard loaded that shard's stage as a replica (no hop key: it serves
    /// only the coordinator's probes, and is ready when failover puts it on the route).
    /// `ROUTE` goes to each node whose assignment changed.
    fn send_assignments(&mut self) -> Outbox {
        let mut want: std::collections::BTreeMap<String, RouteParams> = Default::default();
        let stage_count = self.shards.len() as u32;
        let base = |stage: u32| RouteParams {
            stage,
            stage_count,
            next: None,
            next_node: None,
            model_sha256: self.settings.model_sha256.clone(),
            split_id: self.settings.split_id.clone(),
            parallel: self.settings.parallel,
            co_located: 1,
            key: String::new(),
            next_key: None,
            probe_key: String::new(),
            previous_signer: None,
            next_mesh: None,
        };
        if let (true, Some(route)) = (self.ready, &self.route) {
            for (k, hop) in route.iter().enumerate() {
                let params = RouteParams {
                    next: route.get(k + 1).map(|h| h.data_addr.clone()),
                    next_node: route.get(k + 1).map(|h| h.node_id.clone()),
                    co_located: route
                        .iter()
                        .filter(|h| host_of(&h.data_addr) == host_of(&hop.data_addr))
                        .count() as u32,
                    key: hop.key.clone(),
                    next_key: route.get(k + 1).map(|h| h.key.clone()),
                    previous_signer: k.checked_sub(1).and_then(|p| route[p].signer.clone()),
                    next_mesh: route.get(k + 1).and_then(|h| h.mesh.clone()),
                    ..base(hop.shard_id)
                };
                want.entry(hop.node_id.clone()).or_insert(params);
            }
            for n in self.nodes.values() {
                let loaded = n
                    .shards
                    .iter()
                    .find(|(_, h)| matches!(h, Holding::Loaded { .. }));
                if let (Some((&shard, _)), Some(_)) = (loaded, &n.data_addr) {
                    want.entry(n.node_id.clone()).or_insert_with(|| base(shard));
                }
            }
        }
        self.probe_keys
            .retain(|node, _| self.nodes.contains_key(node));
        self.assigned.retain(|node, _| want.contains_key(node));
        self.stage_loaded
            .retain(|node, _| self.nodes.contains_key(node));
        let mut out = Vec::new();
        for (node, mut params) in want {
            params.probe_key = self
                .probe_keys
                .entry(node.clone())
                .or_insert_with(|| protocol::secret::random_hex(32))
                .clone();
            if self.assigned.get(&node) == Some(&params) {
                continue;
            }
            if self.assigned.get(&node).map(|p| p.stage) != Some(params.stage) {
                self.stage_loaded.remove(&node);
            }
            // The route serves once this node has applied its new ROUTE (new keys included).
            self.route_loaded.remove(&node);
            out.push((
                node.clone(),
                Control::new(
                    COORDINATOR,
                    &node,
                    Message::Route(Route::Assign(params.clone())),
                ),
            ));
            self.assigned.insert(node, params);
        }
        out
    }

    pub(super) fn update_ready_flag(&mut self) -> Outbox {
        let loaded = self.loaded_count();
        // The first route waits for claims being proved (milliseconds, at most CLAIM_WAIT):
        // a node about to prove what it holds would have had a stage of its own.
        let claims_pending = self.nodes.values().any(|n| !n.claimed.is_empty());
        let ready = self.nodes.len() >= self.settings.min_nodes
            && loaded == self.shards.len()
            && !self.shards.is_empty()
            && (self.ready || !claims_pending);
        if ready == self.ready {
            return Vec::new();
        }
        self.ready = ready;
        let params = SwarmStateParams {
            nodes: self.nodes.len(),
            min_nodes: self.settings.min_nodes,
            shards_loaded: loaded,
            shards: self.shards.len(),
        };
        let message = if ready {
            Message::SwarmReady(params)
        } else {
            Message::SwarmNotReady(params)
        };
        let command = message.command();
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
            Control::new(COORDINATOR, BROADCAST, message),
        )]
    }

    /// A node says the stage of its `ROUTE` is loaded (and how its decodes use threads).
    pub fn route_acked(&mut self, node: &str, stage: u32, decode: Option<protocol::DecodeThreads>) {
        if let (Some(n), Some(d)) = (self.nodes.get_mut(node), decode) {
            n.decode = Some(d);
        }
        if self.assigned.get(node).is_some_and(|p| p.stage == stage) {
            self.stage_loaded.insert(node.to_owned(), stage);
        }
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
}

/// How many machines a route's stages run on (judged by their data addresses' hosts): the
/// stages that can compute at the same time without sharing cores.
pub fn machines_in(route: &[RouteHop]) -> usize {
    let hosts: std::collections::BTreeSet<&str> =
        route.iter().map(|h| host_of(&h.data_addr)).collect();
    hosts.len()
}
