//! `shards.json`: what a shard set is, so that any holder can check a shard without trusting
//! whoever sent it, and so the coordinator can tell two splits of a model apart (`split_id`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// File name of the manifest inside a shard directory.
pub const MANIFEST_FILE: &str = "shards.json";
/// Bumped when the manifest's meaning changes.
pub const FORMAT_VERSION: u32 = 1;

/// The shard manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    /// sha256 over the shards' sha256s in order: equal ids mean byte-identical shard sets.
    pub split_id: String,
    pub source: SourceModel,
    pub shards: Vec<ShardEntry>,
    /// The vocabulary file (`vocab.gguf`: the source's metadata, tokenizer and chat template,
    /// no weights), so that whoever needs only the tokens (the coordinator) fetches that, never
    /// a weight shard; absent from splits made before it existed and from safetensors sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<VocabEntry>,
}

/// The vocabulary file of a split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VocabEntry {
    /// File name inside the shard directory.
    pub file: String,
    pub size: u64,
    pub sha256: String,
    /// v1 info hash, filled in by whoever makes the torrent (the seeder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_hash: Option<String>,
}

/// What the shards were cut from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceModel {
    /// `general.name` (GGUF) or the input's base name.
    pub name: String,
    /// `general.architecture`, or null for safetensors sets.
    pub architecture: Option<String>,
    /// sha256 of the source when it was one file; null when it came in parts (see `files`).
    pub sha256: Option<String>,
    /// Transformer layers in the source, or null when unknown (safetensors sets).
    pub layer_count: Option<u64>,
    /// The input files, in order.
    pub files: Vec<SourceFile>,
}

/// One input file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// One shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub shard_id: u32,
    /// File name inside the shard directory (`shard-K.gguf` or `shard-K.safetensors`).
    pub file: String,
    pub size: u64,
    pub sha256: String,
    /// Source layers this shard runs (inclusive), or null when it is not a pipeline stage.
    pub layers: Option<LayerRange>,
    pub tensor_count: u64,
    /// v1 info hash, filled in by whoever makes the torrent (the seeder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_hash: Option<String>,
}

/// An inclusive range of source layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRange {
    pub first: u64,
    pub last: u64,
}

impl LayerRange {
    /// Layers in the range.
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }

    /// Never true: a range holds at least one layer.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl SourceModel {
    /// A clean model id for APIs: the first input file's name without its extension and
    /// without a gguf-split part suffix (`SmolLM2-135M-Instruct.Q4_1`), since `general.name`
    /// may hold spaces or nothing useful; `name` when there are no files.
    pub fn id(&self) -> String {
        let Some(file) = self.files.first() else {
            return self.name.clone();
        };
        let stem = [".gguf", ".safetensors"]
            .iter()
            .find_map(|ext| file.name.strip_suffix(ext))
            .unwrap_or(&file.name);
        let id = without_part_suffix(stem);
        if id.is_empty() {
            self.name.clone()
        } else {
            id.to_owned()
        }
    }
}

/// `model-00001-of-00003` (gguf-split parts, safetensors shards) → `model`.
fn without_part_suffix(stem: &str) -> &str {
    let five_digits = |n: &str| n.len() == 5 && n.bytes().all(|b| b.is_ascii_digit());
    stem.rsplit_once("-of-")
        .and_then(|(head, total)| Some((head.rsplit_once('-')?, total)))
        .filter(|((base, index), total)| {
            !base.is_empty() && five_digits(index) && five_digits(total)
        })
        .map_or(stem, |((base, _), _)| base)
}

impl Manifest {
    /// The split id for shards with these sha256s.
    pub fn compute_split_id(shards: &[ShardEntry]) -> String {
        let mut h = Sha256::new();
        for s in shards {
            h.update(s.sha256.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }

    /// Read `dir/shards.json`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| Error::Manifest {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(Error::Manifest {
                path,
                message: format!(
                    "format version {} (this build reads {FORMAT_VERSION})",
                    manifest.format_version
                ),
            });
        }
        Ok(manifest)
    }

    /// Write `dir/shards.json` atomically (temp file, then rename).
    pub fn store(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(MANIFEST_FILE);
        let mut text = serde_json::to_vec_pretty(self).expect("manifest serialises");
        text.push(b'\n');
        write_atomically(&path, &text)?;
        Ok(path)
    }
}

/// Write `bytes` to `path` through a temp file in the same directory and a rename, so readers
/// see the old file or the new one, never half of one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = temp_file_builder()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// A temp-file builder whose files end up world-readable (0644) once renamed into place:
/// `tempfile` makes them 0600, which would hide shards from a seeder running as another user.
pub fn temp_file_builder<'a, 'b>() -> tempfile::Builder<'a, 'b> {
    use std::os::unix::fs::PermissionsExt;
    let mut b = tempfile::Builder::new();
    b.permissions(std::fs::Permissions::from_mode(0o644));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(files: &[&str]) -> SourceModel {
        SourceModel {
            name: "Smollm2 135M 8k".into(),
            architecture: Some("llama".into()),
            sha256: None,
            layer_count: Some(30),
            files: files
                .iter()
                .map(|f| SourceFile {
                    name: (*f).into(),
                    size: 1,
                    sha256: "0".repeat(64),
                })
                .collect(),
        }
    }

    #[test]
    fn the_model_id_is_the_files_stem_without_a_part_suffix() {
        let id = |files: &[&str]| source(files).id();
        assert_eq!(
            id(&["SmolLM2-135M-Instruct.Q4_1.gguf"]),
            "SmolLM2-135M-Instruct.Q4_1"
        );
        assert_eq!(id(&["m-00001-of-00003.gguf", "m-00002-of-00003.gguf"]), "m");
        assert_eq!(id(&["model-00001-of-00002.safetensors"]), "model");
        assert_eq!(id(&["x-1-of-2.gguf"]), "x-1-of-2");
        assert_eq!(id(&["-00001-of-00002.gguf"]), "-00001-of-00002");
        assert_eq!(id(&[".gguf"]), "Smollm2 135M 8k");
        assert_eq!(id(&[]), "Smollm2 135M 8k");
    }
}
