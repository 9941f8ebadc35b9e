//! Attacks by a hostile member of the swarm (a node holding the swarm token, started with the
//! hidden `--test-attack`): each must leave the coordinator running, the answers exact, and
//! the attacker evicted and named in `/status`.

use std::time::Duration;

use serde_json::{json, Value};
use tests::api::{assert_texts_equal_the_whole_model, post, PROMPTS};
use tests::{get_json, node, nodes_fully_loaded, swarm_lock, wait_for, Bed, Proc};

/// `name`'s entry in `/status` `nodes`.
fn node_named<'a>(st: &'a Value, name: &str) -> Option<&'a Value> {
    st["nodes"].as_array()?.iter().find(|n| n["name"] == name)
}

/// A two-shard swarm (checks on every request) with an attacker (a node started with
/// `attack_flags`) as stage `attacker_stage` of the route, and two honest spares loaded (so
/// that each shard has a replica to take the attacker's place).
struct Attacked {
    _bed: Bed,
    coordinator: Proc,
    addr: String,
    attacker_id: String,
    _nodes: Vec<Proc>,
}

impl Attacked {
    fn new(attack_flags: &[&str], attacker_stage: u32) -> Attacked {
        let bed = Bed::new(2, &[]);
        let coordinator = bed.coordinator(
            "127.0.0.1:0",
            &["--min-nodes", "2", "--verify-fraction", "1"],
        );
        let addr = coordinator.field("http").to_owned();
        let status = || get_json(&format!("http://{addr}/status"));
        let dirs = bed.node_dirs(3);
        let attacker_dir = bed.work.path().join("attacker");
        // The first node takes shard 0, the second shard 1.
        let mut firsts = [
            ("attacker", attacker_dir.as_path(), attack_flags),
            (dirs[0].0.as_str(), dirs[0].1.as_path(), &[][..]),
        ];
        if attacker_stage == 1 {
            firsts.reverse();
        }
        let mut nodes = Vec::new();
        let (name, dir, flags) = firsts[0];
        nodes.push(node(name, &addr, dir, flags));
        wait_for(
            "the first node given shard 0",
            Duration::from_secs(60),
            || node_named(&status(), name)?["shards"].get("0").map(|_| ()),
        );
        let (name, dir, flags) = firsts[1];
        nodes.push(node(name, &addr, dir, flags));
        let attacker_id = wait_for(
            "the attacker on the route",
            Duration::from_secs(240),
            || {
                let st = status();
                let a = node_named(&st, "attacker")?;
                (st["serving"] == true && a["stage"] == attacker_stage)
                    .then(|| a["node_id"].as_str().map(str::to_owned))?
            },
        );
        for (i, (name, dir)) in dirs[1..].iter().enumerate() {
            nodes.push(node(name, &addr, dir, &[]));
            wait_for("the spare loaded", Duration::from_secs(240), || {
                (nodes_fully_loaded(&status()) == 3 + i).then_some(())
            });
        }
        Attacked {
            _bed: bed,
            coordinator,
            addr,
            attacker_id,
            _nodes: nodes,
        }
    }

    fn status(&self) -> Value {
        get_json(&format!("http://{}/status", self.addr))
    }

    /// Wait for the attacker's eviction, check that it alone went, for a reason that says
    /// `why`, that the coordinator lives, and that the swarm serves exact text without it.
    fn assert_evicted_for(&mut self, why: &str) {
        let st = wait_for("the attacker's eviction", Duration::from_secs(120), || {
            let st = self.status();
            st["evicted"].get(&self.attacker_id).is_some().then_some(st)
        });
        let reason = st["evicted"][&self.attacker_id]["reason"].as_str().unwrap();
        assert!(reason.contains(why), "{reason}");
        assert_eq!(st["evicted"].as_object().unwrap().len(), 1, "{st}");
        assert!(
            self.coordinator.is_running(),
            "the coordinator died: {}",
            self.coordinator.stderr_text()
        );
        wait_for(
            "a route without the attacker",
            Duration::from_secs(240),
            || (self.status()["serving"] == true).then_some(()),
        );
        let client = reqwest::blocking::Client::new();
        let url = format!("http://{}", self.addr);
        assert_texts_equal_the_whole_model(&client, &url, None, &PROMPTS[..1]);
        assert!(self.coordinator.is_running());
    }

    /// A request that may meet the attacker: answered, or failed with a clear error.
    fn request(&self, prompt: &str) {
        let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0});
        let (code, answer) = post(&self.addr, "/v1/completions", body);
        assert!(
            code == 200 || (code == 503 && answer["error"]["message"].is_string()),
            "{code}: {answer}"
        );
    }
}

