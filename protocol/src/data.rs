//! The node-to-node data channel: binary frames carrying tokens and hidden states (f32,
//! little-endian) along the pipeline, over TCP.
//!
//! Frame: `u32` payload length, then the payload: a one-byte kind and its fields, all
//! little-endian. A connection starts with `Hello` (model sha256, split id, the stage the
//! sender expects to reach), answered `Ready` or `Error`: a node never runs a stage for
//! another split or another stage index. Then `Step`s flow down the chain, one after another
//! without waiting, each hop one connection carrying every sequence. The last stage answers
//! each step with one `Sampled`, in step order, straight to the coordinator on the *answer
//! lane* the coordinator opened to it (matched by the lane id both `Hello`s carry), so a token
//! crosses one hop back rather than one per stage; errors flow back up the chain.

pub mod auth;
mod hello;
#[cfg(feature = "io")]
pub mod seal;

pub use hello::{Hello, LaneKind};

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

/// Frames a peer may send before it has proved the route key: enough for a `Hello`, far
/// below [`MAX_FRAME`], so that a stranger cannot make a node allocate much.
pub const MAX_HANDSHAKE_FRAME: usize = 16 << 10;

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

/// One sequence's rows in a [`Frame::Step`]: `rows` consecutive positions from `pos0` of
/// sequence `seq` (a llama.cpp `seq_id`, below the route's `parallel`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Group {
    pub seq: u32,
    /// A stage first forgets the sequence's positions from `pos0` on: a sequence that reuses a
    /// cached prefix, or a step replayed after a failure, starts from a known state.
    pub pos0: u32,
    pub rows: u32,
    /// Whether the last stage samples a token after this group's last row (false for a chunk
    /// of a prompt that has more to come).
    pub sample: bool,
    pub sampling: Sampling,
}

/// A data-channel message.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Hello(Hello),
    /// The callee's answer to `Hello`: its nonce and its proof of the route key
    /// ([`auth::callee_proof`]).
    Challenge {
        nonce: [u8; auth::PROOF_LEN],
        proof: auth::Proof,
    },
    /// The caller's proof of the route key ([`auth::caller_proof`]); answered `Ready`.
    Proof(auth::Proof),
    Ready,
    /// One pipeline step: the groups' rows, in order, as one payload (tokens into stage 0,
    /// hidden states after it). Steps flow down the chain without waiting for answers; each
    /// is answered by one `Sampled` from the last stage (on the answer lane), or an `Error`
    /// coming back up.
    Step {
        step: u64,
        /// Steps in the pipeline when this one was sent, itself included: at most that many
        /// stages work at once, which tells stages that share a machine how many threads to
        /// take.
        in_flight: u32,
        /// Each stage's compute time for this step so far, in microseconds (stage 0 first;
        /// each stage adds its own before passing the step on).
        busy_us: Vec<u32>,
        groups: Vec<Group>,
        payload: Payload,
    },
    /// The last stage's answer to a step: a token for each group that asked for one, and each
    /// stage's compute time for the step in microseconds (stage 0 first, the last stage's
    /// own last).
    Sampled {
        step: u64,
        tokens: Vec<(u32, i32)>,
        busy_us: Vec<u32>,
    },
    /// A probe's answer: the stage's output for the step's rows, `width` floats per row:
    /// hidden states of every row, or the logits of each sampled group's last row on the
    /// last stage.
    Output {
        step: u64,
        width: u32,
        data: Vec<f32>,
    },
    /// A `Step` from one stage to the next, signed by the sender's node key
    /// ([`seal`]): the receiver checks it and keeps it, so that it can later prove to the
    /// coordinator what exactly the sender sent on a served request.
    Signed {
        signature: [u8; SIGNATURE_LEN],
        step: Box<Frame>,
    },
    /// On a probe lane, from the coordinator: the signed steps this node received on chain
    /// lane `lane` from step `first` to `last` that carry sequence `seq` (the check of a
    /// served request).
    Recall {
        lane: String,
        seq: u32,
        first: u64,
        last: u64,
    },
    /// The answer to `Recall`: each kept `Signed` frame, encoded as it was received.
    Recalled(Vec<Vec<u8>>),
    Error(String),
}

/// The most steps a caller may have waiting at a stage on one lane: twice what a coordinator
/// ever has in flight (one per sequence, at most 64). A caller that sends more is cut off,
/// so that no peer can grow a stage's queue without bound.
pub const MAX_QUEUED_STEPS: usize = 128;

/// Bytes in a step's signature (Ed25519).
pub const SIGNATURE_LEN: usize = 64;

/// The most steps one `Recalled` may hold (a request of [`MAX_CONTEXT`] tokens takes fewer).
pub const MAX_RECALLED: usize = 2 * MAX_CONTEXT as usize;

