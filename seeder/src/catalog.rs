//! The seed directory's catalog: which files are served, with their torrents and hashes.
//!
//! A scan lists the top level of the seed directory for `.gguf` and `.safetensors` files
//! (following no symlink out of it), and makes a `.torrent` for each new or changed file. Made
//! torrents are cached in the state directory keyed by name, size, mtime and public URL, so a
//! restart hashes nothing that has not changed. Scans never write to the seed directory.

use crate::{Error, Result};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use torrents::manifest::write_atomically;
use torrents::metainfo::{self, CreateOptions, Metainfo};

/// One served file.
#[derive(Debug, Clone)]
pub struct SeedFile {
    /// File name (the seed directory's top level only).
    pub name: String,
    /// Where it is (inside the seed directory, symlinks resolved).
    pub path: PathBuf,
    pub size: u64,
    /// Modification time in nanoseconds: with the size, how a change is noticed.
    pub mtime_ns: i128,
    pub sha256: String,
    pub torrent: Arc<Metainfo>,
    /// The `.torrent` as served.
    pub torrent_bytes: Arc<Vec<u8>>,
    /// K for `shard-K.*` files.
    pub shard: Option<u32>,
}

impl SeedFile {
    pub fn info_hash_hex(&self) -> String {
        self.torrent.info_hash_hex()
    }
}

/// What a scan changed.
#[derive(Debug, Default)]
pub struct ScanDiff {
    pub added: Vec<SeedFile>,
    /// (old, new) for files whose size or mtime changed.
    pub changed: Vec<(SeedFile, SeedFile)>,
    pub removed: Vec<SeedFile>,
}

impl ScanDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// The cache entry for one file's torrent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct CacheEntry {
    size: u64,
    mtime_ns: i128,
    public_url: String,
    sha256: String,
    info_hash: String,
}

/// Scans the seed directory and keeps the current set of served files.
pub struct Catalog {
    seed_dir: PathBuf,
    state_dir: PathBuf,
    public_url: String,
    files: BTreeMap<String, SeedFile>,
}

/// Is this a file name we serve?
pub fn is_servable_name(name: &str) -> bool {
    !name.starts_with('.') && (name.ends_with(".gguf") || name.ends_with(".safetensors"))
}

impl Catalog {
    /// A catalog of `seed_dir` (which must exist), caching torrents in `state_dir`.
    pub fn new(seed_dir: &Path, state_dir: &Path, public_url: &str) -> Result<Catalog> {
        let seed_dir = seed_dir
            .canonicalize()
            .map_err(|e| daemon::IoError::new(format!("seed dir {}", seed_dir.display()), e))?;
        if !seed_dir.is_dir() {
            return Err(Error::Config(format!(
                "seed dir {} is not a directory",
                seed_dir.display()
            )));
        }
        std::fs::create_dir_all(state_dir.join("torrents"))
            .map_err(|e| daemon::IoError::new(format!("state dir {}", state_dir.display()), e))?;
        Ok(Catalog {
            seed_dir,
            state_dir: state_dir.to_owned(),
            public_url: public_url.trim_end_matches('/').to_owned(),
            files: BTreeMap::new(),
        })
    }

    pub fn seed_dir(&self) -> &Path {
        &self.seed_dir
    }

    /// Served files by name.
    pub fn files(&self) -> &BTreeMap<String, SeedFile> {
        &self.files
    }

