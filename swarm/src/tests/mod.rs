//! The swarm rules, event by event: placement and fetching here, what a node may claim and
//! report in [`reports`], the inference route in [`route`].

mod reports;
mod route;
use super::*;
use protocol::{cmd, Capacity, Command, LoadShardParams, BROADCAST};

fn swarm(shards: u32, min_nodes: usize) -> Swarm {
    crate::fuzz::fixture(shards, min_nodes, Some("t"), 1)
}

fn register(s: &mut Swarm, id: &str, held: &[u32]) -> Result<Outbox, Refusal> {
    register_at(s, id, held, "127.0.0.1", None)
}

/// Register `id` from `ip`, with a data channel on `data_addr` if given.
fn register_at(
    s: &mut Swarm,
    id: &str,
    held: &[u32],
    ip: &str,
    data_addr: Option<&str>,
) -> Result<Outbox, Refusal> {
    register_with(s, id, held, ip, data_addr, None)
}

/// [`register_at`] with a declared uplink.
fn register_with(
    s: &mut Swarm,
    id: &str,
    held: &[u32],
    ip: &str,
    data_addr: Option<&str>,
    uplink_mbit: Option<u32>,
) -> Result<Outbox, Refusal> {
    let p = RegisterParams {
        node_id: id.into(),
        protocol_version: PROTOCOL_VERSION,
        name: id.into(),
        peer_port: peer_port(id),
        data_addr: data_addr.map(str::to_owned),
        shards: held
            .iter()
            .map(|i| protocol::HeldShard {
                shard_id: *i,
                sha256: format!("sha{i}"),
            })
            .collect(),
        capacity: Capacity {
            ram_bytes: 1000,
            disk_free_bytes: 1000,
            threads: 1,
            uplink_mbit,
            downlink_mbit: None,
        },
        token: Some("t".into()),
        signing_key: Some(crate::fuzz::signing_key_of(id)),
        tls_public_key: None,
        mesh: None,
    };
    let mut out = s.register("r", &p, ip.parse().unwrap(), 1, None)?;
    out.extend(prove_all(s, id));
    Ok(out)
}

/// `node` proves every shard it claimed, as an honest node does at once (the challenges
/// themselves left out of what is returned).
fn prove_all(s: &mut Swarm, node: &str) -> Outbox {
    let mut out = Vec::new();
    for shard in s.claims_to_challenge(node) {
        let challenge = protocol::ShardChallenge {
            shard_id: shard,
            offset: 0,
            length: 10,
            nonce: "n".into(),
        };
        assert_eq!(s.challenge(node, challenge, "right".into()).len(), 1);
        out.extend(s.proved(node, shard, Some("right")));
    }
    out
}

/// `node` reports `bytes` of `shard` verified (of 1000).
fn progress(s: &mut Swarm, node: &str, shard: u32, bytes: u64) -> Outbox {
    s.progress(
        node,
        &ShardProgressParams {
            shard_id: shard,
            bytes,
            total: 1000,
            from_seeder: 0,
            from_peers: bytes,
            by_source: Default::default(),
            upload_mbit: None,
        },
    )
}

/// Every first holder in `out` reports its first piece: the replicas waiting for it start.
fn first_pieces(s: &mut Swarm, out: &Outbox) -> Outbox {
    let mut next = Vec::new();
    for (node, p) in loads(out).into_iter().filter(|(_, p)| p.use_tracker) {
        next.extend(progress(s, &node, p.shard_id, 1));
    }
    next
}

/// Node `id`'s BitTorrent port in these tests: 7000 + its first letter.
fn peer_port(id: &str) -> u16 {
    7000 + u16::from(id.as_bytes()[0])
}

fn peer(id: &str) -> String {
    format!("127.0.0.1:{}", peer_port(id))
}

fn loads(out: &Outbox) -> Vec<(String, LoadShardParams)> {
    out.iter()
        .filter_map(|(n, c)| match &c.message {
            Message::LoadShard(p) => Some((n.clone(), p.clone())),
            _ => None,
        })
        .collect()
}

fn load_all(s: &mut Swarm, out: &Outbox) -> Outbox {
    let mut next = Vec::new();
    for (node, p) in loads(out) {
        next.extend(s.loaded(
            &node,
            &ShardLoadedParams {
                shard_id: p.shard_id,
                sha256: p.sha256.clone(),
                from_seeder: 0,
                from_peers: 0,
                by_source: Default::default(),
            },
        ));
        next.extend(prove_all(s, &node));
    }
    next
}

