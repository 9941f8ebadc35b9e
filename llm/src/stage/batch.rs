//! How a stage cuts a batch of rows into `llama_decode` calls that keep the rows' order
//! ([`plan_decodes`]; see `Stage::forward_rows` for why), and the input each call gets:
//! token ids or hidden states, gathered row by row.

use super::{Row, CHUNK_TOKENS};
use crate::LlmError;

/// The decodes of a batch, as indices into its rows: each sequence's rows are one run; runs of
/// one length go together, in increasing sequence order, at most [`CHUNK_TOKENS`] rows a
/// decode; a run longer than that goes alone, in chunks (see [`Stage::forward_rows`]).
pub(super) fn plan_decodes(rows: &[Row]) -> Result<Vec<Vec<usize>>, LlmError> {
    // (seq, first index, length) of each run.
    let mut runs: Vec<(i32, usize, usize)> = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        match runs.last_mut() {
            Some((seq, _, len)) if *seq == row.seq => *len += 1,
            _ => runs.push((row.seq, i, 1)),
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some((seq, _, _)) = runs.iter().find(|(seq, _, _)| !seen.insert(*seq)) {
        return Err(LlmError::Decode(format!(
            "sequence {seq}'s rows are not one run in the batch"
        )));
    }
    runs.sort_by_key(|&(seq, _, len)| (len, seq));
    let mut decodes: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_len = 0;
    for (_, first, len) in runs {
        if len > CHUNK_TOKENS {
            decodes.extend(
                (first..first + len)
                    .collect::<Vec<_>>()
                    .chunks(CHUNK_TOKENS)
                    .map(<[usize]>::to_vec),
            );
            continue;
        }
        if !current.is_empty() && (len != current_len || current.len() + len > CHUNK_TOKENS) {
            decodes.push(std::mem::take(&mut current));
        }
        current_len = len;
        current.extend(first..first + len);
    }
    if !current.is_empty() {
        decodes.push(current);
    }
    Ok(decodes)
}

/// Rows of an [`Input`] picked out for one decode.
pub(super) enum Gathered {
    Tokens(Vec<i32>),
    Hidden(Vec<f32>),
}

impl Gathered {
    pub(super) fn as_input(&self) -> Input<'_> {
        match self {
            Gathered::Tokens(t) => Input::Tokens(t),
            Gathered::Hidden(h) => Input::Hidden(h),
        }
    }
}

#[derive(Clone, Copy)]
pub(super) enum Input<'a> {
    Tokens(&'a [i32]),
    Hidden(&'a [f32]),
}

impl<'a> Input<'a> {
    pub(super) fn len(&self, n_embd: usize) -> usize {
        match self {
            Input::Tokens(t) => t.len(),
            Input::Hidden(h) => h.len() / n_embd,
        }
    }

    /// The rows at `indices`, in that order.
    pub(super) fn gather(&self, indices: &[usize], n_embd: usize) -> Gathered {
        match *self {
            Input::Tokens(t) => Gathered::Tokens(indices.iter().map(|&i| t[i]).collect()),
            Input::Hidden(h) => Gathered::Hidden(
                indices
                    .iter()
                    .flat_map(|&i| h[i * n_embd..(i + 1) * n_embd].iter().copied())
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(runs: &[(i32, usize)]) -> Vec<Row> {
        runs.iter()
            .flat_map(|&(seq, len)| (0..len).map(move |p| Row { seq, pos: p as i32 }))
            .collect()
    }

    #[test]
    fn decodes_hold_runs_of_one_length_in_increasing_sequence_order() {
        // seq 3: 2 rows (0..2), seq 0: 1 row (2), seq 5: 2 rows (3..5), seq 1: 1 row (5).
        let plan = plan_decodes(&rows(&[(3, 2), (0, 1), (5, 2), (1, 1)])).unwrap();
        assert_eq!(plan, vec![vec![2, 5], vec![0, 1, 3, 4]]);
        // A run longer than a decode goes alone, in chunks.
        let long = plan_decodes(&rows(&[(1, CHUNK_TOKENS + 3), (0, 1)])).unwrap();
        assert_eq!(long.len(), 3);
        assert!(long.contains(&vec![CHUNK_TOKENS + 3]), "{long:?}");
        assert!(long.contains(&(0..CHUNK_TOKENS).collect::<Vec<_>>()));
        assert!(long.contains(&(CHUNK_TOKENS..CHUNK_TOKENS + 3).collect::<Vec<_>>()));
        // A sequence in two places of one batch is refused.
        assert!(plan_decodes(&rows(&[(0, 1), (1, 1), (0, 1)])).is_err());
    }
}
