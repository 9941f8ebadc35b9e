//! Choosing a stage's decode-thread policy by measuring it.
//!
//! Which [`DecodePolicy`] runs a stage fastest is a property of the machine as much as of the
//! model: on two VMs of one kind the same pipeline was fastest with pinned teams on one and
//! slowest with them on the other (`bench/NOTES.md`). So a node times a short run of decodes
//! of its own stage under each candidate and keeps the fastest.
//!
//! The run imitates serving one stream: one row per decode at growing positions, and between
//! decodes the stage idles as long as the rest of the route would take (`idle_factor` times
//! its own decode), so a team's threads go to sleep and wake as they do in the pipeline; a
//! loop of back-to-back decodes keeps them spinning and hides exactly the costs that differ
//! between policies. Rounds alternate the candidates in a rotating order so that the machine's
//! drift falls on all of them alike, and each policy's score is the
//! median of its rounds' mean decode times: robust to a round that something else disturbed,
//! yet charging a policy for its occasional slow decodes, which cost throughput as much as
//! steady ones. Decodes use the stage's last sequence (the coordinator's probe slot), which is
//! cleared before and after, so no state of the run is left behind.

use std::time::{Duration, Instant};

use crate::placement::DecodePolicy;
use crate::stage::{Row, Stage};
use crate::LlmError;

/// How to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The policies to choose from (at least one).
    pub candidates: Vec<DecodePolicy>,
    /// Whether the stage takes token ids (the first stage) rather than hidden states.
    pub takes_tokens: bool,
    /// A pinned team's first CPU: [`crate::placement::cpus_for`]'s offset for this stage.
    pub team_offset: usize,
    /// The idle time after each decode, as a multiple of that decode's own time: the route's
    /// other stages' share of a token (stages − 1 on a route of equal stages).
    pub idle_factor: f64,
    /// Stop starting rounds after this much time (at least `min_rounds` run).
    pub budget: Duration,
    pub min_rounds: usize,
    pub max_rounds: usize,
    /// Timed decodes per policy and round (after one untimed decode that settles the team).
    pub decodes_per_round: usize,
}

impl Plan {
    /// The plan a node uses: up to 7 rounds of 4 decodes per candidate within about 2 s (at
    /// least 3 rounds).
    pub fn new(candidates: Vec<DecodePolicy>, takes_tokens: bool, stages: u32, stage: u32) -> Plan {
        let threads = candidates.iter().map(|p| p.threads()).max().unwrap_or(1);
        Plan {
            candidates,
            takes_tokens,
            team_offset: (stage * threads) as usize,
            idle_factor: f64::from(stages.max(1) - 1),
            budget: Duration::from_secs(2),
            min_rounds: 3,
            max_rounds: 7,
            decodes_per_round: 4,
        }
    }
}

/// The longest idle time after a decode: long enough for every thread to fall asleep, short
/// enough that a big model's slow stage does not make calibration take minutes.
const MOST_IDLE: Duration = Duration::from_millis(20);

/// One candidate's measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub policy: DecodePolicy,
    /// The median over rounds of the round's mean time per decode.
    pub per_decode: Duration,
    /// Timed decodes in all.
    pub decodes: usize,
}

/// What was measured, and the choice.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// The fastest candidate.
    pub chosen: DecodePolicy,
    /// Every candidate's measurement, in the plan's order.
    pub trials: Vec<Trial>,
    pub rounds: usize,
    /// The CPUs the chosen policy's team runs on (none for one thread).
    pub cpus: Vec<usize>,
}

