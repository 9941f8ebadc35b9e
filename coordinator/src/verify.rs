//! Catching nodes that compute wrong outputs (broken, or lying).
//!
//! A sampled fraction of finished requests (`--verify-fraction`) is replayed, whole, through
//! every holder of each shard that runs its stage: the route's node and the replicas. Stage by
//! stage, each holder gets the same input (the route's output of the stage before) on a probe
//! lane and answers with its output; the outputs are compared by relative L2 error, and on
//! the last stage also by their greedy token. Honest holders differ only by floating-point
//! rounding (different CPUs and SIMD paths add up in different orders); the tolerance
//! (`--verify-tolerance`) sits far above that and far below any real error. With three or
//! more holders, one that agrees with none of the others while they agree with each other is
//! evicted: dropped, refused from then on, and listed in `/status`. With two that disagree,
//! the coordinator computes the stage itself, from the seeder's file (checked by sha256), and
//! evicts the holder that differs from it; should it differ from both, the disagreement is
//! reported (`/status` `verify.disputes`, the log).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::data::io::Connection;
use protocol::data::{Frame, Group, Hello, Payload, Sampling};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::hub::Hub;
use crate::swarm::ProbeTarget;

/// How long one probe (connect, compute, answer) may take.
const PROBE_WAIT: Duration = Duration::from_secs(120);

/// Requests waiting to be checked; more are not checked (counted as skipped).
const QUEUE: usize = 4;

/// The honest errors kept for `/status` (the most recent).
const KEPT_ERRORS: usize = 1000;

/// Picks the requests to check: every 1/fraction-th one, counted, so that a fraction of 1
/// checks each request and 0.01 every hundredth.
pub struct Sampler {
    fraction: f64,
    credit: f64,
    jobs: mpsc::Sender<Vec<i32>>,
    stats: Arc<Mutex<VerifyStats>>,
}

impl Sampler {
    /// Offer a finished request's tokens (prompt and completion, as the stages computed them).
    pub fn offer(&mut self, tokens: &[i32]) {
        self.credit += self.fraction;
        if self.credit < 1.0 || tokens.is_empty() {
            return;
        }
        self.credit -= 1.0;
        if self.jobs.try_send(tokens.to_vec()).is_err() {
            self.stats.lock().unwrap().skipped += 1;
        }
    }
}

/// What the checks found, for `/status`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct VerifyStats {
    pub fraction: f64,
    pub tolerance: f32,
    pub requests_checked: u64,
    /// Stages compared across two or more holders.
    pub stage_comparisons: u64,
    /// Requests not checked: the checker was busy, or no shard had two holders.
    pub skipped: u64,
    /// Relative errors between holders that agreed: the honest distribution.
    pub honest_error_p50: f32,
    pub honest_error_p99: f32,
    pub honest_error_max: f32,
    #[serde(skip)]
    honest: Vec<f32>,
    /// Two holders that disagreed, with nobody to tell which is right.
    pub disputes: Vec<Dispute>,
    /// Probes that failed (a holder down or refusing), with the reason.
    pub probe_failures: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dispute {
    pub shard_id: u32,
    pub nodes: Vec<String>,
    pub error: f32,
}

