//! Live quality numbers for a project: agreement between annotators and per-annotator
//! flags (position bias, length bias, speed, accuracy on gold items, reliability).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::model::{Choice, Item, Label, LabelValue, Project, TaskKind, User};
use crate::reliability::{bradley_terry, dawid_skene, Comparison, Vote};
use crate::stats::{
    alpha_from_ratings, fleiss_from_ratings, median, pairwise_cohen, Metric, Rating,
};

/// Flag thresholds (documented in docs/feedback/README.md).
pub const BIAS_MIN_DECISIVE: usize = 10;
pub const BIAS_MAX_DEVIATION: f64 = 0.25;
pub const FAST_MIN_LABELS: usize = 5;
pub const GOLD_MIN_ANSWERED: usize = 3;
pub const GOLD_MIN_ACCURACY: f64 = 0.6;
/// Pairwise: flag annotators whose estimated reliability (P(picks the better response))
/// is below this, over at least `RELIABILITY_MIN_LABELS` decisive answers.
pub const RELIABILITY_MIN: f64 = 0.6;
pub const RELIABILITY_MIN_LABELS: usize = 10;
/// Pairwise: flag annotators who, where they disagree with the other annotators' majority on an item whose
/// responses differ in length, picked the longer response in at least `LENGTH_MIN_SHARE` of at least
/// `LENGTH_MIN_DISAGREEMENTS` such items.
pub const LENGTH_MIN_DISAGREEMENTS: usize = 20;
pub const LENGTH_MIN_SHARE: f64 = 0.75;

#[derive(Debug, Serialize)]
pub struct Agreement {
    /// What the numbers are over, e.g. "preference" or "criterion helpful".
    pub scope: String,
    pub units: usize,
    pub fleiss_kappa: Option<f64>,
    pub alpha_nominal: Option<f64>,
    pub alpha_ordinal: Option<f64>,
    pub alpha_interval: Option<f64>,
    /// (annotator a, annotator b, shared units, Cohen's κ)
    pub cohen: Vec<(i64, i64, usize, Option<f64>)>,
}

#[derive(Debug, Serialize)]
pub struct AnnotatorStats {
    pub user_id: i64,
    pub username: String,
    pub labels: usize,
    /// Pairwise only: share of decisive (A/B) answers that picked the left side.
    pub left_share: Option<f64>,
    pub decisive: usize,
    /// Pairwise only: items (responses of different length) where this annotator's decisive answer differs
    /// from the majority of the others' decisive answers.
    pub length_disagreements: usize,
    /// Share of those disagreements in which this annotator picked the longer response.
    pub longer_share: Option<f64>,
    pub median_seconds: Option<f64>,
    pub gold_answered: usize,
    pub gold_accuracy: Option<f64>,
    /// Estimated by the project's reliability model (see [`Reliability`]).
    pub reliability: Option<f64>,
    pub flags: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ProjectStats {
    pub agreement: Vec<Agreement>,
    pub annotators: Vec<AnnotatorStats>,
    /// "crowd-bt" (pairwise), "dawid-skene" (ratings) or none (free text).
    pub reliability_model: Option<&'static str>,
}

/// The posterior answer on one item from the reliability model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ItemPosterior {
    /// Pairwise: the response index more likely to be better.
    pub winner: Option<usize>,
    /// Rating: posterior mean score, averaged over criteria.
    pub score: Option<f64>,
    /// Pairwise: P(winner is better); rating: mean over criteria of the most likely score's probability.
    pub confidence: f64,
}

/// Annotator reliabilities and item posteriors of a project.
#[derive(Debug, Default)]
pub struct Reliability {
    pub model: Option<&'static str>,
    pub annotators: BTreeMap<i64, f64>,
    pub items: BTreeMap<i64, ItemPosterior>,
}

