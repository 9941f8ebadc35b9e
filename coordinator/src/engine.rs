//! Continuous batching through the pipeline.
//!
//! One task owns the serving: a persistent connection (a lane) to stage 0 of the current
//! route and its answer lane from the last stage (the tokens come back in one hop), the
//! stages' `--parallel` sequences (slots), and the requests running in them. Each
//! step is one decode row for every running sequence that is not already in the pipeline, plus
//! chunks of new prompts (at most [`PREFILL_ROWS`] prompt rows a step, so running streams keep
//! flowing while a long prompt goes in). A new request joins at the next step. The sequences
//! are split into micro-batches (`--micro-batches`), so that stages on different machines work
//! at the same time: while stage 2 runs group A, stage 1 runs group B. By default there is one
//! micro-batch per machine of the route, not per stage: stages on one machine share its cores,
//! and a batch cut smaller only costs there (`bench/NOTES.md`); more where the route's hops
//! are slow against its compute (a WAN: [`depth`]). Steps go down without waiting; their answers
//! come back in order, each with the tokens the last stage sampled and every stage's compute
//! time. What goes into each step is decided by [`schedule`], which does no IO.
//!
//! Admission: a request is refused at once when the swarm is not serving (the published
//! route is the one source of readiness) or when `--queue` requests already wait (429).
//!
//! Prompt cache: a finished request's sequence keeps its KV on the stages until the slot is
//! needed (least recently used first). A new request takes the free slot that shares the
//! longest prefix with its prompt and sends only the rest; each stage forgets the sequence's
//! positions from where the new rows start (`Group::pos0`).
//!
//! Failure: when the lane breaks (a stage died or refused), every running request starts
//! again from its prompt through the next route the coordinator publishes (a replica of the
//! lost shard); text a client already has is not sent twice. Without a new route within
//! [`REROUTE_WAIT`] the requests fail with a clear error.

mod admission;
mod depth;
mod lane;
pub mod schedule;
mod stats;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::data::{Frame, Payload};
use tokio::sync::{mpsc, watch};

pub use admission::{Admission, InLine};
pub use lane::LaneError;
pub use stats::ServingStats;

use crate::metrics::Live;
use crate::swarm::RouteHop;
use crate::text::{Event, Generation, Request, Vocab};
use crate::verify::{Hop, Sampler, Served, Trace};

impl From<&RouteHop> for Hop {
    fn from(h: &RouteHop) -> Hop {
        Hop {
            node_id: h.node_id.clone(),
            signer: h.signer.clone(),
        }
    }
}
use depth::Depth;
pub use lane::OwnEdges;
use lane::{describe, open_lane, Lane};
use schedule::{Limits, Sampled, Scheduler};

/// The most prompt rows one step carries: a long prompt goes in over several steps while the
/// running sequences get their next token in each.
pub const PREFILL_ROWS: usize = 256;

/// How long running requests wait for a new route after a stage failed.
pub const REROUTE_WAIT: Duration = Duration::from_secs(30);

/// How often the number of micro-batches in flight is worked out again (the hops' delays
/// and the steps' compute drift).
const IN_FLIGHT_REVIEW: Duration = Duration::from_millis(500);

/// How many times a request is started before failures fail it.
const MAX_ATTEMPTS: u32 = 3;

/// How the engine runs: the route's ids, the batching shape and the admission bounds.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub model_sha256: String,
    pub split_id: String,
    /// Sequences every stage keeps (`--parallel`).
    pub parallel: usize,
    /// Micro-batches in flight; 0 = one per machine of the route.
    pub micro_batches: usize,
    /// Requests that may wait for a slot (`--queue`); more are refused.
    pub queue: usize,
    /// How long a request may take, waiting included (`--deadline`).
    pub deadline: Duration,
    /// The data channel's TLS (trust in the swarm's CA) in a TLS swarm.
    pub tls: Option<protocol::data::io::ClientTls>,
    /// The coordinator's mesh endpoint, for stages reached over the mesh.
    pub mesh: Option<mesh::Mesh>,
    /// How its lanes reach the route's ends (for `/status`).
    pub edges: Arc<Mutex<lane::OwnEdges>>,
    /// The one-way delay of the route's hops between stages, in microseconds (half each
    /// measured round trip), kept by the hub from the stages' heartbeats.
    pub chain_wire_us: Arc<AtomicU64>,
    /// Where token timings and counts go (`/metrics`).
    pub live: Arc<Live>,
    /// Where the engine reports a node that broke the protocol (the hub evicts it).
    pub breaches: Option<mpsc::UnboundedSender<Breach>>,
}

