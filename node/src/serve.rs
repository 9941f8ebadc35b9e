//! Serving a pipeline stage on the data channel.
//!
//! The coordinator's `ROUTE` says which stage this node runs and where the next stage is. A
//! request (`Forward`) runs the stage's layers; a non-final stage sends its hidden states to the
//! next stage and answers its caller with the token that comes back; the last stage samples
//! the token. One request runs at a time on a node (the coordinator queues requests), and the
//! stage's KV cache belongs to the current session: a new session starts at position 0.
//!
//! Tasks: one per data connection. State: [`Pipeline`] behind a tokio mutex, held for a whole
//! request (it is the node's single llama.cpp context); the route behind a std mutex.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use protocol::data::io::{read_frame, write_frame};
use protocol::data::{Frame, Hello, Payload, Sampling};
use protocol::RouteParams;
use tokio::net::{TcpListener, TcpStream};

use crate::stage::{argmax, Stage, StageOutput};

use protocol::data::MAX_CONTEXT;

/// The loaded stage and what it is doing.
struct Loaded {
    route: RouteParams,
    stage: Arc<Mutex<Stage>>,
    session: Option<u64>,
    next: Option<TcpStream>,
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
    pub async fn set_route(&self, route: RouteParams) -> anyhow::Result<()> {
        let mut loaded = self.loaded.lock().await;
        if let Some(l) = loaded.as_mut() {
            if l.route.stage == route.stage
                && l.route.stage_count == route.stage_count
                && l.route.split_id == route.split_id
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
        let stage =
            tokio::task::spawn_blocking(move || Stage::load(&path, is_last, MAX_CONTEXT, threads))
                .await??;
        tracing::info!(
            "stage {} of {} loaded in llama.cpp{}",
            route.stage,
            route.stage_count,
            if is_last { " (last)" } else { "" }
        );
        *loaded = Some(Loaded {
            route,
            stage: Arc::new(Mutex::new(stage)),
            session: None,
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
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, peer, pipeline.clone()));
    }
}

async fn connection(mut stream: TcpStream, peer: SocketAddr, pipeline: Arc<Pipeline>) {
    if let Err(e) = handle(&mut stream, &pipeline).await {
        tracing::debug!("data connection from {peer}: {e:#}");
        let _ = write_frame(&mut stream, &Frame::Error(format!("{e:#}"))).await;
    }
}

async fn handle(stream: &mut TcpStream, pipeline: &Pipeline) -> anyhow::Result<()> {
    let Some(Frame::Hello(hello)) = read_frame(stream).await? else {
        anyhow::bail!("a data connection starts with Hello");
    };
    {
        let loaded = pipeline.loaded.lock().await;
        let Some(l) = loaded.as_ref() else {
            anyhow::bail!("this node has no route yet")
        };
        if (
            hello.model_sha256.as_str(),
            hello.split_id.as_str(),
            hello.stage,
        ) != (
            l.route.model_sha256.as_str(),
            l.route.split_id.as_str(),
            l.route.stage,
        ) {
            anyhow::bail!(
                "refused: this node runs stage {} of split {}, not stage {} of split {}",
                l.route.stage,
                l.route.split_id,
                hello.stage,
                hello.split_id
            );
        }
    }
    write_frame(stream, &Frame::Ready).await?;
    while let Some(frame) = read_frame(stream).await? {
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
        write_frame(stream, &reply).await?;
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
) -> anyhow::Result<i32> {
    let mut guard = pipeline.loaded.lock().await;
    let l = guard
        .as_mut()
        .ok_or_else(|| anyhow::anyhow!("this node has no route"))?;
    if l.session != Some(session) {
        if pos0 != 0 {
            anyhow::bail!(
                "session {session} is not running here (a new session starts at position 0)"
            );
        }
        l.stage.lock().unwrap().clear();
        l.session = Some(session);
    }
    let stage = l.stage.clone();
    let output = tokio::task::spawn_blocking(move || {
        let mut s = stage.lock().unwrap();
        match &payload {
            Payload::Tokens(t) => s.forward_tokens(t, pos0 as i32),
            Payload::Hidden { data, .. } => s.forward_hidden(data, pos0 as i32),
        }
    })
    .await??;
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
            match exchange(next, &request).await {
                Ok(Frame::Token { token, .. }) => Ok(token),
                Ok(Frame::Error(e)) => anyhow::bail!("stage {}: {e}", l.route.stage + 1),
                Ok(other) => anyhow::bail!("stage {} answered {other:?}", l.route.stage + 1),
                Err(e) => {
                    l.next = None;
                    Err(e)
                }
            }
        }
    }
}