/// Runs the estimator that fits the project: Crowd-BT over decisive pairwise answers
/// (responses are objects, so a response compared in several pairs links them), or
/// Dawid–Skene per rating criterion (scores as classes).
pub fn reliability(project: &Project, items: &[Item], labels: &[Label]) -> Reliability {
    let users: Vec<i64> = {
        let mut u: Vec<i64> = labels.iter().map(|l| l.user_id).collect();
        u.sort_unstable();
        u.dedup();
        u
    };
    let uidx = |id: i64| users.binary_search(&id).unwrap_or(0);
    let item_idx: BTreeMap<i64, usize> =
        items.iter().enumerate().map(|(i, it)| (it.id, i)).collect();
    let mut out = Reliability::default();
    match project.kind {
        TaskKind::Pairwise => {
            let mut objects: BTreeMap<(&str, &str), usize> = BTreeMap::new();
            let mut pairs: Vec<(usize, usize)> = Vec::with_capacity(items.len());
            for it in items {
                let mut ids = [0usize; 2];
                for (slot, r) in ids.iter_mut().zip(it.responses.iter().take(2)) {
                    let n = objects.len();
                    *slot = *objects.entry((it.prompt.as_str(), r.as_str())).or_insert(n);
                }
                pairs.push((ids[0], ids[1]));
            }
            let comparisons: Vec<Comparison> = labels
                .iter()
                .filter_map(|l| match (&l.value, item_idx.get(&l.item_id)) {
                    (
                        LabelValue::Pairwise {
                            preferred: Some(p), ..
                        },
                        Some(&i),
                    ) if *p < 2 => Some(Comparison {
                        item: i,
                        annotator: uidx(l.user_id),
                        first_wins: *p == 0,
                    }),
                    _ => None,
                })
                .collect();
            if comparisons.is_empty() {
                return out;
            }
            let bt = bradley_terry(objects.len(), &pairs, users.len(), &comparisons);
            out.model = Some("crowd-bt");
            for c in &comparisons {
                let q = bt.posterior[c.item];
                let (winner, confidence) = if q >= 0.5 { (0, q) } else { (1, 1.0 - q) };
                out.items.insert(
                    items[c.item].id,
                    ItemPosterior {
                        winner: Some(winner),
                        score: None,
                        confidence,
                    },
                );
            }
            out.annotators = users
                .iter()
                .zip(&bt.reliability)
                .filter(|(_, r)| r.is_finite())
                .map(|(u, r)| (*u, *r))
                .collect();
        }
        TaskKind::Rating => {
            let k = project.likert_max.max(2) as usize;
            let mut per_user: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
            let mut per_item: BTreeMap<i64, (f64, f64, u32)> = BTreeMap::new();
            for c in &project.criteria {
                let votes: Vec<Vote> = labels
                    .iter()
                    .filter_map(|l| match (&l.value, item_idx.get(&l.item_id)) {
                        (LabelValue::Rating { scores }, Some(&i)) => scores
                            .get(c)
                            .filter(|s| (1..=k as i64).contains(s))
                            .map(|s| Vote {
                                item: i,
                                annotator: uidx(l.user_id),
                                label: (*s - 1) as usize,
                            }),
                        _ => None,
                    })
                    .collect();
                if votes.is_empty() {
                    continue;
                }
                let ds = dawid_skene(items.len(), users.len(), k, &votes);
                for (u, r) in users.iter().zip(&ds.reliability) {
                    if r.is_finite() {
                        per_user.entry(*u).or_default().push(*r);
                    }
                }
                let mut seen = std::collections::BTreeSet::new();
                for v in &votes {
                    if seen.insert(v.item) {
                        let p = &ds.posterior[v.item];
                        let mean: f64 = p.iter().enumerate().map(|(s, q)| (s + 1) as f64 * q).sum();
                        let conf = p.iter().cloned().fold(0.0, f64::max);
                        let e = per_item.entry(items[v.item].id).or_insert((0.0, 0.0, 0));
                        *e = (e.0 + mean, e.1 + conf, e.2 + 1);
                    }
                }
            }
            if per_item.is_empty() {
                return out;
            }
            out.model = Some("dawid-skene");
            out.annotators = per_user
                .into_iter()
                .map(|(u, rs)| (u, rs.iter().sum::<f64>() / rs.len() as f64))
                .collect();
            out.items = per_item
                .into_iter()
                .map(|(id, (m, c, n))| {
                    (
                        id,
                        ItemPosterior {
                            winner: None,
                            score: Some(m / n as f64),
                            confidence: c / n as f64,
                        },
                    )
                })
                .collect();
        }
        TaskKind::Correction | TaskKind::Critique | TaskKind::Demonstration => {}
    }
    out
}

/// Nominal code of a pairwise answer in terms of responses (not sides): 0/1 = that
/// response preferred, 2 = tie, 3 = both bad.
fn pairwise_code(v: &LabelValue) -> Option<f64> {
    match v {
        LabelValue::Pairwise {
            preferred: Some(i), ..
        } => Some(*i as f64),
        LabelValue::Pairwise {
            choice: Choice::BothBad,
            ..
        } => Some(3.0),
        LabelValue::Pairwise { .. } => Some(2.0),
        _ => None,
    }
}

