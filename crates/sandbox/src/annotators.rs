//! Simulated annotators. They label through the feedback app's own data model ([`Label`]s on [`Item`]s of a
//! [`Project`]), so their output is exported by the app's exporter (exactly its JSONL formats) and checked by
//! the app's quality code (agreement, position-bias / speed / gold-accuracy flags).
//!
//! A pairwise choice is Bradley–Terry on the gold reward: P(response 0 ≻ response 1) = σ((u₀ − u₁) / T) with
//! the annotator's temperature T, where the utility u is the gold reward plus the annotator's bias.

use std::collections::BTreeMap;

use anyhow::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rlhf_feedback::export::{export_rows, export_rows_with, Format, Options};
use rlhf_feedback::model::{Choice, Item, Label, LabelValue, Project, Role, TaskKind, User};
use rlhf_feedback::quality::{project_stats, ProjectStats};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::gold::judge;
use crate::world::Prompt;

/// A systematic deviation from the gold preference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Bias {
    None,
    /// Adds `weight` × (characters / 40) to a response's utility.
    PrefersLonger {
        weight: f64,
    },
    /// Picks whatever is shown first (left) with probability `rate`, otherwise judges normally.
    PrefersFirst {
        rate: f64,
    },
    /// Answers at random, quickly.
    Careless,
}

