//! `shard_loader map`: turning sets that were split elsewhere into `shard-K` sets.
//!
//! - gguf-split parts (`NAME-00001-of-00004.gguf`, keys `split.no`/`split.count`) are read as one
//!   model and cut into stage shards exactly as `split` would cut the unsplit file.
//! - Hugging Face safetensors parts (`model-00001-of-00004.safetensors` and
//!   `model.safetensors.index.json`) are linked (or copied) to `shard-K.safetensors` in order;
//!   they can be distributed but not served by the pipeline, so their manifest has no layers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gguf::{GgufModel, Value};
use crate::hashing::sha256_file;
use crate::manifest::{Manifest, ShardEntry, SourceModel, FORMAT_VERSION};
// Where a split's source is described (`split` describes it while it writes the stages);
// re-exported here, where callers that map sets have always found them.
pub use crate::split::{describe_sources, gguf_source};
use crate::split::{remove_stale_shards, shard_file_name, SplitOptions};

/// What a source directory holds.
#[derive(Debug)]
pub enum SplitSet {
    /// gguf-split parts in order.
    Gguf(Vec<PathBuf>),
    /// safetensors parts in order.
    Safetensors(Vec<PathBuf>),
}

/// `PREFIX-0000K-of-0000N.EXT` → (PREFIX, K, N).
fn parse_part_name<'a>(name: &'a str, ext: &str) -> Option<(&'a str, u32, u32)> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    let (head, total) = stem.rsplit_once("-of-")?;
    let (prefix, k) = head.rsplit_once('-')?;
    if k.len() != 5 || total.len() != 5 {
        return None;
    }
    Some((prefix, k.parse().ok()?, total.parse().ok()?))
}

/// Find the parts of one split set in `dir`, complete and in order.
pub fn find_split_set(dir: &Path) -> Result<SplitSet> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut gguf: BTreeMap<(String, u32), Vec<(u32, PathBuf)>> = BTreeMap::new();
    let mut st: BTreeMap<(String, u32), Vec<(u32, PathBuf)>> = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        for (ext, sets) in [("gguf", &mut gguf), ("safetensors", &mut st)] {
            if let Some((prefix, k, n)) = parse_part_name(&name, ext) {
                sets.entry((prefix.to_owned(), n))
                    .or_default()
                    .push((k, entry.path()));
            }
        }
    }
    let sets = gguf.len() + st.len();
    if sets == 0 {
        return Err(Error::Map(format!(
            "{}: no split parts (NAME-00001-of-0000N.gguf or model-00001-of-0000N.safetensors)",
            dir.display()
        )));
    }
    if sets > 1 {
        let names: Vec<String> = gguf
            .keys()
            .chain(st.keys())
            .map(|(p, n)| format!("{p} (of {n})"))
            .collect();
        return Err(Error::Map(format!(
            "{}: more than one split set ({}): give a directory with one",
            dir.display(),
            names.join(", ")
        )));
    }
    let is_gguf = !gguf.is_empty();
    let ((prefix, n), mut parts) = gguf.into_iter().chain(st).next().expect("one set");
    parts.sort();
    let have: Vec<u32> = parts.iter().map(|(k, _)| *k).collect();
    let missing: Vec<String> = (1..=n)
        .filter(|k| !have.contains(k))
        .map(|k| format!("{k:05}"))
        .collect();
    if !missing.is_empty() || have.len() != n as usize {
        return Err(Error::Map(format!(
            "{}: split set {prefix} of {n} parts is incomplete (missing part {})",
            dir.display(),
            missing.join(", ")
        )));
    }
    let paths = parts.into_iter().map(|(_, p)| p).collect();
    Ok(if is_gguf {
        SplitSet::Gguf(paths)
    } else {
        SplitSet::Safetensors(paths)
    })
}

/// Read gguf-split parts as one model: metadata from the first part (without `split.*`), tensors
/// from every part in order.
pub fn open_gguf_split(parts: &[PathBuf]) -> Result<GgufModel> {
    let mut merged: Option<GgufModel> = None;
    let mut declared_tensors = None;
    for (i, path) in parts.iter().enumerate() {
        let part = GgufModel::open(path)?;
        let bad = |m: String| Error::Gguf {
            path: path.clone(),
            message: m,
        };
        let no = part.get("split.no").and_then(Value::as_u64);
        let count = part.get("split.count").and_then(Value::as_u64);
        if no != Some(i as u64) || count != Some(parts.len() as u64) {
            return Err(bad(format!(
                "split.no/split.count say {no:?}/{count:?}, expected {i}/{} from its name",
                parts.len()
            )));
        }
        if i == 0 {
            declared_tensors = part.get("split.tensors.count").and_then(Value::as_u64);
        }
        match merged.as_mut() {
            None => merged = Some(part),
            Some(m) => {
                let file = m.files.len();
                m.files.push(path.clone());
                m.tensors.extend(
                    part.tensors
                        .into_iter()
                        .map(|t| crate::gguf::TensorInfo { file, ..t }),
                );
            }
        }
    }
    let mut model = merged.ok_or_else(|| Error::Map("no parts".into()))?;
    if let Some(n) = declared_tensors {
        if n != model.tensors.len() as u64 {
            return Err(Error::Map(format!(
                "the parts hold {} tensors, split.tensors.count says {n}",
                model.tensors.len()
            )));
        }
    }
    model.kvs.retain(|(k, _)| !k.starts_with("split."));
    Ok(model)
}

