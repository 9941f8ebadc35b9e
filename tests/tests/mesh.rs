//! The data channel over the mesh (iroh), on loopback: the seeder runs the swarm's relay
//! (`--relay-port`), so the coordinator (`--data-transport auto`) runs every hop over the mesh
//! and hands nodes the relay; the text equals the whole model's.

use std::time::Duration;

use tests::api::{assert_texts_equal_the_whole_model, PROMPTS};
use tests::{get_json, node, route_edges, swarm_lock, wait_for, Bed};

#[test]
fn a_swarm_over_the_mesh_homed_on_the_seeders_relay_gives_the_whole_models_text() {
    let _one = swarm_lock();
    let bed = Bed::new(3, &["--relay-port", "0"]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "3"]);
    let addr = c.field("http").to_owned();
    let nodes: Vec<_> = bed
        .node_dirs(3)
        .iter()
        .map(|(name, dir)| node(name, &addr, dir, &[]))
        .collect();
    wait_for("the pipeline serving", Duration::from_secs(180), || {
        (get_json(&format!("http://{addr}/status"))["serving"] == true).then_some(())
    });
    assert!(
        c.stderr_text()
            .contains("the data channel runs over the mesh, relay https://127.0.0.1:"),
        "{}",
        c.stderr_text()
    );
    for n in &nodes {
        assert!(
            n.stderr_text().contains("homed on the relay"),
            "{}",
            n.stderr_text()
        );
    }
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    assert_texts_equal_the_whole_model(&client, &format!("http://{addr}"), None, &PROMPTS[..2]);
    // On loopback every hop is direct (an address of the callee's own), its RTT measured;
    // heartbeats carry the stages' edges, so wait (bounded) for the newest.
    let edges = wait_for("every route edge reported", Duration::from_secs(30), || {
        let edges = route_edges(&get_json(&format!("http://{addr}/status")));
        (!edges.is_empty() && edges.iter().all(|e| e["kind"].is_string())).then_some(edges)
    });
    // /metrics has the same: one route_edge per hop, with its RTT.
    let metrics = reqwest::blocking::get(format!("http://{addr}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    let hops = edges.len();
    let direct = metrics
        .lines()
        .filter(|l| l.starts_with("shardswarm_route_edge{") && l.contains("kind=\"direct\""))
        .count();
    let rtts = metrics
        .lines()
        .filter(|l| l.starts_with("shardswarm_route_edge_rtt_seconds{"))
        .count();
    assert_eq!((direct, rtts), (hops, hops), "{metrics}");
    // On loopback the coordinator dials every node's BitTorrent port.
    let status = get_json(&format!("http://{addr}/status"));
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(n["peer_dialable"], true, "{n}");
    }
    for edge in &edges {
        assert_eq!(edge["kind"], "direct", "{edges:?}");
        assert!(edge["rtt_us"].as_u64().is_some(), "{edges:?}");
    }
}
