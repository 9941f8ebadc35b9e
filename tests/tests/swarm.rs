//! The control plane end to end, as processes on loopback: seeder + coordinator + nodes with
//! the real model split into 4. Nodes run with one thread; these tests run one at a time.

use std::path::PathBuf;
use std::time::Duration;

use tests::{
    assert_node_files, get_json, metric_sum, node, nodes_fully_loaded, swarm_lock, wait_for, Bed,
    Proc,
};

const READY_WITHIN: Duration = Duration::from_secs(180);

fn status(c: &Proc) -> serde_json::Value {
    get_json(&format!("http://{}/status", c.field("http")))
}

fn wait_ready(c: &Proc, want: bool) -> serde_json::Value {
    wait_for(
        if want { "SWARM_READY" } else { "not ready" },
        READY_WITHIN,
        || {
            let s = status(c);
            (s["ready"] == want).then_some(s)
        },
    )
}

/// Start `count` empty nodes (n0, n1, …) for coordinator `c`: their names and data dirs, and
/// the processes (an Option each, so a test can kill one and start it again).
fn start_nodes(bed: &Bed, c: &Proc, count: usize) -> (Vec<(String, PathBuf)>, Vec<Option<Proc>>) {
    let dirs = bed.node_dirs(count);
    let nodes = dirs
        .iter()
        .map(|(n, d)| Some(node(n, c.field("http"), d, &[])))
        .collect();
    (dirs, nodes)
}

/// Kill node `name` (n<k>) of `nodes`; returns k.
fn kill_node(nodes: &mut [Option<Proc>], name: &str) -> usize {
    let k: usize = name[1..].parse().unwrap();
    nodes[k].take().unwrap().kill();
    k
}

/// Every (node name, shard id, holding) in a `/status`.
fn holdings(status: &serde_json::Value) -> Vec<(&str, &str, &serde_json::Value)> {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| {
            let name = n["name"].as_str().unwrap();
            n["shards"]
                .as_object()
                .unwrap()
                .iter()
                .map(move |(id, h)| (name, id.as_str(), h))
        })
        .collect()
}

/// What node `name` holds of `shard` in a `/status`.
fn holding(status: &serde_json::Value, name: &str, shard: &str) -> Option<serde_json::Value> {
    holdings(status)
        .into_iter()
        .find(|(n, id, _)| *n == name && *id == shard)
        .map(|(_, _, h)| h.clone())
}

/// The bytes of all the split's shards (D), from a `/status`.
fn split_bytes(st: &serde_json::Value) -> u64 {
    st["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["size"].as_u64().unwrap())
        .sum()
}

/// Ready, every shard on `copies` nodes, and all `nodes` with their shards loaded.
fn every_shard_loaded(st: &serde_json::Value, copies: usize, nodes: usize) -> bool {
    let full = st["placement"]
        .as_object()
        .unwrap()
        .values()
        .all(|h| h.as_array().unwrap().len() == copies);
    st["ready"] == true && full && nodes_fully_loaded(st) == nodes
}

#[test]
fn four_empty_nodes_fetch_every_shard_and_the_swarm_is_ready() {
    let _one = swarm_lock();
    let bed = Bed::new(4, &[]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "4"]);
    let (dirs, nodes) = start_nodes(&bed, &c, 4);
    let st = wait_ready(&c, true);
    assert_eq!(st["nodes"].as_array().unwrap().len(), 4);
    assert_eq!(st["shards_loaded"], 4);
    for (shard, holders) in st["placement"].as_object().unwrap() {
        assert_eq!(
            holders.as_array().unwrap().len(),
            1,
            "shard {shard}: {holders}"
        );
    }
    assert_node_files(&st, bed.seed.path(), &dirs);
    assert!(c
        .stdout_lines()
        .iter()
        .any(|l| l.starts_with("[SWARM_READY]")));
    for n in nodes.iter().flatten() {
        assert!(
            n.stderr_text().contains("[TORRENT] Found file: shard-"),
            "{}",
            n.stderr_text()
        );
    }
}

