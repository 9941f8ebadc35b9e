//! Serving a pipeline stage on the data channel.
//!
//! The coordinator's `ROUTE` says which stage this node runs and where the next stage is. The
//! caller (the coordinator, or the stage before) opens one connection, a *lane*, and sends
//! `Step`s down it one after another without waiting; this node opens its own lane to the
//! next stage when the caller's arrives. Each step runs this stage's layers for every
//! sequence in it (one `llama_decode` per 512 rows), then goes on to the next stage as hidden
//! states, carrying each stage's compute time; the last stage samples each sequence's token
//! and sends the answers (`Sampled`, in step order) straight to the coordinator on the answer
//! lane the coordinator opened to it (the lane id in both `Hello`s matches them), so a token
//! crosses one hop back, not one per stage. Errors go back up the lanes. Connections arrive on
//! the data port (TCP, TLS in a TLS swarm) or over the mesh ([`endpoint`]), and are admitted
//! alike: by the hop key's proof.
//!
//! Threads: when a stage loads, the node measures its decodes under each thread policy the
//! settings leave open (one thread, a free team, a pinned team) and keeps the fastest
//! ([`threads`]). A step says how many steps were in the pipeline when it was sent, and
//! `ROUTE` how many of the route's stages share this machine; a stage that works alone takes
//! its policy's every thread, stages that work at once on one machine share its cores.
//!
//! Tasks, per lane: one reading the caller's steps, one writing to the caller, one writing to
//! the next stage and one relaying its errors up. One worker per node runs the steps of
//! every lane in arrival order (the node's llama.cpp context is one), so while the next
//! stage decodes step A this one decodes step B. No lock is held across a network exchange:
//! tasks hand frames to each other through channels.
//!
//! Sequences belong to the coordinator: a step names each sequence's llama.cpp `seq_id` and
//! the position it starts at, and the stage forgets that sequence's positions from there on
//! before running it, so a prefix the coordinator knows is cached is kept, and anything else
//! is overwritten. A lane that outlives a reload of the stage (a new route) is refused: its
//! sequences' caches are gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use llm::stage::Stage;
use protocol::data::io::{Accepted, Connection};
use protocol::data::seal::{self, SigningKey};
use protocol::data::{
    Frame, Group, LaneKind, Payload, KEPT_STEP_BYTES, MAX_CONTEXT, MAX_QUEUED_STEPS,
    MAX_RECALLED_BYTES,
};
use protocol::RouteParams;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::{Error, Result};

mod endpoint;
mod hops;
pub mod lie;
mod records;
mod rows;
pub mod threads;
mod work;
use hops::{admit, open_next, relay, write_all};
use lie::Hostility;
use records::Records;
use threads::ThreadSettings;
use work::{worker, DecodeThread};

/// The loaded stage.
struct Loaded {
    route: RouteParams,
    stage: Arc<Mutex<Stage>>,
    /// How its decodes use threads, and why.
    decode: protocol::DecodeThreads,
    /// Bumped at every reload: lanes opened before it are refused.
    generation: u64,
}

