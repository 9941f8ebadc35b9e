//! The checker's task (see [`crate::verify`] for the method): replays the sampled requests
//! through every holder of every stage on probe lanes, asks the coordinator's own computation
//! when holders disagree, checks what the route actually served against the replay
//! ([`served`]), and acts on the verdicts (evicting through the hub).

use std::sync::Arc;
use std::time::Duration;

use protocol::data::io::{ChannelError, TlsTo};
use protocol::data::{Frame, Group, Hello, Payload, Sampling};

use crate::hub::Hub;
use crate::swarm::ProbeTarget;
use crate::verify::judge::{judge, Output, Verdict, Who};
use crate::verify::{Checks, Served};

mod served;

/// How long one probe (connect, compute, answer) may take.
const PROBE_WAIT: Duration = Duration::from_secs(120);

/// Why a holder's output could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("it reported: {0}")]
    Reported(String),
    #[error("it answered {0} to a probe")]
    Unexpected(&'static str),
    #[error("no answer within {PROBE_WAIT:?}")]
    Timeout,
}

/// Why the coordinator could not compute a stage itself.
#[derive(Debug, thiserror::Error)]
pub enum RefereeError {
    #[error(transparent)]
    Fetch(#[from] crate::Error),
    #[error(transparent)]
    Llm(#[from] llm::LlmError),
    #[error("the computation stopped: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The checker: the sampled requests, what it needs to check them, and how many recalls each
/// node failed.
struct Checker {
    checks: Checks,
    strikes: crate::verify::served::Strikes,
}

/// Check the requests the sampler hands over, until the engine stops.
pub fn spawn(checks: Checks, hub: Arc<Hub>) {
    let mut checker = Checker {
        checks,
        strikes: Default::default(),
    };
    tokio::spawn(async move {
        while let Some(request) = checker.checks.incoming.recv().await {
            checker.check(&hub, &request).await;
        }
    });
}

impl Checker {
    /// Check a served request: recall what its route's stages received (first: they keep
    /// it only a while), replay it through every holder of every stage, then judge the
    /// served traffic against the replay.
    async fn check(&mut self, hub: &Hub, request: &Served) {
        let recalled = match &request.trace {
            Some(trace) => served::recall(hub, trace).await,
            None => Vec::new(),
        };
        let Some(reference) = self.replay(hub, &request.tokens).await else {
            return;
        };
        self.checks.stats.lock().unwrap().shown.requests_checked += 1;
        if let Some(trace) = &request.trace {
            served::judge(self, hub, request, trace, recalled, &reference).await;
        }
    }

    /// Replay `tokens` through every holder of every stage, act on what differs, and give
    /// each stage's settled output (none when a stage has no holder or nothing was settled).
    async fn replay(&self, hub: &Hub, tokens: &[i32]) -> Option<Vec<Output>> {
        let stats = &self.checks.stats;
        let targets = hub.swarm.lock().unwrap().probe_targets();
        if targets.iter().any(Vec::is_empty) {
            stats.lock().unwrap().shown.skipped += 1;
            return None;
        }
        let last = targets.len() - 1;
        let mut input = Payload::Tokens(tokens.to_vec());
        let mut outputs = Vec::new();
        for (k, holders) in targets.iter().enumerate() {
            let mut opinions = Vec::new();
            for h in holders {
                match probe(hub, k as u32, h, &input).await {
                    Ok(out) => opinions.push((who(h), out)),
                    Err(e) => {
                        tracing::warn!("probe of {} (stage {k}): {e}", h.node_id);
                        stats.lock().unwrap().shown.probe_failures += 1;
                    }
                }
            }
            let tolerance = self.checks.tolerance;
            let mut verdict = judge(&opinions, k == last, tolerance);
            if verdict.needs_referee {
                // Holders disagree: the coordinator computes the stage itself.
                match referee(hub, k as u32, &input, &self.checks.cache_dir).await {
                    Ok(truth) => {
                        opinions.push((Who::Referee, truth));
                        verdict = judge(&opinions, k == last, tolerance);
                    }
                    Err(e) => tracing::warn!("computing stage {k} to settle a dispute: {e}"),
                }
            }
            self.act(hub, k as u32, &opinions, &verdict);
            let agreed = verdict.go_on_with?;
            if opinions.len() >= 2 {
                stats.lock().unwrap().shown.stage_comparisons += 1;
            }
            let output = opinions.swap_remove(agreed).1;
            input = Payload::Hidden {
                n_embd: output.width,
                data: output.data.clone(),
            };
            outputs.push(output);
        }
        Some(outputs)
    }

    /// Evict the holders the verdict names and record what it could not settle.
    fn act(&self, hub: &Hub, shard: u32, opinions: &[(Who, Output)], verdict: &Verdict) {
        let name = |i: usize| match opinions[i].0 {
            Who::Holder { node_id, .. } => node_id.to_owned(),
            Who::Referee => "the coordinator".to_owned(),
        };
        {
            let mut stats = self.checks.stats.lock().unwrap();
            for e in &verdict.honest {
                stats.honest(*e);
            }
            if let Some(([a, b], error)) = verdict.dispute {
                tracing::error!(
                    "shard {shard}: {} and {} disagree (relative error {error:.4}), and no \
                     computation here tells which is wrong",
                    name(a),
                    name(b)
                );
                stats.dispute(shard, vec![name(a), name(b)], error);
            }
        }
        for (i, reason) in &verdict.evict {
            evict(hub, &name(*i), shard, reason.clone());
        }
    }
}

/// Evict `node` (caught on `shard`) for `reason`: dropped, refused from then on, named in
/// `/status`.
fn evict(hub: &Hub, node: &str, shard: u32, reason: String) {
    let out = hub.swarm.lock().unwrap().evict(node, shard, reason);
    hub.disconnect(node);
    hub.dispatch(out);
}

fn who(target: &ProbeTarget) -> Who<'_> {
    Who::Holder {
        node_id: &target.node_id,
        on_route: target.on_route,
    }
}

/// Stage `shard` computed here on `input`, from the seeder's file (fetched once, checked by
/// sha256): what an honest holder gives.
async fn referee(
    hub: &Hub,
    shard: u32,
    input: &Payload,
    cache_dir: &std::path::Path,
) -> Result<Output, RefereeError> {
    let input = input.clone();
    on_referee_stage(hub, shard, cache_dir, move |stage| {
        let rows: Vec<llm::stage::Row> = (0..input.rows() as i32)
            .map(|pos| llm::stage::Row { seq: 0, pos })
            .collect();
        let output = match &input {
            Payload::Tokens(t) => stage.forward_token_rows(t, &rows),
            Payload::Hidden { data, .. } => stage.forward_hidden_rows(data, &rows),
        }?;
        Ok(match output {
            llm::stage::RowsOutput::Hidden(data) => Output {
                width: (data.len() / rows.len().max(1)) as u32,
                data,
            },
            llm::stage::RowsOutput::Logits(mut rows) => {
                let data = rows.pop().map(|(_, l)| l).unwrap_or_default();
                Output {
                    width: data.len() as u32,
                    data,
                }
            }
        })
    })
    .await
}

/// Load stage `shard` here from the seeder's file (fetched once into `cache_dir`, checked by
/// sha256) and run `f` on it, off the async threads.
async fn on_referee_stage<T: Send + 'static>(
    hub: &Hub,
    shard: u32,
    cache_dir: &std::path::Path,
    f: impl FnOnce(&mut llm::stage::Stage) -> Result<T, llm::LlmError> + Send + 'static,
) -> Result<T, RefereeError> {
    let (spec, count) = {
        let s = hub.swarm.lock().unwrap();
        (s.shards[shard as usize].clone(), s.shards.len() as u32)
    };
    let path = crate::text::fetch_file(&(&spec).into(), cache_dir).await?;
    let computed = tokio::task::spawn_blocking(move || -> Result<T, llm::LlmError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
        let is_last = shard + 1 == count;
        let mut stage =
            llm::stage::Stage::load_for(&path, is_last, protocol::data::MAX_CONTEXT, threads, 1)?;
        f(&mut stage)
    })
    .await??;
    Ok(computed)
}

