//! What the engine reports in `/status`: requests, steps, tokens, and how busy each stage is.

use std::time::{Duration, Instant};

use protocol::status::Batching;

/// The serving's counts, and the window over which each stage's busy share is measured.
#[derive(Debug, Default)]
pub struct ServingStats {
    pub counts: Batching,
    window: Option<(Instant, Vec<f64>)>,
}

impl ServingStats {
    /// Count one step's compute times.
    pub(super) fn add_busy(&mut self, busy_us: &[u32]) {
        const WINDOW: Duration = Duration::from_secs(3);
        let n = busy_us.len();
        let c = &mut self.counts;
        if c.stage_busy_seconds.len() != n {
            c.stage_busy_seconds = vec![0.0; n];
            c.stage_busy_fraction = vec![0.0; n];
            self.window = None;
        }
        let (start, busy) = self
            .window
            .get_or_insert_with(|| (Instant::now(), vec![0.0; n]));
        for (i, us) in busy_us.iter().enumerate() {
            let s = f64::from(*us) / 1e6;
            c.stage_busy_seconds[i] += s;
            busy[i] += s;
        }
        let elapsed = start.elapsed();
        if elapsed >= WINDOW {
            c.stage_busy_fraction = busy
                .iter()
                .map(|b| (b / elapsed.as_secs_f64()).min(1.0))
                .collect();
            self.window = None;
        }
    }
}
