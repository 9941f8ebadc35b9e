//! The verdict on one stage's outputs, from the outputs alone (no IO, no swarm): who agrees
//! with whom, who is wrong, what nobody can settle, and which output the check goes on with.

/// A stage's output: its width (hidden size, or vocabulary size for logits) and its values.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub width: u32,
    pub data: Vec<f32>,
}

/// Whose output it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who<'a> {
    /// A node holding the shard (`on_route`: the route's stage for it).
    Holder { node_id: &'a str, on_route: bool },
    /// The coordinator's own computation from the seeder's file: never evicted.
    Referee,
}

/// What to do after one stage's comparison.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    /// Holders (indices into the opinions) to evict, with the reason.
    pub evict: Vec<(usize, String)>,
    /// Holders disagree and no referee is among the opinions: only the coordinator's own
    /// computation may settle it (a majority may be colluding liars).
    pub needs_referee: bool,
    /// Two outputs that disagree with nobody to tell which is right, and their error.
    pub dispute: Option<([usize; 2], f32)>,
    /// The relative errors of the pairs that agreed: honest rounding.
    pub honest: Vec<f32>,
    /// The output the check goes on with: the referee's when there is one, else the route's
    /// holder's when all agree. `None` without outputs, or when nothing is settled.
    pub go_on_with: Option<usize>,
}

/// Whether two outputs agree: same width, relative error within `tolerance`, and on the last
/// stage (`last`) the same greedy tokens. Also their relative error.
pub fn agree(a: &Output, b: &Output, last: bool, tolerance: f32) -> (bool, f32) {
    let error = relative_error(&a.data, &b.data);
    let same_token = !last || greedy(a) == greedy(b);
    (
        a.width == b.width && error <= tolerance && same_token,
        error,
    )
}

/// Judge one stage's outputs. Holders that all agree are honest. Any disagreement is settled
/// by the coordinator's own computation (the referee), never by a majority, which two
/// colluding liars could make: without a referee the verdict asks for one; with it, every
/// holder that differs from it is evicted; a referee that agrees with no holder, or a
/// disagreement the referee could not be had for, is a dispute and evicts nobody.
pub fn judge(opinions: &[(Who, Output)], last: bool, tolerance: f32) -> Verdict {
    let n = opinions.len();
    let mut verdict = Verdict::default();
    if n == 0 {
        return verdict;
    }
    let mut agrees = vec![vec![false; n]; n];
    let mut error = vec![vec![0f32; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let (ok, e) = agree(&opinions[i].1, &opinions[j].1, last, tolerance);
            (agrees[i][j], agrees[j][i]) = (ok, ok);
            (error[i][j], error[j][i]) = (e, e);
            if ok {
                verdict.honest.push(e);
            }
        }
    }
    let first_disagreement = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .find(|&(i, j)| !agrees[i][j]);
    let on_route = |i: usize| matches!(opinions[i].0, Who::Holder { on_route: true, .. });
    let Some((a, b)) = first_disagreement else {
        verdict.go_on_with = (0..n).max_by_key(|&i| on_route(i));
        return verdict;
    };
    let Some(r) = (0..n).find(|&i| opinions[i].0 == Who::Referee) else {
        verdict.needs_referee = true;
        verdict.dispute = Some(([a, b], error[a][b]));
        return verdict;
    };
    if (0..n).all(|i| i == r || !agrees[i][r]) {
        // The coordinator's computation matches no holder: nothing here tells who is right.
        verdict.dispute = Some(([a, b], error[a][b]));
        return verdict;
    }
    for i in (0..n).filter(|&i| i != r && !agrees[i][r]) {
        let reason = format!(
            "its output differs from the stage computed by the coordinator from the seeder's \
             file (relative error {:.4}, tolerance {tolerance})",
            error[i][r]
        );
        verdict.evict.push((i, reason));
    }
    verdict.go_on_with = Some(r);
    verdict
}

/// The greedy token of each logits row.
fn greedy(output: &Output) -> Vec<i32> {
    output
        .data
        .chunks(output.width.max(1) as usize)
        .map(llm::stage::argmax)
        .collect()
}

