//! A TCP listener that keeps at most N connections open (each accepted connection holds a
//! permit until hyper drops it, and none is accepted without one), at most M of them from one
//! address, and speaks TLS when given a server config. TLS handshakes run in tasks of their
//! own, each bounded in time, so a client that stalls its handshake holds up nobody else.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIME: Duration = Duration::from_secs(10);

/// Connections accepted (and through their handshake), waiting for hyper to take them.
pub struct Capped {
    incoming: mpsc::Receiver<(CappedStream, SocketAddr)>,
    local: SocketAddr,
}

/// Open connections by client address ([`crate::client_of`]): the HTTP listener's cap per
/// client, and the node data port's on handshakes.
#[derive(Default)]
pub struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

/// One open connection counted against its client; dropping it gives the place back.
pub struct AddressPlace {
    counts: Arc<PerAddress>,
    client: IpAddr,
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

impl PerAddress {
    /// A place for a connection from `ip`, unless `max` are open from its client.
    pub fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<AddressPlace> {
        let client = crate::client_of(ip);
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(client).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressPlace {
            counts: self.clone(),
            client,
        })
    }
}

impl Capped {
    /// Accept on `listener` within `limits`' connection caps, with TLS if `tls`.
    pub fn new(
        mut listener: TcpListener,
        limits: &crate::HttpLimits,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Capped> {
        let local = listener.local_addr()?;
        let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let per_address = Arc::new(PerAddress::default());
        let max_per_address = limits.max_per_address.max(1);
        let header_timeout = limits.header_timeout;
        let (tx, incoming) = mpsc::channel(16);
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                // axum's own accept loop: it logs errors and backs off (out of descriptors).
                let (tcp, addr) = axum::serve::Listener::accept(&mut listener).await;
                let Some(place) = per_address.enter(addr.ip(), max_per_address) else {
                    tracing::debug!(
                        "{addr}: {max_per_address} connections from its address are open: closed"
                    );
                    continue; // dropping the stream closes it; the permit goes back
                };
                // Streamed tokens are small writes a few milliseconds apart: with Nagle's
                // algorithm a write may wait for the client's delayed ACK of the one before.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!("TCP_NODELAY on an HTTP connection: {e}");
                }
                let Some(acceptor) = &acceptor else {
                    let conn = CappedStream::new(Conn::Plain(tcp), permit, place, header_timeout);
                    if tx.send((conn, addr)).await.is_err() {
                        return; // the server stopped
                    }
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIME, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let tls = Conn::Tls(Box::new(tls));
                            let conn = CappedStream::new(tls, permit, place, header_timeout);
                            let _ = tx.send((conn, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {addr}: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {addr}: timed out"),
                    }
                });
            }
        });
        Ok(Capped { incoming, local })
    }
}

impl axum::serve::Listener for Capped {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CappedStream, SocketAddr) {
        match self.incoming.recv().await {
            Some(accepted) => accepted,
            // The accepting task ended (it does not while the server runs).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection and its places (given back when hyper drops the connection).
pub struct CappedStream {
    conn: Conn,
    _permit: OwnedSemaphorePermit,
    _place: AddressPlace,
    /// Until the client's first byte: when it is too late. hyper's header timeout covers a
    /// request once its first byte is in (and idle kept-alive connections), not a client
    /// that never sends one.
    first_byte_by: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl CappedStream {
    fn new(
        conn: Conn,
        permit: OwnedSemaphorePermit,
        place: AddressPlace,
        wait: Duration,
    ) -> CappedStream {
        CappedStream {
            conn,
            _permit: permit,
            _place: place,
            first_byte_by: Some(Box::pin(tokio::time::sleep(wait))),
        }
    }
}

/// Forward an IO call to the plain or TLS stream.
macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match &mut $self.get_mut().conn {
            Conn::Plain($s) => {
                let $s = Pin::new($s);
                $call
            }
            Conn::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $call
            }
        }
    };
}