impl Bias {
    /// Plain words for reports.
    pub fn describe(&self) -> String {
        match self {
            Bias::None => "none".into(),
            Bias::PrefersLonger { weight } => {
                format!("prefers longer answers (+{weight} per 40 characters)")
            }
            Bias::PrefersFirst { rate } => {
                format!("picks the left side {:.0} % of the time", 100.0 * rate)
            }
            Bias::Careless => "careless: random and fast".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Annotator {
    pub name: String,
    /// Bradley–Terry temperature on the gold-reward scale ([-1, 1]); small = reliable.
    pub temperature: f64,
    /// Utilities closer than this are a tie (both bad when both are negative) instead of a coin flip, as a
    /// person marks two equally wrong answers.
    #[serde(default = "default_tie_margin")]
    pub tie_margin: f64,
    pub bias: Bias,
}

fn default_tie_margin() -> f64 {
    0.05
}

impl Annotator {
    pub fn new(name: &str, temperature: f64, bias: Bias) -> Self {
        Annotator {
            name: name.into(),
            temperature,
            tie_margin: default_tie_margin(),
            bias,
        }
    }

    fn utility(&self, prompt: &Prompt, response: &str) -> f64 {
        let g = judge(&prompt.gold, response).reward;
        match self.bias {
            Bias::PrefersLonger { weight } => g + weight * response.chars().count() as f64 / 40.0,
            _ => g,
        }
    }

    /// Seconds spent on one item: careless annotators click through.
    fn duration_ms(&self, rng: &mut StdRng) -> i64 {
        match self.bias {
            Bias::Careless => rng.gen_range(500..2000),
            _ => rng.gen_range(4000..15000),
        }
    }
}

/// Who labels and how much overlap: every item is labelled by `overlap` distinct annotators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Panel {
    pub annotators: Vec<Annotator>,
    pub overlap: usize,
    /// Share of pairwise items that get a gold answer (the app's quality-control items) where gold separates
    /// the two responses clearly.
    pub gold_item_share: f64,
    pub seed: u64,
}

impl Panel {
    /// Three careful annotators and one of each bias.
    pub fn default_mix(seed: u64) -> Self {
        Panel {
            annotators: vec![
                Annotator::new("careful-1", 0.1, Bias::None),
                Annotator::new("careful-2", 0.1, Bias::None),
                Annotator::new("careful-3", 0.2, Bias::None),
                Annotator::new("long-lover", 0.1, Bias::PrefersLonger { weight: 1.0 }),
                Annotator::new("lefty", 0.1, Bias::PrefersFirst { rate: 0.8 }),
                Annotator::new("careless", 0.1, Bias::Careless),
            ],
            overlap: 3,
            gold_item_share: 0.25,
            seed,
        }
    }

    fn users(&self) -> Vec<User> {
        self.annotators
            .iter()
            .enumerate()
            .map(|(i, a)| User {
                id: i as i64 + 1,
                username: a.name.clone(),
                role: Role::Annotator,
                has_password: false,
            })
            .collect()
    }

    /// `overlap` distinct annotator indices for each of `n` items, balanced and seeded.
    fn assignments(&self, n: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
        let k = self.overlap.clamp(1, self.annotators.len());
        (0..n)
            .map(|_| {
                let mut idx: Vec<usize> = (0..self.annotators.len()).collect();
                idx.shuffle(rng);
                idx.truncate(k);
                idx.sort_unstable();
                idx
            })
            .collect()
    }
}

/// A labelled feedback project held in memory, as the app would store it.
pub struct Session {
    pub project: Project,
    pub items: Vec<Item>,
    pub labels: Vec<Label>,
    pub users: Vec<User>,
}

impl Session {
    /// Rows exactly as `rlhf feedback export --format …` writes them.
    pub fn export(&self, format: Format) -> Result<Vec<Value>> {
        Ok(export_rows(
            &self.project,
            &self.items,
            &self.labels,
            format,
            false,
        )?)
    }

    /// Rows as `rlhf feedback export --format … --by-reliability` writes them: each item decided by the app's
    /// reliability model (Crowd-BT for pairs), so careless and biased annotators count less; with
    /// `min_confidence`, as `--min-confidence` does, items decided less surely are left out.
    pub fn export_by_reliability(
        &self,
        format: Format,
        min_confidence: Option<f64>,
    ) -> Result<Vec<Value>> {
        let opts = Options {
            by_reliability: true,
            min_confidence,
            ..Options::default()
        };
        Ok(export_rows_with(
            &self.project,
            &self.items,
            &self.labels,
            format,
            &opts,
        )?)
    }

    /// The app's agreement statistics and per-annotator flags.
    pub fn stats(&self) -> ProjectStats {
        project_stats(&self.project, &self.items, &self.labels, &self.users)
    }
}

fn project(name: &str, kind: TaskKind, overlap: usize) -> Project {
    Project {
        id: 1,
        name: name.into(),
        kind,
        criteria: if kind == TaskKind::Rating {
            vec!["overall".into()]
        } else {
            vec![]
        },
        likert_max: 5,
        overlap: overlap as i64,
        min_seconds: 3.0,
        guidelines: String::new(),
        created_at: 0,
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * rng.gen::<f64>()).cos()
}

/// Pairwise comparisons of two responses per prompt. Export with [`Format::Preference`] (or `Kto`).
pub fn pairwise(panel: &Panel, pairs: &[(&Prompt, String, String)]) -> Session {
    let mut rng = StdRng::seed_from_u64(panel.seed);
    let mut items = Vec::with_capacity(pairs.len());
    let mut labels = Vec::new();
    let who = panel.assignments(pairs.len(), &mut rng);
    for (i, ((prompt, r0, r1), annotators)) in pairs.iter().zip(who).enumerate() {
        let item_id = i as i64 + 1;
        let (g0, g1) = (
            judge(&prompt.gold, r0).reward,
            judge(&prompt.gold, r1).reward,
        );
        // Quality-control items: the app scores annotators on them (gold = index of the better response).
        let gold = ((g0 - g1).abs() >= 0.5 && rng.gen_bool(panel.gold_item_share))
            .then(|| json!(if g0 > g1 { 0 } else { 1 }));
        items.push(Item {
            id: item_id,
            project_id: 1,
            external_id: prompt.gold.id.clone(),
            prompt: prompt.text.clone(),
            responses: vec![r0.clone(), r1.clone()],
            gold,
            uncertainty: None,
            label_count: annotators.len() as i64,
        });
        for a in annotators {
            let ann = &panel.annotators[a];
            let shown_order = if rng.gen_bool(0.5) {
                vec![0, 1]
            } else {
                vec![1, 0]
            };
            let (u0, u1) = (ann.utility(prompt, r0), ann.utility(prompt, r1));
            let preferred = match ann.bias {
                _ if r0 == r1 => None,
                Bias::Careless => Some(rng.gen_range(0..2)),
                Bias::PrefersFirst { rate } if rng.gen_bool(rate) => Some(shown_order[0]),
                _ if (u0 - u1).abs() < ann.tie_margin => None,
                _ => Some(
                    if rng.gen_bool(sigmoid((u0 - u1) / ann.temperature.max(1e-6))) {
                        0
                    } else {
                        1
                    },
                ),
            };
            let choice = match preferred {
                None if u0 < 0.0 && u1 < 0.0 => Choice::BothBad,
                None => Choice::Tie,
                Some(p) if p == shown_order[0] => Choice::A,
                Some(_) => Choice::B,
            };
            let value = LabelValue::Pairwise {
                choice,
                shown_order,
                preferred,
            };
            labels.push(label(
                labels.len(),
                item_id,
                a,
                value,
                ann.duration_ms(&mut rng),
            ));
        }
    }
    Session {
        project: project("sandbox-pairwise", TaskKind::Pairwise, panel.overlap),
        items,
        labels,
        users: panel.users(),
    }
}

fn label(n: usize, item_id: i64, annotator: usize, value: LabelValue, duration_ms: i64) -> Label {
    Label {
        id: n as i64 + 1,
        project_id: 1,
        item_id,
        user_id: annotator as i64 + 1,
        assignment_id: None,
        value,
        supersedes: None,
        duration_ms: Some(duration_ms),
        created_at: 0,
    }
}

/// Likert ratings (1–5, criterion `overall`) of one response per prompt: the gold reward mapped onto the scale
/// plus Gaussian noise of the annotator's temperature (in scale points × 2); longer-lovers add their bias.
/// Export with [`Format::Rating`].
pub fn ratings(panel: &Panel, responses: &[(&Prompt, String)]) -> Session {
    simple(
        panel,
        responses,
        TaskKind::Rating,
        |ann, prompt, response, rng| {
            let u = match ann.bias {
                Bias::Careless => rng.gen_range(-1.0..1.0),
                _ => ann.utility(prompt, response) + ann.temperature * normal(rng),
            };
            let score = (1.0 + (u.clamp(-1.0, 1.0) + 1.0) * 2.0).round() as i64;
            Some(LabelValue::Rating {
                scores: BTreeMap::from([("overall".to_string(), score.clamp(1, 5))]),
            })
        },
    )
}

/// Corrections: the annotator rewrites a flawed response into the ideal one (perfect responses are left
/// alone). Export with [`Format::Correction`].
pub fn corrections(panel: &Panel, responses: &[(&Prompt, String)]) -> Session {
    simple(
        panel,
        responses,
        TaskKind::Correction,
        |_, prompt, response, _| {
            let corrected = prompt.ideal();
            (judge(&prompt.gold, response).reward < 1.0 && corrected != *response).then(|| {
                LabelValue::Correction {
                    unified_diff: rlhf_feedback::diff::unified_diff(response, &corrected),
                    word_diff: rlhf_feedback::diff::word_diff(response, &corrected),
                    corrected,
                }
            })
        },
    )
}

/// Critiques naming what the gold reward finds wrong. Export with [`Format::Critique`].
pub fn critiques(panel: &Panel, responses: &[(&Prompt, String)]) -> Session {
    simple(
        panel,
        responses,
        TaskKind::Critique,
        |_, prompt, response, _| {
            let problems = judge(&prompt.gold, response).problems;
            let text = if problems.is_empty() {
                "Good: nothing to fix.".to_string()
            } else {
                format!("The reply {}.", problems.join("; it "))
            };
            Some(LabelValue::Critique { text })
        },
    )
}

/// Demonstrations: the ideal reply to each prompt. Export with [`Format::Demonstration`].
pub fn demonstrations(panel: &Panel, prompts: &[&Prompt]) -> Session {
    let rows: Vec<(&Prompt, String)> = prompts.iter().map(|p| (*p, String::new())).collect();
    simple(panel, &rows, TaskKind::Demonstration, |_, prompt, _, _| {
        Some(LabelValue::Demonstration {
            text: prompt.ideal(),
        })
    })
}

/// One-response tasks: each item gets `overlap` annotators for ratings, one for free-text tasks.
fn simple(
    panel: &Panel,
    responses: &[(&Prompt, String)],
    kind: TaskKind,
    answer: impl Fn(&Annotator, &Prompt, &str, &mut StdRng) -> Option<LabelValue>,
) -> Session {
    let mut rng = StdRng::seed_from_u64(panel.seed);
    let overlap = if kind == TaskKind::Rating {
        panel.overlap
    } else {
        1
    };
    let sub = Panel {
        overlap,
        ..panel.clone()
    };
    let who = sub.assignments(responses.len(), &mut rng);
    let mut items = Vec::with_capacity(responses.len());
    let mut labels = Vec::new();
    for (i, ((prompt, response), annotators)) in responses.iter().zip(who).enumerate() {
        let item_id = i as i64 + 1;
        let responses = if response.is_empty() {
            vec![]
        } else {
            vec![response.clone()]
        };
        items.push(Item {
            id: item_id,
            project_id: 1,
            external_id: prompt.gold.id.clone(),
            prompt: prompt.text.clone(),
            responses,
            gold: None,
            uncertainty: None,
            label_count: annotators.len() as i64,
        });
        for a in annotators {
            let ann = &panel.annotators[a];
            if let Some(value) = answer(ann, prompt, response, &mut rng) {
                labels.push(label(
                    labels.len(),
                    item_id,
                    a,
                    value,
                    ann.duration_ms(&mut rng),
                ));
            }
        }
    }
    Session {
        project: project(&format!("sandbox-{}", kind.as_str()), kind, overlap),
        items,
        labels,
        users: panel.users(),
    }
}

/// Whether the app's flags caught an annotator, next to what the annotator really is.
#[derive(Debug, Clone, Serialize)]
pub struct FlagCheck {
    pub annotator: String,
    pub bias: Bias,
    pub labels: usize,
    pub flags: Vec<String>,
    /// Share of this annotator's decisive labels that agree with the gold reward's preference.
    pub gold_agreement: Option<f64>,
    /// Flagged and biased, or unflagged and unbiased.
    pub correct: bool,
}

/// Per annotator: the app's flags against the truth, and agreement with the gold preference.
pub fn check_flags(
    panel: &Panel,
    session: &Session,
    pairs: &[(&Prompt, String, String)],
) -> Vec<FlagCheck> {
    let stats = session.stats();
    panel
        .annotators
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let uid = i as i64 + 1;
            let s = stats.annotators.iter().find(|s| s.user_id == uid);
            let flags = s.map(|s| s.flags.clone()).unwrap_or_default();
            let mut agree = (0usize, 0usize);
            for l in session.labels.iter().filter(|l| l.user_id == uid) {
                let (prompt, r0, r1) = &pairs[(l.item_id - 1) as usize];
                let (g0, g1) = (
                    judge(&prompt.gold, r0).reward,
                    judge(&prompt.gold, r1).reward,
                );
                if let (
                    LabelValue::Pairwise {
                        preferred: Some(p), ..
                    },
                    false,
                ) = (&l.value, g0 == g1)
                {
                    agree.1 += 1;
                    agree.0 += usize::from((*p == 0) == (g0 > g1));
                }
            }
            FlagCheck {
                annotator: a.name.clone(),
                bias: a.bias,
                labels: s.map_or(0, |s| s.labels),
                correct: flags.is_empty() == (a.bias == Bias::None),
                flags,
                gold_agreement: (agree.1 > 0).then(|| agree.0 as f64 / agree.1 as f64),
            }
        })
        .collect()
}
