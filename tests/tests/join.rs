//! Layer blocks joined into a stage (`torrents::join`) give, byte for byte, the file `split`
//! writes for that stage, for every verified architecture (synthetic models of each, the real
//! SmolLM2 and Gemma 3 270M), at several plans: a node can assemble any contiguous range of
//! blocks into its stage without the whole model.

use std::path::{Path, PathBuf};

use torrents::gguf::GgufModel;
use torrents::manifest::LayerRange;
use torrents::split::{shard_file_name, split_model_at, VOCAB_FILE};

fn ranges(spec: &[(u64, u64)]) -> Vec<LayerRange> {
    spec.iter()
        .map(|&(first, last)| LayerRange { first, last })
        .collect()
}

/// `model` cut into `blocks`, then each stage of each plan joined from its blocks and
/// compared with the stage `split` writes for that plan.
fn joins_equal_splits(model: &Path, blocks: &[(u64, u64)], plans: &[&[(u64, u64)]]) {
    let gguf = GgufModel::open(model).unwrap();
    let source = torrents::map::gguf_source(&gguf).unwrap();
    let quiet = &torrents::progress::Quiet;
    let block_dir = tempfile::tempdir().unwrap();
    let blocks = ranges(blocks);
    split_model_at(
        &gguf,
        &blocks,
        block_dir.path(),
        source.clone(),
        Default::default(),
        quiet,
    )
    .unwrap_or_else(|e| panic!("{}: blocks {blocks:?}: {e}", model.display()));
    let block_files: Vec<(LayerRange, PathBuf)> = blocks
        .iter()
        .enumerate()
        .map(|(k, r)| (*r, block_dir.path().join(shard_file_name(k, "gguf"))))
        .collect();
    let vocab = block_dir.path().join(VOCAB_FILE);
    for plan in plans {
        let plan = ranges(plan);
        let reference = tempfile::tempdir().unwrap();
        split_model_at(
            &gguf,
            &plan,
            reference.path(),
            source.clone(),
            Default::default(),
            quiet,
        )
        .unwrap_or_else(|e| panic!("{}: plan {plan:?}: {e}", model.display()));
        let joined = tempfile::tempdir().unwrap();
        for (index, stage) in plan.iter().enumerate() {
            let mine: Vec<PathBuf> = block_files
                .iter()
                .filter(|(r, _)| r.first >= stage.first && r.last <= stage.last)
                .map(|(_, p)| p.clone())
                .collect();
            let out = joined.path().join(format!("stage-{index}.gguf"));
            let (size, sha256) =
                torrents::join::join_stage(&vocab, &mine, &plan, index, Default::default(), &out)
                    .unwrap_or_else(|e| {
                        panic!(
                            "{}: joining stage {index} of {plan:?}: {e}",
                            model.display()
                        )
                    });
            let expected =
                std::fs::read(reference.path().join(shard_file_name(index, "gguf"))).unwrap();
            let got = std::fs::read(&out).unwrap();
            assert!(
                got == expected,
                "{}: stage {index} of {plan:?} joined from {} blocks differs from split's ({} bytes against {})",
                model.display(),
                mine.len(),
                got.len(),
                expected.len()
            );
            assert_eq!(size, got.len() as u64);
            assert_eq!(sha256, torrents::hashing::sha256_file(&out).unwrap());
        }
    }
}

/// 16 layers in 8 blocks of 2; plans of 3 uneven stages, of a first and last stage of one
/// block each, and of the whole model.
fn synthetic(arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join(format!("{arch}.gguf"));
    tests::synthetic_model(arch, 16, &model);
    let blocks: Vec<(u64, u64)> = (0..8).map(|k| (2 * k, 2 * k + 1)).collect();
    joins_equal_splits(
        &model,
        &blocks,
        &[
            &[(0, 3), (4, 9), (10, 15)],
            &[(0, 1), (2, 13), (14, 15)],
            &[(0, 15)],
        ],
    );
}

#[test]
fn llama() {
    synthetic("llama");
}

#[test]
fn qwen2() {
    synthetic("qwen2");
}

#[test]
fn qwen3() {
    synthetic("qwen3");
}

#[test]
fn qwen3moe() {
    synthetic("qwen3moe");
}

#[test]
fn phi3() {
    synthetic("phi3");
}

#[test]
fn gemma3_synthetic() {
    synthetic("gemma3");
}

/// The real SmolLM2 (30 layers) in 10 blocks of 3.
#[test]
fn smollm2() {
    let model = tests::default_model::require().unwrap_or_else(|e| panic!("{e}"));
    let blocks: Vec<(u64, u64)> = (0..10).map(|k| (3 * k, 3 * k + 2)).collect();
    joins_equal_splits(
        &model,
        &blocks,
        &[&[(0, 8), (9, 20), (21, 29)], &[(0, 2), (3, 26), (27, 29)]],
    );
}

/// The real Gemma 3 270M (18 layers, windowed) in 6 blocks of 3.
#[test]
fn gemma3_270m() {
    let model = tests::gemma3_model();
    let layers = GgufModel::open(&model).unwrap().block_count().unwrap();
    assert_eq!(layers, 18);
    let blocks: Vec<(u64, u64)> = (0..6).map(|k| (3 * k, 3 * k + 2)).collect();
    joins_equal_splits(&model, &blocks, &[&[(0, 5), (6, 14), (15, 17)], &[(0, 17)]]);
}

/// Blocks that do not make the stage's layers exactly are refused, naming the gap.
#[test]
fn blocks_that_leave_a_gap_are_refused() {
    let model = tests::default_model::require().unwrap_or_else(|e| panic!("{e}"));
    let gguf = GgufModel::open(&model).unwrap();
    let source = torrents::map::gguf_source(&gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let blocks = ranges(&[(0, 9), (10, 19), (20, 29)]);
    split_model_at(
        &gguf,
        &blocks,
        dir.path(),
        source,
        Default::default(),
        &torrents::progress::Quiet,
    )
    .unwrap();
    let err = torrents::join::join_stage(
        &dir.path().join(VOCAB_FILE),
        &[
            dir.path().join("shard-0.gguf"),
            dir.path().join("shard-2.gguf"),
        ],
        &ranges(&[(0, 29)]),
        0,
        Default::default(),
        &dir.path().join("out.gguf"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("layer 10 was due"), "{err}");
    assert!(!dir.path().join("out.gguf").exists());
}
