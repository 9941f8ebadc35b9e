//! Lying nodes are caught: the coordinator replays requests through every holder of each
//! shard and evicts a holder whose outputs differ from its own computation of the stage,
//! while requests keep their exact text. The liar is a real node started with the test-only `--test-lie`.

use std::time::Duration;

use serde_json::Value;
use tests::api::{assert_texts_equal_the_whole_model, PROMPTS};
use tests::{get_json, node, nodes_fully_loaded, swarm_lock, wait_for, Bed, Proc};

/// Every node of `st` runs a stage (acknowledged its ROUTE), and `count` nodes are loaded.
fn all_staged(st: &Value, count: usize) -> bool {
    let nodes = st["nodes"].as_array().unwrap();
    st["serving"] == true
        && nodes.len() == count
        && nodes_fully_loaded(st) == count
        && nodes.iter().all(|n| n["stage"].is_u64())
}

fn assert_reference_text(addr: &str, prompt: &str) {
    let client = reqwest::blocking::Client::new();
    assert_texts_equal_the_whole_model(&client, &format!("http://{addr}"), None, &[prompt]);
}

/// `honest` nodes, then a liar (`--test-lie`), which placement makes one more holder of the
/// least-held shard; requests are checked, each of them replayed through every holder. The
/// liar is evicted for `why`, the requests keep their exact text, and it cannot come back.
fn a_liar_among(honest: usize, why: &str) {
    let _one = swarm_lock();
    let bed = Bed::new(2, &[]);
    let c = bed.coordinator(
        "127.0.0.1:0",
        &[
            "--min-nodes",
            "2",
            "--verify-fraction",
            "1",
            "--parallel",
            "2",
        ],
    );
    let addr = c.field("http").to_owned();
    let status = || get_json(&format!("http://{addr}/status"));

    // Honest nodes (one with two threads: its sums may round differently), then the liar.
    let dirs = bed.node_dirs(honest);
    let mut nodes: Vec<Proc> = dirs
        .iter()
        .enumerate()
        .map(|(i, (name, dir))| {
            let threads: &[&str] = if i == 1 { &["--threads", "2"] } else { &[] };
            node(name, &addr, dir, threads)
        })
        .collect();
    wait_for(
        "the honest nodes running stages",
        Duration::from_secs(240),
        || all_staged(&status(), honest).then_some(()),
    );
    let liar_dir = bed.work.path().join("liar");
    let liar = node("liar", &addr, &liar_dir, &["--test-lie", "0.05"]);
    let liar_id = wait_for("the liar running a stage", Duration::from_secs(240), || {
        let st = status();
        let id = st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "liar" && n["stage"].is_u64())?["node_id"]
            .as_str()?
            .to_owned();
        (all_staged(&st, honest + 1)).then_some(id)
    });

    // Requests are answered exactly (the liar is a replica, off the route) and each is
    // replayed through every holder: the liar is caught and evicted.
    for prompt in PROMPTS {
        assert_reference_text(&addr, prompt);
    }
    let st = wait_for("the liar's eviction", Duration::from_secs(120), || {
        let st = status();
        st["evicted"].get(&liar_id).is_some().then_some(st)
    });
    let eviction = &st["evicted"][&liar_id];
    assert_eq!(eviction["name"], "liar");
    assert!(
        eviction["reason"].as_str().unwrap().contains(why),
        "{eviction}"
    );
    assert_eq!(
        st["evicted"].as_object().unwrap().len(),
        1,
        "an honest node was evicted: {st}"
    );
    let (exit, stderr) = liar.wait_exit(Duration::from_secs(60));
    assert!(!exit.success());
    assert!(stderr.contains("evicted"), "{stderr}");

    // The honest holders agreed within the tolerance; what they differed by, for the record.
    let v = &st["verify"];
    eprintln!(
        "honest relative error: p50 {} p99 {} max {} (tolerance {}), {} requests checked, {} stage comparisons, {} served requests checked",
        v["honest_error_p50"], v["honest_error_p99"], v["honest_error_max"], v["tolerance"],
        v["requests_checked"], v["stage_comparisons"], v["served_checked"]
    );
    assert!(v["honest_error_max"].as_f64().unwrap() <= v["tolerance"].as_f64().unwrap());
    // What the honest route served was checked too (every hop and token), and passed. The
    // served part of a check comes after its replay, which is where the liar is evicted:
    // waited for.
    let v = wait_for("a served request checked", Duration::from_secs(60), || {
        let v = status()["verify"].clone();
        (v["served_checked"].as_u64()? >= 1).then_some(v)
    });
    assert_eq!(v["recall_failures"], 0, "{v}");
    assert!(v["disputes"].as_array().unwrap().is_empty(), "{v}");

    // Still exact afterwards, and the liar cannot come back under its id.
    assert_reference_text(&addr, PROMPTS[1]);
    let again = node("liar", &addr, &liar_dir, &[]);
    let (exit, stderr) = again.wait_exit(Duration::from_secs(60));
    assert!(!exit.success());
    assert!(stderr.contains("evicted"), "{stderr}");
    nodes.clear();
}

/// Three holders of the liar's shard: the two honest ones agree, the liar with neither; the
/// coordinator's own computation decides (never the majority alone).
#[test]
fn a_node_with_wrong_outputs_among_three_holders_is_evicted() {
    a_liar_among(5, "computed by the coordinator");
}

/// Two holders that disagree: the coordinator computes the stage itself from the seeder's file
/// and evicts the one that differs from it.
#[test]
fn a_node_with_wrong_outputs_among_two_holders_is_evicted_by_the_coordinators_own_computation() {
    a_liar_among(3, "computed by the coordinator");
}
