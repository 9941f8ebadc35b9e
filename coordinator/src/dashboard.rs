//! The dashboard at `/`: the swarm for a person to look at (nodes, the shard each holds with
//! its progress and where its bytes came from, how its decodes use threads, the route,
//! readiness, tokens/s) and a chat with the model. Plain HTML and a little JS served by the
//! binary, no build step.
//!
//! One renderer: the live part is HTML made here from the `/status` document. `/` embeds it
//! (so the page shows the swarm without running a script, or before its first update), and the
//! page's script fetches `/dashboard` every second and swaps it in. Where API keys are set,
//! `/` embeds nothing and `/dashboard` needs the key, which the page asks for.

use std::fmt::Write as _;

use protocol::status::{Holding, Status};

/// The page: `{{LIVE}}` is the live part, `{{MODEL}}` the model id.
const PAGE: &str = include_str!("dashboard.html");

/// The whole page, with the live part when it may be shown without a key.
pub fn page(status: Option<&Status>, model: &str) -> String {
    let live = match status {
        Some(s) => live(s),
        None => {
            "<p id=\"readiness\" class=\"locked\">enter the API key to see the swarm</p>".into()
        }
    };
    PAGE.replace("{{MODEL}}", &escape(model))
        .replace("{{LIVE}}", &live)
}

/// The live part from a `/status` document.
pub fn live(s: &Status) -> String {
    let mut h = String::new();
    let names: std::collections::BTreeMap<&str, &str> = s
        .nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.name.as_str()))
        .collect();
    let name_of = |id: &str| names.get(id).copied().unwrap_or(id).to_owned();
    let generated = s.batching.as_ref().map_or(0, |b| b.generated_tokens);
    let _ = write!(
        h,
        "<div class=\"summary\" data-generated=\"{generated}\"><span id=\"readiness\" class=\"{}\">{}</span> \
         <span>{} node(s), at least {} needed</span> <span>{} of {} shards loaded</span> \
         <span>{}</span> <span>tokens/s: <b id=\"tps\">–</b></span></div>",
        if s.ready { "ready" } else { "waiting" },
        if s.ready { "ready" } else { "not ready" },
        s.nodes.len(),
        s.min_nodes,
        s.shards_loaded,
        s.shards.len(),
        if s.serving { "serving" } else { "not serving yet" },
    );
    h.push_str("<h2>Nodes</h2><table id=\"nodes\"><thead><tr><th>node</th><th>stage</th><th>shards</th><th>bytes from</th><th>heartbeat</th></tr></thead><tbody>");
    let mut rows: Vec<_> = s.nodes.iter().collect();
    rows.sort_by_key(|n| (&n.name, &n.node_id));
    for n in rows {
        let mut shards_cell = String::new();
        for (shard, held) in &n.shards {
            let state = match held {
                Holding::Waiting => "waiting",
                Holding::Fetching { .. } => "fetching",
                Holding::Loaded { .. } => "loaded",
                Holding::Failed { .. } => "failed",
            };
            let progress = match held {
                Holding::Fetching { bytes, total, .. } if *total > 0 => format!(
                    " <progress value=\"{bytes}\" max=\"{total}\"></progress> {:.0}%",
                    100.0 * *bytes as f64 / *total as f64
                ),
                _ => String::new(),
            };
            let _ = write!(
                shards_cell,
                "<div>shard {shard} <span class=\"{state}\">{state}</span>{progress}</div>",
            );
        }
        let mut sources = String::new();
        for (shard, from) in &n.fetched_from {
            let parts: Vec<String> = from
                .iter()
                .map(|(src, bytes)| {
                    let src = if src == "seeder" {
                        src.clone()
                    } else {
                        name_of(src)
                    };
                    format!("{} {}", escape(&src), mib(*bytes))
                })
                .collect();
            let _ = write!(sources, "<div>shard {shard}: {}</div>", parts.join(", "));
        }
        // How the stage's decodes use threads, and how that was settled.
        let decode = match &n.decode {
            Some(d) => format!(
                "<br><small class=\"decode\">{} ×{} ({})</small>",
                escape(&d.policy),
                d.threads,
                escape(&d.chosen_by)
            ),
            None => String::new(),
        };
        let _ = write!(
            h,
            "<tr class=\"node\"><td><b>{}</b><br><small>{}</small></td><td>{}{decode}</td><td>{shards_cell}</td><td>{sources}</td><td>{:.0} s ago</td></tr>",
            escape(&n.name),
            escape(&n.node_id.chars().take(8).collect::<String>()),
            n.stage.map_or("–".into(), |k| k.to_string()),
            n.last_heartbeat_secs_ago,
        );
    }
    h.push_str("</tbody></table><h2>Route</h2><ol id=\"route\">");
    match &s.route {
        Some(route) => {
            for hop in route {
                let answers = match hop.answers_edge {
                    Some(e) => format!("; answers {}", edge_text(e)),
                    None => String::new(),
                };
                let _ = write!(
                    h,
                    "<li>shard {} on <b>{}</b> <small>{}</small> <small class=\"edge\">{}{answers}</small></li>",
                    hop.shard_id,
                    escape(&name_of(&hop.node_id)),
                    escape(&hop.data_addr),
                    hop.edge.map_or("reached: not measured yet".into(), |e| format!("reached {}", edge_text(e))),
                );
            }
        }
        None => h.push_str("<li>none yet: the route forms once the swarm is ready</li>"),
    }
    h.push_str("</ol>");
    if let Some(b) = &s.batching {
        let busy: Vec<String> = b
            .stage_busy_fraction
            .iter()
            .map(|f| format!("{:.0}%", 100.0 * f))
            .collect();
        let _ = write!(
            h,
            "<p class=\"serving\">requests running {}, waiting {}; tokens generated {generated}; stage busy {}</p>",
            b.running, b.waiting, busy.join(" ")
        );
    }
    if !s.evicted.is_empty() {
        let ids: Vec<String> = s.evicted.keys().map(|k| escape(k)).collect();
        let _ = write!(h, "<p class=\"evicted\">evicted: {}</p>", ids.join(", "));
    }
    h
}

