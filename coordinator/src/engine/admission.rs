//! The bound on requests waiting for a slot: past it a request is refused at once (429)
//! instead of waiting without end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counts the requests waiting, shared by the engine's handle (which lets them in) and the
/// engine (which takes them out of the line).
pub struct Admission {
    waiting: Arc<AtomicUsize>,
    limit: usize,
}

/// A place in the line; leaving it (by taking a slot, or by giving up) frees it.
pub struct InLine(Arc<AtomicUsize>);

impl Drop for InLine {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(limit: usize) -> Admission {
        Admission {
            waiting: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    /// A place in the line, or `None` when `limit` requests are already waiting.
    pub fn enter(&self) -> Option<InLine> {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| InLine(self.waiting.clone()))
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_is_bounded_and_a_place_is_freed_when_dropped() {
        let line = Admission::new(2);
        let a = line.enter().unwrap();
        let _b = line.enter().unwrap();
        assert!(line.enter().is_none());
        assert_eq!(line.waiting(), 2);
        drop(a);
        assert!(line.enter().is_some());
    }
}
