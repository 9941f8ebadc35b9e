//! The swarm's own certificate authority: a coordinator on a public address with no
//! certificate of the operator's makes a CA once (kept in its state dir), and at every start a
//! certificate for its own addresses signed by it. Nodes trust the CA: given with `--ca`, or
//! fetched once from `/ca.pem` and checked with the swarm token (the coordinator sends an
//! HMAC of the certificate under the token), then pinned in the node's data dir.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::{Error, Result};

/// The CA: its certificate (PEM, what nodes and clients trust) and what signs with it.
pub struct SwarmCa {
    pub cert_pem: String,
    pub cert_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

/// The coordinator's TLS: what it serves, the swarm's CA (for the data channel, and for its
/// own certificate when the operator gave none), and what it trusts on the data channel.
pub struct Tls {
    pub server: Option<std::sync::Arc<rustls::ServerConfig>>,
    pub ca: Option<std::sync::Arc<SwarmCa>>,
    /// Whether the coordinator's certificate is the swarm CA's (served at `/ca.pem`), not
    /// the operator's.
    pub serve_ca: bool,
    pub data_client: Option<protocol::data::io::ClientTls>,
}

/// TLS as the flags ask: the operator's certificate, or on a public address (unless
/// `--insecure`) one from the swarm's CA, or none. With TLS the data channel runs over it too,
/// with certificates from the swarm's CA.
pub fn choose(config: &crate::Config) -> Result<Tls> {
    let bad = |e: daemon::tls::TlsError| Error::Config(e.to_string());
    let public = !config.listen.ip().is_loopback();
    let operator = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(daemon::tls::server_config(cert, key).map_err(bad)?),
        _ => None,
    };
    if operator.is_none() && (!public || config.insecure) {
        if public {
            tracing::warn!(
                "--insecure: {} is reachable from other machines, and the control channel, \
                 API, data channel and tokens go in clear text",
                config.listen
            );
        }
        return Ok(Tls {
            server: None,
            ca: None,
            serve_ca: false,
            data_client: None,
        });
    }
    let ca = SwarmCa::load_or_create(&config.state_dir())?;
    println!("[CA] {}", ca.cert_path.display());
    let serve_ca = operator.is_none();
    let server = match operator {
        Some(server) => server,
        None => {
            let (chain, key) = ca.certificate_for(own_names(config.listen.ip()))?;
            daemon::tls::server_config_from_pem(&chain, &key).map_err(bad)?
        }
    };
    let data_client = daemon::tls::client_config_from_pem(&ca.cert_pem).map_err(bad)?;
    Ok(Tls {
        server: Some(server),
        ca: Some(std::sync::Arc::new(ca)),
        serve_ca,
        data_client: Some(data_client),
    })
}

/// `GET /ca.pem`: what a node should trust for the control channel, tagged under the swarm
/// token so that a node holding it can tell the answer is the coordinator's. With the swarm's
/// CA (`ca`): its PEM, with its HMAC. With an operator's certificate (`None`): 204 and an HMAC
/// of nothing under another label, meaning "the system's roots". Open (it is no secret).
pub fn route(app: axum::Router, ca: Option<&SwarmCa>, token: Option<&str>) -> axum::Router {
    let (status, label, pem) = match ca {
        Some(ca) => (
            axum::http::StatusCode::OK,
            protocol::CA_TAG_LABEL,
            ca.cert_pem.clone(),
        ),
        None => (
            axum::http::StatusCode::NO_CONTENT,
            protocol::CA_OPERATOR_TAG_LABEL,
            String::new(),
        ),
    };
    let tag = token.map(|t| daemon::secret::tag(t, label, pem.as_bytes()));
    app.route(
        "/ca.pem",
        axum::routing::get(move || {
            let (pem, tag) = (pem.clone(), tag.clone());
            async move {
                let mut headers = axum::http::HeaderMap::new();
                if let Some(tag) = tag.and_then(|t| t.parse().ok()) {
                    headers.insert(protocol::CA_TAG_HEADER, tag);
                }
                (status, headers, pem)
            }
        }),
    )
}

fn fail(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("the swarm's CA: {what}: {e}"))
}

/// The CA's parameters: the same at every start, so that a CA loaded from its key signs
/// exactly as the one first made.
fn ca_params() -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("params", e))?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "shardswarm swarm CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

