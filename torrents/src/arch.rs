//! Which model architectures can be cut into stages that compute exactly what the whole model
//! computes, and what each stage file must say about its layers for that to hold.
//!
//! A stage renumbers its blocks from `blk.0` and sets `<arch>.block_count` to its own layer
//! count. llama.cpp derives some per-layer behaviour from the layer *index* (which layers use a
//! sliding window, and their RoPE base) and some from the layer *count* (the model's size
//! class), so a naive stage can compute something else than the same layers did in the whole
//! model, and serve wrong text without a warning. Each architecture is therefore either
//! verified here (its rules written into every stage, and a test in `tests/tests/architectures.rs`
//! shows stages equal to the whole model for every shard count from 1 to min(layers, 8)),
//! refused with the reason, or unknown: refused unless the user passes `--allow-unverified`,
//! and then every stage says so ([`KEY_UNVERIFIED`]).
//!
//! The rules come from reading the llama.cpp that llama-cpp-sys-2 builds (`src/models/*.cpp`,
//! `llama_model_base::load_hparams` and `load_swa_pattern`).

use crate::error::{Error, Result};
use crate::gguf::{GgufModel, Value};
use crate::manifest::LayerRange;

/// Set (to `true`) in stages of an architecture not in [`ARCHITECTURES`] as verified, cut with
/// `--allow-unverified`: `validate` and the node warn about such stages.
pub const KEY_UNVERIFIED: &str = "shardswarm.stage.unverified";

/// Keys (after `<arch>.`) that llama.cpp reads either as one value for every layer or as one
/// value per layer (`get_key_or_arr` / `get_arr` against the block count). As arrays they are
/// sliced to the stage's layers; as scalars they hold for every layer and are kept.
pub const PER_LAYER_KEYS: &[&str] = &[
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "expert_used_count",
    "expert_feed_forward_length",
    "attention.sliding_window_pattern",
];

/// The per-layer key that says which layers use sliding-window attention.
const SWA_PATTERN: &str = "attention.sliding_window_pattern";

/// Whether stages of an architecture are known to be exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Stages are exact; `test` names the test that shows it.
    Verified { test: &'static str },
    /// No stage can be made exact; `reason` says why.
    Refused { reason: &'static str },
}

/// llama.cpp's fallback when a file has no per-layer window pattern: `set_swa_pattern(period,
/// dense_first)` derives it from the layer index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowPeriod {
    pub period: u32,
    pub dense_first: bool,
}

impl WindowPeriod {
    /// Whether layer `il` of a model with this period is windowed (as `set_swa_pattern`).
    fn is_windowed(self, il: u64) -> bool {
        let n = u64::from(self.period);
        if n == 0 {
            return true;
        }
        if self.dense_first {
            !il.is_multiple_of(n)
        } else {
            il % n < n - 1
        }
    }
}

/// One architecture and what splitting it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Architecture {
    /// `general.architecture`.
    pub name: &'static str,
    pub support: Support,
    /// Models whose layers may be windowed (when `<arch>.attention.sliding_window` > 0): every
    /// stage gets the explicit per-layer pattern, so its renumbered layers keep their kind.
    pub window: Option<WindowPeriod>,
    /// Layer counts llama.cpp maps to a size class whose attention scale is
    /// 1/sqrt(n_embd/n_head) instead of 1/sqrt(head_dim), with no key to override it: a split
    /// is exact only if no stage changes which side of this its layer count falls on (or the
    /// two scales agree).
    pub scale_class_layers: &'static [u64],
}

