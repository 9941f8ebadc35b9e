//! Picking the next token from the last stage's logits. The pipeline's last stage and the
//! whole-model reference use this same sampler, so a seeded request gives the same tokens
//! both ways.

use protocol::data::Sampling;

use crate::stage::argmax;

/// Pick the next token: greedy at temperature 0, else temperature and nucleus (top-p) sampling
/// with a generator seeded by the request's seed and the position, so a seed repeats.
pub fn sample(logits: &[f32], s: Sampling, pos: u32) -> i32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i, (((l - max) / s.temperature) as f64).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let top_p = if s.top_p > 0.0 && s.top_p < 1.0 {
        f64::from(s.top_p)
    } else {
        1.0
    };
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut x = splitmix64(s.seed ^ (u64::from(pos) << 32)) as f64 / u64::MAX as f64 * mass;
    for (i, p) in &probs {
        x -= p;
        if x <= 0.0 {
            return *i as i32;
        }
    }
    probs.last().map_or(0, |p| p.0 as i32)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_greedy_at_zero_and_repeatable_with_a_seed() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let greedy = Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
        };
        assert_eq!(sample(&logits, greedy, 0), 1);
        let hot = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 42,
        };
        let picks: Vec<i32> = (0..50).map(|p| sample(&logits, hot, p)).collect();
        assert_eq!(
            picks,
            (0..50).map(|p| sample(&logits, hot, p)).collect::<Vec<_>>()
        );
        assert!(picks.contains(&1) && picks.contains(&2));
        let narrow = Sampling {
            temperature: 1.0,
            top_p: 0.1,
            seed: 42,
        };
        assert!(
            (0..50).all(|p| sample(&logits, narrow, p) == 1),
            "top_p 0.1 keeps only the best token"
        );
    }
}