/// A node that sent what no honest node sends: it is evicted, and the lane fails over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    pub node_id: String,
    pub shard_id: u32,
    pub reason: String,
}

/// Why a request was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the swarm is not ready: not every shard is loaded on a node and in llama.cpp")]
    NotReady,
    #[error("{waiting} requests are already waiting for the pipeline: try again shortly")]
    Full { waiting: usize },
    #[error("the pipeline stopped")]
    Stopped,
}

/// The handle requests are sent through.
pub struct Engine {
    jobs: mpsc::UnboundedSender<Job>,
    admission: Admission,
    /// The serving route, as the hub publishes it: `None` while the swarm cannot serve.
    routes: watch::Receiver<Option<Vec<RouteHop>>>,
    deadline: Duration,
    pub stats: Arc<Mutex<ServingStats>>,
    /// How its lanes reach the route's ends.
    pub edges: Arc<Mutex<OwnEdges>>,
    /// See [`EngineSettings::chain_wire_us`].
    pub chain_wire_us: Arc<AtomicU64>,
}

impl Engine {
    /// Start the engine's task.
    pub fn start(
        settings: EngineSettings,
        vocab: Arc<Vocab>,
        routes: watch::Receiver<Option<Vec<RouteHop>>>,
        sampler: Option<Sampler>,
    ) -> Engine {
        let (jobs, incoming) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(ServingStats::default()));
        let limits = Limits {
            prefill_rows: PREFILL_ROWS,
            max_attempts: MAX_ATTEMPTS,
        };
        let engine = Engine {
            jobs,
            admission: Admission::new(settings.queue),
            routes: routes.clone(),
            deadline: settings.deadline,
            stats: stats.clone(),
            edges: settings.edges.clone(),
            chain_wire_us: settings.chain_wire_us.clone(),
        };
        let state = State {
            sched: Scheduler::new(settings.parallel, limits),
            settings,
            vocab,
            routes,
            stats,
            lane: None,
            failure: None,
            sampler,
            depth: Depth::default(),
            in_flight: None,
        };
        tokio::spawn(state.run(incoming));
        engine
    }

    /// Whether the swarm serves now (every stage of a route loaded).
    pub fn serving(&self) -> bool {
        self.routes.borrow().is_some()
    }

    /// Take a request: its events come on the receiver, until `Done` or `Failed`.
    pub fn submit(&self, req: Request) -> Result<mpsc::UnboundedReceiver<Event>, Refused> {
        if !self.serving() {
            return Err(Refused::NotReady);
        }
        let in_line = self.admission.enter().ok_or_else(|| Refused::Full {
            waiting: self.admission.waiting(),
        })?;
        let (events, rx) = mpsc::unbounded_channel();
        let arrived = Instant::now();
        let job = Job {
            req,
            events,
            arrived,
            deadline: arrived + self.deadline,
            in_line: Some(in_line),
            generation: Generation::new(),
            last_token: None,
            trace: None,
        };
        self.jobs.send(job).map_err(|_| Refused::Stopped)?;
        Ok(rx)
    }
}

/// A request in the engine: its client and the text side of its generation.
struct Job {
    req: Request,
    events: mpsc::UnboundedSender<Event>,
    /// When the request came (for its time to first token).
    arrived: Instant,
    /// When the request gives up, waiting included.
    deadline: Instant,
    /// Its place in the admission line, given back when it gets a slot (or leaves).
    in_line: Option<InLine>,
    generation: Generation,
    /// When its last token was generated (none yet: the next one is its first).
    last_token: Option<Instant>,
    /// The lane and steps its current attempt ran on, for the check of served requests.
    trace: Option<Trace>,
}

/// The lane that failed, and when: running requests wait for another route.
struct Failure {
    when: Instant,
    route: Option<Vec<RouteHop>>,
    why: LaneError,
}

/// What woke the engine.
enum Woke {
    Answer(Option<Result<Frame, LaneError>>),
    Job(Option<Job>),
    /// The route changed (false: the coordinator is shutting down).
    Route(bool),
    Tick,
}

