//! Reading and writing frames on an async stream, and the data-channel connection (feature
//! `io`).

use super::auth::{self, PROOF_LEN};
use super::{Frame, FrameError, Hello, MAX_FRAME, MAX_HANDSHAKE_FRAME};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a data connection runs over: plain TCP, or TLS over it.
pub trait DataStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> DataStream for T {}

/// An accepted connection (its TLS handshake done, if any) and its channel binding
/// ([`auth::Binding`]), which the route key's proofs cover.
pub struct Accepted {
    stream: Box<dyn DataStream>,
    binding: auth::Binding,
}

impl Accepted {
    /// A connection without TLS: nothing to bind.
    pub fn plain(stream: impl DataStream) -> Accepted {
        Accepted {
            stream: Box::new(stream),
            binding: auth::UNBOUND,
        }
    }

    /// A connection over a secure session of another kind (a QUIC stream), bound to it by
    /// `binding` (the session's exporter value for [`auth::EXPORTER_LABEL`]).
    pub fn bound(stream: impl DataStream, binding: auth::Binding) -> Accepted {
        Accepted {
            stream: Box::new(stream),
            binding,
        }
    }

    /// A TLS connection, bound to its session.
    pub fn tls(stream: tokio_rustls::server::TlsStream<TcpStream>) -> Accepted {
        let binding = exporter(stream.get_ref().1);
        Accepted {
            stream: Box::new(stream),
            binding,
        }
    }
}

/// The session's TLS exporter value for the data channel ([`auth::EXPORTER_LABEL`]).
fn exporter<D>(conn: &rustls::ConnectionCommon<D>) -> auth::Binding {
    // Fails only before the handshake is done, or for TLS 1.2 without extended master secret
    // (rustls negotiates neither here): then nothing is bound, and the proofs fail across.
    conn.export_keying_material([0u8; 32], auth::EXPORTER_LABEL, None)
        .unwrap_or(auth::UNBOUND)
}

/// TLS for the callers of a hop: trust in the swarm's CA. The callee's certificate must name
/// the IP address the caller connects to.
pub type ClientTls = std::sync::Arc<rustls::ClientConfig>;

/// TLS to a node: what the caller trusts, and the node it must be (its certificate names the
/// node id, [`crate::node_tls_name`]).
#[derive(Clone, Copy)]
pub struct TlsTo<'a> {
    pub config: &'a ClientTls,
    pub node_id: &'a str,
}

/// Why a data-channel connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{peer}: {source}")]
    Io {
        peer: String,
        source: std::io::Error,
    },
    #[error("{peer} closed the connection")]
    Closed { peer: String },
    #[error("{peer} refused the connection: {reason}")]
    Refused { peer: String, reason: String },
}

pub(super) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // Only a broken system has no random source; no connection can be made safely then.
    getrandom::fill(&mut b).expect("the OS random source");
    b
}

/// One data-channel connection: length-prefixed frames both ways over TCP. It opens with a
/// handshake in which both ends prove the hop's route key ([`auth`]): `Hello` (caller),
/// `Challenge` (callee), `Proof` (caller), `Ready` (callee); either side answers `Error` and
/// closes instead. Until then frames are limited to [`MAX_HANDSHAKE_FRAME`]. The coordinator
/// holds one to stage 0 and each stage one to the next.
pub struct Connection {
    stream: Box<dyn DataStream>,
    peer: String,
}

impl Connection {
    /// Connect to `addr` and run the handshake with the hop's `key`; fails unless the callee
    /// proves the key and answers `Ready`.
    /// With `tls`, the connection runs over TLS, and the callee must show a certificate from
    /// the swarm's CA for the node it names.
    pub async fn open(
        addr: &str,
        hello: Hello,
        key: &str,
        tls: Option<TlsTo<'_>>,
    ) -> Result<Connection, ChannelError> {
        let io = |source| ChannelError::Io {
            peer: addr.to_owned(),
            source,
        };
        let tcp = TcpStream::connect(addr).await.map_err(io)?;
        let _ = tcp.set_nodelay(true);
        let (stream, binding): (Box<dyn DataStream>, _) = match tls {
            None => (Box::new(tcp), auth::UNBOUND),
            Some(TlsTo { config, node_id }) => {
                let name = rustls::pki_types::ServerName::try_from(crate::node_tls_name(node_id))
                    .map_err(|e| {
                    io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
                })?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls = connector.connect(name, tcp).await.map_err(io)?;
                let binding = exporter(tls.get_ref().1);
                (Box::new(tls), binding)
            }
        };
        Connection::open_over(stream, binding, addr.to_owned(), hello, key).await
    }

