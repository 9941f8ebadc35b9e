//! Signed steps: what one stage sends the next, under the sender's node key.
//!
//! Each node makes an Ed25519 key pair when it starts and names the public half at
//! `REGISTER`; the coordinator tells each stage its predecessor's key in `ROUTE`. A stage signs
//! every step it sends down the chain, over a label, the lane id, the receiving stage and the
//! step's exact bytes; the receiver checks the signature before running the step (a bad one
//! ends the lane) and keeps the signed step a while ([`super::KEPT_STEP_BYTES`]). When the
//! coordinator checks a served request, the receiver hands the signed steps back
//! (`Recall`): they prove what the sender sent, which the sender cannot deny and the receiver
//! cannot forge, so each stage is judged by its own output alone.

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use sha2::{Digest, Sha256};

use super::{Frame, SIGNATURE_LEN};

const LABEL: &[u8] = b"shardswarm signed step v1\0";
const DOCUMENT_LABEL: &[u8] = b"shardswarm signed document v1\0";

/// The HTTP header that carries a document's signature.
pub const SIGNATURE_HEADER: &str = "x-shardswarm-signature";

/// An Ed25519 signing key: a node's (made at start, never written anywhere), or the seeder's
/// for its documents (kept in its state dir, [`SigningKey::to_pkcs8`]).
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    /// A fresh key pair from the system's random source.
    pub fn generate() -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("the system random source");
        SigningKey::from_pkcs8(pkcs8.as_ref()).expect("a key just made")
    }

    /// A key kept as PKCS#8 bytes; `None` if they are not an Ed25519 key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Option<SigningKey> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).ok()?;
        Some(SigningKey {
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// The key as PKCS#8 bytes, to keep (a secret).
    pub fn to_pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// A detached signature (hex) of `body` as the document `name` (the seeder's `/manifest`
    /// and `/files`): [`document_signed`] checks it.
    pub fn sign_document(&self, name: &str, body: &[u8]) -> String {
        hex::encode(self.pair.sign(&document_digest(name, body)).as_ref())
    }

    /// The public key, hex (what `REGISTER` carries and `ROUTE` passes on).
    pub fn public_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    /// `step` (a `Step`) signed for stage `to` of lane `lane`.
    pub fn sign(&self, lane: &str, to: u32, step: Frame) -> Frame {
        let digest = digest(lane, to, &step.encode());
        let signature = self
            .pair
            .sign(&digest)
            .as_ref()
            .try_into()
            .expect("an Ed25519 signature is 64 bytes");
        Frame::Signed {
            signature,
            step: Box::new(step),
        }
    }
}

/// Why a signed step is not accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the sender's key {0:?} is not a hex Ed25519 public key")]
    Key(String),
    #[error("the step's signature does not check out under the sending stage's key")]
    Signature,
    #[error("expected a signed step, got {0}")]
    NotSigned(&'static str),
    #[error("expected a signed step, got a frame of kind {0}")]
    NotSignedKind(u8),
}

/// The step inside `frame` if `frame` is a step signed by `signer` (hex public key) for stage
/// `to` of lane `lane`, and the frame's bytes (encoded once: what the check covers, and what
/// a receiver keeps).
pub fn open(
    frame: Frame,
    signer: &str,
    lane: &str,
    to: u32,
) -> Result<(Frame, Vec<u8>), SealError> {
    if !matches!(frame, Frame::Signed { .. }) {
        return Err(SealError::NotSigned(frame.kind()));
    }
    let encoded = frame.encode();
    verify(&encoded, signer, lane, to)?;
    let Frame::Signed { step, .. } = frame else {
        unreachable!("checked above");
    };
    Ok((*step, encoded))
}

/// Whether `encoded`, a `Signed` frame as it travels, is a step signed by `signer` (hex
/// public key) for stage `to` of lane `lane`: checked on the bytes themselves, without
/// decoding them.
pub fn verify(encoded: &[u8], signer: &str, lane: &str, to: u32) -> Result<(), SealError> {
    let (signature, step) = match encoded {
        [9, rest @ ..] if rest.len() >= SIGNATURE_LEN => rest.split_at(SIGNATURE_LEN),
        [kind, ..] => return Err(SealError::NotSignedKind(*kind)),
        [] => return Err(SealError::NotSignedKind(0)),
    };
    let key = hex::decode(signer)
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| SealError::Key(signer.to_owned()))?;
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&digest(lane, to, step), signature)
        .map_err(|_| SealError::Signature)
}

