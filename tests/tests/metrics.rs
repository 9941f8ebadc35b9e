//! Prometheus metrics on the coordinator and on a node (`--metrics-listen`), after real
//! completions through a 4-stage swarm, read by an independent parser (the `prometheus_client`
//! Python package's OpenMetrics parser): the names a dashboard uses exist and count what
//! happened.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use tests::api::{read_stream, send};
use tests::{node_as_given, swarm_lock, Bed};

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

/// What a node's `/status` entry must say of its decode threads.
struct Expected {
    /// `measured` or `flags`.
    by: &'static str,
    /// The policies it measured.
    measured: &'static [&'static str],
    /// The policy and threads its flags fixed.
    fixed: Option<(&'static str, u64)>,
}

impl Expected {
    fn measured(policies: &'static [&'static str]) -> Expected {
        Expected {
            by: "measured",
            measured: policies,
            fixed: None,
        }
    }

    fn fixed(policy: &'static str, threads: u64) -> Expected {
        Expected {
            by: "flags",
            measured: &[],
            fixed: Some((policy, threads)),
        }
    }
}

#[test]
fn coordinator_and_node_metrics_count_the_served_requests() {
    let _one = swarm_lock();
    let bed = Bed::new(4, &[]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "4"]);
    let addr = c.field("http").to_owned();
    // Each node's decode threads settled another way: n0 measures all three policies, n1 has
    // them fixed by both flags, n2 measures one thread against a pinned team (`--pin-threads`
    // fixes the team's kind), n3 is fixed to one thread (`--threads 1`, as in every other
    // swarm test).
    let settings: [&[&str]; 4] = [
        &[],
        &["--threads", "2", "--pin-threads", "false"],
        &["--pin-threads", "true"],
        &["--threads", "1"],
    ];
    let nodes: Vec<_> = bed
        .node_dirs(4)
        .iter()
        .zip(settings)
        .map(|((name, dir), threads)| {
            let mut extra = vec!["--metrics-listen", "127.0.0.1:0"];
            extra.extend(threads);
            node_as_given(name, &addr, dir, &extra)
        })
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
        .filter(|p| {
            p.file_name()
                .and_then(|n| torrents::split::parse_shard_file_name(n.to_str()?))
                .is_some()
        })
        .map(|p| p.metadata().unwrap().len())
        .sum();
    assert!(fetched >= size as f64, "fetched {fetched} of {size} bytes");
    // The seeder's, read by the same parser: every shard's bytes went out from it.
    let seeded = parse(&scrape(&format!(
        "http://{}/metrics",
        bed.seeder.field("http")
    )));
    // The four shards and the vocabulary file.
    assert_eq!(value(&seeded, "shardswarm_seeder_files", &[]), 5.0);
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

    // Each node's decode-thread policy, as /status shows it, as the node's log says it, and as
    // its metrics label it: measured where the settings left a choice, fixed where they did not.
    let status: Value = reqwest::blocking::get(format!("http://{addr}/status"))
        .unwrap()
        .json()
        .unwrap();
    let decode_of = |name: &str| -> Value {
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not in /status: {status}"))["decode"]
            .clone()
    };
    let expected = [
        Expected::measured(&["one", "team", "team-pinned"]),
        Expected::fixed("team", 2),
        Expected::measured(&["one", "team-pinned"]),
        Expected::fixed("one", 1),
    ];
    let mut chosen = Vec::new();
    for (i, (n, e)) in nodes.iter().zip(expected).enumerate() {
        let (by, measured, fixed) = (e.by, e.measured, e.fixed);
        let d = decode_of(&format!("n{i}"));
        assert_eq!(d["chosen_by"], by, "n{i}: {d}");
        let times = d["measured_ms"].as_object().cloned().unwrap_or_default();
        let names: Vec<&str> = times.keys().map(String::as_str).collect();
        assert_eq!(names, measured, "n{i}: {d}");
        let policy = d["policy"].as_str().unwrap().to_owned();
        if let Some((fixed_policy, threads)) = fixed {
            assert_eq!(policy, fixed_policy, "n{i}: {d}");
            assert_eq!(d["threads"], threads, "n{i}: {d}");
        } else {
            // The fastest of what was measured.
            let best = times
                .iter()
                .min_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
                .unwrap();
            assert_eq!(&policy, best.0, "n{i}: {d}");
            assert!(times.values().all(|ms| ms.as_f64().unwrap() > 0.0), "{d}");
        }
        if policy == "team-pinned" {
            assert_eq!(d["cpus"].as_array().unwrap().len(), 2, "{d}");
        }
        assert!(
            n.stderr_text()
                .contains(&format!("decode threads: {policy} (")),
            "n{i} does not log its choice"
        );
        chosen.push((policy, by, times));
    }

    // Every node runs one stage here, and fetched its shard.
    let mut stages = Vec::new();
    for (n, (policy, by, times)) in nodes.iter().zip(&chosen) {
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
        let labels = [("policy", policy.as_str()), ("chosen_by", *by)];
        assert!(value(&m, "shardswarm_node_decode_threads", &labels) >= 1.0);
        for (measured, ms) in times {
            let seconds = value(
                &m,
                "shardswarm_node_decode_measured_seconds",
                &[("policy", measured)],
            );
            assert!((seconds * 1e3 - ms.as_f64().unwrap()).abs() < 1e-6);
        }
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
