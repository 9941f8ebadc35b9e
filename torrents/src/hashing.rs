//! File hashing: sha256 of whole files, and SHA-1 of torrent pieces on every core.
//!
//! Piece hashing reads with positioned reads (`pread`) from one shared file handle, each worker
//! taking the next block of pieces from an atomic counter, so the work spreads evenly and reads
//! stay sequential within a block. The `sha1`/`sha2` crates use the CPU's SHA extensions when
//! present (ours builds with `target-cpu=native`).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    sha256_file_with(path, &crate::progress::Quiet)
}

/// [`sha256_file`], reporting the bytes read.
pub fn sha256_file_with(path: &Path, progress: &dyn crate::progress::Progress) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.advance(n as u64);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A writer that hashes what passes through it (sha256), so a file is hashed as it is written.
pub struct HashingWriter<W> {
    pub inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// Bytes written and their hex sha256.
    pub fn finish(self) -> (W, u64, String) {
        (
            self.inner,
            self.written,
            hex::encode(self.hasher.finalize()),
        )
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Pieces hashed per unit of work: large enough for sequential reads, small enough to balance.
const BLOCK_BYTES: u64 = 8 << 20;
/// Bytes read per `pread`: small enough that hashing finds them still in cache.
const READ_CHUNK: u64 = 128 << 10;

/// SHA-1 of every `piece_length` piece of the file (the last may be short), concatenated as in
/// a metainfo `pieces` string. `threads` = 0 means one per core. `progress` is called with the
/// bytes hashed so far, from worker threads.
pub fn piece_hashes(
    path: &Path,
    piece_length: u64,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(u64, Vec<u8>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if piece_length == 0 {
        return Err(Error::Argument("piece length 0".into()));
    }
    let n_pieces = len.div_ceil(piece_length);
    let pieces_per_block = (BLOCK_BYTES / piece_length).max(1);
    let n_blocks = n_pieces.div_ceil(pieces_per_block);
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .min(n_blocks.max(1) as usize);
    let mut out = vec![0u8; n_pieces as usize * 20];
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    // Each worker writes only the hashes of blocks it claimed, into disjoint chunks of `out`.
    let chunks: Vec<Mutex<&mut [u8]>> = out
        .chunks_mut((pieces_per_block * 20) as usize)
        .map(Mutex::new)
        .collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                // Read in small chunks and hash each right away, while it is still in L2:
                // copying a whole block first and hashing it after costs ~6% of throughput.
                let mut buf = vec![0u8; READ_CHUNK.min(piece_length) as usize];
                loop {
                    let block = next.fetch_add(1, Ordering::Relaxed);
                    if block >= n_blocks || failure.lock().unwrap().is_some() {
                        return;
                    }
                    let first_piece = block * pieces_per_block;
                    let last_piece = (first_piece + pieces_per_block).min(n_pieces);
                    let mut chunk = chunks[block as usize].lock().unwrap();
                    let mut hashed = 0;
                    for piece in first_piece..last_piece {
                        let start = piece * piece_length;
                        let end = (start + piece_length).min(len);
                        let mut hasher = Sha1::new();
                        let mut at = start;
                        while at < end {
                            let n = (end - at).min(buf.len() as u64) as usize;
                            if let Err(e) = file.read_exact_at(&mut buf[..n], at) {
                                *failure.lock().unwrap() = Some(Error::io(path, e));
                                return;
                            }
                            hasher.update(&buf[..n]);
                            at += n as u64;
                        }
                        let i = (piece - first_piece) as usize;
                        chunk[i * 20..(i + 1) * 20].copy_from_slice(&hasher.finalize());
                        hashed += end - start;
                    }
                    progress(done.fetch_add(hashed, Ordering::Relaxed) + hashed);
                }
            });
        }
    });
    drop(chunks);
    if let Some(e) = failure.into_inner().unwrap() {
        return Err(e);
    }
    Ok((len, out))
}
