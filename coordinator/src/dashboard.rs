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

use serde_json::Value;

/// The page: `{{LIVE}}` is the live part, `{{MODEL}}` the model id.
const PAGE: &str = include_str!("dashboard.html");

/// The whole page, with the live part when it may be shown without a key.
pub fn page(status: Option<&Value>, model: &str) -> String {
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
pub fn live(s: &Value) -> String {
    let mut h = String::new();
    let names: std::collections::BTreeMap<&str, &str> = s["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| Some((n["node_id"].as_str()?, n["name"].as_str()?)))
        .collect();
    let name_of = |id: &str| names.get(id).copied().unwrap_or(id).to_owned();
    let ready = s["ready"] == true;
    let nodes = s["nodes"].as_array().map_or(0, Vec::len);
    let shards = s["shards"].as_array().map_or(0, Vec::len);
    let generated = s["batching"]["generated_tokens"].as_u64().unwrap_or(0);
    let _ = write!(
        h,
        "<div class=\"summary\" data-generated=\"{generated}\"><span id=\"readiness\" class=\"{}\">{}</span> \
         <span>{nodes} node(s), at least {} needed</span> <span>{} of {shards} shards loaded</span> \
         <span>{}</span> <span>tokens/s: <b id=\"tps\">–</b></span></div>",
        if ready { "ready" } else { "waiting" },
        if ready { "ready" } else { "not ready" },
        s["min_nodes"],
        s["shards_loaded"],
        if s["serving"] == true { "serving" } else { "not serving yet" },
    );
    h.push_str("<h2>Nodes</h2><table id=\"nodes\"><thead><tr><th>node</th><th>stage</th><th>shards</th><th>bytes from</th><th>heartbeat</th></tr></thead><tbody>");
    let mut rows: Vec<&Value> = s["nodes"].as_array().into_iter().flatten().collect();
    rows.sort_by_key(|n| (n["name"].as_str(), n["node_id"].as_str()));
    for n in rows {
        let id = n["node_id"].as_str().unwrap_or("");
        let mut shards_cell = String::new();
        for (shard, held) in n["shards"].as_object().into_iter().flatten() {
            let state = held["state"].as_str().unwrap_or("?");
            let (bytes, total) = (held["bytes"].as_u64(), held["total"].as_u64());
            let progress = match (state, bytes, total) {
                ("fetching", Some(b), Some(t)) if t > 0 => format!(
                    " <progress value=\"{b}\" max=\"{t}\"></progress> {:.0}%",
                    100.0 * b as f64 / t as f64
                ),
                _ => String::new(),
            };
            let _ = write!(
                shards_cell,
                "<div>shard {} <span class=\"{}\">{}</span>{progress}</div>",
                escape(shard),
                escape(state),
                escape(state)
            );
        }
        let mut sources = String::new();
        for (shard, from) in n["fetched_from"].as_object().into_iter().flatten() {
            let parts: Vec<String> = from
                .as_object()
                .into_iter()
                .flatten()
                .map(|(src, b)| {
                    let src = if src == "seeder" {
                        src.clone()
                    } else {
                        name_of(src)
                    };
                    format!("{} {}", escape(&src), mib(b.as_u64().unwrap_or(0)))
                })
                .collect();
            let _ = write!(
                sources,
                "<div>shard {}: {}</div>",
                escape(shard),
                parts.join(", ")
            );
        }
        // How the stage's decodes use threads, and how that was settled.
        let decode = match n["decode"]["policy"].as_str() {
            Some(policy) => format!(
                "<br><small class=\"decode\">{} ×{} ({})</small>",
                escape(policy),
                n["decode"]["threads"].as_u64().unwrap_or(1),
                escape(n["decode"]["chosen_by"].as_str().unwrap_or("?"))
            ),
            None => String::new(),
        };
        let _ = write!(
            h,
            "<tr class=\"node\"><td><b>{}</b><br><small>{}</small></td><td>{}{decode}</td><td>{shards_cell}</td><td>{sources}</td><td>{:.0} s ago</td></tr>",
            escape(n["name"].as_str().unwrap_or("")),
            escape(&id.chars().take(8).collect::<String>()),
            n["stage"].as_u64().map_or("–".into(), |k| k.to_string()),
            n["last_heartbeat_secs_ago"].as_f64().unwrap_or(0.0),
        );
    }
    h.push_str("</tbody></table><h2>Route</h2><ol id=\"route\">");
    for hop in s["route"].as_array().into_iter().flatten() {
        let _ = write!(
            h,
            "<li>shard {} on <b>{}</b> <small>{}</small></li>",
            hop["shard_id"],
            escape(&name_of(hop["node_id"].as_str().unwrap_or(""))),
            escape(hop["data_addr"].as_str().unwrap_or(""))
        );
    }
    if s["route"].is_null() {
        h.push_str("<li>none yet: the route forms once the swarm is ready</li>");
    }
    h.push_str("</ol>");
    let b = &s["batching"];
    if b.is_object() {
        let busy: Vec<String> = b["stage_busy_fraction"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| format!("{:.0}%", 100.0 * f.as_f64().unwrap_or(0.0)))
            .collect();
        let _ = write!(
            h,
            "<p class=\"serving\">requests running {}, waiting {}; tokens generated {generated}; stage busy {}</p>",
            b["running"], b["waiting"], busy.join(" ")
        );
    }
    if let Some(evicted) = s["evicted"].as_object().filter(|e| !e.is_empty()) {
        let ids: Vec<String> = evicted.keys().map(|k| escape(k)).collect();
        let _ = write!(h, "<p class=\"evicted\">evicted: {}</p>", ids.join(", "));
    }
    h
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

    #[test]
    fn node_names_are_escaped() {
        let status = serde_json::json!({
            "ready": false, "min_nodes": 1, "shards": [], "shards_loaded": 0, "serving": false,
            "route": null,
            "nodes": [{"node_id": "n1", "name": "<script>alert(1)</script>",
                       "shards": {"0": {"state": "fetching", "bytes": 5, "total": 10}},
                       "fetched_from": {"0": {"seeder": 5}}}],
        });
        let html = live(&status);
        assert!(!html.contains("class=\"decode\""), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(html.contains("not ready") && html.contains("50%"), "{html}");
    }

    #[test]
    fn a_node_shows_its_decode_thread_policy_with_its_stage() {
        let status = serde_json::json!({
            "ready": true, "min_nodes": 1, "shards": [{}], "shards_loaded": 1, "serving": true,
            "route": null,
            "nodes": [{"node_id": "n1", "name": "n1", "stage": 0, "shards": {},
                       "decode": {"policy": "team-pinned", "threads": 2, "cpus": [0, 1],
                                  "chosen_by": "measured", "measured_ms": {"one": 3.1}}}],
        });
        let html = live(&status);
        assert!(
            html.contains(
                "<td>0<br><small class=\"decode\">team-pinned ×2 (measured)</small></td>"
            ),
            "{html}"
        );
    }
}
