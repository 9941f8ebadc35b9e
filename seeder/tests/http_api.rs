//! The HTTP side: LIST_FILES, manifest, torrents (read by transmission-show), REQUEST_METADATA,
//! REQUEST_PIECE, the web seed's ranges, the tracker's announce and scrape, metrics, and that
//! nothing outside the seed dir is ever served.

mod common;

use common::{real_shards, tool, Server};
use sha1::{Digest, Sha1};

fn url_encode_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("%{x:02x}")).collect()
}

#[test]
fn files_manifest_torrents_metadata_and_pieces_agree() {
    let seed = real_shards();
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(seed.path(), state.path(), &[]);
    let files = server.get_json("/files");
    let manifest = server.get_json("/manifest");
    let work = tempfile::tempdir().unwrap();
    let listed = files["files"].as_array().unwrap();
    // The four shards, then the vocabulary file (no shard: it runs no layers).
    assert_eq!(listed.len(), 5);
    for (k, f) in listed.iter().enumerate() {
        let name = f["name"].as_str().unwrap();
        let hash = f["info_hash"].as_str().unwrap();
        let entry = if k < 4 {
            assert_eq!(f["shard"], k);
            &manifest["shards"][k]
        } else {
            assert_eq!(f["shard"], serde_json::Value::Null);
            &manifest["vocab"]
        };
        assert_eq!(entry["file"], name);
        assert_eq!(entry["info_hash"], hash, "manifest and /files disagree");
        assert_eq!(entry["sha256"], f["sha256"]);
        let torrent_url = f["torrent_url"].as_str().unwrap();
        assert_eq!(
            torrent_url,
            server.url(&format!("/torrents/{name}.torrent"))
        );
        let bytes = reqwest::blocking::get(torrent_url)
            .unwrap()
            .bytes()
            .unwrap();
        let path = work.path().join(format!("{name}.torrent"));
        std::fs::write(&path, &bytes).unwrap();
        let shown = tool("transmission-show", &[path.to_str().unwrap()]);
        assert!(shown.status.success());
        assert!(String::from_utf8_lossy(&shown.stdout).contains(&format!("Hash: {hash}")));
        let m = torrents::metainfo::parse(&bytes).unwrap();
        assert_eq!(m.trackers, vec![vec![server.url("/announce")]]);
        assert_eq!(m.web_seeds, vec![server.url(&format!("/seed/{name}"))]);

        // REQUEST_METADATA, JSON and bencoded.
        let meta = server.get_json(&format!("/metadata/{hash}"));
        assert_eq!(meta["name"], name);
        assert_eq!(meta["piece_count"], m.piece_count);
        let (status, info) = server.get(&format!("/metadata/{hash}?format=bencode"));
        assert_eq!(status, 200);
        assert_eq!(
            hex::encode(Sha1::digest(&info)),
            hash,
            "bencoded info does not hash to the info hash"
        );

        // REQUEST_PIECE: first, last, and a middle piece hash to their SHA-1s.
        for index in [0, m.piece_count / 2, m.piece_count - 1] {
            let (status, piece) = server.get(&format!("/pieces/{hash}/{index}"));
            assert_eq!(status, 200);
            assert_eq!(piece.len() as u64, m.piece_size(index).unwrap());
            assert_eq!(
                Sha1::digest(&piece).as_slice(),
                m.piece_hash(index).unwrap()
            );
        }
        let (status, body) = server.get(&format!("/pieces/{hash}/{}", m.piece_count));
        assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    }
    for (path, status, code) in [
        ("/pieces/zz/0", 400, "bad_info_hash"),
        (
            &format!("/pieces/{}/x", "ab".repeat(20)),
            400,
            "bad_piece_index",
        ),
        (
            &format!("/metadata/{}", "ab".repeat(20)),
            404,
            "unknown_info_hash",
        ),
        ("/torrents/nope.gguf.torrent", 404, "unknown_file"),
        ("/nowhere", 404, "not_found"),
    ] {
        let (got, body) = server.get(path);
        assert_eq!(got, status, "{path}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], code, "{path}");
        assert!(v["error"]["message"].is_string());
    }
    assert_eq!(server.get_json("/healthz")["files"], 5);
}

#[test]
fn web_seed_ranges_and_no_path_traversal() {
    let seed = real_shards();
    std::fs::write(seed.path().join("notes.txt"), "not served").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.gguf"), "secret").unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret.gguf"),
        seed.path().join("escape.gguf"),
    )
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(seed.path(), state.path(), &[]);
    let data = std::fs::read(seed.path().join("shard-0.gguf")).unwrap();
    let client = reqwest::blocking::Client::new();
    let range = |r: &str| {
        let resp = client
            .get(server.url("/seed/shard-0.gguf"))
            .header("Range", r)
            .send()
            .unwrap();
        (
            resp.status().as_u16(),
            resp.headers()
                .get("content-range")
                .map(|v| v.to_str().unwrap().to_owned()),
            resp.bytes().unwrap(),
        )
    };
    let (s, cr, b) = range("bytes=100-199");
    assert_eq!(
        (s, cr.as_deref()),
        (206, Some(format!("bytes 100-199/{}", data.len()).as_str()))
    );
    assert_eq!(&b[..], &data[100..200]);
    let (s, _, b) = range("bytes=-10");
    assert_eq!((s, &b[..]), (206, &data[data.len() - 10..]));
    let (s, cr, b) = range(&format!("bytes={}-", data.len()));
    assert_eq!(s, 416);
    assert_eq!(cr, Some(format!("bytes */{}", data.len())));
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["code"], "bad_range");
    let (s, whole) = server.get("/seed/shard-0.gguf");
    assert_eq!(s, 200);
    assert!(whole == data);

    for path in [
        "/seed/..%2f..%2f..%2fetc%2fpasswd",
        "/seed/../../etc/passwd",
        "/seed/%2e%2e%2fshards.json",
        "/seed/notes.txt",
        "/seed/shards.json",
        "/seed/escape.gguf",
        "/torrents/..%2f..%2fetc%2fpasswd.torrent",
        "/torrents/escape.gguf.torrent",
    ] {
        let (status, body) = server.get(path);
        assert_eq!(status, 404, "{path} served {} bytes", body.len());
    }
    let names: Vec<String> = server.get_json("/files")["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "shard-0.gguf",
            "shard-1.gguf",
            "shard-2.gguf",
            "shard-3.gguf",
            "vocab.gguf"
        ]
    );
    assert!(
        server
            .stderr_text()
            .contains("escape.gguf: symlink points outside the seed dir"),
        "{}",
        server.stderr_text()
    );
}

