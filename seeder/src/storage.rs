//! A read-only librqbit storage, so seeding can never change a user's file.
//!
//! librqbit's default `FilesystemStorage` opens every file read-write and calls `set_len` in
//! `ensure_file_length`; a seeder must not trust that with the files it shares. This storage
//! opens files read-only, refuses every write, never truncates and never deletes. Files are
//! found by info hash in a registry the catalog fills, so torrents that librqbit restores from
//! its fast-resume state on restart get the same storage as the ones we add.
//!
//! The one place in the library that uses `anyhow`: librqbit's storage traits return
//! `anyhow::Result`, so their implementations must too.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use std::any::TypeId;

use anyhow::{bail, Context};
use librqbit::dht::Id20;
use librqbit::storage::filesystem::FilesystemStorageFactory;
use librqbit::storage::{BoxStorageFactory, StorageFactory, StorageFactoryExt, TorrentStorage};
use librqbit::{ManagedTorrentShared, TorrentMetadata};

/// Info hash → the one file that torrent seeds.
#[derive(Clone, Default)]
pub struct FileRegistry(Arc<RwLock<HashMap<Id20, PathBuf>>>);

impl FileRegistry {
    pub fn insert(&self, info_hash: Id20, path: PathBuf) {
        self.0.write().unwrap().insert(info_hash, path);
    }

    pub fn remove(&self, info_hash: &Id20) {
        self.0.write().unwrap().remove(info_hash);
    }

    fn get(&self, info_hash: &Id20) -> Option<PathBuf> {
        self.0.read().unwrap().get(info_hash).cloned()
    }
}

/// Makes [`ReadOnlyStorage`] for torrents in the registry.
#[derive(Clone)]
pub struct ReadOnlyStorageFactory {
    pub files: FileRegistry,
}

impl StorageFactory for ReadOnlyStorageFactory {
    type Storage = ReadOnlyStorage;

    fn create(
        &self,
        shared: &ManagedTorrentShared,
        metadata: &TorrentMetadata,
    ) -> anyhow::Result<ReadOnlyStorage> {
        let path = self.files.get(&shared.info_hash).with_context(|| {
            format!(
                "torrent {:?} is not in the seed directory",
                shared.info_hash
            )
        })?;
        if metadata.file_infos.len() != 1 {
            bail!("the seeder serves single-file torrents only");
        }
        Ok(ReadOnlyStorage {
            path,
            expected_len: metadata.file_infos[0].len,
            file: None,
        })
    }

    /// Claims to be a `FilesystemStorageFactory` too: librqbit's JSON session persistence (which
    /// holds the fast-resume bitfields) refuses any other storage, because it can only restore
    /// torrents whose files live in an output folder. Ours do: the storage is filesystem
    /// storage made read-only, so restoring through this same factory is exactly right.
    fn is_type_id(&self, type_id: TypeId) -> bool {
        type_id == TypeId::of::<Self>() || type_id == TypeId::of::<FilesystemStorageFactory>()
    }

    fn clone_box(&self) -> BoxStorageFactory {
        self.clone().boxed()
    }
}

/// One file, opened read-only.
pub struct ReadOnlyStorage {
    path: PathBuf,
    expected_len: u64,
    file: Option<Arc<File>>,
}

impl ReadOnlyStorage {
    fn file(&self) -> anyhow::Result<&File> {
        self.file.as_deref().context("storage not initialised")
    }
}

impl TorrentStorage for ReadOnlyStorage {
    fn init(
        &mut self,
        _shared: &ManagedTorrentShared,
        _metadata: &TorrentMetadata,
    ) -> anyhow::Result<()> {
        let file = File::open(&self.path)
            .with_context(|| format!("opening {} read-only", self.path.display()))?;
        self.file = Some(Arc::new(file));
        Ok(())
    }

    fn pread_exact(&self, file_id: usize, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        if file_id != 0 {
            bail!("no file {file_id}");
        }
        Ok(self.file()?.read_exact_at(buf, offset)?)
    }

    fn pwrite_all(&self, _file_id: usize, _offset: u64, _buf: &[u8]) -> anyhow::Result<()> {
        bail!("{} is seeded read-only", self.path.display())
    }

    fn remove_file(&self, _file_id: usize, _filename: &Path) -> anyhow::Result<()> {
        Ok(()) // never delete a seeded file
    }

    fn remove_directory_if_empty(&self, _path: &Path) -> anyhow::Result<()> {
        Ok(())
    }

    fn ensure_file_length(&self, _file_id: usize, length: u64) -> anyhow::Result<()> {
        let actual = self.file()?.metadata()?.len();
        if actual != length || length != self.expected_len {
            bail!(
                "{} is {actual} bytes, the torrent says {length}: not changing it",
                self.path.display()
            );
        }
        Ok(())
    }

    fn take(&self) -> anyhow::Result<Box<dyn TorrentStorage>> {
        Ok(Box::new(ReadOnlyStorage {
            path: self.path.clone(),
            expected_len: self.expected_len,
            file: self.file.clone(),
        }))
    }
}
