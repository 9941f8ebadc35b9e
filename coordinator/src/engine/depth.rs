//! How many micro-batches the pipeline keeps in flight (with `--micro-batches 0`).
//!
//! A step spends `compute` on the stages (the sum of their compute times, which each answer
//! carries) and `wire` on the way: the route's one-way hop delays, from the coordinator to
//! stage 0, stage to stage, and the answer back. Each machine of the route works on a step
//! for about `compute / machines`, so to keep every machine busy the pipeline needs
//! `machines × (wire + compute) / compute` steps in flight. On a LAN the wire is a small
//! fraction of a step and this is one micro-batch per machine (`bench/NOTES.md`); across a
//! WAN (tens of milliseconds a hop) it is more, up to one sequence per micro-batch, so that
//! many clients at once hide the delay (`bench/wan.py`).
//!
//! The wire comes from the edges' measured round trips (half each), not from the steps'
//! own timings: those include waiting behind other steps, which more steps in flight would
//! grow, and the estimate would feed itself.

use std::collections::VecDeque;
use std::time::Duration;

/// How many recent steps' compute times the estimate looks at.
const WINDOW: usize = 16;

/// The recent steps' compute times.
#[derive(Debug, Default)]
pub(super) struct Depth {
    compute_us: VecDeque<u64>,
}

impl Depth {
    /// A step was answered: the stages' compute times for it.
    pub(super) fn answered(&mut self, busy_us: &[u32]) {
        let total = busy_us.iter().map(|&b| u64::from(b)).sum::<u64>();
        if total == 0 {
            return;
        }
        if self.compute_us.len() == WINDOW {
            self.compute_us.pop_front();
        }
        self.compute_us.push_back(total);
    }

    /// Forget the measurements (a new route: other machines, other paths).
    pub(super) fn reset(&mut self) {
        self.compute_us.clear();
    }

    /// The micro-batches to keep in flight on a route over `machines` machines whose hops
    /// take `wire` one way in all, at most `cap` (the sequences that can run): one per
    /// machine until steps have been measured.
    pub(super) fn in_flight(&self, machines: usize, wire: Duration, cap: usize) -> usize {
        let machines = machines.max(1);
        let mut sorted: Vec<u64> = self.compute_us.iter().copied().collect();
        sorted.sort_unstable();
        let Some(&compute) = sorted.get(sorted.len() / 2) else {
            return machines;
        };
        let cycle = (wire.as_micros() as f64 + compute as f64) / compute as f64;
        let wanted = (machines as f64 * cycle).round() as usize;
        wanted.clamp(machines, cap.max(machines))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(compute_us: u64) -> Depth {
        let mut depth = Depth::default();
        for _ in 0..WINDOW {
            depth.answered(&[compute_us as u32 / 4; 4]);
        }
        depth
    }

    #[test]
    fn one_micro_batch_per_machine_until_steps_are_measured_and_on_a_lan() {
        let ms = Duration::from_millis;
        assert_eq!(Depth::default().in_flight(2, ms(100), 8), 2);
        // Loopback or a LAN: the wire is a sliver of a 20 ms step.
        assert_eq!(measured(20_000).in_flight(1, ms(0), 8), 1);
        assert_eq!(
            measured(20_000).in_flight(2, Duration::from_micros(1500), 8),
            2
        );
    }

    #[test]
    fn a_long_wire_keeps_more_steps_in_flight_up_to_the_sequences() {
        let ms = Duration::from_millis;
        // 40 ms of hops against 20 ms of compute: three steps' time a cycle, per machine.
        assert_eq!(measured(20_000).in_flight(2, ms(40), 8), 6);
        assert_eq!(measured(20_000).in_flight(1, ms(40), 8), 3);
        // Never more than the sequences that can run.
        assert_eq!(measured(10_000).in_flight(2, ms(100), 8), 8);
        // Never fewer than the machines (a cap below them is the old default).
        assert_eq!(measured(10_000).in_flight(4, ms(0), 2), 4);
    }

    #[test]
    fn the_median_step_counts_and_the_window_forgets() {
        let mut depth = measured(20_000);
        // One slow step (a long prompt) does not move the median.
        depth.answered(&[1_000_000]);
        assert_eq!(depth.in_flight(1, Duration::from_millis(40), 8), 3);
        // A full window of faster steps does.
        for _ in 0..WINDOW {
            depth.answered(&[10_000]);
        }
        assert_eq!(depth.in_flight(1, Duration::from_millis(40), 8), 5);
        depth.answered(&[]);
        depth.reset();
        assert_eq!(depth.in_flight(3, Duration::from_millis(40), 8), 3);
    }
}
