//! The fuzz corpus on stable Rust, as part of every test run: each seed in fuzz/corpus is a
//! valid input its parser accepts (so the fuzzer starts from inputs that reach deep), and
//! every input in fuzz/regressions (a crash or hang cargo-fuzz once found) is now handled
//! without a panic. bench/fuzz.sh does the fuzzing itself; .ci/run replays the corpus there.

use std::path::{Path, PathBuf};

fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// What each fuzz target runs: Ok(()) when the parser accepts the input.
fn parse(target: &str, data: &[u8]) -> Result<(), String> {
    let text = || std::str::from_utf8(data).map_err(|e| e.to_string());
    match target {
        "bencode" => torrents::bencode::decode(data)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "torrent" => torrents::metainfo::parse(data)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "magnet" => torrents::magnet::parse(text()?)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "gguf_header" => torrents::gguf::GgufModel::parse(data)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "safetensors_header" => torrents::safetensors::tensor_names_in(data)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "tracker_query" => {
            let q = text()?;
            let scraped = torrents::tracker_query::parse_scrape(q);
            torrents::tracker_query::parse_announce(q)
                .map(|_| ())
                .or(scraped.map(|_| ()))
        }
        "control_json" => protocol::Control::decode(text()?)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "data_frame" => protocol::data::Frame::decode(data)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        // Handling never fails: it panics, or it takes the input.
        "control_handling" => {
            swarm::fuzz::control_messages(data);
            Ok(())
        }
        other => panic!("no parser for fuzz target {other}"),
    }
}

const TARGETS: [&str; 9] = [
    "bencode",
    "torrent",
    "magnet",
    "gguf_header",
    "safetensors_header",
    "tracker_query",
    "control_json",
    "data_frame",
    "control_handling",
];

#[test]
fn every_seed_of_the_fuzz_corpus_is_accepted() {
    for target in TARGETS {
        let seeds = inputs("corpus", target);
        assert!(!seeds.is_empty(), "fuzz/corpus/{target} is empty");
        for (path, data) in seeds {
            if let Err(e) = parse(target, &data) {
                panic!("{}: {e}", path.display());
            }
        }
    }
}

#[test]
fn inputs_that_once_broke_a_parser_are_handled() {
    for target in TARGETS {
        for (path, data) in inputs("regressions", target) {
            let outcome = std::panic::catch_unwind(|| parse(target, &data));
            assert!(outcome.is_ok(), "{} panics", path.display());
        }
    }
}

#[test]
fn every_fuzz_target_is_replayed_here() {
    let listed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/Cargo.toml"))
            .unwrap();
    let bins = listed.matches("[[bin]]").count();
    assert_eq!(
        bins,
        TARGETS.len(),
        "a fuzz target is missing from this test"
    );
    for t in TARGETS {
        assert!(listed.contains(&format!("name = \"{t}\"")), "{t}");
    }
}
