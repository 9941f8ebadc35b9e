//! What long work (splitting, mapping, validating) reports as it goes: lines for a log, and
//! bytes done out of a total for a progress bar. The library only reports; the binaries decide
//! how it looks (a bar on a terminal, periodic lines otherwise).

/// A receiver of progress. Every method does nothing unless implemented.
pub trait Progress {
    /// Something worth a log line (a shard written, a part mapped).
    fn line(&self, _line: &str) {}
    /// Work on `total` bytes begins.
    fn start(&self, _what: &str, _total: u64) {}
    /// `bytes` more are done.
    fn advance(&self, _bytes: u64) {}
    /// The work is over.
    fn finish(&self) {}
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {}

/// A writer that reports the bytes written through it.
pub struct Counting<'a, W> {
    pub inner: W,
    pub progress: &'a dyn Progress,
}

impl<W: std::io::Write> std::io::Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
