//! What `/status`, the dashboard and `/metrics` read off the hub: the typed status document
//! and the collector that reads the swarm's state at each scrape.

use std::sync::Arc;

use daemon::metrics::family;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;
use protocol::status::Status;

use crate::hub::Hub;

/// The `/status` document: the swarm, the serving and the checks.
pub fn full_status(hub: &Hub) -> Status {
    let batching = hub
        .engine()
        .map(|engine| engine.stats.lock().unwrap().counts.clone());
    let verify = hub.verify_stats.lock().unwrap().shown.clone();
    let mut status = hub.swarm.lock().unwrap().status(batching, verify);
    // The coordinator's own hops: to stage 0, and the answer lane to the last stage.
    if let (Some(route), Some(engine)) = (status.route.as_mut(), hub.engine()) {
        use crate::engine::OwnEdges;
        let seen = engine.edges.lock().unwrap();
        let several = route.len() > 1;
        if let Some(first) = route.first_mut() {
            first.edge = OwnEdges::edge_to(&seen.first, &first.node_id);
        }
        if let (true, Some(last)) = (several, route.last_mut()) {
            last.answers_edge = OwnEdges::edge_to(&seen.answers, &last.node_id);
        }
    }
    status
}

/// Samples of one family, owned.
type Labelled = Vec<(Vec<(&'static str, String)>, f64)>;

/// The route's measured edges as `/status` shows them: (kind per hop, RTT per mesh hop).
fn route_edges(hub: &Hub) -> (Labelled, Labelled) {
    let route = full_status(hub).route.unwrap_or_default();
    let hops = route.iter().enumerate().flat_map(|(k, stage)| {
        [("chain", stage.edge), ("answers", stage.answers_edge)]
            .into_iter()
            .filter_map(move |(lane, edge)| Some((k, lane, edge?)))
    });
    let (mut kinds, mut rtts) = (Vec::new(), Vec::new());
    for (k, lane, edge) in hops {
        let labels = vec![
            ("stage", k.to_string()),
            ("lane", lane.to_owned()),
            ("kind", edge.kind.as_str().to_owned()),
        ];
        if let Some(us) = edge.rtt_us {
            rtts.push((labels.clone(), us as f64 / 1e6));
        }
        kinds.push((labels, 1.0));
    }
    (kinds, rtts)
}

/// The swarm's state at scrape time.
pub struct SwarmCollector(pub Arc<Hub>);

impl std::fmt::Debug for SwarmCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SwarmCollector")
    }
}

impl Collector for SwarmCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let hub = &self.0;
        let one = |v: f64| vec![(Vec::new(), v)];
        let (nodes, ready, serving, coverage, bytes) = {
            let swarm = hub.swarm.lock().unwrap();
            let coverage: Vec<_> = (0..swarm.shards.len() as u32)
                .map(|id| (vec![("shard", id.to_string())], swarm.holders(id) as f64))
                .collect();
            let (seeder, peers) = swarm.fetched_bytes();
            (
                swarm.nodes.len(),
                swarm.ready,
                swarm.serving_route().is_some(),
                coverage,
                [
                    (vec![("source", "seeder".to_owned())], seeder as f64),
                    (vec![("source", "peers".to_owned())], peers as f64),
                ],
            )
        };
        family(
            &mut e,
            ConstGauge::new,
            "nodes",
            "Registered nodes",
            None,
            &one(nodes as f64),
        )?;
        family(
            &mut e,
            ConstGauge::new,
            "ready",
            "1 while every shard is loaded on enough nodes",
            None,
            &one(f64::from(u8::from(ready))),
        )?;
        family(
            &mut e,
            ConstGauge::new,
            "serving",
            "1 while the route serves requests",
            None,
            &one(f64::from(u8::from(serving))),
        )?;
        family(
            &mut e,
            ConstGauge::new,
            "shard_holders",
            "Nodes with the shard loaded",
            None,
            &coverage,
        )?;
        family(
            &mut e,
            ConstGauge::new,
            "fetched",
            "Shard bytes the registered nodes fetched, by source",
            Some(&Unit::Bytes),
            &bytes,
        )?;
        let (kinds, rtts) = route_edges(hub);
        family(
            &mut e,
            ConstGauge::new,
            "route_edge",
            "1 for each hop of the route, labelled with how it runs (tcp, direct, holepunched, relayed): lane chain is the hop into the stage (from the coordinator for stage 0), lane answers the coordinator's answer lane to the last stage",
            None,
            &kinds,
        )?;
        family(
            &mut e,
            ConstGauge::new,
            "route_edge_rtt",
            "Each mesh hop's round-trip time as last measured",
            Some(&Unit::Seconds),
            &rtts,
        )?;
        if let Some(engine) = hub.engine() {
            let stats = engine.stats.lock().unwrap().counts.clone();
            family(
                &mut e,
                ConstGauge::new,
                "running_requests",
                "Requests in a slot",
                None,
                &one(stats.running as f64),
            )?;
            family(
                &mut e,
                ConstGauge::new,
                "queue_depth",
                "Requests waiting for a slot",
                None,
                &one(stats.waiting as f64),
            )?;
            family(
                &mut e,
                ConstCounter::new,
                "steps",
                "Pipeline steps",
                None,
                &one(stats.steps as f64),
            )?;
            family(
                &mut e,
                ConstCounter::new,
                "cached_prompt_tokens",
                "Prompt tokens served from the prompt cache",
                None,
                &one(stats.cached_prompt_tokens as f64),
            )?;
            let busy: Vec<_> = stats
                .stage_busy_seconds
                .iter()
                .enumerate()
                .map(|(k, s)| (vec![("stage", k.to_string())], *s))
                .collect();
            family(
                &mut e,
                ConstCounter::new,
                "stage_compute",
                "Each stage's compute time",
                Some(&Unit::Seconds),
                &busy,
            )?;
        }
        Ok(())
    }
}
