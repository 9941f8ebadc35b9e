//! TLS with rustls for the services' listeners and the clients that reach them: certificates
//! and keys from PEM files, trust in a given CA (a swarm's own) or the system's roots.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS cannot be set up: names the file at fault.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct TlsError {
    pub what: String,
    pub message: String,
}

fn err(what: impl Into<String>, message: impl std::fmt::Display) -> TlsError {
    TlsError {
        what: what.into(),
        message: message.to_string(),
    }
}

/// rustls' crypto, chosen here once: the process may link more than one provider (the HTTP
/// client brings aws-lc-rs), and rustls will not guess.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The certificates in a PEM file (a chain: the leaf first).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let what = format!("certificate file {}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(&what, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&what, e))?;
    if certs.is_empty() {
        return Err(err(what, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// A server's TLS settings from its certificate chain and private key (PEM files).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certificates(cert)?;
    let what = format!("private key file {}", key.display());
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| err(&what, e))?;
    with_certificate(chain, key, &format!("{} with {what}", cert.display()))
}

/// A server's TLS settings from a certificate chain and key held in memory (PEM).
pub fn server_config_from_pem(
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err("certificate", e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| err("key", e))?;
    with_certificate(chain, key, "the certificate")
}

fn with_certificate(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    what: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("TLS", e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| err(what, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client's TLS settings trusting only the CA in `ca_pem` (held in memory).
pub fn client_config_from_pem(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| err("CA", e))?)
            .map_err(|e| err("CA", e))?;
    }
    trusting(roots)
}

/// A client's TLS settings trusting `roots`.
fn trusting(roots: rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("TLS", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A client's TLS settings: trust the CA certificates in `ca` (a swarm's own), or else the
/// system's roots.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            for cert in certificates(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| err(format!("CA file {}", ca.display()), e))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(err("the system's CA certificates", "none found: give --ca"));
            }
        }
    }
    trusting(roots)
}
