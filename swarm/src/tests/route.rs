//! The inference route: which holder serves each stage (kept while it holds the shard, near
//! the stage before it where it can), the hop and probe keys, and how many stages share a
//! machine.

use super::*;

/// Among a shard's holders, the route takes one in the same network as the stage before it
/// (registered from the same address: behind the same NAT), whose hop then runs on their LAN.
#[test]
fn the_route_keeps_consecutive_stages_in_one_network_where_it_can() {
    let mut s = swarm(2, 3);
    for (id, ip, held) in [
        ("a", "198.51.100.1", 0),
        ("b", "198.51.100.2", 1),
        ("c", "198.51.100.1", 1),
    ] {
        register_at(&mut s, id, &[held], ip, Some("0.0.0.0:9000")).unwrap();
    }
    assert!(s.ready);
    let route: Vec<&str> = s
        .route
        .as_ref()
        .unwrap()
        .iter()
        .map(|h| h.node_id.as_str())
        .collect();
    assert_eq!(
        route,
        ["a", "c"],
        "b comes first by id, c shares a's network"
    );
}

/// `ROUTE` tells each stage how many of the route's stages share its machine (by the host of
/// the data addresses), so that stages working at once on one machine share its cores.
#[test]
fn the_route_counts_the_stages_on_each_machine() {
    let mut s = swarm(4, 4);
    let mut out = Vec::new();
    for (id, ip) in [
        ("a", "10.0.0.1"),
        ("b", "10.0.0.1"),
        ("c", "10.0.0.2"),
        ("d", "10.0.0.1"),
    ] {
        out.extend(register_at(&mut s, id, &[], ip, Some("0.0.0.0:9000")).unwrap());
    }
    let mut out = load_all(&mut s, &out);
    // Every stage acknowledges its ROUTE by loading it; the messages carry the counts.
    out.retain(|(_, c)| matches!(c.message, Message::Route(_)));
    let mut counts: Vec<(String, u32)> = out
        .iter()
        .filter_map(|(to, c)| match &c.message {
            Message::Route(protocol::Route::Assign(p)) => Some((to.clone(), p.co_located)),
            _ => None,
        })
        .collect();
    counts.sort();
    let expected: Vec<(String, u32)> = [("a", 3), ("b", 3), ("c", 1), ("d", 3)]
        .iter()
        .map(|(n, k)| (n.to_string(), *k))
        .collect();
    assert_eq!(counts, expected);
    // The engine keeps one micro-batch in flight per machine.
    let route = s.route.clone().expect("a route");
    assert_eq!(super::machines_in(&route), 2);
    assert_eq!(super::machines_in(&route[..2]), 1);
}

