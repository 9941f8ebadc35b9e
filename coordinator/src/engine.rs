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
//! and a batch cut smaller only costs there (a 2-row decode takes about twice a 1-row one, an
//! 8-row decode about five times; on loopback one micro-batch of 8 streams gave 214 tokens/s
//! against 155 with four of 2). Steps go down without waiting; their answers come back
//! in order, each with the tokens the last stage sampled and every stage's compute time.
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

mod stats;
mod step;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::data::io::{Connection, FrameReader, FrameWriter};
use protocol::data::{Frame, Hello};
use tokio::sync::{mpsc, watch};

pub use stats::ServingStats;

use crate::hub::InLine;
use crate::infer::{random_u64, Event, Generation, Request, Vocab};
use crate::swarm::{machines_in, RouteHop};

/// The most prompt rows one step carries: a long prompt goes in over several steps while the
/// running sequences get their next token in each.
pub const PREFILL_ROWS: usize = 256;

/// How long running requests wait for a new route after a stage failed.
pub const REROUTE_WAIT: Duration = Duration::from_secs(30);

/// How long opening the lane to stage 0 may take.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// How many times a request is started over after failures before it fails.
const MAX_ATTEMPTS: u32 = 3;

/// A request handed to the engine.
pub struct Job {
    pub req: Request,
    pub events: mpsc::UnboundedSender<Event>,
    /// When the request came (for its time to first token).
    pub arrived: Instant,
    /// When the request gives up, waiting included.
    pub deadline: Instant,
    /// Its place in the admission line, given back when it gets a slot (or leaves).
    pub in_line: Option<InLine>,
}

/// How the engine runs: the route's ids and the batching shape.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub model_sha256: String,
    pub split_id: String,
    /// Sequences every stage keeps (`--parallel`).
    pub parallel: usize,
    /// Micro-batches in flight; 0 = one per machine of the route.
    pub micro_batches: usize,
    /// The data channel's TLS (trust in the swarm's CA) in a TLS swarm.
    pub tls: Option<protocol::data::io::ClientTls>,
    /// Where token timings and counts go (`/metrics`).
    pub live: Arc<crate::metrics::Live>,
}

/// The handle requests are sent through.
pub struct Engine {
    jobs: mpsc::UnboundedSender<Job>,
    pub stats: Arc<Mutex<ServingStats>>,
}

impl Engine {
    /// Start the engine's task.
    pub fn start(
        settings: EngineSettings,
        vocab: Arc<Vocab>,
        routes: watch::Receiver<Option<Vec<RouteHop>>>,
        sampler: Option<crate::verify::Sampler>,
    ) -> Engine {
        let (jobs, incoming) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(ServingStats::default()));
        let state = State {
            slots: (0..settings.parallel.max(1))
                .map(|_| Slot::default())
                .collect(),
            settings,
            vocab,
            routes,
            stats: stats.clone(),
            waiting: VecDeque::new(),
            lane: None,
            failure: None,
            steps: HashMap::new(),
            next_step: 1,
            next_serial: 1,
            clock: 0,
            sampler,
        };
        tokio::spawn(state.run(incoming));
        Engine { jobs, stats }
    }

    /// Hand a request over; false if the engine has stopped.
    pub fn submit(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }
}

/// One of the stages' sequences.
#[derive(Default)]
struct Slot {
    /// The request running in it.
    running: Option<Running>,
    /// What the stages hold for this sequence once it is free (the prompt cache).
    cached: Vec<i32>,
    last_used: u64,
}

/// A request in a slot.
struct Running {
    /// Tells this request's answers from those of an earlier holder of the slot.
    serial: u64,
    job: Job,
    /// The prompt, then each generated token as it is fed back.
    tokens: Vec<i32>,
    /// `tokens[..fed]` are in the stages' KV cache or on their way there.
    fed: usize,
    in_flight: bool,
    generation: Generation,
    cached_tokens: usize,
    attempts: u32,
    /// When its last token was generated (none yet: the next one is its first).
    last_token: Option<Instant>,
}