/// Map gguf-split parts to `n` stage shards (default: as many as there are parts).
pub fn map_gguf_split(
    parts: &[PathBuf],
    n: Option<usize>,
    target: &Path,
    options: SplitOptions,
    progress: &dyn crate::progress::Progress,
) -> Result<Manifest> {
    let model = open_gguf_split(parts)?;
    crate::split::split_gguf(&model, n.unwrap_or(parts.len()), target, options, progress)
}

/// Map safetensors parts to `shard-K.safetensors` (K from 0, in part order), checking them
/// against `model.safetensors.index.json` in `metadata_dir`.
pub fn map_safetensors(
    parts: &[PathBuf],
    metadata_dir: &Path,
    target: &Path,
    progress: &dyn crate::progress::Progress,
) -> Result<Manifest> {
    let index_path = metadata_dir.join("model.safetensors.index.json");
    let index_text = std::fs::read(&index_path).map_err(|e| Error::io(&index_path, e))?;
    let index: serde_json::Value = serde_json::from_slice(&index_text)
        .map_err(|e| Error::Map(format!("{}: not JSON: {e}", index_path.display())))?;
    let weight_map = index
        .get("weight_map")
        .and_then(|w| w.as_object())
        .ok_or_else(|| Error::Map(format!("{}: no weight_map object", index_path.display())))?;
    let part_names: Vec<String> = parts
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut per_part: Vec<Vec<String>> = vec![Vec::new(); parts.len()];
    for (tensor, file) in weight_map {
        let file = file.as_str().unwrap_or_default();
        let k = part_names.iter().position(|n| n == file).ok_or_else(|| {
            Error::Map(format!(
                "{}: tensor {tensor} is in {file}, which is not among the parts",
                index_path.display()
            ))
        })?;
        per_part[k].push(tensor.clone());
    }
    std::fs::create_dir_all(target).map_err(|e| Error::io(target, e))?;
    let total = parts
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    progress.start("mapping", total);
    let mut entries = Vec::with_capacity(parts.len());
    for (k, part) in parts.iter().enumerate() {
        let names = crate::safetensors::read_tensor_names(part)?;
        per_part[k].sort_unstable();
        if names != per_part[k] {
            return Err(Error::Map(format!(
                "{}: holds {} tensors, the index assigns it {}",
                part.display(),
                names.len(),
                per_part[k].len()
            )));
        }
        let name = shard_file_name(k, "safetensors");
        let dest = target.join(&name);
        link_or_copy(part, &dest)?;
        progress.advance(std::fs::metadata(part).map_or(0, |m| m.len()));
        progress.line(&format!("{name} <- {}", part_names[k]));
        entries.push(ShardEntry {
            shard_id: k as u32,
            file: name,
            size: std::fs::metadata(&dest)
                .map_err(|e| Error::io(&dest, e))?
                .len(),
            sha256: sha256_file(&dest)?,
            layers: None,
            tensor_count: names.len() as u64,
            info_hash: None,
        });
    }
    progress.finish();
    let old = Manifest::load(target).ok();
    remove_stale_shards(target, old.as_ref(), &entries);
    let files = describe_sources(parts)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        split_id: Manifest::compute_split_id(&entries),
        source: SourceModel {
            name: metadata_dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "model".into()),
            architecture: None,
            sha256: (files.len() == 1).then(|| files[0].sha256.clone()),
            layer_count: None,
            files,
        },
        shards: entries,
        vocab: None,
    };
    manifest.store(target)?;
    Ok(manifest)
}

/// Hard-link `src` to `dest` (atomically replacing it), or copy through a temp file when the
/// two are on different filesystems.
fn link_or_copy(src: &Path, dest: &Path) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        dest.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(src, &tmp).is_err() {
        if let Err(e) = std::fs::copy(src, &tmp) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(dest, e));
        }
    }
    std::fs::rename(&tmp, dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(dest, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names() {
        assert_eq!(
            parse_part_name("m-00002-of-00004.gguf", "gguf"),
            Some(("m", 2, 4))
        );
        assert_eq!(
            parse_part_name("model-00001-of-00002.safetensors", "safetensors"),
            Some(("model", 1, 2))
        );
        assert_eq!(parse_part_name("m-2-of-4.gguf", "gguf"), None);
        assert_eq!(parse_part_name("shard-0.gguf", "gguf"), None);
    }
}
