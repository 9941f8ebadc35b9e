//! How swarm members reach each other wherever they are: behind a home router, in another
//! network, or on the same LAN. Each member (a node, the coordinator) runs one iroh endpoint:
//! QUIC connections to a member named by its endpoint id (an Ed25519 public key the connection
//! proves), over a direct path where one works, a hole-punched one where NATs allow, and the
//! swarm's own relay otherwise. Nothing outside the swarm is asked: no DNS or pkarr discovery,
//! no third-party relay. The coordinator hands out members' addresses ([`protocol::MeshAddr`])
//! and the relay's ([`protocol::RelayInfo`]); the relay runs on the seeder's host
//! ([`relay`], feature `relay-server`).
//!
//! The data channel runs over a mesh stream exactly as over TCP: [`Mesh::dial`] and
//! [`Mesh::accept`] give a byte stream and the session's channel binding (a TLS exporter value
//! of the QUIC connection), which the hop proofs cover.

mod endpoint;
mod path;
#[cfg(feature = "relay-server")]
pub mod relay;

pub use endpoint::{Incoming, Mesh, MeshError, DATA_ALPN};
pub use path::{EdgePath, PathKind};