/// ‖a − b‖ / max(‖a‖, ‖b‖): 0 for equal outputs, about the scale of a relative error else;
/// 1 for outputs of different sizes.
pub fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 1.0;
    }
    let (mut diff, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        diff += (x - y) * (x - y);
        na += x * x;
        nb += y * y;
    }
    if !(diff.is_finite() && na.is_finite() && nb.is_finite()) {
        return f32::INFINITY;
    }
    (diff.sqrt() / na.max(nb).sqrt().max(1e-12)) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOLERANCE: f32 = 0.01;

    fn holder(node_id: &str, on_route: bool) -> Who<'_> {
        Who::Holder { node_id, on_route }
    }

    /// Logits over a 4-token vocabulary, 2 rows.
    fn output(scale: f32) -> Output {
        Output {
            width: 4,
            data: [1.0, 3.0, 2.0, 0.5, 0.1, 0.2, 4.0, 1.0]
                .iter()
                .map(|x| x * scale)
                .collect(),
        }
    }

    #[test]
    fn relative_error_is_scale_free_and_strict_about_shapes() {
        assert_eq!(relative_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        let e = relative_error(&[100.0, 0.0], &[101.0, 0.0]);
        assert!((e - 1.0 / 101.0).abs() < 1e-6, "{e}");
        assert_eq!(relative_error(&[1.0], &[1.0, 2.0]), 1.0);
        assert!(relative_error(&[f32::NAN], &[1.0]).is_infinite());
        assert_eq!(relative_error(&[0.0], &[0.0]), 0.0);
    }

    #[test]
    fn rounding_agrees_but_another_greedy_token_on_the_last_stage_does_not() {
        let (a, b) = (output(1.0), output(1.001));
        assert!(agree(&a, &b, true, TOLERANCE).0);
        let mut flipped = a.clone();
        flipped.data.swap(1, 2); // row 0's argmax moves, the norm stays
        assert!(
            agree(&a, &flipped, false, 0.6).0,
            "a hidden state: by error only"
        );
        assert!(
            !agree(&a, &flipped, true, 0.6).0,
            "logits: the token must match"
        );
        let narrow = Output {
            width: 2,
            data: a.data.clone(),
        };
        assert!(!agree(&a, &narrow, false, TOLERANCE).0, "widths differ");
    }

    #[test]
    fn any_disagreement_asks_for_the_referee_and_a_majority_alone_evicts_nobody() {
        // Two colluding liars (b, c) agree with each other, the honest route holder with
        // neither: without the coordinator's own computation nobody is evicted.
        let opinions = [
            (holder("a", true), output(1.0)),
            (holder("b", false), output(1.2)),
            (holder("c", false), output(1.2)),
        ];
        let v = judge(&opinions, false, TOLERANCE);
        assert!(v.evict.is_empty(), "{v:?}");
        assert!(v.needs_referee);
        assert_eq!(v.dispute.map(|d| d.0), Some([0, 1]));
        assert_eq!(v.go_on_with, None, "nothing settled to go on with");
        // The referee sides with the honest one: both liars go.
        let mut with_referee = opinions.to_vec();
        with_referee.push((Who::Referee, output(1.0005)));
        let v = judge(&with_referee, false, TOLERANCE);
        assert_eq!(v.evict.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!(v.evict[0].1.contains("computed by the coordinator"));
        assert!(!v.needs_referee && v.dispute.is_none());
        assert_eq!(v.go_on_with, Some(3), "the referee's output");
    }

    #[test]
    fn the_route_holder_is_evicted_too_when_the_referee_differs_from_it() {
        let opinions = [
            (holder("a", true), output(2.0)),
            (holder("b", false), output(1.0)),
            (holder("c", false), output(1.0)),
            (Who::Referee, output(1.0)),
        ];
        let v = judge(&opinions, false, TOLERANCE);
        assert_eq!(v.evict.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0]);
        assert_eq!(v.go_on_with, Some(3));
    }

    #[test]
    fn two_holders_that_disagree_are_a_dispute_until_a_referee_settles_it() {
        let two = [
            (holder("a", true), output(1.0)),
            (holder("b", false), output(1.5)),
        ];
        let v = judge(&two, false, TOLERANCE);
        assert!(v.evict.is_empty());
        assert!(v.needs_referee);
        assert_eq!(v.dispute.map(|d| d.0), Some([0, 1]));
        // The coordinator's computation sides with b: a is evicted, by the referee's word.
        let with_referee = [
            (holder("a", true), output(1.0)),
            (holder("b", false), output(1.5)),
            (Who::Referee, output(1.5)),
        ];
        let v = judge(&with_referee, false, TOLERANCE);
        assert_eq!(v.evict.len(), 1);
        assert_eq!(v.evict[0].0, 0);
        assert!(v.evict[0].1.contains("computed by the coordinator"));
        assert_eq!(v.dispute, None);
    }

    #[test]
    fn a_referee_that_matches_neither_holder_evicts_nobody() {
        let opinions = [
            (holder("a", true), output(1.0)),
            (holder("b", false), output(1.5)),
            (Who::Referee, output(3.0)),
        ];
        let v = judge(&opinions, false, TOLERANCE);
        assert!(v.evict.is_empty() && !v.needs_referee);
        assert_eq!(v.dispute.map(|d| d.0), Some([0, 1]));
        assert_eq!(v.go_on_with, None);
    }

    #[test]
    fn holders_that_all_agree_give_honest_errors_only() {
        let opinions = [
            (holder("a", false), output(1.0)),
            (holder("b", true), output(1.0001)),
            (holder("c", false), output(0.9999)),
        ];
        let v = judge(&opinions, true, TOLERANCE);
        assert!(v.evict.is_empty() && v.dispute.is_none());
        assert_eq!(v.honest.len(), 3);
        assert_eq!(v.go_on_with, Some(1));
        assert_eq!(judge(&[], true, TOLERANCE), Verdict::default());
    }
}
