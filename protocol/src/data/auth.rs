//! Proving a route key both ways before a data connection carries anything.
//!
//! The coordinator gives each hop of a route its own random key over the control channel:
//! the caller of stage k (the coordinator for stage 0, else stage k−1) and stage k know it,
//! nobody else does. The caller's `Hello` carries a fresh nonce; the callee answers with a
//! nonce of its own and an HMAC-SHA256 over both under the key (so the caller knows it reached
//! the stage the coordinator named); the caller answers with its HMAC under another label (so
//! the callee knows the caller is the predecessor the coordinator named). A new route means
//! new keys: a stage that left the route can no longer talk to its old neighbours.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::Hello;

/// Bytes in a proof (an HMAC-SHA256) and in the callee's nonce.
pub const PROOF_LEN: usize = 32;

/// An HMAC-SHA256 tag.
pub type Proof = [u8; PROOF_LEN];

const CALLEE: &[u8] = b"shardswarm data channel v1: callee\0";
const CALLER: &[u8] = b"shardswarm data channel v1: caller\0";

fn mac(key: &str, label: &[u8], hello: &Hello, callee_nonce: &[u8; PROOF_LEN]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    m.update(label);
    // The Hello as sent (its JSON), so the tags bind the model, split, stage and caller nonce.
    m.update(&serde_json::to_vec(hello).expect("hello serialises"));
    m.update(b"\0");
    m.update(callee_nonce);
    m
}

/// The callee's proof that it holds `key`, for this Hello and its own nonce.
pub fn callee_proof(key: &str, hello: &Hello, callee_nonce: &[u8; PROOF_LEN]) -> Proof {
    mac(key, CALLEE, hello, callee_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// The caller's proof that it holds `key`.
pub fn caller_proof(key: &str, hello: &Hello, callee_nonce: &[u8; PROOF_LEN]) -> Proof {
    mac(key, CALLER, hello, callee_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `proof` is the callee's proof (compared in constant time).
pub fn is_callee_proof(key: &str, hello: &Hello, nonce: &[u8; PROOF_LEN], proof: &Proof) -> bool {
    mac(key, CALLEE, hello, nonce).verify_slice(proof).is_ok()
}

/// Whether `proof` is the caller's proof (compared in constant time).
pub fn is_caller_proof(key: &str, hello: &Hello, nonce: &[u8; PROOF_LEN], proof: &Proof) -> bool {
    mac(key, CALLER, hello, nonce).verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_the_key_the_role_and_both_nonces() {
        let hello = Hello {
            model_sha256: "m".into(),
            split_id: "s".into(),
            stage: 1,
            nonce: "00ff".into(),
            kind: super::super::LaneKind::Chain { lane: "a1".into() },
        };
        let n = [7u8; PROOF_LEN];
        let callee = callee_proof("k", &hello, &n);
        assert!(is_callee_proof("k", &hello, &n, &callee));
        assert!(!is_caller_proof("k", &hello, &n, &callee), "roles differ");
        assert!(!is_callee_proof("k2", &hello, &n, &callee), "another key");
        assert!(!is_callee_proof("k", &hello, &[8u8; PROOF_LEN], &callee));
        let replayed = Hello {
            nonce: "00fe".into(),
            ..hello.clone()
        };
        assert!(!is_callee_proof("k", &replayed, &n, &callee));
        let other_stage = Hello {
            stage: 2,
            ..hello.clone()
        };
        assert!(!is_callee_proof("k", &other_stage, &n, &callee));
        // Nor may a chain hop's proof open the lane's answer lane, or another lane.
        let answers = Hello {
            kind: super::super::LaneKind::Answers { lane: "a1".into() },
            ..hello.clone()
        };
        assert!(!is_callee_proof("k", &answers, &n, &callee));
        let other_lane = hello.clone().on_lane("a2");
        assert!(!is_callee_proof("k", &other_lane, &n, &callee));
        assert!(is_caller_proof(
            "k",
            &hello,
            &n,
            &caller_proof("k", &hello, &n)
        ));
    }
}
