//! Stage shards run as a pipeline in one process (llama.cpp, one thread each) give exactly the
//! tokens of one llama.cpp process with the whole model: the foundation of distributed
//! inference. The reference runs through llama-cpp-2's safe API, the stages through our own
//! wrapper over llama-cpp-sys-2.

mod common;

use common::{load_stages, pipeline_greedy};
use llm::placement::DecodePolicy;
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

/// Several sequences in one chain of stages, rows of all of them in each `llama_decode` and a
/// sequence joining while the others are generating (what continuous batching does), give
/// each sequence exactly the greedy tokens it gets alone: what serving many users at once
/// rests on.
#[test]
fn sequences_batched_together_give_each_the_tokens_it_gets_alone() {
    use llm::stage::{Row, RowsOutput};
    let _one = tests::swarm_lock();
    let paragraph = "Pieces travel between peers until every node holds its shard. ";
    // Sequence 0's prompt is longer than sequence 1's: llama.cpp's split of such a batch into
    // equal-length micro-batches reorders rows (0's first rows, 1's rows, 0's other rows), and
    // a stage must still hand on each row's hidden state in the order it was given.
    let texts = [
        "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n".to_owned(),
        "The capital of France is".to_owned(),
        format!("{}In one sentence:", paragraph.repeat(50)),
    ];
    let model = tests::default_model::require().unwrap_or_else(|e| panic!("{e}"));
    let prompts: Vec<Vec<i32>> = texts
        .iter()
        .map(|t| llm::tokenize(&model, t).unwrap())
        .collect();
    assert!(
        prompts[2].len() > llm::stage::CHUNK_TOKENS,
        "one prompt spans two decodes"
    );
    const TOKENS: usize = 24;
    let dir = tests::real_shards(3);
    let mut alone = load_stages(dir.path(), 3, 2048);
    let expected: Vec<Vec<i32>> = prompts
        .iter()
        .map(|p| {
            alone.iter_mut().for_each(Stage::clear);
            pipeline_greedy(&mut alone, p, TOKENS, &[]).tokens
        })
        .collect();
    drop(alone);

    let mut stages: Vec<Stage> = (0..3)
        .map(|k| {
            let file = dir.path().join(format!("shard-{k}.gguf"));
            Stage::load_for(&file, k == 2, 2048, 1, 3).unwrap()
        })
        .collect();
    // Sequence 2 (the long prompt) joins at step 3, while 0 and 1 are generating.
    let joins = [0usize, 0, 3];
    let mut got: Vec<Vec<i32>> = vec![Vec::new(); 3];
    for step in 0..TOKENS + 3 {
        let (mut tokens, mut rows) = (Vec::new(), Vec::new());
        for seq in 0..3 {
            if step < joins[seq] || got[seq].len() == TOKENS {
                continue;
            }
            let start = if step == joins[seq] {
                0
            } else {
                prompts[seq].len() + got[seq].len() - 1
            };
            let input: Vec<i32> = if step == joins[seq] {
                prompts[seq].clone()
            } else {
                vec![*got[seq].last().unwrap()]
            };
            for (i, t) in input.iter().enumerate() {
                tokens.push(*t);
                rows.push(Row {
                    seq: seq as i32,
                    pos: (start + i) as i32,
                });
            }
        }
        if rows.is_empty() {
            break;
        }
        let mut out = stages[0].forward_token_rows(&tokens, &rows).unwrap();
        for stage in stages[1..].iter_mut() {
            let RowsOutput::Hidden(h) = out else {
                panic!("a non-final stage gave logits")
            };
            out = stage.forward_hidden_rows(&h, &rows).unwrap();
        }
        let RowsOutput::Logits(logits) = out else {
            panic!("the last stage gave hidden states")
        };
        for (seq, l) in logits {
            got[seq as usize].push(llm::stage::argmax(&l));
        }
    }
    for seq in 0..3 {
        assert_eq!(
            got[seq],
            expected[seq],
            "sequence {seq} ({} prompt tokens) differs when batched with the others",
            prompts[seq].len()
        );
    }
}

/// Threads of this process whose affinity is exactly `cpus` (from /proc/self/task).
fn threads_pinned_to(cpus: &[usize]) -> usize {
    let wanted = cpus
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter(|status| {
            status
                .lines()
                .any(|l| l.strip_prefix("Cpus_allowed_list:").map(str::trim) == Some(&wanted))
        })
        .count()
}