struct State {
    settings: EngineSettings,
    vocab: Arc<Vocab>,
    routes: watch::Receiver<Option<Vec<RouteHop>>>,
    stats: Arc<Mutex<ServingStats>>,
    sched: Scheduler<Job>,
    lane: Option<Lane>,
    failure: Option<Failure>,
    /// Picks finished requests for the checks of holders' outputs.
    sampler: Option<Sampler>,
    /// The steps' compute times, for how many to keep in flight.
    depth: Depth,
    /// How many micro-batches to keep in flight, and when that was worked out.
    in_flight: Option<(Instant, usize)>,
}

impl State {
    async fn run(mut self, mut incoming: mpsc::UnboundedReceiver<Job>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.reap();
            self.admit();
            if self.lane.is_none() && self.sched.running() > 0 {
                self.connect().await;
            }
            self.send_steps().await;
            self.publish();
            let woke = {
                let lane = &mut self.lane;
                let answer = async {
                    match lane.as_mut() {
                        Some(lane) => lane.answers.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    answer = answer => Woke::Answer(answer),
                    job = incoming.recv() => Woke::Job(job),
                    changed = self.routes.changed() => Woke::Route(changed.is_ok()),
                    _ = tick.tick() => Woke::Tick,
                }
            };
            match woke {
                Woke::Answer(Some(Ok(frame))) => self.answered(frame),
                Woke::Answer(Some(Err(e))) => self.fail(e),
                Woke::Answer(None) => self.fail(LaneError::Ended { stage: 0 }),
                Woke::Job(Some(job)) => {
                    let (prompt, sampling) = (job.req.prompt.clone(), job.req.sampling);
                    self.sched.enqueue(prompt, sampling, job);
                }
                Woke::Job(None) | Woke::Route(false) => return,
                Woke::Route(true) => self.route_changed(),
                Woke::Tick => {}
            }
        }
    }

    /// Drop requests whose client left or whose deadline passed, waiting or running: a
    /// running one's slot is free for the next request at once.
    fn reap(&mut self) {
        let now = Instant::now();
        self.sched.retain_waiting(|job| {
            if job.events.is_closed() {
                return false;
            }
            if now >= job.deadline {
                let _ = job.events.send(Event::Failed(
                    "the request waited past its deadline for a free slot".into(),
                ));
                return false;
            }
            true
        });
        let ended: Vec<(usize, bool)> = self
            .sched
            .running_jobs()
            .filter_map(|(seq, job)| {
                let left = job.events.is_closed();
                (left || now >= job.deadline).then_some((seq, left))
            })
            .collect();
        for (seq, left) in ended {
            if left {
                self.client_left(seq);
            } else if let Some(job) = self.sched.release(seq) {
                let _ = job.events.send(Event::Failed(
                    "the request ran past its deadline (--deadline)".into(),
                ));
            }
        }
    }

    /// Give free slots to waiting requests; each leaves the admission line.
    fn admit(&mut self) {
        for seq in self.sched.admit() {
            if let Some(r) = self.sched.running_mut(seq) {
                r.job.in_line = None;
            }
        }
    }

    /// Open a lane to stage 0 of the current route, unless it is the route that just failed
    /// (then wait for a new one, at most [`REROUTE_WAIT`]).
    async fn connect(&mut self) {
        let route = self.routes.borrow().clone();
        if let Some(failure) = &self.failure {
            if route.is_none() || route == failure.route {
                if failure.when.elapsed() >= REROUTE_WAIT {
                    let message = format!(
                        "a pipeline stage failed and no replica took its place: {}",
                        failure.why
                    );
                    self.fail_all(&message);
                    self.failure = None;
                }
                return;
            }
        }
        let Some(route) = route else {
            self.fail_all(&Refused::NotReady.to_string());
            return;
        };
        match open_lane(&route, &self.settings).await {
            Ok(lane) => {
                tracing::info!("serving through {}", describe(&route));
                self.lane = Some(lane);
                // Other machines and other paths: measured afresh.
                self.depth.reset();
                self.in_flight = None;
                self.failure = None;
            }
            Err(e) => {
                tracing::warn!("opening a lane through {}: {e}", describe(&route));
                self.reset(&e);
                self.failure = Some(Failure {
                    when: Instant::now(),
                    route: Some(route),
                    why: e,
                });
            }
        }
    }

