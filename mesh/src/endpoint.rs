//! A member's iroh endpoint: made from the member's key, homed on the swarm's relay (if the
//! swarm has one), dialling and accepting data-channel streams.

use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use iroh::endpoint::{presets, Connection, RecvStream, SendStream};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMode, SecretKey, TransportAddr};
use protocol::data::auth::{Binding, EXPORTER_LABEL, UNBOUND};
use protocol::data::io::Accepted;
use protocol::{MeshAddr, RelayInfo};
use tokio::io::{AsyncRead, AsyncWrite, Join, ReadBuf};

use crate::path::PathWatch;

/// The ALPN of the data channel on the mesh: a peer speaking anything else is refused in the
/// QUIC handshake.
pub const DATA_ALPN: &[u8] = b"shardswarm/data/1";

/// How long an endpoint waits, at start, to be homed on the relay before it goes on without
/// (it keeps trying; connections meanwhile use direct paths only).
const RELAY_WAIT: Duration = Duration::from_secs(10);

/// Why the mesh could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("starting the mesh endpoint: {0}")]
    Start(String),
    #[error("the swarm's relay {url}: {message}")]
    Relay { url: String, message: String },
    #[error("mesh address {0:?}: {1}")]
    Address(String, String),
    #[error("mesh peer {peer}: {message}")]
    Peer { peer: String, message: String },
    #[error("the mesh endpoint is closed")]
    Closed,
}

/// One member's endpoint on the mesh.
#[derive(Clone)]
pub struct Mesh {
    endpoint: Endpoint,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("id", &self.id()).finish()
    }
}

/// A new secret key for an endpoint (from the OS's random source).
pub fn random_secret() -> [u8; 32] {
    let mut key = [0u8; 32];
    hex::decode_to_slice(protocol::secret::random_hex(32), &mut key).expect("hex of 32 bytes");
    key
}

impl Mesh {
    /// Start the endpoint with `secret` (the member's key: its endpoint id is the public half),
    /// its UDP socket on `bind`, homed on `relay` if the swarm has one.
    pub async fn start(
        secret: [u8; 32],
        bind: SocketAddr,
        relay: Option<&RelayInfo>,
    ) -> Result<Mesh, MeshError> {
        let start = |e: &dyn std::fmt::Display| MeshError::Start(e.to_string());
        let mut builder = Endpoint::builder(presets::Minimal)
            .secret_key(SecretKey::from_bytes(&secret))
            .alpns(vec![DATA_ALPN.to_vec()])
            .bind_addr(bind)
            .map_err(|e| start(&e))?;
        if let Some(relay) = relay {
            let (map, roots) = relay_settings(relay)?;
            builder = builder
                .relay_mode(RelayMode::Custom(map))
                .ca_tls_config(iroh_relay::tls::CaTlsConfig::custom_roots(roots));
        }
        let endpoint = builder.bind().await.map_err(|e| start(&e))?;
        if let Some(relay) = relay {
            if tokio::time::timeout(RELAY_WAIT, endpoint.online())
                .await
                .is_err()
            {
                tracing::warn!(
                    "not homed on the swarm's relay {} after {RELAY_WAIT:?}: going on, still trying",
                    relay.url
                );
            }
        }
        Ok(Mesh { endpoint })
    }

    /// The endpoint id (the public key every connection to this member proves).
    pub fn id(&self) -> String {
        self.endpoint.id().to_string()
    }

    /// Where this member can be reached, for the coordinator to hand out.
    pub fn addr(&self) -> MeshAddr {
        let addr = self.endpoint.addr();
        let relay_url = addr.relay_urls().next().map(|u| u.to_string());
        let addrs = addr.ip_addrs().map(|a| a.to_string()).collect();
        MeshAddr {
            endpoint_id: addr.id.to_string(),
            relay_url,
            addrs,
            interfaces: self.interfaces(),
        }
    }

    /// The IP addresses of this machine's interfaces the endpoint's sockets are bound on.
    fn interfaces(&self) -> Vec<String> {
        let bound = self.endpoint.bound_sockets();
        let mut ips: Vec<String> = if bound.iter().any(|s| s.ip().is_unspecified()) {
            if_addrs::get_if_addrs()
                .map(|ifs| ifs.into_iter().map(|i| i.ip().to_string()).collect())
                .unwrap_or_default()
        } else {
            bound.iter().map(|s| s.ip().to_string()).collect()
        };
        ips.sort();
        ips.dedup();
        ips.truncate(protocol::MAX_MESH_ADDRS);
        ips
    }