#[test]
fn every_decode_policy_gives_the_same_tokens_and_places_threads_as_it_says() {
    let _one = tests::swarm_lock();
    let allowed = llm::placement::allowed_cpus();
    assert!(
        allowed.len() >= 2,
        "this test needs 2 CPUs, has {allowed:?}"
    );
    let cpus = llm::placement::cpus_for(allowed, 2, 0);
    let dir = tests::real_shards(2);
    let load = |k: usize| {
        let file = dir.path().join(torrents::split::shard_file_name(k, "gguf"));
        Stage::load(&file, k == 1, 512, 2).unwrap()
    };
    let prompt: Vec<i32> = vec![1, 504, 3575, 282, 4649, 314];
    let mut free = vec![load(0), load(1)];
    let unpinned = pipeline_greedy(&mut free, &prompt, 12, &[]);
    drop(free);

    let mut stages = vec![load(0), load(1)];
    let under = |stages: &mut Vec<Stage>, policy: DecodePolicy, tokens: usize| {
        for stage in stages.iter_mut() {
            stage.clear();
            stage.set_policy(policy, 0).unwrap();
            assert_eq!(stage.policy(), policy);
        }
        let got = pipeline_greedy(stages, &prompt, tokens, &[]);
        assert_eq!(
            got.tokens,
            unpinned.tokens[..got.tokens.len()],
            "{policy} changed the tokens"
        );
        got
    };
    let before = threads_pinned_to(&cpus[1..]);
    let got = under(&mut stages, DecodePolicy::Pinned { threads: 2 }, 12);
    assert_eq!(got.first_logits, unpinned.first_logits);
    // ggml pinned this (the decoding) thread to the team's first CPU, and an OpenMP worker to
    // the second.
    assert_eq!(llm::placement::current_thread_cpus(), cpus[..1]);
    assert!(
        threads_pinned_to(&cpus[1..]) > before,
        "no OpenMP worker was pinned to CPU {}",
        cpus[1]
    );
    // A free team: the same OpenMP threads may run anywhere again.
    under(&mut stages, DecodePolicy::Team { threads: 2 }, 4);
    assert_eq!(llm::placement::current_thread_cpus(), allowed);
    assert_eq!(
        threads_pinned_to(&cpus[1..]),
        before,
        "a free team's worker stayed pinned to CPU {}",
        cpus[1]
    );
    // Pinned again, then one thread: a decode on one thread has no team, and the thread ggml
    // left pinned may run anywhere again.
    under(&mut stages, DecodePolicy::Pinned { threads: 2 }, 2);
    assert_eq!(llm::placement::current_thread_cpus(), cpus[..1]);
    under(&mut stages, DecodePolicy::One, 4);
    assert_eq!(llm::placement::current_thread_cpus(), allowed);
    // A pinned team's step on one thread (co-located stages sharing the cores) likewise.
    for stage in stages.iter_mut() {
        stage.clear();
        stage
            .set_policy(DecodePolicy::Pinned { threads: 2 }, 0)
            .unwrap();
    }
    pipeline_greedy(&mut stages, &prompt, 2, &[]);
    for stage in stages.iter_mut() {
        stage.clear();
        stage.set_threads(1);
    }
    let one = pipeline_greedy(&mut stages, &prompt, 4, &[]);
    assert_eq!(llm::placement::current_thread_cpus(), allowed);
    assert_eq!(one.tokens, unpinned.tokens[..one.tokens.len()]);
}

#[test]
fn calibration_times_every_candidate_keeps_the_fastest_and_leaves_the_tokens_alone() {
    let _one = tests::swarm_lock();
    let dir = tests::real_shards(2);
    let load = |k: usize| {
        let file = dir.path().join(torrents::split::shard_file_name(k, "gguf"));
        // Two sequences: the calibration runs in the last (the probe slot), the tokens in 0.
        Stage::load_for(&file, k == 1, 512, 1, 2).unwrap()
    };
    let prompt: Vec<i32> = vec![1, 504, 3575, 282, 4649, 314];
    let mut plain = vec![load(0), load(1)];
    let expected = pipeline_greedy(&mut plain, &prompt, 8, &[]);
    drop(plain);

    let mut stages = vec![load(0), load(1)];
    // Half the tokens, then calibrate both stages, then the rest: the cache of sequence 0 must
    // come through untouched.
    let first = pipeline_greedy(&mut stages, &prompt, 1, &[]);
    assert_eq!(first.tokens, expected.tokens[..1]);
    let candidates = vec![
        DecodePolicy::One,
        DecodePolicy::Team { threads: 2 },
        DecodePolicy::Pinned { threads: 2 },
    ];
    for (k, stage) in stages.iter_mut().enumerate() {
        let plan = llm::calibrate::Plan::new(candidates.clone(), k == 0, 2, k as u32);
        let c = llm::calibrate::calibrate(stage, &plan).unwrap();
        assert_eq!(c.trials.len(), 3);
        assert!(c.rounds >= plan.min_rounds && c.rounds <= plan.max_rounds);
        for (t, policy) in c.trials.iter().zip(&candidates) {
            assert_eq!(t.policy, *policy);
            assert!(t.per_decode > std::time::Duration::ZERO);
            assert_eq!(t.decodes, c.rounds * plan.decodes_per_round);
        }
        let fastest = c.trials.iter().map(|t| t.per_decode).min().unwrap();
        let chosen = c.trials.iter().find(|t| t.policy == c.chosen).unwrap();
        assert_eq!(chosen.per_decode, fastest, "{c:?}");
        assert_eq!(stage.policy(), c.chosen);
    }
    // Go on from where sequence 0 was: the next token at the next position.
    let mut pos = prompt.len() as i32;
    let mut token = first.tokens[0];
    let mut got = first.tokens.clone();
    while got.len() < expected.tokens.len() {
        token = common::step_token(&mut stages, token, pos);
        got.push(token);
        pos += 1;
    }
    assert_eq!(got, expected.tokens, "calibration disturbed sequence 0");
}
