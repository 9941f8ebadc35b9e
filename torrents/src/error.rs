//! The crate's one error type: every variant names the file or value at fault, since these
//! messages end up in front of a person running `shard_loader`.

use std::path::{Path, PathBuf};

/// Errors from reading, splitting, validating and torrent-making.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid GGUF file: {message}", path.display())]
    Gguf { path: PathBuf, message: String },
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },
    #[error("cannot split: {0}")]
    Split(String),
    #[error("cannot split a '{arch}' model into stages: {reason} (`shard_loader architectures` lists what is accepted)")]
    Unsupported { arch: String, reason: String },
    #[error("cannot map: {0}")]
    Map(String),
    #[error("{}: bad shard manifest: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    #[error("invalid metainfo: {0}")]
    Metainfo(String),
    #[error("invalid argument: {0}")]
    Argument(String),
}

impl Error {
    /// An IO error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