/// A hop's kind and round-trip time: `holepunched, 12.3 ms`.
fn edge_text(edge: protocol::status::Edge) -> String {
    let kind = edge.kind.as_str();
    match edge.rtt_us {
        Some(us) => format!("{kind}, {:.1} ms", us as f64 / 1000.0),
        None => kind.to_owned(),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Text as HTML: node names and ids come from the nodes themselves.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/status` document from JSON: the fields a test sets over an empty swarm's.
    fn status(fields: serde_json::Value) -> Status {
        let mut doc = serde_json::json!({
            "ready": false, "min_nodes": 1, "model_sha256": "", "split_id": "", "shards": [],
            "shards_loaded": 0, "nodes": [], "placement": {},
            "bytes": {"from_seeder": 0, "from_peers": 0}, "route": null, "serving": false,
            "evicted": {}, "verify": protocol::status::Verify::default(),
        });
        let node = serde_json::json!({
            "peer_addr": "127.0.0.1:1", "data_addr": null, "last_heartbeat_secs_ago": 0.0,
            "capacity": {"ram_bytes": 0, "disk_free_bytes": 0, "threads": 1},
            "fetched_from": {}, "stage": null,
        });
        for (k, v) in fields.as_object().unwrap() {
            doc[k] = v.clone();
        }
        for n in doc["nodes"].as_array_mut().unwrap() {
            for (k, v) in node.as_object().unwrap() {
                if n.get(k).is_none() {
                    n[k] = v.clone();
                }
            }
        }
        serde_json::from_value(doc).expect("a /status document")
    }

    fn shard() -> serde_json::Value {
        serde_json::json!({"shard_id": 0, "file": "shard-0.gguf", "size": 1, "sha256": "",
                           "info_hash": "", "magnet": "", "torrent_url": "", "web_seed": null})
    }

    #[test]
    fn node_names_are_escaped() {
        let status = status(serde_json::json!({
            "ready": false, "min_nodes": 1, "shards": [], "shards_loaded": 0, "serving": false,
            "route": null,
            "nodes": [{"node_id": "n1", "name": "<script>alert(1)</script>",
                       "shards": {"0": {"state": "fetching", "bytes": 5, "total": 10,
                                        "from_seeder": 5, "from_peers": 0, "use_tracker": true}},
                       "fetched_from": {"0": {"seeder": 5}}}],
        }));
        let html = live(&status);
        assert!(!html.contains("class=\"decode\""), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(html.contains("not ready") && html.contains("50%"), "{html}");
    }

    #[test]
    fn the_route_shows_how_each_hop_runs() {
        let status = status(serde_json::json!({
            "ready": true, "min_nodes": 1, "shards": [shard()], "shards_loaded": 1, "serving": true,
            "route": [{"shard_id": 0, "node_id": "n1", "data_addr": "10.1.0.2:1",
                       "edge": {"kind": "holepunched", "rtt_us": 12345},
                       "answers_edge": {"kind": "relayed", "rtt_us": 40000}}],
            "nodes": [],
        }));
        let html = live(&status);
        assert!(
            html.contains("<small class=\"edge\">reached holepunched, 12.3 ms; answers relayed, 40.0 ms</small>"),
            "{html}"
        );
    }

    #[test]
    fn a_node_shows_its_decode_thread_policy_with_its_stage() {
        let status = status(serde_json::json!({
            "ready": true, "min_nodes": 1, "shards": [shard()], "shards_loaded": 1, "serving": true,
            "route": null,
            "nodes": [{"node_id": "n1", "name": "n1", "stage": 0, "shards": {},
                       "decode": {"policy": "team-pinned", "threads": 2, "cpus": [0, 1],
                                  "chosen_by": "measured", "measured_ms": {"one": 3.1}}}],
        }));
        let html = live(&status);
        assert!(
            html.contains(
                "<td>0<br><small class=\"decode\">team-pinned ×2 (measured)</small></td>"
            ),
            "{html}"
        );
    }
}
