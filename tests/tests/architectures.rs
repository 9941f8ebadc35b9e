//! Stages are exact for every architecture `split` accepts (the table in torrents::arch): for
//! each, and every shard count from 1 to min(layers, 8), a chain of stages in one process gives
//! the whole model's greedy tokens (32, for a short prompt and one longer than any sliding
//! window) and its first-step logits bit for bit. Real models where we have them (SmolLM2:
//! llama; Gemma 3 270M: gemma3), tiny seeded random-weight models written with the `gguf`
//! package for the rest, fed token ids. Refused and unverified architectures are refused or
//! marked, and nothing is written for a refusal.

mod common;

use std::path::Path;
use std::process::Command;

use common::{load_stages, pipeline_greedy};
use llm::stage::Stage;
use torrents::gguf::GgufModel;

/// Greedy tokens compared per prompt.
const TOKENS: usize = 32;
/// Context of each stage: the long prompts and their tokens fit.
const MAX_CTX: u32 = 2048;

/// Every shard count from 1 to min(layers, 8): stages equal the whole model.
fn matrix(model: &Path, prompts: &[Vec<i32>]) {
    let gguf = GgufModel::open(model).unwrap();
    let arch = gguf.architecture().unwrap();
    let layers = gguf.block_count().unwrap() as usize;
    if let Some(window) = gguf
        .get(&format!("{arch}.attention.sliding_window"))
        .and_then(torrents::gguf::Value::as_u64)
    {
        assert!(
            prompts.iter().any(|p| p.len() as u64 > window),
            "{arch}: no prompt is longer than the {window}-token window"
        );
    }
    let references: Vec<_> = prompts
        .iter()
        .map(|p| llm::reference_tokens(model, p, TOKENS, 1).unwrap())
        .collect();
    for n in 1..=layers.min(8) {
        let dir = tests::shards_of(model, n);
        let report = torrents::validate::validate(dir.path(), n).unwrap();
        assert!(
            report.ok && report.warnings.is_empty(),
            "{arch}, {n} stages: {:?} {:?}",
            report.problems,
            report.warnings
        );
        let mut stages = load_stages(dir.path(), n, MAX_CTX);
        for (i, (prompt, reference)) in prompts.iter().zip(&references).enumerate() {
            stages.iter_mut().for_each(Stage::clear);
            let got = pipeline_greedy(&mut stages, prompt, TOKENS, &[]);
            assert_eq!(
                got.tokens,
                reference.token_ids,
                "{arch}, {n} stages, prompt {i} ({} tokens): tokens differ from the whole model",
                prompt.len()
            );
            let differing = got
                .first_logits
                .iter()
                .zip(&reference.first_logits)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            let max_diff = got
                .first_logits
                .iter()
                .zip(&reference.first_logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                got.first_logits.len() == reference.first_logits.len() && differing == 0,
                "{arch}, {n} stages, prompt {i}: {differing} of {} first-step logits differ \
                 (max |diff| {max_diff})",
                reference.first_logits.len()
            );
        }
        eprintln!("{arch}: {n} stage(s) equal the whole model");
    }
}

/// A text prompt and one longer than Gemma 3's 512-token window, as the model tokenizes them.
fn text_prompts(model: &Path) -> Vec<Vec<i32>> {
    let paragraph = "A torrent client cuts a file into pieces, checks every piece against its \
        SHA-1 hash, and trades the pieces it holds with the peers that need them. ";
    let long = format!("{}In one sentence, the point is", paragraph.repeat(22));
    let prompts = [
        llm::tokenize(model, "The three primary colors are").unwrap(),
        llm::tokenize(model, &long).unwrap(),
    ];
    assert!(prompts[1].len() > 512, "{} tokens", prompts[1].len());
    prompts.into()
}

/// Token-id prompts for the synthetic models (vocabulary of 512): a short one and one of 600
/// tokens (two micro-batches, and longer than the synthetic window of 64), seeded.
fn id_prompts() -> Vec<Vec<i32>> {
    let mut state = 0x2545_f491_u32;
    let mut ids = |n: usize| {
        let mut v = vec![1]; // BOS
        v.extend((1..n).map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            3 + (state >> 8) as i32 % 509
        }));
        v
    };
    vec![ids(12), ids(600)]
}

/// The synthetic model of `arch` (16 layers) through the matrix.
fn synthetic_matrix(arch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join(format!("{arch}.gguf"));
    tests::synthetic_model(arch, 16, &model);
    matrix(&model, &id_prompts());
}

#[test]
fn llama_smollm2() {
    let _one = tests::swarm_lock();
    let model = tests::default_model::require().unwrap_or_else(|e| panic!("{e}"));
    matrix(&model, &text_prompts(&model));
}

#[test]
fn gemma3_270m() {
    let _one = tests::swarm_lock();
    let model = tests::gemma3_model();
    matrix(&model, &text_prompts(&model));
}

#[test]
fn gemma3_synthetic() {
    let _one = tests::swarm_lock();
    synthetic_matrix("gemma3");
}

#[test]
fn llama_gqa() {
    let _one = tests::swarm_lock();
    synthetic_matrix("llama");
}

#[test]
fn qwen2() {
    let _one = tests::swarm_lock();
    synthetic_matrix("qwen2");
}

#[test]
fn qwen3() {
    let _one = tests::swarm_lock();
    synthetic_matrix("qwen3");
}

#[test]
fn qwen3moe() {
    let _one = tests::swarm_lock();
    synthetic_matrix("qwen3moe");
}

