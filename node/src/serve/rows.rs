//! What a step asks of this stage, checked: its rows.

use llm::stage::{Row, Stage};
use protocol::data::{Group, Payload};

use crate::{Error, Result};

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