/// A last stage that answers with a token id outside the vocabulary (which llama.cpp aborts
/// on) is evicted for it; the coordinator keeps running, the request in flight fails over
/// or fails with a clear error, and the swarm serves exact text again without the attacker.
#[test]
fn a_last_stage_sending_an_out_of_range_token_is_evicted_and_the_coordinator_survives() {
    let _one = swarm_lock();
    let mut swarm = Attacked::new(&["--test-attack", "bad-token"], 1);
    swarm.request(PROMPTS[0]);
    swarm.assert_evicted_for("outside the vocabulary");
}

/// A stage that corrupts what it serves but answers probes honestly (it can tell them
/// apart) is caught by what it served: the next stage hands back the steps it received,
/// signed by the liar, and they differ from the replay. Evicted after one checked request.
#[test]
fn a_stage_lying_only_on_served_requests_is_evicted_by_the_steps_it_signed() {
    let _one = swarm_lock();
    let mut swarm = Attacked::new(&["--test-attack", "lie-on-lanes"], 0);
    swarm.request(PROMPTS[0]);
    swarm.assert_evicted_for("hidden states it sent to stage 1 differ");
}

/// A last stage that samples wrong tokens on served requests but answers probes honestly is
/// caught by the tokens it served, against the logits the coordinator computes from its
/// input.
#[test]
fn a_last_stage_lying_only_on_served_requests_is_evicted_by_its_tokens() {
    let _one = swarm_lock();
    let mut swarm = Attacked::new(&["--test-attack", "lie-on-lanes"], 1);
    swarm.request(PROMPTS[0]);
    swarm.assert_evicted_for("logits on its input rule out");
}

/// A stage that will not hand back the steps it received fails each check: two evict it.
#[test]
fn a_stage_refusing_checks_is_evicted() {
    let _one = swarm_lock();
    let mut swarm = Attacked::new(&["--test-attack", "refuse-checks"], 1);
    swarm.request(PROMPTS[0]);
    swarm.request(PROMPTS[1]);
    swarm.assert_evicted_for("failed 2 checks of served requests");
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
        // At once past the address's share, else when its time for headers is up (10 s).
        assert_all_closed(service, &mut idle);
    }
}

/// Every idle socket is closed (waited for at most 30 s in all).
fn assert_all_closed(service: &str, idle: &mut [std::net::TcpStream]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut open = 0;
    for s in idle {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if !closed_within(s, left.max(Duration::from_millis(10))) {
            open += 1;
        }
    }
    assert_eq!(open, 0, "{service}: idle connections left open");
}

/// 1,100 connections that never start a handshake, from one address, against a node's data
/// port: the route still opens its lane and the check its probe (from another address), and
/// the idle sockets are closed, at once past the address's 8 places, else when their
/// handshake time (10 s) is up.
#[test]
fn idle_connections_from_one_address_do_not_lock_out_a_nodes_data_port() {
    let _one = swarm_lock();
    let bed = Bed::new(1, &[]);
    let coordinator = bed.coordinator(
        "127.0.0.1:0",
        &["--min-nodes", "1", "--verify-fraction", "1"],
    );
    let addr = coordinator.field("http").to_owned();
    let status = || get_json(&format!("http://{addr}/status"));
    let dirs = bed.node_dirs(1);
    let _node = node(&dirs[0].0, &addr, &dirs[0].1, &[]);
    let data_addr = wait_for("the node serving", Duration::from_secs(240), || {
        let st = status();
        (st["serving"] == true).then_some(())?;
        st["nodes"][0]["data_addr"].as_str().map(str::to_owned)
    });
    let mut idle = idle_connections("127.0.0.2", &data_addr, 1100);
    assert!(idle.len() >= 32, "{} connected", idle.len());
    let client = reqwest::blocking::Client::new();
    assert_texts_equal_the_whole_model(&client, &format!("http://{addr}"), None, &PROMPTS[..1]);
    wait_for("the request checked", Duration::from_secs(60), || {
        (status()["verify"]["requests_checked"].as_u64()? >= 1).then_some(())
    });
    assert_all_closed("node", &mut idle);
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

/// A manifest swapped between the seeder and the coordinator is refused: a coordinator given
/// the seeder's key (its `[SEEDER-KEY]`) and reaching documents signed with another key (here
/// another seeder's, standing for a machine in the middle) stops at once with a clear error;
/// given the right key, it starts.
#[test]
fn a_swapped_manifest_is_refused_under_the_seeders_key() {
    use std::io::Read;
    let _one = swarm_lock();
    let (real, other) = (Bed::new(2, &[]), Bed::new(1, &[]));
    let key = real.seeder.field("key").to_owned();
    let cache = real.work.path().join("cache").display().to_string();
    let other_url = format!("http://{}", other.seeder.field("http"));
    let mut swapped = std::process::Command::new(tests::bin("coordinator", "coordinator"))
        .args(["--listen", "127.0.0.1:0", "--seeder", &other_url])
        .args(["--seeder-key", &key, "--cache-dir", &cache])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = swapped.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = swapped.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    swapped
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the coordinator took the swapped manifest: {stderr}"
    );
    assert!(stderr.contains("signature does not check out"), "{stderr}");
    let _right = real.coordinator("127.0.0.1:0", &["--seeder-key", &key]);
}