/// The connection to stage 0: steps go out on `writer`, answers come in on `answers` (read by
/// a task of its own, since reading a frame cannot be cancelled half-way).
struct Lane {
    route: Vec<RouteHop>,
    /// The machines its stages run on: the default number of micro-batches in flight.
    machines: usize,
    writer: FrameWriter,
    /// Kept open while the lane lives: the last stage drops the answer lane when it closes.
    _answer_writer: Option<FrameWriter>,
    /// Frames from stage 0 (errors coming up the chain) and from the answer lane.
    answers: mpsc::UnboundedReceiver<Result<Frame, String>>,
}

/// What woke the engine.
enum Woke {
    Answer(Option<Result<Frame, String>>),
    Job(Option<Job>),
    /// The route changed (false: the coordinator is shutting down).
    Route(bool),
    Tick,
}

/// A group of a step still in the pipeline.
struct Sent {
    seq: usize,
    serial: u64,
    sample: bool,
}

struct State {
    settings: EngineSettings,
    vocab: Arc<Vocab>,
    routes: watch::Receiver<Option<Vec<RouteHop>>>,
    stats: Arc<Mutex<ServingStats>>,
    slots: Vec<Slot>,
    waiting: VecDeque<Job>,
    lane: Option<Lane>,
    /// The last failure: when, on which route, and why.
    failure: Option<(Instant, Option<Vec<RouteHop>>, String)>,
    steps: HashMap<u64, Vec<Sent>>,
    next_step: u64,
    next_serial: u64,
    clock: u64,
    /// Offered every finished request, to check a fraction of them ([`crate::verify`]).
    sampler: Option<crate::verify::Sampler>,
}

