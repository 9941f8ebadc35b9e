//! The lane: the engine's connections through the current route (the chain lane to stage 0
//! and the answer lane from the last stage), how they are opened, and why one breaks.

use std::time::Duration;

use protocol::data::io::{ChannelError, Connection, FrameReader, FrameWriter};
use protocol::data::{Frame, Hello};
use tokio::sync::mpsc;

use super::schedule::AnswerError;
use super::EngineSettings;
use crate::swarm::{machines_in, RouteHop};
use crate::text::random_u64;

/// How long opening the lane to stage 0 may take.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Why the lane to the pipeline broke.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error("stage {stage}: {source}")]
    Channel {
        stage: usize,
        #[source]
        source: ChannelError,
    },
    #[error("stage {stage} closed the connection")]
    Ended { stage: usize },
    #[error("stage {stage} ({addr}): no answer within {CONNECT_WAIT:?}")]
    NoAnswer { stage: usize, addr: String },
    /// A stage reported an error (its own, or one passed up the chain).
    #[error("{0}")]
    Stage(String),
    #[error("stage 0 answered {0}")]
    Unexpected(&'static str),
    #[error(transparent)]
    Answer(#[from] AnswerError),
    #[error("the route changed")]
    RouteChanged,
    #[error("node {node_id} broke the protocol: {reason}")]
    Breach { node_id: String, reason: String },
}

/// The connection to stage 0: steps go out on `writer`, answers come in on `answers` (read by
/// a task of its own, since reading a frame cannot be cancelled half-way).
pub(super) struct Lane {
    /// The random id the stages know the lane by (and sign its steps under).
    pub(super) id: String,
    pub(super) route: Vec<RouteHop>,
    /// The machines its stages run on: the default number of micro-batches in flight.
    pub(super) machines: usize,
    pub(super) writer: FrameWriter,
    /// Kept open while the lane lives: the last stage drops the answer lane when it closes.
    _answer_writer: Option<FrameWriter>,
    /// Frames from stage 0 (errors coming up the chain) and from the answer lane.
    pub(super) answers: mpsc::UnboundedReceiver<Result<Frame, LaneError>>,
}

/// Open a lane through `route`: the answer lane to the last stage first, so that the last
/// stage knows where the lane's answers go before the lane's first step reaches it (a
/// one-stage route answers on the lane itself), then the lane to stage 0.
pub(super) async fn open_lane(
    route: &[RouteHop],
    settings: &EngineSettings,
) -> Result<Lane, LaneError> {
    let (Some(first), Some(last)) = (route.first(), route.last()) else {
        return Err(LaneError::Stage("the route has no stages".into()));
    };
    let (model, split) = (&settings.model_sha256, &settings.split_id);
    let lane_id = format!("{:016x}{:016x}", random_u64(), random_u64());
    let (tx, answers) = mpsc::unbounded_channel();
    let tls = (settings.tls.as_ref(), settings.mesh.as_ref());
    let mut answer_writer = None;
    if route.len() > 1 {
        let stage = route.len() - 1;
        let hello = Hello::answers(model, split, stage as u32, &lane_id);
        let (conn, watch) = open(stage, last, hello, tls).await?;
        settings.edges.lock().unwrap().answers = Some((last.node_id.clone(), watch));
        let (reader, writer) = conn.into_split();
        forward_answers(reader, tx.clone(), stage);
        answer_writer = Some(writer);
    }
    let hello = Hello::new(model, split, 0).on_lane(&lane_id);
    let (conn, watch) = open(0, first, hello, tls).await?;
    settings.edges.lock().unwrap().first = Some((first.node_id.clone(), watch));
    let (reader, writer) = conn.into_split();
    forward_answers(reader, tx, 0);
    Ok(Lane {
        id: lane_id,
        machines: machines_in(route).max(1),
        route: route.to_vec(),
        writer,
        _answer_writer: answer_writer,
        answers,
    })
}

/// Hand the frames `reader` gets to the engine, then one error when it ends (`stage` closed
/// it).
fn forward_answers(
    mut reader: FrameReader,
    tx: mpsc::UnboundedSender<Result<Frame, LaneError>>,
    stage: usize,
) {
    tokio::spawn(async move {
        loop {
            let next = match reader.receive_or_end().await {
                Ok(Some(frame)) => Ok(frame),
                Ok(None) => Err(LaneError::Ended { stage }),
                Err(source) => Err(LaneError::Channel { stage, source }),
            };
            let end = next.is_err();
            if tx.send(next).is_err() || end {
                return;
            }
        }
    });
}

/// Open a data connection to `hop` (stage `stage`) with `hello`, waiting at most
/// [`CONNECT_WAIT`].
async fn open(
    stage: usize,
    hop: &RouteHop,
    hello: Hello,
    (tls, mesh): (Option<&protocol::data::io::ClientTls>, Option<&mesh::Mesh>),
) -> Result<(Connection, Option<mesh::PathWatch>), LaneError> {
    let tls = tls.map(|config| protocol::data::io::TlsTo {
        config,
        node_id: &hop.node_id,
    });
    let callee = mesh::Callee::pick(mesh, hop.mesh.as_ref(), &hop.data_addr, tls);
    let opening = mesh::open(callee, hello, &hop.key);
    match tokio::time::timeout(CONNECT_WAIT, opening).await {
        Ok(opened) => opened.map_err(|source| LaneError::Channel { stage, source }),
        Err(_) => Err(LaneError::NoAnswer {
            stage,
            addr: hop.data_addr.clone(),
        }),
    }
}

/// How the coordinator's latest lanes reached the route's first stage (the chain) and its
/// last (the answers): by node, over the mesh (a watch on the path) or TCP (None inside).
#[derive(Default)]
pub struct OwnEdges {
    pub first: Option<(String, Option<mesh::PathWatch>)>,
    pub answers: Option<(String, Option<mesh::PathWatch>)>,
}

impl std::fmt::Debug for OwnEdges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnEdges").finish_non_exhaustive()
    }
}

impl OwnEdges {
    /// The edge `seen` names, if it was to `node`.
    pub fn edge_to(
        seen: &Option<(String, Option<mesh::PathWatch>)>,
        node: &str,
    ) -> Option<protocol::status::Edge> {
        match seen.as_ref()? {
            (to, _) if to != node => None,
            (_, watch) => mesh::lane_edge(watch.as_ref()),
        }
    }
}

pub(super) fn describe(route: &[RouteHop]) -> String {
    route
        .iter()
        .map(|h| format!("{}@{}", h.node_id, h.data_addr))
        .collect::<Vec<_>>()
        .join(" → ")
}
