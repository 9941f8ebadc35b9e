//! Prometheus metrics of the coordinator (`GET /metrics`, OpenMetrics text): what an operator
//! graphs and alerts on. Per-request measurements (requests, tokens, time to first token,
//! time between tokens) are recorded here as they happen; the swarm's state is read at each
//! scrape by a collector the server registers ([`crate::status::SwarmCollector`]), so it can
//! never drift from `/status`.

use prometheus_client::collector::Collector;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

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

/// The `/metrics` registry: the live measurements, and `state`, which reads the rest at each
/// scrape.
pub fn registry(live: &Live, state: Box<dyn Collector>) -> Registry {
    let mut r = Registry::with_prefix("shardswarm");
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
    r.register_collector(state);
    r
}

/// The OpenMetrics text of everything in `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
