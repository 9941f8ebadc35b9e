//! `split` and `map`: cut a whole model into stage shards, or turn a set split by another
//! tool (gguf-split, safetensors parts) into shard-K files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use torrents::gguf::GgufModel;
use torrents::manifest::{LayerRange, Manifest};
use torrents::map::{find_split_set, map_gguf_split, map_safetensors, SplitSet};
use torrents::split::split_gguf;

use crate::cli::Exactness;

/// `split`: cut `model` into `shards` stage files in `target_dir`.
pub fn split(model: &Path, shards: usize, target_dir: &Path, exactness: &Exactness) -> Result<()> {
    let m = GgufModel::open(model)?;
    eprintln!(
        "splitting {} ({} layers, {} tensors) into {shards} shards in {}",
        model.display(),
        m.block_count()?,
        m.tensors.len(),
        target_dir.display()
    );
    let manifest = split_gguf(
        &m,
        shards,
        target_dir,
        exactness.options(),
        &report::Reporter::new(),
    )?;
    print_manifest_summary(&manifest, target_dir);
    Ok(())
}

/// `join`: stage `stage` of the plan `ranges`, from the blocks in `blocks_dir` that make up
/// its range (found by their layers in its shards.json) and its vocab.gguf, written to `out`.
pub fn join(
    blocks_dir: &Path,
    ranges: &[LayerRange],
    stage: usize,
    out: &Path,
    exactness: &Exactness,
) -> Result<()> {
    let Some(range) = ranges.get(stage) else {
        bail!("--stage {stage}: the plan has {} stages", ranges.len());
    };
    let manifest = Manifest::load(blocks_dir)?;
    let Some(vocab) = &manifest.vocab else {
        bail!(
            "{}: the split has no vocabulary file (made by an older split): split the model again",
            blocks_dir.display()
        );
    };
    let blocks: Vec<PathBuf> = manifest
        .shards
        .iter()
        .filter(|s| {
            s.layers
                .is_some_and(|l| l.first >= range.first && l.last <= range.last)
        })
        .map(|s| blocks_dir.join(&s.file))
        .collect();
    let (size, sha256) = torrents::join::join_stage(
        &blocks_dir.join(&vocab.file),
        &blocks,
        ranges,
        stage,
        exactness.options(),
        out,
    )?;
    println!(
        "{}: stage {stage} of {}, layers {}-{}, from {} blocks: {size} bytes, sha256 {sha256}",
        out.display(),
        ranges.len(),
        range.first,
        range.last,
        blocks.len()
    );
    Ok(())
}

/// `map`: the parts in `source_dir` as shard files in `target_dir`.
pub fn map(
    metadata_dir: Option<PathBuf>,
    source_dir: &Path,
    target_dir: &Path,
    shards: Option<usize>,
    exactness: &Exactness,
) -> Result<()> {
    let manifest = match find_split_set(source_dir)? {
        SplitSet::Gguf(parts) => {
            eprintln!(
                "mapping {} gguf-split parts from {}",
                parts.len(),
                source_dir.display()
            );
            map_gguf_split(
                &parts,
                shards,
                target_dir,
                exactness.options(),
                &report::Reporter::new(),
            )?
        }
        SplitSet::Safetensors(parts) => {
            if shards.is_some_and(|n| n != parts.len()) {
                bail!(
                    "safetensors parts map one to one: --shards must be {} or left out",
                    parts.len()
                );
            }
            eprintln!(
                "mapping {} safetensors parts from {}",
                parts.len(),
                source_dir.display()
            );
            let meta = metadata_dir.unwrap_or_else(|| source_dir.to_owned());
            map_safetensors(&parts, &meta, target_dir, &report::Reporter::new())?
        }
    };
    print_manifest_summary(&manifest, target_dir);
    Ok(())
}

fn print_manifest_summary(m: &Manifest, dir: &Path) {
    for s in &m.shards {
        let layers = s
            .layers
            .map_or("-".to_string(), |r| format!("{}-{}", r.first, r.last));
        println!(
            "{:<22} layers {:<7} {:>12} bytes  sha256 {}",
            s.file, layers, s.size, s.sha256
        );
    }
    println!(
        "wrote {} shards and {} (split {})",
        m.shards.len(),
        dir.join("shards.json").display(),
        m.split_id
    );
}