#[test]
fn four_nodes_one_shard_each_then_ready() {
    let mut s = swarm(4, 4);
    let mut out = Vec::new();
    for id in ["a", "b", "c", "d"] {
        out.extend(register(&mut s, id, &[]).unwrap());
    }
    let l = loads(&out);
    let placed: Vec<u32> = l.iter().map(|(_, p)| p.shard_id).collect();
    assert_eq!(placed, [0, 1, 2, 3]);
    assert!(l.iter().all(|(_, p)| p.use_tracker));
    let out = load_all(&mut s, &out);
    assert!(s.ready);
    assert!(out
        .iter()
        .any(|(to, c)| to == BROADCAST && c.message.command() == cmd::SWARM_READY));
}

#[test]
fn replicas_trail_the_first_holder_and_fall_back_to_the_tracker() {
    let mut s = swarm(2, 2);
    let out: Outbox = ["a", "b", "c", "d"]
        .iter()
        .flat_map(|id| register(&mut s, id, &[]).unwrap())
        .collect();
    let mut l = loads(&out);
    assert_eq!(l.len(), 2, "replicas wait for a live source: {l:?}");
    l.extend(loads(&first_pieces(&mut s, &out)));
    assert_eq!(l.len(), 4, "{l:?}");
    for (node, primary, shard) in [
        ("a", true, 0),
        ("b", true, 1),
        ("c", false, 0),
        ("d", false, 1),
    ] {
        let (_, p) = l.iter().find(|(n, _)| n == node).expect("every node loads");
        assert_eq!(p.shard_id, shard, "{node}");
        assert_eq!(
            p.use_tracker, primary,
            "only first holders use the tracker: {node}"
        );
        if !primary {
            // A replica starts at once from the node still fetching, not from the seeder.
            let source = if shard == 0 { "a" } else { "b" };
            assert_eq!(p.peers, [peer(source)], "{node}");
        }
    }
    // The primary of shard 0 goes away before finishing: its replica fetches via the tracker.
    let l = loads(&s.disconnected("a", 1));
    assert!(
        l.iter()
            .any(|(n, p)| n == "c" && p.shard_id == 0 && p.use_tracker),
        "{l:?}"
    );
    // A replica that finished stays put when its source goes.
    let done = ShardLoadedParams {
        shard_id: 1,
        sha256: "sha1".into(),
        from_seeder: 0,
        from_peers: 100,
        by_source: Default::default(),
    };
    s.loaded("d", &done);
    prove_all(&mut s, "d");
    assert!(loads(&s.disconnected("b", 1)).iter().all(|(n, _)| n != "d"));
}

/// A holder the coordinator cannot dial is nobody's source: a replica trailing it alone is
/// sent to the tracker at once, and one placed later starts with the tracker.
#[test]
fn a_holder_that_cannot_be_dialled_is_no_replicas_only_source() {
    let mut s = swarm(2, 2);
    let out: Outbox = ["a", "b", "c", "d"]
        .iter()
        .flat_map(|id| register(&mut s, id, &[]).unwrap())
        .collect();
    // b's replica does not wait for b: it starts at once, through the tracker.
    let l = loads(&s.dialed("b", false));
    let (_, d) = l.iter().find(|(n, _)| n == "d").expect("d starts");
    assert_eq!(
        (d.shard_id, d.use_tracker),
        (1, true),
        "b cannot be dialled"
    );
    assert!(s.dialed("a", true).is_empty());
    let l = loads(&first_pieces(&mut s, &out));
    let (_, c) = l.iter().find(|(n, _)| n == "c").expect("c starts");
    assert_eq!((c.shard_id, c.use_tracker), (0, false), "a can be dialled");
    assert_eq!(c.peers, [peer("a")]);
    // a turns out undialable after all (it was checked late): c goes to the tracker.
    let l = loads(&s.dialed("a", false));
    assert!(
        l.iter()
            .any(|(n, p)| n == "c" && p.shard_id == 0 && p.use_tracker),
        "{l:?}"
    );
    let status = s.status(None, Default::default());
    let b = status.nodes.iter().find(|n| n.node_id == "b").unwrap();
    assert_eq!(b.peer_dialable, Some(false));
}

