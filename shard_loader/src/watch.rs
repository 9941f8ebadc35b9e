//! `shard_loader watch`: follow a swarm filling up, from the coordinator's `/status`: a bar per
//! node (bytes of its shards on disk out of their size) on a terminal, a line every few seconds
//! otherwise; done when the swarm is ready or serving.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use protocol::status::{Holding, Status};

/// What to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Until {
    /// Every shard loaded on enough nodes (`SWARM_READY`).
    Ready,
    /// The pipeline answers requests (every stage loaded in llama.cpp).
    Serving,
}

/// Per node: (name, bytes held, bytes to hold).
fn node_bytes(status: &Status) -> Vec<(String, u64, u64)> {
    let size = |shard: u32| -> u64 {
        status
            .shards
            .iter()
            .find(|s| s.shard_id == shard)
            .map_or(0, |s| s.size)
    };
    let mut nodes: Vec<_> = status
        .nodes
        .iter()
        .map(|n| {
            let (mut done, mut total) = (0, 0);
            for (shard, held) in &n.shards {
                let (held_bytes, whole) = match held {
                    Holding::Fetching { bytes, total, .. } => (*bytes, *total),
                    Holding::Loaded { .. } => (size(*shard), size(*shard)),
                    Holding::Waiting | Holding::Failed { .. } => (0, size(*shard)),
                };
                total += whole;
                done += held_bytes;
            }
            (n.name.clone(), done, total)
        })
        .collect();
    nodes.sort();
    nodes
}

/// Poll `url`/status until `until` holds (or `timeout` passes: an error).
pub fn watch(
    url: &str,
    (api_key, ca): (Option<&str>, Option<&std::path::Path>),
    until: Until,
    timeout: Duration,
) -> Result<()> {
    let mut client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("--ca {}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("--ca {}: not a PEM certificate", ca.display()))?;
        client = client.add_root_certificate(cert);
    }
    let client = client.build()?;
    let url = format!("{}/status", url.trim_end_matches('/'));
    let tty = std::io::stderr().is_terminal();
    let bars = MultiProgress::new();
    let mut by_name: std::collections::BTreeMap<String, ProgressBar> = Default::default();
    let style =
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("a valid template")
            .progress_chars("=> ");
    let started = Instant::now();
    let mut last_line = None::<Instant>;
    loop {
        let mut request = client.get(&url);
        if let Some(key) = api_key {
            request = request.bearer_auth(key);
        }
        let status: Result<Status, reqwest::Error> = request
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json());
        if let Ok(s) = &status {
            let nodes = node_bytes(s);
            if tty {
                for (name, done, total) in &nodes {
                    let bar = by_name.entry(name.clone()).or_insert_with(|| {
                        bars.add(
                            ProgressBar::new(0)
                                .with_style(style.clone())
                                .with_message(name.clone()),
                        )
                    });
                    bar.set_length(*total);
                    bar.set_position(*done);
                }
            } else if last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
                last_line = Some(Instant::now());
                let parts: Vec<String> = nodes
                    .iter()
                    .map(|(name, done, total)| {
                        format!(
                            "{name} {:.0}%",
                            100.0 * *done as f64 / (*total).max(1) as f64
                        )
                    })
                    .collect();
                eprintln!(
                    "{} node(s): {} (ready: {}, serving: {})",
                    nodes.len(),
                    parts.join(", "),
                    s.ready,
                    s.serving
                );
            }
            let done = match until {
                Until::Ready => s.ready,
                Until::Serving => s.serving,
            };
            if done {
                for bar in by_name.values() {
                    bar.finish();
                }
                eprintln!(
                    "{} after {:.1} s",
                    if until == Until::Ready {
                        "ready"
                    } else {
                        "serving"
                    },
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
        }
        if started.elapsed() > timeout {
            let said = match status {
                Ok(s) => format!("ready: {}, serving: {}", s.ready, s.serving),
                Err(e) => format!("{url} did not answer: {e}"),
            };
            bail!("not {until:?} after {timeout:?} ({said})");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The API key from the flag or `$SHARDSWARM_API_KEY`.
pub fn api_key(flag: Option<String>) -> Option<String> {
    flag.or_else(|| std::env::var("SHARDSWARM_API_KEY").ok())
        .filter(|k| !k.is_empty())
}

/// `anyhow` context for a URL.
pub fn check_url(url: &str) -> Result<()> {
    reqwest::Url::parse(url)
        .map(|_| ())
        .with_context(|| format!("--coordinator {url}: not a URL (http://HOST:PORT)"))
}
