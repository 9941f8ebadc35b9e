//! The coordinator library's errors. Each names what failed (a flag, a URL, a file, a stage),
//! since these messages end up in front of an operator.

/// Why the coordinator cannot start or a request cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value cannot work.
    #[error("{0}")]
    Config(String),
    /// The seeder did not answer as expected.
    #[error("{url}: {message}")]
    Seeder { url: String, message: String },
    /// A document from the seeder whose signature does not check out under `--seeder-key`:
    /// not tried again.
    #[error("{url}: its signature does not check out under --seeder-key: not the seeder's document (changed on the way?), or the wrong key")]
    Unsigned { url: String },
    /// A node named a key the swarm's CA cannot certify (REGISTER `tls_public_key`).
    #[error("{0}")]
    NodeKey(String),
    #[error(transparent)]
    Io(#[from] daemon::IoError),
    #[error(transparent)]
    Llm(#[from] llm::LlmError),
    /// Writing a fetched file.
    #[error(transparent)]
    Files(#[from] torrents::Error),
    /// The model's vocabulary or chat template could not be used.
    #[error(transparent)]
    Vocab(#[from] crate::text::VocabError),
}

impl Error {
    /// The seeder at `url` failed with `message`.
    pub fn seeder(url: &str, message: impl std::fmt::Display) -> Error {
        Error::Seeder {
            url: url.to_owned(),
            message: message.to_string(),
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
