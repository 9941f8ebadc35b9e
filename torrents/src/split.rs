//! Cutting a GGUF model into pipeline-stage shards.
//!
//! Each `shard-K.gguf` is a model llama.cpp opens on its own (design.md, "Shards"): it keeps the
//! source metadata with `<arch>.block_count` set to its own layers and its blocks renamed from
//! `blk.0`. The first stage keeps the tokenizer and `token_embd`; the last keeps the tokenizer,
//! `output_norm` and `output` (or the tied `token_embd`); every stage needs `token_embd.weight`,
//! `output_norm.weight` and `tokenizer.ggml.model` to load, so middle stages get a 1-row F32
//! `token_embd` stub, `tokenizer.ggml.model = "none"` and `<arch>.vocab_size = 1`. What each
//! stage must say about its layers so llama.cpp treats them as the whole model did (sliced
//! per-layer keys, explicit window patterns), and which architectures are refused, is
//! [`crate::arch`]'s.
//!
//! Output is deterministic: metadata and tensors keep the source order, nothing time- or
//! host-dependent is written, so the same input and N give byte-identical shards (and therefore
//! the same info hashes on every machine).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::arch::{self, StageRules};
use crate::error::{Error, Result};
use crate::gguf::{align_up, copy_range, GgufModel, TensorInfo, Value};
use crate::hashing::{sha256_file, HashingWriter};
use crate::manifest::{
    LayerRange, Manifest, ShardEntry, SourceFile, SourceModel, VocabEntry, FORMAT_VERSION,
};

/// Metadata keys we add to each stage file, so a stage can be checked without its manifest.
pub const KEY_STAGE_INDEX: &str = "shardswarm.stage.index";
pub const KEY_STAGE_COUNT: &str = "shardswarm.stage.count";
pub const KEY_FIRST_LAYER: &str = "shardswarm.stage.first_layer";
pub const KEY_LAST_LAYER: &str = "shardswarm.stage.last_layer";
pub const KEY_SOURCE_LAYERS: &str = "shardswarm.source.block_count";
/// Set (true) in the vocabulary file: it carries no tensors and runs no layers.
pub const KEY_VOCAB_ONLY: &str = "shardswarm.vocab_only";
/// In the vocabulary file: the source's tensor names in its order, so that stages joined from
/// layer blocks ([`crate::join`]) list their tensors as `split` does.
pub const KEY_SOURCE_TENSORS: &str = "shardswarm.source.tensors";
/// GGUF's type code of a string (an array's element type).
const STRING_TYPE: u32 = 8;
/// The vocabulary file's name in a split's directory.
pub const VOCAB_FILE: &str = "vocab.gguf";

/// Name of stage file K.
pub fn shard_file_name(index: usize, extension: &str) -> String {
    format!("shard-{index}.{extension}")
}

/// `blk.N.rest` → (N, rest).
pub fn parse_block_name(name: &str) -> Option<(u64, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (n, tail) = rest.split_once('.')?;
    Some((n.parse().ok()?, tail))
}

/// Bytes of each layer's tensors, indexed by layer. Refuses tensors of layers beyond
/// `block_count`.
pub fn layer_bytes(model: &GgufModel) -> Result<Vec<u64>> {
    let n = model.block_count()?;
    if n == 0 || n > 100_000 {
        return Err(Error::Split(format!(
            "block_count {n} is not a usable layer count"
        )));
    }
    let mut bytes = vec![0u64; n as usize];
    for t in &model.tensors {
        if let Some((layer, _)) = parse_block_name(&t.name) {
            let slot = bytes.get_mut(layer as usize).ok_or_else(|| {
                Error::Split(format!("tensor {} is past block_count {n}", t.name))
            })?;
            *slot += t.size;
        }
    }
    if let Some(empty) = bytes.iter().position(|&b| b == 0) {
        return Err(Error::Split(format!("layer {empty} has no tensors")));
    }
    Ok(bytes)
}

