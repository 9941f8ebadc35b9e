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
