//! `shard_loader validate`: does a directory hold a complete, intact shard set?
//!
//! Every problem found is reported (not just the first), each naming the file at fault, so one
//! run tells a person everything that needs fixing.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::gguf::{GgufModel, Value};

use crate::manifest::{Manifest, ShardEntry, MANIFEST_FILE};
use crate::split::{
    parse_block_name, parse_shard_file_name, KEY_FIRST_LAYER, KEY_LAST_LAYER, KEY_STAGE_INDEX,
};

/// One thing wrong, and with which file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file at fault, or `None` for the set as a whole.
    pub file: Option<String>,
    pub message: String,
}

/// The outcome of validating a directory.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target_dir: String,
    pub expected_shards: usize,
    /// Shard files present (`shard-K.gguf` / `shard-K.safetensors`).
    pub shards_found: usize,
    /// Shards whose size, header and sha256 all check out.
    pub shards_ok: usize,
    pub split_id: Option<String>,
    pub problems: Vec<Problem>,
    /// What does not make the set invalid but deserves a look (stages of an architecture not
    /// verified to split exactly).
    pub warnings: Vec<Problem>,
    pub ok: bool,
}

#[derive(Default)]
struct Problems(Vec<Problem>, Vec<Problem>);

impl Problems {
    fn set(&mut self, message: String) {
        self.0.push(Problem {
            file: None,
            message,
        });
    }
    fn file(&mut self, file: &str, message: String) {
        self.0.push(Problem {
            file: Some(file.to_owned()),
            message,
        });
    }
    fn warn(&mut self, file: &str, message: String) {
        self.1.push(Problem {
            file: Some(file.to_owned()),
            message,
        });
    }
}

/// Validate `dir` against its manifest and `expected` shards. Errors only when the directory
/// itself cannot be read; everything else is a [`Problem`] in the report.
pub fn validate(dir: &Path, expected: usize) -> Result<Report> {
    validate_with(dir, expected, &crate::progress::Quiet)
}

/// [`validate`], reporting the bytes hashed (all shards together).
pub fn validate_with(
    dir: &Path,
    expected: usize,
    progress: &(dyn crate::progress::Progress + Sync),
) -> Result<Report> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::Argument(format!(
            "{}: not a directory",
            dir.display()
        )));
    }
    let mut p = Problems::default();
    let mut found: Vec<(u32, String)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let name = entry
            .map_err(|e| Error::io(dir, e))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some((k, _)) = parse_shard_file_name(&name) {
            found.push((k, name));
        }
    }
    found.sort();
    if found.len() != expected {
        p.set(format!(
            "expected {expected} shard files, found {}",
            found.len()
        ));
    }
    let ids: BTreeSet<u32> = found.iter().map(|(k, _)| *k).collect();
    for k in 0..expected.max(found.len()) as u32 {
        if !ids.contains(&k) {
            p.set(format!("shard-{k} is missing"));
        }
    }
    let manifest = match Manifest::load(dir) {
        Ok(m) => Some(m),
        Err(e) => {
            p.set(match e {
                Error::Io { .. } => {
                    format!("no {MANIFEST_FILE}: cannot check sizes, hashes or layers")
                }
                other => other.to_string(),
            });
            None
        }
    };
    let mut shards_ok = 0;
    if let Some(m) = &manifest {
        if m.shards.len() != expected {
            p.set(format!(
                "{MANIFEST_FILE} lists {} shards, expected {expected}",
                m.shards.len()
            ));
        }
        for (_, name) in &found {
            if !m.shards.iter().any(|s| &s.file == name) {
                p.file(
                    name,
                    format!("not listed in {MANIFEST_FILE} (left from another split?)"),
                );
            }
        }
        if Manifest::compute_split_id(&m.shards) != m.split_id {
            p.set(format!(
                "{MANIFEST_FILE}: split_id does not match the shards' sha256s"
            ));
        }
        // Hash files in parallel: this is the slow part.
        progress.start("hashing", m.shards.iter().map(|s| s.size).sum());
        let results: Vec<Problems> = std::thread::scope(|s| {
            let handles: Vec<_> = m
                .shards
                .iter()
                .enumerate()
                .map(|(i, entry)| s.spawn(move || check_shard(dir, i, entry, progress)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("shard check panicked"))
                .collect()
        });
        progress.finish();
        for r in results {
            if r.0.is_empty() {
                shards_ok += 1;
            }
            p.0.extend(r.0);
            p.1.extend(r.1);
        }
        check_layer_ranges(m, &mut p);
        if let Some(vocab) = &m.vocab {
            check_vocab(dir, vocab, &mut p);
        }
    }
    let ok = p.0.is_empty();
    Ok(Report {
        target_dir: dir.display().to_string(),
        expected_shards: expected,
        shards_found: found.len(),
        shards_ok,
        split_id: manifest.map(|m| m.split_id),
        problems: p.0,
        warnings: p.1,
        ok,
    })
}

