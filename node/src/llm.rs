//! Opening GGUF files with llama.cpp.
//!
//! llama.cpp keeps one global backend per process; [`backend`] initialises it once and silences
//! its logging (it writes to stderr directly otherwise).

use std::path::Path;
use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use serde::Serialize;

/// Errors from loading a model with llama.cpp.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("llama.cpp backend could not start: {0}")]
    Backend(String),
    #[error("{path}: llama.cpp refused to load it: {message}")]
    Load { path: String, message: String },
    #[error("llama.cpp could not run the batch: {0}")]
    Decode(String),
}

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// The process-wide llama.cpp backend (initialised on first use, logs silenced).
pub fn backend() -> Result<&'static LlamaBackend, LlmError> {
    BACKEND
        .get_or_init(|| {
            let mut backend = LlamaBackend::init().map_err(|e| e.to_string())?;
            backend.void_logs();
            Ok(backend)
        })
        .as_ref()
        .map_err(|e| LlmError::Backend(e.clone()))
}

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
    let backend = backend()?;
    let params = LlamaModelParams::default().with_n_gpu_layers(0);
    let model = LlamaModel::load_from_file(backend, path, &params).map_err(|e| LlmError::Load {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
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
/// pipeline's last stage ([`crate::serve::sample`]), keyed by the same positions (the first
/// input position of each step), so a seed gives the same completion both ways.
pub fn reference_completion_with(
    path: &Path,
    prompt: &str,
    max_tokens: usize,
    threads: i32,
    sampling: protocol::data::Sampling,
) -> Result<Completion, LlmError> {
    use llama_cpp_2::context::params::LlamaContextParams;
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::token::LlamaToken;
    let backend = backend()?;
    let load_err = |message: String| LlmError::Load {
        path: path.display().to_string(),
        message,
    };
    let model = LlamaModel::load_from_file(
        backend,
        path,
        &LlamaModelParams::default().with_n_gpu_layers(0),
    )
    .map_err(|e| load_err(e.to_string()))?;
    let vocab = model.vocab();
    let prompt_tokens = vocab.tokenize(prompt.as_bytes(), vocab.should_add_bos(), true);
    if prompt_tokens.is_empty() {
        return Err(LlmError::Decode("the prompt has no tokens".into()));
    }
    let n_ctx = (prompt_tokens.len() + max_tokens + 8).next_power_of_two() as u32;
    let params = LlamaContextParams::default()
        .with_n_ctx(std::num::NonZeroU32::new(n_ctx))
        .with_n_batch(n_ctx)
        // llama.cpp's own micro-batch, and the stages' chunk: the same split of a long prompt
        // gives the same floating-point sums, so the same tokens.
        .with_n_ubatch(crate::stage::CHUNK_TOKENS as u32)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model
        .new_context(backend, params)
        .map_err(|e| load_err(e.to_string()))?;
    let decode_err = |e: &dyn std::fmt::Display| LlmError::Decode(e.to_string());
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
            crate::serve::sample(ctx.get_logits_ith(batch.n_tokens() - 1), sampling, step_pos);
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
