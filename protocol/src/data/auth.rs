//! Proving a route key both ways before a data connection carries anything.
//!
//! The coordinator gives each hop of a route its own random key over the control channel:
//! the caller of stage k (the coordinator for stage 0, else stage k−1) and stage k know it,
//! nobody else does. The caller's `Hello` carries a fresh nonce; the callee answers with a
//! nonce of its own and an HMAC-SHA256 over both under the key (so the caller knows it reached
//! the stage the coordinator named); the caller answers with its HMAC under another label (so
//! the callee knows the caller is the predecessor the coordinator named). A new route means
//! new keys: a stage that left the route can no longer talk to its old neighbours.
//!
//! Over TLS both proofs also cover the session's channel binding (a TLS exporter value, RFC
//! 5705/8446): a machine that relays a handshake between two TLS sessions of its own has two
//! different bindings, and the proofs it relays fail. Plain TCP binds nothing (zeros).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::Hello;

/// Bytes in a proof (an HMAC-SHA256) and in the callee's nonce.
pub const PROOF_LEN: usize = 32;

/// An HMAC-SHA256 tag.
pub type Proof = [u8; PROOF_LEN];

/// What ties a handshake to its TLS session (all zeros on plain TCP).
pub type Binding = [u8; 32];

/// The binding of a connection without TLS.
pub const UNBOUND: Binding = [0; 32];

/// The label of the TLS exporter value that binds a handshake to its session.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-shardswarm-data-channel-v1";

const CALLEE: &[u8] = b"shardswarm data channel v1: callee\0";
const CALLER: &[u8] = b"shardswarm data channel v1: caller\0";

fn mac(
    key: &str,
    label: &[u8],
    hello: &Hello,
    callee_nonce: &[u8; PROOF_LEN],
    binding: &Binding,
) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    m.update(label);
    m.update(binding);
    // The Hello as sent (its JSON), so the tags bind the model, split, stage and caller nonce.
    m.update(&serde_json::to_vec(hello).expect("hello serialises"));
    m.update(b"\0");
    m.update(callee_nonce);
    m
}

/// The callee's proof that it holds `key`, for this Hello, its own nonce and the session.
pub fn callee_proof(
    key: &str,
    hello: &Hello,
    callee_nonce: &[u8; PROOF_LEN],
    binding: &Binding,
) -> Proof {
    mac(key, CALLEE, hello, callee_nonce, binding)
        .finalize()
        .into_bytes()
        .into()
}

/// The caller's proof that it holds `key`.
pub fn caller_proof(
    key: &str,
    hello: &Hello,
    callee_nonce: &[u8; PROOF_LEN],
    binding: &Binding,
) -> Proof {
    mac(key, CALLER, hello, callee_nonce, binding)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `proof` is the callee's proof (compared in constant time).
pub fn is_callee_proof(
    key: &str,
    hello: &Hello,
    nonce: &[u8; PROOF_LEN],
    binding: &Binding,
    proof: &Proof,
) -> bool {
    mac(key, CALLEE, hello, nonce, binding)
        .verify_slice(proof)
        .is_ok()
}

/// Whether `proof` is the caller's proof (compared in constant time).
pub fn is_caller_proof(
    key: &str,
    hello: &Hello,
    nonce: &[u8; PROOF_LEN],
    binding: &Binding,
    proof: &Proof,
) -> bool {
    mac(key, CALLER, hello, nonce, binding)
        .verify_slice(proof)
        .is_ok()
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
        let callee = callee_proof("k", &hello, &n, &UNBOUND);
        assert!(is_callee_proof("k", &hello, &n, &UNBOUND, &callee));
        assert!(
            !is_caller_proof("k", &hello, &n, &UNBOUND, &callee),
            "roles differ"
        );
        assert!(
            !is_callee_proof("k2", &hello, &n, &UNBOUND, &callee),
            "another key"
        );
        assert!(!is_callee_proof(
            "k",
            &hello,
            &[8u8; PROOF_LEN],
            &UNBOUND,
            &callee
        ));
        let replayed = Hello {
            nonce: "00fe".into(),
            ..hello.clone()
        };
        assert!(!is_callee_proof("k", &replayed, &n, &UNBOUND, &callee));
        let other_stage = Hello {
            stage: 2,
            ..hello.clone()
        };
        assert!(!is_callee_proof("k", &other_stage, &n, &UNBOUND, &callee));
        // Nor may a chain hop's proof open the lane's answer lane, or another lane.
        let answers = Hello {
            kind: super::super::LaneKind::Answers { lane: "a1".into() },
            ..hello.clone()
        };
        assert!(!is_callee_proof("k", &answers, &n, &UNBOUND, &callee));
        let other_lane = hello.clone().on_lane("a2");
        assert!(!is_callee_proof("k", &other_lane, &n, &UNBOUND, &callee));
        assert!(is_caller_proof(
            "k",
            &hello,
            &n,
            &UNBOUND,
            &caller_proof("k", &hello, &n, &UNBOUND)
        ));
        // A proof made in one TLS session does not hold in another (a relayed handshake).
        let session = [3u8; 32];
        let bound = caller_proof("k", &hello, &n, &session);
        assert!(is_caller_proof("k", &hello, &n, &session, &bound));
        assert!(!is_caller_proof("k", &hello, &n, &[4u8; 32], &bound));
        assert!(!is_caller_proof("k", &hello, &n, &UNBOUND, &bound));
    }
}
