//! Joining layer blocks into a stage, without the whole model: a split's finest stages are
//! *blocks*, and a node that is given layers a..b fetches the blocks that make them up and
//! writes the stage itself, byte for byte the file `split` would write for that stage
//! ([`crate::split::split_model_at`]), so its sha256 can be checked against the plan.
//!
//! The blocks hold the bytes; the split's vocabulary file holds what no block has: every key
//! of the source, and its tensors' order ([`crate::split::KEY_SOURCE_TENSORS`]). From them a
//! model is put together whose tensors live in the block files, and the stage is planned and
//! written from it exactly as `split` plans and writes one from the source.

use std::path::{Path, PathBuf};

use crate::arch;
use crate::error::{Error, Result};
use crate::gguf::{GgufModel, TensorInfo, Value};
use crate::manifest::LayerRange;
use crate::split::{
    parse_block_name, plan_stage, write_planned, SplitOptions, KEY_FIRST_LAYER, KEY_LAST_LAYER,
    KEY_SOURCE_TENSORS, KEY_VOCAB_ONLY,
};

/// One block: a stage file of a split, and the source layers it holds.
struct Block {
    path: PathBuf,
    model: GgufModel,
    layers: LayerRange,
}

fn bad(path: &Path, message: String) -> Error {
    Error::Gguf {
        path: path.to_owned(),
        message,
    }
}

/// Open a block and read its layer range from its stage keys.
fn open_block(path: &Path) -> Result<Block> {
    let model = GgufModel::open(path)?;
    let layer = |key: &str| {
        model
            .get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(path, format!("not a stage of a split: no {key}")))
    };
    let layers = LayerRange {
        first: layer(KEY_FIRST_LAYER)?,
        last: layer(KEY_LAST_LAYER)?,
    };
    Ok(Block {
        path: path.to_owned(),
        model,
        layers,
    })
}

/// The source model as the vocabulary file and `blocks` make it up: its keys and tensor order
/// from the vocabulary file, each tensor's bytes in the block that has them. A tensor that is
/// not a layer's comes from the first block, except the embedding and the output head, which
/// only a split's first and last stages hold in full: from the block of layer 0 or of the
/// last layer where one is given (a middle stage writes a stub for the embedding and no head,
/// whatever the block holds).
fn assemble(vocab_path: &Path, blocks: &[Block]) -> Result<GgufModel> {
    let vocab = GgufModel::open(vocab_path)?;
    if vocab.get(KEY_VOCAB_ONLY).is_none() {
        return Err(bad(
            vocab_path,
            format!("not a split's vocabulary file: no {KEY_VOCAB_ONLY}"),
        ));
    }
    let names: Vec<String> = match vocab.get(KEY_SOURCE_TENSORS) {
        Some(Value::Array(_, items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                bad(
                    vocab_path,
                    format!("{KEY_SOURCE_TENSORS} holds a non-string"),
                )
            })?,
        _ => {
            return Err(bad(
                vocab_path,
                format!("no {KEY_SOURCE_TENSORS}: made by an older split, which cannot be joined"),
            ))
        }
    };
    let kvs: Vec<(String, Value)> = vocab
        .kvs
        .iter()
        .filter(|(k, _)| k != KEY_VOCAB_ONLY && k != KEY_SOURCE_TENSORS)
        .cloned()
        .collect();
    let source = GgufModel {
        version: vocab.version,
        kvs,
        tensors: Vec::new(),
        alignment: vocab.alignment,
        files: Vec::new(),
    };
    let last_layer = source.block_count()?.saturating_sub(1);
    let find = |block: usize, name: &str| -> Option<TensorInfo> {
        let t = blocks[block]
            .model
            .tensors
            .iter()
            .find(|t| t.name == name)?;
        Some(TensorInfo {
            file: block,
            ..t.clone()
        })
    };
    let edge_block = blocks
        .iter()
        .position(|b| b.layers.first == 0)
        .or_else(|| blocks.iter().position(|b| b.layers.last == last_layer))
        .unwrap_or(0);
    let tail_block = blocks
        .iter()
        .position(|b| b.layers.last == last_layer)
        .unwrap_or(0);
    let mut tensors = Vec::with_capacity(names.len());
    for name in &names {
        let found =
            match parse_block_name(name) {
                Some((layer, rest)) => match blocks
                    .iter()
                    .position(|b| (b.layers.first..=b.layers.last).contains(&layer))
                {
                    // A layer outside the blocks is not needed by a stage of these blocks.
                    None => continue,
                    Some(k) => find(k, &format!("blk.{}.{rest}", layer - blocks[k].layers.first))
                        .map(|t| TensorInfo {
                            name: name.clone(),
                            ..t
                        }),
                },
                None if name == "token_embd.weight" => find(edge_block, name),
                None if name.starts_with("output.") => match find(tail_block, name) {
                    Some(t) => Some(t),
                    // Only a last stage has the head, and only the last block can make one.
                    None => continue,
                },
                None => find(0, name),
            };
        tensors.push(found.ok_or_else(|| {
            Error::Split(format!(
                "tensor {name} of the source is in none of the blocks given"
            ))
        })?);
    }
    Ok(GgufModel {
        tensors,
        files: blocks.iter().map(|b| b.path.clone()).collect(),
        ..source
    })
}

/// Write stage `index` of a split at `ranges` to `out` from the blocks at `block_paths` (in
/// any order; together exactly that stage's layers) and the split's vocabulary file: the file
/// `split_model_at(ranges)` writes for that stage, byte for byte. Returns its size and
/// sha256. The file appears whole or not at all (temp file, then rename).
pub fn join_stage(
    vocab: &Path,
    block_paths: &[PathBuf],
    ranges: &[LayerRange],
    index: usize,
    options: SplitOptions,
    out: &Path,
) -> Result<(u64, String)> {
    let target = *ranges.get(index).ok_or_else(|| {
        Error::Split(format!(
            "stage {index} of a plan of {} stages",
            ranges.len()
        ))
    })?;
    let mut blocks = block_paths
        .iter()
        .map(|p| open_block(p))
        .collect::<Result<Vec<_>>>()?;
    blocks.sort_by_key(|b| b.layers.first);
    let mut next = target.first;
    for b in &blocks {
        if b.layers.first != next {
            return Err(Error::Split(format!(
                "{} holds layers {}-{}, where layer {next} was due: the blocks must make layers {}-{} exactly",
                b.path.display(),
                b.layers.first,
                b.layers.last,
                target.first,
                target.last
            )));
        }
        next = b.layers.last + 1;
    }
    if blocks.is_empty() || next != target.last + 1 {
        return Err(Error::Split(format!(
            "the blocks make layers {}-{}, not {}-{}",
            target.first,
            next.saturating_sub(1),
            target.first,
            target.last
        )));
    }
    let model = assemble(vocab, &blocks)?;
    let rules = arch::stage_rules(&model, ranges, options.allow_unverified)?;
    let plan = plan_stage(&model, index, ranges, &rules)?;
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "stage.gguf".into());
    let mut sources = model
        .files
        .iter()
        .map(|p| std::fs::File::open(p).map_err(|e| Error::io(p, e)))
        .collect::<Result<Vec<_>>>()?;
    let (tmp, size, sha256) = write_planned(
        &model,
        &plan,
        &mut sources,
        dir,
        &name,
        &crate::progress::Quiet,
    )?;
    tmp.persist(out).map_err(|e| Error::io(out, e.error))?;
    Ok((size, sha256))
}