/// The architectures `split` and `map` know, verified or refused. Keep the README's table
/// (`shard_loader architectures` prints it) in step with this one.
pub const ARCHITECTURES: &[Architecture] = &[
    Architecture {
        name: "llama",
        support: Support::Verified {
            test: "architectures::llama_smollm2 (real SmolLM2-135M), architectures::llama_gqa (synthetic)",
        },
        window: None,
        scale_class_layers: &[],
    },
    Architecture {
        name: "gemma3",
        support: Support::Verified {
            test: "architectures::gemma3_270m (real Gemma 3 270M), architectures::gemma3_synthetic \
                   (window 64); windowed layers get an explicit per-layer pattern; the 27B size \
                   class (62 layers) is refused beyond one shard",
        },
        window: Some(WindowPeriod {
            period: 6,
            dense_first: false,
        }),
        scale_class_layers: &[62],
    },
    Architecture {
        name: "qwen2",
        support: Support::Verified {
            test: "architectures::qwen2 (synthetic, QKV biases)",
        },
        window: None,
        scale_class_layers: &[],
    },
    Architecture {
        name: "qwen3",
        support: Support::Verified {
            test: "architectures::qwen3 (synthetic, QK norms)",
        },
        window: None,
        scale_class_layers: &[],
    },
    Architecture {
        name: "qwen3moe",
        support: Support::Verified {
            test: "architectures::qwen3moe (synthetic, 8 experts, 2 used)",
        },
        window: None,
        scale_class_layers: &[],
    },
    Architecture {
        name: "phi3",
        support: Support::Verified {
            test: "architectures::phi3 (synthetic, fused QKV and gate/up)",
        },
        window: None,
        scale_class_layers: &[],
    },
    Architecture {
        name: "gemma",
        support: Support::Refused {
            reason: "llama.cpp multiplies every input of a gemma model by sqrt(n_embd), hidden \
                     states included, so every stage after the first would scale twice",
        },
        window: None,
        scale_class_layers: &[],
    },
    Architecture {
        name: "gemma2",
        support: Support::Refused {
            reason: "llama.cpp multiplies every input of a gemma2 model by sqrt(n_embd), hidden \
                     states included, so every stage after the first would scale twice (and a \
                     stage without a windowed layer aborts on load)",
        },
        window: None,
        scale_class_layers: &[],
    },
];

/// The entry for `name`, if the table has one.
pub fn lookup(name: &str) -> Option<&'static Architecture> {
    ARCHITECTURES.iter().find(|a| a.name == name)
}

/// Names of the verified architectures, for error messages.
pub fn verified_names() -> Vec<&'static str> {
    ARCHITECTURES
        .iter()
        .filter(|a| matches!(a.support, Support::Verified { .. }))
        .map(|a| a.name)
        .collect()
}

/// The table as Markdown rows (what `shard_loader architectures` prints and the README shows).
pub fn markdown_table() -> String {
    let mut s = String::from("| architecture | stages | verified by / reason |\n|---|---|---|\n");
    for a in ARCHITECTURES {
        let (kind, why) = match a.support {
            Support::Verified { test } => ("exact", test),
            Support::Refused { reason } => ("refused", reason),
        };
        let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
        s.push_str(&format!("| `{}` | {kind} | {why} |\n", a.name));
    }
    s
}

/// What every stage of one split must carry beyond the sliced metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct StageRules {
    /// `general.architecture`.
    pub arch: String,
    /// The whole model's windowed-layer flags, one per layer, for architectures with windowed
    /// layers (written into each stage as `<arch>.attention.sliding_window_pattern`).
    pub windowed: Option<Vec<bool>>,
    /// Cut with `--allow-unverified` from an architecture not verified here.
    pub unverified: bool,
}

impl StageRules {
    /// The key holding the per-layer window pattern.
    pub fn pattern_key(&self) -> String {
        format!("{}.{SWA_PATTERN}", self.arch)
    }

    /// The pattern key's value for a stage of `range`, if the model has windowed layers.
    pub fn stage_pattern(&self, range: LayerRange) -> Option<Value> {
        let flags = self.windowed.as_ref()?;
        let slice = &flags[range.first as usize..=range.last as usize];
        Some(Value::Array(
            7,
            slice.iter().map(|b| Value::Bool(*b)).collect(),
        ))
    }
}

/// Decide whether `model` can be cut into stages of `ranges` exactly, and what each stage must
/// carry. Refuses (naming the architecture and the reason) what cannot be exact; an
/// architecture the table does not know is refused unless `allow_unverified`.
pub fn stage_rules(
    model: &GgufModel,
    ranges: &[LayerRange],
    allow_unverified: bool,
) -> Result<StageRules> {
    let arch = model.architecture()?;
    let layers = model.block_count()?;
    let entry = lookup(&arch);
    let unverified = match entry.map(|a| a.support) {
        Some(Support::Verified { .. }) => false,
        Some(Support::Refused { reason }) => {
            return Err(Error::Unsupported {
                arch,
                reason: reason.split_whitespace().collect::<Vec<_>>().join(" "),
            })
        }
        None if allow_unverified => true,
        None => {
            return Err(Error::Unsupported {
                arch,
                reason: format!(
                    "it is not verified to give the whole model's output when cut into \
                     stages (verified: {}; --allow-unverified tries anyway)",
                    verified_names().join(", ")
                ),
            })
        }
    };
    check_per_layer_arrays(model, &arch, layers, unverified)?;
    if let Some(a) = entry {
        check_size_class(model, a, layers, ranges)?;
    }
    let windowed = windowed_layers(model)?;
    Ok(StageRules {
        arch,
        windowed,
        unverified,
    })
}