#[test]
fn eight_nodes_hold_two_replicas_and_the_seeder_sends_each_shard_about_once() {
    let _one = swarm_lock();
    // 24 MB/s: the seeder is the bottleneck, as on a real uplink.
    let bed = Bed::new(4, &["--upload-limit", "25000000"]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "4"]);
    let (dirs, _nodes) = start_nodes(&bed, &c, 8);
    // Replicas trail their shard's first holder: some status must show a replica with bytes
    // from a node while that node is still fetching from the seeder.
    let mut trailed = false;
    let st = wait_for("8 nodes with every shard twice", READY_WITHIN, || {
        let st = status(&c);
        trailed |= replica_trails_a_fetching_holder(&st);
        every_shard_loaded(&st, 2, 8).then_some(st)
    });
    assert_node_files(&st, bed.seed.path(), &dirs);
    let received = 2 * split_bytes(&st);
    let sent = seeder_sent(&bed);
    assert!(
        (sent as f64) <= 0.75 * received as f64,
        "the seeder sent {sent} bytes for {received} received by nodes (> 0.75x)"
    );
    assert!(st["bytes"]["from_peers"].as_u64().unwrap() > 0);
    assert!(
        trailed,
        "no replica was seen fetching from a holder that was still fetching"
    );
}

/// Whether some shard has a holder still fetching from the seeder and another holder that has
/// already received bytes from nodes.
fn replica_trails_a_fetching_holder(st: &serde_json::Value) -> bool {
    let all = holdings(st);
    let fetching = |h: &serde_json::Value, key: &str| {
        h["state"] == "fetching" && h[key].as_u64().is_some_and(|b| b > 0)
    };
    all.iter().any(|(node, id, primary)| {
        fetching(primary, "from_seeder")
            && all.iter().any(|(other_node, other, replica)| {
                other_node != node && other == id && fetching(replica, "from_peers")
            })
    })
}

#[test]
fn a_node_killed_mid_download_resumes_without_fetching_everything_again() {
    let _one = swarm_lock();
    // 4 MB/s: the 47-50 MB shards take over ten seconds.
    let bed = Bed::new(4, &["--upload-limit", "4000000"]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "4"]);
    let (dirs, mut nodes) = start_nodes(&bed, &c, 4);
    // A node holding shard 0 or 3 (the large ones) with a fifth of it verified.
    let (victim, shard, size) =
        wait_for("a large shard part-way", Duration::from_secs(120), || {
            let st = status(&c);
            holdings(&st).into_iter().find_map(|(name, id, h)| {
                let (bytes, total) = (h["bytes"].as_u64()?, h["total"].as_u64()?);
                (h["state"] == "fetching"
                    && total > 40_000_000
                    && bytes > total / 5
                    && bytes < total * 3 / 5)
                    .then(|| (name.to_owned(), id.to_owned(), total))
            })
        });
    let k = kill_node(&mut nodes, &victim);
    nodes[k] = Some(node(&victim, c.field("http"), &dirs[k].1, &[]));
    let st = wait_ready(&c, true);
    let h = holding(&st, &victim, &shard).unwrap_or_default();
    assert_eq!(h["state"], "loaded", "{h}");
    let fetched = h["from_seeder"].as_u64().unwrap() + h["from_peers"].as_u64().unwrap();
    assert!(
        fetched < size,
        "after the restart {victim} fetched {fetched} bytes of the {size}-byte shard {shard}"
    );
    assert_node_files(&st, bed.seed.path(), &dirs);
}

