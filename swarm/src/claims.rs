//! What a node says it holds counts only once it proves it has the bytes: a shard claimed at
//! `REGISTER` or reported by `SHARD_LOADED` waits (not counted, the node given nothing new)
//! until the node answers the coordinator's `PROVE_SHARD` challenge with the digest of a
//! random range of the seeder's file under a fresh nonce. The coordinator fetches the range
//! and sends the challenge (IO); here are the rules.

use std::time::{Duration, Instant};

use protocol::{Control, Message, ShardChallenge, COORDINATOR};

use crate::{Holding, Outbox, Swarm};

/// How long a node has to prove a shard it says it holds.
pub const CLAIM_WAIT: Duration = Duration::from_secs(30);

/// A shard a node says it holds: since when, and the bytes it says it fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub since: Instant,
    pub from_seeder: u64,
    pub from_peers: u64,
}

impl Claim {
    pub fn new(from_seeder: u64, from_peers: u64) -> Claim {
        Claim {
            since: Instant::now(),
            from_seeder,
            from_peers,
        }
    }
}

impl Swarm {
    /// The shards `node` claimed and has not proved.
    pub fn unproven(&self, node: &str) -> Vec<u32> {
        self.nodes
            .get(node)
            .map(|n| n.claimed.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The claims of `node` no challenge has been made for yet, now marked as being made.
    pub fn claims_to_challenge(&mut self, node: &str) -> Vec<u32> {
        let fresh: Vec<u32> = self
            .unproven(node)
            .into_iter()
            .filter(|k| !self.challenges.contains_key(&(node.to_owned(), *k)))
            .collect();
        for k in &fresh {
            self.challenges.insert((node.to_owned(), *k), None);
        }
        fresh
    }

    /// Ask `node` to prove it holds a shard it claimed; `expected` is the digest the
    /// coordinator computed from the seeder's file for `challenge`.
    pub fn challenge(&mut self, node: &str, challenge: ShardChallenge, expected: String) -> Outbox {
        self.challenges
            .retain(|(n, _), _| self.nodes.contains_key(n));
        let claimed = self
            .nodes
            .get(node)
            .is_some_and(|n| n.claimed.contains_key(&challenge.shard_id));
        if !claimed {
            return Vec::new();
        }
        self.challenges
            .insert((node.to_owned(), challenge.shard_id), Some(expected));
        let message = Message::ProveShard(protocol::ProveShard::Challenge(challenge));
        vec![(node.to_owned(), Control::new(COORDINATOR, node, message))]
    }

    /// `node`'s answer to a challenge: the shard counts if the digest is the expected one;
    /// else (or `None`: the challenge could not be made) the claim is dropped: a shard it was
    /// given is marked failed (given again later), one claimed at `REGISTER` is not held.
    pub fn proved(&mut self, node: &str, shard_id: u32, digest: Option<&str>) -> Outbox {
        let key = (node.to_owned(), shard_id);
        let expected = match (self.challenges.get(&key), digest) {
            (Some(Some(want)), Some(_)) => Some(want.clone()),
            (_, Some(_)) => return Vec::new(), // a proof nobody asked for
            (_, None) => None,
        };
        self.challenges.remove(&key);
        let Some(claim) = self
            .nodes
            .get_mut(node)
            .and_then(|n| n.claimed.remove(&shard_id))
        else {
            return Vec::new();
        };
        let good = matches!((&expected, digest), (Some(want), Some(got)) if protocol::secret::same_secret(want, got));
        if good {
            tracing::info!("node {node} proved it holds shard {shard_id}");
            let n = self.nodes.get_mut(node).expect("checked");
            n.shards.insert(
                shard_id,
                Holding::Loaded {
                    from_seeder: claim.from_seeder,
                    from_peers: claim.from_peers,
                },
            );
        } else {
            let why = if digest.is_some() {
                "could not prove it holds its bytes"
            } else {
                "could not be asked to prove it holds its bytes"
            };
            self.claim_failed(node, shard_id, why);
        }
        self.place()
    }

    /// Claims not proved within [`CLAIM_WAIT`] are dropped.
    pub(crate) fn expire_claims(&mut self, now: Instant) {
        let late: Vec<(String, u32)> = self
            .nodes
            .values()
            .flat_map(|n| {
                n.claimed
                    .iter()
                    .filter(|(_, c)| now.duration_since(c.since) > CLAIM_WAIT)
                    .map(|(k, _)| (n.node_id.clone(), *k))
            })
            .collect();
        for (node, shard_id) in &late {
            self.challenges.remove(&(node.clone(), *shard_id));
            if let Some(n) = self.nodes.get_mut(node) {
                n.claimed.remove(shard_id);
            }
            let why = format!("did not prove it holds its bytes within {CLAIM_WAIT:?}");
            self.claim_failed(node, *shard_id, &why);
        }
    }

    fn claim_failed(&mut self, node: &str, shard_id: u32, why: &str) {
        tracing::warn!("node {node} says it holds shard {shard_id} but {why}: it does not count");
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        // A shard it was given (fetching): failed, given again after a while.
        if let Some(holding) = n.shards.get_mut(&shard_id) {
            *holding = Holding::Failed {
                code: "unproven".into(),
                message: format!("it says it holds the shard but {why}"),
            };
            n.failed_at.insert(shard_id, Instant::now());
        }
    }
}
