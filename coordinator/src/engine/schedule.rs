//! The engine's decisions, free of IO (as [`crate::swarm`] is for the swarm rules): which
//! slot a request takes (the prompt cache), what the next pipeline step carries (decodes
//! first, then prompt chunks), what an answer delivers (and which answers are stale), and what
//! a failure does to each running request. The engine task does the IO around it, and these
//! rules are unit-tested here without a pipeline.

use std::collections::{HashMap, VecDeque};

use protocol::data::{Group, Sampling};

/// The bounds of the schedule.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most prompt rows one step carries: a long prompt goes in over several steps while
    /// the running sequences get their next token in each.
    pub prefill_rows: usize,
    /// How many times a request is started (the first time included) before a failure
    /// fails it.
    pub max_attempts: u32,
}

/// Slots, waiting requests and the steps in the pipeline; `J` is what the engine keeps for
/// each request (its client, its text).
pub struct Scheduler<J> {
    slots: Vec<Slot<J>>,
    waiting: VecDeque<Pending<J>>,
    /// The steps in the pipeline, by step number: the groups each carries.
    steps: HashMap<u64, Vec<Sent>>,
    next_step: u64,
    next_serial: u64,
    /// Counts releases: a slot's `last_used` (least recently used is reused first).
    clock: u64,
    limits: Limits,
}

/// A request waiting for a slot.
struct Pending<J> {
    prompt: Vec<i32>,
    sampling: Sampling,
    job: J,
}

/// One of the stages' sequences.
struct Slot<J> {
    running: Option<Running<J>>,
    /// What the stages hold for this sequence once it is free (the prompt cache).
    cached: Vec<i32>,
    last_used: u64,
}

/// A request in a slot.
pub struct Running<J> {
    /// Tells this request's answers from those of an earlier holder of the slot.
    serial: u64,
    pub job: J,
    prompt_len: usize,
    sampling: Sampling,
    /// The prompt, then each generated token as it is fed back.
    tokens: Vec<i32>,
    /// `tokens[..fed]` are in the stages' KV cache or on their way there.
    fed: usize,
    in_flight: bool,
    /// Prompt tokens the stages already held when this attempt began.
    cached_tokens: usize,
    attempts: u32,
}

impl<J> Running<J> {
    /// Prompt tokens whose KV the stages held from an earlier request.
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    /// What the stages have computed for this sequence: the prompt and the fed-back tokens.
    pub fn computed(&self) -> &[i32] {
        &self.tokens[..self.fed]
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    pub fn sampling(&self) -> Sampling {
        self.sampling
    }
}

/// A group of a step still in the pipeline.
struct Sent {
    seq: usize,
    serial: u64,
    sample: bool,
}

/// The next step to send down the pipeline.
#[derive(Debug, PartialEq)]
pub struct Step {
    pub step: u64,
    /// Steps in the pipeline with this one.
    pub in_flight: u32,
    pub groups: Vec<Group>,
    /// The groups' input rows, in group order.
    pub tokens: Vec<i32>,
}

/// A token the last stage sampled for a running request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampled {
    pub seq: usize,
    pub token: i32,
}

/// An answer that cannot belong to what was sent: the lane is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("an answer to step {0}, which is not in the pipeline")]
    UnknownStep(u64),
    #[error("step {step} came back without sequence {seq}'s token")]
    MissingToken { step: u64, seq: usize },
}

impl<J> Scheduler<J> {
    /// `parallel` slots (at least one).
    pub fn new(parallel: usize, limits: Limits) -> Scheduler<J> {
        Scheduler {
            slots: (0..parallel.max(1))
                .map(|_| Slot {
                    running: None,
                    cached: Vec::new(),
                    last_used: 0,
                })
                .collect(),
            waiting: VecDeque::new(),
            steps: HashMap::new(),
            next_step: 1,
            next_serial: 1,
            clock: 0,
            limits,
        }
    }

