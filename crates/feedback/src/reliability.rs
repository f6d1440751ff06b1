//! Annotator reliability and item posteriors from redundant labels, as pure functions
//! (labels in → reliabilities and posteriors out), so simulations can call them directly.
//!
//! * [`dawid_skene`]: categorical labels (Dawid & Skene 1979). Each annotator has a
//!   confusion matrix P(says l | truth k); EM alternates item posteriors and matrices.
//!   Reliability = P(says the truth) under the estimated class prior.
//! * [`bradley_terry`]: pairwise comparisons with per-annotator reliability (Crowd-BT,
//!   Chen et al. 2013). Objects (responses) have Bradley–Terry strengths; an annotator
//!   reports the truly better object with probability r, the other one with 1 − r. EM
//!   alternates the posterior that each pair's first object is better, the r's (with a
//!   Beta prior) and the strengths (ridge-penalised, so single comparisons stay tame).
//!
//! Both start from majority vote, so with one annotator per item they reduce to it.

/// A categorical label: `annotator` gave `item` the class `label`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vote {
    pub item: usize,
    pub annotator: usize,
    pub label: usize,
}

#[derive(Debug, Clone)]
pub struct DawidSkene {
    /// Per annotator: probability that their label is the true class (NaN when they gave none).
    pub reliability: Vec<f64>,
    /// `confusion[a][k][l]` = P(annotator a says l | true class k).
    pub confusion: Vec<Vec<Vec<f64>>>,
    pub prior: Vec<f64>,
    /// `posterior[i][k]` = P(item i is class k); items without labels get the prior.
    pub posterior: Vec<Vec<f64>>,
    pub iterations: usize,
}

const MAX_ITERATIONS: usize = 200;
const TOLERANCE: f64 = 1e-7;

/// Dawid–Skene EM. Labels must be `< n_classes`, items `< n_items`, annotators `< n_annotators`.
pub fn dawid_skene(
    n_items: usize,
    n_annotators: usize,
    n_classes: usize,
    votes: &[Vote],
) -> DawidSkene {
    let k = n_classes.max(1);
    // Start: each item's vote shares (soft majority vote).
    let mut post = vec![vec![0.0; k]; n_items];
    let mut labelled = vec![false; n_items];
    for v in votes {
        post[v.item][v.label] += 1.0;
        labelled[v.item] = true;
    }
    for p in post.iter_mut() {
        normalise(p);
    }
    let mut prior = vec![1.0 / k as f64; k];
    let mut confusion = vec![vec![vec![0.0; k]; k]; n_annotators];
    let mut iterations = 0;
    for it in 1..=MAX_ITERATIONS {
        iterations = it;
        // M step. Pseudo-counts: 0.5 everywhere and 1 more on the diagonal, a mild
        // belief that annotators beat chance, which keeps sparse annotators finite.
        prior = vec![1.0; k];
        for (i, p) in post.iter().enumerate() {
            if labelled[i] {
                prior.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
        }
        normalise(&mut prior);
        for m in confusion.iter_mut() {
            for (t, row) in m.iter_mut().enumerate() {
                row.iter_mut()
                    .enumerate()
                    .for_each(|(l, x)| *x = if l == t { 1.5 } else { 0.5 });
            }
        }
        for v in votes {
            for t in 0..k {
                confusion[v.annotator][t][v.label] += post[v.item][t];
            }
        }
        for m in confusion.iter_mut() {
            for row in m.iter_mut() {
                normalise(row);
            }
        }
        // E step, in log space.
        let mut logp: Vec<Vec<f64>> = (0..n_items)
            .map(|_| prior.iter().map(|p| p.ln()).collect())
            .collect();
        for v in votes {
            for t in 0..k {
                logp[v.item][t] += confusion[v.annotator][t][v.label].ln();
            }
        }
        let mut change: f64 = 0.0;
        for (i, lp) in logp.iter().enumerate() {
            let new = softmax(lp);
            change = change.max(
                new.iter()
                    .zip(&post[i])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max),
            );
            post[i] = new;
        }
        if change < TOLERANCE {
            break;
        }
    }
    let mut gave = vec![false; n_annotators];
    votes.iter().for_each(|v| gave[v.annotator] = true);
    let reliability = confusion
        .iter()
        .zip(&gave)
        .map(|(m, &g)| {
            if g {
                (0..k).map(|t| prior[t] * m[t][t]).sum()
            } else {
                f64::NAN
            }
        })
        .collect();
    DawidSkene {
        reliability,
        confusion,
        prior,
        posterior: post,
        iterations,
    }
}