/// A shard's holders form a chain, each replica fetching from the holder before it once that
/// one has a piece; when the first holder goes mid-transfer, the replica furthest along is sent
/// to the tracker and the others keep what they have.
#[test]
fn replicas_fetch_from_every_holder_and_the_furthest_takes_over_a_lost_feed() {
    let mut s = swarm(2, 2);
    let mut out = Vec::new();
    for id in ["a", "b", "c", "d", "e"] {
        out.extend(register(&mut s, id, &[]).unwrap());
    }
    let fed = first_pieces(&mut s, &out);
    let (_, c) = loads(&fed)
        .into_iter()
        .find(|(n, _)| n == "c")
        .expect("c loads");
    assert_eq!(c.peers, [peer("a")]);
    assert!(
        loads(&fed).iter().all(|(n, _)| n != "e"),
        "e waits for c, the holder before it, to have a piece"
    );
    let (_, e) = loads(&progress(&mut s, "c", 0, 1))
        .into_iter()
        .find(|(n, _)| n == "e")
        .expect("e loads");
    assert_eq!(
        e.peers,
        [peer("c")],
        "the chain a -> c -> e: each fetches from the one before"
    );
    assert!(!e.use_tracker);
    for (node, bytes) in [("c", 300), ("e", 700)] {
        progress(&mut s, node, 0, bytes);
    }
    let l = loads(&s.disconnected("a", 1));
    let to_tracker: Vec<&str> = l
        .iter()
        .filter(|(_, p)| p.shard_id == 0 && p.use_tracker)
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(to_tracker, ["e"], "{l:?}");
    let (_, c) = l.iter().find(|(n, _)| n == "c").expect("c is told");
    assert_eq!(
        (c.peers.clone(), c.use_tracker),
        (vec![peer("e")], false),
        "c, which lost the holder before it, fetches from e"
    );
}

/// Nodes that declare their uplinks: first copies wait for the awaited nodes and go to the
/// fastest uplinks; the slow nodes trail as replicas.
#[test]
fn first_copies_go_to_the_fastest_declared_uplinks() {
    let mut s = swarm(2, 4);
    s.settle_until = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    for (id, up) in [("a", 10), ("b", 100), ("c", 10)] {
        out.extend(register_with(&mut s, id, &[], "127.0.0.1", None, Some(up)).unwrap());
    }
    assert!(
        loads(&out).is_empty(),
        "first copies wait for the 4th node: {out:?}"
    );
    out.extend(register_with(&mut s, "d", &[], "127.0.0.1", None, Some(80)).unwrap());
    let fed = first_pieces(&mut s, &out);
    out.extend(fed);
    let mut first: Vec<&str> = loads(&out)
        .iter()
        .filter(|(_, p)| p.use_tracker)
        .map(|(n, _)| match n.as_str() {
            "b" => "b",
            "d" => "d",
            other => panic!("{other}, a slow node, got a first copy"),
        })
        .collect();
    first.sort();
    assert_eq!(first, ["b", "d"]);
    let replicas: Vec<String> = loads(&out)
        .into_iter()
        .filter(|(_, p)| !p.use_tracker)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(replicas.len(), 2, "a and c trail as replicas: {replicas:?}");
}

#[test]
fn a_dropped_holder_is_replaced_by_the_spare() {
    let mut s = swarm(4, 4);
    let out: Outbox = ["a", "b", "c", "d", "e"]
        .iter()
        .flat_map(|id| register(&mut s, id, &[]).unwrap())
        .collect();
    load_all(&mut s, &out);
    assert!(s.ready);
    let out = s.disconnected("c", 1);
    assert!(!s.ready, "a lost shard makes the swarm not ready");
    assert!(out
        .iter()
        .any(|(_, c)| c.message.command() == cmd::SWARM_NOT_READY));
    let l = loads(&out);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].1.shard_id, 2);
    assert!(
        ["a", "e"].contains(&l[0].0.as_str()),
        "a node whose shard has a replica takes it: {}",
        l[0].0
    );
    load_all(&mut s, &out);
    assert!(s.ready);
}