#[test]
fn a_replica_whose_source_dies_mid_download_finishes_from_the_seeder() {
    let _one = swarm_lock();
    // 8 MB/s shared by four first holders: the large shards take over twenty seconds.
    let bed = Bed::new(4, &["--upload-limit", "8000000"]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "4"]);
    let (dirs, mut nodes) = start_nodes(&bed, &c, 5);
    // A fifth node replicates a shard, trailing a first holder that has most of it still to get.
    let (source, shard, replica) = wait_for(
        "a replica trailing its source",
        Duration::from_secs(120),
        || {
            let st = status(&c);
            let all = holdings(&st);
            all.iter().find_map(|(src, id, h)| {
                let (bytes, total) = (h["bytes"].as_u64()?, h["total"].as_u64()?);
                if h["state"] != "fetching" || h["use_tracker"] != true || bytes > total / 2 {
                    return None;
                }
                all.iter()
                    .find(|(_, other, r)| {
                        other == id
                            && r["state"] == "fetching"
                            && r["use_tracker"] == false
                            && r["from_peers"].as_u64().is_some_and(|b| b > 0)
                    })
                    .map(|(rep, _, _)| (src.to_string(), id.to_string(), rep.to_string()))
            })
        },
    );
    kill_node(&mut nodes, &source);
    // The coordinator sends the stranded replica to the seeder's tracker.
    let holding = wait_for("the replica loaded", READY_WITHIN, || {
        let h = holding(&status(&c), &replica, &shard)?;
        (h["state"] == "loaded").then_some(h)
    });
    assert!(
        holding["from_seeder"].as_u64().unwrap() > 0,
        "{replica} finished shard {shard} without the seeder after {source} died: {holding}"
    );
    let st = wait_ready(&c, true);
    assert_node_files(&st, bed.seed.path(), &dirs);
}