/// This node's part of the inference pipeline.
pub struct Pipeline {
    /// Where the shards are, and which of them this node verified.
    data: Arc<crate::store::DataDir>,
    /// What `--threads` and `--pin-threads` fix of the decode threads.
    threads: ThreadSettings,
    /// The one thread that loads the stage and runs its decodes.
    decoder: DecodeThread,
    /// Test only (`--test-lie`, `--test-attack`): what this node does wrong on purpose, so
    /// that the tests can check the coordinator's defences. Nothing for an honest node.
    hostility: Hostility,
    loaded: tokio::sync::Mutex<Option<Loaded>>,
    generations: std::sync::atomic::AtomicU64,
    /// The data channel's TLS, from the coordinator (none in a plain swarm): what callers
    /// must speak to this node, and what it speaks to the next stage.
    tls: std::sync::RwLock<Option<DataTls>>,
    /// The coordinator's answer lanes to this (last) stage, by lane id: where the `Sampled`
    /// answers of the chain lane with that id go.
    answer_lanes: Mutex<HashMap<String, mpsc::UnboundedSender<Frame>>>,
    /// Where accepted connections' steps go, and (until the data port is served) the worker's
    /// end of it.
    work: mpsc::UnboundedSender<Work>,
    work_queue: Mutex<Option<mpsc::UnboundedReceiver<Work>>>,
    /// How the latest lane to the next stage went: over the mesh (a watch on its path) or
    /// TCP (None inside); None before one opened.
    next_edge: Mutex<Option<Option<mesh::PathWatch>>>,
    /// The node's mesh endpoint and the relay it is homed on (none before it starts).
    mesh: std::sync::RwLock<Option<(mesh::Mesh, Option<protocol::RelayInfo>)>>,
    /// Signs the steps this node sends to the next stage (made at start, named at REGISTER).
    signer: SigningKey,
    /// The data channel's TLS key, made at start; only its public half leaves the node
    /// (REGISTER `tls_public_key`), for the coordinator to certify.
    tls_key: rcgen::KeyPair,
    /// The signed steps this node received, for the coordinator's checks of served requests.
    records: Mutex<Records>,
    /// What `--metrics-listen` shows.
    pub metrics: Arc<crate::metrics::NodeMetrics>,
}

/// TLS both ways on the data channel.
#[derive(Clone)]
struct DataTls {
    acceptor: tokio_rustls::TlsAcceptor,
    client: protocol::data::io::ClientTls,
}

impl Pipeline {
    pub fn new(
        data: Arc<crate::store::DataDir>,
        threads: ThreadSettings,
        hostility: Hostility,
    ) -> Result<Arc<Pipeline>> {
        hostility.announce();
        let (work, work_queue) = mpsc::unbounded_channel();
        let tls_key = rcgen::KeyPair::generate()
            .map_err(|e| Error::Pipeline(format!("making the data channel's TLS key: {e}")))?;
        Ok(Arc::new(Pipeline {
            data,
            threads,
            decoder: DecodeThread::start(),
            hostility,
            loaded: tokio::sync::Mutex::new(None),
            generations: std::sync::atomic::AtomicU64::new(0),
            tls: std::sync::RwLock::new(None),
            answer_lanes: Mutex::new(HashMap::new()),
            work,
            work_queue: Mutex::new(Some(work_queue)),
            mesh: std::sync::RwLock::new(None),
            next_edge: Mutex::new(None),
            signer: SigningKey::generate(),
            tls_key,
            records: Mutex::new(Records::new(KEPT_STEP_BYTES)),
            metrics: Default::default(),
        }))
    }

    /// How this stage reaches the next one now (for HEARTBEAT).
    pub fn next_edge(&self) -> Option<protocol::status::Edge> {
        mesh::lane_edge(self.next_edge.lock().unwrap().as_ref()?.as_ref())
    }

    /// The public half of the data channel's TLS key (PEM), for `REGISTER`.
    pub fn tls_public_key(&self) -> String {
        self.tls_key.public_key_pem()
    }

    /// The public key of the node's signed steps (hex), for `REGISTER`.
    pub fn signing_key(&self) -> String {
        self.signer.public_hex()
    }

    /// Run the data channel over TLS with the certificate of its key the coordinator gave (at
    /// REGISTER).
    pub fn set_tls(&self, tls: &protocol::NodeTls) -> Result<()> {
        let bad = |e: daemon::tls::TlsError| Error::Pipeline(format!("data-channel TLS: {e}"));
        let server =
            daemon::tls::server_config_from_pem(&tls.cert_pem, &self.tls_key.serialize_pem())
                .map_err(bad)?;
        let client = daemon::tls::client_config_from_pem(&tls.ca_pem).map_err(bad)?;
        *self.tls.write().unwrap() = Some(DataTls {
            acceptor: tokio_rustls::TlsAcceptor::from(server),
            client,
        });
        Ok(())
    }

    fn client_tls(&self) -> Option<protocol::data::io::ClientTls> {
        self.tls.read().unwrap().as_ref().map(|t| t.client.clone())
    }

