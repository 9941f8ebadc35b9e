//! The hops of a lane: who may connect (admission), the connection to the next stage, the
//! tasks that write frames and relay errors up, and the coordinator's answer lanes.

use std::collections::HashMap;
use std::sync::Mutex;

use protocol::data::io::{Connection, FrameReader, FrameWriter};
use protocol::data::{Frame, Hello, LaneKind};
use protocol::RouteParams;
use tokio::sync::mpsc;

use crate::{Error, Result};

/// A caller may talk to this node only about the stage, split and model it runs, and must
/// then prove the route's key for this hop: the key is what `admit` gives back.
pub(super) fn admit(route: Option<&RouteParams>, hello: &Hello) -> Result<String, String> {
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
    if matches!(&hello.kind, LaneKind::Answers { lane } if lane.is_empty() || route.next.is_some())
    {
        return Err(format!(
            "refused: an answer lane goes to the last stage with a lane id, and this node runs \
             stage {} of {}",
            route.stage, route.stage_count
        ));
    }
    let key = if hello.is_probe() {
        &route.probe_key
    } else {
        &route.key
    };
    if key.is_empty() {
        return Err(if hello.is_probe() {
            "refused: the coordinator gave this node no probe key".into()
        } else {
            "refused: this node holds its stage as a replica, off the route".into()
        });
    }
    Ok(key.clone())
}

/// Open this lane's connection to the next stage: over the mesh when the route says so (and
/// this node's endpoint runs), else TCP to `next` (over TLS in a TLS swarm).
pub(super) async fn open_next(
    route: &RouteParams,
    next: &str,
    tls: Option<protocol::data::io::ClientTls>,
    mesh: Option<mesh::Mesh>,
    lane: &str,
) -> Result<(Connection, Option<mesh::PathWatch>)> {
    let hello = Hello::new(&route.model_sha256, &route.split_id, route.stage + 1).on_lane(lane);
    let key = route.next_key.as_deref().unwrap_or_default();
    let node_id = route.next_node.as_deref().unwrap_or_default();
    let tls = tls
        .as_ref()
        .map(|config| protocol::data::io::TlsTo { config, node_id });
    let callee = mesh::Callee::pick(mesh.as_ref(), route.next_mesh.as_ref(), next, tls);
    mesh::open(callee, hello, key)
        .await
        .map_err(|e| Error::Pipeline(format!("stage {}: {e}", route.stage + 1)))
}

/// Write the frames handed to `queue` until every sender is gone (which closes the
/// connection's writing side) or the peer stops reading.
pub(super) async fn write_all(mut to: FrameWriter, mut queue: mpsc::UnboundedReceiver<Frame>) {
    while let Some(frame) = queue.recv().await {
        if let Err(e) = to.send(&frame).await {
            tracing::debug!("data channel: {e}");
            return;
        }
    }
}

/// Pass what the next stage sends back up to the caller: errors, or the answers of a last
/// stage that has no answer lane.
pub(super) async fn relay(
    mut answers: FrameReader,
    up: mpsc::UnboundedSender<Frame>,
    next_stage: u32,
) {
    loop {
        let frame = match answers.receive_or_end().await {
            Ok(Some(frame @ (Frame::Sampled { .. } | Frame::Error(_)))) => frame,
            Ok(Some(other)) => Frame::Error(format!("stage {next_stage} answered {other:?}")),
            Ok(None) => Frame::Error(format!("stage {next_stage} closed the connection")),
            Err(e) => Frame::Error(format!("stage {next_stage}: {e}")),
        };
        let failed = matches!(frame, Frame::Error(_));
        if up.send(frame).is_err() || failed {
            return;
        }
    }
}