    /// A new request waits for a slot (first come, first served).
    pub fn enqueue(&mut self, prompt: Vec<i32>, sampling: Sampling, job: J) {
        self.waiting.push_back(Pending {
            prompt,
            sampling,
            job,
        });
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.running.is_some()).count()
    }

    /// Steps in the pipeline.
    pub fn in_flight(&self) -> usize {
        self.steps.len()
    }

    /// Keep the waiting requests `keep` says yes to (it may tell a dropped one's client why).
    pub fn retain_waiting(&mut self, mut keep: impl FnMut(&J) -> bool) {
        self.waiting.retain(|p| keep(&p.job));
    }

    /// The running requests, by slot.
    pub fn running_jobs(&self) -> impl Iterator<Item = (usize, &J)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(seq, s)| s.running.as_ref().map(|r| (seq, &r.job)))
    }

    /// The request running in slot `seq`.
    pub fn running_mut(&mut self, seq: usize) -> Option<&mut Running<J>> {
        self.slots.get_mut(seq)?.running.as_mut()
    }

    /// Give free slots to waiting requests, each to the slot whose cache shares the longest
    /// prefix with its prompt (else the least recently used, else the lowest); the prompt's
    /// last token is always sent, since its row gives the logits. Returns the slots given.
    pub fn admit(&mut self) -> Vec<usize> {
        let mut admitted = Vec::new();
        while let Some(pending) = self.waiting.front() {
            let prompt = &pending.prompt;
            let best = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.running.is_none())
                .map(|(i, s)| {
                    let shared = s
                        .cached
                        .iter()
                        .zip(prompt)
                        .take_while(|(a, b)| a == b)
                        .count()
                        .min(prompt.len().saturating_sub(1));
                    (i, shared, s.last_used)
                })
                .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)).then(b.0.cmp(&a.0)));
            let Some((seq, shared, _)) = best else {
                break;
            };
            let Pending {
                prompt,
                sampling,
                job,
            } = self.waiting.pop_front().expect("front exists");
            let serial = self.next_serial;
            self.next_serial += 1;
            self.slots[seq].running = Some(Running {
                serial,
                job,
                prompt_len: prompt.len(),
                sampling,
                tokens: prompt,
                fed: shared,
                in_flight: false,
                cached_tokens: shared,
                attempts: 1,
            });
            admitted.push(seq);
        }
        admitted
    }

    /// The next step: sequences with work that are not in the pipeline yet, decoding ones
    /// first, then prompt chunks (oldest request first, at most `prefill_rows` prompt rows
    /// in all), at most a `micro_batches`-th share of the running sequences, so that the
    /// micro-batches stay even. `None` when nothing is ready.
    pub fn next_step(&mut self, micro_batches: usize) -> Option<Step> {
        let per_step = self.running().div_ceil(micro_batches.max(1)).max(1);
        let mut ready: Vec<(bool, u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(seq, s)| {
                let r = s.running.as_ref()?;
                (!r.in_flight && r.fed < r.tokens.len())
                    .then(|| (r.tokens.len() - r.fed > 1, r.serial, seq))
            })
            .collect();
        ready.sort_unstable();
        let mut prompt_rows = self.limits.prefill_rows;
        let (mut groups, mut tokens, mut sent) = (Vec::new(), Vec::new(), Vec::new());
        for (_, _, seq) in ready.into_iter().take(per_step) {
            let r = self.slots[seq].running.as_mut().expect("ready");
            let left = r.tokens.len() - r.fed;
            let rows = if left == 1 { 1 } else { left.min(prompt_rows) };
            if rows == 0 {
                continue;
            }
            if left > 1 {
                prompt_rows -= rows;
            }
            let sample = r.fed + rows == r.tokens.len();
            groups.push(Group {
                seq: seq as u32,
                pos0: r.fed as u32,
                rows: rows as u32,
                sample,
                sampling: r.sampling,
            });
            tokens.extend_from_slice(&r.tokens[r.fed..r.fed + rows]);
            r.fed += rows;
            r.in_flight = true;
            sent.push(Sent {
                seq,
                serial: r.serial,
                sample,
            });
        }
        if groups.is_empty() {
            return None;
        }
        let step = self.next_step;
        self.next_step += 1;
        self.steps.insert(step, sent);
        Some(Step {
            step,
            in_flight: self.steps.len() as u32,
            groups,
            tokens,
        })
    }

    /// Step `step` came back with these sampled tokens (`(seq, token)`): the tokens of the
    /// requests still running in the slots they were sent from. Groups whose request left
    /// (or whose slot now holds another request) are stale and dropped.
    pub fn answered(
        &mut self,
        step: u64,
        sampled: &[(u32, i32)],
    ) -> Result<Vec<Sampled>, AnswerError> {
        let sent = self
            .steps
            .remove(&step)
            .ok_or(AnswerError::UnknownStep(step))?;
        let mut delivered = Vec::new();
        for s in sent {
            let Some(r) = self.slots[s.seq].running.as_mut() else {
                continue;
            };
            if r.serial != s.serial {
                continue;
            }
            r.in_flight = false;
            if !s.sample {
                continue;
            }
            let Some(&(_, token)) = sampled.iter().find(|(seq, _)| *seq as usize == s.seq) else {
                return Err(AnswerError::MissingToken { step, seq: s.seq });
            };
            delivered.push(Sampled { seq: s.seq, token });
        }
        Ok(delivered)
    }

    /// Feed `token` back as the next input of the request in slot `seq`.
    pub fn feed(&mut self, seq: usize, token: i32) {
        if let Some(r) = self.running_mut(seq) {
            r.tokens.push(token);
        }
    }

    /// Free a slot (its request finished or left), keeping what its sequence holds on the
    /// stages as the prompt cache. Returns the request.
    pub fn release(&mut self, seq: usize) -> Option<J> {
        self.clock += 1;
        let slot = self.slots.get_mut(seq)?;
        let mut r = slot.running.take()?;
        r.tokens.truncate(r.fed);
        slot.cached = r.tokens;
        slot.last_used = self.clock;
        Some(r.job)
    }

    /// The pipeline failed: forget the steps in it and everything cached on the stages, and
    /// put each running request back at its prompt for another attempt. Returns the requests
    /// that have had their attempts (taken out of their slots).
    pub fn reset(&mut self) -> Vec<J> {
        self.steps.clear();
        let mut failed = Vec::new();
        for slot in &mut self.slots {
            slot.cached.clear();
            let Some(r) = slot.running.as_mut() else {
                continue;
            };
            r.attempts += 1;
            if r.attempts > self.limits.max_attempts {
                failed.extend(slot.running.take().map(|r| r.job));
                continue;
            }
            r.tokens.truncate(r.prompt_len);
            r.fed = 0;
            r.in_flight = false;
            r.cached_tokens = 0;
        }
        failed
    }

    /// Take every running request out of its slot (they all fail).
    pub fn take_running(&mut self) -> Vec<J> {
        self.slots
            .iter_mut()
            .filter_map(|s| s.running.take().map(|r| r.job))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        prefill_rows: 4,
        max_attempts: 3,
    };

    fn greedy() -> Sampling {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// A scheduler with `parallel` slots and these prompts waiting, jobs named by index.
    fn with(parallel: usize, prompts: &[&[i32]]) -> Scheduler<usize> {
        let mut s = Scheduler::new(parallel, LIMITS);
        for (i, p) in prompts.iter().enumerate() {
            s.enqueue(p.to_vec(), greedy(), i);
        }
        s
    }

    /// Send steps and answer each with `token` for every sampled group, until request `job`
    /// has its prompt in (returns the tokens delivered on the way).
    fn run_step(s: &mut Scheduler<usize>, token: i32) -> Vec<Sampled> {
        let step = s.next_step(1).expect("a step");
        let sampled: Vec<(u32, i32)> = step
            .groups
            .iter()
            .filter(|g| g.sample)
            .map(|g| (g.seq, token))
            .collect();
        s.answered(step.step, &sampled).expect("a known step")
    }

    #[test]
    fn a_request_takes_the_slot_sharing_the_longest_prefix_else_the_least_recently_used() {
        let mut s = with(3, &[&[1, 2, 3], &[7, 8], &[9]]);
        assert_eq!(s.admit(), vec![0, 1, 2]);
        // Slot 1 is freed first, then 0, then 2: 1 is the least recently used.
        run_step(&mut s, 50);
        for seq in [1, 0, 2] {
            s.release(seq);
        }
        s.enqueue(vec![1, 2, 3, 4], greedy(), 3); // slot 0 holds [1, 2, 3]
        s.enqueue(vec![5, 6], greedy(), 4); // shares nothing: least recently used, slot 1
        assert_eq!(s.admit(), vec![0, 1]);
        let r = s.running_mut(0).unwrap();
        assert_eq!(
            (r.job, r.cached_tokens(), r.computed()),
            (3, 3, &[1, 2, 3][..])
        );
        assert_eq!(s.running_mut(1).unwrap().cached_tokens(), 0);
        // The step sends only what the stages do not hold, from the shared position on.
        let step = s.next_step(1).unwrap();
        let slot0 = step.groups.iter().find(|g| g.seq == 0).unwrap();
        assert_eq!((slot0.pos0, slot0.rows), (3, 1));
    }

    #[test]
    fn an_identical_prompt_still_sends_its_last_token_for_the_logits() {
        let mut s = with(1, &[&[1, 2, 3]]);
        s.admit();
        run_step(&mut s, 9);
        s.release(0);
        s.enqueue(vec![1, 2, 3], greedy(), 1);
        s.admit();
        assert_eq!(s.running_mut(0).unwrap().cached_tokens(), 2);
        let step = s.next_step(1).unwrap();
        assert_eq!((step.groups[0].pos0, step.tokens), (2, vec![3]));
    }

    #[test]
    fn requests_wait_in_order_while_every_slot_is_taken() {
        let mut s = with(1, &[&[1], &[2], &[3]]);
        assert_eq!(s.admit(), vec![0]);
        assert_eq!((s.running(), s.waiting()), (1, 2));
        run_step(&mut s, 5);
        s.release(0);
        s.admit();
        assert_eq!(s.running_mut(0).unwrap().job, 1);
    }

    #[test]
    fn long_prompts_go_in_by_chunks_while_decodes_go_first() {
        // Request 0 decodes; request 1's 10-token prompt goes in 4 rows a step.
        let mut s = with(2, &[&[1], &[10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]);
        s.admit();
        let first = s.next_step(1).unwrap();
        assert_eq!(first.groups.len(), 2);
        assert_eq!((first.groups[0].seq, first.groups[0].rows), (0, 1));
        assert_eq!((first.groups[1].seq, first.groups[1].rows), (1, 4));
        assert!(
            !first.groups[1].sample,
            "a prompt chunk before the last samples nothing"
        );
        assert_eq!(first.tokens, vec![1, 10, 11, 12, 13]);
        let got = s.answered(first.step, &[(0, 100)]).unwrap();
        assert_eq!(got, vec![Sampled { seq: 0, token: 100 }]);
        s.feed(0, 100);
        let second = s.next_step(1).unwrap();
        assert_eq!(
            second.groups[0].seq, 0,
            "the decode goes before the prompt chunk"
        );
        assert_eq!((second.groups[1].pos0, second.groups[1].rows), (4, 4));
        s.answered(second.step, &[(0, 101)]).unwrap();
        s.feed(0, 101);
        let third = s.next_step(1).unwrap();
        let chunk = &third.groups[1];
        assert_eq!((chunk.pos0, chunk.rows, chunk.sample), (8, 2, true));
    }

    #[test]
    fn the_prefill_budget_is_shared_by_the_prompts_of_one_step() {
        let mut s = with(2, &[&[1, 2, 3], &[4, 5, 6]]);
        s.admit();
        let step = s.next_step(1).unwrap();
        let rows: Vec<u32> = step.groups.iter().map(|g| g.rows).collect();
        assert_eq!(rows, vec![3, 1], "4 prompt rows a step in all");
    }

    #[test]
    fn micro_batches_split_the_running_sequences_evenly() {
        let mut s = with(4, &[&[1], &[2], &[3], &[4]]);
        s.admit();
        let a = s.next_step(2).unwrap();
        let b = s.next_step(2).unwrap();
        assert_eq!((a.groups.len(), b.groups.len()), (2, 2));
        assert_eq!((a.in_flight, b.in_flight), (1, 2));
        assert!(
            s.next_step(2).is_none(),
            "every sequence is in the pipeline"
        );
        assert_eq!(s.in_flight(), 2);
    }

    #[test]
    fn answers_to_unknown_steps_and_missing_tokens_break_the_lane() {
        let mut s = with(1, &[&[1]]);
        s.admit();
        let step = s.next_step(1).unwrap();
        assert_eq!(s.answered(99, &[]), Err(AnswerError::UnknownStep(99)));
        assert_eq!(
            s.answered(step.step, &[(5, 1)]),
            Err(AnswerError::MissingToken {
                step: step.step,
                seq: 0
            })
        );
        assert_eq!(
            s.answered(step.step, &[(0, 1)]),
            Err(AnswerError::UnknownStep(step.step)),
            "a step is answered once"
        );
    }

    #[test]
    fn an_answer_for_a_request_that_left_is_dropped_not_given_to_the_next() {
        let mut s = with(1, &[&[1]]);
        s.admit();
        let step = s.next_step(1).unwrap();
        assert_eq!(s.release(0), Some(0)); // the client went away
        s.enqueue(vec![2], greedy(), 1);
        s.admit();
        assert_eq!(s.answered(step.step, &[(0, 42)]), Ok(vec![]));
        // The new request's own step is still to be sent.
        let next = s.next_step(1).unwrap();
        assert_eq!(next.tokens, vec![2]);
    }

    #[test]
    fn a_failure_starts_requests_again_from_their_prompts_until_their_attempts_run_out() {
        let mut s = with(2, &[&[1, 2], &[3]]);
        s.admit();
        run_step(&mut s, 7);
        s.feed(0, 7);
        s.feed(1, 7);
        assert!(s.reset().is_empty());
        assert_eq!(s.in_flight(), 0);
        let r = s.running_mut(0).unwrap();
        assert_eq!((r.computed(), r.cached_tokens()), (&[][..], 0));
        let step = s.next_step(1).unwrap();
        assert_eq!(
            step.tokens,
            vec![3, 1, 2],
            "each prompt from its start, nothing generated"
        );
        assert!(s.reset().is_empty(), "attempt 3 of 3");
        assert_eq!(s.reset(), vec![0, 1], "a fourth attempt is not made");
        assert_eq!(s.running(), 0);
        // The cache was cleared: the stages forgot everything.
        s.enqueue(vec![1, 2], greedy(), 2);
        s.admit();
        assert_eq!(s.running_mut(0).unwrap().cached_tokens(), 0);
    }

    #[test]
    fn a_released_slot_caches_only_what_the_stages_computed() {
        let mut s = with(1, &[&[1, 2]]);
        s.admit();
        run_step(&mut s, 3);
        s.feed(0, 3); // fed back but never sent: not on the stages
        s.release(0);
        s.enqueue(vec![1, 2, 3, 4], greedy(), 1);
        s.admit();
        assert_eq!(s.running_mut(0).unwrap().cached_tokens(), 2);
    }
}