impl SwarmCa {
    /// The CA kept in `dir` (`ca.pem`, `ca.key`, the key readable by its owner only), made on
    /// first use.
    pub fn load_or_create(dir: &Path) -> Result<SwarmCa> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let params = ca_params()?;
        let (cert_pem, key) = if cert_path.exists() && key_path.exists() {
            let read = |p: &Path| {
                std::fs::read_to_string(p)
                    .map_err(|e| daemon::IoError::new(format!("reading {}", p.display()), e))
            };
            let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| fail("ca.key", e))?;
            (read(&cert_path)?, key)
        } else {
            let key = KeyPair::generate().map_err(|e| fail("a key", e))?;
            let cert = params
                .self_signed(&key)
                .map_err(|e| fail("self-signing", e))?;
            daemon::secret::write_private(&key_path, &key.serialize_pem())?;
            torrents::manifest::write_atomically(&cert_path, cert.pem().as_bytes())
                .map_err(|e| fail("ca.pem", e))?;
            tracing::info!("made the swarm's CA: {}", cert_path.display());
            (cert.pem(), key)
        };
        Ok(SwarmCa {
            cert_pem,
            cert_path,
            issuer: Issuer::new(params, key),
        })
    }

    /// A node's data-channel TLS: a certificate of the public key it named
    /// (`public_key_pem`, a PEM SubjectPublicKeyInfo; the node keeps the private half) for
    /// its node id's name ([`protocol::node_tls_name`]), never for an address it claims (a
    /// node could claim the coordinator's), for serving and calling on the data channel.
    /// A key that is not one is [`Error::NodeKey`].
    pub fn node_tls(&self, node_id: &str, public_key_pem: &str) -> Result<protocol::NodeTls> {
        let key = rcgen::SubjectPublicKeyInfo::from_pem(public_key_pem)
            .map_err(|e| Error::NodeKey(format!("tls_public_key is not a public key: {e}")))?;
        let names = vec![protocol::node_tls_name(node_id)];
        let usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert_pem = self.sign(&key, names, &format!("shardswarm node {node_id}"), usages)?;
        Ok(protocol::NodeTls {
            ca_pem: self.cert_pem.clone(),
            cert_pem,
        })
    }

    /// The coordinator's certificate for `names` (IP addresses or host names), signed by the
    /// CA: (chain PEM with the CA last, key PEM).
    pub fn certificate_for(&self, names: Vec<String>) -> Result<(String, String)> {
        let key = KeyPair::generate().map_err(|e| fail("a key", e))?;
        let usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let chain = self.sign(&key, names, "shardswarm coordinator", usages)?;
        Ok((chain, key.serialize_pem()))
    }

    /// A certificate of `key` for `names`, signed by the CA: its chain (PEM, the CA last).
    fn sign(
        &self,
        key: &impl rcgen::PublicKeyData,
        names: Vec<String>,
        common_name: &str,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<String> {
        let mut params = CertificateParams::new(names).map_err(|e| fail("names", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = usages;
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(|e| fail("signing", e))?;
        Ok(format!("{}{}", cert.pem(), self.cert_pem))
    }
}

/// The names a coordinator listening on `listen` is reached by: that address, or for an
/// unspecified one every address of this machine, plus `localhost` and the host name.
pub fn own_names(listen: std::net::IpAddr) -> Vec<String> {
    let mut names: Vec<String> = if listen.is_unspecified() {
        if_addrs::get_if_addrs()
            .map(|ifs| ifs.into_iter().map(|i| i.ip().to_string()).collect())
            .unwrap_or_default()
    } else {
        vec![listen.to_string()]
    };
    names.push("localhost".into());
    names.extend(host_name());
    names.sort();
    names.dedup();
    names
}

/// This machine's host name (`/etc/hostname`), if it has one.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    /// Whether `chain_pem` (leaf first) is a valid server certificate for `name` under `ca`.
    fn valid_for(ca: &SwarmCa, chain_pem: &str, name: &str) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .unwrap();
        let chain: Vec<CertificateDer> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .is_ok()
    }

    /// A token holder that registers with the coordinator's address gets a certificate for
    /// its node id only: never one a client would take for the coordinator.
    #[test]
    fn a_nodes_certificate_names_its_node_id_never_an_address() {
        let dir = std::env::temp_dir().join(format!("shardswarm-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = SwarmCa::load_or_create(&dir).unwrap();
        let (coordinator, _) = ca.certificate_for(vec!["127.0.0.1".into()]).unwrap();
        assert!(valid_for(&ca, &coordinator, "127.0.0.1"));

        // The node's key is the node's: only its public half reaches the CA.
        let node_key = KeyPair::generate().unwrap();
        let id = "6addd700-894c-4b31-974d-ffba0a716d5b";
        let node = ca.node_tls(id, &node_key.public_key_pem()).unwrap();
        let leaf = CertificateDer::pem_slice_iter(node.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            node_key.public_key_raw()
        );
        assert!(!node.cert_pem.contains("PRIVATE KEY"));
        // What is not a public key is refused, naming the field.
        for bad in ["", "not a key", &node_key.serialize_pem()] {
            let e = ca.node_tls(id, bad).unwrap_err().to_string();
            assert!(e.contains("tls_public_key"), "{e}");
        }
        let own_name = protocol::node_tls_name("6addd700-894c-4b31-974d-ffba0a716d5b");
        assert!(valid_for(&ca, &node.cert_pem, &own_name));
        assert!(!valid_for(&ca, &node.cert_pem, "127.0.0.1"));
        assert!(!valid_for(&ca, &node.cert_pem, "localhost"));
        assert!(!valid_for(
            &ca,
            &node.cert_pem,
            &protocol::node_tls_name("another-node")
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