/// `from` copied into `to`, file by file (without the node's lock and id).
fn copy_data_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == ".lock" || name == "node_id" {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_data_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
            let modified = entry.metadata().unwrap().modified().unwrap();
            let f = std::fs::File::options().write(true).open(&target).unwrap();
            f.set_modified(modified).unwrap();
        }
    }
}

/// A node that claims at REGISTER shards it does not have the bytes of (another node's
/// record of verified files, the files themselves zeros of the same size and time, so that
/// its own record still holds) is not counted as their holder: it fails the coordinator's
/// challenge (a random range of the seeder's file under a fresh nonce) and is placed like a
/// node that holds nothing: whatever it holds, it fetched.
#[test]
fn a_node_claiming_shards_without_their_bytes_is_not_counted() {
    let _one = swarm_lock();
    let bed = Bed::new(2, &[]);
    let coordinator = bed.coordinator("127.0.0.1:0", &["--min-nodes", "2"]);
    let addr = coordinator.field("http").to_owned();
    let status = || get_json(&format!("http://{addr}/status"));
    let dirs = bed.node_dirs(2);
    let _nodes: Vec<Proc> = dirs.iter().map(|(n, d)| node(n, &addr, d, &[])).collect();
    wait_for("the swarm serving", Duration::from_secs(240), || {
        let st = status();
        (st["serving"] == true && nodes_fully_loaded(&st) == 2).then_some(())
    });
    let claimer = bed.work.path().join("claimer");
    copy_data_dir(&dirs[0].1, &claimer);
    let mut zeroed = 0;
    for entry in std::fs::read_dir(claimer.join("shards")).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::metadata(&path).unwrap();
        if !meta.is_file() || path.extension().is_none_or(|e| e != "gguf") {
            continue;
        }
        std::fs::write(&path, vec![0u8; meta.len() as usize]).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(meta.modified().unwrap()).unwrap();
        zeroed += 1;
    }
    assert!(zeroed >= 1, "n0 holds no shard file");
    let _claimer = node("claimer", &addr, &claimer, &[]);
    wait_for("the claim refused", Duration::from_secs(60), || {
        coordinator
            .stderr_text()
            .contains("could not prove it holds its bytes")
            .then_some(())
    });
    let st = status();
    let holdings = &node_named(&st, "claimer").expect("the claimer registered")["shards"];
    for (shard, h) in holdings.as_object().unwrap() {
        if h["state"] == "loaded" {
            let fetched = h["from_seeder"].as_u64().unwrap() + h["from_peers"].as_u64().unwrap();
            assert!(
                fetched > 0,
                "shard {shard} counted from the claim alone: {st}"
            );
        }
    }
}

/// A machine in the middle between a node and a `wss://` coordinator answers `/ca.pem` with
/// 404 (here `openssl s_server` with a certificate of its own, answering every path so). A
/// node holding the swarm token must refuse to go on, rather than fall back to trusting the
/// system's roots (under which anyone with a public certificate for the name could pose as
/// the coordinator).
#[test]
fn a_404_for_the_swarms_ca_is_refused_not_taken_for_the_systems_roots() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "impostor.key",
        "-out",
        "impostor.pem",
        "-days",
        "1",
        "-subj",
        "/CN=impostor",
    ]);
    // With -HTTP, s_server sends a file as the whole response, status line and all.
    std::fs::write(
        dir.path().join("ca.pem"),
        "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    let mut impostor = std::process::Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            "127.0.0.1:0",
            "-cert",
            "impostor.pem",
        ])
        .args(["-key", "impostor.key", "-HTTP"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = {
        use std::io::BufRead;
        let out = std::io::BufReader::new(impostor.stdout.take().unwrap());
        // The first lines s_server prints (bounded): the one naming its address.
        out.lines()
            .take(20)
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("ACCEPT ").map(str::to_owned))
            .expect("s_server printed no ACCEPT line")
    };
    let data = dir.path().join("node");
    let (status, stderr) = node(
        "misled",
        &format!("https://{addr}"),
        &data,
        &["--token", "the-swarm-token"],
    )
    .wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("/ca.pem: answered 404"), "{stderr}");
    assert!(!data.join("coordinator-ca.pem").exists());
    let _ = impostor.kill();
    let _ = impostor.wait();
}
