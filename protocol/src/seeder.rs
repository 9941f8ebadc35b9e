//! The seeder's HTTP documents that other services read: `/files` (LIST_FILES) and `/healthz`.
//! The seeder serialises these types and the coordinator deserialises them, so both sides
//! agree by construction. (`/manifest` is `torrents::manifest::Manifest`.)

use serde::{Deserialize, Serialize};

/// One served file, as `GET /files` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// v1 info hash, 40 hex digits.
    pub info_hash: String,
    pub magnet: String,
    /// Where the `.torrent` is served.
    pub torrent_url: String,
    /// The file's BEP 19 web seed (the torrent's `url-list`), for a plain HTTP download.
    pub web_seed: Option<String>,
    /// The shard id, for `shard-K.*` files.
    pub shard: Option<u32>,
}

/// `GET /files`: LIST_FILES.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileList {
    pub files: Vec<FileEntry>,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// Files served.
    pub files: usize,
    /// The seeder's own BitTorrent address (how nodes tell its bytes from other nodes').
    pub peer: String,
}