#[test]
fn held_shards_are_kept_and_refusals_are_named() {
    let mut s = swarm(2, 2);
    let out = register(&mut s, "a", &[1]).unwrap();
    assert!(
        loads(&out).is_empty(),
        "a keeps shard 1 and waits for a second node for shard 0"
    );
    let out = register(&mut s, "b", &[0]).unwrap();
    assert!(loads(&out).is_empty());
    assert!(
        s.ready,
        "two nodes holding both shards are ready without any fetch"
    );
    let mut bad = swarm(2, 2);
    let p = RegisterParams {
        node_id: "x".into(),
        protocol_version: PROTOCOL_VERSION,
        name: "x".into(),
        peer_port: 1,
        data_addr: None,
        shards: vec![protocol::HeldShard {
            shard_id: 0,
            sha256: "other".into(),
        }],
        capacity: Capacity::default(),
        token: Some("t".into()),
        signing_key: None,
        tls_public_key: None,
        mesh: None,
    };
    let req = Command::new(cmd::REGISTER, "x", COORDINATOR, &p);
    assert_eq!(
        bad.register(&req.request_id, &p, "127.0.0.1".parse().unwrap(), 1, None)
            .unwrap_err()
            .0,
        code::FOREIGN_SHARDS
    );
    let wrong = RegisterParams {
        token: Some("no".into()),
        shards: vec![],
        ..p
    };
    assert_eq!(
        bad.register(
            &req.request_id,
            &wrong,
            "127.0.0.1".parse().unwrap(),
            1,
            None
        )
        .unwrap_err()
        .0,
        code::UNAUTHORIZED
    );
    // A signing key that is not one (it goes on to the next stage in ROUTE).
    let oversized = RegisterParams {
        token: Some("t".into()),
        signing_key: Some("k".repeat(100_000)),
        ..wrong
    };
    let refused = bad
        .register(
            &req.request_id,
            &oversized,
            "127.0.0.1".parse().unwrap(),
            1,
            None,
        )
        .unwrap_err();
    assert_eq!(refused.0, code::BAD_PARAMS, "{refused}");
    assert!(bad.nodes.is_empty());
}

#[test]
fn silent_nodes_are_dropped_after_the_heartbeat_timeout() {
    let mut s = swarm(1, 1);
    let out = register(&mut s, "a", &[]).unwrap();
    load_all(&mut s, &out);
    assert!(s.ready);
    let (out, dead) = s.expire(Instant::now() + Duration::from_secs(5));
    assert!(
        dead.is_empty() && out.is_empty(),
        "5 s of silence is within the 10 s timeout"
    );
    let (out, dead) = s.expire(Instant::now() + Duration::from_secs(11));
    assert_eq!(dead, ["a"]);
    assert!(!s.ready);
    assert!(out
        .iter()
        .any(|(_, c)| c.message.command() == cmd::SWARM_NOT_READY));
}

#[test]
fn nodes_without_room_get_nothing() {
    let mut s = swarm(1, 1);
    s.shards[0].size = 5000;
    let out = register(&mut s, "a", &[]).unwrap();
    assert!(loads(&out).is_empty());
}

/// A node that fails a shard (a full disk) is not given it again at once: no loop of
/// LOAD_SHARD and SHARD_FAILED as fast as messages go.
#[test]
fn a_failed_shard_is_not_retried_on_the_same_node_at_once() {
    let mut s = swarm(1, 1);
    let out = register(&mut s, "a", &[]).unwrap();
    assert_eq!(loads(&out).len(), 1);
    let out = s.failed(
        "a",
        &ShardFailedParams {
            shard_id: 0,
            code: "no_space".into(),
            message: "disk full".into(),
        },
    );
    assert!(loads(&out).is_empty(), "given the shard again at once");
    for _ in 0..5 {
        assert!(loads(&s.place()).is_empty());
    }
    assert_eq!(
        status_json(&s)["nodes"][0]["shards"]["0"]["state"],
        "failed"
    );
    // Another node takes it.
    let out = register(&mut s, "b", &[]).unwrap();
    assert_eq!(loads(&out).len(), 1);
    assert_eq!(loads(&out)[0].0, "b");
}

/// The swarm's `/status` document as JSON, as its readers see it.
fn status_json(s: &Swarm) -> serde_json::Value {
    serde_json::to_value(s.status(None, Default::default())).expect("a status serialises")
}
