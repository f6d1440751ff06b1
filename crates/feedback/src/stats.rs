//! Inter-annotator agreement as pure functions, checked against textbook worked examples.

use std::collections::BTreeMap;

/// Cohen's κ for two raters. `pairs[i] = (category by rater 1, category by rater 2)`.
/// None when there are no pairs or chance agreement is 1 (κ undefined).
pub fn cohens_kappa(pairs: &[(usize, usize)]) -> Option<f64> {
    if pairs.is_empty() {
        return None;
    }
    let k = pairs.iter().map(|&(a, b)| a.max(b)).max()? + 1;
    let n = pairs.len() as f64;
    let mut row = vec![0.0; k];
    let mut col = vec![0.0; k];
    let mut agree = 0.0;
    for &(a, b) in pairs {
        row[a] += 1.0;
        col[b] += 1.0;
        if a == b {
            agree += 1.0;
        }
    }
    let po = agree / n;
    let pe: f64 = row.iter().zip(&col).map(|(r, c)| (r / n) * (c / n)).sum();
    if (1.0 - pe).abs() < 1e-12 {
        return None;
    }
    Some((po - pe) / (1.0 - pe))
}

/// Fleiss' κ. `counts[i][j]` = how many raters put subject i in category j. Subjects may
/// have different numbers of raters (each needs ≥ 2); with a constant number this is the
/// textbook formula. None when undefined.
pub fn fleiss_kappa(counts: &[Vec<u32>]) -> Option<f64> {
    let subjects: Vec<&Vec<u32>> = counts
        .iter()
        .filter(|r| r.iter().sum::<u32>() >= 2)
        .collect();
    if subjects.is_empty() {
        return None;
    }
    let k = subjects.iter().map(|r| r.len()).max()?;
    let mut totals = vec![0.0; k];
    let mut p_bar = 0.0;
    for r in &subjects {
        let n: f64 = r.iter().map(|&c| c as f64).sum();
        let sq: f64 = r.iter().map(|&c| (c as f64) * (c as f64)).sum();
        p_bar += (sq - n) / (n * (n - 1.0));
        for (j, &c) in r.iter().enumerate() {
            totals[j] += c as f64;
        }
    }
    p_bar /= subjects.len() as f64;
    let grand: f64 = totals.iter().sum();
    let pe: f64 = totals.iter().map(|t| (t / grand) * (t / grand)).sum();
    if (1.0 - pe).abs() < 1e-12 {
        return None;
    }
    Some((p_bar - pe) / (1.0 - pe))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Nominal,
    Ordinal,
    Interval,
}

/// Krippendorff's α. `units[u]` holds the values given to unit u (missing ratings simply
/// absent); units with fewer than two values are not pairable and are ignored.
/// Values are compared exactly, so pass category codes or scale points.
pub fn krippendorff_alpha(units: &[Vec<f64>], metric: Metric) -> Option<f64> {
    // Distinct values, sorted (ordinal distance needs the rank order).
    let mut values: Vec<f64> = units
        .iter()
        .filter(|u| u.len() >= 2)
        .flatten()
        .copied()
        .collect();
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    values.dedup();
    let v = values.len();
    if v == 0 {
        return None;
    }
    let idx = |x: f64| values.iter().position(|&y| y == x).unwrap_or(0);
    // Coincidence matrix.
    let mut o = vec![vec![0.0; v]; v];
    for u in units.iter().filter(|u| u.len() >= 2) {
        let m = u.len() as f64;
        for (i, &a) in u.iter().enumerate() {
            for (j, &b) in u.iter().enumerate() {
                if i != j {
                    o[idx(a)][idx(b)] += 1.0 / (m - 1.0);
                }
            }
        }
    }
    let nc: Vec<f64> = o.iter().map(|r| r.iter().sum()).collect();
    let n: f64 = nc.iter().sum();
    if n <= 1.0 {
        return None;
    }
    let delta2 = |c: usize, k: usize| -> f64 {
        match metric {
            Metric::Nominal => (c != k) as u8 as f64,
            Metric::Interval => (values[c] - values[k]).powi(2),
            Metric::Ordinal => {
                let (lo, hi) = (c.min(k), c.max(k));
                let s: f64 = nc[lo..=hi].iter().sum();
                (s - (nc[c] + nc[k]) / 2.0).powi(2)
            }
        }
    };
    let mut d_o = 0.0;
    let mut d_e = 0.0;
    for c in 0..v {
        for k in 0..v {
            let d = delta2(c, k);
            d_o += o[c][k] * d;
            d_e += nc[c] * nc[k] * d;
        }
    }
    if d_e == 0.0 {
        return None;
    }
    Some(1.0 - (n - 1.0) * d_o / d_e)
}

/// Median of a sample (None if empty).
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut s = xs.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let m = s.len() / 2;
    Some(if s.len().is_multiple_of(2) {
        (s[m - 1] + s[m]) / 2.0
    } else {
        s[m]
    })
}

/// Ratings in a long format: (unit, rater, value).
pub type Rating = (i64, i64, f64);

/// Pairwise Cohen's κ for every pair of raters with at least `min_common` shared units.
/// Values are treated as nominal categories.
pub fn pairwise_cohen(
    ratings: &[Rating],
    min_common: usize,
) -> Vec<(i64, i64, usize, Option<f64>)> {
    let mut by_rater: BTreeMap<i64, BTreeMap<i64, f64>> = BTreeMap::new();
    let mut cats: Vec<f64> = Vec::new();
    for &(unit, rater, v) in ratings {
        by_rater.entry(rater).or_default().insert(unit, v);
        if !cats.contains(&v) {
            cats.push(v);
        }
    }
    let code = |x: f64| cats.iter().position(|&c| c == x).unwrap_or(0);
    let raters: Vec<i64> = by_rater.keys().copied().collect();
    let mut out = Vec::new();
    for (i, &a) in raters.iter().enumerate() {
        for &b in &raters[i + 1..] {
            let pairs: Vec<(usize, usize)> = by_rater[&a]
                .iter()
                .filter_map(|(u, &va)| by_rater[&b].get(u).map(|&vb| (code(va), code(vb))))
                .collect();
            if pairs.len() >= min_common {
                out.push((a, b, pairs.len(), cohens_kappa(&pairs)));
            }
        }
    }
    out
}

