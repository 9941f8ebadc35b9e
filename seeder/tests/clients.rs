//! Real clients download every shard from the seeder: aria2c over the peer wire (from the
//! .torrent and from the magnet link, web seeds off), aria2c through the web seed alone, and a
//! librqbit client through the tracker alone. The source files never change.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{aria2c, fingerprint, real_shards, rewrap, sha256, Server};

fn assert_same_files(seed: &Path, got: &Path, names: &[String]) {
    for name in names {
        let downloaded = got.join(name);
        assert!(downloaded.exists(), "{name} was not downloaded");
        assert_eq!(
            sha256(&downloaded),
            sha256(&seed.join(name)),
            "{name} differs"
        );
    }
}

fn shard_names(server: &Server) -> Vec<String> {
    let files = server.get_json("/files");
    files["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn aria2c_downloads_every_shard_over_the_peer_wire_from_torrent_and_magnet() {
    let seed = real_shards();
    let state = tempfile::tempdir().unwrap();
    let before = fingerprint(seed.path());
    let server = Server::start(seed.path(), state.path(), &[]);
    let names = shard_names(&server);
    // The four shards and the vocabulary file, each a torrent of its own.
    assert_eq!(names.len(), 5);
    assert!(names.contains(&torrents::split::VOCAB_FILE.to_owned()));
    assert!(server
        .stdout_lines()
        .contains(&"[TORRENT] Loaded 5 file(s) for sharing".to_string()));

    // From the served .torrent files, with the url-list taken out: peers only.
    let work = tempfile::tempdir().unwrap();
    let mut torrents = Vec::new();
    for name in &names {
        let (status, bytes) = server.get(&format!("/torrents/{name}.torrent"));
        assert_eq!(status, 200);
        let t = rewrap(
            &bytes,
            vec![server.url("/announce")],
            vec![],
            &work.path().join(format!("{name}.torrent")),
        );
        torrents.push(t.display().to_string());
    }
    let out_t = tempfile::tempdir().unwrap();
    for t in &torrents {
        let o = aria2c(out_t.path(), t, 60);
        assert!(
            o.status.success(),
            "aria2c {t}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    assert_same_files(seed.path(), out_t.path(), &names);

    // From the magnet links (ws= removed: peer wire and ut_metadata from librqbit only).
    let out_m = tempfile::tempdir().unwrap();
    for f in server.get_json("/files")["files"].as_array().unwrap() {
        let magnet = f["magnet"].as_str().unwrap();
        assert!(magnet.contains("&ws="), "{magnet}");
        let magnet = magnet.split("&ws=").next().unwrap();
        let o = aria2c(out_m.path(), magnet, 60);
        assert!(
            o.status.success(),
            "aria2c {magnet}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    assert_same_files(seed.path(), out_m.path(), &names);

    let metrics = String::from_utf8(server.get("/metrics").1).unwrap();
    let peer_bytes: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("shardswarm_seeder_uploaded_bytes_total")
                && l.contains("source=\"bittorrent\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    let total: u64 = names
        .iter()
        .map(|n| std::fs::metadata(seed.path().join(n)).unwrap().len())
        .sum();
    assert!(
        peer_bytes >= 2 * total,
        "metrics count {peer_bytes} peer-wire bytes for two full copies of {total}"
    );
    assert!(server.stop().success());
    assert_eq!(
        fingerprint(seed.path()),
        before,
        "seeding changed a source file or its mtime"
    );
}

#[test]
fn aria2c_downloads_through_the_web_seed_alone() {
    let seed = real_shards();
    let state = tempfile::tempdir().unwrap();
    let before = fingerprint(seed.path());
    let server = Server::start(seed.path(), state.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let name = "shard-1.gguf";
    let (_, bytes) = server.get(&format!("/torrents/{name}.torrent"));
    let t = rewrap(
        &bytes,
        vec![],
        vec![server.url(&format!("/seed/{name}"))],
        &work.path().join("ws.torrent"),
    );
    let o = aria2c(out.path(), t.to_str().unwrap(), 60);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert_same_files(seed.path(), out.path(), &[name.to_owned()]);
    let metrics = String::from_utf8(server.get("/metrics").1).unwrap();
    let line = metrics
        .lines()
        .find(|l| l.contains(&format!("file=\"{name}\"")) && l.contains("source=\"webseed\""))
        .unwrap();
    let sent: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let size = std::fs::metadata(seed.path().join(name)).unwrap().len();
    assert!(sent >= size, "web seed sent {sent} of {size} bytes");
    assert!(server.stop().success());
    assert_eq!(fingerprint(seed.path()), before);
}

#[test]
fn a_librqbit_client_downloads_through_the_tracker_alone() {
    let seed = real_shards();
    let state = tempfile::tempdir().unwrap();
    let server = Server::start(seed.path(), state.path(), &[]);
    let name = "shard-3.gguf";
    let (_, bytes) = server.get(&format!("/torrents/{name}.torrent"));
    let out = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let session = librqbit::Session::new_with_opts(
            out.path().to_owned(),
            librqbit::SessionOptions {
                dht: None,
                disable_local_service_discovery: true,
                listen: None,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let handle = session
            .add_torrent(
                librqbit::AddTorrent::from_bytes(bytes),
                Some(librqbit::AddTorrentOptions {
                    overwrite: true,
                    ..Default::default()
                }),
            )
            .await
            .unwrap()
            .into_handle()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(90), handle.wait_until_completed())
            .await
            .expect("librqbit client did not finish in 90 s")
            .unwrap();
        session.stop().await;
    });
    assert_eq!(
        sha256(&out.path().join(name)),
        sha256(&seed.path().join(name))
    );
}