/// The output head's share of the work per generated token, in the units of [`layer_bytes`]:
/// its weight elements (one multiply-add each per token) at the layers' average bytes per
/// element. The last stage runs it for every sequence at every step; measured on SmolLM2 (4
/// stages, 8 streams at once) the last stage was busy 0.94 of the time while the others were
/// 0.64, with the head left out of the balance. The token embedding is a row lookup, no work.
pub fn head_cost(model: &GgufModel) -> u64 {
    let (mut bytes, mut elements) = (0u128, 0u128);
    for t in model
        .tensors
        .iter()
        .filter(|t| parse_block_name(&t.name).is_some())
    {
        bytes += u128::from(t.size);
        elements += u128::from(t.elements());
    }
    let head = ["output.weight", "token_embd.weight"]
        .iter()
        .find_map(|name| model.tensors.iter().find(|t| t.name == *name));
    match head {
        Some(h) if elements > 0 => (u128::from(h.elements()) * bytes / elements) as u64,
        _ => 0,
    }
}

/// Cut layers into `n` contiguous ranges balanced by the work of each stage: its layers' bytes,
/// plus `head` on the last stage ([`head_cost`]). First the smallest possible largest stage,
/// then, among cuts that reach it, the smallest sum of squares (so no stage is needlessly
/// small), earlier stages taking the larger share on ties.
///
/// `windowed` (for architectures with sliding-window layers) gives each layer's kind: every
/// stage must hold at least one windowed layer, since llama.cpp aborts when it makes the KV
/// cache of a windowed model without one (`GGML_ASSERT(hparams.is_swa_any())`).
pub fn plan_stages(
    layer_bytes: &[u64],
    head: u64,
    windowed: Option<&[bool]>,
    n: usize,
) -> Result<Vec<LayerRange>> {
    let layers = layer_bytes.len();
    if n == 0 || n > layers {
        return Err(Error::Split(format!(
            "asked for {n} shards, but the model has {layers} layers (use 1..={layers})"
        )));
    }
    let mut prefix = vec![0u128; layers + 1];
    for (i, b) in layer_bytes.iter().enumerate() {
        prefix[i + 1] = prefix[i] + u128::from(*b);
    }
    const INF: u128 = u128::MAX;
    // Layers a..b (exclusive), with the head when the range ends the model; INF for a range
    // that cannot be a stage.
    let cost = |a: usize, b: usize| {
        if windowed.is_some_and(|w| !w[a..b].contains(&true)) {
            return INF;
        }
        prefix[b] - prefix[a] + if b == layers { u128::from(head) } else { 0 }
    };
    // Phase 1: minimal largest stage. best[k][i] = min over cuts of layers i.. into k stages.
    let mut best = vec![vec![INF; layers + 1]; n + 1];
    best[0][layers] = 0;
    for k in 1..=n {
        for i in (0..layers).rev() {
            for j in i + 1..=layers {
                if best[k - 1][j] != INF {
                    let v = cost(i, j).max(best[k - 1][j]);
                    best[k][i] = best[k][i].min(v);
                }
            }
        }
    }
    let cap = best[n][0];
    if cap == INF {
        return Err(Error::Split(format!(
            "no cut into {n} stages gives every stage a windowed (sliding-window) layer, which \
             llama.cpp needs in every stage of this architecture: use fewer shards"
        )));
    }
    // Phase 2: smallest sum of squares with every stage <= cap.
    let mut sq = vec![vec![INF; layers + 1]; n + 1];
    sq[0][layers] = 0;
    for k in 1..=n {
        for i in (0..layers).rev() {
            for j in i + 1..=layers {
                let c = cost(i, j);
                if c == INF {
                    continue; // a longer range may hold a windowed layer
                }
                if c > cap {
                    break; // finite costs grow with the range
                }
                if sq[k - 1][j] != INF {
                    sq[k][i] = sq[k][i].min(c * c + sq[k - 1][j]);
                }
            }
        }
    }
    // Walk from the front, each stage taking the longest range that keeps the optimum.
    let mut ranges = Vec::with_capacity(n);
    let mut i = 0;
    for k in (1..=n).rev() {
        let j = (i + 1..=layers)
            .rev()
            .find(|&j| {
                let c = cost(i, j);
                c <= cap && sq[k - 1][j] != INF && c * c + sq[k - 1][j] == sq[k][i]
            })
            .expect("an optimal cut exists");
        ranges.push(LayerRange {
            first: i as u64,
            last: j as u64 - 1,
        });
        i = j;
    }
    Ok(ranges)
}