    /// How many micro-batches to keep in flight: `--micro-batches`, or (0) what [`Depth`]
    /// makes of the route's machines, its hops' delays and the steps' compute, worked out
    /// again every [`IN_FLIGHT_REVIEW`].
    fn in_flight_limit(&mut self) -> usize {
        let Some(lane) = self.lane.as_ref() else {
            return 1;
        };
        if self.settings.micro_batches > 0 {
            return self.settings.micro_batches;
        }
        if let Some((at, n)) = self.in_flight {
            if at.elapsed() < IN_FLIGHT_REVIEW {
                return n;
            }
        }
        // The coordinator's own hops (reading them also keeps their estimates fresh: see
        // `mesh::PathWatch::edge`), then the stages'.
        let own: u64 = {
            let edges = self.settings.edges.lock().unwrap();
            [&edges.first, &edges.answers]
                .into_iter()
                .filter_map(|seen| mesh::lane_edge(seen.as_ref()?.1.as_ref())?.rtt_us)
                .sum()
        };
        let wire_us = own / 2 + self.settings.chain_wire_us.load(Ordering::Relaxed);
        let n = self.depth.in_flight(
            lane.machines,
            Duration::from_micros(wire_us),
            self.settings.parallel,
        );
        if self.in_flight.is_none_or(|(_, before)| before != n) {
            tracing::info!(
                "keeping {n} micro-batches in flight ({} machines, hops {:.1} ms one way)",
                lane.machines,
                wire_us as f64 / 1000.0
            );
        }
        self.in_flight = Some((Instant::now(), n));
        self.stats.lock().unwrap().counts.micro_batches = n;
        n
    }

    /// Send steps while fewer than the micro-batch count are in the pipeline.
    async fn send_steps(&mut self) {
        let in_flight_limit = self.in_flight_limit();
        while self.lane.is_some() && self.sched.in_flight() < in_flight_limit {
            let Some(step) = self.sched.next_step(in_flight_limit) else {
                return;
            };
            let lane = self.lane.as_mut().expect("checked");
            for g in &step.groups {
                if let Some(r) = self.sched.running_mut(g.seq as usize) {
                    let trace = r.job.trace.get_or_insert_with(|| Trace {
                        lane: lane.id.clone(),
                        seq: g.seq,
                        first: step.step,
                        last: step.step,
                        route: lane.route.iter().map(|h| h.into()).collect(),
                    });
                    trace.last = step.step;
                }
            }
            let frame = Frame::Step {
                step: step.step,
                in_flight: step.in_flight,
                busy_us: Vec::new(),
                groups: step.groups,
                payload: Payload::Tokens(step.tokens),
            };
            if let Err(source) = lane.writer.send(&frame).await {
                self.fail(LaneError::Channel { stage: 0, source });
                return;
            }
        }
    }

