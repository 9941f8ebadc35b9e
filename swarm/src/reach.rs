//! How members reach each other: where each is on the mesh and how it reaches the next stage
//! (`REGISTER`, then `HEARTBEAT`), and whether its BitTorrent port can be dialled (the
//! coordinator's check: a node behind NAT is no replica's only source).

use crate::{Outbox, Swarm};

/// How many heartbeats in a row must say a hop runs through the relay before the route
/// moves its stage to another holder: every mesh connection starts on the relay and
/// moves to a direct path once a hole is punched, a second or two later.
pub const RELAYED_BEATS_TO_MOVE: u32 = 3;

/// The most round trip one hop counts for in [`Swarm::chain_wire`].
pub const MAX_HOP_RTT: std::time::Duration = std::time::Duration::from_secs(2);

/// How often a node's relayed edge to the next stage may be logged.
const RELAYED_SAID_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Swarm {
    /// Where `node` is reached over the mesh, in a swarm whose data channel runs there.
    pub fn mesh_of(&self, node: &str) -> Option<protocol::MeshAddr> {
        if !self.settings.mesh {
            return None;
        }
        self.nodes.get(node)?.mesh.clone()
    }

    /// The one-way delay of the route's hops between stages: half of each round trip its
    /// stages measured to their next stage (a hop over TCP, or not measured yet, counts
    /// nothing). The coordinator keeps more micro-batches in flight on a slow route. A member
    /// may report what it likes: each hop counts at most [`MAX_HOP_RTT`], and the most it can
    /// make the coordinator do is cut batches to one sequence each.
    pub fn chain_wire(&self) -> std::time::Duration {
        let Some(route) = self.route.as_ref() else {
            return std::time::Duration::ZERO;
        };
        let max_us = MAX_HOP_RTT.as_micros() as u64;
        let rtt_us: u64 = route
            .iter()
            .take(route.len().saturating_sub(1))
            .filter_map(|hop| self.nodes.get(&hop.node_id)?.next_edge?.rtt_us)
            .map(|us| us.min(max_us))
            .sum();
        std::time::Duration::from_micros(rtt_us / 2)
    }

    /// Whether the coordinator could dial `node`'s BitTorrent port. A node that cannot be
    /// dialled (behind NAT) still fetches over its own connections, but stops being a source:
    /// a replica fetching from it alone goes to the tracker ([`Swarm::place`]).
    pub fn dialed(&mut self, node: &str, dialable: bool) -> Outbox {
        let Some(n) = self.nodes.get_mut(node) else {
            return Vec::new();
        };
        if n.peer_dialable == Some(dialable) {
            return Vec::new();
        }
        n.peer_dialable = Some(dialable);
        if !dialable {
            tracing::info!(
                "node {node}: its BitTorrent port {} cannot be dialled (behind NAT or a firewall): it fetches over its own connections and is no replica's only source",
                n.peer_addr
            );
        }
        self.place()
    }

    /// A heartbeat from `node`: its mesh address now (kept if well formed and of the
    /// endpoint it registered: its key does not change while it runs) and how it reaches the
    /// next stage. Else why not. A hop that stays relayed ([`RELAYED_BEATS_TO_MOVE`]) is
    /// remembered, and the route moves its stage to another holder if there is one.
    pub fn heard(&mut self, node: &str, p: &protocol::HeartbeatParams) -> Result<Outbox, String> {
        let Some(n) = self.nodes.get_mut(node) else {
            return Err("not registered".into());
        };
        if let Some(mesh) = &p.mesh {
            mesh.check()?;
            if let Some(old) = n
                .mesh
                .as_ref()
                .filter(|o| o.endpoint_id != mesh.endpoint_id)
            {
                return Err(format!(
                    "mesh endpoint {} is not the one it registered ({})",
                    mesh.endpoint_id, old.endpoint_id
                ));
            }
            n.mesh = Some(mesh.clone());
        }
        let relayed = |e: Option<protocol::status::Edge>| {
            e.is_some_and(|e| e.kind == protocol::status::EdgeKind::Relayed)
        };
        // Said at most once a minute per node: a node flipping its edge in every heartbeat
        // (which it may send as fast as it likes) does not flood the log.
        let quiet = n
            .relayed_said_at
            .is_some_and(|at| at.elapsed() < RELAYED_SAID_EVERY);
        if relayed(p.next_edge) && !relayed(n.next_edge) && !quiet {
            n.relayed_said_at = Some(std::time::Instant::now());
            tracing::warn!(
                "node {node} reaches the next stage only through the relay: no direct path and no punched hole (UDP between them blocked?); every token crosses the relay"
            );
        }
        n.next_edge = p.next_edge;
        n.relayed_beats = if relayed(p.next_edge) {
            n.relayed_beats.saturating_add(1)
        } else {
            0
        };
        if n.relayed_beats != RELAYED_BEATS_TO_MOVE {
            return Ok(Vec::new());
        }
        let route = self.route.as_deref().unwrap_or_default();
        let Some(next) = route
            .iter()
            .position(|h| h.node_id == node)
            .and_then(|k| route.get(k + 1))
        else {
            return Ok(Vec::new());
        };
        self.relayed_hops
            .insert((node.to_owned(), next.node_id.clone()));
        // Counted afresh for the hop to whichever stage follows now.
        if let Some(n) = self.nodes.get_mut(node) {
            n.relayed_beats = 0;
        }
        Ok(self.update_route())
    }
}
