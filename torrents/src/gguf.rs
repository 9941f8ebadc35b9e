//! GGUF reading and writing, byte-exact.
//!
//! Written here rather than taken from a crate: splitting needs the header's key/value pairs and
//! tensor table as they are on disk (types, order, raw string bytes) so that shards are
//! byte-deterministic, and tensor data must be streamed from file offsets, never loaded whole.
//! The readers on crates.io either decode values lossily or map tensors into memory (candle) and
//! pull in a whole ML framework. Every count and length read from a file is checked against the
//! file's size before anything is allocated, so a hostile header cannot exhaust memory.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `GGUF` as a little-endian u32.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are refused (real files use depth 1).
const MAX_ARRAY_DEPTH: u32 = 4;

/// A metadata value, kept exactly as stored so it can be written back byte for byte.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    /// Raw bytes: GGUF strings should be UTF-8, but token tables are kept verbatim.
    String(Vec<u8>),
    /// Element type code and the elements (all of that type).
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_code(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, for counts stored with any integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as text, if it is a UTF-8 string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// A string value.
    pub fn string(s: &str) -> Value {
        Value::String(s.as_bytes().to_vec())
    }
}

/// One entry of the tensor table, with where its bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost first (ggml's `ne`).
    pub dims: Vec<u64>,
    /// ggml type code.
    pub ggml_type: u32,
    /// Size of the data in bytes, from the type and dimensions.
    pub size: u64,
    /// Which input file holds the data (index into [`GgufModel::files`]).
    pub file: usize,
    /// Absolute offset of the data in that file.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header (possibly merged from gguf-split parts): metadata in file order and the
/// tensor table, with data left on disk.
#[derive(Debug, Clone)]
pub struct GgufModel {
    pub version: u32,
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// The files the tensor data lives in.
    pub files: Vec<PathBuf>,
}