impl AsyncRead for CappedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = match &mut this.conn {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        match &read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.first_byte_by = None,
            Poll::Pending => {
                if let Some(by) = &mut this.first_byte_by {
                    if by.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the client sent nothing in time",
                        )));
                    }
                }
            }
            _ => {}
        }
        read
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.conn {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_until_one_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "hi" }))
            .route(
                "/echo",
                axum::routing::post(|body: String| async move { body }),
            );
        let stop = tokio_util::sync::CancellationToken::new();
        let limits = crate::HttpLimits {
            max_connections: 2,
            max_body: 16,
            ..crate::HttpLimits::default()
        };
        crate::serve_http(listener, app, stop.clone(), limits, None).unwrap();
        let ask = |mut s: TcpStream| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 256];
            let n = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await;
            (
                s,
                n.ok()
                    .map(|n| String::from_utf8_lossy(&buf[..n.unwrap()]).into_owned()),
            )
        };
        // Two idle keep-alive connections take both places; a third is not served...
        let (a, first) = ask(TcpStream::connect(addr).await.unwrap()).await;
        let (b, second) = ask(TcpStream::connect(addr).await.unwrap()).await;
        assert!(first.unwrap().contains("200 OK"));
        assert!(second.unwrap().contains("200 OK"));
        let (third_conn, third) = ask(TcpStream::connect(addr).await.unwrap()).await;
        assert_eq!(third, None, "a third connection was served");
        // ...until one of the others closes; then it is.
        drop(a);
        let mut third_conn = third_conn;
        let mut buf = [0u8; 256];
        use tokio::io::AsyncReadExt;
        let n = tokio::time::timeout(Duration::from_secs(10), third_conn.read(&mut buf))
            .await
            .expect("the third connection was never served")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));

        // A body over the limit gets 413; one within it is read.
        drop((b, third_conn));
        let post = |len: usize| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = TcpStream::connect(addr).await.unwrap();
            let req = format!(
                "POST /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {len}\r\n\r\n{}",
                "x".repeat(len)
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
                .await
                .unwrap()
                .unwrap();
            out
        };
        assert!(post(64).await.starts_with("HTTP/1.1 413"));
        assert!(post(8).await.starts_with("HTTP/1.1 200"));
        stop.cancel();
    }

    /// A connection from `from` (a loopback address) to `to`.
    async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        socket.connect(to).await.unwrap()
    }

    /// What the server sends on `s` within 10 s: its bytes, or `None` when it closes the
    /// connection without an answer.
    async fn answer(s: &mut TcpStream) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("neither an answer nor a close within 10 s");
        match read {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        }
    }

    #[tokio::test]
    async fn one_address_cannot_take_every_place_and_silent_clients_are_let_go() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
        let stop = tokio_util::sync::CancellationToken::new();
        let limits = crate::HttpLimits {
            max_connections: 8,
            max_per_address: 2,
            header_timeout: Duration::from_millis(300),
            ..crate::HttpLimits::default()
        };
        crate::serve_http(listener, app, stop.clone(), limits, None).unwrap();
        // Two silent connections from 127.0.0.2, one that starts its headers and stalls.
        let mut silent = connect_from("127.0.0.2", addr).await;
        let mut stalled = connect_from("127.0.0.2", addr).await;
        stalled.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // A third from that address is closed at once; another address is served.
        let mut third = connect_from("127.0.0.2", addr).await;
        assert_eq!(
            answer(&mut third).await,
            None,
            "a third place for one address"
        );
        let mut other = connect_from("127.0.0.3", addr).await;
        other
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(answer(&mut other).await.unwrap().contains("200 OK"));
        // The silent and the stalled client are let go once the header time is up, and so is
        // a kept-alive connection that sends no next request.
        assert_eq!(answer(&mut silent).await, None);
        assert!(answer(&mut stalled).await.is_none_or(|a| a.contains("408")));
        assert_eq!(
            answer(&mut other).await,
            None,
            "an idle kept-alive connection"
        );
        // Their places are free again.
        let mut again = connect_from("127.0.0.2", addr).await;
        again
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(answer(&mut again).await.unwrap().contains("200 OK"));
        stop.cancel();
    }
}