    /// Run the caller's side of the handshake over `stream`, an established secure session
    /// to `peer` (a QUIC stream of the mesh) bound to it by `binding`.
    pub async fn open_over(
        stream: Box<dyn DataStream>,
        binding: auth::Binding,
        peer: String,
        hello: Hello,
        key: &str,
    ) -> Result<Connection, ChannelError> {
        let mut conn = Connection { stream, peer };
        conn.send(&Frame::Hello(hello.clone())).await?;
        let nonce = match conn.receive_handshake().await? {
            Frame::Challenge { nonce, proof }
                if auth::is_callee_proof(key, &hello, &nonce, &binding, &proof) =>
            {
                nonce
            }
            Frame::Challenge { .. } => {
                let reason = "it does not hold this hop's route key".to_owned();
                let _ = conn.send(&Frame::Error(reason.clone())).await;
                return Err(conn.refused(reason));
            }
            Frame::Error(reason) => return Err(conn.refused(reason)),
            other => return Err(conn.refused(format!("answered {} to Hello", other.kind()))),
        };
        conn.send(&Frame::Proof(auth::caller_proof(
            key, &hello, &nonce, &binding,
        )))
        .await?;
        match conn.receive_handshake().await? {
            Frame::Ready => Ok(conn),
            Frame::Error(reason) => Err(conn.refused(reason)),
            other => Err(conn.refused(format!("answered {} to Proof", other.kind()))),
        }
    }

    /// Take an incoming connection: read its `Hello`, ask `admit` for the key of the hop it
    /// names (or the reason to refuse it), prove the key and check the caller's proof, then
    /// answer `Ready`. A refusal is answered `Error` with the reason (and fails).
    /// `stream` is the accepted connection (its TLS handshake done, if any), from `peer`.
    pub async fn accept(
        stream: Accepted,
        peer: String,
        admit: impl FnOnce(&Hello) -> Result<String, String>,
    ) -> Result<(Connection, Hello), ChannelError> {
        Connection::accept_then(stream, peer, admit, |_| Ok(())).await
    }

    /// [`Connection::accept`], running `proved` once the caller has proved the key and before
    /// `Ready`: what must hold before the caller may go on (an answer lane registered before
    /// its chain lane can reach it) is done by then. Its error refuses the connection.
    pub async fn accept_then(
        stream: Accepted,
        peer: String,
        admit: impl FnOnce(&Hello) -> Result<String, String>,
        proved: impl FnOnce(&Hello) -> Result<(), String>,
    ) -> Result<(Connection, Hello), ChannelError> {
        let Accepted { stream, binding } = stream;
        let mut conn = Connection { stream, peer };
        let hello = match conn.receive_handshake().await? {
            Frame::Hello(h) => h,
            _ => return Err(conn.refuse("a data connection starts with Hello").await),
        };
        let key = match admit(&hello) {
            Ok(key) => key,
            Err(reason) => return Err(conn.refuse(&reason).await),
        };
        let nonce = random_bytes::<PROOF_LEN>();
        let proof = auth::callee_proof(&key, &hello, &nonce, &binding);
        conn.send(&Frame::Challenge { nonce, proof }).await?;
        match conn.receive_handshake().await? {
            Frame::Proof(p) if auth::is_caller_proof(&key, &hello, &nonce, &binding, &p) => {}
            Frame::Proof(_) => {
                return Err(conn
                    .refuse("refused: wrong proof of the route key (not the predecessor the coordinator named)")
                    .await)
            }
            Frame::Error(reason) => return Err(conn.refused(reason)),
            _ => return Err(conn.refuse("expected Proof").await),
        }
        if let Err(reason) = proved(&hello) {
            return Err(conn.refuse(&reason).await);
        }
        conn.send(&Frame::Ready).await?;
        Ok((conn, hello))
    }

