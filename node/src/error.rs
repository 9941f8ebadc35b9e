//! The node library's errors. Each names what failed (a flag, a file, a URL, a stage), since
//! these messages end up in the node's log and, for a failed shard, in `SHARD_FAILED`.

use std::fmt::Display;

/// Why the node, a fetch or a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag is missing or cannot work.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Io(#[from] daemon::IoError),
    /// The embedded BitTorrent client (librqbit) failed.
    #[error("{0}")]
    Torrent(String),
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    /// A shard is not what its `LOAD_SHARD` says it is.
    #[error("{0}")]
    Shard(String),
    /// The control channel to the coordinator failed (the node reconnects).
    #[error("control channel: {0}")]
    Control(String),
    /// The coordinator refused this node: it stops.
    #[error("the coordinator refused this node ({code}): {message}")]
    Refused { code: String, message: String },
    /// Reading or writing shard files and records (torrents' errors name the file).
    #[error(transparent)]
    Files(#[from] torrents::Error),
    #[error(transparent)]
    Llm(#[from] llm::LlmError),
    #[error(transparent)]
    Channel(#[from] protocol::data::io::ChannelError),
    /// The pipeline is not in a state to run the request.
    #[error("{0}")]
    Pipeline(String),
}

impl Error {
    /// A librqbit error (its whole chain of causes).
    pub fn torrent(e: impl Display) -> Error {
        Error::Torrent(format!("{e:#}"))
    }

    /// An HTTP request to `url` failed.
    pub fn http(url: &str, e: impl Display) -> Error {
        Error::Http {
            url: url.to_owned(),
            message: e.to_string(),
        }
    }

    /// A control-channel failure.
    pub fn control(e: impl Display) -> Error {
        Error::Control(e.to_string())
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