    /// Take a route: load the stage's shard into llama.cpp and choose how its decodes use
    /// threads (unless the stage is loaded already). Any change of the route ends the lanes
    /// opened under the old one. Returns how the stage's decodes use threads.
    pub async fn set_route(&self, route: RouteParams) -> Result<protocol::DecodeThreads> {
        let mut loaded = self.loaded.lock().await;
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if let Some(l) = loaded.as_mut() {
            if l.route == route {
                return Ok(l.decode.clone());
            }
            if l.route.stage == route.stage
                && l.route.stage_count == route.stage_count
                && l.route.split_id == route.split_id
                && l.route.parallel == route.parallel
            {
                l.route = route;
                l.generation = generation;
                return Ok(l.decode.clone());
            }
        }
        let file = torrents::split::shard_file_name(route.stage as usize, "gguf");
        // Only a file this node verified against the manifest, unchanged since: never one
        // that failed its check or was put there by something else.
        if !self.data.verified().iter().any(|(name, _)| *name == file) {
            return Err(Error::Shard(format!(
                "{file} is not a shard this node verified (or it changed since): not loading it"
            )));
        }
        let path = self.data.shards_dir().join(&file);
        let is_last = route.stage + 1 == route.stage_count;
        let settings = self.threads;
        // The coordinator's sequences, and one more kept for its probes.
        let sequences = route.parallel + 1;
        let for_stage = route.clone();
        // On the decode thread: a team belongs to the thread that runs it, and the choice is
        // measured on the thread that will decode.
        let (stage, decode) = self
            .decoder
            .run(move || {
                let mut stage = Stage::load_for(&path, is_last, MAX_CONTEXT, 1, sequences)?;
                let decode = threads::choose(&mut stage, settings, &for_stage)?;
                Ok::<_, Error>((stage, decode))
            })
            .await??;
        tracing::info!(
            "stage {} of {} loaded in llama.cpp ({} sequences of {} positions){}; {}",
            route.stage,
            route.stage_count,
            stage.sequences(),
            stage.context(),
            if is_last { " (last)" } else { "" },
            threads::describe(&decode)
        );
        self.metrics.stage.set(i64::from(route.stage));
        self.metrics.decode_threads(&decode);
        *loaded = Some(Loaded {
            route,
            stage: Arc::new(Mutex::new(stage)),
            decode: decode.clone(),
            generation,
        });
        Ok(decode)
    }
}

/// One caller's connection through this stage: where its answers go, and where its steps go
/// next.
struct Lane {
    route: RouteParams,
    generation: u64,
    /// The coordinator's lane id (empty on a probe lane).
    id: String,
    /// Its steps waiting for the worker or running (at most [`MAX_QUEUED_STEPS`]).
    queued: std::sync::atomic::AtomicUsize,
    /// A probe lane: outputs go back to the caller, steps use only the probe sequence.
    probe: bool,
    /// Frames for the caller.
    up: mpsc::UnboundedSender<Frame>,
    /// Frames for the next stage (none on the last stage).
    down: Option<mpsc::UnboundedSender<Frame>>,
    /// Where a last stage sends its answers: the lane's answer lane to the coordinator (none
    /// on a one-stage route: then to the caller, which is the coordinator).
    answers: Option<mpsc::UnboundedSender<Frame>>,
}

/// A step waiting for the worker.
struct Work {
    lane: Arc<Lane>,
    step: u64,
    in_flight: u32,
    /// The stages before this one's compute times for the step.
    busy_us: Vec<u32>,
    groups: Vec<Group>,
    payload: Payload,
}

/// Connections that may be in their handshake at once; more wait to be read. A route has one
/// caller per stage, so only strangers (or a storm of reconnects) come near it.
const PENDING_HANDSHAKES: usize = 32;

/// Of those, how many one client (an address, an IPv6 /64) may hold: a stranger flooding the
/// port from one address cannot take the places the route's callers need. Beyond it a
/// connection is closed at once.
const PENDING_PER_CLIENT: usize = 8;

