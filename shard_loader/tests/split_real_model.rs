//! Splitting the real model: byte-for-byte fidelity, determinism, validation.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use torrents::gguf::{GgufModel, TensorInfo, Value};
use torrents::manifest::Manifest;
use torrents::split::parse_block_name;

fn bytes_of(model: &GgufModel, t: &TensorInfo) -> Vec<u8> {
    let f = File::open(&model.files[t.file]).unwrap();
    let mut b = vec![0u8; t.size as usize];
    f.read_exact_at(&mut b, t.offset).unwrap();
    b
}

fn split(n: usize, dir: &Path) -> Manifest {
    let out = common::split(&common::model(), &n.to_string(), dir);
    assert!(out.status.success(), "split {n}: {}", common::stderr(&out));
    Manifest::load(dir).unwrap()
}

/// Every source tensor appears in exactly one shard byte for byte (blocks renamed), apart from
/// the copies every stage needs; every shard tensor is a source tensor or a documented stub.
fn check_union_equals_source(dir: &Path, manifest: &Manifest) {
    let source = GgufModel::open(&common::model()).unwrap();
    let src: HashMap<&str, &TensorInfo> = source
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let n = manifest.shards.len();
    for entry in &manifest.shards {
        let shard = GgufModel::open(&dir.join(&entry.file)).unwrap();
        let range = entry.layers.unwrap();
        let k = entry.shard_id as usize;
        let middle = k > 0 && k + 1 < n;
        for t in &shard.tensors {
            let source_name = match parse_block_name(&t.name) {
                Some((l, rest)) => {
                    assert!(
                        l < range.len(),
                        "{}: {} beyond its layers",
                        entry.file,
                        t.name
                    );
                    format!("blk.{}.{rest}", l + range.first)
                }
                None => t.name.clone(),
            };
            if middle && t.name == "token_embd.weight" {
                assert_eq!(t.dims, [576, 1], "middle-stage embedding stub");
                assert!(bytes_of(&shard, t).iter().all(|&b| b == 0));
                continue;
            }
            let s = src
                .get(source_name.as_str())
                .unwrap_or_else(|| panic!("{} not in source", t.name));
            assert_eq!((&t.dims, t.ggml_type), (&s.dims, s.ggml_type), "{}", t.name);
            assert!(
                bytes_of(&shard, t) == bytes_of(&source, s),
                "{}: {} differs",
                entry.file,
                t.name
            );
            *seen.entry(source_name).or_default() += 1;
        }
        let tok = shard
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .unwrap();
        assert_eq!(tok == "none", middle, "{}: tokenizer {tok}", entry.file);
        assert_eq!(shard.block_count().unwrap(), range.len());
    }
    for t in &source.tensors {
        let count = seen.get(&t.name).copied().unwrap_or(0);
        // output_norm goes to every stage; the tied embedding to the first and the last.
        let expected = match t.name.as_str() {
            "output_norm.weight" => n,
            "token_embd.weight" => n.min(2),
            _ => 1,
        };
        assert_eq!(count, expected, "{} appears in {count} shards", t.name);
    }
}

#[test]
fn split_into_4_is_faithful_deterministic_and_valid() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let m = split(4, a.path());
    let ranges: Vec<(u64, u64)> = m
        .shards
        .iter()
        .map(|s| s.layers.map(|r| (r.first, r.last)).unwrap())
        .collect();
    // 30 layers, and the output head (49152 x 576 elements, about 8 layers' work per token)
    // on the last stage.
    assert_eq!(ranges, [(0, 9), (10, 18), (19, 27), (28, 29)]);
    assert_eq!(
        m.source.sha256.as_deref(),
        Some(tests::default_model::SHA256)
    );
    check_union_equals_source(a.path(), &m);
    let m2 = split(4, b.path());
    assert_eq!(m, m2, "manifests differ between two splits");
    for s in &m.shards {
        let x = std::fs::read(a.path().join(&s.file)).unwrap();
        let y = std::fs::read(b.path().join(&s.file)).unwrap();
        assert!(x == y, "{} differs between two splits", s.file);
    }
    let out = common::shard_loader([
        "validate",
        "--target-dir",
        a.path().to_str().unwrap(),
        "--expected-shards",
        "4",
    ]);
    assert!(out.status.success(), "{}", common::stdout(&out));
    assert_eq!(
        common::list_dir(a.path()),
        [
            "shard-0.gguf",
            "shard-1.gguf",
            "shard-2.gguf",
            "shard-3.gguf",
            "shards.json",
            "vocab.gguf"
        ]
    );
}