impl GgufModel {
    /// Look a metadata key up.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String> {
        self.get("general.architecture")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| self.invalid("no general.architecture string"))
    }

    /// `<arch>.block_count`: the number of transformer layers.
    pub fn block_count(&self) -> Result<u64> {
        let arch = self.architecture()?;
        self.get(&format!("{arch}.block_count"))
            .and_then(Value::as_u64)
            .ok_or_else(|| self.invalid(&format!("no {arch}.block_count")))
    }

    /// `<arch>.embedding_length`.
    pub fn embedding_length(&self) -> Result<u64> {
        let arch = self.architecture()?;
        self.get(&format!("{arch}.embedding_length"))
            .and_then(Value::as_u64)
            .ok_or_else(|| self.invalid(&format!("no {arch}.embedding_length")))
    }

    fn invalid(&self, what: &str) -> Error {
        Error::Gguf {
            path: self.files.first().cloned().unwrap_or_default(),
            message: what.to_owned(),
        }
    }

    /// Open and parse the header of one GGUF file.
    pub fn open(path: &Path) -> Result<GgufModel> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        GgufModel::read_header(BufReader::with_capacity(1 << 20, file), len, path)
    }

    /// Parse a GGUF file held in memory (its header; tensor data is only checked to lie
    /// within `bytes`). Errors name the file as `<memory>`.
    pub fn parse(bytes: &[u8]) -> Result<GgufModel> {
        let path = Path::new("<memory>");
        GgufModel::read_header(std::io::Cursor::new(bytes), bytes.len() as u64, path)
    }

    /// Parse the header of a GGUF file of `len` bytes read from `inner`.
    fn read_header<R: Read + Seek>(inner: R, len: u64, path: &Path) -> Result<GgufModel> {
        let mut r = HeaderReader {
            inner,
            pos: 0,
            len,
            path,
        };
        let magic = r.bytes_fixed::<4>()?;
        if magic != MAGIC {
            return Err(r.err("not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.err(&format!("unsupported GGUF version {version}")));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        // Each KV takes at least 12 bytes and each tensor entry at least 24.
        if n_kv.saturating_mul(12) > len || n_tensors.saturating_mul(24) > len {
            return Err(r.err(&format!(
                "absurd counts: {n_kv} metadata entries, {n_tensors} tensors in a {len}-byte file"
            )));
        }
        // Counts come from the file: room is made as entries are read, not from the count
        // (a large file could otherwise ask for gigabytes before a single entry is read).
        let mut kvs = Vec::with_capacity((n_kv as usize).min(1 << 12));
        for _ in 0..n_kv {
            let key = r.string()?;
            let key = String::from_utf8(key).map_err(|_| r.err("metadata key is not UTF-8"))?;
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            kvs.push((key, value));
        }
        let alignment = match kvs.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a,
                _ => return Err(r.err("general.alignment is not a power of two up to 65536")),
            },
            None => DEFAULT_ALIGNMENT,
        };
        let mut raw = Vec::with_capacity((n_tensors as usize).min(1 << 12));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let name = String::from_utf8(name).map_err(|_| r.err("tensor name is not UTF-8"))?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.err(&format!("tensor {name}: {n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = r.u32()?;
            let rel = r.u64()?;
            raw.push((name, dims, ggml_type, rel));
        }
        let data_start = align_up(r.pos, alignment);
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ggml_type, rel) in raw {
            let size = tensor_bytes(ggml_type, &dims)
                .map_err(|m| r.err(&format!("tensor {name}: {m}")))?;
            if rel % alignment != 0 {
                return Err(r.err(&format!("tensor {name}: offset {rel} is not aligned")));
            }
            let offset = data_start
                .checked_add(rel)
                .filter(|o| o.checked_add(size).is_some_and(|end| end <= len))
                .ok_or_else(|| {
                    r.err(&format!(
                        "tensor {name}: data ({size} bytes at {rel}) lies past the end of the file \
                         ({len} bytes): truncated?"
                    ))
                })?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                size,
                file: 0,
                offset,
            });
        }
        let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(r.err(&format!("tensor {} appears twice", w[0])));
        }
        Ok(GgufModel {
            version,
            kvs,
            tensors,
            alignment,
            files: vec![path.to_owned()],
        })
    }

    /// Serialise the header (everything before the tensor data, padding included) for this
    /// metadata and tensor list, with tensors laid out in order. Returns the header bytes and
    /// each tensor's offset relative to the data section.
    pub fn encode_header(
        version: u32,
        kvs: &[(String, Value)],
        tensors: &[TensorInfo],
        alignment: u64,
    ) -> (Vec<u8>, Vec<u64>) {
        let mut out = Vec::with_capacity(1 << 20);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (k, v) in kvs {
            put_string(&mut out, k.as_bytes());
            out.extend_from_slice(&v.type_code().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offsets = Vec::with_capacity(tensors.len());
        let mut rel = 0u64;
        for t in tensors {
            put_string(&mut out, t.name.as_bytes());
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.to_le_bytes());
            out.extend_from_slice(&rel.to_le_bytes());
            offsets.push(rel);
            rel = align_up(rel + t.size, alignment);
        }
        let padded = align_up(out.len() as u64, alignment) as usize;
        out.resize(padded, 0);
        (out, offsets)
    }
}

/// Round `x` up to a multiple of `align` (a power of two).
pub fn align_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(ty, items) => {
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// (elements per block, bytes per block) of a ggml type, from ggml's type traits.
fn block_layout(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        _ => return None,
    })
}

/// Bytes of a tensor's data, refusing unknown types, zero or overflowing dimensions and rows
/// that are not whole blocks.
pub fn tensor_bytes(ggml_type: u32, dims: &[u64]) -> std::result::Result<u64, String> {
    let (block, bytes) = block_layout(ggml_type).ok_or(format!("unknown ggml type {ggml_type}"))?;
    if dims.contains(&0) {
        return Err("a dimension is zero".into());
    }
    if !dims[0].is_multiple_of(block) {
        return Err(format!(
            "row of {} elements is not a whole number of blocks",
            dims[0]
        ));
    }
    dims.iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d))
        .and_then(|n| (n / block).checked_mul(bytes))
        .ok_or_else(|| "dimensions overflow".to_string())
}

