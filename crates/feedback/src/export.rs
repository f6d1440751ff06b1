//! Export of live labels as training JSONL with TRL field names, plus provenance
//! (`project`, `item_id`, `annotator_ids`, `label_ids`) in extra fields.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use regex::Regex;
use serde_json::{json, Map, Value};

use crate::error::{invalid, Result};
use crate::model::{Item, Label, LabelValue, Project, TaskKind};
use crate::quality::reliability;

/// How rows are derived from the votes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Options {
    /// Replace e-mail addresses and phone numbers with placeholders.
    pub scrub: bool,
    /// Decide each item by the reliability model's posterior instead of the raw vote
    /// count (pairwise: Crowd-BT; rating: Dawid–Skene), so reliable annotators count
    /// more. Rows get a `confidence` field; a preference row's `margin` becomes
    /// 2·confidence − 1 (1 = certain, 0 = a coin flip).
    pub by_reliability: bool,
    /// With `by_reliability`: leave out items whose posterior confidence is below this.
    pub min_confidence: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// {"prompt","chosen","rejected","margin"} from pairwise votes.
    Preference,
    /// {"prompt","completion","label"} from pairwise votes or ratings.
    Kto,
    /// {"prompt","completion","score"}: mean Likert score over criteria and annotators.
    Rating,
    /// {"prompt","completion","corrected"}, one row per correction.
    Correction,
    /// {"prompt","completion","critique"}, one row per critique.
    Critique,
    /// {"prompt","completion"}: annotator-written ideal responses.
    Demonstration,
}

impl Format {
    pub const ALL: [Format; 6] = [
        Format::Preference,
        Format::Kto,
        Format::Rating,
        Format::Correction,
        Format::Critique,
        Format::Demonstration,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Preference => "preference",
            Format::Kto => "kto",
            Format::Rating => "rating",
            Format::Correction => "correction",
            Format::Critique => "critique",
            Format::Demonstration => "demonstration",
        }
    }
    pub fn parse(s: &str) -> Result<Format> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| invalid(format!("unknown export format {s:?}")))
    }
    /// The formats a project kind can produce (first = default).
    pub fn for_kind(kind: TaskKind) -> &'static [Format] {
        match kind {
            TaskKind::Pairwise => &[Format::Preference, Format::Kto],
            TaskKind::Rating => &[Format::Rating, Format::Kto],
            TaskKind::Correction => &[Format::Correction],
            TaskKind::Critique => &[Format::Critique],
            TaskKind::Demonstration => &[Format::Demonstration],
        }
    }
}

