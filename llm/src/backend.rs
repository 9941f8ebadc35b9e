//! llama.cpp keeps one global backend per process; [`backend`] initialises it once and silences
//! its logging (it writes to stderr directly otherwise), unless `SHARDSWARM_LLAMA_LOG` is set:
//! llama.cpp's log is where a refused file's reason is.

use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;

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
            if std::env::var_os("SHARDSWARM_LLAMA_LOG").is_none() {
                backend.void_logs();
            }
            Ok(backend)
        })
        .as_ref()
        .map_err(|e| LlmError::Backend(e.clone()))
}