/// Whether `signature` (hex) is `signer`'s (hex public key) over `body` as the document
/// `name`.
pub fn document_signed(signer: &str, name: &str, body: &[u8], signature: &str) -> bool {
    let (Ok(key), Ok(signature)) = (hex::decode(signer), hex::decode(signature)) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&document_digest(name, body), &signature)
        .is_ok()
}

fn document_digest(name: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOCUMENT_LABEL);
    h.update((name.len() as u32).to_le_bytes());
    h.update(name.as_bytes());
    h.update(body);
    h.finalize().into()
}

fn digest(lane: &str, to: u32, step: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(LABEL);
    h.update((lane.len() as u32).to_le_bytes());
    h.update(lane.as_bytes());
    h.update(to.to_le_bytes());
    h.update(step);
    h.finalize().into()
}

const _: () = assert!(SIGNATURE_LEN == 64);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Group, Payload, Sampling};

    fn step(x: f32) -> Frame {
        Frame::Step {
            step: 7,
            in_flight: 1,
            busy_us: vec![3],
            groups: vec![Group {
                seq: 0,
                pos0: 0,
                rows: 1,
                sample: true,
                sampling: Sampling {
                    temperature: 0.0,
                    top_p: 1.0,
                    seed: 0,
                },
            }],
            payload: Payload::Hidden {
                n_embd: 2,
                data: vec![x, 2.0],
            },
        }
    }

    #[test]
    fn a_signed_step_opens_only_with_its_key_lane_and_stage_and_unchanged() {
        let (key, other) = (SigningKey::generate(), SigningKey::generate());
        let signed = key.sign("lane", 2, step(1.0));
        let bytes = signed.encode();
        let again = Frame::decode(&bytes).unwrap();
        assert_eq!(
            open(again, &key.public_hex(), "lane", 2).unwrap(),
            (step(1.0), bytes.clone())
        );
        // The same check on the bytes as they travel; a flipped byte or another kind fails.
        assert_eq!(verify(&bytes, &key.public_hex(), "lane", 2), Ok(()));
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(
            verify(&flipped, &key.public_hex(), "lane", 2),
            Err(SealError::Signature)
        );
        assert_eq!(
            verify(&step(1.0).encode(), &key.public_hex(), "lane", 2),
            Err(SealError::NotSignedKind(6))
        );
        assert_eq!(
            verify(&[], &key.public_hex(), "lane", 2),
            Err(SealError::NotSignedKind(0))
        );
        let fails = |frame: Frame, signer: &str, lane: &str, to: u32| {
            open(frame, signer, lane, to).unwrap_err()
        };
        assert_eq!(
            fails(signed.clone(), &other.public_hex(), "lane", 2),
            SealError::Signature
        );
        assert_eq!(
            fails(signed.clone(), &key.public_hex(), "other", 2),
            SealError::Signature
        );
        assert_eq!(
            fails(signed.clone(), &key.public_hex(), "lane", 3),
            SealError::Signature
        );
        // One changed float, same signature.
        let Frame::Signed { signature, .. } = signed else {
            unreachable!()
        };
        let tampered = Frame::Signed {
            signature,
            step: Box::new(step(1.5)),
        };
        assert_eq!(
            fails(tampered, &key.public_hex(), "lane", 2),
            SealError::Signature
        );
        assert_eq!(
            fails(step(1.0), &key.public_hex(), "lane", 2),
            SealError::NotSigned("Step")
        );
        assert!(matches!(
            fails(key.sign("l", 0, step(1.0)), "zz", "l", 0),
            SealError::Key(_)
        ));
    }

    #[test]
    fn a_document_checks_out_only_as_signed_and_the_key_survives_its_keeping() {
        let key = SigningKey::from_pkcs8(SigningKey::generate().to_pkcs8()).unwrap();
        let signature = key.sign_document("/manifest", b"{}");
        let signer = key.public_hex();
        assert!(document_signed(&signer, "/manifest", b"{}", &signature));
        assert!(!document_signed(&signer, "/manifest", b"{ }", &signature));
        assert!(!document_signed(&signer, "/files", b"{}", &signature));
        let other = SigningKey::generate().public_hex();
        assert!(!document_signed(&other, "/manifest", b"{}", &signature));
        assert!(!document_signed("zz", "/manifest", b"{}", &signature));
        assert!(!document_signed(&signer, "/manifest", b"{}", "zz"));
        assert!(SigningKey::from_pkcs8(b"not a key").is_none());
    }
}