/// End a session here and downstream.
async fn end(pipeline: &Pipeline, session: u64) -> anyhow::Result<()> {
    let mut guard = pipeline.loaded.lock().await;
    let Some(l) = guard.as_mut() else {
        return Ok(());
    };
    if l.session == Some(session) {
        l.stage.lock().unwrap().clear();
        l.session = None;
    }
    if l.route.next.is_some() {
        let next = next_hop(l).await?;
        if let Err(e) = exchange(next, &Frame::End { session }).await {
            l.next = None;
            return Err(e);
        }
    }
    Ok(())
}

/// The connection to the next stage, opened (and greeted) on first use.
async fn next_hop(l: &mut Loaded) -> anyhow::Result<&mut TcpStream> {
    if l.next.is_none() {
        let addr = l
            .route
            .next
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no next stage in the route"))?;
        let mut s = TcpStream::connect(&addr).await.map_err(|e| {
            anyhow::anyhow!("connecting to stage {} at {addr}: {e}", l.route.stage + 1)
        })?;
        let _ = s.set_nodelay(true);
        let hello = Hello {
            model_sha256: l.route.model_sha256.clone(),
            split_id: l.route.split_id.clone(),
            stage: l.route.stage + 1,
        };
        match exchange(&mut s, &Frame::Hello(hello)).await? {
            Frame::Ready => {}
            other => anyhow::bail!("stage {} at {addr} refused: {other:?}", l.route.stage + 1),
        }
        l.next = Some(s);
    }
    Ok(l.next.as_mut().expect("just set"))
}

/// Send a frame and read the answer.
pub async fn exchange(stream: &mut TcpStream, frame: &Frame) -> anyhow::Result<Frame> {
    write_frame(stream, frame).await?;
    read_frame(stream)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the connection closed"))
}

/// Pick the next token: greedy at temperature 0, else temperature and nucleus (top-p) sampling
/// with a generator seeded by the request's seed and the position, so a seed repeats.
pub fn sample(logits: &[f32], s: Sampling, pos: u32) -> i32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i, (((l - max) / s.temperature) as f64).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let top_p = if s.top_p > 0.0 && s.top_p < 1.0 {
        f64::from(s.top_p)
    } else {
        1.0
    };
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut x = splitmix64(s.seed ^ (u64::from(pos) << 32)) as f64 / u64::MAX as f64 * mass;
    for (i, p) in &probs {
        x -= p;
        if x <= 0.0 {
            return *i as i32;
        }
    }
    probs.last().map_or(0, |p| p.0 as i32)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_greedy_at_zero_and_repeatable_with_a_seed() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let greedy = Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
        };
        assert_eq!(sample(&logits, greedy, 0), 1);
        let hot = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 42,
        };
        let picks: Vec<i32> = (0..50).map(|p| sample(&logits, hot, p)).collect();
        assert_eq!(
            picks,
            (0..50).map(|p| sample(&logits, hot, p)).collect::<Vec<_>>()
        );
        assert!(picks.contains(&1) && picks.contains(&2));
        let narrow = Sampling {
            temperature: 1.0,
            top_p: 0.1,
            seed: 42,
        };
        assert!(
            (0..50).all(|p| sample(&logits, narrow, p) == 1),
            "top_p 0.1 keeps only the best token"
        );
    }
}
