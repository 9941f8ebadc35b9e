//! For the fuzz target `control_handling` (`fuzz/`) and the replay of its corpus in the
//! tests: what nodes say on the control channel, fed to the swarm rules. Whatever a node
//! sends, the swarm must not panic, and what it shows must stay whole.

use std::net::IpAddr;
use std::time::Duration;

use protocol::{Capacity, Control, Message, RegisterParams, PROTOCOL_VERSION};

use crate::{ShardSpec, Swarm, SwarmSettings};

/// A swarm of three shards with two registered nodes (`n0` holding shard 0, `n1` nothing),
/// then each line of `data` as a control command: a `REGISTER` registers (from an address
/// its first byte picks), anything else comes from `n0` or `n1` (by its `from`). After each,
/// the swarm's placement, route and `/status` are worked out and checked.
pub fn control_messages(data: &[u8]) {
    let mut s = fixture(3, 2, None, 2);
    for (id, held) in [("n0", vec![0]), ("n1", vec![])] {
        let p = register_params(id, &held);
        s.register("r", &p, IpAddr::from([127, 0, 0, 1]), 1, None)
            .expect("the fixture's nodes register");
    }
    for (i, line) in data.split(|b| *b == b'\n').take(64).enumerate() {
        let Ok(text) = std::str::from_utf8(line) else {
            continue;
        };
        let Ok(c) = Control::decode(text) else {
            continue;
        };
        match &c.message {
            Message::Register(p) => {
                let ip = IpAddr::from([10, 0, 0, line.first().copied().unwrap_or(0)]);
                let _ = s.register(&c.request_id, p, ip, 2 + i as u64, None);
            }
            m => {
                let node = if c.from == "n1" { "n1" } else { "n0" };
                let _ = s.take(node, m);
            }
        }
        check(&s);
    }
    let (_, _) = s.expire(std::time::Instant::now() + Duration::from_secs(3600));
    check(&s);
}

/// What must hold whatever was said: the route names registered holders of its shards in
/// order, and `/status` is made.
fn check(s: &Swarm) {
    if let Some(route) = &s.route {
        assert_eq!(route.len(), s.shards.len(), "a route has a stage per shard");
        for (k, hop) in route.iter().enumerate() {
            assert_eq!(hop.shard_id as usize, k, "the route's stages are in order");
        }
    }
    let _ = s.probe_targets();
    let _ = s.status(None, Default::default());
}

/// A swarm of `shards` shards (`shard-K.gguf`, 100 bytes, sha256 `shaK`), settled: what the
/// fuzz target and the unit tests start from.
pub fn fixture(shards: u32, min_nodes: usize, token: Option<&str>, parallel: u32) -> Swarm {
    let shards = (0..shards)
        .map(|i| ShardSpec {
            shard_id: i,
            file: format!("shard-{i}.gguf"),
            size: 100,
            sha256: format!("sha{i}"),
            info_hash: format!("ih{i}"),
            magnet: String::new(),
            torrent_url: String::new(),
            web_seed: None,
        })
        .collect();
    let mut s = Swarm::new(
        shards,
        SwarmSettings {
            min_nodes,
            model_sha256: "m".into(),
            split_id: "s".into(),
            seeder_peer: None,
            token: token.map(str::to_owned),
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(10),
            parallel,
            mesh: false,
        },
    );
    s.settle_until = std::time::Instant::now();
    s
}

/// A well-formed signing key (64 hex digits) that names `id`, for fixtures.
pub fn signing_key_of(id: &str) -> String {
    let hex: String = id.bytes().take(32).map(|b| format!("{b:02x}")).collect();
    format!("{hex:0<64}")
}

fn register_params(id: &str, held: &[u32]) -> RegisterParams {
    RegisterParams {
        node_id: id.into(),
        protocol_version: PROTOCOL_VERSION,
        name: id.into(),
        peer_port: 7000,
        data_addr: Some(format!("127.0.0.1:{}", 8000 + held.len())),
        shards: held
            .iter()
            .map(|i| protocol::HeldShard {
                shard_id: *i,
                sha256: format!("sha{i}"),
            })
            .collect(),
        capacity: Capacity {
            ram_bytes: 1 << 30,
            disk_free_bytes: 1 << 30,
            threads: 1,
            uplink_mbit: None,
            downlink_mbit: None,
        },
        token: None,
        signing_key: Some(signing_key_of(id)),
        tls_public_key: None,
        mesh: None,
    }
}
