//! The node-to-node data channel: binary frames carrying tokens and hidden states (f32,
//! little-endian) along the pipeline, over TCP.
//!
//! Frame: `u32` payload length, then the payload: a one-byte kind and its fields, all
//! little-endian. A connection starts with `Hello` (model sha256, split id, the stage the
//! sender expects to reach), answered `Ready` or `Error`: a node never runs a stage for
//! another split or another stage index. Requests flow down the chain; each stage answers its
//! caller once the stages after it have answered it.

use serde::{Deserialize, Serialize};

/// The longest context a stage keeps (prompt and completion tokens together), whatever the
/// model was trained for: it bounds the KV cache and batch buffers of every stage.
pub const MAX_CONTEXT: u32 = 4096;

/// The context of a model trained for `n_ctx_train` tokens (from its GGUF), capped.
pub fn stage_context(n_ctx_train: u32) -> u32 {
    if n_ctx_train == 0 {
        MAX_CONTEXT
    } else {
        n_ctx_train.min(MAX_CONTEXT)
    }
}

/// Frames larger than this are refused (a 4096-token prompt of 4096-wide f32 states is 64 MiB).
pub const MAX_FRAME: usize = 256 << 20;

/// The greeting of a data connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub model_sha256: String,
    pub split_id: String,
    /// The stage (shard id) the caller wants to talk to.
    pub stage: u32,
}

/// How the last stage picks the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

/// What a request carries into a stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Tokens(Vec<i32>),
    /// `n_tokens` rows of `n_embd` floats.
    Hidden {
        n_embd: u32,
        data: Vec<f32>,
    },
}

