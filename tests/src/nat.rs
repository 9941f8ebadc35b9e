//! Four nodes in two homes behind NAT routers, the rendezvous host (seeder with its relay,
//! coordinator) public: the swarm `tests/tests/nat.rs` checks and `bench/wan.py` measures
//! (through the `netlab` binary). See [`crate::netns`] for the network.
//!
//! The homes: 10.1.0.0/24 and 10.2.0.0/24, two nodes each, behind routers at 198.19.0.11 and
//! .12; the rendezvous host at 198.19.0.1.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::api::{assert_texts_equal_the_whole_model, PROMPTS};
use crate::netns::{Home, Host, Internet};
use crate::{bin, get_json, real_shards, route_edges, wait_for, Proc};
use serde_json::Value;

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

/// The swarm and its network; all of it stopped and deleted on drop.
pub struct NatSwarm {
    /// Node name -> its home.
    pub home_of: BTreeMap<String, u8>,
    /// The coordinator's address (reached from the test's namespace).
    pub http: String,
    /// The relay's port (on the public host).
    pub relay_port: u16,
    pub public: Host,
    pub homes: Vec<Home>,
    /// Whether UDP goes between the homes (else each router drops it: only the relay joins
    /// them).
    pub udp_between_homes: bool,
    // Dropped in this order: processes before the namespaces they run in.
    pub nodes: Vec<Proc>,
    _coordinator: Proc,
    _seeder: Proc,
    _work: tempfile::TempDir,
    _seed: tempfile::TempDir,
    _net: Internet,
}

/// Four nodes in two homes, the rendezvous host public; with `udp_between_homes` false, each
/// router drops UDP to the other home (only the relay joins them); with `delayed`, each
/// router's link to the public network runs through a delay ([`Home::set_delay`]).
pub fn nat_swarm(udp_between_homes: bool, delayed: bool) -> NatSwarm {
    let mut net = Internet::new();
    let public = net.public_host("pub", 1);
    let mut homes = if delayed {
        [net.home_with_delay(1), net.home_with_delay(2)]
    } else {
        [net.home(1), net.home(2)]
    };
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
        udp_between_homes,
        nodes,
        _coordinator: coordinator,
        _seeder: seeder,
        _work: work,
        _seed: seed,
        _net: net,
    }
}

impl NatSwarm {
    /// One short request: the lanes carry traffic (and their paths are measured) while a
    /// test looks at them.
    pub fn exercise(&self, client: &reqwest::blocking::Client) {
        let asked = client
            .post(format!("http://{}/v1/completions", self.http))
            .json(&serde_json::json!({"prompt": PROMPTS[0], "max_tokens": 4}))
            .send();
        assert!(asked.is_ok_and(|r| r.status().is_success()));
    }

    pub fn status(&self) -> Value {
        get_json(&format!("http://{}/status", self.http))
    }

    /// Serving, the text exact, then every route edge of the kind `expected_kind` gives
    /// (bounded wait: a hole is punched a little after the first packets go through the
    /// relay), and its round-trip time measured.
    pub fn check(&self) {
        let udp_between_homes = self.udp_between_homes;
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
            self.exercise(&client);
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

    /// For each route edge (as [`route_edges`] lists them), how many delayed links (a
    /// home's link to the public network) it crosses one way: one between the coordinator
    /// and a home, two between the homes, none inside a home.
    pub fn delayed_links_crossed(&self, status: &Value) -> Vec<u32> {
        let homes = self.route_homes(status);
        let mut callers = vec![None];
        callers.extend(homes.iter().map(|&h| Some(h)));
        let mut links: Vec<u32> = homes
            .iter()
            .zip(&callers)
            .map(|(&callee, &caller)| match caller {
                None => 1,
                Some(c) if c == callee => 0,
                Some(_) => 2,
            })
            .collect();
        if !homes.is_empty() {
            links.push(1);
        }
        links
    }

    /// The home of each route stage's node, in stage order.
    fn route_homes(&self, status: &Value) -> Vec<u8> {
        let route = status["route"].as_array().cloned().unwrap_or_default();
        route
            .iter()
            .map(|s| self.home_of_id(status, &s["node_id"]))
            .collect()
    }

    /// Each route stage's edge kind as `/status` shows it, then the answer lane's.
    pub fn edges(&self, status: &Value) -> Vec<String> {
        route_edges(status)
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or("unmeasured").to_owned())
            .collect()
    }

    /// The kinds the route in `status` must show: the coordinator (public) reaches stage 0,
    /// and the last stage for its answer lane, through their routers' mappings.
    fn expected(&self, status: &Value, udp_between_homes: bool) -> Vec<String> {
        let homes = self.route_homes(status);
        let mut kinds: Vec<String> = homes
            .iter()
            .enumerate()
            .map(|(i, &home)| {
                let caller = i.checked_sub(1).map(|p| homes[p]);
                expected_kind(caller, home, udp_between_homes).to_owned()
            })
            .collect();
        if !homes.is_empty() {
            kinds.push("holepunched".to_owned());
        }
        kinds
    }
}
