//! Which finished requests are checked, and what the checks found so far.

use std::sync::{Arc, Mutex};

use protocol::status::{Dispute, Verify};
use tokio::sync::mpsc;

/// Requests waiting to be checked; more are not checked (counted as skipped).
const QUEUE: usize = 4;

/// The honest errors kept for the percentiles in `/status` (the most recent).
const KEPT_ERRORS: usize = 1000;

/// Picks the requests to check: every 1/fraction-th one, counted, so that a fraction of 1
/// checks each request and 0.01 every hundredth.
pub struct Sampler {
    fraction: f64,
    credit: f64,
    jobs: mpsc::Sender<Vec<i32>>,
    stats: Arc<Mutex<VerifyStats>>,
}

impl Sampler {
    /// Offer a finished request's tokens (prompt and completion, as the stages computed them).
    pub fn offer(&mut self, tokens: &[i32]) {
        self.credit += self.fraction;
        if self.credit < 1.0 || tokens.is_empty() {
            return;
        }
        self.credit -= 1.0;
        if self.jobs.try_send(tokens.to_vec()).is_err() {
            self.stats.lock().unwrap().shown.skipped += 1;
        }
    }
}

/// What the checks found (`/status` `verify`), and the honest errors behind its percentiles.
#[derive(Debug, Default)]
pub struct VerifyStats {
    pub shown: Verify,
    honest: Vec<f32>,
}

impl VerifyStats {
    /// Two holders agreed with this relative error: honest rounding.
    pub fn honest(&mut self, e: f32) {
        if self.honest.len() == KEPT_ERRORS {
            self.honest.remove(0);
        }
        self.honest.push(e);
        let mut sorted = self.honest.clone();
        sorted.sort_by(f32::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        let shown = &mut self.shown;
        shown.honest_error_p50 = at(0.5);
        shown.honest_error_p99 = at(0.99);
        shown.honest_error_max = shown.honest_error_max.max(e);
    }

    /// Holders that disagreed with nobody to tell which is right (the first 100 are kept).
    pub fn dispute(&mut self, shard_id: u32, nodes: Vec<String>, error: f32) {
        if self.shown.disputes.len() < 100 {
            self.shown.disputes.push(Dispute {
                shard_id,
                nodes,
                error,
            });
        }
    }
}

/// The requests the sampler picked, for the checker ([`crate::checker`]), and what it needs
/// to check them.
pub struct Checks {
    pub incoming: mpsc::Receiver<Vec<i32>>,
    pub tolerance: f32,
    pub stats: Arc<Mutex<VerifyStats>>,
    /// Where the shards the coordinator computes itself are kept.
    pub cache_dir: std::path::PathBuf,
}

/// The sampler the engine offers finished requests to and the checks it hands over (neither
/// when the fraction is 0), and their statistics.
pub fn new(
    fraction: f64,
    tolerance: f32,
    cache_dir: std::path::PathBuf,
) -> (Option<(Sampler, Checks)>, Arc<Mutex<VerifyStats>>) {
    let stats = Arc::new(Mutex::new(VerifyStats {
        shown: Verify {
            fraction,
            tolerance,
            ..Verify::default()
        },
        honest: Vec::new(),
    }));
    if fraction <= 0.0 {
        return (None, stats);
    }
    let (jobs, incoming) = mpsc::channel::<Vec<i32>>(QUEUE);
    let sampler = Sampler {
        fraction,
        credit: 0.0,
        jobs,
        stats: stats.clone(),
    };
    let checks = Checks {
        incoming,
        tolerance,
        stats: stats.clone(),
        cache_dir,
    };
    (Some((sampler, checks)), stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fraction_picks_every_nth_request_and_a_full_queue_counts_as_skipped() {
        let (picked, stats) = new(0.5, 0.01, std::env::temp_dir());
        let (mut sampler, mut checker) = picked.unwrap();
        for i in 0..12 {
            sampler.offer(&[i]);
        }
        // Every second request, 6 in all: 4 fit the queue, 2 are skipped.
        let mut got = Vec::new();
        while let Ok(tokens) = checker.incoming.try_recv() {
            got.push(tokens[0]);
        }
        assert_eq!(got, vec![1, 3, 5, 7]);
        assert_eq!(stats.lock().unwrap().shown.skipped, 2);
        assert!(new(0.0, 0.01, std::env::temp_dir()).0.is_none());
    }

    #[test]
    fn the_honest_percentiles_follow_the_errors_seen() {
        let mut s = VerifyStats::default();
        for e in [0.003, 0.001, 0.002] {
            s.honest(e);
        }
        assert_eq!(s.shown.honest_error_p50, 0.002);
        assert_eq!(s.shown.honest_error_max, 0.003);
    }
}