    /// Answer `Error(reason)` and give the error to return.
    async fn refuse(&mut self, reason: &str) -> ChannelError {
        let _ = self.send(&Frame::Error(reason.to_owned())).await;
        self.refused(reason.to_owned())
    }

    /// The next handshake frame: small, or the connection fails.
    async fn receive_handshake(&mut self) -> Result<Frame, ChannelError> {
        read_frame_within(&mut self.stream, MAX_HANDSHAKE_FRAME)
            .await
            .map_err(io_error(&self.peer))?
            .ok_or_else(|| ChannelError::Closed {
                peer: self.peer.clone(),
            })
    }

    /// Send one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ChannelError> {
        write_frame(&mut self.stream, frame)
            .await
            .map_err(io_error(&self.peer))
    }

    /// The next frame; a connection that ends is an error here.
    pub async fn receive(&mut self) -> Result<Frame, ChannelError> {
        self.receive_or_end()
            .await?
            .ok_or_else(|| ChannelError::Closed {
                peer: self.peer.clone(),
            })
    }

    /// The next frame, or `None` when the peer ended the connection cleanly.
    pub async fn receive_or_end(&mut self) -> Result<Option<Frame>, ChannelError> {
        read_frame(&mut self.stream)
            .await
            .map_err(io_error(&self.peer))
    }

    /// Who is at the other end.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Split into a reading and a writing half, so one task can read answers while
    /// another sends steps (a hop carries many steps at once).
    pub fn into_split(self) -> (FrameReader, FrameWriter) {
        let (r, w) = tokio::io::split(self.stream);
        (
            FrameReader {
                half: r,
                peer: self.peer.clone(),
            },
            FrameWriter {
                half: w,
                peer: self.peer,
            },
        )
    }

    fn refused(&self, reason: String) -> ChannelError {
        ChannelError::Refused {
            peer: self.peer.clone(),
            reason,
        }
    }
}

/// The reading half of a [`Connection`].
pub struct FrameReader {
    half: ReadHalf<Box<dyn DataStream>>,
    peer: String,
}

impl FrameReader {
    /// The next frame, or `None` when the peer ended the connection cleanly. Not
    /// cancel-safe: keep it in one task rather than in a `select!`.
    pub async fn receive_or_end(&mut self) -> Result<Option<Frame>, ChannelError> {
        read_frame(&mut self.half)
            .await
            .map_err(io_error(&self.peer))
    }
}

/// The writing half of a [`Connection`].
pub struct FrameWriter {
    half: WriteHalf<Box<dyn DataStream>>,
    peer: String,
}

impl FrameWriter {
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ChannelError> {
        write_frame(&mut self.half, frame)
            .await
            .map_err(io_error(&self.peer))
    }
}

/// An I/O failure on the connection with `peer`.
fn io_error(peer: &str) -> impl FnOnce(std::io::Error) -> ChannelError + '_ {
    move |source| ChannelError::Io {
        peer: peer.to_owned(),
        source,
    }
}

/// Write one frame (length prefix and payload in one write).
pub async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> std::io::Result<()> {
    let payload = frame.encode();
    let mut bytes = Vec::with_capacity(4 + payload.len());
    bytes.extend((payload.len() as u32).to_le_bytes());
    bytes.extend(payload);
    w.write_all(&bytes).await?;
    w.flush().await
}

/// Read one frame (`None` at a clean end of stream).
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<Frame>> {
    read_frame_within(r, MAX_FRAME).await
}

