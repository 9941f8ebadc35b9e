//! Shards and torrents: reading GGUF files, cutting them into layer-range stage shards, the shard
//! manifest (`shards.json`), validation, and BitTorrent v1 metainfo. No networking: the seeder,
//! coordinator and nodes build on this crate.

pub mod arch;
pub mod bencode;
pub mod error;
pub mod gguf;
pub mod hashing;
pub mod join;
pub mod magnet;
pub mod manifest;
pub mod map;
pub mod metainfo;
pub mod progress;
pub mod safetensors;
pub mod split;
pub mod tracker_query;
pub mod validate;

pub use error::{Error, Result};