    /// An answer from the pipeline.
    fn answered(&mut self, frame: Frame) {
        let (step, tokens, mut busy_us) = match frame {
            Frame::Sampled {
                step,
                tokens,
                busy_us,
            } => (step, tokens, busy_us),
            Frame::Error(e) => return self.fail(LaneError::Stage(e)),
            other => return self.fail(LaneError::Unexpected(other.kind())),
        };
        if let Some(&(_, bad)) = tokens.iter().find(|(_, t)| !self.vocab.is_token(*t)) {
            // The last stage samples the tokens: no honest one sends an id outside the
            // vocabulary (and llama.cpp aborts the process on one).
            let reason = format!(
                "it sampled token id {bad}, outside the vocabulary of {}",
                self.vocab.n_vocab()
            );
            return self.breach_by_last_stage(reason);
        }
        // One compute time per stage: a longer list (from a hostile stage) would grow the
        // stats without bound.
        busy_us.truncate(self.lane.as_ref().map_or(0, |l| l.route.len()));
        self.depth.answered(&busy_us);
        let delivered = match self.sched.answered(step, &tokens) {
            Ok(delivered) => delivered,
            Err(e) => return self.fail(e.into()),
        };
        let generated = delivered.len() as u64;
        let mut cached = 0u64;
        let live = self.settings.live.clone();
        for Sampled { seq, token } in delivered {
            let Some(r) = self.sched.running_mut(seq) else {
                continue;
            };
            let (cached_tokens, prompt_len) = (r.cached_tokens(), r.prompt_len());
            let job = &mut r.job;
            let now = Instant::now();
            match job.last_token.replace(now) {
                None => live
                    .time_to_first_token
                    .observe((now - job.arrived).as_secs_f64()),
                Some(last) => live.inter_token.observe((now - last).as_secs_f64()),
            }
            let progress = job.generation.push(&self.vocab, &job.req, token);
            if let Some(text) = progress.text {
                if job.events.send(Event::Text(text)).is_err() {
                    self.client_left(seq);
                    continue;
                }
            }
            let Some(finish) = progress.finish else {
                self.sched.feed(seq, token);
                continue;
            };
            let _ = job.events.send(Event::Done {
                finish,
                completion_tokens: job.generation.len(),
                cached_tokens,
            });
            cached += cached_tokens as u64;
            live.prompt_tokens.inc_by(prompt_len as u64);
            if let Some(sampler) = &mut self.sampler {
                sampler.offer(|| Served {
                    tokens: r.computed().to_vec(),
                    last_token: token,
                    prompt_len,
                    from_pos: cached_tokens,
                    sampling: r.sampling(),
                    trace: r.job.trace.take(),
                });
            }
            self.sched.release(seq);
        }
        let mut stats = self.stats.lock().unwrap();
        stats.add_busy(&busy_us);
        let counts = &mut stats.counts;
        counts.steps += 1;
        counts.generated_tokens += generated;
        counts.cached_prompt_tokens += cached;
        live.completion_tokens.inc_by(generated);
    }

    /// The lane's last stage (which samples the tokens) broke the protocol: report it for
    /// eviction and start the running requests again on another route.
    fn breach_by_last_stage(&mut self, reason: String) {
        let Some(last) = self.lane.as_ref().and_then(|l| l.route.last()) else {
            return;
        };
        let (node_id, shard_id) = (last.node_id.clone(), last.shard_id);
        tracing::error!("node {node_id} (shard {shard_id}): {reason}");
        if let Some(breaches) = &self.settings.breaches {
            let _ = breaches.send(Breach {
                node_id: node_id.clone(),
                shard_id,
                reason: format!("it broke the protocol: {reason}"),
            });
        }
        self.fail(LaneError::Breach { node_id, reason });
    }

    fn client_left(&mut self, seq: usize) {
        tracing::info!("sequence {seq}: the client went away; its slot is free");
        self.sched.release(seq);
    }

    /// The lane broke: start every running request again through the next route.
    fn fail(&mut self, why: LaneError) {
        tracing::warn!("the pipeline failed: {why}; running requests start again on a new route");
        let route = self.lane.take().map(|l| l.route);
        self.reset(&why);
        self.failure = Some(Failure {
            when: Instant::now(),
            route,
            why,
        });
    }

    /// Drop the lane and put each running request back at its prompt (failing those tried
    /// too often).
    fn reset(&mut self, why: &LaneError) {
        self.lane = None;
        for job in self.sched.reset() {
            let message = format!("the pipeline failed {MAX_ATTEMPTS} times: {why}");
            let _ = job.events.send(Event::Failed(message));
        }
        for seq in 0..self.settings.parallel.max(1) {
            if let Some(r) = self.sched.running_mut(seq) {
                r.job.generation.restart();
                r.job.trace = None; // the attempt starts again on another lane
            }
        }
    }

    fn fail_all(&mut self, message: &str) {
        for job in self.sched.take_running() {
            let _ = job.events.send(Event::Failed(message.to_owned()));
        }
    }

    /// A new route replaces the lane's: running requests move to it.
    fn route_changed(&mut self) {
        let new = self.routes.borrow().clone();
        let Some(lane) = &self.lane else {
            return;
        };
        if new.is_some() && new.as_ref() != Some(&lane.route) {
            tracing::info!(
                "the route changed; {} running request(s) start again on the new one",
                self.sched.running()
            );
            self.reset(&LaneError::RouteChanged);
        }
    }

    fn publish(&self) {
        let mut stats = self.stats.lock().unwrap();
        stats.counts.running = self.sched.running();
        stats.counts.waiting = self.sched.waiting();
    }
}
