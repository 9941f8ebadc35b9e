//! Serving a pipeline stage on the data channel.
//!
//! The coordinator's `ROUTE` says which stage this node runs and where the next stage is. A
//! request (`Forward`) runs the stage's layers; a non-final stage sends its hidden states to the
//! next stage and answers its caller with the token that comes back; the last stage samples
//! the token. The stage keeps `ROUTE.parallel` sequences, one per session, so up to that many
//! requests are under way at once and take turns step by step; a new session starts at
//! position 0 and takes a free sequence (or the least recently used one).
//!
//! Tasks: one per data connection. State: [`Pipeline`] behind a tokio mutex, held for one
//! step of one session through this stage and the ones after it (the node's llama.cpp
//! context is one); the stage itself behind a std mutex for the blocking decode.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use llm::sample::sample;
use llm::stage::{Stage, StageOutput};
use protocol::data::io::Connection;
use protocol::data::MAX_CONTEXT;
use protocol::data::{Frame, Hello, Payload, Sampling};
use protocol::RouteParams;
use tokio::net::{TcpListener, TcpStream};

use crate::{Error, Result};

/// The loaded stage and what it is doing.
struct Loaded {
    route: RouteParams,
    stage: Arc<Mutex<Stage>>,
    /// Which session each of the stage's sequences holds.
    slots: Slots,
    next: Option<Connection>,
}

/// The stage's sequences (llama.cpp `seq_id`s), each held by one session: a session keeps its
/// KV cache between steps while other sessions run; a new session takes a free sequence, or
/// the least recently used one.
struct Slots {
    /// (session, last use) per sequence.
    held: Vec<Option<(u64, u64)>>,
    clock: u64,
}

impl Slots {
    fn new(sequences: u32) -> Slots {
        Slots {
            held: vec![None; sequences.max(1) as usize],
            clock: 0,
        }
    }

    /// The sequence of `session`, if it has one.
    fn find(&self, session: u64) -> Option<usize> {
        self.held
            .iter()
            .position(|h| h.is_some_and(|(s, _)| s == session))
    }

    /// The sequence of `session`, and whether it was just given one (its KV cache must then be
    /// cleared of the sequence's previous holder).
    fn take(&mut self, session: u64) -> (usize, bool) {
        self.clock += 1;
        if let Some(seq) = self.find(session) {
            self.held[seq] = Some((session, self.clock));
            return (seq, false);
        }
        let seq = (0..self.held.len())
            .min_by_key(|&i| self.held[i].map_or(0, |(_, used)| used))
            .expect("at least one sequence");
        self.held[seq] = Some((session, self.clock));
        (seq, true)
    }

    /// Free `session`'s sequence, returning it.
    fn release(&mut self, session: u64) -> Option<usize> {
        let seq = self.find(session)?;
        self.held[seq] = None;
        Some(seq)
    }
}

/// This node's part of the inference pipeline.
pub struct Pipeline {
    shards_dir: PathBuf,
    threads: i32,
    loaded: tokio::sync::Mutex<Option<Loaded>>,
}

impl Pipeline {
    pub fn new(shards_dir: PathBuf, threads: i32) -> Arc<Pipeline> {
        Arc::new(Pipeline {
            shards_dir,
            threads,
            loaded: tokio::sync::Mutex::new(None),
        })
    }

    /// Take a route: load the stage's shard into llama.cpp (unless already loaded).
    pub async fn set_route(&self, route: RouteParams) -> Result<()> {
        let mut loaded = self.loaded.lock().await;
        if let Some(l) = loaded.as_mut() {
            if l.route.stage == route.stage
                && l.route.stage_count == route.stage_count
                && l.route.split_id == route.split_id
                && l.route.parallel == route.parallel
            {
                if l.route.next != route.next {
                    l.next = None;
                }
                l.route = route;
                return Ok(());
            }
        }
        let path = self.shards_dir.join(format!("shard-{}.gguf", route.stage));
        let is_last = route.stage + 1 == route.stage_count;
        let threads = self.threads;
        let sequences = route.parallel;
        let stage = tokio::task::spawn_blocking(move || {
            Stage::load_for(&path, is_last, MAX_CONTEXT, threads, sequences)
        })
        .await
        .map_err(|e| Error::Pipeline(format!("loading the stage: {e}")))??;
        tracing::info!(
            "stage {} of {} loaded in llama.cpp{}",
            route.stage,
            route.stage_count,
            if is_last { " (last)" } else { "" }
        );
        *loaded = Some(Loaded {
            slots: Slots::new(route.parallel),
            route,
            stage: Arc::new(Mutex::new(stage)),
            next: None,
        });
        Ok(())
    }
}

/// Accept data connections until the listener fails.
pub async fn serve(listener: TcpListener, pipeline: Arc<Pipeline>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(connection(stream, peer, pipeline.clone()));
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, pipeline: Arc<Pipeline>) {
    let route = pipeline
        .loaded
        .lock()
        .await
        .as_ref()
        .map(|l| l.route.clone());
    let admitted = Connection::accept(stream, |hello| admit(route.as_ref(), hello)).await;
    let mut conn = match admitted {
        Ok((conn, _)) => conn,
        Err(e) => {
            tracing::debug!("data connection from {peer}: {e}");
            return;
        }
    };
    if let Err(e) = handle(&mut conn, &pipeline).await {
        tracing::debug!("data connection from {peer}: {e:#}");
        let _ = conn.send(&Frame::Error(format!("{e:#}"))).await;
    }
}