#[test]
fn tracker_announce_and_scrape_by_hand() {
    let seed = real_shards();
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(seed.path(), state.path(), &[]);
    let hash = server.get_json("/files")["files"][0]["info_hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let raw = hex::decode(&hash).unwrap();
    let announce = |hash: &[u8], extra: &str| {
        let (status, body) = server.get(&format!(
            "/announce?info_hash={}&peer_id=-TT0001-000000000001&port=6999&uploaded=0&downloaded=0&left=1000{extra}",
            url_encode_bytes(hash)
        ));
        (status, body)
    };
    // Compact: the seeder itself, at its public address and peer port.
    let (status, body) = announce(&raw, "&compact=1&event=started");
    assert_eq!(status, 200);
    let root = torrents::bencode::decode(&body).unwrap();
    let peers = root.get("peers").unwrap().as_bytes().unwrap();
    let mut want = vec![127, 0, 0, 1];
    want.extend_from_slice(&server.peer.port().to_be_bytes());
    assert_eq!(
        peers,
        want.as_slice(),
        "the seeder must be listed at 127.0.0.1:{}",
        server.peer.port()
    );
    assert_eq!(root.get("complete").unwrap().as_int(), Some(1));
    assert_eq!(root.get("incomplete").unwrap().as_int(), Some(1));
    assert!(
        root.get("interval").unwrap().as_int().unwrap() <= 15,
        "short interval while a swarm forms"
    );

    // Non-compact, from a second peer: both others listed with ip, port and peer id.
    let (_, body) = server.get(&format!(
        "/announce?info_hash={}&peer_id=-TT0001-000000000002&port=7000&uploaded=0&downloaded=0&left=0",
        url_encode_bytes(&raw)
    ));
    let root = torrents::bencode::decode(&body).unwrap();
    let list = root.get("peers").unwrap().as_list().unwrap();
    assert_eq!(list.len(), 2);
    let ports: Vec<i64> = list
        .iter()
        .map(|p| p.get("port").unwrap().as_int().unwrap())
        .collect();
    assert!(ports.contains(&6999) && ports.contains(&i64::from(server.peer.port())));
    assert!(list
        .iter()
        .all(|p| p.get("ip").is_some() && p.get("peer id").is_some()));

    // Scrape one and all.
    let (status, body) = server.get(&format!("/scrape?info_hash={}", url_encode_bytes(&raw)));
    assert_eq!(status, 200);
    let root = torrents::bencode::decode(&body).unwrap();
    let files = root.get("files").unwrap();
    let bencode_files = match &files.value {
        torrents::bencode::Bencode::Dict(items) => items.clone(),
        _ => panic!("files is not a dict"),
    };
    assert_eq!(bencode_files.len(), 1);
    assert_eq!(bencode_files[0].0, raw.as_slice());
    assert_eq!(
        bencode_files[0].1.get("complete").unwrap().as_int(),
        Some(2)
    );
    assert_eq!(
        bencode_files[0].1.get("incomplete").unwrap().as_int(),
        Some(1)
    );
    let (_, body) = server.get("/scrape");
    match torrents::bencode::decode(&body)
        .unwrap()
        .get("files")
        .unwrap()
        .value
        .clone()
    {
        // The four shards' torrents and the vocabulary file's.
        torrents::bencode::Bencode::Dict(items) => assert_eq!(items.len(), 5),
        _ => panic!(),
    }

    // Stopped removes the peer.
    announce(&raw, "&event=stopped");
    let (_, body) = server.get(&format!("/scrape?info_hash={}", url_encode_bytes(&raw)));
    assert!(
        String::from_utf8_lossy(&body).contains("10:incompletei0e"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // Unknown info hash refused; malformed queries answered with a failure reason.
    let (status, body) = announce(&[7u8; 20], "");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("failure reason"));
    for bad in [
        "/announce",
        "/announce?info_hash=abc&peer_id=x&port=1",
        "/announce?info_hash=%01&port=notaport",
    ] {
        let (status, body) = server.get(bad);
        assert_eq!(status, 400, "{bad}");
        assert!(
            String::from_utf8_lossy(&body).contains("failure reason"),
            "{bad}"
        );
    }
    let metrics = String::from_utf8(server.get("/metrics").1).unwrap();
    assert!(metrics.contains("shardswarm_tracker_announces_total"));
    assert!(
        metrics.contains("shardswarm_tracker_scrapes_total 3"),
        "{metrics}"
    );
}

#[test]
fn open_tracker_accepts_any_info_hash() {
    let seed = real_shards();
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(seed.path(), state.path(), &["--open-tracker"]);
    let (status, body) = server.get(&format!(
        "/announce?info_hash={}&peer_id=-TT0001-000000000001&port=6999&left=5&compact=1",
        url_encode_bytes(&[7u8; 20])
    ));
    assert_eq!(status, 200);
    let root = torrents::bencode::decode(&body).unwrap();
    assert!(
        root.get("failure reason").is_none(),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(root.get("incomplete").unwrap().as_int(), Some(1));
}

/// `--relay-port`: the seeder runs the swarm's relay and publishes its URL and certificate at
/// `/relay`, signed under its document key; a member given them is homed on it. Without the
/// flag, `/relay` is 404.
#[test]
fn the_relay_is_published_signed_and_members_home_on_it() {
    let seed = real_shards();
    let state = tempfile::tempdir().unwrap();
    let plain = Server::start(seed.path(), state.path(), &[]);
    assert_eq!(plain.get("/relay").0, 404);
    drop(plain);

    let server = Server::start(seed.path(), state.path(), &["--relay-port", "0"]);
    let url = server.proc.field("relay").to_owned();
    let key = server.proc.field("key").to_owned();
    let response = reqwest::blocking::get(server.url("/relay")).unwrap();
    assert_eq!(response.status(), 200);
    let signature = response
        .headers()
        .get(protocol::data::seal::SIGNATURE_HEADER)
        .expect("a signature")
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.bytes().unwrap();
    assert!(protocol::data::seal::document_signed(
        &key, "/relay", &body, &signature
    ));
    let info: protocol::RelayInfo = serde_json::from_slice(&body).unwrap();
    assert_eq!(info.url, url);
    assert_eq!(
        info.cert_pem,
        std::fs::read_to_string(state.path().join("relay.pem")).unwrap()
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let homed = runtime.block_on(async {
        let bind = "127.0.0.1:0".parse().unwrap();
        let member = mesh::Mesh::start([7; 32], bind, Some(&info)).await.unwrap();
        let relay_url = member.addr().relay_url;
        member.close().await;
        relay_url
    });
    assert_eq!(homed.as_deref(), Some(url.as_str()));
}