/// Read one frame of at most `limit` bytes (`None` at a clean end of stream).
pub async fn read_frame_within<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
) -> std::io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            FrameError::TooLarge(len),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Frame::decode(&buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run a handshake on loopback: the caller with `caller_key`, the callee with
    /// `callee_key`. Returns what each side made of it.
    async fn handshake(
        caller_key: &str,
        callee_key: &str,
    ) -> (Result<(), String>, Result<(), String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let callee_key = callee_key.to_owned();
        let callee = tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            Connection::accept(Accepted::plain(stream), peer.to_string(), |h| {
                assert_eq!(h.stage, 3);
                Ok(callee_key)
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        });
        let caller = Connection::open(&addr, Hello::new("m", "s", 3), caller_key, None)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        (caller, callee.await.unwrap())
    }

    #[tokio::test]
    async fn both_ends_must_hold_the_hops_key() {
        assert_eq!(handshake("k", "k").await, (Ok(()), Ok(())));
        // Keys that differ (an impostor at the next stage's address, or a caller from an old
        // route): the caller finds out first and says so; the callee fails too.
        let (caller, callee) = handshake("k", "impostor").await;
        assert!(caller.unwrap_err().contains("does not hold"));
        assert!(callee.unwrap_err().contains("does not hold"));

        // A stranger who knows only the public Hello: its guessed proof is refused.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let callee = tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            Connection::accept(Accepted::plain(stream), peer.to_string(), |_| {
                Ok("k".to_owned())
            })
            .await
            .map(|_| ())
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        write_frame(&mut s, &Frame::Hello(Hello::new("m", "s", 3)))
            .await
            .unwrap();
        let challenge = read_frame(&mut s).await.unwrap().unwrap();
        assert_eq!(challenge.kind(), "Challenge");
        write_frame(&mut s, &Frame::Proof([0; PROOF_LEN]))
            .await
            .unwrap();
        let answer = read_frame(&mut s).await.unwrap().unwrap();
        assert!(
            matches!(&answer, Frame::Error(e) if e.contains("wrong proof")),
            "{answer:?}"
        );
        assert!(callee
            .await
            .unwrap()
            .unwrap_err()
            .to_string()
            .contains("wrong proof"));
    }

    #[test]
    fn nonces_are_fresh() {
        assert_ne!(Hello::new("m", "s", 0).nonce, Hello::new("m", "s", 0).nonce);
        assert_eq!(Hello::new("m", "s", 0).nonce.len(), 32);
    }

    /// A CA and a certificate for 127.0.0.1 signed by it: (CA DER, leaf DER, leaf key DER).
    fn certificates() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![crate::node_tls_name("n1")])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (
            ca_cert.der().to_vec(),
            leaf.der().to_vec(),
            key.serialize_der(),
        )
    }

    fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
        std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// A hop over TLS: the callee shows a certificate from the CA the caller trusts; a caller
    /// that trusts another CA does not connect.
    #[tokio::test]
    async fn a_hop_runs_over_tls_to_a_callee_the_swarms_ca_vouches_for() {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let (ca, leaf, key) = certificates();
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(leaf)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
        let client = |ca: Vec<u8>| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from(ca)).unwrap();
            std::sync::Arc::new(
                rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        };
        // Trusted CA and the right node; another CA; the right CA but another node (as a
        // node's certificate would be shown for an address it claimed).
        for (trusted, node, ok) in [
            (ca.clone(), "n1", true),
            (certificates().0, "n1", false),
            (ca, "n2", false),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let acceptor = acceptor.clone();
            let callee = tokio::spawn(async move {
                let (tcp, peer) = listener.accept().await.unwrap();
                let tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
                Connection::accept(Accepted::tls(tls), peer.to_string(), |_| Ok("k".to_owned()))
                    .await
                    .map(|(conn, _)| conn)
                    .map_err(|e| e.to_string())
            });
            let config = client(trusted);
            let tls = TlsTo {
                config: &config,
                node_id: node,
            };
            let caller = Connection::open(&addr, Hello::new("m", "s", 1), "k", Some(tls)).await;
            assert_eq!(caller.is_ok(), ok, "{:?}", caller.as_ref().err());
            if let (Ok(mut caller), Ok(mut callee)) = (caller, callee.await.unwrap()) {
                caller.send(&Frame::Ready).await.unwrap();
                assert_eq!(callee.receive().await.unwrap(), Frame::Ready);
            }
        }
    }
}