/// Fleiss' κ over long-format nominal ratings (units with ≥ 2 raters).
pub fn fleiss_from_ratings(ratings: &[Rating]) -> Option<f64> {
    let mut cats: Vec<f64> = Vec::new();
    for r in ratings {
        if !cats.contains(&r.2) {
            cats.push(r.2);
        }
    }
    let mut units: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for &(u, _, v) in ratings {
        let row = units.entry(u).or_insert_with(|| vec![0; cats.len()]);
        row[cats.iter().position(|&c| c == v).unwrap_or(0)] += 1;
    }
    fleiss_kappa(&units.into_values().collect::<Vec<_>>())
}

/// Krippendorff's α over long-format ratings.
pub fn alpha_from_ratings(ratings: &[Rating], metric: Metric) -> Option<f64> {
    let mut units: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for &(u, _, v) in ratings {
        units.entry(u).or_default().push(v);
    }
    krippendorff_alpha(&units.into_values().collect::<Vec<_>>(), metric)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64, tol: f64) {
        let a = a.expect("defined");
        assert!((a - b).abs() < tol, "{a} != {b}");
    }

    /// Wikipedia "Cohen's kappa" worked example: 50 proposals, yes/yes 20, yes/no 5,
    /// no/yes 10, no/no 15 → p_o = 0.7, p_e = 0.5, κ = 0.4.
    #[test]
    fn cohen_textbook() {
        let mut pairs = vec![];
        pairs.extend(std::iter::repeat_n((0, 0), 20));
        pairs.extend(std::iter::repeat_n((0, 1), 5));
        pairs.extend(std::iter::repeat_n((1, 0), 10));
        pairs.extend(std::iter::repeat_n((1, 1), 15));
        close(cohens_kappa(&pairs), 0.4, 1e-12);
        // Perfect agreement on a single category: chance agreement 1, κ undefined.
        assert_eq!(cohens_kappa(&[(0, 0), (0, 0)]), None);
        assert_eq!(cohens_kappa(&[]), None);
    }

    /// Wikipedia "Fleiss' kappa" worked example: 10 subjects, 14 raters, 5 categories,
    /// P̄ = 0.378, P̄e = 0.213, κ = 0.210.
    #[test]
    fn fleiss_textbook() {
        let table = vec![
            vec![0, 0, 0, 0, 14],
            vec![0, 2, 6, 4, 2],
            vec![0, 0, 3, 5, 6],
            vec![0, 3, 9, 2, 0],
            vec![2, 2, 8, 1, 1],
            vec![7, 7, 0, 0, 0],
            vec![3, 2, 6, 3, 0],
            vec![2, 5, 3, 2, 2],
            vec![6, 5, 2, 1, 0],
            vec![0, 2, 2, 3, 7],
        ];
        close(fleiss_kappa(&table), 0.210, 5e-4);
    }

    /// Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C:
    /// 4 observers, 12 units, values 1–5 with missing data. Published results:
    /// nominal α = 0.743, ordinal α = 0.815, interval α = 0.849.
    #[test]
    fn krippendorff_textbook() {
        let n = f64::NAN;
        let obs = [
            [1., 2., 3., 3., 2., 1., 4., 1., 2., n, n, n],
            [1., 2., 3., 3., 2., 2., 4., 1., 2., 5., n, 3.],
            [n, 3., 3., 3., 2., 3., 4., 2., 2., 5., 1., n],
            [1., 2., 3., 3., 2., 4., 4., 1., 2., 5., 1., n],
        ];
        let units: Vec<Vec<f64>> = (0..12)
            .map(|u| obs.iter().map(|o| o[u]).filter(|v| !v.is_nan()).collect())
            .collect();
        close(krippendorff_alpha(&units, Metric::Nominal), 0.743, 5e-4);
        close(krippendorff_alpha(&units, Metric::Ordinal), 0.815, 5e-4);
        close(krippendorff_alpha(&units, Metric::Interval), 0.849, 5e-4);
    }

    #[test]
    fn long_format_helpers_agree_with_tables() {
        // Two raters, Cohen example again in long format: κ = 0.4 pairwise.
        let mut ratings = vec![];
        let mut unit = 0;
        for (a, b, times) in [
            (1.0, 1.0, 20),
            (1.0, 0.0, 5),
            (0.0, 1.0, 10),
            (0.0, 0.0, 15),
        ] {
            for _ in 0..times {
                ratings.push((unit, 7, a));
                ratings.push((unit, 9, b));
                unit += 1;
            }
        }
        let pc = pairwise_cohen(&ratings, 2);
        assert_eq!(pc.len(), 1);
        assert_eq!((pc[0].0, pc[0].1, pc[0].2), (7, 9, 50));
        close(pc[0].3, 0.4, 1e-12);
        // For two raters and nominal data α is close to (slightly above) Scott's π.
        let a = alpha_from_ratings(&ratings, Metric::Nominal).unwrap();
        let f = fleiss_from_ratings(&ratings).unwrap();
        assert!(a > f && a - f < 0.01, "alpha {a} fleiss {f}");
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
