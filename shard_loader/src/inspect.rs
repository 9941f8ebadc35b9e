//! `inspect`: a GGUF file's metadata and tensor summary, read from its header (no weights).

use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use torrents::gguf::{GgufModel, Value};

/// What `inspect --json` prints.
#[derive(Serialize)]
struct Inspection {
    file: String,
    version: u32,
    architecture: Option<String>,
    layers: Option<u64>,
    tensor_count: usize,
    tensor_bytes: u64,
    alignment: u64,
    metadata: Vec<Entry>,
    tensors: Vec<Tensor>,
}

/// A metadata key and its value as shown (long strings and arrays abridged).
#[derive(Serialize)]
struct Entry {
    key: String,
    value: String,
}

#[derive(Serialize)]
struct Tensor {
    name: String,
    dims: Vec<u64>,
    #[serde(rename = "type")]
    ggml_type: u32,
    bytes: u64,
}

/// A metadata value for a person: strings quoted and cut at 60 bytes, arrays by their length.
fn shown(v: &Value) -> String {
    match v {
        Value::Array(_, items) => format!("[{} items]", items.len()),
        Value::String(s) => {
            let s = String::from_utf8_lossy(s);
            if s.len() > 60 {
                format!("{:?}…", &s[..s.floor_char_boundary(60)])
            } else {
                format!("{s:?}")
            }
        }
        other => format!("{other:?}")
            .split(['(', ')'])
            .nth(1)
            .unwrap_or_default()
            .to_owned(),
    }
}

/// `inspect FILE`.
pub fn inspect(file: &Path, json: bool) -> Result<()> {
    let m = GgufModel::open(file)?;
    let tensor_bytes: u64 = m.tensors.iter().map(|t| t.size).sum();
    let layers = m.block_count().ok();
    let metadata: Vec<Entry> = m
        .kvs
        .iter()
        .map(|(k, v)| Entry {
            key: k.clone(),
            value: shown(v),
        })
        .collect();
    if json {
        let out = Inspection {
            file: file.display().to_string(),
            version: m.version,
            architecture: m.architecture().ok(),
            layers,
            tensor_count: m.tensors.len(),
            tensor_bytes,
            alignment: m.alignment,
            metadata,
            tensors: m
                .tensors
                .iter()
                .map(|t| Tensor {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    ggml_type: t.ggml_type,
                    bytes: t.size,
                })
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("file:         {}", file.display());
        println!(
            "architecture: {}",
            m.architecture().unwrap_or_else(|_| "-".into())
        );
        println!(
            "layers:       {}",
            layers.map_or("-".into(), |l| l.to_string())
        );
        println!("tensors:      {} ({} bytes)", m.tensors.len(), tensor_bytes);
        for e in metadata {
            println!("  {} = {}", e.key, e.value);
        }
    }
    Ok(())
}
