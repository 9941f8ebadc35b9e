//! Reading and writing frames on an async stream, and the data-channel connection (feature
//! `io`).

use super::{Frame, FrameError, Hello, MAX_FRAME};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// One data-channel connection: length-prefixed frames both ways over TCP, opened by a
/// `Hello` that the callee answers `Ready` (or `Error`) before any other frame. The
/// coordinator holds one to stage 0 and each stage one to the next.
pub struct Connection {
    stream: TcpStream,
    peer: String,
}

impl Connection {
    /// Connect to `addr` and greet it; fails unless the callee answers `Ready`.
    pub async fn open(addr: &str, hello: Hello) -> Result<Connection, ChannelError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ChannelError::Io {
                peer: addr.to_owned(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let mut conn = Connection {
            stream,
            peer: addr.to_owned(),
        };
        conn.send(&Frame::Hello(hello)).await?;
        match conn.receive().await? {
            Frame::Ready => Ok(conn),
            Frame::Error(reason) => Err(conn.refused(reason)),
            other => Err(conn.refused(format!("answered {other:?} to Hello"))),
        }
    }

    /// Take an incoming connection: read its `Hello` and answer `Ready` if `admit` accepts
    /// it, else `Error` with admit's reason (and fail).
    pub async fn accept(
        stream: TcpStream,
        admit: impl FnOnce(&Hello) -> Result<(), String>,
    ) -> Result<(Connection, Hello), ChannelError> {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "a peer".to_owned(), |a| a.to_string());
        let _ = stream.set_nodelay(true);
        let mut conn = Connection { stream, peer };
        let hello = match conn.receive().await? {
            Frame::Hello(h) => h,
            _ => {
                let reason = "a data connection starts with Hello".to_owned();
                let _ = conn.send(&Frame::Error(reason.clone())).await;
                return Err(conn.refused(reason));
            }
        };
        if let Err(reason) = admit(&hello) {
            let _ = conn.send(&Frame::Error(reason.clone())).await;
            return Err(conn.refused(reason));
        }
        conn.send(&Frame::Ready).await?;
        Ok((conn, hello))
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
        let (r, w) = self.stream.into_split();
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
    half: tokio::net::tcp::OwnedReadHalf,
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
    half: tokio::net::tcp::OwnedWriteHalf,
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
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
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
