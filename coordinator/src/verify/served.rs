//! Checking a served request, from what its route actually did (no IO): the hidden states
//! each stage sent the next (signed by the sender, handed back by the receiver) against the
//! replay's output of that stage, and each token the last stage sampled against the logits
//! computed from the replay's input. A stage that lies only on served traffic (it can tell a
//! probe from a lane) is caught here, since the evidence is the served traffic itself.

use protocol::data::Sampling;

use super::judge::{relative_error, Output};

/// How far below the best logit a greedy token may be: honest rounding between a step served
/// in pieces and the replay in one batch moves logits by a few hundredths; a stage that
/// changes tokens moves them by more.
pub const GREEDY_SLACK: f32 = 0.5;

/// How much less likely than the best token a sampled one may be (at temperature > 0): a
/// token the distribution gives 10,000 times less weight than its best is not what the
/// sampler drew, up to rounding.
const SAMPLED_ODDS: f32 = 1e4;

/// What one hop of a served request shows.
#[derive(Debug, PartialEq)]
pub enum HopFault {
    /// The receiver could not show the rows at this position: it fails the check.
    Missing(usize),
    /// The sender's rows differ from the replay's by this relative error: it lied.
    Differs(f32),
}

/// Check the rows one stage received for a served request (`(position, row)`, signed by the
/// sender; a later row for a position replaces an earlier one, as on the stage) against the
/// replay's output of the sending stage (`reference`, every position from 0), over positions
/// `from..to`. Returns the relative error.
pub fn check_hop(
    received: &[(usize, Vec<f32>)],
    reference: &Output,
    from: usize,
    to: usize,
    tolerance: f32,
) -> Result<f32, HopFault> {
    let width = reference.width as usize;
    let mut rows: Vec<Option<&[f32]>> = vec![None; to.saturating_sub(from)];
    for (pos, row) in received {
        if (from..to).contains(pos) && row.len() == width {
            rows[pos - from] = Some(row);
        }
    }
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for (i, row) in rows.iter().enumerate() {
        let pos = from + i;
        let (Some(row), Some(expected)) = (row, reference.data.get(pos * width..(pos + 1) * width))
        else {
            return Err(HopFault::Missing(pos));
        };
        got.extend_from_slice(row);
        want.extend_from_slice(expected);
    }
    let error = relative_error(&got, &want);
    if error <= tolerance {
        Ok(error)
    } else {
        Err(HopFault::Differs(error))
    }
}

/// A sampled token the logits rule out.
#[derive(Debug, PartialEq)]
pub struct BadToken {
    pub pos: usize,
    pub token: i32,
    /// How far below the best logit it is.
    pub gap: f32,
}

/// Check each token the last stage sampled, from the logits at the position before it
/// (`(position, logits)`, computed from the replay's input): at temperature 0 it must be
/// within [`GREEDY_SLACK`] of the best, else within the odds a sampler could draw.
pub fn check_tokens(
    served_tokens: &[(usize, i32)],
    logits: &[(usize, Vec<f32>)],
    sampling: Sampling,
) -> Result<(), BadToken> {
    let allowed = if sampling.temperature <= 0.0 {
        GREEDY_SLACK
    } else {
        sampling.temperature * SAMPLED_ODDS.ln() + GREEDY_SLACK
    };
    for &(pos, token) in served_tokens {
        let Some((_, row)) = logits.iter().find(|(p, _)| *p == pos) else {
            continue;
        };
        let best = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let gap = match usize::try_from(token).ok().and_then(|t| row.get(t)) {
            Some(l) => best - l,
            None => f32::INFINITY,
        };
        // NaN logits rule the token out too.
        if gap.is_nan() || gap > allowed {
            return Err(BadToken { pos, token, gap });
        }
    }
    Ok(())
}

/// The tokens a served request's last stage sampled, by the position whose logits gave each:
/// the completion (fed back) and the last token, from the last prompt position on, for the
/// positions this request computed (`from_pos` on).
pub fn sampled_tokens(
    tokens: &[i32],
    last_token: i32,
    prompt_len: usize,
    from_pos: usize,
) -> Vec<(usize, i32)> {
    let start = prompt_len.saturating_sub(1).max(from_pos);
    (start..tokens.len())
        .map(|pos| (pos, tokens.get(pos + 1).copied().unwrap_or(last_token)))
        .collect()
}

/// Failed checks (among a node's last [`STRIKE_WINDOW`]) that evict it.
pub const STRIKES: usize = 2;

/// How many of a node's latest served checks count toward its strikes: a failure long ago
/// (a timeout on a busy day) is forgotten, while a receiver that hides a colluding sender's
/// lies by refusing the checks of the requests lied on is evicted once it refuses twice in
/// that many.
pub const STRIKE_WINDOW: usize = 20;

