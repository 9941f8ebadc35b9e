//! Readiness and the inference route: the swarm is ready once `min_nodes` nodes are registered
//! and every shard is loaded somewhere; while ready, one node per shard forms the route, and
//! it serves once every stage on it has acknowledged its `ROUTE`.

use protocol::{Control, Message, Route, RouteParams, SwarmStateParams, BROADCAST, COORDINATOR};

use super::{Holding, Outbox, RouteHop, Swarm};

impl Swarm {
    pub(super) fn loaded_count(&self) -> usize {
        (0..self.shards.len() as u32)
            .filter(|id| {
                self.nodes
                    .values()
                    .any(|n| matches!(n.shards.get(id), Some(Holding::Loaded { .. })))
            })
            .count()
    }

    pub(super) fn update_ready(&mut self) -> Outbox {
        let mut out = self.update_ready_flag();
        out.extend(self.update_route());
        out
    }

    /// While ready, pick one node per shard (the first by id that has it loaded and a data
    /// address) and send each its `ROUTE` when the route changes.
    pub(super) fn update_route(&mut self) -> Outbox {
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
                                key: String::new(),
                            }),
                            _ => None,
                        })
                })
                .collect()
        } else {
            None
        };
        let same_stages = |a: &[RouteHop], b: &[RouteHop]| {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| {
                    (x.shard_id, &x.node_id, &x.data_addr) == (y.shard_id, &y.node_id, &y.data_addr)
                })
        };
        match (&route, &self.route) {
            (None, None) => return Vec::new(),
            (Some(new), Some(old)) if same_stages(new, old) => return Vec::new(),
            _ => {}
        }
        // A new route, new keys: nobody outside it can open its data connections.
        let route = route.map(|hops| {
            hops.into_iter()
                .map(|hop| RouteHop {
                    key: daemon::secret::random_hex(32),
                    ..hop
                })
                .collect::<Vec<_>>()
        });
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
                    model_sha256: self.settings.model_sha256.clone(),
                    split_id: self.settings.split_id.clone(),
                    parallel: self.settings.parallel,
                    co_located: route
                        .iter()
                        .filter(|h| host_of(&h.data_addr) == host_of(&hop.data_addr))
                        .count() as u32,
                    key: hop.key.clone(),
                    next_key: route.get(k + 1).map(|h| h.key.clone()),
                };
                (
                    hop.node_id.clone(),
                    Control::new(
                        COORDINATOR,
                        &hop.node_id,
                        Message::Route(Route::Assign(params)),
                    ),
                )
            })
            .collect()
    }

    pub(super) fn update_ready_flag(&mut self) -> Outbox {
        let loaded = self.loaded_count();
        let ready = self.nodes.len() >= self.settings.min_nodes
            && loaded == self.shards.len()
            && !self.shards.is_empty();
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
}

/// How many machines a route's stages run on (judged by their data addresses' hosts): the
/// stages that can compute at the same time without sharing cores.
pub fn machines_in(route: &[RouteHop]) -> usize {
    let hosts: std::collections::BTreeSet<&str> =
        route.iter().map(|h| host_of(&h.data_addr)).collect();
    hosts.len()
}

/// The host part of `host:port` (an IPv6 address keeps its brackets).
fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}