/// The whole model's windowed-layer flags, for an architecture of the table with windowed
/// layers (else `None`).
pub fn windowed_layers(model: &GgufModel) -> Result<Option<Vec<bool>>> {
    let arch = model.architecture()?;
    match lookup(&arch).and_then(|a| a.window) {
        Some(period) if has_window(model, &arch) => Ok(Some(window_flags(
            model,
            &arch,
            model.block_count()?,
            period,
        )?)),
        _ => Ok(None),
    }
}

/// Whether the model has windowed layers at all (`<arch>.attention.sliding_window` > 0).
fn has_window(model: &GgufModel, arch: &str) -> bool {
    model
        .get(&format!("{arch}.attention.sliding_window"))
        .and_then(Value::as_u64)
        .is_some_and(|w| w > 0)
}

/// The whole model's windowed flags, as llama.cpp's `load_swa_pattern` reads them: the
/// per-layer array if the file has one, else the period (from the key, or the default).
fn window_flags(
    model: &GgufModel,
    arch: &str,
    layers: u64,
    default: WindowPeriod,
) -> Result<Vec<bool>> {
    let key = format!("{arch}.{SWA_PATTERN}");
    match model.get(&key) {
        Some(Value::Array(_, items)) => items
            .iter()
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                other => other.as_u64().map(|x| x != 0).ok_or(()),
            })
            .collect::<std::result::Result<Vec<bool>, ()>>()
            .map_err(|()| Error::Split(format!("{key} holds values that are not flags"))),
        Some(v) => {
            let period = v
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| {
                    Error::Split(format!("{key} is neither a per-layer array nor a period"))
                })?;
            let p = WindowPeriod { period, ..default };
            Ok((0..layers).map(|il| p.is_windowed(il)).collect())
        }
        None => Ok((0..layers).map(|il| default.is_windowed(il)).collect()),
    }
}

/// Per-layer arrays must have one entry per layer, or a stage's slice would describe other
/// layers. An array of another key that happens to have one entry per layer is ambiguous: for
/// a verified architecture that means the file has something we have not read, so refuse.
fn check_per_layer_arrays(
    model: &GgufModel,
    arch: &str,
    layers: u64,
    unverified: bool,
) -> Result<()> {
    let prefix = format!("{arch}.");
    for (key, value) in &model.kvs {
        let (Some(rest), Value::Array(_, items)) = (key.strip_prefix(&prefix), value) else {
            continue;
        };
        let n = items.len() as u64;
        if PER_LAYER_KEYS.contains(&rest) {
            if n != layers {
                return Err(Error::Split(format!(
                    "{key} has {n} entries for {layers} layers"
                )));
            }
        } else if n == layers && layers > 1 && !unverified {
            return Err(Error::Unsupported {
                arch: arch.to_owned(),
                reason: format!(
                    "{key} has one entry per layer, and it is not a key whose meaning per \
                     layer is known here"
                ),
            });
        }
    }
    Ok(())
}

/// Refuse splits where a stage's layer count moves it to another size class than the whole
/// model's, when the two classes compute attention with different scales.
fn check_size_class(
    model: &GgufModel,
    a: &Architecture,
    layers: u64,
    ranges: &[LayerRange],
) -> Result<()> {
    if a.scale_class_layers.is_empty() {
        return Ok(());
    }
    let arch = a.name;
    let get = |k: &str| model.get(&format!("{arch}.{k}")).and_then(first_u64);
    let n_embd = model.embedding_length()?;
    let n_head = get("attention.head_count").unwrap_or(0);
    let head_dim = get("attention.key_length").or((n_head > 0).then(|| n_embd / n_head.max(1)));
    if n_head == 0 || head_dim == Some(n_embd / n_head) {
        return Ok(()); // both classes use the same scale
    }
    let class = |n: u64| a.scale_class_layers.contains(&n);
    for r in ranges {
        if class(r.len()) != class(layers) {
            return Err(Error::Unsupported {
                arch: arch.to_owned(),
                reason: format!(
                    "llama.cpp picks a {arch} model's attention scale from its layer count \
                     ({} layers: 1/sqrt(n_embd/n_head), other counts: 1/sqrt(head_dim)), and \
                     no key overrides it: a stage of layers {}-{} ({} layers) would attend \
                     differently from the whole model's {layers}",
                    a.scale_class_layers
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(" or "),
                    r.first,
                    r.last,
                    r.len()
                ),
            });
        }
    }
    Ok(())
}

