//! A TCP listener for axum that keeps at most N connections open: each accepted connection
//! holds a permit until hyper drops it, and no connection is accepted without one.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// [`TcpListener`] with a cap on open connections.
pub struct Capped {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

impl Capped {
    pub fn new(inner: TcpListener, max_connections: usize) -> Capped {
        Capped {
            inner,
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
        }
    }
}

impl axum::serve::Listener for Capped {
    type Io = CappedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (CappedStream, std::net::SocketAddr) {
        // The semaphore is never closed, so acquiring fails only if it were.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        // axum's own accept loop: it logs errors and backs off (e.g. when out of descriptors).
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (
            CappedStream {
                stream,
                _permit: permit,
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection and its permit (given back when hyper drops the connection).
pub struct CappedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl CappedStream {
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
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
        crate::serve_http(listener, app, stop.clone(), limits);
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
