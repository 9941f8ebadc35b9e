//! Prometheus metrics read at scrape time: a service collects its numbers when `/metrics` is
//! asked for (from the state it already keeps, so they cannot drift from it) and
//! prometheus-client encodes them, escaping included.

pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::DescriptorEncoder;
pub use prometheus_client::metrics::counter::ConstCounter;
pub use prometheus_client::metrics::gauge::ConstGauge;
pub use prometheus_client::registry::Unit;

use prometheus_client::encoding::EncodeMetric;

/// The OpenMetrics content type every `/metrics` answers with.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A `/metrics` answer: the encoded text with its content type.
pub fn answer(text: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// Samples of one family: labels and a value.
pub type Samples<'a, V> = [(Vec<(&'a str, String)>, V)];

/// Encode a family of constant samples, each made by `metric` (`ConstGauge::new` or
/// `ConstCounter::new`).
pub fn family<V: Copy + Default, M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    metric: fn(V) -> M,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: &Samples<V>,
) -> std::fmt::Result {
    let mut f = e.encode_descriptor(name, help, unit, metric(V::default()).metric_type())?;
    // One sample without labels: `name 3`, not `name{} 3`.
    if let [(labels, value)] = samples {
        if labels.is_empty() {
            return metric(*value).encode(f);
        }
    }
    for (labels, value) in samples {
        metric(*value).encode(f.encode_family(labels)?)?;
    }
    Ok(())
}

/// Encode what one collector gives under the `prefix` (e.g. `shardswarm`).
pub fn encode_collected(prefix: &str, collector: impl Collector) -> String {
    let mut registry = prometheus_client::registry::Registry::with_prefix(prefix);
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}
