//! Proving a node holds a shard's bytes (`PROVE_SHARD`): the coordinator's challenge, the
//! node's answer, and the digest both compute, the coordinator from the seeder's file.

use serde::{Deserialize, Serialize};

/// `PROVE_SHARD` params: the coordinator's challenge, the node's proof.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ProveShard {
    Challenge(ShardChallenge),
    Proof(ShardProof),
}

/// A shard a node claims at `REGISTER` counts only once it proves it has the bytes: the
/// digest of `length` bytes at `offset`, after a fresh `nonce`, which the coordinator checks
/// against the seeder's file ([`possession_digest`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardChallenge {
    pub shard_id: u32,
    pub offset: u64,
    pub length: u32,
    /// Hex.
    pub nonce: String,
}

/// The most bytes a [`ShardChallenge`] asks for (a node reads no more).
pub const MAX_CHALLENGE_BYTES: u32 = 1 << 20;

/// The answer to a [`ShardChallenge`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardProof {
    pub shard_id: u32,
    /// [`possession_digest`] of the range, hex.
    pub digest: String,
}

/// sha256 of the challenge's nonce and the bytes it names, hex: what only a holder of the
/// bytes can give for a nonce it has not seen before.
pub fn possession_digest(nonce: &str, bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"shardswarm possession v1\0");
    h.update(nonce.as_bytes());
    h.update(b"\0");
    h.update(bytes);
    hex::encode(h.finalize())
}