/// The vocabulary file the manifest lists: there, of its size and sha256, and a GGUF without
/// tensors.
fn check_vocab(dir: &Path, vocab: &crate::manifest::VocabEntry, p: &mut Problems) {
    let name = vocab.file.as_str();
    if name != crate::split::VOCAB_FILE {
        return p.file(
            name,
            format!("the vocabulary file must be {}", crate::split::VOCAB_FILE),
        );
    }
    let path = dir.join(name);
    match std::fs::metadata(&path) {
        Err(_) => return p.file(name, "missing".into()),
        Ok(m) if m.len() != vocab.size => {
            return p.file(
                name,
                format!("{} bytes, manifest says {}", m.len(), vocab.size),
            )
        }
        Ok(_) => {}
    }
    match crate::hashing::sha256_file(&path) {
        Ok(h) if h == vocab.sha256 => {}
        Ok(_) => return p.file(name, "sha256 differs from the manifest".into()),
        Err(e) => return p.file(name, e.to_string()),
    }
    match crate::gguf::GgufModel::open(&path) {
        Ok(model) if model.tensors.is_empty() => {}
        Ok(model) => p.file(
            name,
            format!("{} tensors in a vocabulary file", model.tensors.len()),
        ),
        Err(e) => p.file(name, e.to_string()),
    }
}

fn check_shard(
    dir: &Path,
    index: usize,
    entry: &ShardEntry,
    progress: &(dyn crate::progress::Progress + Sync),
) -> Problems {
    let mut p = Problems::default();
    let name = entry.file.as_str();
    if entry.shard_id as usize != index {
        p.file(
            name,
            format!("listed as shard {} at position {index}", entry.shard_id),
        );
    }
    let Some((k, ext)) = parse_shard_file_name(name) else {
        p.file(
            name,
            "manifest names a file that is not shard-K.gguf/.safetensors".into(),
        );
        return p;
    };
    if k != entry.shard_id {
        p.file(
            name,
            format!("file name says shard {k}, manifest says {}", entry.shard_id),
        );
    }
    let path = dir.join(name);
    let size = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(_) => {
            p.file(name, "missing".into());
            return p;
        }
    };
    if size != entry.size {
        p.file(
            name,
            format!("size {size} bytes, manifest says {}", entry.size),
        );
    }
    if ext == "gguf" {
        match GgufModel::open(&path) {
            Ok(model) => check_stage_header(&model, entry, &mut p),
            Err(e) => p.file(name, format!("header: {e}")),
        }
    } else if let Err(e) = crate::safetensors::read_tensor_names(&path) {
        p.file(name, format!("header: {e}"));
    }
    match crate::hashing::sha256_file_with(&path, progress) {
        Ok(h) if h == entry.sha256 => {}
        Ok(h) => p.file(
            name,
            format!(
                "sha256 {h} does not match the manifest's {}: corrupt or changed",
                entry.sha256
            ),
        ),
        Err(e) => p.file(name, e.to_string()),
    }
    p
}

fn check_stage_header(model: &GgufModel, entry: &ShardEntry, p: &mut Problems) {
    let name = entry.file.as_str();
    let get = |k: &str| model.get(k).and_then(Value::as_u64);
    if model.tensors.len() as u64 != entry.tensor_count {
        p.file(
            name,
            format!(
                "{} tensors, manifest says {}",
                model.tensors.len(),
                entry.tensor_count
            ),
        );
    }
    let findings = crate::arch::check_stage(model);
    for message in findings.problems {
        p.file(name, message);
    }
    for message in findings.warnings {
        p.warn(name, message);
    }
    let Some(layers) = entry.layers else {
        p.file(
            name,
            "a GGUF shard without a layer range in the manifest".into(),
        );
        return;
    };
    if get(KEY_STAGE_INDEX) != Some(entry.shard_id.into()) {
        p.file(
            name,
            format!(
                "header says stage {:?}, manifest says {}",
                get(KEY_STAGE_INDEX),
                entry.shard_id
            ),
        );
    }
    if (get(KEY_FIRST_LAYER), get(KEY_LAST_LAYER)) != (Some(layers.first), Some(layers.last)) {
        p.file(
            name,
            format!(
                "header says layers {:?}-{:?}, manifest says {}-{}",
                get(KEY_FIRST_LAYER),
                get(KEY_LAST_LAYER),
                layers.first,
                layers.last
            ),
        );
    }
    match model.block_count() {
        Ok(n) if n == layers.len() => {
            let present: BTreeSet<u64> = model
                .tensors
                .iter()
                .filter_map(|t| parse_block_name(&t.name))
                .map(|(l, _)| l)
                .collect();
            if present != (0..n).collect() {
                p.file(
                    name,
                    format!("block tensors do not cover blk.0..blk.{} exactly", n - 1),
                );
            }
        }
        Ok(n) => p.file(
            name,
            format!(
                "block_count {n}, but the manifest range holds {}",
                layers.len()
            ),
        ),
        Err(e) => p.file(name, e.to_string()),
    }
}

fn check_layer_ranges(m: &Manifest, p: &mut Problems) {
    let ranges: Vec<_> = m
        .shards
        .iter()
        .map(|s| (s.file.as_str(), s.layers))
        .collect();
    if ranges.iter().all(|(_, r)| r.is_none()) {
        return; // a safetensors set: distributable, not a pipeline
    }
    let mut next = 0;
    for (file, r) in &ranges {
        match r {
            None => p.file(file, "no layer range, while other shards have one".into()),
            Some(r) if r.first != next || r.last < r.first => p.file(
                file,
                format!(
                    "layers {}-{} do not continue from layer {next}",
                    r.first, r.last
                ),
            ),
            Some(_) => {}
        }
        if let Some(r) = r {
            next = r.last + 1;
        }
    }
    if let Some(total) = m.source.layer_count {
        if next != total {
            p.set(format!(
                "shards cover layers 0-{} of the source's {total}",
                next.saturating_sub(1)
            ));
        }
    }
}
