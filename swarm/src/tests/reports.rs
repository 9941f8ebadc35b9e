//! What a node may report, and what the coordinator believes of it: only shards it was given,
//! bounded sources and rates, and a route that gives each stage a node of its own.

use super::*;
use protocol::Capacity;

/// `node` reports `shard` loaded with the manifest's sha256 (and proves it, if asked).
fn report_loaded(s: &mut Swarm, node: &str, shard: u32) -> Outbox {
    let mut out = s.loaded(
        node,
        &ShardLoadedParams {
            shard_id: shard,
            sha256: format!("sha{shard}"),
            from_seeder: 0,
            from_peers: 0,
            by_source: Default::default(),
        },
    );
    out.extend(prove_all(s, node));
    out
}

#[test]
fn reports_on_shards_a_node_was_not_given_change_nothing() {
    let mut s = swarm(2, 2);
    let out = register(&mut s, "a", &[]).unwrap();
    assert_eq!(
        loads(&out).len(),
        1,
        "a node gets one shard while others are awaited"
    );
    let given = loads(&out)[0].1.shard_id;
    let other = 1 - given;
    // Loaded, progress and failure on the shard it was not given, and on one that does not
    // exist: ignored, so the node holds nothing it was not given.
    report_loaded(&mut s, "a", other);
    progress(&mut s, "a", other, 500);
    report_loaded(&mut s, "a", 77);
    progress(&mut s, "a", 4_000_000_000, 1);
    s.failed(
        "a",
        &ShardFailedParams {
            shard_id: 99,
            code: "x".into(),
            message: "x".into(),
        },
    );
    let node = &s.nodes["a"];
    assert_eq!(node.shards.keys().copied().collect::<Vec<_>>(), vec![given]);
    assert!(node.fetched_from.keys().all(|k| *k == given));
    assert_eq!(s.holders(other), 0);
    // The shard it was given loads as before.
    report_loaded(&mut s, "a", given);
    assert_eq!(s.holders(given), 1);
}

#[test]
fn a_nodes_byte_sources_and_rates_are_bounded() {
    let mut s = swarm(1, 1);
    let out = register(&mut s, "a", &[]).unwrap();
    assert_eq!(loads(&out).len(), 1);
    let by_source = (0..1000).map(|i| (format!("10.0.0.1:{i}"), i)).collect();
    s.progress(
        "a",
        &ShardProgressParams {
            shard_id: 0,
            bytes: 1,
            total: 1000,
            from_seeder: 0,
            from_peers: 1,
            by_source,
            upload_mbit: Some(u32::MAX),
        },
    );
    let node = &s.nodes["a"];
    assert_eq!(node.fetched_from[&0].len(), MAX_SOURCES);
    assert_eq!(
        node.fetched_from[&0]["10.0.0.1:999"], 999,
        "the largest are kept"
    );
    assert_eq!(node.measured_uplink_mbit, None, "no link is that fast");
}

#[test]
fn a_route_puts_each_stage_on_a_node_of_its_own_where_it_can() {
    let mut s = swarm(2, 2);
    register_at(&mut s, "a", &[0, 1], "127.0.0.1", Some("127.0.0.1:9001")).unwrap();
    register_at(&mut s, "b", &[1], "127.0.0.1", Some("127.0.0.1:9002")).unwrap();
    let route = s.route.clone().expect("ready with both shards held");
    let nodes: Vec<&str> = route.iter().map(|h| h.node_id.as_str()).collect();
    assert_eq!(nodes, ["a", "b"], "stage 1 on b, not a second stage on a");
}

