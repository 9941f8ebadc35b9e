//! Whole models in one llama.cpp process, through llama-cpp-2's safe API only: what a model
//! file holds, and the reference completions a pipeline of stages must equal token for token
//! (independent of [`crate::stage`], which they check).

use std::path::Path;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;

use crate::backend::{backend, LlmError};

/// What llama.cpp reports about a loaded model: enough to check that a stage file is what its
/// manifest says it is.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ModelInfo {
    /// Transformer blocks llama.cpp built (`<arch>.block_count` of the file).
    pub n_layer: u32,
    /// Hidden size.
    pub n_embd: i32,
    /// Vocabulary size (1 for middle-stage files, which carry no tokenizer).
    pub n_vocab: i32,
    /// Parameters in the file.
    pub n_params: u64,
    /// `general.architecture`.
    pub architecture: String,
}

/// Load `path` fully (weights included, CPU only) and report what llama.cpp sees.
pub fn inspect_model(path: &Path) -> Result<ModelInfo, LlmError> {
    let model = load_whole(path)?;
    Ok(ModelInfo {
        n_layer: model.n_layer(),
        n_embd: model.n_embd(),
        n_vocab: model.n_vocab(),
        n_params: model.n_params(),
        architecture: model
            .meta_val_str("general.architecture")
            .unwrap_or_default(),
    })
}

/// A completion by one llama.cpp process with the whole model: the reference a pipeline of
/// stages must equal token for token.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Completion {
    pub text: String,
    /// The prompt's token ids.
    pub prompt_ids: Vec<i32>,
    /// The generated token ids (an end-of-generation token stops before it is added).
    pub token_ids: Vec<i32>,
    /// Milliseconds from the start of the prompt's batch to the first generated token.
    pub first_token_ms: f64,
    /// Milliseconds spent generating the tokens after the first.
    pub rest_ms: f64,
}