/// The bytes of steps one `Recalled` holds at most (it holds at least one step, whatever its
/// size): half a frame, so that an answer always fits in one. The coordinator asks again from
/// the step after the last it got until it has the whole range.
pub const MAX_RECALLED_BYTES: usize = MAX_FRAME / 2;

/// What each stage keeps of the signed steps it received, in bytes (the oldest go first):
/// enough for the coordinator to recall a request's steps right after it is served.
pub const KEPT_STEP_BYTES: usize = 256 << 20;

impl Payload {
    /// How many rows (positions) the payload holds.
    pub fn rows(&self) -> usize {
        match self {
            Payload::Tokens(t) => t.len(),
            Payload::Hidden { n_embd, data } => data.len() / (*n_embd).max(1) as usize,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Tokens(t) => {
                out.push(0);
                out.extend((t.len() as u32).to_le_bytes());
                t.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
            Payload::Hidden { n_embd, data } => {
                out.push(1);
                out.extend(n_embd.to_le_bytes());
                out.extend((self.rows() as u32).to_le_bytes());
                data.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Payload, FrameError> {
        Ok(match r.take(1, "payload kind")?[0] {
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
        })
    }
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
    #[error("a step's groups have {groups} rows but its payload has {payload}")]
    Rows { groups: u64, payload: usize },
    #[error("{0} entries is over the limit")]
    TooMany(usize),
    #[error("a signed frame holds a frame of kind {0}, not a Step")]
    Signed(u8),
}

/// The most groups (sequences) one step may carry, and the most stages an answer may list.
pub const MAX_GROUPS: usize = 4096;

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
    fn i32(&mut self, what: &'static str) -> Result<i32, FrameError> {
        Ok(i32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn f32(&mut self, what: &'static str) -> Result<f32, FrameError> {
        Ok(f32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    /// A u32 count, refused above [`MAX_GROUPS`].
    fn count(&mut self, what: &'static str) -> Result<usize, FrameError> {
        let n = self.u32(what)? as usize;
        if n > MAX_GROUPS {
            return Err(FrameError::TooMany(n));
        }
        Ok(n)
    }
    /// A count of stages, then each one's compute time.
    fn busy_us(&mut self) -> Result<Vec<u32>, FrameError> {
        let n = self.count("stage count")?;
        (0..n).map(|_| self.u32("busy")).collect()
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated("trailing bytes"))
        }
    }
}

impl Frame {
    /// The frame's name, for messages (without its contents, which may be megabytes).
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Challenge { .. } => "Challenge",
            Frame::Proof(_) => "Proof",
            Frame::Ready => "Ready",
            Frame::Step { .. } => "Step",
            Frame::Sampled { .. } => "Sampled",
            Frame::Output { .. } => "Output",
            Frame::Signed { .. } => "Signed",
            Frame::Recall { .. } => "Recall",
            Frame::Recalled(_) => "Recalled",
            Frame::Error(_) => "Error",
        }
    }

    /// The payload (without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Frame::Hello(h) => {
                out.push(1);
                out.extend(serde_json::to_vec(h).expect("hello serialises"));
            }
            Frame::Ready => out.push(2),
            Frame::Challenge { nonce, proof } => {
                out.push(3);
                out.extend(nonce);
                out.extend(proof);
            }
            Frame::Proof(proof) => {
                out.push(4);
                out.extend(proof);
            }
            Frame::Step {
                step,
                in_flight,
                busy_us,
                groups,
                payload,
            } => {
                out.push(6);
                out.extend(step.to_le_bytes());
                out.extend(in_flight.to_le_bytes());
                out.extend((busy_us.len() as u32).to_le_bytes());
                busy_us.iter().for_each(|b| out.extend(b.to_le_bytes()));
                out.extend((groups.len() as u32).to_le_bytes());
                for g in groups {
                    out.extend(g.seq.to_le_bytes());
                    out.extend(g.pos0.to_le_bytes());
                    out.extend(g.rows.to_le_bytes());
                    out.push(u8::from(g.sample));
                    out.extend(g.sampling.temperature.to_le_bytes());
                    out.extend(g.sampling.top_p.to_le_bytes());
                    out.extend(g.sampling.seed.to_le_bytes());
                }
                payload.encode(&mut out);
            }
            Frame::Sampled {
                step,
                tokens,
                busy_us,
            } => {
                out.push(7);
                out.extend(step.to_le_bytes());
                out.extend((tokens.len() as u32).to_le_bytes());
                for (seq, token) in tokens {
                    out.extend(seq.to_le_bytes());
                    out.extend(token.to_le_bytes());
                }
                out.extend((busy_us.len() as u32).to_le_bytes());
                busy_us.iter().for_each(|b| out.extend(b.to_le_bytes()));
            }
            Frame::Output { step, width, data } => {
                out.push(8);
                out.extend(step.to_le_bytes());
                out.extend(width.to_le_bytes());
                out.extend((data.len() as u32).to_le_bytes());
                data.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
            Frame::Signed { signature, step } => {
                out.push(9);
                out.extend(signature);
                out.extend(step.encode());
            }
            Frame::Recall {
                lane,
                seq,
                first,
                last,
            } => {
                out.push(10);
                out.extend(seq.to_le_bytes());
                out.extend(first.to_le_bytes());
                out.extend(last.to_le_bytes());
                out.extend(lane.as_bytes());
            }
            Frame::Recalled(frames) => {
                out.push(11);
                out.extend((frames.len() as u32).to_le_bytes());
                for f in frames {
                    out.extend((f.len() as u32).to_le_bytes());
                    out.extend(f);
                }
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
        let frame = match kind {
            1 => return Ok(Frame::Hello(serde_json::from_slice(r.0)?)),
            2 => Frame::Ready,
            3 => Frame::Challenge {
                nonce: r.take(auth::PROOF_LEN, "nonce")?.try_into().unwrap(),
                proof: r.take(auth::PROOF_LEN, "proof")?.try_into().unwrap(),
            },
            4 => Frame::Proof(r.take(auth::PROOF_LEN, "proof")?.try_into().unwrap()),
            6 => {
                let step = r.u64("step")?;
                let in_flight = r.u32("in flight")?;
                let busy_us = r.busy_us()?;
                let n = r.count("group count")?;
                let mut groups = Vec::with_capacity(n);
                for _ in 0..n {
                    groups.push(Group {
                        seq: r.u32("seq")?,
                        pos0: r.u32("pos0")?,
                        rows: r.u32("rows")?,
                        sample: r.take(1, "sample")?[0] != 0,
                        sampling: Sampling {
                            temperature: r.f32("temperature")?,
                            top_p: r.f32("top_p")?,
                            seed: r.u64("seed")?,
                        },
                    });
                }
                let payload = Payload::decode(&mut r)?;
                let rows: u64 = groups.iter().map(|g| u64::from(g.rows)).sum();
                if rows != payload.rows() as u64 {
                    return Err(FrameError::Rows {
                        groups: rows,
                        payload: payload.rows(),
                    });
                }
                Frame::Step {
                    step,
                    in_flight,
                    busy_us,
                    groups,
                    payload,
                }
            }
            7 => {
                let step = r.u64("step")?;
                let n = r.count("token count")?;
                let mut tokens = Vec::with_capacity(n);
                for _ in 0..n {
                    tokens.push((r.u32("seq")?, r.i32("token")?));
                }
                let busy_us = r.busy_us()?;
                Frame::Sampled {
                    step,
                    tokens,
                    busy_us,
                }
            }
            8 => {
                let step = r.u64("step")?;
                let width = r.u32("width")?;
                let n = r.u32("float count")? as usize;
                let raw = r.take(
                    n.checked_mul(4).ok_or(FrameError::Truncated("output"))?,
                    "output",
                )?;
                if width == 0 || !n.is_multiple_of(width as usize) {
                    return Err(FrameError::Shape(n, width));
                }
                let data = raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                Frame::Output { step, width, data }
            }
            9 => {
                let signature = r.take(SIGNATURE_LEN, "signature")?.try_into().unwrap();
                // Checked before decoding: a signed frame inside a signed frame would recurse.
                if r.0.first() != Some(&6) {
                    return Err(FrameError::Signed(r.0.first().copied().unwrap_or(0)));
                }
                let step = Frame::decode(std::mem::take(&mut r.0))?;
                Frame::Signed {
                    signature,
                    step: Box::new(step),
                }
            }
            10 => Frame::Recall {
                seq: r.u32("seq")?,
                first: r.u64("first step")?,
                last: r.u64("last step")?,
                lane: String::from_utf8_lossy(std::mem::take(&mut r.0)).into_owned(),
            },
            11 => {
                let n = r.u32("step count")? as usize;
                if n > MAX_RECALLED {
                    return Err(FrameError::TooMany(n));
                }
                let mut frames = Vec::new();
                for _ in 0..n {
                    let len = r.u32("step length")? as usize;
                    frames.push(r.take(len, "recalled step")?.to_vec());
                }
                Frame::Recalled(frames)
            }
            255 => return Ok(Frame::Error(String::from_utf8_lossy(r.0).into_owned())),
            k => return Err(FrameError::Kind(k)),
        };
        r.end()?;
        Ok(frame)
    }
}

#[cfg(test)]
mod tests;

#[cfg(feature = "io")]
pub mod io;