fn agreement(scope: String, ratings: &[Rating], numeric: bool) -> Agreement {
    let mut per_unit: BTreeMap<i64, usize> = BTreeMap::new();
    for r in ratings {
        *per_unit.entry(r.0).or_default() += 1;
    }
    Agreement {
        scope,
        units: per_unit.values().filter(|&&n| n >= 2).count(),
        fleiss_kappa: fleiss_from_ratings(ratings),
        alpha_nominal: alpha_from_ratings(ratings, Metric::Nominal),
        alpha_ordinal: numeric
            .then(|| alpha_from_ratings(ratings, Metric::Ordinal))
            .flatten(),
        alpha_interval: numeric
            .then(|| alpha_from_ratings(ratings, Metric::Interval))
            .flatten(),
        cohen: pairwise_cohen(ratings, 2),
    }
}

/// Whether a label matches an item's gold answer.
fn gold_match(gold: &Value, v: &LabelValue) -> Option<bool> {
    match v {
        LabelValue::Pairwise {
            preferred, choice, ..
        } => Some(match gold {
            Value::Number(n) => preferred
                .map(|p| Some(p as u64) == n.as_u64())
                .unwrap_or(false),
            Value::String(s) if s == "tie" => *choice == Choice::Tie,
            Value::String(s) if s == "both_bad" => *choice == Choice::BothBad,
            _ => return None,
        }),
        // Within one scale point on every criterion the gold answer specifies.
        LabelValue::Rating { scores } => {
            let g = gold.as_object()?;
            Some(
                g.iter()
                    .all(|(c, want)| match (scores.get(c), want.as_i64()) {
                        (Some(got), Some(w)) => (got - w).abs() <= 1,
                        _ => false,
                    }),
            )
        }
        _ => None,
    }
}

/// Per annotator: (disagreements with the others' majority on items whose responses differ in length, how
/// many of them picked the longer response). The longer response is often the better one too (a complete
/// answer is longer than a truncated one), so a raw "picks the longer" rate confounds quality with length;
/// where the others agree on what is better and this annotator does not, the item's quality is settled by
/// the others and what remains is the annotator's own leaning.
fn length_disagreements(
    items: &BTreeMap<i64, &Item>,
    labels: &[Label],
) -> BTreeMap<i64, (usize, usize)> {
    let mut picks: BTreeMap<i64, Vec<(i64, usize)>> = BTreeMap::new();
    for l in labels {
        if let LabelValue::Pairwise {
            preferred: Some(p), ..
        } = &l.value
        {
            if *p < 2 {
                picks.entry(l.item_id).or_default().push((l.user_id, *p));
            }
        }
    }
    let mut out: BTreeMap<i64, (usize, usize)> = BTreeMap::new();
    for (item_id, votes) in &picks {
        let Some(item) = items.get(item_id) else {
            continue;
        };
        let [a, b] = [0, 1].map(|i| item.responses.get(i).map_or(0, |r| r.chars().count()));
        if a == b {
            continue;
        }
        let longer = usize::from(b > a);
        for &(user, pick) in votes {
            let for_first = votes.iter().filter(|(u, p)| *u != user && *p == 0).count();
            let for_second = votes.iter().filter(|(u, p)| *u != user && *p == 1).count();
            let majority = match for_first.cmp(&for_second) {
                std::cmp::Ordering::Greater => 0,
                std::cmp::Ordering::Less => 1,
                std::cmp::Ordering::Equal => continue,
            };
            if pick != majority {
                let e = out.entry(user).or_default();
                *e = (e.0 + 1, e.1 + usize::from(pick == longer));
            }
        }
    }
    out
}