fn pii_patterns() -> &'static [(Regex, &'static str)] {
    static P: OnceLock<Vec<(Regex, &'static str)>> = OnceLock::new();
    P.get_or_init(|| {
        vec![
            (
                Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
                    .unwrap(),
                "[EMAIL]",
            ),
            // International numbers with a leading +, or North-American style 555-123-4567 /
            // (555) 123 4567. Plain digit runs (years, counts, ids) are left alone.
            (
                Regex::new(r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}\d").unwrap(),
                "[PHONE]",
            ),
            (
                Regex::new(r"(?:\(\d{3}\)\s?|\b\d{3}[ .-])\d{3}[ .-]\d{4}\b").unwrap(),
                "[PHONE]",
            ),
        ]
    })
}

/// Replaces e-mail addresses and phone numbers with placeholders.
pub fn scrub_pii(s: &str) -> String {
    let mut out = s.to_string();
    for (re, repl) in pii_patterns() {
        out = re.replace_all(&out, *repl).into_owned();
    }
    out
}

/// Builds export rows by vote count. `labels` must be the project's live labels.
pub fn export_rows(
    project: &Project,
    items: &[Item],
    labels: &[Label],
    format: Format,
    scrub: bool,
) -> Result<Vec<Value>> {
    export_rows_with(
        project,
        items,
        labels,
        format,
        &Options {
            scrub,
            ..Options::default()
        },
    )
}

/// Builds export rows with all options (reliability weighting and filtering).
pub fn export_rows_with(
    project: &Project,
    items: &[Item],
    labels: &[Label],
    format: Format,
    opts: &Options,
) -> Result<Vec<Value>> {
    let scrub = opts.scrub;
    if let Some(c) = opts.min_confidence {
        if !(0.0..=1.0).contains(&c) {
            return Err(invalid(format!(
                "minimum confidence must be between 0 and 1, got {c}"
            )));
        }
    }
    let by_rel = opts.by_reliability || opts.min_confidence.is_some();
    let posterior = if by_rel {
        reliability(project, items, labels).items
    } else {
        BTreeMap::new()
    };
    let confident_enough = |c: f64| opts.min_confidence.is_none_or(|m| c >= m);
    if !Format::for_kind(project.kind).contains(&format) {
        let ok: Vec<&str> = Format::for_kind(project.kind)
            .iter()
            .map(|f| f.as_str())
            .collect();
        return Err(invalid(format!(
            "a {} project exports as {}, not {}",
            project.kind.as_str(),
            ok.join(" or "),
            format.as_str()
        )));
    }
    let mut by_item: BTreeMap<i64, Vec<&Label>> = BTreeMap::new();
    for l in labels.iter().filter(|l| l.project_id == project.id) {
        by_item.entry(l.item_id).or_default().push(l);
    }
    let clean = |s: &str| if scrub { scrub_pii(s) } else { s.to_string() };
    let mut rows = Vec::new();
    for item in items {
        let Some(ls) = by_item.get(&item.id) else {
            continue;
        };
        let provenance = |ls: &[&Label]| {
            let mut m = Map::new();
            m.insert("project".into(), json!(project.name));
            m.insert("item_id".into(), json!(item.id));
            m.insert("external_id".into(), json!(item.external_id));
            m.insert(
                "annotator_ids".into(),
                json!(ls.iter().map(|l| l.user_id).collect::<Vec<_>>()),
            );
            m.insert(
                "label_ids".into(),
                json!(ls.iter().map(|l| l.id).collect::<Vec<_>>()),
            );
            if item.gold.is_some() {
                m.insert("gold".into(), json!(true));
            }
            m
        };
        let base = |ls: &[&Label], fields: Vec<(&str, Value)>| {
            let mut m = Map::new();
            m.insert("prompt".into(), json!(clean(&item.prompt)));
            for (k, v) in fields {
                m.insert(k.into(), v);
            }
            m.extend(provenance(ls));
            Value::Object(m)
        };
        match format {
            Format::Preference | Format::Kto if project.kind == TaskKind::Pairwise => {
                let v = votes(ls);
                let decided = match (by_rel, posterior.get(&item.id)) {
                    _ if v.both_bad_majority() => None,
                    (true, Some(p)) => p.winner.map(|w| (w, 2.0 * p.confidence - 1.0)),
                    (true, None) => None,
                    (false, _) => v.winner(),
                };
                let Some((win, margin)) = decided else {
                    if format == Format::Kto && v.both_bad_majority() {
                        for r in &item.responses {
                            rows.push(base(
                                ls,
                                vec![("completion", json!(clean(r))), ("label", json!(false))],
                            ));
                        }
                    }
                    continue;
                };
                let confidence = posterior.get(&item.id).map(|p| p.confidence);
                if by_rel && !confident_enough(confidence.unwrap_or(0.0)) {
                    continue;
                }
                let (chosen, rejected) = (&item.responses[win], &item.responses[1 - win]);
                let vote_info = json!({"0": v.counts[0], "1": v.counts[1], "tie": v.tie, "both_bad": v.both_bad});
                if format == Format::Preference {
                    let mut r = base(
                        ls,
                        vec![
                            ("chosen", json!(clean(chosen))),
                            ("rejected", json!(clean(rejected))),
                            ("margin", json!(margin)),
                        ],
                    );
                    r["votes"] = vote_info;
                    if let Some(c) = confidence.filter(|_| by_rel) {
                        r["confidence"] = json!(c);
                    }
                    rows.push(r);
                } else {
                    for (text, label) in [(chosen, true), (rejected, false)] {
                        let mut r = base(
                            ls,
                            vec![("completion", json!(clean(text))), ("label", json!(label))],
                        );
                        if let Some(c) = confidence.filter(|_| by_rel) {
                            r["confidence"] = json!(c);
                        }
                        rows.push(r);
                    }
                }
            }
            Format::Rating | Format::Kto => {
                let (mean, per) = mean_scores(ls);
                let Some(mut mean) = mean else { continue };
                let confidence = posterior.get(&item.id).map(|p| p.confidence);
                if by_rel {
                    let Some(p) = posterior.get(&item.id) else {
                        continue;
                    };
                    if !confident_enough(p.confidence) {
                        continue;
                    }
                    mean = p.score.unwrap_or(mean);
                }
                let completion = json!(clean(
                    item.responses.first().map(String::as_str).unwrap_or("")
                ));
                if format == Format::Rating {
                    let mut r = base(ls, vec![("completion", completion), ("score", json!(mean))]);
                    r["criteria_scores"] = json!(per);
                    // The scale, so readers can normalise the score (rlhf-data's rating format).
                    r["score_min"] = json!(1);
                    r["score_max"] = json!(project.likert_max);
                    if let Some(c) = confidence.filter(|_| by_rel) {
                        r["confidence"] = json!(c);
                    }
                    rows.push(r);
                } else {
                    // Desirable when the mean is above the scale midpoint; exactly
                    // neutral items carry no signal and are left out.
                    let mid = (1.0 + project.likert_max as f64) / 2.0;
                    if (mean - mid).abs() > 1e-9 {
                        rows.push(base(
                            ls,
                            vec![("completion", completion), ("label", json!(mean > mid))],
                        ));
                    }
                }
            }
            Format::Correction | Format::Critique | Format::Demonstration => {
                for l in ls {
                    let completion =
                        clean(item.responses.first().map(String::as_str).unwrap_or(""));
                    let fields = match &l.value {
                        LabelValue::Correction {
                            corrected,
                            unified_diff,
                            ..
                        } => vec![
                            ("completion", json!(completion)),
                            ("corrected", json!(clean(corrected))),
                            ("diff", json!(clean(unified_diff))),
                        ],
                        LabelValue::Critique { text } => vec![
                            ("completion", json!(completion)),
                            ("critique", json!(clean(text))),
                        ],
                        LabelValue::Demonstration { text } => {
                            vec![("completion", json!(clean(text)))]
                        }
                        _ => continue,
                    };
                    rows.push(base(&[*l], fields));
                }
            }
            Format::Preference => unreachable!("checked against the project kind above"),
        }
    }
    Ok(rows)
}

/// Pairwise votes on one item, by response index.
#[derive(Debug, Default, PartialEq)]
pub struct Votes {
    pub counts: [u32; 2],
    pub tie: u32,
    pub both_bad: u32,
}

impl Votes {
    /// (winning response index, margin): margin is the vote-share difference between
    /// the two responses among the votes that expressed a comparison (A, B or tie), so
    /// 1.0 = unanimous, and ties pull it towards 0. None when there is no winner.
    pub fn winner(&self) -> Option<(usize, f64)> {
        let [a, b] = self.counts;
        let total = (a + b + self.tie) as f64;
        if a == b || self.both_bad_majority() {
            return None;
        }
        let win = if a > b { 0 } else { 1 };
        Some((win, (a.max(b) - a.min(b)) as f64 / total))
    }
    pub fn both_bad_majority(&self) -> bool {
        self.both_bad > self.counts[0] + self.counts[1] + self.tie
    }
}

pub fn votes(labels: &[&Label]) -> Votes {
    let mut v = Votes::default();
    for l in labels {
        if let LabelValue::Pairwise {
            preferred, choice, ..
        } = &l.value
        {
            match (preferred, choice) {
                (Some(i), _) if *i < 2 => v.counts[*i] += 1,
                (_, crate::model::Choice::BothBad) => v.both_bad += 1,
                _ => v.tie += 1,
            }
        }
    }
    v
}

/// Mean score over all criteria and annotators, and per-criterion means.
fn mean_scores(labels: &[&Label]) -> (Option<f64>, BTreeMap<String, f64>) {
    let mut per: BTreeMap<String, (f64, u32)> = BTreeMap::new();
    for l in labels {
        if let LabelValue::Rating { scores } = &l.value {
            for (c, s) in scores {
                let e = per.entry(c.clone()).or_default();
                e.0 += *s as f64;
                e.1 += 1;
            }
        }
    }
    let (sum, n) = per
        .values()
        .fold((0.0, 0), |(s, n), (cs, cn)| (s + cs, n + cn));
    let means = per
        .into_iter()
        .map(|(c, (s, n))| (c, s / n as f64))
        .collect();
    ((n > 0).then(|| sum / n as f64), means)
}

/// Serialises rows as JSONL.
pub fn to_jsonl(rows: &[Value]) -> String {
    let mut s = String::new();
    for r in rows {
        s.push_str(&r.to_string());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Choice;

    fn project(kind: TaskKind) -> Project {
        Project {
            id: 1,
            name: "p".into(),
            kind,
            criteria: vec!["helpful".into(), "harmless".into()],
            likert_max: 5,
            overlap: 3,
            min_seconds: 3.0,
            guidelines: String::new(),
            created_at: 0,
        }
    }

    fn item(id: i64, responses: &[&str]) -> Item {
        Item {
            id,
            project_id: 1,
            external_id: format!("e{id}"),
            prompt: format!("prompt {id} mail bob@example.com"),
            responses: responses.iter().map(|s| s.to_string()).collect(),
            gold: None,
            uncertainty: None,
            label_count: 0,
        }
    }

    fn label(id: i64, item_id: i64, user: i64, value: LabelValue) -> Label {
        Label {
            id,
            project_id: 1,
            item_id,
            user_id: user,
            assignment_id: None,
            value,
            supersedes: None,
            duration_ms: None,
            created_at: 0,
        }
    }

    fn pw(choice: Choice, order: [usize; 2]) -> LabelValue {
        let preferred = match choice {
            Choice::A => Some(order[0]),
            Choice::B => Some(order[1]),
            _ => None,
        };
        LabelValue::Pairwise {
            choice,
            shown_order: order.to_vec(),
            preferred,
        }
    }

    #[test]
    fn preference_margin_from_vote_share() {
        let p = project(TaskKind::Pairwise);
        let items = vec![item(1, &["r0", "r1"]), item(2, &["s0", "s1"])];
        let labels = vec![
            // item 1: response 1 preferred twice (once shown left, once right), one tie.
            label(10, 1, 100, pw(Choice::A, [1, 0])),
            label(11, 1, 101, pw(Choice::B, [0, 1])),
            label(12, 1, 102, pw(Choice::Tie, [0, 1])),
            // item 2: 1–1 split → no preference row.
            label(13, 2, 100, pw(Choice::A, [0, 1])),
            label(14, 2, 101, pw(Choice::A, [1, 0])),
        ];
        let rows = export_rows(&p, &items, &labels, Format::Preference, true).unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r["chosen"], "r1");
        assert_eq!(r["rejected"], "r0");
        assert!((r["margin"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r["annotator_ids"], json!([100, 101, 102]));
        assert_eq!(r["label_ids"], json!([10, 11, 12]));
        assert_eq!(r["project"], "p");
        assert_eq!(r["prompt"], "prompt 1 mail [EMAIL]");

        let kto = export_rows(&p, &items, &labels, Format::Kto, false).unwrap();
        assert_eq!(kto.len(), 2);
        assert_eq!(
            (kto[0]["completion"].as_str(), kto[0]["label"].as_bool()),
            (Some("r1"), Some(true))
        );
        assert_eq!(
            (kto[1]["completion"].as_str(), kto[1]["label"].as_bool()),
            (Some("r0"), Some(false))
        );
        assert!(export_rows(&p, &items, &labels, Format::Rating, false).is_err());
    }

    #[test]
    fn ratings_and_texts() {
        let p = project(TaskKind::Rating);
        let items = vec![item(1, &["answer"])];
        let scores = |h: i64, s: i64| LabelValue::Rating {
            scores: [("helpful".to_string(), h), ("harmless".to_string(), s)].into(),
        };
        let labels = vec![label(1, 1, 7, scores(5, 4)), label(2, 1, 8, scores(3, 4))];
        let rows = export_rows(&p, &items, &labels, Format::Rating, false).unwrap();
        assert_eq!(rows[0]["score"], json!(4.0));
        assert_eq!(
            rows[0]["criteria_scores"],
            json!({"harmless": 4.0, "helpful": 4.0})
        );
        assert_eq!(
            (rows[0]["score_min"].as_i64(), rows[0]["score_max"].as_i64()),
            (Some(1), Some(5))
        );
        let kto = export_rows(&p, &items, &labels, Format::Kto, false).unwrap();
        assert_eq!(kto[0]["label"], json!(true));

        let p = project(TaskKind::Correction);
        let corr = LabelValue::Correction {
            corrected: "fixed, call 555-123-4567".into(),
            unified_diff: "d".into(),
            word_diff: "w".into(),
        };
        let rows = export_rows(
            &p,
            &items,
            &[label(3, 1, 7, corr)],
            Format::Correction,
            true,
        )
        .unwrap();
        assert_eq!(rows[0]["corrected"], "fixed, call [PHONE]");
        assert_eq!(rows[0]["completion"], "answer");
        assert_eq!(rows[0]["annotator_ids"], json!([7]));
    }

    #[test]
    fn pii() {
        assert_eq!(
            scrub_pii("mail a.b+c@mail.example.co.uk now"),
            "mail [EMAIL] now"
        );
        assert_eq!(
            scrub_pii("call +44 20 7946 0958 or (555) 123-4567."),
            "call [PHONE] or [PHONE]."
        );
        assert_eq!(
            scrub_pii("in 2023 we sold 1234567 units, 3.14159"),
            "in 2023 we sold 1234567 units, 3.14159"
        );
    }
}