/// A shard claimed at REGISTER counts only once proved: a wrong digest, no answer within
/// CLAIM_WAIT, or a proof nobody asked for leave it uncounted, and the node is then placed
/// like one that holds nothing.
#[test]
fn a_claimed_shard_counts_only_once_proved() {
    let mut s = swarm(2, 1);
    let p = RegisterParams {
        node_id: "liar".into(),
        protocol_version: PROTOCOL_VERSION,
        name: "liar".into(),
        peer_port: 1,
        data_addr: None,
        shards: vec![
            protocol::HeldShard {
                shard_id: 0,
                sha256: "sha0".into(),
            },
            protocol::HeldShard {
                shard_id: 1,
                sha256: "sha1".into(),
            },
        ],
        capacity: Capacity {
            ram_bytes: 1000,
            disk_free_bytes: 1000,
            threads: 1,
            uplink_mbit: None,
            downlink_mbit: None,
        },
        token: Some("t".into()),
        signing_key: None,
        tls_public_key: None,
        mesh: None,
    };
    let out = s
        .register("r", &p, "10.0.0.9".parse().unwrap(), 1, None)
        .unwrap();
    assert!(!out
        .iter()
        .any(|(_, c)| matches!(c.message, Message::LoadShard(_))));
    assert!(s.nodes["liar"].shards.is_empty() && !s.ready);
    assert_eq!(s.unproven("liar"), vec![0, 1]);
    // An answer before any challenge is ignored.
    assert!(s.proved("liar", 0, Some("guess")).is_empty());
    assert_eq!(s.unproven("liar"), vec![0, 1]);
    // A wrong digest: shard 0 does not count.
    let challenge = protocol::ShardChallenge {
        shard_id: 0,
        offset: 5,
        length: 10,
        nonce: "n".into(),
    };
    assert_eq!(s.challenge("liar", challenge, "right".into()).len(), 1);
    s.proved("liar", 0, Some("wrong"));
    assert!(!s.nodes["liar"].shards.contains_key(&0));
    assert_eq!(s.unproven("liar"), vec![1]);
    // Shard 1 is never answered: its claim expires, and the node is given a shard to fetch.
    let long_ago = Instant::now()
        .checked_sub(CLAIM_WAIT + Duration::from_secs(1))
        .unwrap();
    s.nodes.get_mut("liar").unwrap().claimed.insert(
        1,
        Claim {
            since: long_ago,
            from_seeder: 0,
            from_peers: 0,
        },
    );
    let (out, _) = s.expire(Instant::now());
    assert!(s.unproven("liar").is_empty());
    assert!(s.nodes["liar"]
        .shards
        .values()
        .all(|h| !matches!(h, Holding::Loaded { .. })));
    assert!(
        out.iter()
            .any(|(_, c)| matches!(c.message, Message::LoadShard(_))),
        "placed like a node holding nothing"
    );
}

/// A heartbeat's mesh address must be well formed and of the endpoint the node registered,
/// or nothing of the heartbeat is kept; a node flipping its next edge to relayed in every
/// heartbeat is logged about once a minute, not once per flip.
#[test]
fn heartbeats_keep_the_endpoint_and_a_flipping_edge_is_said_once() {
    use protocol::status::{Edge, EdgeKind};
    let mut s = swarm(1, 1);
    register_at(&mut s, "a", &[], "127.0.0.1", None).unwrap();
    let mesh = |id: char| protocol::MeshAddr {
        endpoint_id: id.to_string().repeat(64),
        relay_url: None,
        addrs: Vec::new(),
        interfaces: Vec::new(),
    };
    let edge = |kind| {
        Some(Edge {
            kind,
            rtt_us: Some(1),
        })
    };
    let beat = |mesh, next_edge| protocol::HeartbeatParams { mesh, next_edge };
    s.heard("a", &beat(Some(mesh('a')), None)).unwrap();
    // Another endpoint id, or a malformed one, is refused and its edge not kept.
    for bad in [mesh('b'), mesh('z')] {
        assert!(s
            .heard("a", &beat(Some(bad), edge(EdgeKind::Relayed)))
            .is_err());
        assert_eq!(s.nodes["a"].next_edge, None);
    }
    assert_eq!(s.nodes["a"].mesh, Some(mesh('a')));
    s.heard("a", &beat(None, edge(EdgeKind::Relayed))).unwrap();
    let said = s.nodes["a"].relayed_said_at.expect("said");
    for kind in [
        EdgeKind::Direct,
        EdgeKind::Relayed,
        EdgeKind::Direct,
        EdgeKind::Relayed,
    ] {
        s.heard("a", &beat(None, edge(kind))).unwrap();
    }
    assert_eq!(s.nodes["a"].next_edge, edge(EdgeKind::Relayed));
    assert_eq!(s.nodes["a"].relayed_said_at, Some(said), "said once");
}