/// A caller may talk to this node only about the stage, split and model it runs.
fn admit(route: Option<&RouteParams>, hello: &Hello) -> Result<(), String> {
    let Some(route) = route else {
        return Err("this node has no route yet".into());
    };
    let ours = (
        route.model_sha256.as_str(),
        route.split_id.as_str(),
        route.stage,
    );
    if (
        hello.model_sha256.as_str(),
        hello.split_id.as_str(),
        hello.stage,
    ) != ours
    {
        return Err(format!(
            "refused: this node runs stage {} of split {}, not stage {} of split {}",
            route.stage, route.split_id, hello.stage, hello.split_id
        ));
    }
    Ok(())
}

async fn handle(conn: &mut Connection, pipeline: &Pipeline) -> Result<()> {
    while let Some(frame) = conn.receive_or_end().await? {
        let reply = match frame {
            Frame::Forward {
                session,
                pos0,
                sampling,
                payload,
            } => match forward(pipeline, session, pos0, sampling, payload).await {
                Ok(token) => Frame::Token { session, token },
                Err(e) => Frame::Error(format!("{e:#}")),
            },
            Frame::End { session } => match end(pipeline, session).await {
                Ok(()) => Frame::Ready,
                Err(e) => Frame::Error(format!("{e:#}")),
            },
            other => Frame::Error(format!("unexpected frame {other:?}")),
        };
        conn.send(&reply).await?;
    }
    Ok(())
}

/// Run one request through this stage and the ones after it.
async fn forward(
    pipeline: &Pipeline,
    session: u64,
    pos0: u32,
    sampling: Sampling,
    payload: Payload,
) -> Result<i32> {
    let mut guard = pipeline.loaded.lock().await;
    let l = guard
        .as_mut()
        .ok_or_else(|| Error::Pipeline("this node has no route".into()))?;
    if l.slots.find(session).is_none() && pos0 != 0 {
        return Err(Error::Pipeline(format!(
            "session {session} is not running here (a new session starts at position 0)"
        )));
    }
    let (seq, fresh) = l.slots.take(session);
    let seq = seq as i32;
    let stage = l.stage.clone();
    let output = tokio::task::spawn_blocking(move || {
        let mut s = stage.lock().unwrap();
        if fresh {
            s.clear_sequence(seq); // whatever its previous session left
        }
        match &payload {
            Payload::Tokens(t) => s.forward_tokens_of(seq, t, pos0 as i32),
            Payload::Hidden { data, .. } => s.forward_hidden_of(seq, data, pos0 as i32),
        }
    })
    .await
    .map_err(|e| Error::Pipeline(format!("the stage's task failed: {e}")))??;
    match output {
        StageOutput::Logits(logits) => Ok(sample(&logits, sampling, pos0)),
        StageOutput::Hidden(data) => {
            let n_embd = l.stage.lock().unwrap().n_embd() as u32;
            let next = next_hop(l).await?;
            let request = Frame::Forward {
                session,
                pos0,
                sampling,
                payload: Payload::Hidden { n_embd, data },
            };
            match downstream(next, &request).await {
                Ok(Frame::Token { token, .. }) => Ok(token),
                Ok(Frame::Error(e)) => {
                    Err(Error::Pipeline(format!("stage {}: {e}", l.route.stage + 1)))
                }
                Ok(other) => Err(Error::Pipeline(format!(
                    "stage {} answered {other:?}",
                    l.route.stage + 1
                ))),
                Err(e) => {
                    l.next = None;
                    Err(e)
                }
            }
        }
    }
}

/// End a session here and downstream.
async fn end(pipeline: &Pipeline, session: u64) -> Result<()> {
    let mut guard = pipeline.loaded.lock().await;
    let Some(l) = guard.as_mut() else {
        return Ok(());
    };
    if let Some(seq) = l.slots.release(session) {
        l.stage.lock().unwrap().clear_sequence(seq as i32);
    }
    if l.route.next.is_some() {
        let next = next_hop(l).await?;
        if let Err(e) = downstream(next, &Frame::End { session }).await {
            l.next = None;
            return Err(e);
        }
    }
    Ok(())
}

/// The connection to the next stage, opened (and greeted) on first use.
async fn next_hop(l: &mut Loaded) -> Result<&mut Connection> {
    if l.next.is_none() {
        let addr = l
            .route
            .next
            .clone()
            .ok_or_else(|| Error::Pipeline("no next stage in the route".into()))?;
        let hello = Hello {
            model_sha256: l.route.model_sha256.clone(),
            split_id: l.route.split_id.clone(),
            stage: l.route.stage + 1,
        };
        let conn = Connection::open(&addr, hello)
            .await
            .map_err(|e| Error::Pipeline(format!("stage {}: {e}", l.route.stage + 1)))?;
        l.next = Some(conn);
    }
    Ok(l.next.as_mut().expect("just set"))
}

/// Pass a frame to the next stage and take its answer.
async fn downstream(next: &mut Connection, frame: &Frame) -> Result<Frame> {
    next.send(frame).await?;
    Ok(next.receive().await?)
}