    /// Open a data-channel stream to `to`: the stream, the session's channel binding, and the
    /// connection (for its path).
    pub async fn dial(&self, to: &MeshAddr) -> Result<(MeshStream, Binding), MeshError> {
        let peer = || to.endpoint_id.clone();
        let fail = |e: &dyn std::fmt::Display| MeshError::Peer {
            peer: peer(),
            message: e.to_string(),
        };
        let addr = endpoint_addr(to)?;
        let conn = self
            .endpoint
            .connect(addr, DATA_ALPN)
            .await
            .map_err(|e| fail(&e))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| fail(&e))?;
        let binding = exporter(&conn);
        Ok((MeshStream::new(conn, send, recv), binding))
    }

    /// The next incoming connection: wait for its first stream. None once the endpoint is
    /// closed. A connection that fails before its stream opens is skipped (logged).
    pub async fn accept(&self) -> Option<Incoming> {
        loop {
            let incoming = self.endpoint.accept().await?;
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!("mesh connection failed in its handshake: {e}");
                    continue;
                }
            };
            return Some(Incoming { conn });
        }
    }

    /// Close the endpoint (connections end).
    pub async fn close(&self) {
        self.endpoint.close().await;
    }
}

/// An accepted mesh connection whose first stream is yet to be taken.
pub struct Incoming {
    conn: Connection,
}

impl Incoming {
    /// The peer's endpoint id (proved in the QUIC handshake).
    pub fn remote_id(&self) -> String {
        self.conn.remote_id().to_string()
    }

    /// Take the connection's first stream, as a data-channel connection to run the hop
    /// handshake on, bound to this QUIC session.
    pub async fn stream(self) -> Result<Accepted, MeshError> {
        let (send, recv) = self.conn.accept_bi().await.map_err(|e| MeshError::Peer {
            peer: self.remote_id(),
            message: e.to_string(),
        })?;
        let binding = exporter(&self.conn);
        Ok(Accepted::bound(
            MeshStream::new(self.conn, send, recv),
            binding,
        ))
    }
}

/// A QUIC stream as one byte stream, holding its connection open as long as it lives.
pub struct MeshStream {
    conn: Connection,
    io: Join<RecvStream, SendStream>,
}

impl MeshStream {
    fn new(conn: Connection, send: SendStream, recv: RecvStream) -> MeshStream {
        MeshStream {
            conn,
            io: tokio::io::join(recv, send),
        }
    }

    /// A watch on the connection's path to `peer` (whose interfaces tell direct from
    /// hole-punched).
    pub fn watch(&self, peer: &MeshAddr) -> PathWatch {
        PathWatch {
            conn: self.conn.clone(),
            interfaces: peer
                .interfaces
                .iter()
                .filter_map(|i| i.parse().ok())
                .collect(),
        }
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The QUIC session's exporter value for the data channel: the hop proofs cover it, so a
/// handshake relayed between two sessions fails.
fn exporter(conn: &Connection) -> Binding {
    let mut out = UNBOUND;
    match conn.export_keying_material(&mut out, EXPORTER_LABEL, b"") {
        Ok(()) => out,
        Err(_) => UNBOUND,
    }
}

fn endpoint_addr(to: &MeshAddr) -> Result<EndpointAddr, MeshError> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| MeshError::Address(what.to_owned(), e.to_string());
    let id = EndpointId::from_str(&to.endpoint_id).map_err(|e| bad(&to.endpoint_id, &e))?;
    let mut addrs = Vec::new();
    for a in &to.addrs {
        addrs.push(TransportAddr::Ip(a.parse().map_err(|e| bad(a, &e))?));
    }
    if let Some(url) = &to.relay_url {
        addrs.push(TransportAddr::Relay(url.parse().map_err(|e| bad(url, &e))?));
    }
    Ok(EndpointAddr::from_parts(id, addrs))
}

/// The relay map and trusted roots for the swarm's relay.
fn relay_settings(
    relay: &RelayInfo,
) -> Result<
    (
        iroh::RelayMap,
        Vec<rustls_pki_types::CertificateDer<'static>>,
    ),
    MeshError,
> {
    use rustls_pki_types::pem::PemObject;
    let bad = |m: String| MeshError::Relay {
        url: relay.url.clone(),
        message: m,
    };
    let url: iroh::RelayUrl = relay.url.parse().map_err(|e| bad(format!("{e}")))?;
    let port = url
        .port()
        .ok_or_else(|| bad("the URL names no port".into()))?;
    // The relay serves QUIC address discovery on the same port number (UDP).
    let config = iroh_relay::RelayConfig::new(url, Some(iroh_relay::RelayQuicConfig::new(port)));
    let roots = rustls_pki_types::CertificateDer::pem_slice_iter(relay.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("its certificate: {e}")))?;
    if roots.is_empty() {
        return Err(bad("no certificate given for it".into()));
    }
    Ok((iroh::RelayMap::from(config), roots))
}