#[test]
fn split_into_1_3_and_every_layer() {
    for n in [1usize, 3, 30] {
        let dir = tempfile::tempdir().unwrap();
        let m = split(n, dir.path());
        assert_eq!(m.shards.len(), n);
        check_union_equals_source(dir.path(), &m);
        let out = common::shard_loader([
            "validate",
            "--target-dir",
            dir.path().to_str().unwrap(),
            "--expected-shards",
            &n.to_string(),
            "--json",
        ]);
        assert!(out.status.success(), "{}", common::stdout(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["ok"], true);
        assert_eq!(report["shards_ok"], n);
    }
}

#[test]
fn resplitting_with_fewer_shards_removes_the_old_extra_files() {
    let dir = tempfile::tempdir().unwrap();
    split(6, dir.path());
    split(2, dir.path());
    assert_eq!(
        common::list_dir(dir.path()),
        ["shard-0.gguf", "shard-1.gguf", "shards.json", "vocab.gguf"]
    );
    let out = common::shard_loader([
        "validate",
        "--target-dir",
        dir.path().to_str().unwrap(),
        "--expected-shards",
        "2",
    ]);
    assert!(out.status.success(), "{}", common::stdout(&out));
}

/// `split` also writes the vocabulary file: every key of the source (tokenizer, chat
/// template, hyperparameters) and no tensor, listed in the manifest with its size and sha256,
/// a sliver of the model (the coordinator fetches it, never a weight shard).
#[test]
fn split_writes_a_vocabulary_file_with_the_sources_keys_and_no_weights() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = split(4, dir.path());
    let entry = manifest
        .vocab
        .as_ref()
        .expect("the manifest lists the vocabulary file");
    let path = dir.path().join(&entry.file);
    assert_eq!(entry.file, torrents::split::VOCAB_FILE);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), entry.size);
    assert_eq!(torrents::hashing::sha256_file(&path).unwrap(), entry.sha256);
    let vocab = GgufModel::open(&path).unwrap();
    assert!(vocab.tensors.is_empty(), "weights in the vocabulary file");
    let source = GgufModel::open(&common::model()).unwrap();
    let mut keys = vocab.kvs.clone();
    let (names_key, names) = keys.pop().unwrap();
    assert_eq!(names_key, torrents::split::KEY_SOURCE_TENSORS);
    let Value::Array(_, names) = names else {
        panic!("{names:?}")
    };
    let source_names: Vec<Value> = GgufModel::open(&common::model())
        .unwrap()
        .tensors
        .iter()
        .map(|t| Value::string(&t.name))
        .collect();
    assert_eq!(names, source_names, "the source's tensor names in order");
    assert_eq!(
        keys.pop(),
        Some((
            torrents::split::KEY_VOCAB_ONLY.to_owned(),
            Value::Bool(true)
        ))
    );
    assert_eq!(keys, source.kvs, "the source's keys, in order, unchanged");
    let model_size = std::fs::metadata(common::model()).unwrap().len();
    assert!(
        entry.size * 20 < model_size,
        "{} bytes is not under 5% of the model's {model_size}",
        entry.size
    );
    // validate checks it; a changed vocabulary file is named.
    let validate = || {
        common::shard_loader([
            "validate",
            "--target-dir",
            dir.path().to_str().unwrap(),
            "--expected-shards",
            "4",
        ])
    };
    assert!(validate().status.success());
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let out = validate();
    assert!(!out.status.success());
    assert!(
        common::stdout(&out).contains("vocab.gguf: sha256 differs"),
        "{}",
        common::stdout(&out)
    );
}

/// `join` writes a stage of a coarser plan from the blocks of a finer split, byte for byte
/// the stage `split` writes for that plan; a range that is not a run of whole blocks is
/// refused with the layer that was due, and nothing is written.
#[test]
fn join_writes_a_coarser_plans_stage_from_the_blocks() {
    let blocks = tempfile::tempdir().unwrap();
    let manifest = split(10, blocks.path());
    let starts: Vec<u64> = manifest
        .shards
        .iter()
        .map(|s| s.layers.unwrap().first)
        .collect();
    // A plan of three stages cut at block boundaries.
    let (a, b) = (starts[3], starts[7]);
    let plan = format!("0-{},{a}-{},{b}-29", a - 1, b - 1);
    let out = blocks.path().join("stage-1.gguf");
    let run = |ranges: &str, out: &Path| {
        common::shard_loader([
            "join",
            "--blocks-dir",
            blocks.path().to_str().unwrap(),
            "--ranges",
            ranges,
            "--stage",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let done = run(&plan, &out);
    assert!(done.status.success(), "{}", common::stderr(&done));
    let model = GgufModel::open(&common::model()).unwrap();
    let reference = tempfile::tempdir().unwrap();
    let ranges = [(0, a - 1), (a, b - 1), (b, 29)]
        .map(|(first, last)| torrents::manifest::LayerRange { first, last });
    torrents::split::split_model_at(
        &model,
        &ranges,
        reference.path(),
        torrents::map::gguf_source(&model).unwrap(),
        Default::default(),
        &torrents::progress::Quiet,
    )
    .unwrap();
    assert!(
        std::fs::read(&out).unwrap()
            == std::fs::read(reference.path().join("shard-1.gguf")).unwrap(),
        "joined stage 1 of {plan} differs from split's"
    );
    assert!(common::stdout(&done).contains(&torrents::hashing::sha256_file(&out).unwrap()));
    // Layer a+1 starts no block: stage 1 cannot be made of whole blocks.
    let bad = format!("0-{a},{}-{},{b}-29", a + 1, b - 1);
    let refused = run(&bad, &blocks.path().join("bad.gguf"));
    assert!(!refused.status.success());
    assert!(
        common::stderr(&refused).contains("was due"),
        "{}",
        common::stderr(&refused)
    );
    assert!(!blocks.path().join("bad.gguf").exists());
}