/// Where a stage tensor's bytes come from.
#[derive(Debug, Clone)]
enum TensorData {
    /// Bytes of a source tensor.
    Source { file: usize, offset: u64 },
    /// All zeros (the middle stages' 1-row embedding stub).
    Zeros,
}

/// A stage file's contents before writing.
pub(crate) struct StagePlan {
    kvs: Vec<(String, Value)>,
    tensors: Vec<(TensorInfo, TensorData)>,
}

/// An integer of the same GGUF type as `like`, so rewritten counts keep their on-disk type.
fn same_int_type(like: &Value, v: u64) -> Value {
    match like {
        Value::U8(_) => Value::U8(v as u8),
        Value::U16(_) => Value::U16(v as u16),
        Value::I32(_) => Value::I32(v as i32),
        Value::U64(_) => Value::U64(v),
        Value::I64(_) => Value::I64(v as i64),
        _ => Value::U32(v as u32),
    }
}

pub(crate) fn plan_stage(
    model: &GgufModel,
    index: usize,
    ranges: &[LayerRange],
    rules: &StageRules,
) -> Result<StagePlan> {
    let range = ranges[index];
    let count = ranges.len();
    let (first, last) = (index == 0, index + 1 == count);
    let middle = !first && !last;
    let arch = &rules.arch;
    let source_layers = model.block_count()?;
    let block_key = format!("{arch}.block_count");
    let vocab_key = format!("{arch}.vocab_size");
    let arch_prefix = format!("{arch}.");
    let pattern_key = rules.pattern_key();
    let mut pattern = rules.stage_pattern(range);

    let mut kvs = Vec::with_capacity(model.kvs.len() + 7);
    let mut saw_tokenizer_model = false;
    let mut saw_vocab = false;
    for (k, v) in &model.kvs {
        if k.starts_with("split.") {
            continue; // gguf-split bookkeeping, meaningless in a stage file
        }
        if *k == block_key {
            kvs.push((k.clone(), same_int_type(v, range.len())));
        } else if *k == pattern_key && pattern.is_some() {
            // The whole model's pattern (a period or an array) becomes this stage's layers' flags.
            kvs.push((k.clone(), pattern.take().expect("checked")));
        } else if middle && k.starts_with("tokenizer.") {
            if k == "tokenizer.ggml.model" {
                saw_tokenizer_model = true;
                kvs.push((k.clone(), Value::string("none")));
            }
        } else if middle && *k == vocab_key {
            saw_vocab = true;
            kvs.push((k.clone(), same_int_type(v, 1)));
        } else if let (Some(rest), Value::Array(ty, items)) = (k.strip_prefix(&arch_prefix), v) {
            // Per-layer hyperparameters follow the layers they describe. Known per-layer keys
            // were checked to have one entry per layer; for an unverified architecture any
            // array of that length is taken to be per layer.
            let per_layer = arch::PER_LAYER_KEYS.contains(&rest)
                || (rules.unverified && source_layers > 1 && items.len() as u64 == source_layers);
            if per_layer {
                let slice = items[range.first as usize..=range.last as usize].to_vec();
                kvs.push((k.clone(), Value::Array(*ty, slice)));
            } else {
                kvs.push((k.clone(), v.clone()));
            }
        } else {
            kvs.push((k.clone(), v.clone()));
        }
    }
    if let Some(p) = pattern {
        kvs.push((pattern_key, p));
    }
    if middle && !saw_tokenizer_model {
        kvs.push(("tokenizer.ggml.model".into(), Value::string("none")));
    }
    if middle && !saw_vocab {
        kvs.push((vocab_key, Value::U32(1)));
    }
    if rules.unverified {
        kvs.push((arch::KEY_UNVERIFIED.into(), Value::Bool(true)));
    }
    kvs.push((KEY_STAGE_INDEX.into(), Value::U32(index as u32)));
    kvs.push((KEY_STAGE_COUNT.into(), Value::U32(count as u32)));
    kvs.push((KEY_FIRST_LAYER.into(), Value::U32(range.first as u32)));
    kvs.push((KEY_LAST_LAYER.into(), Value::U32(range.last as u32)));
    kvs.push((KEY_SOURCE_LAYERS.into(), Value::U32(source_layers as u32)));

    let mut tensors = Vec::new();
    let source = |t: &TensorInfo| TensorData::Source {
        file: t.file,
        offset: t.offset,
    };
    for t in &model.tensors {
        if let Some((layer, rest)) = parse_block_name(&t.name) {
            if (range.first..=range.last).contains(&layer) {
                let renamed = TensorInfo {
                    name: format!("blk.{}.{rest}", layer - range.first),
                    ..t.clone()
                };
                tensors.push((renamed, source(t)));
            }
        } else if t.name == "token_embd.weight" {
            if first || last {
                tensors.push((t.clone(), source(t)));
            } else {
                let n_embd = model.embedding_length()?;
                let stub = TensorInfo {
                    name: t.name.clone(),
                    dims: vec![n_embd, 1],
                    ggml_type: 0,
                    size: n_embd * 4,
                    file: usize::MAX,
                    offset: 0,
                };
                tensors.push((stub, TensorData::Zeros));
            }
        } else if t.name.starts_with("output.") {
            if last {
                tensors.push((t.clone(), source(t)));
            }
        } else {
            // output_norm and global tensors (rope_freqs, ...) are small and every stage needs them.
            tensors.push((t.clone(), source(t)));
        }
    }
    Ok(StagePlan { kvs, tensors })
}

