//! Prometheus metrics of a node (`--metrics-listen ADDR`, `GET /metrics`, OpenMetrics text):
//! its stage's compute time per step, the rows it computed, how its decodes use threads (and
//! what each way measured), and the shard bytes it fetched from the seeder and other nodes.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

type Labels = Vec<(&'static str, String)>;

/// What a node measures, and the registry that shows it.
pub struct NodeMetrics {
    /// One pipeline step's compute in this node's stage.
    pub stage_compute: Histogram,
    /// Rows (prompt tokens and generated tokens) the stage computed.
    pub rows: Counter,
    /// Shard bytes fetched this session, by shard and source (`seeder`, `peers`).
    pub fetched: Family<Labels, Gauge>,
    /// The stage this node runs (-1: none).
    pub stage: Gauge,
    /// Steps this (last) stage answered, by the way the answer went: `coordinator` (straight
    /// back, on the coordinator's answer lane) or `chain` (up the lanes, stage by stage).
    pub answers: Family<Labels, Counter>,
    /// The stage's decode-thread policy: one series, labelled with the policy and how it was
    /// chosen, whose value is its most threads.
    pub decode_threads: Family<Labels, Gauge>,
    /// Seconds per decode of the stage under each policy measured when it loaded.
    pub decode_measured: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    registry: Registry,
}

impl Default for NodeMetrics {
    fn default() -> NodeMetrics {
        // 100 µs .. 1.6 s.
        let stage_compute = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        let (rows, fetched, stage) = (Counter::default(), Family::default(), Gauge::default());
        stage.set(-1);
        let mut r = Registry::with_prefix("shardswarm_node");
        r.register_with_unit(
            "stage_compute",
            "One pipeline step's compute in this node's stage",
            Unit::Seconds,
            stage_compute.clone(),
        );
        r.register("rows", "Rows (tokens) the stage computed", rows.clone());
        r.register_with_unit(
            "fetched",
            "Shard bytes fetched this session, by shard and source",
            Unit::Bytes,
            fetched.clone(),
        );
        r.register(
            "stage",
            "The stage this node runs (-1: none)",
            stage.clone(),
        );
        let answers = Family::<Labels, Counter>::default();
        for way in ["coordinator", "chain"] {
            let _ = answers.get_or_create(&vec![("way", way.to_owned())]);
        }
        r.register(
            "answers",
            "Steps this last stage answered, by the way the answer went",
            answers.clone(),
        );
        let decode_threads = Family::<Labels, Gauge>::default();
        r.register(
            "decode_threads",
            "The stage's decode-thread policy (labels) and its most threads (value)",
            decode_threads.clone(),
        );
        let decode_measured = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        r.register_with_unit(
            "decode_measured",
            "Time per decode of the stage under each policy, measured when it loaded",
            Unit::Seconds,
            decode_measured.clone(),
        );
        NodeMetrics {
            stage_compute,
            rows,
            fetched,
            stage,
            answers,
            decode_threads,
            decode_measured,
            registry: r,
        }
    }
}

impl NodeMetrics {
    /// Record a shard's fetch progress.
    pub fn fetch_progress(&self, shard: u32, from_seeder: u64, from_peers: u64) {
        for (source, bytes) in [("seeder", from_seeder), ("peers", from_peers)] {
            let labels = vec![("shard", shard.to_string()), ("source", source.to_owned())];
            self.fetched
                .get_or_create(&labels)
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// Count an answer that went `way` (`coordinator` or `chain`).
    pub fn answered(&self, way: &'static str) {
        self.answers
            .get_or_create(&vec![("way", way.to_owned())])
            .inc();
    }

    /// Show the stage's decode-thread policy and what was measured (replacing an older stage's).
    pub fn decode_threads(&self, d: &protocol::DecodeThreads) {
        self.decode_threads.clear();
        self.decode_threads
            .get_or_create(&vec![
                ("policy", d.policy.clone()),
                ("chosen_by", d.chosen_by.clone()),
            ])
            .set(i64::from(d.threads));
        self.decode_measured.clear();
        for (policy, ms) in &d.measured_ms {
            self.decode_measured
                .get_or_create(&vec![("policy", policy.clone())])
                .set(ms / 1e3);
        }
    }

    /// The OpenMetrics text of everything.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serve `GET /metrics` on `listener` until `stop`.
pub fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<NodeMetrics>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), daemon::IoError> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move { daemon::metrics::answer(metrics.encode()) }
        }),
    );
    daemon::serve_http(listener, app, stop, daemon::HttpLimits::default(), None).map(|_| ())
}