/// Send `question` to `target`'s stage `stage` on a probe lane (proved with its probe key, over
/// TLS to that node in a TLS swarm) and give its answer: a probe, or a recall.
async fn ask(
    hub: &Hub,
    stage: u32,
    target: &ProbeTarget,
    question: &Frame,
) -> Result<Frame, ChannelError> {
    let (model, split) = {
        let s = hub.swarm.lock().unwrap();
        (s.settings.model_sha256.clone(), s.settings.split_id.clone())
    };
    let hello = Hello::probe(&model, &split, stage);
    let tls = hub.data_tls().map(|config| TlsTo {
        config,
        node_id: &target.node_id,
    });
    let callee = mesh::Callee::pick(
        hub.mesh.as_ref(),
        target.mesh.as_ref(),
        &target.data_addr,
        tls,
    );
    let (mut conn, _) = mesh::open(callee, hello, &target.probe_key).await?;
    conn.send(question).await?;
    conn.receive().await
}

/// Run `input` through `holder`'s stage on a probe lane: its output.
async fn probe(
    hub: &Hub,
    stage: u32,
    holder: &ProbeTarget,
    input: &Payload,
) -> Result<Output, ProbeError> {
    // The sequence stages keep for probes.
    let seq = hub.swarm.lock().unwrap().settings.parallel;
    let run = async {
        let rows = input.rows() as u32;
        let question = Frame::Step {
            step: 1,
            in_flight: 1,
            busy_us: Vec::new(),
            groups: vec![Group {
                seq,
                pos0: 0,
                rows,
                sample: true,
                sampling: Sampling {
                    temperature: 0.0,
                    top_p: 1.0,
                    seed: 0,
                },
            }],
            payload: input.clone(),
        };
        match ask(hub, stage, holder, &question).await? {
            Frame::Output { width, data, .. } => Ok(Output { width, data }),
            Frame::Error(e) => Err(ProbeError::Reported(e)),
            other => Err(ProbeError::Unexpected(other.kind())),
        }
    };
    tokio::time::timeout(PROBE_WAIT, run)
        .await
        .map_err(|_| ProbeError::Timeout)?
}
