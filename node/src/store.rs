//! A node's data directory: an exclusive lock, the node id (made once), the shards it holds
//! and the record of which of them it has verified.
//!
//! Layout: `.lock` (flock), `node_id`, `shards/` (what librqbit writes and seeds),
//! `verified.json` (file → size, mtime, sha256), `session/` (librqbit's fast-resume state).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use torrents::manifest::write_atomically;

/// One verified file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    pub size: u64,
    pub mtime_ns: i128,
    pub sha256: String,
}

/// The data directory, locked for this process.
pub struct DataDir {
    root: PathBuf,
    _lock: File,
    pub node_id: String,
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

impl DataDir {
    /// Open (creating if needed) and lock `root`. Fails if another node holds the lock.
    pub fn open(root: &Path) -> Result<DataDir> {
        std::fs::create_dir_all(root.join("shards"))
            .map_err(|e| daemon::IoError::new(format!("data dir {}", root.display()), e))?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(".lock"))
            .map_err(|e| daemon::IoError::new(format!("locking {}", root.display()), e))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::Config(format!(
                "data dir {} is in use by another node",
                root.display()
            )));
        }
        let id_path = root.join("node_id");
        let node_id = match std::fs::read_to_string(&id_path) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
            _ => {
                let id = uuid::Uuid::new_v4().to_string();
                write_atomically(&id_path, id.as_bytes())?;
                id
            }
        };
        Ok(DataDir {
            root: root.to_owned(),
            _lock: lock,
            node_id,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where shard files live (librqbit's output folder).
    pub fn shards_dir(&self) -> PathBuf {
        self.root.join("shards")
    }

    pub fn session_dir(&self) -> PathBuf {
        self.root.join("session")
    }

    fn records(&self) -> BTreeMap<String, Verified> {
        std::fs::read(self.root.join("verified.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Verified shard files still on disk unchanged: (file name, sha256).
    pub fn verified(&self) -> Vec<(String, String)> {
        self.records()
            .into_iter()
            .filter(|(name, v)| {
                std::fs::metadata(self.shards_dir().join(name))
                    .is_ok_and(|m| m.len() == v.size && mtime_ns(&m) == v.mtime_ns)
            })
            .map(|(name, v)| (name, v.sha256))
            .collect()
    }

    /// Record that `name` (in `shards/`) has `sha256`.
    pub fn record_verified(&self, name: &str, sha256: &str) -> Result<()> {
        let path = self.shards_dir().join(name);
        let meta = std::fs::metadata(&path)
            .map_err(|e| daemon::IoError::new(path.display().to_string(), e))?;
        let mut records = self.records();
        records.insert(
            name.to_owned(),
            Verified {
                size: meta.len(),
                mtime_ns: mtime_ns(&meta),
                sha256: sha256.to_owned(),
            },
        );
        self.store_records(&records)
    }

    /// Forget (and optionally delete) a shard file.
    pub fn forget(&self, name: &str, delete: bool) -> Result<()> {
        let mut records = self.records();
        records.remove(name);
        self.store_records(&records)?;
        if delete {
            let _ = std::fs::remove_file(self.shards_dir().join(name));
        }
        Ok(())
    }

    fn store_records(&self, records: &BTreeMap<String, Verified>) -> Result<()> {
        let path = self.root.join("verified.json");
        let text = serde_json::to_vec_pretty(records).expect("records serialise");
        Ok(write_atomically(&path, &text)?)
    }

    /// Free bytes on the data dir's filesystem.
    pub fn disk_free(&self) -> u64 {
        disk_free(&self.root)
    }
}

/// Free bytes for an unprivileged user on the filesystem holding `path`.
pub fn disk_free(path: &Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs fills the struct we pass; the path is a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return 0;
        }
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

/// Available memory (MemAvailable), or 0 if unknown.
pub fn ram_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_id_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let a = DataDir::open(dir.path()).unwrap();
        let e = DataDir::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("in use"), "{e}");
        std::fs::write(a.shards_dir().join("shard-0.gguf"), b"abc").unwrap();
        a.record_verified("shard-0.gguf", "sha").unwrap();
        assert_eq!(
            a.verified(),
            [("shard-0.gguf".to_string(), "sha".to_string())]
        );
        let id = a.node_id.clone();
        drop(a);
        let b = DataDir::open(dir.path()).unwrap();
        assert_eq!(b.node_id, id, "the node id persists");
        std::fs::write(b.shards_dir().join("shard-0.gguf"), b"abcd").unwrap();
        assert!(
            b.verified().is_empty(),
            "a changed file is no longer verified"
        );
        assert!(disk_free(dir.path()) > 0);
    }
}