/// The vocabulary file: every key of the source (its hyperparameters, tokenizer and chat
/// template, which llama.cpp reads for a vocabulary-only load) and no tensors: megabytes
/// where shard 0 of a big model is gigabytes.
fn plan_vocab(model: &GgufModel) -> StagePlan {
    let mut kvs: Vec<(String, Value)> = model
        .kvs
        .iter()
        .filter(|(k, _)| !k.starts_with("split."))
        .cloned()
        .collect();
    kvs.push((KEY_VOCAB_ONLY.into(), Value::Bool(true)));
    let names = model
        .tensors
        .iter()
        .map(|t| Value::string(&t.name))
        .collect();
    kvs.push((KEY_SOURCE_TENSORS.into(), Value::Array(STRING_TYPE, names)));
    StagePlan {
        kvs,
        tensors: Vec::new(),
    }
}

/// Write `plan` to a temp file in `dir` that becomes `name` when persisted: (temp file,
/// bytes, sha256). Nothing is left behind on failure.
pub(crate) fn write_planned(
    model: &GgufModel,
    plan: &StagePlan,
    sources: &mut [File],
    dir: &Path,
    name: &str,
    progress: &dyn crate::progress::Progress,
) -> Result<(tempfile::NamedTempFile, u64, String)> {
    let mut tmp = crate::manifest::temp_file_builder()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let mut out = crate::progress::Counting {
        inner: tmp.as_file_mut(),
        progress,
    };
    let (size, sha256) =
        write_stage(model, plan, sources, &mut out).map_err(|e| Error::io(&dir.join(name), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    Ok((tmp, size, sha256))
}

/// Write one stage to `out`, returning (bytes, sha256).
fn write_stage(
    model: &GgufModel,
    plan: &StagePlan,
    sources: &mut [File],
    out: &mut impl Write,
) -> std::io::Result<(u64, String)> {
    let infos: Vec<TensorInfo> = plan.tensors.iter().map(|(t, _)| t.clone()).collect();
    let (header, offsets) =
        GgufModel::encode_header(model.version, &plan.kvs, &infos, model.alignment);
    let mut w = HashingWriter::new(BufWriter::with_capacity(4 << 20, out));
    w.write_all(&header)?;
    let mut pos = 0u64;
    let zeros = vec![0u8; model.alignment as usize];
    for ((info, data), rel) in plan.tensors.iter().zip(offsets) {
        w.write_all(&zeros[..(rel - pos) as usize])?; // alignment padding
        match data {
            TensorData::Source { file, offset } => {
                copy_range(&mut sources[*file], *offset, info.size, &mut w)?
            }
            TensorData::Zeros => {
                std::io::copy(&mut std::io::repeat(0).take(info.size), &mut w)?;
            }
        }
        pos = rel + info.size;
    }
    let end = align_up(pos, model.alignment);
    w.write_all(&zeros[..(end - pos) as usize])?;
    let (mut buf, written, sha) = w.finish();
    buf.flush()?;
    Ok((written, sha))
}

/// Choices for [`split_model`] beyond the shard count.
#[derive(Debug, Clone, Copy, Default)]
pub struct SplitOptions {
    /// Cut an architecture that [`arch::ARCHITECTURES`] does not list as verified; every stage
    /// then carries [`arch::KEY_UNVERIFIED`]. Refused architectures stay refused.
    pub allow_unverified: bool,
}

/// Cut `model` into `n` stage files in `target_dir` and write `shards.json`.
///
/// The architecture is checked first ([`arch::stage_rules`]): one whose stages cannot be made
/// exact is refused before anything is written. All shards are written to temp files first
/// and renamed into place only when every one is complete, so a failure leaves the directory
/// as it was. Shard files of a previous, larger split listed in the old manifest are removed,
/// so the directory holds one consistent set.
pub fn split_model(
    model: &GgufModel,
    n: usize,
    target_dir: &Path,
    source: SourceModel,
    options: SplitOptions,
    progress: &dyn crate::progress::Progress,
) -> Result<Manifest> {
    split_model_with(model, n, target_dir, move || Ok(source), options, progress)
}

/// [`split_model`], describing the source ([`crate::map::gguf_source`]: its files' sha256s)
/// on a second thread while the stages are written. Both read the same bytes, and the one
/// behind finds them in the page cache: the model is read from disk once, where describing it
/// first read it twice (`bench/split.sh`).
pub fn split_gguf(
    model: &GgufModel,
    n: usize,
    target_dir: &Path,
    options: SplitOptions,
    progress: &dyn crate::progress::Progress,
) -> Result<Manifest> {
    split_model_with(
        model,
        n,
        target_dir,
        || gguf_source(model),
        options,
        progress,
    )
}

/// [`split_model`] with the source described by `describe`, on a thread of its own.
fn split_model_with(
    model: &GgufModel,
    n: usize,
    target_dir: &Path,
    describe: impl FnOnce() -> Result<SourceModel> + Send,
    options: SplitOptions,
    progress: &dyn crate::progress::Progress,
) -> Result<Manifest> {
    std::thread::scope(|scope| {
        let describing = scope.spawn(describe);
        let written = write_split(model, Cut::Balanced(n), target_dir, options, progress);
        let source = describing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // Persisted only now, with the source described: a failure of either leaves the
        // directory as it was (the temp files are dropped).
        finish_split(target_dir, written?, source?)
    })
}

/// The stages and the vocabulary file, written to temp files in `target_dir`: (temp file,
/// final path) each, and their manifest entries.
struct Written {
    files: Vec<(tempfile::NamedTempFile, PathBuf)>,
    entries: Vec<ShardEntry>,
    vocab: VocabEntry,
}

/// How a split's stages are cut: into `n` balanced by their work ([`plan_stages`]), or at
/// given layer ranges.
#[derive(Debug, Clone, Copy)]
enum Cut<'a> {
    Balanced(usize),
    At(&'a [LayerRange]),
}

/// The layer ranges `cut` gives for `model`.
fn ranges_of(model: &GgufModel, cut: Cut) -> Result<Vec<LayerRange>> {
    match cut {
        Cut::Balanced(n) => {
            let windowed = arch::windowed_layers(model)?;
            plan_stages(
                &layer_bytes(model)?,
                head_cost(model),
                windowed.as_deref(),
                n,
            )
        }
        Cut::At(ranges) => {
            let layers = model.block_count()?;
            let mut next = 0;
            for r in ranges {
                if r.first != next || r.last < r.first {
                    return Err(Error::Split(format!(
                        "layer range {}-{} does not follow layer {next}'s predecessor (the ranges must cover 0-{} in order)",
                        r.first,
                        r.last,
                        layers.saturating_sub(1)
                    )));
                }
                next = r.last + 1;
            }
            if ranges.is_empty() || next != layers {
                return Err(Error::Split(format!(
                    "the ranges cover layers 0-{}, the model has {layers}",
                    next.saturating_sub(1)
                )));
            }
            Ok(ranges.to_vec())
        }
    }
}

/// Cut `model` at the layer ranges `ranges` (contiguous, from layer 0 to the last) into
/// stage files in `target_dir`, as [`split_model`] does at the ranges it plans: what a
/// [`crate::join`] of layer blocks must give byte for byte.
pub fn split_model_at(
    model: &GgufModel,
    ranges: &[LayerRange],
    target_dir: &Path,
    source: SourceModel,
    options: SplitOptions,
    progress: &dyn crate::progress::Progress,
) -> Result<Manifest> {
    let written = write_split(model, Cut::At(ranges), target_dir, options, progress)?;
    finish_split(target_dir, written, source)
}

/// Cut `model` into stage files and the vocabulary file, as temp files.
fn write_split(
    model: &GgufModel,
    cut: Cut,
    target_dir: &Path,
    options: SplitOptions,
    progress: &dyn crate::progress::Progress,
) -> Result<Written> {
    let ranges = ranges_of(model, cut)?;
    let n = ranges.len();
    let rules = arch::stage_rules(model, &ranges, options.allow_unverified)?;
    if rules.unverified {
        tracing::warn!(
            "architecture '{}' is not verified to split exactly: its stages are marked {}",
            rules.arch,
            arch::KEY_UNVERIFIED
        );
    }
    std::fs::create_dir_all(target_dir).map_err(|e| Error::io(target_dir, e))?;
    let mut sources = model
        .files
        .iter()
        .map(|p| File::open(p).map_err(|e| Error::io(p, e)))
        .collect::<Result<Vec<_>>>()?;
    let plans = (0..ranges.len())
        .map(|index| plan_stage(model, index, &ranges, &rules))
        .collect::<Result<Vec<_>>>()?;
    let data: u64 = plans
        .iter()
        .flat_map(|p| p.tensors.iter().map(|(t, _)| t.size))
        .sum();
    progress.start("splitting", data);
    let mut written = Vec::with_capacity(n);
    let mut entries = Vec::with_capacity(n);
    for ((index, range), plan) in ranges.iter().enumerate().zip(plans) {
        let name = shard_file_name(index, "gguf");
        let (tmp, size, sha256) =
            write_planned(model, &plan, &mut sources, target_dir, &name, progress)?;
        progress.line(&format!(
            "{name}: layers {}-{} ({} tensors, {size} bytes)",
            range.first,
            range.last,
            plan.tensors.len()
        ));
        entries.push(ShardEntry {
            shard_id: index as u32,
            file: name.clone(),
            size,
            sha256,
            layers: Some(*range),
            tensor_count: plan.tensors.len() as u64,
            info_hash: None,
        });
        written.push((tmp, target_dir.join(name)));
    }
    let (tmp, size, sha256) = write_planned(
        model,
        &plan_vocab(model),
        &mut sources,
        target_dir,
        VOCAB_FILE,
        progress,
    )?;
    progress.line(&format!(
        "{VOCAB_FILE}: vocabulary and metadata, no weights ({size} bytes)"
    ));
    let vocab = VocabEntry {
        file: VOCAB_FILE.into(),
        size,
        sha256,
        info_hash: None,
    };
    written.push((tmp, target_dir.join(VOCAB_FILE)));
    progress.finish();
    Ok(Written {
        files: written,
        entries,
        vocab,
    })
}

/// Rename the written files into place, remove what an older split left, and write the
/// manifest.
fn finish_split(target_dir: &Path, written: Written, source: SourceModel) -> Result<Manifest> {
    let old = Manifest::load(target_dir).ok();
    for (tmp, path) in written.files {
        tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
    }
    remove_stale_shards(target_dir, old.as_ref(), &written.entries);
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        split_id: Manifest::compute_split_id(&written.entries),
        source,
        shards: written.entries,
        vocab: Some(written.vocab),
    };
    manifest.store(target_dir)?;
    Ok(manifest)
}

/// Remove shard files an older manifest listed that the new set does not have.
pub(crate) fn remove_stale_shards(dir: &Path, old: Option<&Manifest>, new: &[ShardEntry]) {
    let Some(old) = old else { return };
    for entry in &old.shards {
        if !new.iter().any(|e| e.file == entry.file) && is_shard_file_name(&entry.file) {
            let path: PathBuf = dir.join(&entry.file);
            if std::fs::remove_file(&path).is_ok() {
                tracing::info!("removed {} left from the previous split", path.display());
            }
        }
    }
}

/// `shard-K.gguf` / `shard-K.safetensors` → (K, extension).
pub fn parse_shard_file_name(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix("shard-")?;
    let (k, ext) = rest.split_once('.')?;
    if !matches!(ext, "gguf" | "safetensors") || k.is_empty() || (k.len() > 1 && k.starts_with('0'))
    {
        return None;
    }
    Some((k.parse().ok()?, ext))
}

fn is_shard_file_name(name: &str) -> bool {
    parse_shard_file_name(name).is_some()
}

/// Describe input files for the manifest (hashing each).
pub fn describe_sources(files: &[PathBuf]) -> Result<Vec<SourceFile>> {
    files
        .iter()
        .map(|p| {
            Ok(SourceFile {
                name: p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                size: std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len(),
                sha256: sha256_file(p)?,
            })
        })
        .collect()
}

/// The manifest's description of a GGUF source.
pub fn gguf_source(model: &GgufModel) -> Result<SourceModel> {
    let files = describe_sources(&model.files)?;
    Ok(SourceModel {
        name: model
            .get("general.name")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| files[0].name.clone()),
        architecture: Some(model.architecture()?),
        sha256: (files.len() == 1).then(|| files[0].sha256.clone()),
        layer_count: Some(model.block_count()?),
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(r: &[LayerRange]) -> Vec<u64> {
        r.iter().map(LayerRange::len).collect()
    }

    #[test]
    fn uniform_layers_give_larger_early_stages() {
        let r = plan_stages(&[10; 30], 0, None, 4).unwrap();
        assert_eq!(sizes(&r), [8, 8, 7, 7]);
        assert_eq!(r[0].first, 0);
        assert_eq!(r[3].last, 29);
    }

    #[test]
    fn the_output_head_takes_layers_off_the_last_stage() {
        // A head worth 10 layers: the last stage keeps one, the others share the rest.
        let r = plan_stages(&[10; 30], 100, None, 4).unwrap();
        assert_eq!(sizes(&r), [10, 10, 9, 1]);
    }

    #[test]
    fn every_stage_of_a_windowed_model_holds_a_windowed_layer() {
        // gemma3's pattern: every sixth layer has full attention. With a heavy head the last
        // stage would be layer 11 alone; it takes 10..=11 instead.
        let windowed: Vec<bool> = (0..12).map(|il| il % 6 != 5).collect();
        let r = plan_stages(&[10; 12], 100, Some(&windowed), 4).unwrap();
        for s in &r {
            assert!(
                windowed[s.first as usize..=s.last as usize].contains(&true),
                "{r:?}"
            );
        }
        assert_eq!(r[3].first, 10, "{r:?}");
        // Twelve stages would need a stage of layer 5 alone.
        let e = plan_stages(&[10; 12], 0, Some(&windowed), 12).unwrap_err();
        assert!(e.to_string().contains("windowed"), "{e}");
    }

    #[test]
    fn heavy_layers_get_their_own_stage() {
        let r = plan_stages(&[1, 1, 1, 10, 1, 1, 1], 0, None, 3).unwrap();
        assert_eq!(sizes(&r), [3, 1, 3]);
    }

    #[test]
    fn every_count_from_one_to_layers() {
        for n in 1..=12 {
            let r = plan_stages(&[5; 12], 0, None, n).unwrap();
            assert_eq!(r.len(), n);
            assert!(r.windows(2).all(|w| w[1].first == w[0].last + 1));
            assert_eq!(r.last().unwrap().last, 11);
        }
    }

    #[test]
    fn bad_counts_are_refused_with_the_range() {
        let e = plan_stages(&[5; 12], 0, None, 0).unwrap_err().to_string();
        assert!(e.contains("1..=12"), "{e}");
        assert!(plan_stages(&[5; 12], 0, None, 13).is_err());
    }

    #[test]
    fn shard_names() {
        assert_eq!(parse_shard_file_name("shard-12.gguf"), Some((12, "gguf")));
        assert_eq!(
            parse_shard_file_name("shard-0.safetensors"),
            Some((0, "safetensors"))
        );
        assert_eq!(parse_shard_file_name("shard-01.gguf"), None);
        assert_eq!(parse_shard_file_name("shard-1.gguf.torrent"), None);
        assert_eq!(
            parse_block_name("blk.12.attn_q.weight"),
            Some((12, "attn_q.weight"))
        );
        assert_eq!(parse_block_name("output.weight"), None);
    }
}
