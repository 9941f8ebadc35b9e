//! Making the next pipeline step from the running requests.

use protocol::data::{Frame, Group, Payload};

use super::{Sent, State, PREFILL_ROWS};

impl State {
    /// The next step: sequences with work that are not in the pipeline yet, decoding ones
    /// first, then prompt chunks (oldest request first), at most a share of the running
    /// sequences so that the micro-batches stay even.
    pub(super) fn next_step(&mut self, micro_batches: usize) -> Option<Frame> {
        let running = self.running();
        let per_step = running.div_ceil(micro_batches).max(1);
        let mut ready: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                self.slots[i]
                    .running
                    .as_ref()
                    .is_some_and(|r| !r.in_flight && r.fed < r.tokens.len())
            })
            .collect();
        if ready.is_empty() {
            return None;
        }
        ready.sort_by_key(|&i| {
            let r = self.slots[i].running.as_ref().expect("filtered");
            (r.tokens.len() - r.fed > 1, r.serial)
        });
        let mut prompt_rows = PREFILL_ROWS;
        let mut groups = Vec::new();
        let mut tokens = Vec::new();
        let mut sent = Vec::new();
        for seq in ready.into_iter().take(per_step) {
            let r = self.slots[seq].running.as_mut().expect("filtered");
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
                sampling: r.job.req.sampling,
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
        Some(Frame::Step {
            step,
            in_flight: self.steps.len() as u32,
            busy_us: Vec::new(),
            groups,
            payload: Payload::Tokens(tokens),
        })
    }
}