/// How long a caller has to prove the route key before the connection is closed.
const HANDSHAKE_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// How an incoming data connection arrived.
enum Arrival {
    /// On the data port (TLS in a TLS swarm).
    Tcp(TcpStream),
    /// Over the mesh: its first stream is yet to be taken.
    Mesh(mesh::Incoming),
}

/// Accept data connections until the listener fails.
pub async fn serve(listener: TcpListener, pipeline: Arc<Pipeline>) {
    let work = pipeline.work.clone();
    match pipeline.work_queue.lock().unwrap().take() {
        Some(queue) => tokio::spawn(worker(queue, pipeline.clone())),
        None => return tracing::error!("the data port is served twice"),
    };
    let pending = Arc::new(tokio::sync::Semaphore::new(PENDING_HANDSHAKES));
    let per_client = Arc::new(daemon::PerAddress::default());
    loop {
        let Ok(permit) = pending.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let Some(place) = per_client.enter(peer.ip(), PENDING_PER_CLIENT) else {
            tracing::debug!("data connection from {peer}: too many handshakes from its address");
            continue; // dropped: closed at once
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            Arrival::Tcp(stream),
            peer.to_string(),
            pipeline.clone(),
            work.clone(),
            (permit, Some(place)),
        ));
    }
}

async fn connection(
    arrival: Arrival,
    peer: String,
    pipeline: Arc<Pipeline>,
    work: mpsc::UnboundedSender<Work>,
    handshake: (
        tokio::sync::OwnedSemaphorePermit,
        Option<daemon::AddressPlace>,
    ),
) {
    let current = pipeline
        .loaded
        .lock()
        .await
        .as_ref()
        .map(|l| (l.route.clone(), l.generation));
    let acceptor = pipeline
        .tls
        .read()
        .unwrap()
        .as_ref()
        .map(|t| t.acceptor.clone());
    // Frames for the caller: the writer starts once the connection is admitted, but an
    // answer lane is registered with this sender during the handshake.
    let (up, up_queue) = mpsc::unbounded_channel();
    let handshake_all = async {
        let refused = |reason: String| protocol::data::io::ChannelError::Refused {
            peer: peer.clone(),
            reason,
        };
        let stream = match (arrival, acceptor) {
            (Arrival::Tcp(stream), None) => Accepted::plain(stream),
            (Arrival::Tcp(stream), Some(acceptor)) => match acceptor.accept(stream).await {
                Ok(tls) => Accepted::tls(tls),
                Err(e) => return Err(refused(format!("TLS: {e}"))),
            },
            // The mesh's QUIC session is its own encryption, bound into the proofs.
            (Arrival::Mesh(incoming), _) => incoming
                .stream()
                .await
                .map_err(|e| refused(e.to_string()))?,
        };
        let route = current.as_ref().map(|(route, _)| route);
        // An answer lane is registered before it is answered Ready: the coordinator opens
        // the chain lane that names it only then.
        let register = |hello: &protocol::data::Hello| match &hello.kind {
            LaneKind::Answers { lane } => {
                let stage = route.map_or(0, |r| r.stage);
                hops::register_answer_lane(&pipeline.answer_lanes, stage, lane, &up)
            }
            _ => Ok(()),
        };
        Connection::accept_then(stream, peer.clone(), |h| admit(route, h), register).await
    };
    let admitted = tokio::time::timeout(HANDSHAKE_TIME, handshake_all).await;
    drop(handshake);
    let (conn, hello, (route, generation)) = match (admitted, current) {
        (Ok(Ok((conn, hello))), Some(current)) => (conn, hello, current),
        failed => {
            // Registered, then the handshake failed (the caller went before Ready): forget it.
            hops::forget_lanes_of(&pipeline.answer_lanes, &up);
            match failed {
                (Ok(Err(e)), _) => tracing::info!("data connection from {peer} refused: {e}"),
                (Err(_), _) => tracing::info!(
                    "data connection from {peer}: no handshake within {HANDSHAKE_TIME:?}"
                ),
                _ => {} // admit refuses without a route
            }
            return;
        }
    };
    let probe = hello.is_probe();
    let (mut steps, to_caller) = conn.into_split();
    tokio::spawn(write_all(to_caller, up_queue));
    let lane_id = match hello.kind {
        LaneKind::Answers { .. } => {
            return hops::answer_lane(&pipeline.answer_lanes, &route, steps, up).await;
        }
        LaneKind::Chain { lane } => lane,
        LaneKind::Probe => String::new(),
    };
    let answers = match hops::answers_for(&pipeline.answer_lanes, &route, probe, &lane_id) {
        Ok(answers) => answers,
        Err(e) => {
            let _ = up.send(Frame::Error(e));
            return;
        }
    };
    let down = match &route.next {
        _ if probe => None,
        None => None,
        Some(next) => match open_next(
            &route,
            next,
            pipeline.client_tls(),
            pipeline.mesh(),
            &lane_id,
        )
        .await
        {
            Ok((conn, watch)) => {
                *pipeline.next_edge.lock().unwrap() = Some(watch);
                let (answers, to_next) = conn.into_split();
                let (down, down_queue) = mpsc::unbounded_channel();
                tokio::spawn(write_all(to_next, down_queue));
                tokio::spawn(relay(answers, up.clone(), route.stage + 1));
                Some(down)
            }
            Err(e) => {
                tracing::warn!("data connection from {peer}: {e}");
                let _ = up.send(Frame::Error(e.to_string()));
                return;
            }
        },
    };
    let lane = Arc::new(Lane {
        route,
        generation,
        id: lane_id,
        queued: Default::default(),
        probe,
        answers,
        up,
        down,
    });
    loop {
        let frame = match steps.receive_or_end().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("data connection from {peer}: {e}");
                let _ = lane.up.send(Frame::Error(e.to_string()));
                return;
            }
        };
        let frame = match (frame, lane.route.previous_signer.as_deref()) {
            (
                Frame::Recall {
                    lane: of,
                    seq,
                    first,
                    last,
                },
                _,
            ) if lane.probe => {
                let answer = if pipeline.hostility.refuses_checks() {
                    Frame::Error("no".into())
                } else {
                    let kept = pipeline.records.lock().unwrap();
                    Frame::Recalled(kept.recall(&of, seq, (first, last), MAX_RECALLED_BYTES))
                };
                let _ = lane.up.send(answer);
                continue;
            }
            // On the route after stage 0: only steps the previous stage signed, which are
            // kept for the coordinator's checks.
            (frame, Some(signer)) if !lane.probe => {
                match seal::open(frame, signer, &lane.id, lane.route.stage) {
                    Ok((step, bytes)) => {
                        if let Frame::Step {
                            step: n, groups, ..
                        } = &step
                        {
                            let seqs = groups.iter().map(|g| g.seq).collect();
                            pipeline
                                .records
                                .lock()
                                .unwrap()
                                .keep(&lane.id, *n, seqs, bytes);
                        }
                        step
                    }
                    Err(e) => {
                        tracing::warn!("data connection from {peer}: {e}");
                        let _ = lane
                            .up
                            .send(Frame::Error(format!("stage {}: {e}", lane.route.stage)));
                        return;
                    }
                }
            }
            (frame, _) => frame,
        };
        match frame {
            Frame::Step {
                step,
                in_flight,
                busy_us,
                groups,
                payload,
            } => {
                use std::sync::atomic::Ordering::Relaxed;
                if lane.queued.fetch_add(1, Relaxed) >= MAX_QUEUED_STEPS {
                    tracing::warn!(
                        "data connection from {peer}: more than {MAX_QUEUED_STEPS} steps \
                         waiting: closing it"
                    );
                    let _ = lane.up.send(Frame::Error(format!(
                        "stage {}: more than {MAX_QUEUED_STEPS} steps sent without waiting",
                        lane.route.stage
                    )));
                    return;
                }
                let w = Work {
                    lane: lane.clone(),
                    step,
                    in_flight,
                    busy_us,
                    groups,
                    payload,
                };
                if work.send(w).is_err() {
                    return;
                }
            }
            other => {
                let _ = lane
                    .up
                    .send(Frame::Error(format!("unexpected frame {}", other.kind())));
            }
        }
    }
}