impl State {
    async fn run(mut self, mut incoming: mpsc::UnboundedReceiver<Job>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.reap();
            self.admit();
            if self.lane.is_none() && self.running() > 0 {
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
                Woke::Answer(None) => self.fail("the connection to stage 0 ended".into()),
                Woke::Job(Some(job)) => self.waiting.push_back(job),
                Woke::Job(None) | Woke::Route(false) => return,
                Woke::Route(true) => self.route_changed(),
                Woke::Tick => {}
            }
        }
    }

    fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.running.is_some()).count()
    }

    /// Drop requests whose client left or whose deadline passed, waiting or running: a
    /// running one's slot is free for the next request at once.
    fn reap(&mut self) {
        let now = Instant::now();
        self.waiting.retain(|job| {
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
        for seq in 0..self.slots.len() {
            let Some(r) = &self.slots[seq].running else {
                continue;
            };
            if r.job.events.is_closed() {
                self.client_left(seq);
            } else if now >= r.job.deadline {
                let _ = r.job.events.send(Event::Failed(
                    "the request ran past its deadline (--deadline)".into(),
                ));
                self.release(seq);
            }
        }
    }

    /// Give free slots to waiting requests, each to the slot whose cache shares the longest
    /// prefix with its prompt (else the least recently used).
    fn admit(&mut self) {
        while !self.waiting.is_empty() {
            let prompt = &self.waiting[0].req.prompt;
            let best = (0..self.slots.len())
                .filter(|&i| self.slots[i].running.is_none())
                .map(|i| {
                    let s = &self.slots[i];
                    let shared = s
                        .cached
                        .iter()
                        .zip(prompt)
                        .take_while(|(a, b)| a == b)
                        .count()
                        .min(prompt.len().saturating_sub(1)); // one row must give logits
                    (i, shared, s.last_used)
                })
                .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)));
            let Some((seq, shared, _)) = best else {
                return;
            };
            let mut job = self.waiting.pop_front().expect("not empty");
            job.in_line = None;
            let tokens = job.req.prompt.clone();
            let serial = self.next_serial;
            self.next_serial += 1;
            self.slots[seq].running = Some(Running {
                serial,
                job,
                tokens,
                fed: shared,
                in_flight: false,
                generation: Generation::new(),
                cached_tokens: shared,
                attempts: 1,
                last_token: None,
            });
        }
    }

    /// Open a lane to stage 0 of the current route, unless it is the route that just failed
    /// (then wait for a new one, at most [`REROUTE_WAIT`]).
    async fn connect(&mut self) {
        let route = self.routes.borrow().clone();
        if let Some((when, failed_route, why)) = &self.failure {
            if route.is_none() || route == *failed_route {
                if when.elapsed() >= REROUTE_WAIT {
                    let message =
                        format!("a pipeline stage failed and no replica took its place: {why}");
                    self.fail_all(&message);
                    self.failure = None;
                }
                return;
            }
        }
        let Some(route) = route else {
            self.fail_all("the swarm is not ready");
            return;
        };
        let (Some(first), Some(last)) = (route.first(), route.last()) else {
            return;
        };
        let (model, split) = (&self.settings.model_sha256, &self.settings.split_id);
        let lane_id = format!("{:016x}{:016x}", random_u64(), random_u64());
        let (tx, answers) = mpsc::unbounded_channel();
        // The answer lane first, so the last stage knows where the lane's answers go before
        // the lane's first step reaches it. A one-stage route answers on the lane itself.
        let mut answer_writer = None;
        if route.len() > 1 {
            let stage = route.len() - 1;
            let hello = Hello::answers(model, split, stage as u32, &lane_id);
            match open(last, hello, self.settings.tls.as_ref()).await {
                Ok(conn) => {
                    let (reader, writer) = conn.into_split();
                    forward_answers(reader, tx.clone(), format!("stage {stage}"));
                    answer_writer = Some(writer);
                }
                Err(e) => {
                    self.reset(&format!("stage {stage}: {e}"));
                    self.failure = Some((Instant::now(), Some(route), e));
                    return;
                }
            }
        }
        let hello = Hello::new(model, split, 0).on_lane(&lane_id);
        match open(first, hello, self.settings.tls.as_ref()).await {
            Ok(conn) => {
                let (reader, writer) = conn.into_split();
                forward_answers(reader, tx, "stage 0".into());
                tracing::info!("serving through {}", describe(&route));
                self.lane = Some(Lane {
                    machines: machines_in(&route).max(1),
                    route,
                    writer,
                    _answer_writer: answer_writer,
                    answers,
                });
                self.failure = None;
            }
            Err(e) => {
                self.reset(&format!("stage 0: {e}"));
                self.failure = Some((Instant::now(), Some(route), e));
            }
        }
    }

    /// Send steps while fewer than the micro-batch count are in the pipeline.
    async fn send_steps(&mut self) {
        let in_flight_limit = match self.settings.micro_batches {
            0 => self.lane.as_ref().map_or(1, |l| l.machines),
            m => m,
        };
        while self.lane.is_some() && self.steps.len() < in_flight_limit {
            let Some(frame) = self.next_step(in_flight_limit) else {
                return;
            };
            let lane = self.lane.as_mut().expect("checked");
            if let Err(e) = lane.writer.send(&frame).await {
                self.fail(e.to_string());
                return;
            }
        }
    }

    /// An answer from the pipeline.
    fn answered(&mut self, frame: Frame) {
        let (step, tokens, busy_us) = match frame {
            Frame::Sampled {
                step,
                tokens,
                busy_us,
            } => (step, tokens, busy_us),
            Frame::Error(e) => return self.fail(e),
            other => return self.fail(format!("stage 0 answered {other:?}")),
        };
        let Some(sent) = self.steps.remove(&step) else {
            return self.fail(format!(
                "an answer to step {step}, which is not in the pipeline"
            ));
        };
        let (mut generated, mut cached) = (0u64, 0u64);
        for s in sent {
            let Some(r) = self.slots[s.seq].running.as_mut() else {
                continue; // its request left while the step was on its way
            };
            if r.serial != s.serial {
                continue;
            }
            r.in_flight = false;
            if !s.sample {
                continue;
            }
            let Some(&(_, token)) = tokens.iter().find(|(seq, _)| *seq as usize == s.seq) else {
                return self.fail(format!(
                    "step {step} came back without sequence {}'s token",
                    s.seq
                ));
            };
            generated += 1;
            let now = Instant::now();
            let live = &self.settings.live;
            match r.last_token.replace(now) {
                None => live
                    .time_to_first_token
                    .observe((now - r.job.arrived).as_secs_f64()),
                Some(last) => live.inter_token.observe((now - last).as_secs_f64()),
            }
            let progress = r.generation.push(&self.vocab, &r.job.req, token);
            if let Some(text) = progress.text {
                if r.job.events.send(Event::Text(text)).is_err() {
                    self.client_left(s.seq);
                    continue;
                }
            }
            match progress.finish {
                Some(finish) => {
                    let _ = r.job.events.send(Event::Done {
                        finish,
                        completion_tokens: r.generation.len(),
                        cached_tokens: r.cached_tokens,
                    });
                    cached += r.cached_tokens as u64;
                    live.prompt_tokens.inc_by(r.job.req.prompt.len() as u64);
                    if let Some(sampler) = &mut self.sampler {
                        sampler.offer(&r.tokens[..r.fed]);
                    }
                    self.release(s.seq);
                }
                None => r.tokens.push(token),
            }
        }
        let mut stats = self.stats.lock().unwrap();
        stats.steps += 1;
        stats.add_busy(&busy_us);
        stats.generated_tokens += generated;
        self.settings.live.completion_tokens.inc_by(generated);
        stats.cached_prompt_tokens += cached;
    }

    fn client_left(&mut self, seq: usize) {
        tracing::info!("sequence {seq}: the client went away; its slot is free");
        self.release(seq);
    }

    /// Free a slot, keeping what its sequence holds on the stages as the prompt cache.
    fn release(&mut self, seq: usize) {
        self.clock += 1;
        let slot = &mut self.slots[seq];
        if let Some(r) = slot.running.take() {
            let mut tokens = r.tokens;
            tokens.truncate(r.fed);
            slot.cached = tokens;
            slot.last_used = self.clock;
        }
    }

    /// The lane broke: start every running request again through the next route.
    fn fail(&mut self, why: String) {
        tracing::warn!("the pipeline failed: {why}; running requests start again on a new route");
        let route = self.lane.take().map(|l| l.route);
        self.failure = Some((Instant::now(), route, why.clone()));
        self.reset(&why);
    }

    /// Forget every step in the pipeline and everything cached on the stages, and put each
    /// running request back at its prompt (failing those tried too often).
    fn reset(&mut self, why: &str) {
        self.lane = None;
        self.steps.clear();
        for seq in 0..self.slots.len() {
            let slot = &mut self.slots[seq];
            slot.cached.clear();
            let Some(r) = slot.running.as_mut() else {
                continue;
            };
            r.attempts += 1;
            if r.attempts > MAX_ATTEMPTS {
                let message = format!("the pipeline failed {MAX_ATTEMPTS} times: {why}");
                let _ = r.job.events.send(Event::Failed(message));
                slot.running = None;
                continue;
            }
            r.tokens.truncate(r.job.req.prompt.len());
            r.fed = 0;
            r.in_flight = false;
            r.cached_tokens = 0;
            r.generation.restart();
        }
    }

    fn fail_all(&mut self, message: &str) {
        for slot in &mut self.slots {
            if let Some(r) = slot.running.take() {
                let _ = r.job.events.send(Event::Failed(message.to_owned()));
            }
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
                self.running()
            );
            self.reset("the route changed");
        }
    }

    fn publish(&self) {
        let mut stats = self.stats.lock().unwrap();
        stats.running = self.running();
        stats.waiting = self.waiting.len();
    }
}