/// Each hop of the route has a key only its two ends get; a replica gets its stage with no
/// hop key (probes only); every node has its own probe key; a new route means new keys; an
/// evicted node is replaced and refused from then on.
#[test]
fn route_keys_replicas_probes_and_eviction() {
    let mut s = swarm(2, 2);
    let mut out = Vec::new();
    for id in ["a", "b", "c"] {
        out.extend(register_at(&mut s, id, &[], "10.0.0.1", Some("10.0.0.1:9000")).unwrap());
    }
    // The first copies load, then the replica that waited for a first piece.
    let replicas = first_pieces(&mut s, &out);
    let mut out = load_all(&mut s, &out);
    out.extend(load_all(&mut s, &replicas));
    let routes: BTreeMap<String, protocol::RouteParams> = out
        .iter()
        .filter_map(|(to, c)| match &c.message {
            Message::Route(protocol::Route::Assign(p)) => Some((to.clone(), p.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        routes.len(),
        3,
        "every node with a loaded shard runs a stage"
    );
    let route = s.route.clone().unwrap();
    let (first, second) = (&routes[&route[0].node_id], &routes[&route[1].node_id]);
    assert_eq!(first.next_key.as_deref(), Some(second.key.as_str()));
    assert_eq!(second.next_key, None);
    assert_ne!(first.key, second.key);
    let replica = routes
        .iter()
        .find(|(n, _)| !route.iter().any(|h| &&h.node_id == n))
        .unwrap();
    assert!(replica.1.key.is_empty() && replica.1.next.is_none());
    // Each stage after the first checks its steps against the previous stage's key.
    assert_eq!(first.previous_signer, None);
    let first_key = crate::fuzz::signing_key_of(&route[0].node_id);
    assert_eq!(second.previous_signer.as_deref(), Some(first_key.as_str()));
    assert_eq!(replica.1.previous_signer, None);
    let probe_keys: std::collections::BTreeSet<&str> =
        routes.values().map(|p| p.probe_key.as_str()).collect();
    assert_eq!(probe_keys.len(), 3);
    assert!(probe_keys.iter().all(|k| k.len() == 64));

    // Only nodes that loaded their stage can be probed; route holders first.
    assert!(s.probe_targets().iter().all(Vec::is_empty));
    for (node, p) in &routes {
        s.route_acked(node, p.stage, None);
    }
    let targets = s.probe_targets();
    let shard = replica.1.stage as usize;
    assert_eq!(targets[shard].len(), 2);
    assert!(targets[shard][0].on_route && !targets[shard][1].on_route);

    // The route's holder of that shard is evicted: the replica takes its place under new keys,
    // and the evicted node may not register again.
    let evicted = targets[shard][0].node_id.clone();
    let out = s.evict(&evicted, shard as u32, "wrong".into());
    let new_route = s.route.clone().unwrap();
    assert_eq!(new_route[shard].node_id, *replica.0);
    assert!(new_route
        .iter()
        .all(|h| route.iter().all(|old| old.key != h.key)));
    assert!(out.iter().any(|(to, c)| to == replica.0
        && matches!(&c.message, Message::Route(protocol::Route::Assign(p)) if !p.key.is_empty())));
    let refused =
        register_at(&mut s, &evicted, &[], "10.0.0.1", Some("10.0.0.1:9000")).unwrap_err();
    assert_eq!(refused.0, code::EVICTED);
    assert!(status_json(&s)["evicted"][&evicted]["reason"] == "wrong");
}

/// A stage keeps its node: a replica that finishes later (here one whose id sorts first) does
/// not take the place of a working stage.
#[test]
fn the_route_keeps_its_stages_when_replicas_finish() {
    let mut s = swarm(2, 2);
    let mut out = Vec::new();
    for id in ["m", "n"] {
        out.extend(register_at(&mut s, id, &[], "10.0.0.1", Some("10.0.0.1:9000")).unwrap());
    }
    load_all(&mut s, &out);
    let before = s.route.clone().expect("a route");
    let out = register_at(&mut s, "a", &[], "10.0.0.1", Some("10.0.0.1:9000")).unwrap();
    let replicas = first_pieces(&mut s, &out);
    let mut all = out.clone();
    all.extend(replicas);
    load_all(&mut s, &all);
    assert!(s.nodes["a"]
        .shards
        .values()
        .any(|h| matches!(h, Holding::Loaded { .. })));
    assert_eq!(s.route.clone().unwrap(), before, "the route changed");
}

/// The route's wire between stages is half the round trips each stage measured to the next
/// (the last stage's own edge leads nowhere on it), each capped: a member cannot make the
/// coordinator believe in an endless wire.
#[test]
fn the_chain_wire_is_half_the_stages_round_trips_to_their_next_capped() {
    use protocol::status::{Edge, EdgeKind};
    let mut s = swarm(3, 3);
    for (id, held) in [("a", 0), ("b", 1), ("c", 2)] {
        register_at(&mut s, id, &[held], "198.51.100.1", Some("0.0.0.0:9000")).unwrap();
    }
    assert!(s.ready);
    assert_eq!(s.chain_wire(), Duration::ZERO, "nothing measured yet");
    let beat = |rtt_us| protocol::HeartbeatParams {
        mesh: None,
        next_edge: Some(Edge {
            kind: EdgeKind::Holepunched,
            rtt_us: Some(rtt_us),
        }),
    };
    s.heard("a", &beat(20_000)).unwrap();
    s.heard("b", &beat(40_000)).unwrap();
    s.heard("c", &beat(90_000)).unwrap();
    assert_eq!(s.chain_wire(), Duration::from_millis(30));
    s.heard("b", &beat(u64::MAX)).unwrap();
    assert_eq!(
        s.chain_wire(),
        Duration::from_millis(10) + crate::reach::MAX_HOP_RTT / 2
    );
}

/// Nodes from two networks (two homes behind NAT) registering in turns: each takes the shard
/// that keeps its network's stages together, so the route crosses between the networks once
/// (a WAN hop costs tens of milliseconds a token) instead of at every stage.
#[test]
fn shards_go_to_nodes_so_that_each_networks_stages_are_consecutive() {
    let mut s = swarm(4, 4);
    for (id, ip) in [
        ("a1", "198.51.100.1"),
        ("b1", "203.0.113.1"),
        ("a2", "198.51.100.1"),
        ("b2", "203.0.113.1"),
    ] {
        register_at(&mut s, id, &[], ip, Some("0.0.0.0:9000")).unwrap();
    }
    let network_of_shard: Vec<char> = (0..4)
        .map(|shard| {
            let holder = s
                .nodes
                .values()
                .find(|n| n.shards.contains_key(&shard))
                .unwrap_or_else(|| panic!("shard {shard} placed nowhere"));
            holder.node_id.chars().next().unwrap()
        })
        .collect();
    assert_eq!(network_of_shard, ['a', 'a', 'b', 'b']);
}

/// A hop the caller reaches only through the relay, heartbeat after heartbeat (not just while
/// a hole is being punched), gives its stage to another holder; once every holder has been
/// relayed to, the stage stays where it is (the relay works, only slower).
#[test]
fn a_hop_that_stays_on_the_relay_gives_its_stage_to_another_holder() {
    use crate::reach::RELAYED_BEATS_TO_MOVE;
    use protocol::status::{Edge, EdgeKind};
    let mut s = swarm(2, 3);
    for (id, held, ip) in [
        ("a", 0, "198.51.100.1"),
        ("b", 1, "203.0.113.1"),
        ("c", 1, "192.0.2.1"),
    ] {
        register_at(&mut s, id, &[held], ip, Some("0.0.0.0:9000")).unwrap();
    }
    let route = |s: &Swarm| -> Vec<String> {
        s.route
            .as_ref()
            .unwrap()
            .iter()
            .map(|h| h.node_id.clone())
            .collect()
    };
    assert_eq!(route(&s), ["a", "b"]);
    let beat = |kind| protocol::HeartbeatParams {
        mesh: None,
        next_edge: Some(Edge {
            kind,
            rtt_us: Some(40_000),
        }),
    };
    for _ in 1..RELAYED_BEATS_TO_MOVE {
        assert!(s.heard("a", &beat(EdgeKind::Relayed)).unwrap().is_empty());
    }
    assert_eq!(route(&s), ["a", "b"], "a hole may still be punched");
    let out = s.heard("a", &beat(EdgeKind::Relayed)).unwrap();
    assert_eq!(route(&s), ["a", "c"]);
    assert!(
        out.iter()
            .any(|(to, c)| to == "c" && matches!(c.message, Message::Route(_))),
        "c is told it is on the route: {out:?}"
    );
    // Relayed to c as well: nowhere better to go.
    for _ in 0..2 * RELAYED_BEATS_TO_MOVE {
        s.heard("a", &beat(EdgeKind::Relayed)).unwrap();
    }
    assert_eq!(route(&s), ["a", "c"]);
    assert_eq!(s.relayed_hops.len(), 2);
}
