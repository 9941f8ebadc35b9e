//! Checking a served request (the rules: [`crate::verify::served`]): recall from each stage
//! of its route the signed steps it received, check each sender's signature, judge every hop
//! and every sampled token against the replay, and act: a sender whose rows differ, or a last
//! stage whose tokens its logits rule out, is evicted; a receiver that cannot show what it
//! received fails the check (two failures evict it).

use std::time::Duration;

use protocol::data::io::ChannelError;
use protocol::data::{seal, Frame, Payload};

use super::{ask, evict, on_referee_stage, Checker, RefereeError};
use crate::hub::Hub;
use crate::verify::judge::Output;
use crate::verify::served::{check_hop, check_tokens, sampled_tokens, HopFault, STRIKES};
use crate::verify::{Served, Trace};

/// How long a recall (connect, look up, answer) may take.
const RECALL_WAIT: Duration = Duration::from_secs(30);

/// Why a stage's received steps could not be had.
#[derive(Debug, thiserror::Error)]
pub(super) enum RecallError {
    #[error("it no longer runs its stage")]
    Gone,
    #[error("its predecessor signs no steps")]
    Unsigned,
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("it refused: {0}")]
    Refused(String),
    #[error("it answered {0} to a recall")]
    Unexpected(&'static str),
    #[error("no answer within {RECALL_WAIT:?}")]
    Timeout,
    #[error("it handed back a step its predecessor did not sign: {0}")]
    Forged(String),
}

/// The rows of the request's sequence a stage received, `(position, row)`, in order.
type Rows = Vec<(usize, Vec<f32>)>;

/// What each stage after the first received for the request (by stage).
pub(super) async fn recall(hub: &Hub, trace: &Trace) -> Vec<(usize, Result<Rows, RecallError>)> {
    let targets = hub.swarm.lock().unwrap().probe_targets();
    let mut out = Vec::new();
    for k in 1..trace.route.len() {
        let node = &trace.route[k].node_id;
        let target = targets
            .get(k)
            .and_then(|holders| holders.iter().find(|h| &h.node_id == node));
        let result = match (target, &trace.route[k - 1].signer) {
            (None, _) => Err(RecallError::Gone),
            (_, None) => Err(RecallError::Unsigned),
            (Some(target), Some(signer)) => recall_one(hub, k as u32, target, trace, signer).await,
        };
        out.push((k, result));
    }
    out
}

async fn recall_one(
    hub: &Hub,
    stage: u32,
    target: &crate::swarm::ProbeTarget,
    trace: &Trace,
    signer: &str,
) -> Result<Rows, RecallError> {
    let mut rows = Rows::new();
    let mut from = trace.first;
    // An answer holds at least one step (at most MAX_RECALLED_BYTES of them), so the range's
    // length bounds the asks.
    let most = (trace.last - trace.first).min(protocol::data::MAX_RECALLED as u64);
    for _ in 0..=most {
        let question = Frame::Recall {
            lane: trace.lane.clone(),
            seq: trace.seq,
            first: from,
            last: trace.last,
        };
        let run = async {
            match ask(hub, stage, target, &question).await? {
                Frame::Recalled(frames) => Ok(frames),
                Frame::Error(e) => Err(RecallError::Refused(e)),
                other => Err(RecallError::Unexpected(other.kind())),
            }
        };
        let frames = tokio::time::timeout(RECALL_WAIT, run)
            .await
            .map_err(|_| RecallError::Timeout)??;
        match rows_of(frames, signer, trace, stage, from, &mut rows)? {
            Some(step) if step < trace.last => from = step + 1,
            _ => break,
        }
    }
    Ok(rows)
}

/// Adds to `rows` the request's rows in the recalled steps (each checked against the sender's
/// signature, numbered `from..=trace.last` and rising); returns the last step's number.
fn rows_of(
    frames: Vec<Vec<u8>>,
    signer: &str,
    trace: &Trace,
    stage: u32,
    from: u64,
    rows: &mut Rows,
) -> Result<Option<u64>, RecallError> {
    let forged = |why: String| RecallError::Forged(why);
    let mut last_step = None;
    for bytes in frames {
        seal::verify(&bytes, signer, &trace.lane, stage).map_err(|e| forged(e.to_string()))?;
        let Frame::Signed { step, .. } =
            Frame::decode(&bytes).map_err(|e| forged(e.to_string()))?
        else {
            return Err(forged("not a signed step".into()));
        };
        let Frame::Step {
            step,
            groups,
            payload: Payload::Hidden { n_embd, data },
            ..
        } = *step
        else {
            return Err(forged("a step without hidden states".into()));
        };
        if !(from..=trace.last).contains(&step) || last_step.is_some_and(|l| step <= l) {
            return Err(forged(format!(
                "step {step} is not one of the request's asked for, in order"
            )));
        }
        last_step = Some(step);
        let width = n_embd as usize;
        let mut offset = 0;
        for g in &groups {
            if g.seq == trace.seq {
                for r in 0..g.rows as usize {
                    let at = (offset + r) * width;
                    rows.push((g.pos0 as usize + r, data[at..at + width].to_vec()));
                }
            }
            offset += g.rows as usize;
        }
    }
    Ok(last_step)
}

