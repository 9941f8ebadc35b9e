//! A TCP listener for axum that keeps at most N connections open (each accepted connection
//! holds a permit until hyper drops it, and none is accepted without one), and speaks TLS
//! when given a server config. TLS handshakes run in tasks of their own, each bounded in
//! time, so a client that stalls its handshake holds up nobody else.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
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

impl Capped {
    /// Accept on `listener`, at most `max_connections` open at once, with TLS if `tls`.
    pub fn new(
        mut listener: TcpListener,
        max_connections: usize,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Capped> {
        let local = listener.local_addr()?;
        let permits = Arc::new(Semaphore::new(max_connections.max(1)));
        let (tx, incoming) = mpsc::channel(16);
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                // axum's own accept loop: it logs errors and backs off (out of descriptors).
                let (tcp, addr) = axum::serve::Listener::accept(&mut listener).await;
                // Streamed tokens are small writes a few milliseconds apart: with Nagle's
                // algorithm a write may wait for the client's delayed ACK of the one before.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!("TCP_NODELAY on an HTTP connection: {e}");
                }
                let Some(acceptor) = &acceptor else {
                    let conn = CappedStream {
                        conn: Conn::Plain(tcp),
                        _permit: permit,
                    };
                    if tx.send((conn, addr)).await.is_err() {
                        return; // the server stopped
                    }
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIME, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let conn = CappedStream {
                                conn: Conn::Tls(Box::new(tls)),
                                _permit: permit,
                            };
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

/// An accepted connection and its permit (given back when hyper drops the connection).
pub struct CappedStream {
    conn: Conn,
    _permit: OwnedSemaphorePermit,
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
        delegate!(self, s => s.poll_read(cx, buf))
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
}
