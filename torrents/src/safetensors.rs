//! safetensors header checks: enough to know a file is whole and what tensors it holds,
//! without reading the weights.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Headers larger than this are refused (the format's own readers use 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// The tensor names of a safetensors file, after checking that its header is well formed and
/// that the tensors' byte ranges exactly fill the rest of the file.
pub fn read_tensor_names(path: &Path) -> Result<Vec<String>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    tensor_names_from(file, len, path)
}

/// [`read_tensor_names`] of a file held in memory (errors name it `<memory>`).
pub fn tensor_names_in(bytes: &[u8]) -> Result<Vec<String>> {
    tensor_names_from(bytes, bytes.len() as u64, Path::new("<memory>"))
}

fn tensor_names_from(mut file: impl Read, len: u64, path: &Path) -> Result<Vec<String>> {
    let bad = |message: String| Error::Safetensors {
        path: path.to_owned(),
        message,
    };
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .map_err(|_| bad(format!("only {len} bytes: no header")))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > len - 8 {
        return Err(bad(format!(
            "header length {n} does not fit a {len}-byte file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let data_len = len - 8 - n;
    let mut names = Vec::with_capacity(header.len());
    let mut ranges = Vec::with_capacity(header.len());
    for (name, entry) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = entry
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad(format!("tensor {name}: no data_offsets [begin, end]")))?;
        if entry.get("dtype").and_then(|d| d.as_str()).is_none() {
            return Err(bad(format!("tensor {name}: no dtype")));
        }
        if offsets.0 > offsets.1 || offsets.1 > data_len {
            return Err(bad(format!(
                "tensor {name}: bytes {}..{} outside the {data_len}-byte data section: truncated?",
                offsets.0, offsets.1
            )));
        }
        ranges.push(offsets);
        names.push(name.clone());
    }
    ranges.sort_unstable();
    let mut end = 0;
    for (b, e) in ranges {
        if b != end {
            return Err(bad(format!(
                "tensor data has a gap or overlap at byte {end}"
            )));
        }
        end = e;
    }
    if end != data_len {
        return Err(bad(format!("tensors cover {end} of {data_len} data bytes")));
    }
    names.sort_unstable();
    Ok(names)
}