/// The whole model at `path`, weights on the CPU.
fn load_whole(path: &Path) -> Result<LlamaModel, LlmError> {
    LlamaModel::load_from_file(
        backend()?,
        path,
        &LlamaModelParams::default().with_n_gpu_layers(0),
    )
    .map_err(|e| LlmError::Load {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// A context of `n_ctx` positions for a reference run.
fn reference_context<'m>(
    model: &'m LlamaModel,
    path: &Path,
    n_ctx: u32,
    threads: i32,
) -> Result<LlamaContext<'m>, LlmError> {
    let params = LlamaContextParams::default()
        .with_n_ctx(std::num::NonZeroU32::new(n_ctx))
        .with_n_batch(n_ctx)
        // llama.cpp's own micro-batch, and the stages' chunk: the same split of a long prompt
        // gives the same floating-point sums, so the same tokens.
        .with_n_ubatch(crate::stage::CHUNK_TOKENS as u32)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    model
        .new_context(backend()?, params)
        .map_err(|e| LlmError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

fn decode_err(e: &dyn std::fmt::Display) -> LlmError {
    LlmError::Decode(e.to_string())
}

/// `text` as the whole model's tokenizer cuts it (with BOS where the model wants one).
pub fn tokenize(path: &Path, text: &str) -> Result<Vec<i32>, LlmError> {
    let model = load_whole(path)?;
    let vocab = model.vocab();
    let tokens = vocab.tokenize(text.as_bytes(), vocab.should_add_bos(), true);
    Ok(tokens.iter().map(|t| t.0).collect())
}

/// What one llama.cpp process with the whole model gives for a prompt of token ids: the
/// reference a chain of stages is held to, for models with or without a usable tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenReference {
    /// `max_tokens` greedy tokens. End-of-generation tokens do not stop it: a token-level
    /// reference compares every step.
    pub token_ids: Vec<i32>,
    /// The logits of the prompt's last position (the first step), n_vocab floats.
    pub first_logits: Vec<f32>,
}

/// Greedy tokens and first-step logits of the whole model at `path` for `prompt` ids.
pub fn reference_tokens(
    path: &Path,
    prompt: &[i32],
    max_tokens: usize,
    threads: i32,
) -> Result<TokenReference, LlmError> {
    if prompt.is_empty() {
        return Err(LlmError::Decode("the prompt has no tokens".into()));
    }
    let model = load_whole(path)?;
    let n_ctx = (prompt.len() + max_tokens + 8).next_power_of_two() as u32;
    let mut ctx = reference_context(&model, path, n_ctx, threads)?;
    let mut batch = LlamaBatch::new(n_ctx as usize, 1);
    for (i, t) in prompt.iter().enumerate() {
        batch
            .add(LlamaToken(*t), i as i32, &[0], i + 1 == prompt.len())
            .map_err(|e| decode_err(&e))?;
    }
    ctx.decode(&mut batch).map_err(|e| decode_err(&e))?;
    let first_logits = ctx.get_logits_ith(batch.n_tokens() - 1).to_vec();
    let mut token_ids = Vec::with_capacity(max_tokens);
    let mut pos = prompt.len() as i32;
    while token_ids.len() < max_tokens {
        let next = crate::stage::argmax(ctx.get_logits_ith(batch.n_tokens() - 1));
        token_ids.push(next);
        if token_ids.len() < max_tokens {
            batch.clear();
            batch
                .add(LlamaToken(next), pos, &[0], true)
                .map_err(|e| decode_err(&e))?;
            ctx.decode(&mut batch).map_err(|e| decode_err(&e))?;
            pos += 1;
        }
    }
    Ok(TokenReference {
        token_ids,
        first_logits,
    })
}

/// Greedy completion of `prompt` with the whole model at `path`, through llama-cpp-2's safe
/// API only (independent of [`crate::stage`], which it checks).
pub fn reference_completion(
    path: &Path,
    prompt: &str,
    max_tokens: usize,
    threads: i32,
) -> Result<Completion, LlmError> {
    let greedy = protocol::data::Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
    reference_completion_with(path, prompt, max_tokens, threads, greedy)
}

/// [`reference_completion`] with sampling. Tokens are picked by the same sampler as the
/// pipeline's last stage ([`crate::sample::sample`]), keyed by the same positions (the first
/// input position of each step), so a seed gives the same completion both ways.
pub fn reference_completion_with(
    path: &Path,
    prompt: &str,
    max_tokens: usize,
    threads: i32,
    sampling: protocol::data::Sampling,
) -> Result<Completion, LlmError> {
    let model = load_whole(path)?;
    let vocab = model.vocab();
    let prompt_tokens = vocab.tokenize(prompt.as_bytes(), vocab.should_add_bos(), true);
    if prompt_tokens.is_empty() {
        return Err(LlmError::Decode("the prompt has no tokens".into()));
    }
    let n_ctx = (prompt_tokens.len() + max_tokens + 8).next_power_of_two() as u32;
    let mut ctx = reference_context(&model, path, n_ctx, threads)?;
    let mut batch = LlamaBatch::new(n_ctx as usize, 1);
    for (i, t) in prompt_tokens.iter().enumerate() {
        batch
            .add(*t, i as i32, &[0], i + 1 == prompt_tokens.len())
            .map_err(|e| decode_err(&e))?;
    }
    let started = std::time::Instant::now();
    ctx.decode(&mut batch).map_err(|e| decode_err(&e))?;
    let mut first_token_ms = None;
    let mut out = Vec::new();
    for pos in (prompt_tokens.len() as i32..).take(max_tokens) {
        // The first step's input starts at position 0 (the prompt), later ones at pos - 1.
        let step_pos = if out.is_empty() { 0 } else { pos as u32 - 1 };
        let next =
            crate::sample::sample(ctx.get_logits_ith(batch.n_tokens() - 1), sampling, step_pos);
        first_token_ms.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1000.0);
        if vocab.is_eog(LlamaToken(next)) {
            break;
        }
        out.push(next);
        batch.clear();
        batch
            .add(LlamaToken(next), pos, &[0], true)
            .map_err(|e| decode_err(&e))?;
        ctx.decode(&mut batch).map_err(|e| decode_err(&e))?;
    }
    let tokens: Vec<LlamaToken> = out.iter().map(|t| LlamaToken(*t)).collect();
    let text = String::from_utf8_lossy(&vocab.detokenize(&tokens, false, false)).into_owned();
    let total_ms = started.elapsed().as_secs_f64() * 1000.0;
    let first_token_ms = first_token_ms.unwrap_or(total_ms);
    Ok(Completion {
        text,
        prompt_ids: prompt_tokens.iter().map(|t| t.0).collect(),
        token_ids: out,
        first_token_ms,
        rest_ms: total_ms - first_token_ms,
    })
}