/// Reads header fields, tracking the position and refusing to read past the file's end.
struct HeaderReader<'a, R> {
    inner: R,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl<R: Read + Seek> HeaderReader<'_, R> {
    fn err(&self, message: &str) -> Error {
        Error::Gguf {
            path: self.path.to_owned(),
            message: message.to_owned(),
        }
    }

    fn need(&self, n: u64) -> Result<()> {
        if self.pos.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(self.err(&format!(
                "header runs past the end of the file at byte {} (wants {n} more): truncated or corrupt",
                self.pos
            )));
        }
        Ok(())
    }

    fn bytes_fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.need(N as u64)?;
        let mut b = [0u8; N];
        self.inner
            .read_exact(&mut b)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes_fixed()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes_fixed()?))
    }

    fn string(&mut self) -> Result<Vec<u8>> {
        let n = self.u64()?;
        self.need(n)?;
        let mut b = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut b)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        Ok(b)
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.bytes_fixed()?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes_fixed()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes_fixed()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes_fixed()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes_fixed()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes_fixed()?)),
            7 => match self.bytes_fixed::<1>()?[0] {
                b @ (0 | 1) => Value::Bool(b == 1),
                b => return Err(self.err(&format!("bool value {b}"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err("arrays nested too deep"));
                }
                let elem = self.u32()?;
                let count = self.u64()?;
                // Every element takes at least one byte: a count beyond the file is a lie.
                self.need(count)?;
                let mut items = Vec::with_capacity(count.min(1 << 20) as usize);
                for _ in 0..count {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(elem, items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes_fixed()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes_fixed()?)),
            other => return Err(self.err(&format!("unknown metadata value type {other}"))),
        })
    }
}

/// Copy `len` bytes at `offset` of `src` to `dst`.
///
/// In chunks of [`COPY_CHUNK`] read at their offsets: `std::io::copy` into a writer that is
/// not itself a `BufWriter` (ours hashes on the way) goes 8 KiB a call, which cost `split`
/// more system time than the copying itself.
pub fn copy_range(
    src: &mut File,
    offset: u64,
    len: u64,
    dst: &mut impl std::io::Write,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buffer = vec![0u8; COPY_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = buffer.len().min((len - done) as usize);
        src.read_exact_at(&mut buffer[..n], offset + done)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    std::io::Error::new(e.kind(), "file shrank while reading")
                }
                _ => e,
            })?;
        dst.write_all(&buffer[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// How much [`copy_range`] reads at a time.
pub const COPY_CHUNK: usize = 4 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    /// A 10 GB file (sparse) whose header claims 800 million metadata entries, which its
    /// size allows: the reader reserves room as it reads, so the first bad entry ends it
    /// with an error instead of a 45 GB allocation aborting the process.
    #[test]
    fn a_large_files_counts_reserve_no_memory_before_its_entries_are_read() {
        let path = std::env::temp_dir().join(format!("gguf-counts-{}.gguf", std::process::id()));
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&0u64.to_le_bytes());
        head.extend_from_slice(&800_000_000u64.to_le_bytes());
        head.extend_from_slice(&1u64.to_le_bytes());
        head.push(b'k');
        head.extend_from_slice(&99u32.to_le_bytes());
        std::fs::write(&path, &head).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(10 << 30).unwrap();
        let result = GgufModel::open(&path);
        let _ = std::fs::remove_file(&path);
        let Err(err) = result else {
            panic!("an unknown value type is refused");
        };
        assert!(err.to_string().contains("value type 99"), "{err}");
    }
}
