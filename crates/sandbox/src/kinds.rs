//! What each kind of feedback buys per label (`rlhf sandbox feedback-kinds`): the same number of annotator
//! labels spent as pairwise comparisons, Likert ratings or corrections of world replies, each exported by
//! the feedback app's exporter and trained into a reward-model ensemble by `rlhf rm` as it is (preference
//! rows: Bradley–Terry; rating rows: regression on the normalised score; correction rows: corrected ≻
//! original), scored on the same held-out pairs against gold ([`crate::rm_lab`]).
//!
//! A label is one annotator's answer on one item (overlap 1): a comparison of two replies, a score of one
//! reply, or a rewrite of one reply (perfect replies are left alone, so they yield no row). Corrections cost a
//! person more time than a click; this counts labels, not minutes. In this world a demonstration paired with
//! a sampled reply is the same row as a correction, so it has no column of its own.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use rlhf_eval::report::{self, esc, Report, Section};
use rlhf_feedback::export::Format;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::annotators::{corrections, pairwise, ratings, Panel};
use crate::rm_lab::{Lab, RmSetup};
use crate::world::{Mix, Prompt};

/// A kind of feedback the reward model can learn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Pairwise,
    Rating,
    Correction,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pairwise => "pairwise",
            Kind::Rating => "rating",
            Kind::Correction => "correction",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindsConfig {
    pub seeds: Vec<u64>,
    pub mix: Mix,
    pub rm: RmSetup,
    /// Prompts whose replies are labelled (at least the largest budget).
    pub pool_prompts: usize,
    pub eval_prompts: usize,
    /// Annotator labels per kind; each budget's labels are the first ones of the next.
    pub label_budgets: Vec<usize>,
    /// Who labels (each item by one annotator: the panel's overlap is ignored).
    pub panel: Panel,
    pub kinds: Vec<Kind>,
}

impl KindsConfig {
    pub fn standard() -> Self {
        KindsConfig {
            seeds: vec![0, 1],
            mix: Mix::default(),
            rm: RmSetup::standard(),
            pool_prompts: 1500,
            eval_prompts: 600,
            label_budgets: vec![100, 200, 400],
            panel: Panel::default_mix(0),
            kinds: vec![Kind::Pairwise, Kind::Rating, Kind::Correction],
        }
    }

    pub fn quick() -> Self {
        KindsConfig {
            seeds: vec![0],
            rm: RmSetup::quick(),
            pool_prompts: 160,
            eval_prompts: 120,
            label_budgets: vec![16, 48],
            ..Self::standard()
        }
    }

    fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            !self.seeds.is_empty() && !self.kinds.is_empty(),
            "give at least one seed and one kind"
        );
        let max = self
            .label_budgets
            .iter()
            .copied()
            .max()
            .context("label_budgets: give at least one")?;
        anyhow::ensure!(
            max <= self.pool_prompts,
            "pool_prompts ({}) must hold the largest budget ({max})",
            self.pool_prompts
        );
        anyhow::ensure!(
            self.label_budgets.iter().all(|&b| b > 0),
            "label_budgets must be > 0"
        );
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub seed: u64,
    pub kind: Kind,
    pub labels: usize,
    /// Rows the exporter wrote from those labels (ties, and perfect replies left uncorrected, give none).
    pub training_rows: usize,
    /// Held-out pairs ordered as gold orders them by the ensemble mean (ties count half).
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct KindsSummary {
    pub config: KindsConfig,
    pub eval_pairs: Vec<usize>,
    pub measurements: Vec<Measurement>,
    /// Per kind: (labels, accuracy averaged over seeds).
    pub mean: BTreeMap<String, Vec<(usize, f64)>>,
    pub findings: Vec<String>,
}

