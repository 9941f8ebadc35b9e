//! What a step asks of this stage, checked: its rows, its threads, and (in tests only) the
//! error a lying node adds to its output.

use llm::stage::{Row, RowsOutput, Stage};
use protocol::data::{Group, Payload};
use protocol::RouteParams;

use crate::{Error, Result};

/// The threads for a step: all of this node's when its stage works alone on the machine, else
/// a share. At most `in_flight` stages work at once (one step each), and of those at most
/// `co_located` on this machine; one thread each is the floor. Stages on machines of their own
/// (`co_located` 1) always take every thread. Cores are shared fairly only if the nodes on a
/// machine are given its cores (`--threads`) alike.
pub(super) fn threads_for(threads: i32, route: &RouteParams, in_flight: u32) -> i32 {
    let sharing = route.co_located.min(in_flight).max(1) as i32;
    (threads / sharing).max(1)
}

/// Test only (`--test-lie`): add an error of about `scale` times each output's RMS, as a node
/// that computes wrongly (or lies) would.
pub(super) fn corrupt(output: &mut RowsOutput, scale: f32) {
    let values: Vec<&mut [f32]> = match output {
        RowsOutput::Hidden(data) => vec![data.as_mut_slice()],
        RowsOutput::Logits(rows) => rows.iter_mut().map(|(_, l)| l.as_mut_slice()).collect(),
    };
    for v in values {
        let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len().max(1) as f32).sqrt();
        for (i, x) in v.iter_mut().enumerate() {
            *x += scale * rms * ((i as f32) * 0.7).sin();
        }
    }
}

/// The rows of a step, after checking that it fits this stage: each sequence once and among
/// those of its lane (the coordinator's on a pipeline lane, the last one on a probe lane),
/// positions within its context, tokens only into the first stage and hidden states of the
/// stage's width after it.
pub(super) fn rows_of(
    stage: &Stage,
    first: bool,
    probe: bool,
    groups: &[Group],
    payload: &Payload,
) -> Result<Vec<Row>> {
    let bad = |m: String| Err(Error::Pipeline(m));
    match payload {
        Payload::Tokens(_) if !first => return bad("token ids go to stage 0 only".into()),
        Payload::Hidden { .. } if first => return bad("stage 0 takes token ids".into()),
        Payload::Hidden { n_embd, .. } if *n_embd as usize != stage.n_embd() => {
            return bad(format!(
                "hidden states {n_embd} wide, but this stage's are {}",
                stage.n_embd()
            ))
        }
        _ => {}
    }
    let mut seen = vec![false; stage.sequences() as usize];
    let probe_seq = stage.sequences() - 1;
    let mut rows = Vec::with_capacity(payload.rows());
    for g in groups {
        if (g.seq == probe_seq) != probe {
            return bad(format!(
                "sequence {} is not for this lane (sequence {probe_seq} is for probes only)",
                g.seq
            ));
        }
        match seen.get_mut(g.seq as usize) {
            None => {
                return bad(format!(
                    "sequence {} is beyond this stage's {}",
                    g.seq,
                    stage.sequences()
                ))
            }
            Some(true) => return bad(format!("sequence {} twice in one step", g.seq)),
            Some(s) => *s = true,
        }
        let end = u64::from(g.pos0) + u64::from(g.rows);
        if g.rows == 0 || end > u64::from(stage.context()) {
            return bad(format!(
                "positions {}..{end} of sequence {} are outside its context of {}",
                g.pos0,
                g.seq,
                stage.context()
            ));
        }
        rows.extend((g.pos0..g.pos0 + g.rows).map(|pos| Row {
            seq: g.seq as i32,
            pos: pos as i32,
        }));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(co_located: u32) -> RouteParams {
        RouteParams {
            stage: 0,
            stage_count: 4,
            next: None,
            model_sha256: "m".into(),
            split_id: "s".into(),
            parallel: 8,
            co_located,
            key: "k".into(),
            next_key: None,
            probe_key: "p".into(),
        }
    }

    #[test]
    fn a_stage_alone_takes_every_thread_and_stages_at_work_together_share() {
        // Four stages on one 2-core machine: alone (one step in flight) 2 threads, else 1.
        assert_eq!(threads_for(2, &route(4), 1), 2);
        assert_eq!(threads_for(2, &route(4), 2), 1);
        assert_eq!(threads_for(2, &route(4), 4), 1);
        // Eight threads shared by the two stages that can work at once on this machine.
        assert_eq!(threads_for(8, &route(2), 4), 4);
        // A machine of its own: every thread, however many steps are in flight.
        assert_eq!(threads_for(8, &route(1), 4), 8);
        assert_eq!(threads_for(1, &route(4), 0), 1);
    }
}
