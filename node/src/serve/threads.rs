//! How this node's stage uses threads: what the settings fix, what is measured when a stage
//! loads ([`llm::calibrate`]), and how many threads each step gets.

use std::time::{Duration, Instant};

use llm::calibrate::{calibrate, Calibration, Plan};
use llm::placement::{allowed_cpus, DecodePolicy};
use llm::stage::Stage;
use protocol::{DecodeThreads, RouteParams};

use crate::Result;

/// What the node's settings fix of its decode threads: `--threads` the team's size,
/// `--pin-threads` whether a team is pinned. Whatever they leave open is measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadSettings {
    pub threads: Option<u32>,
    pub pin: Option<bool>,
}

impl ThreadSettings {
    /// The policies to choose from on a machine where this process may run on `cores` CPUs:
    /// one thread (unless `--threads` sizes the team), a free team and a pinned one of
    /// `--threads` or every core (unless `--pin-threads` says which). A pinned team needs two
    /// cores to be anything but one thread.
    pub fn candidates(self, cores: usize) -> Vec<DecodePolicy> {
        let cores = cores.max(1) as u32;
        let team = self.threads.unwrap_or(cores);
        if team <= 1 {
            return vec![DecodePolicy::One];
        }
        let mut out = Vec::new();
        if self.threads.is_none() {
            out.push(DecodePolicy::One);
        }
        if self.pin != Some(true) {
            out.push(DecodePolicy::Team { threads: team });
        }
        if self.pin != Some(false) && cores > 1 {
            out.push(DecodePolicy::Pinned { threads: team });
        }
        if out.is_empty() {
            out.push(DecodePolicy::One);
        }
        out
    }
}

/// The threads for a step: all of the policy's when its stage works alone on the machine,
/// else a share. At most `in_flight` stages work at once (one step each), and of those at most
/// `co_located` on this machine; one thread each is the floor. Stages on machines of their own
/// (`co_located` 1) always take every thread. Cores are shared fairly only if the nodes on a
/// machine are given its cores (`--threads`) alike.
pub(super) fn threads_for(threads: i32, route: &RouteParams, in_flight: u32) -> i32 {
    let sharing = route.co_located.min(in_flight).max(1) as i32;
    (threads / sharing).max(1)
}

/// How long a node waits for its turn to measure before it measures anyway.
const TURN_WAIT: Duration = Duration::from_secs(60);

/// Put a freshly loaded `stage` of `route` under the policy `settings` give: the only
/// candidate, or the fastest measured (one thread if measuring fails). Runs on the decode
/// thread.
pub(super) fn choose(
    stage: &mut Stage,
    settings: ThreadSettings,
    route: &RouteParams,
) -> Result<DecodeThreads> {
    let candidates = settings.candidates(allowed_cpus().len());
    let plan = Plan::new(candidates, route.stage == 0, route.stage_count, route.stage);
    if let [only] = plan.candidates[..] {
        let cpus = stage.set_policy(only, plan.team_offset)?;
        return Ok(report(only, cpus, "flags", None));
    }
    let turn = machine_turn(TURN_WAIT);
    let measured = calibrate(stage, &plan);
    drop(turn);
    match measured {
        // calibrate left the stage under its choice.
        Ok(c) => Ok(report(c.chosen, c.cpus.clone(), "measured", Some(&c))),
        // Only speed is at stake: serve under one thread, which never waits for a team, and
        // say so. (A stage that cannot decode at all fails its first step with the reason.)
        Err(e) => {
            tracing::warn!("measuring decode-thread policies failed ({e}): one thread");
            let cpus = stage.set_policy(DecodePolicy::One, plan.team_offset)?;
            Ok(report(DecodePolicy::One, cpus, "default", None))
        }
    }
}

/// What `/status` and the metrics say of a choice, made `chosen_by` (`flags`, `measured` or
/// `default`; see [`DecodeThreads::chosen_by`]).
fn report(
    policy: DecodePolicy,
    cpus: Vec<usize>,
    chosen_by: &str,
    calibration: Option<&Calibration>,
) -> DecodeThreads {
    let measured_ms = calibration
        .map(|c| {
            c.trials
                .iter()
                .map(|t| (t.policy.name().to_owned(), t.per_decode.as_secs_f64() * 1e3))
                .collect()
        })
        .unwrap_or_default();
    DecodeThreads {
        policy: policy.name().to_owned(),
        threads: policy.threads(),
        cpus: match policy {
            DecodePolicy::Pinned { .. } => cpus,
            _ => Vec::new(),
        },
        chosen_by: chosen_by.to_owned(),
        measured_ms,
    }
}

/// One line for the log: the choice and what each candidate measured.
pub(super) fn describe(d: &DecodeThreads) -> String {
    let mut line = format!("decode threads: {} ({} thread(s)", d.policy, d.threads);
    if !d.cpus.is_empty() {
        line += &format!(" on CPUs {:?}", d.cpus);
    }
    line += ")";
    if d.chosen_by == "default" {
        line += ", since measuring failed";
    } else if d.measured_ms.is_empty() {
        line += ", as the settings fix it";
    } else {
        let each: Vec<String> = d
            .measured_ms
            .iter()
            .map(|(policy, ms)| format!("{policy} {ms:.2} ms"))
            .collect();
        line += &format!(", the fastest per decode of {}", each.join(", "));
    }
    line
}