/// Time `plan`'s candidates on `stage` and leave the stage under the fastest. Call it on the
/// thread that will decode (a team belongs to the thread that runs it).
pub fn calibrate(stage: &mut Stage, plan: &Plan) -> Result<Calibration, LlmError> {
    let n = plan.candidates.len();
    if n == 0 {
        return Err(LlmError::Decode("no decode policy to choose from".into()));
    }
    let seq = stage.sequences() as i32 - 1;
    let per_round = plan.decodes_per_round.max(1);
    let input = Synthetic::new(stage, plan.takes_tokens);
    let mut rounds: Vec<Vec<Duration>> = vec![Vec::new(); n];
    let started = Instant::now();
    // The context's first decodes allocate its graph: not part of any policy's time.
    stage.set_policy(plan.candidates[0], plan.team_offset)?;
    stage.truncate_sequence(seq, 0)?;
    for pos in 0..2 {
        input.decode(stage, seq, pos)?;
    }
    let mut done = 0;
    while done < plan.max_rounds.max(1)
        && (done < plan.min_rounds.max(1) || started.elapsed() < plan.budget)
    {
        for k in 0..n {
            let i = (done + k) % n;
            stage.set_policy(plan.candidates[i], plan.team_offset)?;
            stage.truncate_sequence(seq, 0)?;
            input.decode(stage, seq, 0)?; // settles the team on its CPUs
            let mut spent = Duration::ZERO;
            for pos in 1..=per_round as i32 {
                let t = Instant::now();
                input.decode(stage, seq, pos)?;
                let took = t.elapsed();
                spent += took;
                std::thread::sleep(took.mul_f64(plan.idle_factor).min(MOST_IDLE));
            }
            rounds[i].push(spent / per_round as u32);
        }
        done += 1;
    }
    stage.truncate_sequence(seq, 0)?;
    let trials: Vec<Trial> = plan
        .candidates
        .iter()
        .zip(rounds)
        .map(|(&policy, mut means)| {
            means.sort_unstable();
            Trial {
                policy,
                per_decode: means[means.len() / 2],
                decodes: means.len() * per_round,
            }
        })
        .collect();
    let chosen = fastest(&trials);
    let cpus = stage.set_policy(chosen, plan.team_offset)?;
    Ok(Calibration {
        chosen,
        trials,
        rounds: done,
        cpus,
    })
}

/// The policy with the shortest time per decode (the first of equals).
fn fastest(trials: &[Trial]) -> DecodePolicy {
    trials
        .iter()
        .min_by_key(|t| t.per_decode)
        .map_or(DecodePolicy::One, |t| t.policy)
}

/// Made-up input of the stage's shape: its cost is that of real input (quantised matmuls do
/// not care about the values), and what it computes is thrown away.
struct Synthetic {
    n_embd: usize,
    n_vocab: usize,
    takes_tokens: bool,
}

impl Synthetic {
    fn new(stage: &Stage, takes_tokens: bool) -> Synthetic {
        Synthetic {
            n_embd: stage.n_embd(),
            n_vocab: stage.n_vocab().max(1),
            takes_tokens,
        }
    }

    fn decode(&self, stage: &mut Stage, seq: i32, pos: i32) -> Result<(), LlmError> {
        let rows = [Row { seq, pos }];
        if self.takes_tokens {
            // Ordinary ids past the special ones at the start, within even a tiny vocabulary.
            let id = (100 + pos as usize % 100) % self.n_vocab;
            stage.forward_token_rows(&[id as i32], &rows)?;
        } else {
            // Hidden states of a realistic size: values of order one, varying along the row.
            let hidden: Vec<f32> = (0..self.n_embd)
                .map(|i| (i as f32 * 0.37 + pos as f32).sin())
                .collect();
            stage.forward_hidden_rows(&hidden, &rows)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(policy: DecodePolicy, us: u64) -> Trial {
        Trial {
            policy,
            per_decode: Duration::from_micros(us),
            decodes: 4,
        }
    }

    #[test]
    fn the_fastest_policy_wins_and_ties_go_to_the_first() {
        let one = DecodePolicy::One;
        let team = DecodePolicy::Team { threads: 2 };
        let pinned = DecodePolicy::Pinned { threads: 2 };
        assert_eq!(
            fastest(&[trial(one, 3000), trial(pinned, 7000), trial(team, 2500)]),
            team
        );
        assert_eq!(fastest(&[trial(one, 3000), trial(team, 3000)]), one);
        assert_eq!(fastest(&[]), one);
    }

    #[test]
    fn a_plan_idles_for_the_rest_of_the_route_and_offsets_pinned_teams_by_stage() {
        let plan = Plan::new(
            vec![DecodePolicy::One, DecodePolicy::Pinned { threads: 2 }],
            false,
            4,
            3,
        );
        assert_eq!(plan.idle_factor, 3.0);
        assert_eq!(plan.team_offset, 6);
        assert_eq!(
            Plan::new(vec![DecodePolicy::One], true, 1, 0).idle_factor,
            0.0
        );
    }
}