#[test]
fn a_lost_holder_is_replaced_and_a_restarted_coordinator_needs_no_download() {
    let _one = swarm_lock();
    let bed = Bed::new(4, &[]);
    let flags = [
        "--min-nodes",
        "4",
        "--heartbeat-interval",
        "1",
        "--heartbeat-timeout",
        "4",
    ];
    let c = bed.coordinator("127.0.0.1:0", &flags);
    let addr = c.field("http").to_owned();
    let (_dirs, mut nodes) = start_nodes(&bed, &c, 5);
    let st = wait_for("ready with 5 nodes and a replica", READY_WITHIN, || {
        let st = status(&c);
        (st["ready"] == true && nodes_fully_loaded(&st) == 5).then_some(st)
    });
    // Kill the only holder of a shard.
    let (victim, shard) = st["placement"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, h)| h.as_array().unwrap().len() == 1)
        .map(|(id, h)| {
            let node_id = h[0].as_str().unwrap();
            let n = st["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["node_id"] == node_id)
                .unwrap();
            (n["name"].as_str().unwrap().to_owned(), id.clone())
        })
        .unwrap();
    kill_node(&mut nodes, &victim);
    wait_ready(&c, false);
    let st = wait_ready(&c, true);
    let holders = st["placement"][&shard].as_array().unwrap();
    assert!(
        !holders.is_empty()
            && holders.iter().all(|h| st["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| &n["node_id"] == h))
    );
    assert_eq!(st["nodes"].as_array().unwrap().len(), 4);

    // Restart the coordinator on the same address: the nodes come back with what they hold.
    let metrics_url = format!("http://{}/metrics", bed.seeder.field("http"));
    let sent_before = metric_sum(
        &reqwest::blocking::get(&metrics_url)
            .unwrap()
            .text()
            .unwrap(),
        "shardswarm_seeder_uploaded_bytes_total",
        "",
    );
    assert!(c.terminate().success());
    let c2 = bed.coordinator(&addr, &flags);
    let st = wait_ready(&c2, true);
    let mut claims = 0;
    for n in st["nodes"].as_array().unwrap() {
        claims += n["shards"].as_object().unwrap().len() as u64;
        for h in n["shards"].as_object().unwrap().values() {
            assert_eq!(
                (
                    h["state"].as_str(),
                    h["from_seeder"].as_u64(),
                    h["from_peers"].as_u64()
                ),
                (Some("loaded"), Some(0), Some(0)),
                "{n}"
            );
        }
    }
    let sent_after = metric_sum(
        &reqwest::blocking::get(&metrics_url)
            .unwrap()
            .text()
            .unwrap(),
        "shardswarm_seeder_uploaded_bytes_total",
        "",
    );
    // Only the ranges the coordinator checks the nodes' claims against (64 KiB a shard), far
    // below any shard.
    assert!(
        sent_after - sent_before <= claims * 65536,
        "nothing is downloaded again after a coordinator restart: {} bytes for {claims} claims",
        sent_after - sent_before
    );
}

/// A node's bytes of `shard` by source, from `/status` (`seeder`, a node id, or the address of a
/// node that connected to it).
fn fetched_from(status: &serde_json::Value, node_id: &str, shard: &str) -> Vec<(String, u64)> {
    let node = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == node_id)
        .unwrap();
    node["fetched_from"][shard]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

/// The bytes the seeder sent over BitTorrent, from its `/metrics`.
fn seeder_sent(bed: &Bed) -> u64 {
    let url = format!("http://{}/metrics", bed.seeder.field("http"));
    metric_sum(
        &reqwest::blocking::get(url).unwrap().text().unwrap(),
        "shardswarm_seeder_uploaded_bytes_total",
        "source=\"bittorrent\"",
    )
}

/// 12 nodes, 4 shards: 3 copies of each with the seeder's uplink capped, so replicas must serve
/// each other. Each shard's first holder is fed by the seeder; its replicas fetch from every
/// holder of the shard, so some replica gets bytes from another replica.
#[test]
fn twelve_nodes_hold_three_copies_and_replicas_serve_each_other() {
    let _one = swarm_lock();
    let bed = Bed::new(4, &["--upload-limit", "20000000"]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "4"]);
    let (dirs, _nodes) = start_nodes(&bed, &c, 12);
    let st = wait_for(
        "12 nodes with every shard 3 times",
        Duration::from_secs(300),
        || {
            let st = status(&c);
            every_shard_loaded(&st, 3, 12).then_some(st)
        },
    );
    assert_node_files(&st, bed.seed.path(), &dirs);
    let d = split_bytes(&st);
    let sent = seeder_sent(&bed);
    assert!(
        sent as f64 <= 1.3 * d as f64,
        "the seeder sent {sent} bytes for 3 copies of {d} (> 1.3 D)"
    );
    // Each holder received its shard once: no piece came twice (librqbit patch 0004).
    for (name, id, h) in holdings(&st) {
        let received = h["from_seeder"].as_u64().unwrap() + h["from_peers"].as_u64().unwrap();
        let size = st["shards"][id.parse::<usize>().unwrap()]["size"]
            .as_u64()
            .unwrap();
        assert!(
            received <= size + size / 50,
            "{name} received {received} bytes for shard {id} of {size}"
        );
    }
    // Per shard: the holder fed by the seeder, and replicas with bytes from anyone else.
    let mut from_replicas = Vec::new();
    for (shard, holders) in st["placement"].as_object().unwrap() {
        let holders: Vec<&str> = holders
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect();
        let fed: Vec<&str> = holders
            .iter()
            .copied()
            .filter(|h| {
                fetched_from(&st, h, shard)
                    .iter()
                    .any(|(k, _)| k == "seeder")
            })
            .collect();
        assert_eq!(
            fed.len(),
            1,
            "shard {shard}: one holder fetches from the seeder: {fed:?}"
        );
        for replica in holders.iter().filter(|h| **h != fed[0]) {
            for (source, bytes) in fetched_from(&st, replica, shard) {
                if source != fed[0] && bytes > 0 {
                    from_replicas.push((shard.clone(), replica.to_string(), source, bytes));
                }
            }
        }
    }
    assert!(
        !from_replicas.is_empty(),
        "no replica received bytes from another replica"
    );
}

/// Two shards on 6 nodes (3 copies each). The first holder of a shard is killed while both its
/// replicas are part-way: the one furthest along is sent to the seeder's tracker, the other keeps
/// fetching from it, and neither starts over: each keeps what it had verified when its source
/// died, and the one sent to the tracker takes only the rest from the seeder.
#[test]
fn replicas_whose_source_dies_finish_from_the_other_holders_without_starting_over() {
    let _one = swarm_lock();
    // 4 MB/s for two first holders: each shard takes over twenty seconds.
    let bed = Bed::new(2, &["--upload-limit", "4000000"]);
    let c = bed.coordinator("127.0.0.1:0", &["--min-nodes", "2"]);
    let (dirs, mut nodes) = start_nodes(&bed, &c, 6);
    let u = |h: &serde_json::Value, key: &str| h[key].as_u64().unwrap_or(0);
    // (replica, verified bytes) of the two replicas behind a source.
    let (source, shard, replicas, size) = wait_for(
        "two replicas part-way behind their source",
        Duration::from_secs(120),
        || {
            let st = status(&c);
            let all = holdings(&st);
            all.iter().find_map(|(src, id, h)| {
                let total = h["total"].as_u64()?;
                if h["state"] != "fetching" || h["use_tracker"] != true || u(h, "bytes") > total / 2
                {
                    return None;
                }
                let behind: Vec<(String, u64)> = all
                    .iter()
                    .filter(|(n, other, r)| {
                        n != src
                            && other == id
                            && r["state"] == "fetching"
                            && u(r, "bytes") > total / 10
                    })
                    .map(|(n, _, r)| (n.to_string(), u(r, "bytes")))
                    .collect();
                (behind.len() == 2).then(|| (src.to_string(), id.to_string(), behind, total))
            })
        },
    );
    kill_node(&mut nodes, &source);
    // While they finish: the verified bytes each reports (0 while librqbit checks the file of a
    // fetch that starts again with the tracker) never fall below what it had.
    let mut lowest: Vec<u64> = vec![u64::MAX; replicas.len()];
    let st = wait_for("the replicas loaded", READY_WITHIN, || {
        let st = status(&c);
        let mut done = true;
        for (k, (r, _)) in replicas.iter().enumerate() {
            let h = holding(&st, r, &shard).unwrap_or_default();
            match h["state"].as_str() {
                Some("loaded") => {}
                _ if u(&h, "bytes") > 0 => {
                    lowest[k] = lowest[k].min(u(&h, "bytes"));
                    done = false;
                }
                _ => done = false,
            }
        }
        done.then_some(st)
    });
    let mut took_over = Vec::new();
    for (k, (r, had)) in replicas.iter().enumerate() {
        assert!(
            lowest[k] == u64::MAX || lowest[k] >= *had,
            "{r} had {had} bytes of shard {shard} when {source} died, later {}: it started over",
            lowest[k]
        );
        let h = holding(&st, r, &shard).unwrap();
        // Sent to the tracker: its new fetch took from the seeder only what it lacked.
        let from_seeder = u(&h, "from_seeder");
        if from_seeder > 0 {
            assert!(
                from_seeder <= size - had + size / 20,
                "{r} had {had} of {size} bytes and took {from_seeder} from the seeder: it started over"
            );
            took_over.push(r.clone());
        }
    }
    assert_eq!(
        took_over.len(),
        1,
        "one replica takes over the feed: {took_over:?}"
    );
    // Every node left (the other shard's holders too) finishes, with the right files.
    let st = wait_for("the five nodes left loaded", READY_WITHIN, || {
        let st = status(&c);
        (st["ready"] == true && nodes_fully_loaded(&st) == 5).then_some(st)
    });
    assert_node_files(&st, bed.seed.path(), &dirs);
}
