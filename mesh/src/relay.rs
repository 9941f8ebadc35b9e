//! The swarm's relay, run by the seeder on its public host (`server --relay-port`): members
//! that cannot reach each other directly pass their (end-to-end encrypted) QUIC packets
//! through it, and it tells each member the address its NAT maps it to (QUIC address
//! discovery), which hole punching needs. iroh-relay's own server, on one port number: HTTPS
//! (relaying) on TCP and QUIC (address discovery) on UDP.
//!
//! Its certificate is self-signed, made once in the seeder's state dir for the host name
//! members use; members trust exactly that certificate (handed out with its URL), so no
//! public CA and no outside service is involved.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use iroh_relay::server::{CertConfig, QuicConfig, RelayConfig, Server, ServerConfig, TlsConfig};
use protocol::RelayInfo;

use crate::MeshError;

/// A running relay; it stops when dropped.
pub struct RelayServer {
    _server: Server,
    /// What members need to use it.
    pub info: RelayInfo,
    /// The TCP (HTTPS) and UDP (QUIC) address it listens on.
    pub addr: SocketAddr,
}

impl RelayServer {
    /// Run the relay on `bind`:`port` (TCP and UDP; 0: a port free for both), for members
    /// reaching it as `host` (an IP address or DNS name); its certificate kept in `state_dir`.
    pub async fn start(
        bind: IpAddr,
        port: u16,
        host: &str,
        state_dir: &Path,
    ) -> Result<RelayServer, MeshError> {
        let fail = |m: String| MeshError::Start(format!("the relay: {m}"));
        let port = match port {
            0 => free_port(bind).map_err(|e| fail(format!("finding a free port: {e}")))?,
            p => p,
        };
        let (cert_pem, key_pem) = certificate(state_dir, host).map_err(fail)?;
        let tls = server_tls(&cert_pem, &key_pem).map_err(fail)?;
        let mut relay = RelayConfig::new(SocketAddr::new(bind, 0));
        relay.tls = Some(TlsConfig::new(
            SocketAddr::new(bind, port),
            CertConfig::Manual { server_config: tls },
        ));
        let mut config = ServerConfig::default();
        config.relay = Some(relay);
        config.quic = Some(QuicConfig::new(SocketAddr::new(bind, port)));
        let server = Server::spawn(config)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let addr = server
            .https_addr()
            .ok_or_else(|| fail("no HTTPS address".into()))?;
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => host.to_owned(),
        };
        // As iroh writes it (with the trailing slash), so that members compare equal.
        let url: iroh::RelayUrl = format!("https://{host}:{}", addr.port())
            .parse()
            .map_err(|e| fail(format!("its URL: {e}")))?;
        let info = RelayInfo {
            url: url.to_string(),
            cert_pem,
        };
        Ok(RelayServer {
            _server: server,
            info,
            addr,
        })
    }
}

/// A port free on `bind` for both TCP and UDP now (members assume the relay's QUIC port is
/// its HTTPS port).
fn free_port(bind: IpAddr) -> std::io::Result<u16> {
    for _ in 0..16 {
        let udp = std::net::UdpSocket::bind(SocketAddr::new(bind, 0))?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(SocketAddr::new(bind, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(
        "no port free for both TCP and UDP in 16 tries",
    ))
}

/// The relay's certificate and key (PEM) for `host`, kept in `state_dir` (`relay.pem`,
/// `relay.key`, owner-only): made on first use, and again when the host changes.
fn certificate(state_dir: &Path, host: &str) -> Result<(String, String), String> {
    let (cert_path, key_path, host_path) = (
        state_dir.join("relay.pem"),
        state_dir.join("relay.key"),
        state_dir.join("relay.host"),
    );
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    if host_path.exists() && read(&host_path)? == host && cert_path.exists() && key_path.exists() {
        return Ok((read(&cert_path)?, read(&key_path)?));
    }
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec![host.to_owned()]).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "shardswarm relay");
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let public = |p: &Path, text: &str| {
        torrents::manifest::write_atomically(p, text.as_bytes()).map_err(|e| e.to_string())
    };
    daemon::secret::write_private(&key_path, &key.serialize_pem()).map_err(|e| e.to_string())?;
    public(&cert_path, &cert.pem())?;
    public(&host_path, host)?;
    tracing::info!(
        "made the relay's certificate for {host}: {}",
        cert_path.display()
    );
    Ok((cert.pem(), key.serialize_pem()))
}

/// TLS 1.3 (QUIC needs it) with the relay's certificate, with ring, as iroh uses.
fn server_tls(cert_pem: &str, key_pem: &str) -> Result<rustls::ServerConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())
}
