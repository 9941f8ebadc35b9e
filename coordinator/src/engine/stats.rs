//! What the engine reports in `/status`: requests, steps, tokens, and how busy each stage is.

use std::time::{Duration, Instant};

/// What `/status` shows of the serving.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ServingStats {
    /// Requests in a slot now.
    pub running: usize,
    /// Requests waiting for a slot.
    pub waiting: usize,
    pub steps: u64,
    pub generated_tokens: u64,
    /// Prompt tokens served from the cache, all requests together.
    pub cached_prompt_tokens: u64,
    /// Each stage's compute time since the coordinator started, stage 0 first.
    pub stage_busy_seconds: Vec<f64>,
    /// Each stage's busy share of the last few seconds of wall time.
    pub stage_busy_fraction: Vec<f64>,
    #[serde(skip)]
    window: Option<(Instant, Vec<f64>)>,
}

impl ServingStats {
    /// Count one step's compute times.
    pub(super) fn add_busy(&mut self, busy_us: &[u32]) {
        const WINDOW: Duration = Duration::from_secs(3);
        let n = busy_us.len();
        if self.stage_busy_seconds.len() != n {
            self.stage_busy_seconds = vec![0.0; n];
            self.stage_busy_fraction = vec![0.0; n];
            self.window = None;
        }
        let (start, busy) = self
            .window
            .get_or_insert_with(|| (Instant::now(), vec![0.0; n]));
        for (i, us) in busy_us.iter().enumerate() {
            let s = f64::from(*us) / 1e6;
            self.stage_busy_seconds[i] += s;
            busy[i] += s;
        }
        let elapsed = start.elapsed();
        if elapsed >= WINDOW {
            self.stage_busy_fraction = busy
                .iter()
                .map(|b| (b / elapsed.as_secs_f64()).min(1.0))
                .collect();
            self.window = None;
        }
    }
}
