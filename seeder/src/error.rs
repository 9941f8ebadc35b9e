//! The seeder library's errors. Each names what failed (a flag, a file, a directory), since
//! these messages end up in front of an operator.

/// Why the seeder cannot start, or cannot serve a file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value cannot work.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Io(#[from] daemon::IoError),
    /// A file in the seed dir that is not served, and why.
    #[error("{0}")]
    NotServable(String),
    /// Hashing, torrent-making or cache files (torrents' errors name the file).
    #[error(transparent)]
    Files(#[from] torrents::Error),
    /// The BitTorrent session (librqbit) failed.
    #[error("{0}")]
    Torrent(String),
}

impl Error {
    /// A librqbit error (its whole chain of causes).
    pub fn torrent(e: impl std::fmt::Display) -> Error {
        Error::Torrent(format!("{e:#}"))
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