/// A pairwise judgement on `item` (a pair of objects): did the first object win?
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    pub item: usize,
    pub annotator: usize,
    pub first_wins: bool,
}

#[derive(Debug, Clone)]
pub struct BradleyTerry {
    /// Per annotator: probability of reporting the truly better object (NaN without votes).
    pub reliability: Vec<f64>,
    /// Per object: log-strength (ridge-penalised towards 0).
    pub strength: Vec<f64>,
    /// Per item: probability that its first object is the better one.
    pub posterior: Vec<f64>,
    pub iterations: usize,
}

/// Beta prior on each annotator's reliability: 2 pseudo-votes right, 1 wrong.
const R_PRIOR: (f64, f64) = (2.0, 1.0);
/// Ridge penalty on strengths (a standard normal prior).
const RIDGE: f64 = 1.0;

/// Crowd-BT EM. `pairs[i]` = the two objects compared in item i.
pub fn bradley_terry(
    n_objects: usize,
    pairs: &[(usize, usize)],
    n_annotators: usize,
    comparisons: &[Comparison],
) -> BradleyTerry {
    let n_items = pairs.len();
    let mut strength = vec![0.0; n_objects];
    // Start from the vote share per item.
    let mut post = vec![0.5; n_items];
    let mut counts = vec![(0.0, 0.0); n_items];
    for c in comparisons {
        let e = &mut counts[c.item];
        if c.first_wins {
            e.0 += 1.0
        } else {
            e.1 += 1.0
        }
    }
    for (p, (w, l)) in post.iter_mut().zip(&counts) {
        if w + l > 0.0 {
            *p = (w + 0.5) / (w + l + 1.0);
        }
    }
    let mut rel = vec![0.0; n_annotators];
    let mut iterations = 0;
    for it in 1..=MAX_ITERATIONS {
        iterations = it;
        // M step: reliabilities.
        let mut right = vec![R_PRIOR.0; n_annotators];
        let mut total = vec![R_PRIOR.0 + R_PRIOR.1; n_annotators];
        for c in comparisons {
            let q = post[c.item];
            right[c.annotator] += if c.first_wins { q } else { 1.0 - q };
            total[c.annotator] += 1.0;
        }
        for a in 0..n_annotators {
            rel[a] = (right[a] / total[a]).clamp(1e-3, 1.0 - 1e-3);
        }
        // M step: strengths, a few diagonal Newton steps on the expected log-likelihood.
        for _ in 0..5 {
            let mut grad: Vec<f64> = strength.iter().map(|s| -RIDGE * s).collect();
            let mut hess = vec![RIDGE; n_objects];
            for (i, &(x, y)) in pairs.iter().enumerate() {
                if counts[i].0 + counts[i].1 == 0.0 {
                    continue;
                }
                let p = sigmoid(strength[x] - strength[y]);
                grad[x] += post[i] - p;
                grad[y] -= post[i] - p;
                hess[x] += p * (1.0 - p);
                hess[y] += p * (1.0 - p);
            }
            for o in 0..n_objects {
                strength[o] += grad[o] / hess[o];
            }
        }
        // E step.
        let mut logit: Vec<f64> = pairs
            .iter()
            .map(|&(x, y)| strength[x] - strength[y])
            .collect();
        for c in comparisons {
            let w = (rel[c.annotator] / (1.0 - rel[c.annotator])).ln();
            logit[c.item] += if c.first_wins { w } else { -w };
        }
        let mut change: f64 = 0.0;
        for (i, l) in logit.iter().enumerate() {
            let q = sigmoid(*l);
            change = change.max((q - post[i]).abs());
            post[i] = q;
        }
        if change < TOLERANCE {
            break;
        }
    }
    let mut gave = vec![false; n_annotators];
    comparisons.iter().for_each(|c| gave[c.annotator] = true);
    let reliability = rel
        .iter()
        .zip(&gave)
        .map(|(&r, &g)| if g { r } else { f64::NAN })
        .collect();
    BradleyTerry {
        reliability,
        strength,
        posterior: post,
        iterations,
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn normalise(p: &mut [f64]) {
    let s: f64 = p.iter().sum();
    if s > 0.0 {
        p.iter_mut().for_each(|x| *x /= s);
    } else {
        let n = p.len() as f64;
        p.iter_mut().for_each(|x| *x = 1.0 / n);
    }
}

fn softmax(logp: &[f64]) -> Vec<f64> {
    let m = logp.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut p: Vec<f64> = logp.iter().map(|l| (l - m).exp()).collect();
    normalise(&mut p);
    p
}

/// Spearman rank correlation (no ties expected); for comparing recovered orders.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let rank = |v: &[f64]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        idx.iter()
            .enumerate()
            .for_each(|(pos, &i)| r[i] = pos as f64);
        r
    };
    let (ra, rb) = (rank(a), rank(b));
    let n = a.len() as f64;
    let d2: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - y).powi(2)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    /// 400 items, 3 classes, 8 annotators of known accuracy (errors uniform over the
    /// other classes), 5 annotators per item.
    #[test]
    fn dawid_skene_recovers_reliabilities_and_beats_majority_vote() {
        let mut rng = StdRng::seed_from_u64(7);
        let acc = [0.95, 0.9, 0.85, 0.75, 0.65, 0.55, 0.45, 0.4];
        let (n_items, k) = (400, 3);
        let truth: Vec<usize> = (0..n_items).map(|_| rng.gen_range(0..k)).collect();
        let mut votes = vec![];
        let annotators: Vec<usize> = (0..acc.len()).collect();
        for (i, &t) in truth.iter().enumerate() {
            for &a in annotators.choose_multiple(&mut rng, 5) {
                let label = if rng.gen_bool(acc[a]) {
                    t
                } else {
                    (t + rng.gen_range(1..k)) % k
                };
                votes.push(Vote {
                    item: i,
                    annotator: a,
                    label,
                });
            }
        }
        let ds = dawid_skene(n_items, acc.len(), k, &votes);
        let rho = spearman(&acc, &ds.reliability);
        let ds_acc = accuracy(&truth, |i| argmax(&ds.posterior[i]));
        let mv_acc = accuracy(&truth, |i| {
            let mut c = vec![0; k];
            votes
                .iter()
                .filter(|v| v.item == i)
                .for_each(|v| c[v.label] += 1);
            argmax(&c.iter().map(|&x| x as f64).collect::<Vec<_>>())
        });
        eprintln!("dawid-skene: reliabilities {:?}, spearman {rho:.3}, accuracy {ds_acc:.3} vs majority {mv_acc:.3}, {} iterations", ds.reliability.iter().map(|r| (r * 100.0).round() / 100.0).collect::<Vec<_>>(), ds.iterations);
        assert!(rho >= 0.95, "order not recovered: {rho}");
        for (a, (t, e)) in acc.iter().zip(&ds.reliability).enumerate() {
            assert!(
                (t - e).abs() < 0.08,
                "annotator {a}: true {t}, estimated {e}"
            );
        }
        assert!(ds_acc >= 0.93, "{ds_acc}");
        assert!(ds_acc >= mv_acc + 0.03, "DS {ds_acc} vs majority {mv_acc}");
    }

    /// 150 prompts × 3 responses of known strength → 450 pairs, each judged by 3 of 7
    /// annotators of known reliability (a wrong judgement picks the worse response).
    #[test]
    fn bradley_terry_recovers_reliabilities_and_beats_majority_vote() {
        let mut rng = StdRng::seed_from_u64(11);
        let rel = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.35];
        let n_objects = 450;
        let strength: Vec<f64> = (0..n_objects).map(|_| rng.gen_range(-2.0..2.0)).collect();
        let pairs: Vec<(usize, usize)> = (0..150)
            .flat_map(|p| {
                [
                    (3 * p, 3 * p + 1),
                    (3 * p, 3 * p + 2),
                    (3 * p + 1, 3 * p + 2),
                ]
            })
            .collect();
        let truth: Vec<bool> = pairs
            .iter()
            .map(|&(x, y)| strength[x] > strength[y])
            .collect();
        let annotators: Vec<usize> = (0..rel.len()).collect();
        let mut comparisons = vec![];
        for (i, &first_better) in truth.iter().enumerate() {
            for &a in annotators.choose_multiple(&mut rng, 3) {
                let right = rng.gen_bool(rel[a]);
                comparisons.push(Comparison {
                    item: i,
                    annotator: a,
                    first_wins: first_better == right,
                });
            }
        }
        let bt = bradley_terry(n_objects, &pairs, rel.len(), &comparisons);
        let rho = spearman(&rel, &bt.reliability);
        let bt_acc = accuracy(&truth, |i| bt.posterior[i] > 0.5);
        let mv_acc = accuracy(&truth, |i| {
            let wins = comparisons
                .iter()
                .filter(|c| c.item == i && c.first_wins)
                .count();
            2 * wins > comparisons.iter().filter(|c| c.item == i).count()
        });
        eprintln!("crowd-bt: reliabilities {:?}, spearman {rho:.3}, accuracy {bt_acc:.3} vs majority {mv_acc:.3}, {} iterations", bt.reliability.iter().map(|r| (r * 100.0).round() / 100.0).collect::<Vec<_>>(), bt.iterations);
        assert!(rho >= 0.9, "order not recovered: {rho}");
        assert!(bt_acc >= mv_acc + 0.03, "BT {bt_acc} vs majority {mv_acc}");
        // Posteriors are calibrated enough to filter on: confident items are mostly right.
        let confident: Vec<usize> = (0..pairs.len())
            .filter(|&i| (bt.posterior[i] - 0.5).abs() >= 0.4)
            .collect();
        let conf_acc = confident
            .iter()
            .filter(|&&i| (bt.posterior[i] > 0.5) == truth[i])
            .count() as f64
            / confident.len() as f64;
        eprintln!(
            "crowd-bt: {} of {} items with confidence ≥ 0.9, accuracy {conf_acc:.3}",
            confident.len(),
            pairs.len()
        );
        assert!(conf_acc > bt_acc, "{conf_acc} vs {bt_acc}");
    }

    #[test]
    fn one_annotator_per_item_is_majority_vote() {
        let votes = [
            Vote {
                item: 0,
                annotator: 0,
                label: 2,
            },
            Vote {
                item: 1,
                annotator: 1,
                label: 0,
            },
        ];
        let ds = dawid_skene(3, 2, 3, &votes);
        assert_eq!(argmax(&ds.posterior[0]), 2);
        assert_eq!(argmax(&ds.posterior[1]), 0);
        // The unlabelled item gets the prior.
        assert!((ds.posterior[2].iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let bt = bradley_terry(
            2,
            &[(0, 1)],
            1,
            &[Comparison {
                item: 0,
                annotator: 0,
                first_wins: false,
            }],
        );
        assert!(bt.posterior[0] < 0.5);
        assert!(
            spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]) == 1.0
                && spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) == -1.0
        );
    }

    fn argmax(p: &[f64]) -> usize {
        (0..p.len()).fold(0, |b, i| if p[i] > p[b] { i } else { b })
    }

    fn accuracy<T: PartialEq + Copy>(truth: &[T], predict: impl Fn(usize) -> T) -> f64 {
        truth
            .iter()
            .enumerate()
            .filter(|(i, t)| predict(*i) == **t)
            .count() as f64
            / truth.len() as f64
    }
}
