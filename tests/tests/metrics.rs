//! Prometheus metrics on the coordinator and on a node (`--metrics-listen`), after real
//! completions through a 4-stage swarm, read by an independent parser (the `prometheus_client`
//! Python package's OpenMetrics parser): the names a dashboard uses exist and count what
//! happened.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use tests::api::{read_stream, send};
use tests::{node, swarm_lock, Bed};

/// Parse OpenMetrics text with the Python parser: its samples.
fn parse(text: &str) -> Vec<Value> {
    let mut child = Command::new(tests::python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/parse_metrics.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The sum of the samples named `name` whose labels include `labels`.
fn value(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<&Value> = samples
        .iter()
        .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .collect();
    assert!(!matching.is_empty(), "no sample {name} {labels:?}");
    matching.iter().map(|s| s["value"].as_f64().unwrap()).sum()
}

fn scrape(url: &str) -> String {
    let r = reqwest::blocking::get(url).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let kind = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    r.text().unwrap()
}

#[test]
fn coordinator_and_node_metrics_count_the_served_requests() {
    let _one = swarm_lock();
    let bed = Bed::new(4, &[]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "4"]);
    let addr = c.field("http").to_owned();
    let nodes: Vec<_> = bed
        .node_dirs(4)
        .iter()
        .map(|(name, dir)| node(name, &addr, dir, &["--metrics-listen", "127.0.0.1:0"]))
        .collect();
    // Waited for as an operator would, with `shard_loader watch` (plain lines: no terminal).
    let watch = Command::new(tests::bin("shard_loader", "shard_loader"))
        .args([
            "watch",
            "--coordinator",
            &format!("http://{addr}"),
            "--until",
            "serving",
            "--timeout",
            "180",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&watch.stderr);
    assert!(watch.status.success(), "{said}");
    assert!(
        said.contains("4 node(s): n0 ") && said.contains("serving after"),
        "{said}"
    );
    let max_tokens = 12;
    for _ in 0..2 {
        let r = send(
            &addr,
            "/v1/completions",
            &json!({"prompt": "Count: one, two,", "max_tokens": max_tokens, "temperature": 0,
                    "stream": true, "model": "anything"}),
        );
        let mut pieces = 0;
        read_stream(r, |_| pieces += 1);
        assert!(pieces > 0);
    }

    let m = parse(&scrape(&format!("http://{addr}/metrics")));
    let mut names: std::collections::BTreeSet<String> = m
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(value(&m, "shardswarm_nodes", &[]), 4.0);
    assert_eq!(value(&m, "shardswarm_ready", &[]), 1.0);
    assert_eq!(value(&m, "shardswarm_serving", &[]), 1.0);
    for shard in ["0", "1", "2", "3"] {
        assert!(value(&m, "shardswarm_shard_holders", &[("shard", shard)]) >= 1.0);
    }
    let fetched = value(&m, "shardswarm_fetched_bytes", &[]);
    let size: u64 = std::fs::read_dir(bed.seed.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .map(|p| p.metadata().unwrap().len())
        .sum();
    assert!(fetched >= size as f64, "fetched {fetched} of {size} bytes");
    // The seeder's, read by the same parser: every shard's bytes went out from it.
    let seeded = parse(&scrape(&format!(
        "http://{}/metrics",
        bed.seeder.field("http")
    )));
    assert_eq!(value(&seeded, "shardswarm_seeder_files", &[]), 4.0);
    let uploaded = value(&seeded, "shardswarm_seeder_uploaded_bytes_total", &[]);
    assert!(
        uploaded >= size as f64,
        "the seeder sent {uploaded} of {size} bytes"
    );
    let generated = value(&m, "shardswarm_completion_tokens_total", &[]);
    assert_eq!(
        generated,
        2.0 * f64::from(max_tokens),
        "every request ran to max_tokens"
    );
    assert!(value(&m, "shardswarm_prompt_tokens_total", &[]) >= 2.0);
    assert_eq!(
        value(&m, "shardswarm_time_to_first_token_seconds_count", &[]),
        2.0
    );
    assert_eq!(
        value(&m, "shardswarm_inter_token_seconds_count", &[]),
        generated - 2.0
    );
    assert!(value(&m, "shardswarm_time_to_first_token_seconds_sum", &[]) > 0.0);
    let ok = [("route", "/v1/completions"), ("code", "200")];
    assert_eq!(value(&m, "shardswarm_http_requests_total", &ok), 2.0);
    assert_eq!(value(&m, "shardswarm_queue_depth", &[]), 0.0);
    for stage in ["0", "1", "2", "3"] {
        assert!(
            value(
                &m,
                "shardswarm_stage_compute_seconds_total",
                &[("stage", stage)]
            ) > 0.0
        );
    }

    // Every node runs one stage here, and fetched its shard.
    let mut stages = Vec::new();
    for n in &nodes {
        let at = n
            .stdout_lines()
            .iter()
            .find_map(|l| l.strip_prefix("[METRICS] http=").map(str::to_owned))
            .expect("a node with --metrics-listen prints [METRICS]");
        let m = parse(&scrape(&format!("http://{at}/metrics")));
        names.extend(m.iter().map(|s| s["name"].as_str().unwrap().to_owned()));
        stages.push(value(&m, "shardswarm_node_stage", &[]) as i64);
        assert!(
            value(&m, "shardswarm_node_stage_compute_seconds_count", &[])
                >= 2.0 * f64::from(max_tokens)
        );
        assert!(value(&m, "shardswarm_node_rows_total", &[]) >= 2.0 * f64::from(max_tokens));
        assert!(value(&m, "shardswarm_node_fetched_bytes", &[]) > 0.0);
        // The last stage answers every step straight to the coordinator, on its answer lane;
        // nothing comes back up the chain, and other stages answer nothing.
        let answers = |way| value(&m, "shardswarm_node_answers_total", &[("way", way)]);
        if stages.last() == Some(&3) {
            assert!(answers("coordinator") >= 2.0 * f64::from(max_tokens));
        } else {
            assert_eq!(answers("coordinator"), 0.0);
        }
        assert_eq!(answers("chain"), 0.0);
    }
    stages.sort();
    assert_eq!(stages, [0, 1, 2, 3]);

    // The Grafana dashboard in deploy/ graphs only series that exist.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/shardswarm.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut used = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("shardswarm_") {
                    assert!(
                        names.contains(word),
                        "the dashboard's {word} is not served: {names:?}"
                    );
                    used += 1;
                }
            }
        }
    }
    assert!(used >= 12, "{used}");
}