/// The nodes on one machine measure one at a time: measured at once, they would measure each
/// other. The lock is an abstract Unix socket (one bind per name succeeds in a network
/// namespace, and the kernel lets go of it when the process ends, however it ends). None if
/// the turn did not come within `wait` (or sockets fail): then the node measures anyway.
fn machine_turn(wait: Duration) -> Option<std::os::unix::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let name = std::os::unix::net::SocketAddr::from_abstract_name(b"shardswarm-decode-calibration")
        .ok()?;
    let started = Instant::now();
    loop {
        match std::os::unix::net::UnixListener::bind_addr(&name) {
            Ok(lock) => return Some(lock),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && started.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!("measuring decode threads without waiting for other nodes: {e}");
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DecodePolicy::{One, Pinned, Team};

    fn settings(threads: Option<u32>, pin: Option<bool>) -> ThreadSettings {
        ThreadSettings { threads, pin }
    }

    #[test]
    fn settings_fix_what_they_name_and_leave_the_rest_to_measurement() {
        // Nothing given: one thread, a free team and a pinned team of every core.
        assert_eq!(
            settings(None, None).candidates(4),
            vec![One, Team { threads: 4 }, Pinned { threads: 4 }]
        );
        // --threads sizes the team: no one-thread candidate (unless it is 1).
        assert_eq!(
            settings(Some(2), None).candidates(4),
            vec![Team { threads: 2 }, Pinned { threads: 2 }]
        );
        assert_eq!(settings(Some(1), None).candidates(4), vec![One]);
        // --pin-threads says which team.
        assert_eq!(
            settings(None, Some(false)).candidates(2),
            vec![One, Team { threads: 2 }]
        );
        assert_eq!(
            settings(None, Some(true)).candidates(2),
            vec![One, Pinned { threads: 2 }]
        );
        // Both: nothing left to measure.
        assert_eq!(
            settings(Some(2), Some(true)).candidates(2),
            vec![Pinned { threads: 2 }]
        );
        // One core: one thread, whatever else is asked.
        assert_eq!(settings(None, None).candidates(1), vec![One]);
        assert_eq!(settings(None, Some(true)).candidates(1), vec![One]);
        // A pinned team on one core is one thread; a free one of 3 is what was asked.
        assert_eq!(
            settings(Some(3), None).candidates(1),
            vec![Team { threads: 3 }]
        );
    }

    #[test]
    fn a_stage_alone_takes_every_thread_and_stages_at_work_together_share() {
        let route = |co_located| RouteParams {
            stage: 0,
            stage_count: 4,
            next: None,
            model_sha256: String::new(),
            split_id: String::new(),
            parallel: 8,
            co_located,
            key: String::new(),
            next_key: None,
            probe_key: String::new(),
            previous_signer: None,
            next_node: None,
            next_mesh: None,
        };
        // Four stages on one 2-core machine: alone (one step in flight) 2 threads, else 1.
        assert_eq!(threads_for(2, &route(4), 1), 2);
        assert_eq!(threads_for(2, &route(4), 2), 1);
        assert_eq!(threads_for(2, &route(4), 4), 1);
        // Eight threads shared by the two stages that can work at once on this machine.
        assert_eq!(threads_for(8, &route(2), 4), 4);
        // A machine of its own: every thread, however many steps are in flight.
        assert_eq!(threads_for(8, &route(1), 4), 8);
    }

    #[test]
    fn the_report_names_the_choice_and_every_measurement() {
        let d = report(Pinned { threads: 2 }, vec![0, 1], "flags", None);
        assert_eq!(d.policy, "team-pinned");
        assert_eq!(d.cpus, vec![0, 1]);
        assert_eq!(d.chosen_by, "flags");
        assert!(describe(&d).contains("as the settings fix it"));
        let calibration = Calibration {
            chosen: One,
            trials: vec![
                llm::calibrate::Trial {
                    policy: One,
                    per_decode: Duration::from_micros(2500),
                    decodes: 12,
                },
                llm::calibrate::Trial {
                    policy: Pinned { threads: 2 },
                    per_decode: Duration::from_micros(7000),
                    decodes: 12,
                },
            ],
            rounds: 3,
            cpus: Vec::new(),
        };
        let d = report(One, Vec::new(), "measured", Some(&calibration));
        assert_eq!(d.chosen_by, "measured");
        assert_eq!(d.threads, 1);
        assert_eq!(d.measured_ms["one"], 2.5);
        assert_eq!(d.measured_ms["team-pinned"], 7.0);
        assert!(
            describe(&d).contains("one 2.50 ms, team-pinned 7.00 ms"),
            "{}",
            describe(&d)
        );
    }

    #[test]
    fn only_one_node_of_a_machine_measures_at_a_time() {
        let first = machine_turn(Duration::ZERO).expect("the first turn");
        // The second waits, and gives up after its wait without the lock.
        assert!(machine_turn(Duration::from_millis(120)).is_none());
        drop(first);
        assert!(machine_turn(Duration::ZERO).is_some());
    }
}
