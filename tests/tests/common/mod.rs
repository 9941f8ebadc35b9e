//! A chain of stages run in one process: what the stage tests hold to the whole model.

#![allow(dead_code)] // each test file uses part of it

use llm::stage::{argmax, Stage, StageOutput};

/// What a chain of stages generated.
pub struct Generated {
    /// Greedy tokens, stopping before one in `eos` (if any) or at `max_tokens`.
    pub tokens: Vec<i32>,
    /// The last stage's logits for the prompt's last position (the first step).
    pub first_logits: Vec<f32>,
}

/// Greedy generation through `stages` from the prompt's token ids.
pub fn pipeline_greedy(
    stages: &mut [Stage],
    prompt: &[i32],
    max_tokens: usize,
    eos: &[i32],
) -> Generated {
    let mut out = Vec::new();
    let mut first_logits = None;
    let mut input = prompt.to_vec();
    let mut pos = 0i32;
    for _ in 0..max_tokens {
        let logits = forward_chain(stages, &input, pos);
        let next = argmax(&logits);
        first_logits.get_or_insert(logits);
        pos += input.len() as i32;
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        input = vec![next];
    }
    Generated {
        tokens: out,
        first_logits: first_logits.unwrap_or_default(),
    }
}

/// The last stage's logits for `input` (token ids) at positions `pos..` of sequence 0, run
/// through every stage.
pub fn forward_chain(stages: &mut [Stage], input: &[i32], pos: i32) -> Vec<f32> {
    let mut state = stages[0].forward_tokens(input, pos).unwrap();
    for stage in stages[1..].iter_mut() {
        let StageOutput::Hidden(h) = state else {
            panic!("a non-final stage gave logits")
        };
        state = stage.forward_hidden(&h, pos).unwrap();
    }
    let StageOutput::Logits(logits) = state else {
        panic!("the last stage gave hidden states")
    };
    logits
}

/// The greedy token after `token` at position `pos` of sequence 0.
pub fn step_token(stages: &mut [Stage], token: i32, pos: i32) -> i32 {
    argmax(&forward_chain(stages, &[token], pos))
}

/// The stage files `shard-0.gguf …` in `dir`, loaded with one thread and a context of at most
/// `max_ctx`.
pub fn load_stages(dir: &std::path::Path, n: usize, max_ctx: u32) -> Vec<Stage> {
    (0..n)
        .map(|k| {
            let file = torrents::split::shard_file_name(k, "gguf");
            Stage::load(&dir.join(file), k + 1 == n, max_ctx, 1)
                .unwrap_or_else(|e| panic!("stage {k} of {n}: {e}"))
        })
        .collect()
}
