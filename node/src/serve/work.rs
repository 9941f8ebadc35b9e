//! The work of a stage: the one decode thread (llama.cpp's), and the worker that runs every
//! lane's steps on it in arrival order and sends each result on (the next stage, the
//! coordinator's answer lane, or a probe's caller).

use std::sync::Arc;
use std::time::Instant;

use llm::sample::sample;
use llm::stage::RowsOutput;
use protocol::data::{Frame, Group, Payload};
use tokio::sync::mpsc;

use super::lie::corrupt;
use super::rows::rows_of;
use super::threads::threads_for;
use super::{Pipeline, Work};
use crate::{Error, Result};

/// The one thread that loads the stage and runs its decodes. llama.cpp's OpenMP team belongs
/// to the thread that calls it: tokio's blocking pool would hand each decode to whichever of
/// its threads is free, each with a team of its own, so that a node with N threads could run
/// several times N.
pub(super) struct DecodeThread {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl DecodeThread {
    pub(super) fn start() -> DecodeThread {
        let (jobs, incoming) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name("stage-decode".into())
            .spawn(move || {
                for job in incoming {
                    job();
                }
            })
            .expect("spawning the decode thread");
        DecodeThread { jobs }
    }

    /// Run `f` on the decode thread and wait for its result.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Box::new(move || {
            let _ = tx.send(f());
        });
        let gone = || Error::Pipeline("the decode thread stopped".into());
        self.jobs.send(job).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }
}

/// Run every lane's steps, one at a time, in the order they came.
pub(super) async fn worker(mut queue: mpsc::UnboundedReceiver<Work>, pipeline: Arc<Pipeline>) {
    while let Some(mut w) = queue.recv().await {
        let (lane, step, in_flight) = (w.lane.clone(), w.step, w.in_flight);
        let mut stages_busy_us = std::mem::take(&mut w.busy_us);
        let started = Instant::now();
        let result = run_step(&pipeline, w).await;
        lane.queued
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let busy_us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        stages_busy_us.push(busy_us);
        if let Ok((groups, _)) = &result {
            let metrics = &pipeline.metrics;
            metrics.stage_compute.observe(f64::from(busy_us) / 1e6);
            metrics
                .rows
                .inc_by(groups.iter().map(|g| u64::from(g.rows)).sum());
        }
        let frame = match result {
            Ok((groups, RowsOutput::Hidden(data))) if lane.probe => {
                let rows: usize = groups.iter().map(|g| g.rows as usize).sum();
                let width = (data.len() / rows.max(1)) as u32;
                Frame::Output { step, width, data }
            }
            Ok((groups, RowsOutput::Logits(logits))) if lane.probe => {
                let width = logits.first().map_or(1, |(_, l)| l.len()) as u32;
                // In the order of the step's sampled groups.
                let data = groups
                    .iter()
                    .filter_map(|g| logits.iter().find(|(seq, _)| *seq == g.seq as i32))
                    .flat_map(|(_, l)| l.iter().copied())
                    .collect();
                Frame::Output { step, width, data }
            }
            Ok((groups, RowsOutput::Hidden(data))) => {
                let Some(down) = &lane.down else {
                    continue; // a last stage gives logits
                };
                let rows: usize = groups.iter().map(|g| g.rows as usize).sum();
                let n_embd = (data.len() / rows.max(1)) as u32;
                let next = Frame::Step {
                    step,
                    in_flight,
                    busy_us: stages_busy_us,
                    groups,
                    payload: Payload::Hidden { n_embd, data },
                };
                // Signed, so that the next stage can prove what it got from this one. A next
                // stage that is gone is reported by the lane's relay.
                let next = pipeline.signer.sign(&lane.id, lane.route.stage + 1, next);
                let _ = down.send(next);
                continue;
            }
            Ok((groups, RowsOutput::Logits(logits))) => {
                let (to, way) = match &lane.answers {
                    Some(coordinator) => (coordinator, "coordinator"),
                    None => (&lane.up, "chain"),
                };
                pipeline.metrics.answered(way);
                let answer = sampled(step, &groups, &logits, stages_busy_us);
                let _ = to.send(pipeline.hostility.answer(answer));
                continue;
            }
            Err(e) => Frame::Error(format!("stage {}: {e:#}", lane.route.stage)),
        };
        let _ = lane.up.send(frame);
    }
}

/// The last stage's answer: each group that asked for a token gets one, sampled with its own
/// parameters at its last row's position.
fn sampled(step: u64, groups: &[Group], logits: &[(i32, Vec<f32>)], busy_us: Vec<u32>) -> Frame {
    let tokens = groups
        .iter()
        .filter(|g| g.sample)
        .filter_map(|g| {
            let row = logits.iter().find(|(seq, _)| *seq == g.seq as i32)?;
            let pos = g.pos0 + g.rows - 1;
            Some((g.seq, sample(&row.1, g.sampling, pos)))
        })
        .collect();
    Frame::Sampled {
        step,
        tokens,
        busy_us,
    }
}

/// Check a step against the stage and run it; the step's groups come back with the output.
async fn run_step(pipeline: &Pipeline, w: Work) -> Result<(Vec<Group>, RowsOutput)> {
    let stage = {
        let loaded = pipeline.loaded.lock().await;
        match loaded.as_ref() {
            Some(l) if l.generation == w.lane.generation => l.stage.clone(),
            _ => {
                return Err(Error::Pipeline(
                    "the stage was reloaded for a new route since this connection opened".into(),
                ))
            }
        }
    };
    let first = w.lane.route.stage == 0;
    let (groups, payload, probe) = (w.groups, w.payload, w.lane.probe);
    let lie = pipeline.hostility.lie_on(probe);
    let (lane, in_flight) = (w.lane.clone(), w.in_flight);
    pipeline
        .decoder
        .run(move || {
            let mut stage = stage.lock().unwrap();
            let most = stage.policy().threads() as i32;
            stage.set_threads(threads_for(most, &lane.route, in_flight));
            let rows = rows_of(&stage, first, probe, &groups, &payload)?;
            for g in &groups {
                stage.truncate_sequence(g.seq as i32, g.pos0 as i32)?;
            }
            let mut output = match &payload {
                Payload::Tokens(t) => stage.forward_token_rows(t, &rows)?,
                Payload::Hidden { data, .. } => stage.forward_hidden_rows(data, &rows)?,
            };
            if lie != 0.0 {
                corrupt(&mut output, lie);
            }
            Ok((groups, output))
        })
        .await?
}
