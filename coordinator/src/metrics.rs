//! Prometheus metrics of the coordinator (`GET /metrics`, OpenMetrics text): what an operator
//! graphs and alerts on. Per-request measurements (requests, tokens, time to first token,
//! time between tokens) are recorded as they happen; the swarm's state (nodes, shard
//! coverage, bytes by source, queue, each stage's compute time) is read at each scrape, so
//! it can never drift from `/status`.

use std::sync::{Arc, OnceLock, Weak};

use daemon::metrics::family;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::hub::Hub;

/// Labels of one HTTP answer: the route and the status code.
type RequestLabels = Vec<(&'static str, String)>;

/// The measurements taken as requests are served.
#[derive(Debug)]
pub struct Live {
    pub requests: Family<RequestLabels, Counter>,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    /// From a request's arrival to its first generated token.
    pub time_to_first_token: Histogram,
    /// Between two generated tokens of one request.
    pub inter_token: Histogram,
}

impl Default for Live {
    fn default() -> Live {
        Live {
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            completion_tokens: Counter::default(),
            // 5 ms .. 41 s, and 1 ms .. 8 s.
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            inter_token: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
        }
    }
}

/// The registry, made once the hub exists (its state is read at each scrape).
pub struct Metrics {
    pub live: Arc<Live>,
    registry: OnceLock<Registry>,
}

impl Metrics {
    /// Metrics over these live measurements; [`Metrics::init`] registers them.
    pub fn new(live: Arc<Live>) -> Metrics {
        Metrics {
            live,
            registry: OnceLock::new(),
        }
    }

    /// Register everything; the swarm's state is read through `hub` while it lives.
    pub fn init(&self, hub: Weak<Hub>) {
        let mut r = Registry::with_prefix("shardswarm");
        let live = &self.live;
        r.register(
            "http_requests",
            "API requests answered, by route and status code",
            live.requests.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of served requests",
            live.prompt_tokens.clone(),
        );
        r.register(
            "completion_tokens",
            "Tokens generated",
            live.completion_tokens.clone(),
        );
        r.register_with_unit(
            "time_to_first_token",
            "From a request's arrival to its first generated token",
            Unit::Seconds,
            live.time_to_first_token.clone(),
        );
        r.register_with_unit(
            "inter_token",
            "Between two generated tokens of one request",
            Unit::Seconds,
            live.inter_token.clone(),
        );
        r.register_collector(Box::new(SwarmState(hub)));
        let _ = self.registry.set(r);
    }

    /// The OpenMetrics text of everything.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Some(r) = self.registry.get() {
            let _ = prometheus_client::encoding::text::encode(&mut out, r);
        }
        out
    }
}

/// The swarm's state at scrape time.
struct SwarmState(Weak<Hub>);

impl std::fmt::Debug for SwarmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SwarmState")
    }
}

impl Collector for SwarmState {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let Some(hub) = self.0.upgrade() else {
            return Ok(());
        };
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
        if let Some(engine) = &hub.engine {
            let stats = engine.stats.lock().unwrap().clone();
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