/// A data-channel message.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Hello(Hello),
    Ready,
    /// Run `payload` at positions `pos0..` of `session`; the answer is a `Token`.
    Forward {
        session: u64,
        pos0: u32,
        sampling: Sampling,
        payload: Payload,
    },
    /// The token the last stage chose.
    Token {
        session: u64,
        token: i32,
    },
    /// Free the session's state on this stage and every stage after it; answered `Ready`.
    End {
        session: u64,
    },
    Error(String),
}

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("truncated frame ({0})")]
    Truncated(&'static str),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("bad hello: {0}")]
    Hello(#[from] serde_json::Error),
    #[error("hidden states: {0} floats is not a whole number of {1}-wide rows")]
    Shape(usize, u32),
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Truncated(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn f32(&mut self, what: &'static str) -> Result<f32, FrameError> {
        Ok(f32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
}

impl Frame {
    /// The payload (without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Frame::Hello(h) => {
                out.push(1);
                out.extend(serde_json::to_vec(h).expect("hello serialises"));
            }
            Frame::Ready => out.push(2),
            Frame::Forward {
                session,
                pos0,
                sampling,
                payload,
            } => {
                out.push(3);
                out.extend(session.to_le_bytes());
                out.extend(pos0.to_le_bytes());
                out.extend(sampling.temperature.to_le_bytes());
                out.extend(sampling.top_p.to_le_bytes());
                out.extend(sampling.seed.to_le_bytes());
                match payload {
                    Payload::Tokens(t) => {
                        out.push(0);
                        out.extend((t.len() as u32).to_le_bytes());
                        t.iter().for_each(|x| out.extend(x.to_le_bytes()));
                    }
                    Payload::Hidden { n_embd, data } => {
                        out.push(1);
                        out.extend(n_embd.to_le_bytes());
                        out.extend(((data.len() / (*n_embd).max(1) as usize) as u32).to_le_bytes());
                        data.iter().for_each(|x| out.extend(x.to_le_bytes()));
                    }
                }
            }
            Frame::Token { session, token } => {
                out.push(4);
                out.extend(session.to_le_bytes());
                out.extend(token.to_le_bytes());
            }
            Frame::End { session } => {
                out.push(5);
                out.extend(session.to_le_bytes());
            }
            Frame::Error(m) => {
                out.push(255);
                out.extend(m.as_bytes());
            }
        }
        out
    }

    /// Parse a payload, checking every length.
    pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
        if bytes.len() > MAX_FRAME {
            return Err(FrameError::TooLarge(bytes.len()));
        }
        let mut r = Reader(bytes);
        let kind = r.take(1, "kind")?[0];
        Ok(match kind {
            1 => Frame::Hello(serde_json::from_slice(r.0)?),
            2 => Frame::Ready,
            3 => {
                let session = r.u64("session")?;
                let pos0 = r.u32("pos0")?;
                let sampling = Sampling {
                    temperature: r.f32("temperature")?,
                    top_p: r.f32("top_p")?,
                    seed: r.u64("seed")?,
                };
                let payload = match r.take(1, "payload kind")?[0] {
                    0 => {
                        let n = r.u32("token count")? as usize;
                        let raw = r.take(
                            n.checked_mul(4).ok_or(FrameError::Truncated("tokens"))?,
                            "tokens",
                        )?;
                        Payload::Tokens(
                            raw.chunks_exact(4)
                                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                                .collect(),
                        )
                    }
                    1 => {
                        let n_embd = r.u32("n_embd")?;
                        let n = r.u32("row count")? as usize;
                        let floats = n
                            .checked_mul(n_embd as usize)
                            .ok_or(FrameError::Shape(0, n_embd))?;
                        let raw = r.take(
                            floats
                                .checked_mul(4)
                                .ok_or(FrameError::Shape(floats, n_embd))?,
                            "hidden states",
                        )?;
                        let data: Vec<f32> = raw
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                            .collect();
                        if n_embd == 0 || data.is_empty() {
                            return Err(FrameError::Shape(data.len(), n_embd));
                        }
                        Payload::Hidden { n_embd, data }
                    }
                    k => return Err(FrameError::Kind(k)),
                };
                if !r.0.is_empty() {
                    return Err(FrameError::Truncated("trailing bytes"));
                }
                Frame::Forward {
                    session,
                    pos0,
                    sampling,
                    payload,
                }
            }
            4 => Frame::Token {
                session: r.u64("session")?,
                token: i32::from_le_bytes(r.take(4, "token")?.try_into().unwrap()),
            },
            5 => Frame::End {
                session: r.u64("session")?,
            },
            255 => Frame::Error(String::from_utf8_lossy(r.0).into_owned()),
            k => return Err(FrameError::Kind(k)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_lengths_are_refused() {
        let s = Sampling {
            temperature: 0.5,
            top_p: 0.9,
            seed: 7,
        };
        for f in [
            Frame::Hello(Hello {
                model_sha256: "m".into(),
                split_id: "s".into(),
                stage: 2,
            }),
            Frame::Ready,
            Frame::Forward {
                session: 1,
                pos0: 3,
                sampling: s,
                payload: Payload::Tokens(vec![1, -2, 3]),
            },
            Frame::Forward {
                session: 1,
                pos0: 3,
                sampling: s,
                payload: Payload::Hidden {
                    n_embd: 2,
                    data: vec![1.0, 2.0, 3.0, 4.0],
                },
            },
            Frame::Token {
                session: 9,
                token: 42,
            },
            Frame::End { session: 9 },
            Frame::Error("no".into()),
        ] {
            assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        }
        let mut bad = Frame::Forward {
            session: 1,
            pos0: 0,
            sampling: s,
            payload: Payload::Hidden {
                n_embd: 2,
                data: vec![1.0; 4],
            },
        }
        .encode();
        bad.truncate(bad.len() - 1);
        assert!(Frame::decode(&bad).is_err());
        assert!(Frame::decode(&[9]).is_err());
        assert!(Frame::decode(&[]).is_err());
    }
}

/// Reading and writing frames on an async stream, and the data-channel connection (feature
/// `io`).
#[cfg(feature = "io")]
pub mod io {
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
                .map_err(|source| self.io(source))
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
                .map_err(|source| self.io(source))
        }

        /// Who is at the other end.
        pub fn peer(&self) -> &str {
            &self.peer
        }

        fn io(&self, source: std::io::Error) -> ChannelError {
            ChannelError::Io {
                peer: self.peer.clone(),
                source,
            }
        }

        fn refused(&self, reason: String) -> ChannelError {
            ChannelError::Refused {
                peer: self.peer.clone(),
                reason,
            }
        }
    }

    /// Write one frame.
    pub async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
        w: &mut W,
        frame: &Frame,
    ) -> std::io::Result<()> {
        let payload = frame.encode();
        w.write_all(&(payload.len() as u32).to_le_bytes()).await?;
        w.write_all(&payload).await?;
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
}