    /// Rescan the directory, returning what changed. Hashing runs on the calling thread (call
    /// it from a blocking task).
    pub fn scan(&mut self) -> Result<ScanDiff> {
        let mut found: BTreeMap<String, (PathBuf, std::fs::Metadata)> = BTreeMap::new();
        let entries = std::fs::read_dir(&self.seed_dir).map_err(|e| {
            daemon::IoError::new(format!("seed dir {}", self.seed_dir.display()), e)
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_servable_name(&name) {
                continue;
            }
            match self.resolve(&entry.path()) {
                Ok(Some((path, meta))) => {
                    found.insert(name, (path, meta));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("skipping {name}: {e}"),
            }
        }
        let mut diff = ScanDiff::default();
        for (name, old) in &self.files {
            if !found.contains_key(name) {
                diff.removed.push(old.clone());
            }
        }
        for (name, (path, meta)) in found {
            let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
            if let Some(old) = self.files.get(&name) {
                if old.size == meta.len() && old.mtime_ns == mtime_ns && old.path == path {
                    continue;
                }
            }
            match self.load_or_make(&name, &path, meta.len(), mtime_ns) {
                Ok(file) => match self.files.get(&name) {
                    Some(old) => diff.changed.push((old.clone(), file)),
                    None => diff.added.push(file),
                },
                Err(e) => tracing::warn!("skipping {name}: {e:#}"),
            }
        }
        for f in &diff.removed {
            self.files.remove(&f.name);
        }
        for f in diff
            .added
            .iter()
            .chain(diff.changed.iter().map(|(_, new)| new))
        {
            self.files.insert(f.name.clone(), f.clone());
        }
        Ok(diff)
    }

    /// The file behind a directory entry if we may serve it: a regular file, or a symlink to
    /// one inside the seed directory, that we can open for reading.
    fn resolve(&self, entry: &Path) -> Result<Option<(PathBuf, std::fs::Metadata)>> {
        let io = |e| daemon::IoError::new(entry.display().to_string(), e);
        let link = std::fs::symlink_metadata(entry).map_err(io)?;
        let path = if link.file_type().is_symlink() {
            let target = entry.canonicalize().map_err(io)?;
            if !target.starts_with(&self.seed_dir) {
                return Err(Error::NotServable(format!(
                    "symlink points outside the seed dir ({})",
                    target.display()
                )));
            }
            target
        } else {
            entry.to_owned()
        };
        let meta = std::fs::metadata(&path).map_err(io)?;
        if !meta.is_file() {
            return Ok(None);
        }
        if meta.len() == 0 {
            return Err(Error::NotServable("empty file".into()));
        }
        std::fs::File::open(&path)
            .map_err(|e| Error::NotServable(format!("cannot read it: {e}")))?;
        Ok(Some((path, meta)))
    }

    fn cache_paths(&self, name: &str) -> (PathBuf, PathBuf) {
        let dir = self.state_dir.join("torrents");
        (
            dir.join(format!("{name}.torrent")),
            dir.join(format!("{name}.json")),
        )
    }

    fn load_or_make(&self, name: &str, path: &Path, size: u64, mtime_ns: i128) -> Result<SeedFile> {
        let (torrent_path, entry_path) = self.cache_paths(name);
        let opts = self.torrent_options(name);
        // A cached torrent for this very file (same size and mtime) is reused; if only the
        // public URL changed it is rewrapped with the new URLs, keeping its info hash.
        let cached = std::fs::read(&entry_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<CacheEntry>(&b).ok())
            .filter(|e| e.size == size && e.mtime_ns == mtime_ns)
            .and_then(|entry| {
                let bytes = std::fs::read(&torrent_path).ok()?;
                let torrent = metainfo::parse(&bytes).ok()?;
                (torrent.info_hash_hex() == entry.info_hash
                    && torrent.length == size
                    && torrent.name == name)
                    .then_some((entry, bytes, torrent))
            });
        // Whether the cache already holds exactly this torrent (then nothing is written).
        let mut unchanged = false;
        let (sha256, bytes, torrent) = match cached {
            Some((entry, bytes, torrent)) if entry.public_url == self.public_url => {
                unchanged = true;
                (entry.sha256, bytes, torrent)
            }
            Some((entry, _, old)) => {
                tracing::info!(
                    "[TORRENT] {name}: public URL changed, rewriting its torrent (no re-hash)"
                );
                let (bytes, torrent) = metainfo::rewrap(&old, &opts)?;
                (entry.sha256, bytes, torrent)
            }
            None => {
                tracing::info!("[TORRENT] hashing {name} ({size} bytes)");
                std::thread::scope(|s| {
                    let sha = s.spawn(|| torrents::hashing::sha256_file(path));
                    let (bytes, torrent) = metainfo::create(path, &opts, &|_| {})?;
                    Ok::<_, torrents::Error>((sha.join().expect("sha256 thread")?, bytes, torrent))
                })?
            }
        };
        if !unchanged {
            let entry = CacheEntry {
                size,
                mtime_ns,
                public_url: self.public_url.clone(),
                sha256: sha256.clone(),
                info_hash: torrent.info_hash_hex(),
            };
            write_atomically(&torrent_path, &bytes)?;
            let json = serde_json::to_vec_pretty(&entry).expect("cache entries serialise");
            write_atomically(&entry_path, &json)?;
        }
        Ok(SeedFile {
            name: name.to_owned(),
            path: path.to_owned(),
            size,
            mtime_ns,
            sha256,
            torrent: Arc::new(torrent),
            torrent_bytes: Arc::new(bytes),
            shard: torrents::split::parse_shard_file_name(name).map(|(k, _)| k),
        })
    }

    /// Trackers and web seeds of our torrents: our own tracker and web seed.
    fn torrent_options(&self, name: &str) -> CreateOptions {
        CreateOptions {
            announce: vec![format!("{}/announce", self.public_url)],
            web_seeds: vec![format!(
                "{}/seed/{}",
                self.public_url,
                url_path_encode(name)
            )],
            creation_date: None, // deterministic: the same file gives the same .torrent
            ..Default::default()
        }
    }
}
/// Percent-encode a file name for a URL path segment.
pub fn url_path_encode(name: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(name, SEGMENT).to_string()
}
