//! Nodes behind home routers (network namespaces, nftables masquerade, unsolicited inbound
//! dropped) join a swarm whose seeder, relay and coordinator are on a public address, fetch
//! their shards, and serve the whole model's greedy text over the mesh; `/status` names every
//! edge's kind. Needs root (CI runs as root).
//!
//! The homes: 10.1.0.0/24 and 10.2.0.0/24, two nodes each, behind routers at 198.19.0.11 and
//! .12; the rendezvous host (seeder with `--relay-port`, coordinator) at 198.19.0.1.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use tests::api::{assert_texts_equal_the_whole_model, PROMPTS};
use tests::netns::{Home, Host, Internet};
use tests::{bin, get_json, real_shards, route_edges, swarm_lock, wait_for, Proc};

/// What the edge into a stage must be: between two homes (or from the coordinator to a
/// home), a hole the NATs let through, or the relay when UDP between homes is blocked; inside
/// a home, the LAN itself.
fn expected_kind(
    caller_home: Option<u8>,
    callee_home: u8,
    udp_between_homes: bool,
) -> &'static str {
    match caller_home {
        Some(h) if h == callee_home => "direct",
        Some(_) if !udp_between_homes => "relayed",
        _ => "holepunched",
    }
}

struct NatSwarm {
    /// Node name -> its home.
    home_of: BTreeMap<String, u8>,
    http: String,
    /// The relay's port (on the public host).
    relay_port: u16,
    public: Host,
    homes: Vec<Home>,
    // Dropped in this order: processes before the namespaces they run in.
    nodes: Vec<Proc>,
    _coordinator: Proc,
    _seeder: Proc,
    _work: tempfile::TempDir,
    _seed: tempfile::TempDir,
    _net: Internet,
}

/// Four nodes in two homes, the rendezvous host public; with `udp_between_homes` false, each
/// router drops UDP to the other home (only the relay joins them).
fn nat_swarm(udp_between_homes: bool) -> NatSwarm {
    let mut net = Internet::new();
    let public = net.public_host("pub", 1);
    let mut homes = [net.home(1), net.home(2)];
    let mut hosts: Vec<(String, u8, Host)> = Vec::new();
    for home in &mut homes {
        for k in 0..2 {
            let name = format!("h{}n{k}", home.index);
            let host = net.home_host(home, &name);
            hosts.push((name, home.index, host));
        }
        if !udp_between_homes {
            home.block_udp_except_to(&public);
        }
    }
    let seed = real_shards(4);
    let work = tempfile::tempdir().unwrap();
    let arg = |s: &str| s.to_owned();
    let path = |p: &std::path::Path| p.display().to_string();
    let seeder = public.start(
        "seeder",
        &bin("seeder", "server"),
        &[
            arg("--listen-addr"),
            public.ip.clone(),
            arg("--port"),
            arg("0"),
            arg("--http-port"),
            arg("0"),
            arg("--relay-port"),
            arg("0"),
            arg("--seed-dir"),
            path(seed.path()),
            arg("--state-dir"),
            path(&work.path().join("seeder")),
        ],
    );
    let coordinator = public.start(
        "coordinator",
        &bin("coordinator", "coordinator"),
        &[
            arg("--listen"),
            format!("{}:0", public.ip),
            arg("--seeder"),
            format!("http://{}", seeder.field("http")),
            arg("--min-nodes"),
            arg("4"),
            // Open and plain: what this test is about is the paths, not access control.
            arg("--insecure"),
            arg("--cache-dir"),
            path(&work.path().join("cache")),
            arg("--state-dir"),
            path(&work.path().join("coordinator")),
        ],
    );
    let http = coordinator.field("http").to_owned();
    let relay_port = seeder
        .field("relay")
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the relay's URL has a port");
    let nodes = hosts
        .iter()
        .map(|(name, _, host)| {
            host.start(
                name,
                &bin("node", "node"),
                &[
                    arg("--coordinator"),
                    format!("http://{http}"),
                    arg("--data-dir"),
                    path(&work.path().join(name)),
                    arg("--name"),
                    name.clone(),
                    arg("--listen-addr"),
                    host.ip.clone(),
                    arg("--threads"),
                    arg("1"),
                ],
            )
        })
        .collect();
    NatSwarm {
        home_of: hosts.iter().map(|(n, h, _)| (n.clone(), *h)).collect(),
        http,
        relay_port,
        public,
        homes: homes.into(),
        nodes,
        _coordinator: coordinator,
        _seeder: seeder,
        _work: work,
        _seed: seed,
        _net: net,
    }
}

impl NatSwarm {
    fn status(&self) -> Value {
        get_json(&format!("http://{}/status", self.http))
    }