/// Hand the frames `reader` gets to the engine, then one error when it ends (`who` closed it).
fn forward_answers(
    mut reader: FrameReader,
    tx: mpsc::UnboundedSender<Result<Frame, String>>,
    who: String,
) {
    tokio::spawn(async move {
        loop {
            let next = match reader.receive_or_end().await {
                Ok(Some(frame)) => Ok(frame),
                Ok(None) => Err(format!("{who} closed the connection")),
                Err(e) => Err(format!("{who}: {e}")),
            };
            let end = next.is_err();
            if tx.send(next).is_err() || end {
                return;
            }
        }
    });
}

/// Open a data connection to `hop` with `hello`, waiting at most [`CONNECT_WAIT`].
async fn open(
    hop: &RouteHop,
    hello: Hello,
    tls: Option<&protocol::data::io::ClientTls>,
) -> Result<Connection, String> {
    let opening = Connection::open(&hop.data_addr, hello, &hop.key, tls);
    match tokio::time::timeout(CONNECT_WAIT, opening).await {
        Ok(opened) => opened.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "{}: no answer within {CONNECT_WAIT:?}",
            hop.data_addr
        )),
    }
}

fn describe(route: &[RouteHop]) -> String {
    route
        .iter()
        .map(|h| format!("{}@{}", h.node_id, h.data_addr))
        .collect::<Vec<_>>()
        .join(" → ")
}
