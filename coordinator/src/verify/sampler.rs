//! Which finished requests are checked, and what the checks found so far.

use std::sync::{Arc, Mutex};

use protocol::data::Sampling;
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
    jobs: mpsc::Sender<Served>,
    stats: Arc<Mutex<VerifyStats>>,
}

/// A served request, as the checks need it.
#[derive(Debug, Clone)]
pub struct Served {
    /// The prompt and the fed-back completion tokens: what the stages computed.
    pub tokens: Vec<i32>,
    /// The last token the last stage sampled (never fed back).
    pub last_token: i32,
    pub prompt_len: usize,
    /// The first position this request computed (before it: a prefix cached on the stages).
    pub from_pos: usize,
    pub sampling: Sampling,
    /// Where it ran (none for a request that never got a step out).
    pub trace: Option<Trace>,
}

/// The lane a served request ran on: its id, the request's sequence there, its first and
/// last step numbers, and the route's nodes.
#[derive(Debug, Clone)]
pub struct Trace {
    pub lane: String,
    pub seq: u32,
    pub first: u64,
    pub last: u64,
    pub route: Vec<Hop>,
}

/// A stage of the route a request ran on.
#[derive(Debug, Clone, PartialEq)]
pub struct Hop {
    pub node_id: String,
    /// Its public key for signed steps.
    pub signer: Option<String>,
}

impl Sampler {
    /// Offer a finished request (made only if it is picked).
    pub fn offer(&mut self, served: impl FnOnce() -> Served) {
        self.credit += self.fraction;
        if self.credit < 1.0 {
            return;
        }
        self.credit -= 1.0;
        let served = served();
        if served.tokens.is_empty() {
            return;
        }
        if self.jobs.try_send(served).is_err() {
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
    pub incoming: mpsc::Receiver<Served>,
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
    let (jobs, incoming) = mpsc::channel::<Served>(QUEUE);
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
        let made = std::cell::Cell::new(0);
        for i in 0..12 {
            sampler.offer(|| {
                made.set(made.get() + 1);
                Served {
                    tokens: vec![i],
                    last_token: 0,
                    prompt_len: 1,
                    from_pos: 0,
                    sampling: Sampling {
                        temperature: 0.0,
                        top_p: 1.0,
                        seed: 0,
                    },
                    trace: None,
                }
            });
        }
        // Every second request, 6 in all (only those are made): 4 fit the queue, 2 are
        // skipped.
        assert_eq!(made.get(), 6);
        let mut got = Vec::new();
        while let Ok(served) = checker.incoming.try_recv() {
            got.push(served.tokens[0]);
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