impl VerifyStats {
    fn honest(&mut self, e: f32) {
        if self.honest.len() == KEPT_ERRORS {
            self.honest.remove(0);
        }
        self.honest.push(e);
        let mut sorted = self.honest.clone();
        sorted.sort_by(f32::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        self.honest_error_p50 = at(0.5);
        self.honest_error_p99 = at(0.99);
        self.honest_error_max = self.honest_error_max.max(e);
    }
}

/// The checker's task, waiting for its hub (which owns the engine that owns the sampler).
pub struct Checker {
    incoming: mpsc::Receiver<Vec<i32>>,
    tolerance: f32,
    stats: Arc<Mutex<VerifyStats>>,
    /// Where the shards the coordinator computes itself are kept.
    cache_dir: std::path::PathBuf,
}

impl Checker {
    /// Check the requests the sampler hands over, until the engine stops.
    pub fn spawn(mut self, hub: Arc<Hub>) {
        tokio::spawn(async move {
            while let Some(tokens) = self.incoming.recv().await {
                check(&hub, &tokens, &self).await;
            }
        });
    }
}

/// The sampler the engine offers finished requests to and the checker that replays them
/// (neither when the fraction is 0), and their statistics.
pub fn new(
    fraction: f64,
    tolerance: f32,
    cache_dir: std::path::PathBuf,
) -> (Option<(Sampler, Checker)>, Arc<Mutex<VerifyStats>>) {
    let stats = Arc::new(Mutex::new(VerifyStats {
        fraction,
        tolerance,
        ..VerifyStats::default()
    }));
    if fraction <= 0.0 {
        return (None, stats);
    }
    let (jobs, incoming) = mpsc::channel::<Vec<i32>>(QUEUE);
    let sampler = Sampler {
        fraction,
        credit: 0.0,
        jobs,
        stats: stats.clone(),
    };
    let checker = Checker {
        incoming,
        tolerance,
        stats: stats.clone(),
        cache_dir,
    };
    (Some((sampler, checker)), stats)
}

/// Replay `tokens` through every holder of every stage and act on what differs.
async fn check(hub: &Hub, tokens: &[i32], checker: &Checker) {
    let (tolerance, stats) = (checker.tolerance, &checker.stats);
    let targets = hub.swarm.lock().unwrap().probe_targets();
    if targets.iter().all(|h| h.len() < 2) || targets.iter().any(Vec::is_empty) {
        stats.lock().unwrap().skipped += 1;
        return;
    }
    let last = targets.len() - 1;
    let mut input = Payload::Tokens(tokens.to_vec());
    for (k, holders) in targets.iter().enumerate() {
        let mut outputs = Vec::new();
        for h in holders {
            match probe(hub, k as u32, h, &input).await {
                Ok(out) => outputs.push((h, out)),
                Err(e) => {
                    tracing::warn!("probe of {} (stage {k}): {e}", h.node_id);
                    stats.lock().unwrap().probe_failures += 1;
                }
            }
        }
        if outputs.len() == 2 && !agree(&outputs[0].1, &outputs[1].1, k == last, tolerance).0 {
            // Two that disagree: the coordinator computes the stage itself.
            match referee(hub, k as u32, &input, &checker.cache_dir).await {
                Ok(truth) => outputs.push((&REFEREE, truth)),
                Err(e) => tracing::warn!("computing stage {k} to settle a dispute: {e}"),
            }
        }
        let Some(agreed) = judge(hub, k as u32, &outputs, k == last, tolerance, stats) else {
            return; // nothing to go on with
        };
        if outputs.len() >= 2 {
            stats.lock().unwrap().stage_comparisons += 1;
        }
        let (width, data) = outputs.swap_remove(agreed).1;
        input = Payload::Hidden {
            n_embd: width,
            data,
        };
    }
    stats.lock().unwrap().requests_checked += 1;
}

/// The coordinator's own computation of a stage, as a third opinion: never evicted, never
/// probed over the network.
static REFEREE: ProbeTarget = ProbeTarget {
    node_id: String::new(),
    data_addr: String::new(),
    probe_key: String::new(),
    on_route: false,
};

/// Whether two outputs agree, and their relative error.
fn agree(a: &(u32, Vec<f32>), b: &(u32, Vec<f32>), last: bool, tolerance: f32) -> (bool, f32) {
    let error = relative_error(&a.1, &b.1);
    let same_token = !last || greedy(a) == greedy(b);
    (a.0 == b.0 && error <= tolerance && same_token, error)
}

/// Stage `shard` computed here on `input`, from the seeder's file (fetched once, checked by
/// sha256): what an honest holder gives.
async fn referee(
    hub: &Hub,
    shard: u32,
    input: &Payload,
    cache_dir: &std::path::Path,
) -> Result<(u32, Vec<f32>), String> {
    let (spec, count) = {
        let s = hub.swarm.lock().unwrap();
        (s.shards[shard as usize].clone(), s.shards.len() as u32)
    };
    let path = crate::infer::fetch_shard(&spec, cache_dir)
        .await
        .map_err(|e| e.to_string())?;
    let input = input.clone();
    tokio::task::spawn_blocking(move || {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
        let is_last = shard + 1 == count;
        let mut stage =
            llm::stage::Stage::load_for(&path, is_last, protocol::data::MAX_CONTEXT, threads, 1)
                .map_err(|e| e.to_string())?;
        let rows: Vec<llm::stage::Row> = (0..input.rows() as i32)
            .map(|pos| llm::stage::Row { seq: 0, pos })
            .collect();
        let output = match &input {
            Payload::Tokens(t) => stage.forward_token_rows(t, &rows),
            Payload::Hidden { data, .. } => stage.forward_hidden_rows(data, &rows),
        }
        .map_err(|e| e.to_string())?;
        Ok(match output {
            llm::stage::RowsOutput::Hidden(data) => {
                let width = (data.len() / rows.len().max(1)) as u32;
                (width, data)
            }
            llm::stage::RowsOutput::Logits(mut rows) => {
                let logits = rows.pop().map(|(_, l)| l).unwrap_or_default();
                (logits.len() as u32, logits)
            }
        })
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Compare the holders' outputs for stage `shard`; evict a holder that agrees with none of the
/// others while they agree, record a dispute between two. Returns the index of an output the
/// check goes on with (the route's holder's when it is among those that agree).
fn judge(
    hub: &Hub,
    shard: u32,
    outputs: &[(&ProbeTarget, (u32, Vec<f32>))],
    last: bool,
    tolerance: f32,
    stats: &Mutex<VerifyStats>,
) -> Option<usize> {
    let n = outputs.len();
    if n == 0 {
        return None;
    }
    let mut agrees = vec![vec![false; n]; n];
    let mut worst = vec![0f32; n];
    for i in 0..n {
        for j in i + 1..n {
            let (ok, error) = agree(&outputs[i].1, &outputs[j].1, last, tolerance);
            agrees[i][j] = ok;
            agrees[j][i] = ok;
            if ok {
                stats.lock().unwrap().honest(error);
            }
            worst[i] = worst[i].max(error);
            worst[j] = worst[j].max(error);
        }
    }
    let friends = |i: usize| (0..n).filter(|&j| agrees[i][j]).count();
    let is_referee = |i: usize| std::ptr::eq(outputs[i].0, &REFEREE);
    if n == 2 && !agrees[0][1] {
        let error = relative_error(&outputs[0].1 .1, &outputs[1].1 .1);
        tracing::error!(
            "shard {shard}: {} and {} disagree (relative error {error:.4}), and the stage could \
             not be computed here to tell which is wrong",
            outputs[0].0.node_id,
            outputs[1].0.node_id
        );
        dispute(stats, shard, outputs, error);
        return Some(0);
    }
    if n >= 3 {
        let referee_at = (0..n).find(|&i| is_referee(i));
        for i in (0..n).filter(|&i| !is_referee(i)) {
            // Wrong: it agrees with nobody while two others agree, or (two holders and the
            // coordinator's own computation) it disagrees with that computation, which the
            // other holder matches.
            let others_agree = (0..n)
                .filter(|&j| j != i)
                .any(|j| (0..n).any(|l| l != i && l != j && agrees[j][l]));
            if friends(i) == 0 && others_agree {
                let reason = match referee_at {
                    Some(_) => format!(
                        "its output differs from the stage computed by the coordinator from the seeder's file, which the other holder matches (relative error {:.4}, tolerance {tolerance})",
                        worst[i]
                    ),
                    None => format!(
                        "its output differs from every other holder's (relative error at least {:.4}, tolerance {tolerance})",
                        worst[i]
                    ),
                };
                let node = &outputs[i].0.node_id;
                let out = hub.swarm.lock().unwrap().evict(node, shard, reason);
                hub.disconnect(node);
                hub.dispatch(out);
            }
        }
        if referee_at.is_some_and(|r| friends(r) == 0) {
            // The coordinator's own computation matches neither holder.
            let error = relative_error(&outputs[0].1 .1, &outputs[1].1 .1);
            dispute(stats, shard, &outputs[..2], error);
        }
    }
    // Go on with the route's holder if others agree with it, else with the best-agreed one.
    (0..n).max_by_key(|&i| (friends(i), outputs[i].0.on_route))
}

/// Record two holders that disagree with nobody to tell which is right.
fn dispute(
    stats: &Mutex<VerifyStats>,
    shard: u32,
    outputs: &[(&ProbeTarget, (u32, Vec<f32>))],
    error: f32,
) {
    let mut s = stats.lock().unwrap();
    if s.disputes.len() < 100 {
        s.disputes.push(Dispute {
            shard_id: shard,
            nodes: outputs.iter().map(|o| o.0.node_id.clone()).collect(),
            error,
        });
    }
}

/// The greedy token of each logits row.
fn greedy((width, data): &(u32, Vec<f32>)) -> Vec<i32> {
    data.chunks(*width as usize)
        .map(llm::stage::argmax)
        .collect()
}

/// ‖a − b‖ / max(‖a‖, ‖b‖): 0 for equal outputs, about the scale of a relative error else;
/// 1 for outputs of different sizes.
pub fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 1.0;
    }
    let (mut diff, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        diff += (x - y) * (x - y);
        na += x * x;
        nb += y * y;
    }
    if !(diff.is_finite() && na.is_finite() && nb.is_finite()) {
        return f32::INFINITY;
    }
    (diff.sqrt() / na.max(nb).sqrt().max(1e-12)) as f32
}

/// Run `input` through `holder`'s stage on a probe lane: its output (width, floats).
async fn probe(
    hub: &Hub,
    stage: u32,
    holder: &ProbeTarget,
    input: &Payload,
) -> Result<(u32, Vec<f32>), String> {
    let (model, split, parallel) = {
        let s = hub.swarm.lock().unwrap();
        (
            s.settings.model_sha256.clone(),
            s.settings.split_id.clone(),
            s.settings.parallel,
        )
    };
    let tls = hub.data_tls();
    let run = async {
        let hello = Hello::probe(&model, &split, stage);
        let mut conn = Connection::open(&holder.data_addr, hello, &holder.probe_key, tls)
            .await
            .map_err(|e| e.to_string())?;
        let rows = input.rows() as u32;
        conn.send(&Frame::Step {
            step: 1,
            in_flight: 1,
            busy_us: Vec::new(),
            groups: vec![Group {
                seq: parallel, // the sequence stages keep for probes
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
        })
        .await
        .map_err(|e| e.to_string())?;
        match conn.receive().await.map_err(|e| e.to_string())? {
            Frame::Output { width, data, .. } => Ok((width, data)),
            Frame::Error(e) => Err(e),
            other => Err(format!("answered {} to a probe", other.kind())),
        }
    };
    tokio::time::timeout(PROBE_WAIT, run)
        .await
        .map_err(|_| format!("no answer within {PROBE_WAIT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_scale_free_and_strict_about_shapes() {
        assert_eq!(relative_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        let e = relative_error(&[100.0, 0.0], &[101.0, 0.0]);
        assert!((e - 1.0 / 101.0).abs() < 1e-6, "{e}");
        assert_eq!(relative_error(&[1.0], &[1.0, 2.0]), 1.0);
        assert!(relative_error(&[f32::NAN], &[1.0]).is_infinite());
        assert_eq!(relative_error(&[0.0], &[0.0]), 0.0);
    }
}