/// Judge the served traffic of `request` against the replay's settled outputs (`reference`,
/// one per stage), hop by hop from stage 0, then the tokens; stop at the first fault.
pub(super) async fn judge(
    checker: &mut Checker,
    hub: &Hub,
    request: &Served,
    trace: &Trace,
    recalled: Vec<(usize, Result<Rows, RecallError>)>,
    reference: &[Output],
) {
    let tolerance = checker.checks.tolerance;
    let (from, to) = (request.from_pos, request.tokens.len());
    for (k, result) in recalled {
        let (sender, receiver) = (&trace.route[k - 1].node_id, &trace.route[k].node_id);
        let rows = match result {
            Ok(rows) => rows,
            // Nobody to judge from here on.
            Err(RecallError::Gone | RecallError::Unsigned) => return,
            Err(e @ RecallError::Forged(_)) => {
                return evict(hub, receiver, k as u32, format!("on a check: {e}"));
            }
            Err(e) => return checker.strike(hub, receiver, k as u32, e.to_string()),
        };
        match check_hop(&rows, &reference[k - 1], from, to, tolerance) {
            Ok(error) => {
                checker.checks.stats.lock().unwrap().honest(error);
                checker.strikes.passed(receiver);
            }
            Err(HopFault::Missing(pos)) => {
                let why = format!("it could not show the row of position {pos} it received");
                return checker.strike(hub, receiver, k as u32, why);
            }
            Err(HopFault::Differs(error)) => {
                let why = format!(
                    "on a served request, the hidden states it sent to stage {k} differ from its \
                     stage's output on the same input (relative error {error:.4}, tolerance \
                     {tolerance})"
                );
                return evict(hub, sender, k as u32 - 1, why);
            }
        }
    }
    let last = trace.route.len() - 1;
    let input = match last.checked_sub(1) {
        None => Payload::Tokens(request.tokens.clone()),
        Some(before) => Payload::Hidden {
            n_embd: reference[before].width,
            data: reference[before].data.clone(),
        },
    };
    let sampled = sampled_tokens(
        &request.tokens,
        request.last_token,
        request.prompt_len,
        request.from_pos,
    );
    let logits = match logits_at(hub, last as u32, input, &sampled, checker).await {
        Ok(logits) => logits,
        Err(e) => {
            return tracing::warn!("computing the last stage to check a request's tokens: {e}")
        }
    };
    if let Err(bad) = check_tokens(&sampled, &logits, request.sampling) {
        let why = format!(
            "on a served request it answered token {} after position {}, which its stage's \
             logits on its input rule out ({:.2} below the best)",
            bad.token, bad.pos, bad.gap
        );
        return evict(hub, &trace.route[last].node_id, last as u32, why);
    }
    checker.checks.stats.lock().unwrap().shown.served_checked += 1;
}

/// The last stage's logits, computed here from the seeder's file, at each position a token
/// was sampled after.
async fn logits_at(
    hub: &Hub,
    shard: u32,
    input: Payload,
    sampled: &[(usize, i32)],
    checker: &Checker,
) -> Result<Vec<(usize, Vec<f32>)>, RefereeError> {
    let positions: Vec<usize> = sampled.iter().map(|(p, _)| *p).collect();
    let rows = input.rows();
    let want: Vec<bool> = (0..rows).map(|p| positions.contains(&p)).collect();
    let cache = checker.checks.cache_dir.clone();
    on_referee_stage(hub, shard, &cache, move |stage| {
        let rows: Vec<llm::stage::Row> = (0..rows as i32)
            .map(|pos| llm::stage::Row { seq: 0, pos })
            .collect();
        let logits = match &input {
            Payload::Tokens(t) => stage.logits_at(Some(t), &[], &rows, &want),
            Payload::Hidden { data, .. } => stage.logits_at(None, data, &rows, &want),
        }?;
        Ok(positions.into_iter().zip(logits).collect())
    })
    .await
}

impl Checker {
    /// `node` failed a check of a served request (it could not show what it received):
    /// counted, and evicted at [`STRIKES`] among its latest checks.
    fn strike(&mut self, hub: &Hub, node: &str, shard: u32, why: String) {
        self.checks.stats.lock().unwrap().shown.recall_failures += 1;
        let strikes = self.strikes.failed(node);
        tracing::warn!(
            "node {node} failed a check of a served request ({strikes} of {STRIKES}): {why}"
        );
        if strikes >= STRIKES {
            self.strikes.forget(node);
            let reason = format!("it failed {strikes} checks of served requests (the last: {why})");
            evict(hub, node, shard, reason);
        }
    }
}