#[test]
fn phi3() {
    let _one = tests::swarm_lock();
    synthetic_matrix("phi3");
}

/// Every verified row of the table names tests of this file, and the README shows the table
/// as the code has it.
#[test]
fn the_table_names_real_tests_and_the_readme_shows_it() {
    let source = include_str!("architectures.rs");
    for a in torrents::arch::ARCHITECTURES {
        if let torrents::arch::Support::Verified { test } = a.support {
            let names: Vec<&str> = test
                .split("architectures::")
                .skip(1)
                .map(|t| {
                    t.split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap()
                })
                .collect();
            assert!(!names.is_empty(), "{}: no test named in {test:?}", a.name);
            for name in names {
                assert!(
                    source.contains(&format!("fn {name}() {{")),
                    "{}: the table names architectures::{name}, which is not a test here",
                    a.name
                );
            }
        }
    }
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    assert!(
        readme.contains(&torrents::arch::markdown_table()),
        "README.md does not show `shard_loader architectures`' table:\n{}",
        torrents::arch::markdown_table()
    );
}

fn shard_loader(args: &[&str]) -> std::process::Output {
    Command::new(tests::bin("shard_loader", "shard_loader"))
        .args(args)
        .output()
        .unwrap()
}

fn split(model: &Path, n: usize, target: &Path, extra: &[&str]) -> std::process::Output {
    let n = n.to_string();
    let mut args = vec![
        "split",
        "--model",
        model.to_str().unwrap(),
        "--shards",
        &n,
        "--target-dir",
        target.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    shard_loader(&args)
}

#[test]
fn refused_and_unknown_architectures_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, says) in [
        ("gemma2", "sqrt(n_embd)"),
        ("mistral3", "--allow-unverified"),
    ] {
        let model = dir.path().join(format!("{arch}.gguf"));
        tests::synthetic_model(arch, 4, &model);
        let target = dir.path().join(format!("{arch}-shards"));
        let out = split(&model, 2, &target, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{arch}: {stderr}");
        assert!(
            stderr.contains(&format!("'{arch}'")) && stderr.contains(says),
            "{arch}: {stderr}"
        );
        assert!(
            !target.exists(),
            "{arch}: a refused split created {}",
            target.display()
        );
    }
    // A refused architecture stays refused with --allow-unverified.
    let target = dir.path().join("gemma2-anyway");
    let out = split(
        &dir.path().join("gemma2.gguf"),
        2,
        &target,
        &["--allow-unverified"],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(!target.exists());
}

#[test]
fn gemma3_of_the_27b_size_class_is_refused_beyond_one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("gemma3-62.gguf");
    tests::synthetic_model("gemma3", 62, &model);
    let target = dir.path().join("shards");
    let out = split(&model, 2, &target, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("'gemma3'") && stderr.contains("attention scale"),
        "{stderr}"
    );
    assert!(!target.exists());
    // One shard is the whole model: nothing changes size class.
    let out = split(&model, 1, &target, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unverified_stages_are_marked_and_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("mistral3.gguf");
    tests::synthetic_model("mistral3", 6, &model);
    let target = dir.path().join("shards");
    let out = split(&model, 3, &target, &["--allow-unverified"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for k in 0..3 {
        let stage = GgufModel::open(&target.join(format!("shard-{k}.gguf"))).unwrap();
        assert_eq!(
            stage.get(torrents::arch::KEY_UNVERIFIED),
            Some(&torrents::gguf::Value::Bool(true))
        );
    }
    let out = shard_loader(&[
        "validate",
        "--target-dir",
        target.to_str().unwrap(),
        "--expected-shards",
        "3",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("WARNING: shard-1.gguf") && stderr.contains("'mistral3' is not verified"),
        "{stderr}"
    );
    let info = Command::new(tests::bin("node", "node"))
        .args(["model-info", "--model"])
        .arg(target.join("shard-1.gguf"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&info.stderr);
    assert!(info.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: architecture 'mistral3' is not verified"),
        "{stderr}"
    );
    // The node loads it (and logs the same warning).
    Stage::load(&target.join("shard-1.gguf"), false, 256, 1).unwrap();
}

#[test]
fn a_windowed_stage_without_its_layer_pattern_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("gemma3.gguf");
    tests::synthetic_model("gemma3", 8, &model);
    let shards = tests::shards_of(&model, 3);
    let stage = shards.path().join("shard-1.gguf");
    let pattern = "gemma3.attention.sliding_window_pattern";
    let flags = GgufModel::open(&stage).unwrap().get(pattern).cloned();
    assert!(
        matches!(&flags, Some(torrents::gguf::Value::Array(_, v)) if v.len() == 3),
        "{flags:?}"
    );
    // The same stage without the key (as an older splitter wrote it): llama.cpp would take the
    // pattern from the renumbered indices.
    let stripped = dir.path().join("stripped.gguf");
    tests::python_script(
        "rewrite_gguf.py",
        &[
            stage.as_os_str(),
            stripped.as_os_str(),
            "--drop".as_ref(),
            pattern.as_ref(),
        ],
    );
    std::fs::rename(&stripped, &stage).unwrap();
    let report = torrents::validate::validate(shards.path(), 3).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.file.as_deref() == Some("shard-1.gguf") && p.message.contains(pattern)),
        "{:?}",
        report.problems
    );
    let err = Stage::load(&stage, false, 256, 1).err().expect("refused");
    assert!(err.to_string().contains(pattern), "{err}");
}
