//! The signed steps this stage received on chain lanes, kept a while so that the coordinator
//! can check a served request: it recalls them (`Recall` on a probe lane) and, with the
//! previous stage's signature on each, knows exactly what that stage sent
//! ([`protocol::data::seal`]).

use std::collections::VecDeque;

/// Signed steps, oldest first, at most `limit` bytes of them.
pub(super) struct Records {
    kept: VecDeque<Kept>,
    bytes: usize,
    limit: usize,
}

struct Kept {
    lane: String,
    step: u64,
    /// The sequences the step carries.
    seqs: Vec<u32>,
    /// The `Signed` frame as received.
    frame: Vec<u8>,
}

impl Records {
    pub(super) fn new(limit: usize) -> Records {
        Records {
            kept: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    /// Keep a signed step of `lane`, dropping the oldest beyond the limit.
    pub(super) fn keep(&mut self, lane: &str, step: u64, seqs: Vec<u32>, frame: Vec<u8>) {
        self.bytes += frame.len();
        self.kept.push_back(Kept {
            lane: lane.to_owned(),
            step,
            seqs,
            frame,
        });
        while self.bytes > self.limit {
            let Some(old) = self.kept.pop_front() else {
                break;
            };
            self.bytes -= old.frame.len();
        }
    }

    /// The kept steps of `lane` numbered `first..=last` that carry sequence `seq`, in order:
    /// the first of them, and then as many more as fit in `max_bytes` in all (the caller asks
    /// again for the rest), at most [`protocol::data::MAX_RECALLED`].
    pub(super) fn recall(
        &self,
        lane: &str,
        seq: u32,
        (first, last): (u64, u64),
        max_bytes: usize,
    ) -> Vec<Vec<u8>> {
        let mut bytes = 0;
        self.kept
            .iter()
            .filter(|k| k.lane == lane && (first..=last).contains(&k.step) && k.seqs.contains(&seq))
            .take(protocol::data::MAX_RECALLED)
            .take_while(|k| {
                let none_yet = bytes == 0;
                bytes += k.frame.len();
                none_yet || bytes <= max_bytes
            })
            .map(|k| k.frame.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_recalled_by_lane_range_and_sequence_and_the_oldest_go_first() {
        let mut r = Records::new(10);
        r.keep("a", 1, vec![0, 1], vec![1; 4]);
        r.keep("b", 2, vec![0], vec![2; 4]);
        r.keep("a", 3, vec![1], vec![3; 2]);
        let all = usize::MAX;
        assert_eq!(r.recall("a", 1, (1, 3), all), vec![vec![1; 4], vec![3; 2]]);
        assert_eq!(r.recall("a", 0, (2, 3), all), Vec::<Vec<u8>>::new());
        assert_eq!(r.recall("b", 0, (0, 9), all), vec![vec![2; 4]]);
        // 4 more bytes: over 10, the oldest (step 1) goes.
        r.keep("a", 4, vec![1], vec![4; 4]);
        assert_eq!(r.recall("a", 1, (0, 9), all), vec![vec![3; 2], vec![4; 4]]);
        assert_eq!(r.bytes, 10);
    }

    /// An answer holds what fits in the budget, and always the first step (however big), so
    /// that asking again from the next step gets the rest.
    #[test]
    fn a_recall_stops_at_its_byte_budget_after_the_first_step() {
        let mut r = Records::new(100);
        r.keep("a", 1, vec![0], vec![1; 8]);
        r.keep("a", 2, vec![0], vec![2; 3]);
        r.keep("a", 3, vec![0], vec![3; 3]);
        assert_eq!(r.recall("a", 0, (1, 3), 4), vec![vec![1; 8]]);
        assert_eq!(r.recall("a", 0, (2, 3), 4), vec![vec![2; 3]]);
        assert_eq!(r.recall("a", 0, (2, 3), 6), vec![vec![2; 3], vec![3; 3]]);
    }
}
