//! Stage shards run as a pipeline in one process (llama.cpp, one thread each) give exactly the
//! tokens of one llama.cpp process with the whole model: the foundation of distributed
//! inference. The reference runs through llama-cpp-2's safe API, the stages through our own
//! wrapper over llama-cpp-sys-2.

mod common;

use common::{load_stages, pipeline_greedy};
use llm::stage::Stage;

/// The real model split into `n` stage files, each loaded with one thread and a context of at
/// most `max_ctx` (the directory is returned so the files outlive the stages).
fn real_stages(n: usize, max_ctx: u32) -> (tempfile::TempDir, Vec<Stage>) {
    let dir = tests::real_shards(n);
    let stages = load_stages(dir.path(), n, max_ctx);
    (dir, stages)
}

#[test]
fn stages_give_the_whole_models_tokens_for_2_3_and_4_shards() {
    let _one = tests::swarm_lock();
    let model_path = tests::default_model::require().unwrap_or_else(|e| panic!("{e}"));
    let prompts = [
        "The capital of France is",
        "<|im_start|>user\nWrite a haiku about torrents.<|im_end|>\n<|im_start|>assistant\n",
        "Once upon a time, in a land of many small machines that shared the work of one large model, there lived",
    ];
    let references: Vec<_> = prompts
        .iter()
        .map(|p| llm::reference_completion(&model_path, p, 24, 1).unwrap())
        .collect();
    assert!(
        references.iter().all(|r| !r.token_ids.is_empty()),
        "{references:?}"
    );
    for n in [2usize, 3, 4] {
        let (_dir, mut stages) = real_stages(n, 512);
        for (prompt, reference) in prompts.iter().zip(&references) {
            for stage in stages.iter_mut() {
                stage.clear();
            }
            // Stop where the reference stopped: at its end-of-generation token, or max_tokens.
            let got = pipeline_greedy(&mut stages, &reference.prompt_ids, 24, &[2]).tokens;
            assert_eq!(
                got, reference.token_ids,
                "{n} stages, prompt {prompt:?}: tokens differ from the whole model"
            );
        }
    }
}

#[test]
fn a_prompt_of_several_chunks_gives_the_whole_models_tokens() {
    let _one = tests::swarm_lock();
    let model_path = tests::default_model::require().unwrap_or_else(|e| panic!("{e}"));
    let paragraph = "A torrent client cuts a file into pieces, checks every piece against its \
        SHA-1 hash, and trades the pieces it holds with the peers that need them. ";
    let prompt = format!("{}Summary in one sentence:", paragraph.repeat(40));
    let reference = llm::reference_completion(&model_path, &prompt, 16, 1).unwrap();
    let chunk = llm::stage::CHUNK_TOKENS;
    assert!(
        reference.prompt_ids.len() > 2 * chunk,
        "the prompt must span three chunks: {} tokens",
        reference.prompt_ids.len()
    );
    let (_dir, mut stages) = real_stages(3, 4096);
    let got = pipeline_greedy(&mut stages, &reference.prompt_ids, 16, &[2]).tokens;
    assert_eq!(
        got, reference.token_ids,
        "tokens differ from the whole model"
    );
}

#[test]
fn node_reference_prints_the_whole_models_completion() {
    let _one = tests::swarm_lock();
    let model_path = tests::default_model::require().unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new(tests::bin("node", "node"))
        .args(["reference", "--model"])
        .arg(&model_path)
        .args([
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "8",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lib = llm::reference_completion(&model_path, "The capital of France is", 8, 1).unwrap();
    assert_eq!(v["text"], lib.text.as_str());
    assert_eq!(
        v["token_ids"].as_array().unwrap().len(),
        lib.token_ids.len()
    );
    assert!(lib.text.contains("Paris"), "{}", lib.text);
    let bad = std::process::Command::new(tests::bin("node", "node"))
        .args(["reference", "--model", "/nonexistent.gguf", "--prompt", "x"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent.gguf"));
}