pub fn project_stats(
    project: &Project,
    items: &[Item],
    labels: &[Label],
    users: &[User],
) -> ProjectStats {
    let items_by_id: BTreeMap<i64, &Item> = items.iter().map(|i| (i.id, i)).collect();
    let mut agreement_out = Vec::new();
    match project.kind {
        TaskKind::Pairwise => {
            let ratings: Vec<Rating> = labels
                .iter()
                .filter_map(|l| pairwise_code(&l.value).map(|c| (l.item_id, l.user_id, c)))
                .collect();
            agreement_out.push(agreement("preference (nominal)".into(), &ratings, false));
        }
        TaskKind::Rating => {
            for c in &project.criteria {
                let ratings: Vec<Rating> = labels
                    .iter()
                    .filter_map(|l| match &l.value {
                        LabelValue::Rating { scores } => {
                            scores.get(c).map(|s| (l.item_id, l.user_id, *s as f64))
                        }
                        _ => None,
                    })
                    .collect();
                agreement_out.push(agreement(format!("criterion {c}"), &ratings, true));
            }
        }
        // Free-text tasks have no categorical answer to agree on.
        TaskKind::Correction | TaskKind::Critique | TaskKind::Demonstration => {}
    }

    let rel = reliability(project, items, labels);
    let by_length = length_disagreements(&items_by_id, labels);
    let mut annotators = Vec::new();
    for u in users {
        let mine: Vec<&Label> = labels.iter().filter(|l| l.user_id == u.id).collect();
        if mine.is_empty() {
            continue;
        }
        let mut left = 0;
        let mut decisive = 0;
        for l in &mine {
            if let LabelValue::Pairwise { choice, .. } = &l.value {
                match choice {
                    Choice::A => {
                        left += 1;
                        decisive += 1
                    }
                    Choice::B => decisive += 1,
                    _ => {}
                }
            }
        }
        let left_share = (decisive > 0).then(|| left as f64 / decisive as f64);
        let secs: Vec<f64> = mine
            .iter()
            .filter_map(|l| l.duration_ms)
            .map(|d| d as f64 / 1000.0)
            .collect();
        let median_seconds = median(&secs);
        let gold: Vec<bool> = mine
            .iter()
            .filter_map(|l| {
                items_by_id
                    .get(&l.item_id)
                    .and_then(|i| i.gold.as_ref())
                    .and_then(|g| gold_match(g, &l.value))
            })
            .collect();
        let gold_accuracy = (!gold.is_empty())
            .then(|| gold.iter().filter(|&&b| b).count() as f64 / gold.len() as f64);
        let mut flags = Vec::new();
        if let Some(s) = left_share {
            if decisive >= BIAS_MIN_DECISIVE && (s - 0.5).abs() >= BIAS_MAX_DEVIATION {
                let side = if s > 0.5 { "left" } else { "right" };
                flags.push(format!(
                    "position bias: picks the {side} side in {:.0}% of {decisive} decisions",
                    100.0 * s.max(1.0 - s)
                ));
            }
        }
        let (length_disagreements, longer) = by_length.get(&u.id).copied().unwrap_or((0, 0));
        let longer_share =
            (length_disagreements > 0).then(|| longer as f64 / length_disagreements as f64);
        if let Some(s) = longer_share {
            if length_disagreements >= LENGTH_MIN_DISAGREEMENTS && s >= LENGTH_MIN_SHARE {
                flags.push(format!(
                    "prefers the longer response: picks it in {:.0}% of {length_disagreements} disagreements with the others",
                    100.0 * s
                ));
            }
        }
        if let Some(m) = median_seconds {
            if secs.len() >= FAST_MIN_LABELS && m < project.min_seconds {
                flags.push(format!(
                    "too fast: median {m:.1}s per item (threshold {:.1}s)",
                    project.min_seconds
                ));
            }
        }
        if let Some(a) = gold_accuracy {
            if gold.len() >= GOLD_MIN_ANSWERED && a < GOLD_MIN_ACCURACY {
                flags.push(format!(
                    "low gold agreement: {:.0}% of {} gold items",
                    100.0 * a,
                    gold.len()
                ));
            }
        }
        let reliability = rel.annotators.get(&u.id).copied();
        if let (Some(r), TaskKind::Pairwise) = (reliability, project.kind) {
            if decisive >= RELIABILITY_MIN_LABELS && r < RELIABILITY_MIN {
                flags.push(format!(
                    "low reliability: picks the better response {:.0}% of the time (estimated)",
                    100.0 * r
                ));
            }
        }
        annotators.push(AnnotatorStats {
            user_id: u.id,
            username: u.username.clone(),
            labels: mine.len(),
            left_share,
            decisive,
            length_disagreements,
            longer_share,
            median_seconds,
            gold_answered: gold.len(),
            gold_accuracy,
            reliability,
            flags,
        });
    }
    ProjectStats {
        agreement: agreement_out,
        annotators,
        reliability_model: rel.model,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;
    use serde_json::json;

    /// Project 1: pairwise, every item labelled by `overlap` annotators, 3 s minimum per label.
    fn pairwise_project(overlap: i64) -> Project {
        Project {
            id: 1,
            name: "p".into(),
            kind: TaskKind::Pairwise,
            criteria: vec![],
            likert_max: 5,
            overlap,
            min_seconds: 3.0,
            guidelines: String::new(),
            created_at: 0,
        }
    }

    #[test]
    fn flags() {
        let p = pairwise_project(2);
        let items: Vec<Item> = (0..12)
            .map(|i| Item {
                id: i,
                project_id: 1,
                external_id: i.to_string(),
                prompt: "p".into(),
                responses: vec!["a".into(), "b".into()],
                gold: (i < 4).then(|| json!(0)),
                uncertainty: None,
                label_count: 0,
            })
            .collect();
        let users = vec![
            User {
                id: 1,
                username: "lefty".into(),
                role: Role::Annotator,
                has_password: true,
            },
            User {
                id: 2,
                username: "careful".into(),
                role: Role::Annotator,
                has_password: true,
            },
        ];
        let mut labels = vec![];
        for i in 0..12 {
            // lefty always picks the left side, fast, with a randomised order.
            let order = if i % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
            let pref = order[0];
            labels.push(Label {
                id: i * 2,
                project_id: 1,
                item_id: i,
                user_id: 1,
                assignment_id: None,
                value: LabelValue::Pairwise {
                    choice: Choice::A,
                    shown_order: order,
                    preferred: Some(pref),
                },
                supersedes: None,
                duration_ms: Some(800),
                created_at: 0,
            });
            // careful always prefers response 0 (the gold answer), slowly.
            labels.push(Label {
                id: i * 2 + 1,
                project_id: 1,
                item_id: i,
                user_id: 2,
                assignment_id: None,
                value: LabelValue::Pairwise {
                    choice: if i % 2 == 0 { Choice::A } else { Choice::B },
                    shown_order: if i % 2 == 0 { vec![0, 1] } else { vec![1, 0] },
                    preferred: Some(0),
                },
                supersedes: None,
                duration_ms: Some(9000),
                created_at: 0,
            });
        }
        let s = project_stats(&p, &items, &labels, &users);
        let lefty = &s.annotators[0];
        assert_eq!(lefty.left_share, Some(1.0));
        assert_eq!(lefty.flags.len(), 4, "{:?}", lefty.flags);
        assert!(lefty.flags[0].starts_with("position bias"));
        assert!(lefty.flags[1].starts_with("too fast"));
        assert!(lefty.flags[2].starts_with("low gold agreement: 50%"));
        // Crowd-BT sides with the consistent annotator: lefty is right half the time.
        assert!(
            lefty.flags[3].starts_with("low reliability: picks the better response 5"),
            "{:?}",
            lefty.flags
        );
        let careful = &s.annotators[1];
        assert!(careful.flags.is_empty(), "{:?}", careful.flags);
        assert!(
            careful.reliability.unwrap() > 0.8,
            "{:?}",
            careful.reliability
        );
        assert_eq!(careful.gold_accuracy, Some(1.0));
        // They agree on half of the items (the ones where left = response 0).
        let a = &s.agreement[0];
        assert_eq!(a.units, 12);
        assert_eq!(a.cohen.len(), 1);
        assert_eq!(a.cohen[0].2, 12);
    }

    /// Pairwise items whose two responses have the given lengths, with every annotator's choice of response
    /// (`pick(annotator, item)` → 0/1), each shown in its natural order.
    fn pairwise_set(
        n: i64,
        lengths: impl Fn(i64) -> (usize, usize),
        names: &[&str],
        pick: impl Fn(usize, i64) -> usize,
    ) -> ProjectStats {
        let p = pairwise_project(names.len() as i64);
        let items: Vec<Item> = (0..n)
            .map(|i| {
                let (a, b) = lengths(i);
                Item {
                    id: i,
                    project_id: 1,
                    external_id: i.to_string(),
                    prompt: "p".into(),
                    responses: vec!["x".repeat(a), "y".repeat(b)],
                    gold: None,
                    uncertainty: None,
                    label_count: 0,
                }
            })
            .collect();
        let users: Vec<User> = names
            .iter()
            .enumerate()
            .map(|(u, name)| User {
                id: u as i64 + 1,
                username: name.to_string(),
                role: Role::Annotator,
                has_password: true,
            })
            .collect();
        let mut labels = vec![];
        for i in 0..n {
            for u in 0..names.len() {
                let p = pick(u, i);
                labels.push(Label {
                    id: labels.len() as i64,
                    project_id: 1,
                    item_id: i,
                    user_id: u as i64 + 1,
                    assignment_id: None,
                    value: LabelValue::Pairwise {
                        choice: if p == 0 { Choice::A } else { Choice::B },
                        shown_order: vec![0, 1],
                        preferred: Some(p),
                    },
                    supersedes: None,
                    duration_ms: Some(9000),
                    created_at: 0,
                });
            }
        }
        project_stats(&p, &items, &labels, &users)
    }

    fn length_flag(a: &AnnotatorStats) -> Option<&String> {
        a.flags
            .iter()
            .find(|f| f.starts_with("prefers the longer response"))
    }

    #[test]
    fn length_flag_catches_the_annotator_who_prefers_longer_responses() {
        // 72 items: the longer response sits left on even items; it is the better one on half of the items
        // (i % 4 < 2). Careful annotators pick the better one; "noisy" errs on every third item, as often
        // towards the shorter as towards the longer response; the long-lover always picks the longer, the
        // short-lover always the shorter.
        let names = [
            "careful-1",
            "careful-2",
            "careful-3",
            "noisy",
            "long-lover",
            "short-lover",
        ];
        let longer = |i: i64| usize::from(i % 2 == 1);
        let better = |i: i64| if i % 4 < 2 { longer(i) } else { 1 - longer(i) };
        let s = pairwise_set(
            72,
            |i| if i % 2 == 0 { (40, 8) } else { (8, 40) },
            &names,
            |u, i| match names[u] {
                "noisy" if i % 3 == 0 => 1 - better(i),
                "long-lover" => longer(i),
                "short-lover" => 1 - longer(i),
                _ => better(i),
            },
        );
        let by = |n: &str| s.annotators.iter().find(|a| a.username == n).unwrap();
        let long = by("long-lover");
        // It disagrees with the others' majority exactly where the shorter response is better.
        assert_eq!(
            (long.length_disagreements, long.longer_share),
            (36, Some(1.0))
        );
        assert_eq!(
            length_flag(long).map(String::as_str),
            Some(
                "prefers the longer response: picks it in 100% of 36 disagreements with the others"
            )
        );
        // As many disagreements, but no leaning: not flagged.
        let noisy = by("noisy");
        assert_eq!(
            (noisy.length_disagreements, noisy.longer_share),
            (24, Some(0.5))
        );
        assert_eq!(length_flag(noisy), None, "{:?}", noisy.flags);
        // Preferring shorter responses is not this flag's concern.
        let short = by("short-lover");
        assert_eq!(short.longer_share, Some(0.0));
        assert_eq!(length_flag(short), None, "{:?}", short.flags);
        for n in ["careful-1", "careful-2", "careful-3"] {
            assert_eq!(by(n).length_disagreements, 0, "{n}");
            assert!(by(n).flags.is_empty(), "{n}: {:?}", by(n).flags);
        }
    }

    #[test]
    fn length_flag_needs_enough_disagreements_and_different_lengths() {
        let names = ["careful-1", "careful-2", "long-lover"];
        let longer = |i: i64| usize::from(i % 2 == 1);
        let better = |i: i64| if i % 4 < 2 { longer(i) } else { 1 - longer(i) };
        let pick = |u: usize, i: i64| {
            if names[u] == "long-lover" {
                longer(i)
            } else {
                better(i)
            }
        };
        // Equal lengths: nothing to measure.
        let s = pairwise_set(72, |_| (20, 20), &names, pick);
        assert!(s
            .annotators
            .iter()
            .all(|a| a.length_disagreements == 0 && a.longer_share.is_none()));
        assert!(s.annotators.iter().all(|a| length_flag(a).is_none()));
        // 19 disagreements, all towards the longer response: below the minimum count.
        let s = pairwise_set(
            39,
            |i| if i % 2 == 0 { (40, 8) } else { (8, 40) },
            &names,
            pick,
        );
        let long = s
            .annotators
            .iter()
            .find(|a| a.username == "long-lover")
            .unwrap();
        assert_eq!(
            (long.length_disagreements, long.longer_share),
            (19, Some(1.0))
        );
        assert_eq!(length_flag(long), None, "{:?}", long.flags);
        // One more and it is flagged.
        let s = pairwise_set(
            40,
            |i| if i % 2 == 0 { (40, 8) } else { (8, 40) },
            &names,
            pick,
        );
        let long = s
            .annotators
            .iter()
            .find(|a| a.username == "long-lover")
            .unwrap();
        assert_eq!(long.length_disagreements, LENGTH_MIN_DISAGREEMENTS);
        assert!(length_flag(long).is_some(), "{:?}", long.flags);
    }
}