/// Register `to_coordinator` as the answer lane `lane` of a last stage. Called on the proved
/// connection before it is answered `Ready`, so the coordinator, which opens its chain lane
/// only after that, always finds its answer lane in place. The first answer lane of an id
/// stands; the id is the coordinator's secret until its chain lane names it.
pub(super) fn register_answer_lane(
    lanes: &Mutex<HashMap<String, mpsc::UnboundedSender<Frame>>>,
    stage: u32,
    lane: &str,
    to_coordinator: &mpsc::UnboundedSender<Frame>,
) -> std::result::Result<(), String> {
    let mut lanes = lanes.lock().unwrap();
    if lanes.contains_key(lane) {
        return Err(format!(
            "stage {stage}: lane {lane} has an answer lane already"
        ));
    }
    lanes.insert(lane.to_owned(), to_coordinator.clone());
    Ok(())
}

/// Serve a registered answer lane: the `Sampled` answers of the chain lane with its id go to
/// `to_coordinator` until the coordinator closes the lane, which unregisters it.
pub(super) async fn answer_lane(
    lanes: &Mutex<HashMap<String, mpsc::UnboundedSender<Frame>>>,
    route: &RouteParams,
    mut from_coordinator: FrameReader,
    to_coordinator: mpsc::UnboundedSender<Frame>,
) {
    // Nothing is sent this way: any frame, or the end, closes the lane.
    let why = match from_coordinator.receive_or_end().await {
        Ok(Some(frame)) => Some(format!("unexpected {} on an answer lane", frame.kind())),
        Ok(None) => None,
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = why {
        let _ = to_coordinator.send(Frame::Error(format!("stage {}: {why}", route.stage)));
    }
    forget_lanes_of(lanes, &to_coordinator);
}

/// Where the last stage of a route sends the answers of the chain lane `lane`: the lane's
/// answer lane on a route of several stages, which the coordinator opens before the chain
/// lane (a chain lane without one is refused, never answered the long way round); on a
/// one-stage route, and on every other stage or a probe, nowhere but up the lane (None).
pub(super) fn answers_for(
    lanes: &Mutex<HashMap<String, mpsc::UnboundedSender<Frame>>>,
    route: &RouteParams,
    probe: bool,
    lane: &str,
) -> std::result::Result<Option<mpsc::UnboundedSender<Frame>>, String> {
    if probe || route.next.is_some() || route.stage_count <= 1 {
        return Ok(None);
    }
    match lanes.lock().unwrap().get(lane) {
        Some(to_coordinator) => Ok(Some(to_coordinator.clone())),
        None => Err(format!(
            "stage {}: no answer lane {lane:?} is open (the coordinator opens it before the \
             chain lane)",
            route.stage
        )),
    }
}

/// Unregister the answer lanes that send to `to_coordinator` (its lane closed, or its
/// handshake failed after it was registered).
pub(super) fn forget_lanes_of(
    lanes: &Mutex<HashMap<String, mpsc::UnboundedSender<Frame>>>,
    to_coordinator: &mpsc::UnboundedSender<Frame>,
) {
    lanes
        .lock()
        .unwrap()
        .retain(|_, sender| !sender.same_channel(to_coordinator));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(stage: u32, next: Option<&str>) -> RouteParams {
        RouteParams {
            stage,
            stage_count: 4,
            next: next.map(str::to_owned),
            model_sha256: "m".into(),
            split_id: "s".into(),
            parallel: 8,
            co_located: 1,
            key: "k".into(),
            next_key: next.map(|_| "n".into()),
            probe_key: "p".into(),
            previous_signer: None,
            next_node: None,
            next_mesh: None,
        }
    }

    #[test]
    fn answer_lanes_are_admitted_only_on_the_last_stage_with_a_lane_id() {
        let last = route(3, None);
        let middle = route(2, Some("127.0.0.1:9"));
        let answers = Hello::answers("m", "s", 3, "lane-1");
        assert_eq!(admit(Some(&last), &answers), Ok("k".into()));
        let to_middle = Hello::answers("m", "s", 2, "lane-1");
        assert!(admit(Some(&middle), &to_middle)
            .unwrap_err()
            .contains("answer lane"));
        let without_id = Hello::answers("m", "s", 3, "");
        assert!(admit(Some(&last), &without_id).is_err());
        // An answer lane without an id, or one that is also a probe, cannot even be read
        // (protocol::data's Hello refuses them as it parses).
        let wire = |fields: &str| {
            serde_json::from_str::<Hello>(&format!(
                r#"{{"model_sha256":"m","split_id":"s","stage":3,"nonce":"n",{fields}}}"#
            ))
        };
        assert!(wire(r#""answers":true"#).is_err());
        assert!(wire(r#""answers":true,"lane":"lane-1","probe":true"#).is_err());
        assert_eq!(
            wire(r#""answers":true,"lane":"lane-1""#).unwrap().kind,
            LaneKind::Answers {
                lane: "lane-1".into()
            }
        );
        // A chain hop names its lane and is admitted as before.
        let chain = Hello::new("m", "s", 2).on_lane("lane-1");
        assert_eq!(admit(Some(&middle), &chain), Ok("k".into()));
    }

    #[test]
    fn a_last_stages_chain_lane_answers_on_its_answer_lane_or_is_refused() {
        let lanes = Mutex::new(HashMap::new());
        let (to_coordinator, _out) = mpsc::unbounded_channel();
        register_answer_lane(&lanes, 3, "lane-1", &to_coordinator).unwrap();
        let last = route(3, None);
        let found = answers_for(&lanes, &last, false, "lane-1")
            .unwrap()
            .unwrap();
        assert!(found.same_channel(&to_coordinator));
        // No answer lane of that id, or none named: refused, not answered up the chain.
        for missing in ["lane-2", ""] {
            let e = answers_for(&lanes, &last, false, missing).unwrap_err();
            assert!(e.contains("no answer lane"), "{e}");
        }
        // Probes, other stages and one-stage routes answer up their own lane.
        assert!(answers_for(&lanes, &last, true, "").unwrap().is_none());
        let middle = route(2, Some("127.0.0.1:9"));
        assert!(answers_for(&lanes, &middle, false, "lane-2")
            .unwrap()
            .is_none());
        let alone = RouteParams {
            stage: 0,
            stage_count: 1,
            ..route(0, None)
        };
        assert!(answers_for(&lanes, &alone, false, "lane-2")
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn the_first_answer_lane_of_an_id_stands_and_leaves_when_it_closes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let lanes = Mutex::new(HashMap::new());
        let last = route(3, None);
        // The coordinator's end of an answer lane, through the real handshake, registered
        // before Ready as a node does: the coordinator's side of a refused lane fails.
        let accept = |to_coordinator: mpsc::UnboundedSender<Frame>| {
            let (lanes, listener, last, addr) = (&lanes, &listener, &last, &addr);
            async move {
                let hello = Hello::answers("m", "s", 3, "lane-1");
                let open = Connection::open(addr, hello, "k", None);
                let take = async {
                    let (tcp, peer) = listener.accept().await.unwrap();
                    Connection::accept_then(
                        protocol::data::io::Accepted::plain(tcp),
                        peer.to_string(),
                        |h| admit(Some(last), h),
                        |_| register_answer_lane(lanes, 3, "lane-1", &to_coordinator),
                    )
                    .await
                };
                let (near, far) = tokio::join!(open, take);
                (near, far.map(|(far, _)| far.into_split().0))
            }
        };
        let (first, mut first_out) = mpsc::unbounded_channel();
        let (coordinator, reader) = accept(first.clone()).await;
        let (coordinator, reader) = (coordinator.unwrap(), reader.unwrap());
        // Registered once the handshake is done, before anything else runs.
        assert!(lanes.lock().unwrap()["lane-1"].same_channel(&first));
        let serving = answer_lane(&lanes, &last, reader, first.clone());
        let check = async {
            // A second lane of the same id is refused in its handshake.
            let (second, _second_out) = mpsc::unbounded_channel();
            let (refused, _) = accept(second).await;
            let refused = refused
                .err()
                .expect("a second answer lane of an id")
                .to_string();
            assert!(refused.contains("already"), "{refused}");
            assert!(lanes.lock().unwrap()["lane-1"].same_channel(&first));
            drop(coordinator); // the coordinator closes its answer lane
        };
        tokio::join!(serving, check);
        assert!(lanes.lock().unwrap().is_empty());
        assert!(first_out.try_recv().is_err(), "a clean close is no error");
    }
}