/// A count stored as a scalar, or the first entry of a per-layer array (llama.cpp's
/// `n_head(0)`).
fn first_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Array(_, items) => items.first().and_then(Value::as_u64),
        other => other.as_u64(),
    }
}

/// What [`check_stage`] finds in a stage file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StageFindings {
    /// The stage would not compute what its layers did in the whole model.
    pub problems: Vec<String>,
    /// The stage may be fine, but nothing here shows it.
    pub warnings: Vec<String>,
}

/// Check a stage file's own keys: its architecture is accepted (or marked unverified), its
/// per-layer arrays have one entry per layer of the stage, and a windowed architecture carries
/// the explicit per-layer pattern (a stage must not fall back to llama.cpp's index-derived one).
pub fn check_stage(stage: &GgufModel) -> StageFindings {
    let mut f = StageFindings::default();
    let (arch, layers) = match (stage.architecture(), stage.block_count()) {
        (Ok(a), Ok(n)) => (a, n),
        (Err(e), _) | (_, Err(e)) => {
            f.problems.push(e.to_string());
            return f;
        }
    };
    let marked = matches!(stage.get(KEY_UNVERIFIED), Some(Value::Bool(true)));
    let entry = lookup(&arch);
    match entry.map(|a| a.support) {
        Some(Support::Verified { .. }) => {}
        Some(Support::Refused { reason }) => f.problems.push(format!(
            "architecture '{arch}' is refused: {}",
            reason.split_whitespace().collect::<Vec<_>>().join(" ")
        )),
        None if marked => f.warnings.push(format!(
            "architecture '{arch}' is not verified to split exactly (cut with --allow-unverified): \
             its output may differ from the whole model's"
        )),
        None => f.problems.push(format!(
            "architecture '{arch}' is not verified to split exactly, and the stage is not \
             marked {KEY_UNVERIFIED}"
        )),
    }
    for key in PER_LAYER_KEYS {
        let full = format!("{arch}.{key}");
        if let Some(Value::Array(_, items)) = stage.get(&full) {
            if items.len() as u64 != layers {
                f.problems.push(format!(
                    "{full} has {} entries for the stage's {layers} layers",
                    items.len()
                ));
            }
        }
    }
    if entry.and_then(|a| a.window).is_some() && has_window(stage, &arch) {
        let key = format!("{arch}.{SWA_PATTERN}");
        match stage.get(&key) {
            Some(Value::Array(_, flags)) => {
                if !flags
                    .iter()
                    .any(|v| matches!(v, Value::Bool(true)) || v.as_u64().is_some_and(|x| x != 0))
                {
                    f.problems.push(format!(
                        "{key}: every layer of the stage has full attention, and llama.cpp \
                         aborts on a model of a windowed architecture without a windowed layer"
                    ));
                }
            }
            _ => f.problems.push(format!(
                "{key} is not a per-layer array: llama.cpp would derive the stage's windowed \
                 layers from their renumbered indices"
            )),
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma3_period_matches_llama_cpp() {
        let p = WindowPeriod {
            period: 6,
            dense_first: false,
        };
        let flags: Vec<bool> = (0..12).map(|il| p.is_windowed(il)).collect();
        // Layers 5 and 11 are the full-attention ones.
        assert_eq!(
            flags,
            [true, true, true, true, true, false, true, true, true, true, true, false]
        );
        let dense_first = WindowPeriod {
            period: 4,
            dense_first: true,
        };
        assert!(!dense_first.is_windowed(0) && dense_first.is_windowed(1));
    }

    #[test]
    fn every_table_entry_is_unique_and_described() {
        for (i, a) in ARCHITECTURES.iter().enumerate() {
            assert!(
                ARCHITECTURES[..i].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
        }
        let table = markdown_table();
        assert!(table.contains("| `gemma2` | refused |"), "{table}");
        assert!(table.contains("| `gemma3` | exact |"), "{table}");
    }
}
