//! Attacks by a hostile member of the swarm (a node holding the swarm token, started with the
//! hidden `--test-attack`): each must leave the coordinator running, the answers exact, and
//! the attacker evicted and named in `/status`.

use std::time::Duration;

use serde_json::{json, Value};
use tests::api::{assert_texts_equal_the_whole_model, post, PROMPTS};
use tests::{get_json, node, nodes_fully_loaded, swarm_lock, wait_for, Bed};

/// `name`'s entry in `/status` `nodes`.
fn node_named<'a>(st: &'a Value, name: &str) -> Option<&'a Value> {
    st["nodes"].as_array()?.iter().find(|n| n["name"] == name)
}

/// A last stage that answers with a token id outside the vocabulary (which llama.cpp aborts
/// on) is evicted for it; the coordinator keeps running, the request in flight fails over
/// or fails with a clear error, and the swarm serves exact text again without the attacker.
#[test]
fn a_last_stage_sending_an_out_of_range_token_is_evicted_and_the_coordinator_survives() {
    let _one = swarm_lock();
    let bed = Bed::new(2, &[]);
    let mut coordinator = bed.coordinator("127.0.0.1:0", &["--min-nodes", "2"]);
    let addr = coordinator.field("http").to_owned();
    let status = || get_json(&format!("http://{addr}/status"));

    // An honest node takes shard 0, the attacker shard 1: the last stage, which samples.
    let dirs = bed.node_dirs(3);
    let _honest = node(&dirs[0].0, &addr, &dirs[0].1, &[]);
    wait_for(
        "the first node given shard 0",
        Duration::from_secs(60),
        || {
            node_named(&status(), &dirs[0].0)?["shards"]
                .get("0")
                .map(|_| ())
        },
    );
    let attacker_dir = bed.work.path().join("attacker");
    let _attacker = node(
        "attacker",
        &addr,
        &attacker_dir,
        &["--test-attack", "bad-token"],
    );
    let attacker_id = wait_for("the attacker as stage 1", Duration::from_secs(240), || {
        let st = status();
        let a = node_named(&st, "attacker")?;
        (st["serving"] == true && a["stage"] == 1)
            .then(|| a["node_id"].as_str().map(str::to_owned))?
    });
    // Two more honest nodes: replicas of shard 0, then of shard 1 (the least held), which
    // takes the attacker's place.
    let _spares: Vec<_> = dirs[1..]
        .iter()
        .enumerate()
        .map(|(i, (name, dir))| {
            let spare = node(name, &addr, dir, &[]);
            wait_for("the spare loaded", Duration::from_secs(240), || {
                (nodes_fully_loaded(&status()) == 3 + i).then_some(())
            });
            spare
        })
        .collect();

    // The request meets the attacker's token: it fails over to a new route, or fails with a
    // clear error; either way the coordinator is still there.
    let body = json!({"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0});
    let (code, answer) = post(&addr, "/v1/completions", body);
    assert!(
        code == 200 || (code == 503 && answer["error"]["message"].is_string()),
        "{code}: {answer}"
    );
    assert!(
        coordinator.is_running(),
        "the coordinator died: {}",
        coordinator.stderr_text()
    );
    let st = wait_for("the attacker's eviction", Duration::from_secs(60), || {
        let st = status();
        st["evicted"].get(&attacker_id).is_some().then_some(st)
    });
    let reason = st["evicted"][&attacker_id]["reason"].as_str().unwrap();
    assert!(reason.contains("outside the vocabulary"), "{reason}");
    assert_eq!(st["evicted"].as_object().unwrap().len(), 1, "{st}");

    // Exact text through the honest nodes.
    wait_for(
        "a route without the attacker",
        Duration::from_secs(240),
        || {
            let st = status();
            (st["serving"] == true).then_some(())
        },
    );
    let client = reqwest::blocking::Client::new();
    assert_texts_equal_the_whole_model(&client, &format!("http://{addr}"), None, &PROMPTS[..1]);
    assert!(coordinator.is_running());
}

/// Connections from `from` (a loopback address) to `to` that send nothing, or only the start
/// of a request's headers: a client without credentials trying to take every place.
fn idle_connections(from: &str, to: &str, count: usize) -> Vec<std::net::TcpStream> {
    let to: std::net::SocketAddr = to.parse().unwrap();
    (0..count)
        .filter_map(|i| {
            // Past this process's descriptor limit there are simply fewer.
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
            socket
                .bind(
                    &format!("{from}:0")
                        .parse::<std::net::SocketAddr>()
                        .unwrap()
                        .into(),
                )
                .unwrap();
            socket
                .connect_timeout(&to.into(), Duration::from_secs(5))
                .ok()?;
            let mut stream: std::net::TcpStream = socket.into();
            if i % 2 == 1 {
                use std::io::Write;
                let _ = stream.write_all(b"GET /status HTTP/1.1\r\n");
            }
            Some(stream)
        })
        .collect()
}

/// Whether the server has closed `stream` (read gives end of file or an error), waiting at
/// most `limit`.
fn closed_within(stream: &mut std::net::TcpStream, limit: Duration) -> bool {
    use std::io::Read;
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a 408 answer before the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// 1,100 connections that send nothing (or stall in their headers) from one address, against
/// the coordinator's and the seeder's HTTP: a fresh request from another address is still
/// answered, and the idle sockets are closed once their time for headers (10 s) is up.
#[test]
fn idle_connections_from_one_address_do_not_lock_out_the_coordinator_or_the_seeder() {
    let _one = swarm_lock();
    let bed = Bed::new(2, &[]);
    let coordinator = bed.coordinator("127.0.0.1:0", &["--min-nodes", "2"]);
    for (service, addr) in [
        ("coordinator", coordinator.field("http").to_owned()),
        ("seeder", bed.seeder.field("http").to_owned()),
    ] {
        let mut idle = idle_connections("127.0.0.2", &addr, 1100);
        assert!(idle.len() >= 256, "{service}: {} connected", idle.len());
        let fresh = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
            .get(format!("http://{addr}/healthz"))
            .send();
        assert!(
            fresh.is_ok_and(|r| r.status().is_success()),
            "{service}: a fresh request was not answered"
        );
        // Every idle socket is closed: at once past the address's share, else when its time
        // for headers is up (10 s; waited for at most 30 s in all).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut open = 0;
        for s in &mut idle {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if !closed_within(s, left.max(Duration::from_millis(10))) {
                open += 1;
            }
        }
        assert_eq!(open, 0, "{service}: idle connections left open");
    }
}

/// Two colluding liars (the same wrong outputs) and one honest holder of the only shard: a
/// majority vote would evict the honest one. The coordinator's own computation settles it:
/// both liars go, the honest holder stays, and the text stays exact.
#[test]
fn two_colluding_liars_and_one_honest_holder_the_liars_go() {
    let _one = swarm_lock();
    let bed = Bed::new(1, &[]);
    let mut coordinator = bed.coordinator(
        "127.0.0.1:0",
        &["--min-nodes", "1", "--verify-fraction", "1"],
    );
    let addr = coordinator.field("http").to_owned();
    let status = || get_json(&format!("http://{addr}/status"));

    let dirs = bed.node_dirs(1);
    let _honest = node(&dirs[0].0, &addr, &dirs[0].1, &[]);
    wait_for("the honest node serving", Duration::from_secs(240), || {
        (status()["serving"] == true).then_some(())
    });
    let liars: Vec<_> = ["liar-a", "liar-b"]
        .iter()
        .map(|name| {
            let dir = bed.work.path().join(name);
            node(name, &addr, &dir, &["--test-lie", "0.05"])
        })
        .collect();
    let ids: Vec<String> = wait_for(
        "both liars running the stage",
        Duration::from_secs(240),
        || {
            let st = status();
            let ids: Vec<String> = ["liar-a", "liar-b"]
                .iter()
                .filter_map(|name| {
                    let n = node_named(&st, name)?;
                    n["stage"]
                        .is_u64()
                        .then(|| n["node_id"].as_str().map(str::to_owned))?
                })
                .collect();
            (ids.len() == 2 && nodes_fully_loaded(&st) == 3).then_some(ids)
        },
    );

    let client = reqwest::blocking::Client::new();
    assert_texts_equal_the_whole_model(&client, &format!("http://{addr}"), None, &PROMPTS[..1]);
    let st = wait_for("both liars' eviction", Duration::from_secs(180), || {
        let st = status();
        ids.iter()
            .all(|id| st["evicted"].get(id).is_some())
            .then_some(st)
    });
    for id in &ids {
        let reason = st["evicted"][id]["reason"].as_str().unwrap();
        assert!(reason.contains("computed by the coordinator"), "{reason}");
    }
    assert_eq!(
        st["evicted"].as_object().unwrap().len(),
        2,
        "the honest node was evicted: {st}"
    );
    assert!(node_named(&st, &dirs[0].0).is_some(), "{st}");
    assert_texts_equal_the_whole_model(&client, &format!("http://{addr}"), None, &PROMPTS[1..2]);
    assert!(coordinator.is_running());
    drop(liars);
}
