//! What the coordinator checks of a node once it registers, beside the swarm's rules: that it
//! holds the shards it says it holds (a possession challenge against the seeder's bytes), and
//! whether other members can dial its BitTorrent port (a node behind NAT cannot).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::hub::Hub;

/// Start both checks of a node that just registered.
pub(super) fn registered(hub: &Arc<Hub>, node: &str) {
    tokio::spawn(challenge_claims(hub.clone(), node.to_owned()));
    let peer = hub
        .swarm
        .lock()
        .unwrap()
        .nodes
        .get(node)
        .map(|n| n.peer_addr);
    if let Some(peer) = peer {
        tokio::spawn(check_dialable(hub.clone(), node.to_owned(), peer));
    }
}

/// How long a node's BitTorrent port has to take the coordinator's connection.
const DIAL_TIME: Duration = Duration::from_secs(5);

/// Dial `node`'s BitTorrent port once (a TCP connect, closed at once): whether other members
/// can fetch from it, or it is behind a NAT or firewall ([`crate::swarm::Swarm::dialed`]).
async fn check_dialable(hub: Arc<Hub>, node: String, peer: SocketAddr) {
    let dialed = tokio::time::timeout(DIAL_TIME, tokio::net::TcpStream::connect(peer)).await;
    let out = hub
        .swarm
        .lock()
        .unwrap()
        .dialed(&node, matches!(dialed, Ok(Ok(_))));
    hub.dispatch(out);
}

/// The most bytes a possession challenge reads (from the seeder and on the node).
const CHALLENGE_BYTES: u64 = 64 << 10;

/// Ask `node` to prove each shard it says it holds (at `REGISTER`, or by `SHARD_LOADED`) and
/// was not asked about yet: a random range of the seeder's file (fetched from its web seed)
/// under a fresh nonce. The shard counts once the node's digest matches
/// ([`crate::swarm::Swarm::proved`]); one that cannot be checked does not.
pub(super) async fn challenge_claims(hub: Arc<Hub>, node: String) {
    let claims = {
        let mut s = hub.swarm.lock().unwrap();
        s.claims_to_challenge(&node)
            .into_iter()
            .filter_map(|k| Some((k, s.shards.get(k as usize)?.clone())))
            .collect::<Vec<_>>()
    };
    for (shard_id, spec) in claims {
        let length = spec.size.min(CHALLENGE_BYTES) as u32;
        let random = u64::from_str_radix(&protocol::secret::random_hex(8), 16).unwrap_or(0);
        let offset = random % (spec.size - u64::from(length) + 1);
        let nonce = protocol::secret::random_hex(16);
        let out = match crate::seeder_client::fetch_range(&spec, offset, length).await {
            Ok(bytes) => {
                let expected = protocol::possession_digest(&nonce, &bytes);
                let challenge = protocol::ShardChallenge {
                    shard_id,
                    offset,
                    length,
                    nonce,
                };
                hub.swarm
                    .lock()
                    .unwrap()
                    .challenge(&node, challenge, expected)
            }
            Err(e) => {
                tracing::warn!("checking {node}'s claim of shard {shard_id}: {e}");
                hub.swarm.lock().unwrap().proved(&node, shard_id, None)
            }
        };
        hub.dispatch(out);
    }
}
