//! Our .torrent files against Debian's BitTorrent tools: the same info hash as mktorrent for
//! the same file and piece length, and transmission-show, aria2c and ctorrent all read them.

mod common;

use std::path::Path;

use torrents::metainfo;

/// Our info hash for `file` at `2^log2` piece length, and mktorrent's.
fn ours_and_mktorrent(file: &Path, log2: u32, out: &Path) -> (String, String) {
    let ours = out.join("ours.torrent");
    let mk = out.join("mk.torrent");
    let _ = std::fs::remove_file(&mk);
    let o = common::shard_loader([
        "torrent".as_ref(),
        "create".as_ref(),
        file.as_os_str(),
        "--piece-length".as_ref(),
        (1u64 << log2).to_string().as_ref(),
        "--announce".as_ref(),
        "http://127.0.0.1:9/announce".as_ref(),
        "-o".as_ref(),
        ours.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let o = common::tool(
        "mktorrent",
        &[
            "-l",
            &log2.to_string(),
            "-a",
            "http://127.0.0.1:9/announce",
            "-o",
            mk.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "mktorrent: {}", common::stderr(&o));
    let a = metainfo::read_file(&ours).unwrap();
    let b = metainfo::read_file(&mk).unwrap();
    assert_eq!(
        a.info_bytes,
        b.info_bytes,
        "info dictionaries differ for {}",
        file.display()
    );
    (a.info_hash_hex(), b.info_hash_hex())
}

/// transmission-show, aria2c -S and ctorrent -x on one of our .torrent files.
fn third_party_tools_agree(torrent: &Path, info_hash: &str) {
    let t = torrent.to_str().unwrap();
    let o = common::tool("transmission-show", &[t]);
    assert!(
        o.status.success(),
        "transmission-show: {}",
        common::stderr(&o)
    );
    assert!(
        common::stdout(&o).contains(&format!("Hash: {info_hash}")),
        "{}",
        common::stdout(&o)
    );
    let o = common::tool("aria2c", &["-S", t]);
    assert!(o.status.success());
    assert!(
        common::stdout(&o).contains(&format!("Info Hash: {info_hash}")),
        "{}",
        common::stdout(&o)
    );
    let o = common::tool("ctorrent", &["-x", t]);
    assert!(
        o.status.success(),
        "ctorrent -x {t}: {}",
        common::stdout(&o)
    );
}

#[test]
fn info_hash_matches_mktorrent_at_piece_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    for log2 in [15u32, 18] {
        let p = 1usize << log2;
        for len in [1, p - 1, p, 3 * p, 3 * p + 1] {
            let file = dir.path().join(format!("data-{len}.bin"));
            let data: Vec<u8> = (0..len)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            std::fs::write(&file, data).unwrap();
            let (ours, mk) = ours_and_mktorrent(&file, log2, dir.path());
            assert_eq!(ours, mk, "{len} bytes, 2^{log2} pieces");
            third_party_tools_agree(&dir.path().join("ours.torrent"), &ours);
        }
    }
}

#[test]
fn real_shards_match_mktorrent_and_every_tool_reads_them() {
    let shards = tempfile::tempdir().unwrap();
    let o = common::split(&common::model(), "4", shards.path());
    assert!(o.status.success(), "{}", common::stderr(&o));
    let work = tempfile::tempdir().unwrap();
    for k in 0..4 {
        let file = shards.path().join(format!("shard-{k}.gguf"));
        let size = std::fs::metadata(&file).unwrap().len();
        let log2 = metainfo::default_piece_length(size).trailing_zeros();
        let (ours, mk) = ours_and_mktorrent(&file, log2, work.path());
        assert_eq!(ours, mk, "shard-{k}");
        third_party_tools_agree(&work.path().join("ours.torrent"), &ours);

        // Default piece length, web seeds, private flag and JSON output.
        let t = work.path().join(format!("shard-{k}.torrent"));
        let create = |first_web_seed: &str| {
            common::shard_loader([
                "torrent",
                "create",
                file.to_str().unwrap(),
                "--private",
                "--web-seed",
                first_web_seed,
                "--web-seed",
                "http://127.0.0.1:9/seed/c",
                "-a",
                "http://127.0.0.1:9/announce",
                "-a",
                "http://127.0.0.1:8/announce",
                "--comment",
                "shard",
                "-o",
                t.to_str().unwrap(),
            ])
        };
        let o = create("http://127.0.0.1:9/seed/a b");
        assert!(!o.status.success(), "a URL with a space must be refused");
        let o = create("http://127.0.0.1:9/seed/a%20b");
        assert!(o.status.success(), "{}", common::stderr(&o));
        let shown = common::shard_loader(["torrent", "show", t.to_str().unwrap(), "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
        assert_eq!(v["private"], true);
        assert_eq!(v["piece_length"], metainfo::default_piece_length(size));
        assert_eq!(v["length"], size);
        assert_eq!(v["web_seeds"].as_array().unwrap().len(), 2);
        assert_eq!(v["trackers"].as_array().unwrap().len(), 2);
        let magnet = v["magnet"].as_str().unwrap();
        let hash = v["info_hash"].as_str().unwrap();
        assert!(magnet.starts_with(&format!("magnet:?xt=urn:btih:{hash}&dn=shard-{k}.gguf&xl={size}&tr=http%3A%2F%2F127.0.0.1%3A9%2Fannounce")), "{magnet}");
        assert!(
            magnet.contains("&ws=http%3A%2F%2F127.0.0.1%3A9%2Fseed%2Fa%2520b"),
            "{magnet}"
        );
        // The link reads back as what the torrent says.
        let back = common::shard_loader(["torrent", "show", magnet, "--json"]);
        assert!(back.status.success(), "{}", common::stderr(&back));
        let m: serde_json::Value = serde_json::from_slice(&back.stdout).unwrap();
        assert_eq!(m["info_hash"], hash);
        assert_eq!(m["length"], size);
        assert_eq!(m["name"], format!("shard-{k}.gguf"));
        let tiers: Vec<serde_json::Value> = v["trackers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|tier| tier.as_array().unwrap().clone())
            .collect();
        assert_eq!(m["trackers"], serde_json::Value::Array(tiers));
        assert_eq!(m["web_seeds"], v["web_seeds"]);
        third_party_tools_agree(&t, hash);
        let o = common::tool("transmission-show", &[t.to_str().unwrap()]);
        assert!(
            common::stdout(&o).contains("Private torrent"),
            "{}",
            common::stdout(&o)
        );
    }
}

#[test]
fn edit_replaces_trackers_and_web_seeds_but_keeps_the_info_hash() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.bin");
    std::fs::write(&file, vec![3u8; 100_000]).unwrap();
    let t = dir.path().join("a.torrent");
    let e = dir.path().join("b.torrent");
    let o = common::shard_loader([
        "torrent",
        "create",
        file.to_str().unwrap(),
        "-a",
        "http://127.0.0.1:9/announce",
        "-w",
        "http://127.0.0.1:9/seed/data.bin",
        "-o",
        t.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let o = common::shard_loader([
        "torrent",
        "edit",
        t.to_str().unwrap(),
        "-a",
        "http://127.0.0.2:7/announce",
        "-o",
        e.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (a, b) = (
        metainfo::read_file(&t).unwrap(),
        metainfo::read_file(&e).unwrap(),
    );
    assert_eq!(a.info_hash, b.info_hash);
    assert_eq!(
        b.trackers,
        vec![vec!["http://127.0.0.2:7/announce".to_string()]]
    );
    assert!(b.web_seeds.is_empty());
    third_party_tools_agree(&e, &b.info_hash_hex());
}
