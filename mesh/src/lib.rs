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

pub use endpoint::{random_secret, Incoming, Mesh, MeshError, DATA_ALPN};
pub use path::{kind_of_ip, lane_edge, PathWatch};

use protocol::data::io::{ChannelError, Connection, TlsTo};
use protocol::data::Hello;
use protocol::MeshAddr;

/// Where a data-channel callee is reached.
#[derive(Clone, Copy)]
pub enum Callee<'a> {
    /// TCP at `addr` (TLS in a TLS swarm).
    Tcp {
        addr: &'a str,
        tls: Option<TlsTo<'a>>,
    },
    /// Over the mesh, from this member's endpoint.
    Mesh { from: &'a Mesh, to: &'a MeshAddr },
}

impl<'a> Callee<'a> {
    /// Over the mesh when this member runs an endpoint (`from`) and the callee has a mesh
    /// address (`to`), else TCP to `addr`.
    pub fn pick(
        from: Option<&'a Mesh>,
        to: Option<&'a MeshAddr>,
        addr: &'a str,
        tls: Option<TlsTo<'a>>,
    ) -> Callee<'a> {
        match (from, to) {
            (Some(from), Some(to)) => Callee::Mesh { from, to },
            _ => Callee::Tcp { addr, tls },
        }
    }

    /// What logs and errors call it.
    pub fn name(&self) -> String {
        match self {
            Callee::Tcp { addr, .. } => (*addr).to_owned(),
            Callee::Mesh { to, .. } => format!("mesh:{}", to.endpoint_id),
        }
    }
}

/// Open a data-channel connection to `callee` and run the hop handshake with `key`: the
/// connection, and over the mesh a watch on its path.
pub async fn open(
    callee: Callee<'_>,
    hello: Hello,
    key: &str,
) -> Result<(Connection, Option<PathWatch>), ChannelError> {
    match callee {
        Callee::Tcp { addr, tls } => Ok((Connection::open(addr, hello, key, tls).await?, None)),
        Callee::Mesh { from, to } => {
            let peer = callee.name();
            let (stream, binding) = from.dial(to).await.map_err(|e| ChannelError::Io {
                peer: peer.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let watch = stream.watch(to);
            let conn = Connection::open_over(Box::new(stream), binding, peer, hello, key).await?;
            Ok((conn, Some(watch)))
        }
    }
}