/// The outcomes of each node's latest checks of served requests (`true`: failed).
#[derive(Default)]
pub struct Strikes {
    by_node: std::collections::HashMap<String, std::collections::VecDeque<bool>>,
}

impl Strikes {
    /// `node` showed what it received.
    pub fn passed(&mut self, node: &str) {
        self.record(node, false);
    }

    /// `node` could not show what it received: its failures in the window, now.
    pub fn failed(&mut self, node: &str) -> usize {
        self.record(node, true)
    }

    /// `node` is gone (evicted): nothing kept of it.
    pub fn forget(&mut self, node: &str) {
        self.by_node.remove(node);
    }

    fn record(&mut self, node: &str, failed: bool) -> usize {
        let latest = self.by_node.entry(node.to_owned()).or_default();
        latest.push_back(failed);
        if latest.len() > STRIKE_WINDOW {
            latest.pop_front();
        }
        latest.iter().filter(|f| **f).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strikes_count_failures_among_a_nodes_latest_checks() {
        let mut s = Strikes::default();
        // Two failures close together: evicted at the second.
        assert_eq!(s.failed("a"), 1);
        s.passed("a");
        assert_eq!(s.failed("a"), STRIKES);
        // One failure every window's length: never two at once.
        for _ in 0..5 {
            assert_eq!(s.failed("b"), 1);
            for _ in 0..STRIKE_WINDOW - 1 {
                s.passed("b");
            }
        }
        s.forget("a");
        assert_eq!(s.failed("a"), 1);
    }

    const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };

    fn reference() -> Output {
        // 4 positions of 2-wide rows.
        Output {
            width: 2,
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        }
    }

    #[test]
    fn a_hop_agrees_within_rounding_and_names_a_lie_or_a_missing_row() {
        let honest = vec![(2, vec![5.0, 6.0001]), (3, vec![7.0, 8.0])];
        assert!(check_hop(&honest, &reference(), 2, 4, 0.01).is_ok());
        // A later row for a position replaces an earlier one (a step replayed).
        let replayed = vec![
            (2, vec![50.0, 6.0]),
            (2, vec![5.0, 6.0]),
            (3, vec![7.0, 8.0]),
        ];
        assert!(check_hop(&replayed, &reference(), 2, 4, 0.01).is_ok());
        let lied = vec![(2, vec![5.0, 6.0]), (3, vec![7.0, 9.0])];
        assert!(matches!(
            check_hop(&lied, &reference(), 2, 4, 0.01),
            Err(HopFault::Differs(e)) if e > 0.01
        ));
        assert_eq!(
            check_hop(&honest[..1], &reference(), 2, 4, 0.01),
            Err(HopFault::Missing(3))
        );
        // A row of the wrong width is as good as missing.
        let narrow = vec![(2, vec![5.0]), (3, vec![7.0, 8.0])];
        assert_eq!(
            check_hop(&narrow, &reference(), 2, 4, 0.01),
            Err(HopFault::Missing(2))
        );
    }

    #[test]
    fn tokens_are_checked_against_the_logits_before_them() {
        let logits = vec![
            (1, vec![0.0, 5.0, 4.8, -3.0]),
            (2, vec![12.0, 0.0, 0.0, 0.0]),
        ];
        // The best, and a near tie within rounding, pass; a far one does not.
        assert!(check_tokens(&[(1, 1), (2, 0)], &logits, GREEDY).is_ok());
        assert!(check_tokens(&[(1, 2)], &logits, GREEDY).is_ok());
        let bad = check_tokens(&[(1, 1), (2, 3)], &logits, GREEDY).unwrap_err();
        assert_eq!((bad.pos, bad.token, bad.gap), (2, 3, 12.0));
        // Out of the vocabulary: ruled out.
        assert!(check_tokens(&[(1, 7)], &logits, GREEDY).is_err());
        assert!(check_tokens(&[(1, -1)], &logits, GREEDY).is_err());
        // Sampling at temperature 1 draws a token 8 below the best now and then (odds of
        // e^8, about 3,000 to 1); 12 below (e^12, 160,000 to 1) is out.
        let warm = Sampling {
            temperature: 1.0,
            ..GREEDY
        };
        assert!(check_tokens(&[(1, 3)], &logits, warm).is_ok());
        assert!(check_tokens(&[(2, 3)], &logits, warm).is_err());
    }

    #[test]
    fn the_sampled_tokens_start_at_the_last_prompt_position_or_the_first_computed() {
        // Prompt [10, 11, 12], completion 13, 14 fed back, 15 last.
        let tokens = [10, 11, 12, 13, 14];
        assert_eq!(
            sampled_tokens(&tokens, 15, 3, 0),
            vec![(2, 13), (3, 14), (4, 15)]
        );
        // A cached prefix past the prompt (a follow-up turn) starts later.
        assert_eq!(sampled_tokens(&tokens, 15, 3, 4), vec![(4, 15)]);
    }
}