/// Runs every seed, kind and budget in `out` (replaced); writes `feedback_kinds.json`, `.md` and `.html`.
pub fn run(cfg: &KindsConfig, out: &Path) -> Result<KindsSummary> {
    cfg.validate()?;
    crate::rm_lab::fresh_dir(out)?;
    let (mut measurements, mut eval_pairs) = (Vec::new(), Vec::new());
    for &seed in &cfg.seeds {
        let lab = Lab::new(
            &cfg.rm,
            &cfg.mix,
            cfg.pool_prompts,
            cfg.eval_prompts,
            seed,
            &out.join(format!("seed-{seed}")),
        )?;
        for (k, &kind) in cfg.kinds.iter().enumerate() {
            let rows = labelled_rows(cfg, &lab, kind)?;
            for (b, &labels) in cfg.label_budgets.iter().enumerate() {
                // Rows of the first `labels` items: the exporter numbers items from 1 in pool order.
                let mine: Vec<Value> = rows
                    .iter()
                    .filter(|r| r["item_id"].as_u64().is_some_and(|i| i as usize <= labels))
                    .cloned()
                    .collect();
                let salt = (k * cfg.label_budgets.len() + b) as u64;
                let accuracy = if mine.is_empty() {
                    0.5
                } else {
                    lab.train_and_score(&mine, salt)?.0
                };
                eprintln!(
                    "  seed {seed} {:<10} {labels:>5} labels ({} rows): accuracy {accuracy:.3}",
                    kind.name(),
                    mine.len()
                );
                measurements.push(Measurement {
                    seed,
                    kind,
                    labels,
                    training_rows: mine.len(),
                    accuracy,
                });
            }
        }
        eval_pairs.push(lab.eval.len());
        lab.finish()?;
    }
    let mean: BTreeMap<String, Vec<(usize, f64)>> = cfg
        .kinds
        .iter()
        .map(|&k| {
            let pts = cfg
                .label_budgets
                .iter()
                .map(|&l| {
                    let v: Vec<f64> = measurements
                        .iter()
                        .filter(|m| m.kind == k && m.labels == l)
                        .map(|m| m.accuracy)
                        .collect();
                    (l, v.iter().sum::<f64>() / v.len() as f64)
                })
                .collect();
            (k.name().to_string(), pts)
        })
        .collect();
    let findings = findings(&mean, &measurements);
    let s = KindsSummary {
        config: cfg.clone(),
        eval_pairs,
        measurements,
        mean,
        findings,
    };
    crate::rm_lab::write_reports(
        out,
        "feedback_kinds",
        &serde_json::to_string_pretty(&s)?,
        &markdown(&s),
        &html(&s),
    )?;
    Ok(s)
}

/// The exporter's rows for labels on the first (largest budget) pool items, one annotator each.
fn labelled_rows(cfg: &KindsConfig, lab: &Lab, kind: Kind) -> Result<Vec<Value>> {
    let n = cfg.label_budgets.iter().copied().max().unwrap_or(0);
    let panel = Panel {
        overlap: 1,
        seed: lab.seed,
        ..cfg.panel.clone()
    };
    let items = &lab.pool[..n];
    let one: Vec<(&Prompt, String)> = items.iter().map(|p| (&p.prompt, p.a.clone())).collect();
    Ok(match kind {
        Kind::Pairwise => {
            let two: Vec<(&Prompt, String, String)> = items
                .iter()
                .map(|p| (&p.prompt, p.a.clone(), p.b.clone()))
                .collect();
            pairwise(&panel, &two).export(Format::Preference)?
        }
        Kind::Rating => ratings(&panel, &one).export(Format::Rating)?,
        Kind::Correction => corrections(&panel, &one).export(Format::Correction)?,
    })
}