    /// Serving, the text exact, then every route edge of the kind `expected_kind` gives
    /// (bounded wait: a hole is punched a little after the first packets go through the
    /// relay), and its round-trip time measured.
    fn check(&self, udp_between_homes: bool) {
        wait_for("the pipeline serving", Duration::from_secs(300), || {
            (self.status()["serving"] == true).then_some(())
        });
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let base = format!("http://{}", self.http);
        assert_texts_equal_the_whole_model(&client, &base, None, &PROMPTS[..2]);
        // Nobody outside a home can dial its nodes' BitTorrent ports: the coordinator's check
        // finds that out (within its 5 s dial), and they fetched all the same.
        wait_for(
            "every node's reachability checked",
            Duration::from_secs(30),
            || {
                let status = self.status();
                let nodes = status["nodes"].as_array()?.clone();
                nodes
                    .iter()
                    .all(|n| n["peer_dialable"] == false)
                    .then_some(())
            },
        );
        let mut last = Value::Null;
        let seen = (0..60).find_map(|_| {
            // Keep the lanes busy so that the paths are exercised while we look.
            let asked = client
                .post(format!("{base}/v1/completions"))
                .json(&serde_json::json!({"prompt": PROMPTS[0], "max_tokens": 4}))
                .send();
            assert!(asked.is_ok_and(|r| r.status().is_success()));
            last = self.status();
            let edges = self.edges(&last);
            let want = self.expected(&last, udp_between_homes);
            if edges == want {
                Some(edges)
            } else {
                std::thread::sleep(Duration::from_millis(500));
                None
            }
        });
        let seen = seen.unwrap_or_else(|| {
            panic!(
                "route edges {:?}, wanted {:?}; status route: {}\nnode logs:\n{}",
                self.edges(&last),
                self.expected(&last, udp_between_homes),
                last["route"],
                self.nodes
                    .iter()
                    .map(|n| format!("--- {}\n{}", n.name, n.stderr_text()))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        eprintln!("route edges: {seen:?}");
        // Still exact after the paths changed under the lanes.
        assert_texts_equal_the_whole_model(&client, &base, None, &PROMPTS[2..]);
        for stage in last["route"].as_array().unwrap() {
            assert!(
                stage["edge"]["rtt_us"].as_u64().is_some(),
                "no round-trip time measured: {stage}"
            );
        }
    }

    fn home_of_id(&self, status: &Value, node_id: &Value) -> u8 {
        let node = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| &n["node_id"] == node_id)
            .unwrap_or_else(|| panic!("route names {node_id}, not in {status}"));
        self.home_of[node["name"].as_str().unwrap()]
    }

    /// Each route stage's edge kind as `/status` shows it, then the answer lane's.
    fn edges(&self, status: &Value) -> Vec<String> {
        route_edges(status)
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or("unmeasured").to_owned())
            .collect()
    }

    /// The kinds the route in `status` must show: the coordinator (public) reaches stage 0,
    /// and the last stage for its answer lane, through their routers' mappings.
    fn expected(&self, status: &Value, udp_between_homes: bool) -> Vec<String> {
        let route = status["route"].as_array().cloned().unwrap_or_default();
        let homes: Vec<u8> = route
            .iter()
            .map(|s| self.home_of_id(status, &s["node_id"]))
            .collect();
        let mut kinds: Vec<String> = homes
            .iter()
            .enumerate()
            .map(|(i, &home)| {
                let caller = i.checked_sub(1).map(|p| homes[p]);
                expected_kind(caller, home, udp_between_homes).to_owned()
            })
            .collect();
        if !route.is_empty() {
            kinds.push("holepunched".to_owned());
        }
        kinds
    }
}

fn must_be_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the NAT tests build network namespaces: run them as root (CI does)"
    );
}

#[test]
fn nodes_behind_two_home_nats_serve_the_whole_models_text_over_punched_holes() {
    must_be_root();
    let _one = swarm_lock();
    let swarm = nat_swarm(true);
    swarm.check(true);
}

#[test]
fn with_udp_between_the_homes_blocked_their_edges_go_through_the_relay_and_stay_exact() {
    must_be_root();
    let _one = swarm_lock();
    let swarm = nat_swarm(false);
    swarm.check(false);
}

/// With UDP between the homes blocked, the edge between them runs through the relay. Home 2
/// loses its relay connections (its router resets them and refuses new ones for 3 s) while a
/// request is in flight: the nodes reconnect, the request completes or fails over with the
/// whole model's text, and the next request runs through the relay again.
#[test]
fn a_home_that_loses_the_relay_mid_request_reconnects_and_the_text_stays_exact() {
    must_be_root();
    let _one = swarm_lock();
    let swarm = nat_swarm(false);
    swarm.check(false);
    let prompt = PROMPTS[0];
    let reference = llm::reference_completion(&tests::api::model(), prompt, 64, 1).unwrap();
    let base = format!("http://{}", swarm.http);
    let asking = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(180))
            .build()
            .unwrap();
        let body: Value = client
            .post(format!("{base}/v1/completions"))
            .json(&serde_json::json!({"prompt": prompt, "max_tokens": 64, "temperature": 0}))
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("the request in flight: {e}"));
        eprintln!("the request in flight took {:?}", started.elapsed());
        body
    });
    std::thread::sleep(Duration::from_millis(150));
    swarm.homes[1].cut_tcp_to(&swarm.public, swarm.relay_port);
    assert!(
        !asking.is_finished(),
        "the request ended before the relay was cut: nothing was in flight"
    );
    std::thread::sleep(Duration::from_secs(3));
    swarm.homes[1].mend();
    let body = asking.join().unwrap();
    assert_eq!(
        body["choices"][0]["text"],
        reference.text.as_str(),
        "the request in flight: {body}"
    );
    // Reconnected: the relay carries the edge between the homes again.
    swarm.check(false);
}
