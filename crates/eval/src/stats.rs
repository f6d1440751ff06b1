//! Small statistics: mean with a seeded percentile-bootstrap 95 % interval, win rates, distinct-n.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// A mean with its 95 % interval over `n` values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub mean: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub n: usize,
}

impl Estimate {
    /// Whether this interval lies entirely above `other`'s.
    pub fn above(&self, other: &Estimate) -> bool {
        self.ci_low > other.ci_high
    }
}

pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Resamples used by [`bootstrap`]: the 2.5/97.5 % quantiles move by well under 1 % of the spread.
pub const RESAMPLES: usize = 2000;

/// Mean of `xs` with a percentile-bootstrap 95 % interval; deterministic for a seed.
pub fn bootstrap(xs: &[f64], seed: u64) -> Estimate {
    let n = xs.len();
    let m = mean(xs);
    if n < 2 {
        return Estimate {
            mean: m,
            ci_low: m,
            ci_high: m,
            n,
        };
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..RESAMPLES)
        .map(|_| (0..n).map(|_| xs[rng.gen_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let q = |p: f64| means[((p * (RESAMPLES - 1) as f64).round() as usize).min(RESAMPLES - 1)];
    Estimate {
        mean: m,
        ci_low: q(0.025),
        ci_high: q(0.975),
        n,
    }
}

/// Share of prompts where `a` scores above `b`, ties counting half.
pub fn win_rate(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n == 0 {
        return f64::NAN;
    }
    let wins: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            if x > y {
                1.0
            } else if x == y {
                0.5
            } else {
                0.0
            }
        })
        .sum();
    wins / n as f64
}

/// Distinct n-grams over all n-grams of whitespace-separated words, pooled over `texts` (Li et al. 2016).
pub fn distinct_n(texts: &[String], n: usize) -> f64 {
    let mut seen = HashSet::new();
    let mut total = 0usize;
    for t in texts {
        let words: Vec<&str> = t.split_whitespace().collect();
        for w in words.windows(n) {
            seen.insert(w.to_vec());
            total += 1;
        }
    }
    if total == 0 {
        0.0
    } else {
        seen.len() as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_brackets_the_mean_and_is_seeded() {
        let xs: Vec<f64> = (0..100).map(|i| (i % 10) as f64).collect();
        let e = bootstrap(&xs, 7);
        assert_eq!(e.mean, 4.5);
        // Standard error = 2.87 / 10 ≈ 0.29: the interval is about ±0.56.
        assert!(e.ci_low < 4.5 && e.ci_high > 4.5);
        assert!((e.ci_high - e.ci_low - 1.13).abs() < 0.2, "{e:?}");
        assert_eq!(e, bootstrap(&xs, 7));
        let c = bootstrap(&[3.0], 1);
        assert_eq!((c.ci_low, c.ci_high), (3.0, 3.0));
    }

    #[test]
    fn win_rate_counts_ties_half() {
        assert_eq!(
            win_rate(&[1.0, 0.0, 0.5, 2.0], &[0.0, 1.0, 0.5, 1.0]),
            0.625
        );
    }

    #[test]
    fn distinct_counts_unique_ngrams() {
        let t = vec!["a b a b".to_string(), "a b".to_string()];
        assert_eq!(distinct_n(&t, 1), 2.0 / 6.0);
        assert_eq!(distinct_n(&t, 2), 2.0 / 4.0);
        assert_eq!(distinct_n(&[], 1), 0.0);
    }
}