/// The ranking of the kinds at each budget, judged against the seed-to-seed spread: the mean over (kind,
/// budget) of the range of accuracies across seeds. A lead smaller than that spread is said to be unclear.
fn findings(
    mean: &BTreeMap<String, Vec<(usize, f64)>>,
    measurements: &[Measurement],
) -> Vec<String> {
    let Some(first) = mean.values().next() else {
        return vec![];
    };
    let mut ranges = BTreeMap::<(Kind, usize), (f64, f64)>::new();
    for m in measurements {
        let r = ranges
            .entry((m.kind, m.labels))
            .or_insert((f64::INFINITY, f64::NEG_INFINITY));
        *r = (r.0.min(m.accuracy), r.1.max(m.accuracy));
    }
    let spread = ranges.values().map(|r| r.1 - r.0).sum::<f64>() / ranges.len().max(1) as f64;
    let several_seeds = measurements.iter().any(|m| m.seed != measurements[0].seed);
    first
        .iter()
        .enumerate()
        .map(|(i, &(labels, _))| {
            let mut row: Vec<(&String, f64)> = mean.iter().map(|(k, v)| (k, v[i].1)).collect();
            row.sort_by(|a, b| b.1.total_cmp(&a.1));
            let rest: Vec<String> = row[1..]
                .iter()
                .map(|(k, a)| format!("{k} {:.1} %", 100.0 * a))
                .collect();
            let lead = row[0].1 - row.get(1).map_or(row[0].1, |r| r.1);
            let verdict = match several_seeds {
                false => "one seed: no spread to judge the lead by".to_string(),
                true if lead < spread => format!(
                    "a lead of {:.1} points, smaller than the seed-to-seed spread of {:.1}: NOT a clear difference",
                    100.0 * lead,
                    100.0 * spread
                ),
                true => format!(
                    "a lead of {:.1} points, larger than the seed-to-seed spread of {:.1}",
                    100.0 * lead,
                    100.0 * spread
                ),
            };
            format!(
                "{labels} labels: {} {:.1} %, then {} ({verdict})",
                row[0].0,
                100.0 * row[0].1,
                rest.join(", ")
            )
        })
        .collect()
}

pub fn markdown(s: &KindsSummary) -> String {
    let kinds: Vec<&String> = s.mean.keys().collect();
    let mut m = String::new();
    let _ = writeln!(
        m,
        "| labels | {} |",
        kinds
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(m, "|---|{}", "---|".repeat(kinds.len()));
    for (i, &labels) in s.config.label_budgets.iter().enumerate() {
        let cells: Vec<String> = kinds
            .iter()
            .map(|k| format!("{:.1} %", 100.0 * s.mean[*k][i].1))
            .collect();
        let _ = writeln!(m, "| {labels} | {} |", cells.join(" | "));
    }
    let _ = writeln!(m, "\nMean over seeds {:?}; held-out pairs per seed {:?}. Per seed (accuracy, training rows):\n", s.config.seeds, s.eval_pairs);
    for x in &s.measurements {
        let _ = writeln!(
            m,
            "- seed {} {} {} labels: {:.1} % ({} rows)",
            x.seed,
            x.kind.name(),
            x.labels,
            100.0 * x.accuracy,
            x.training_rows
        );
    }
    let _ = writeln!(m);
    for f in &s.findings {
        let _ = writeln!(m, "- {f}");
    }
    m
}

fn html(s: &KindsSummary) -> String {
    let series: Vec<(String, Vec<(f64, f64)>)> = s
        .mean
        .iter()
        .map(|(k, v)| (k.clone(), v.iter().map(|&(x, y)| (x as f64, y)).collect()))
        .collect();
    let mut h = String::from("<ul>");
    for f in &s.findings {
        let _ = write!(h, "<li>{}</li>", esc(f));
    }
    h.push_str("</ul>");
    h.push_str(&report::line_chart(
        "held-out accuracy against gold",
        "labels",
        "accuracy",
        &series,
        false,
    ));
    report::render(&Report {
        title: "rlhf sandbox: what each kind of feedback buys".into(),
        intro: format!(
            "<p>The same number of annotator labels as comparisons, ratings or corrections; reward-model ensembles of {} members trained on the exporter's rows; seeds {:?}.</p>",
            s.config.rm.members, s.config.seeds
        ),
        sections: vec![Section { id: "kinds".into(), heading: "Accuracy per label budget".into(), html: h }],
    })
}
