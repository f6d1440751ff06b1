//! Active learning, measured (`rlhf sandbox active-learning`): with the same label budget, does choosing the
//! pairs people label by reward-model ensemble disagreement give a reward model that agrees with the gold
//! reward more often than choosing them at random?
//!
//! Pool-based simulation: a pool of candidate pairs (two world replies per prompt, of varying quality; some
//! identical in gold, which no label can teach anything) is labelled once by the simulated panel up front,
//! and a label is revealed when its pair is selected, so every arm sees the same answer for the same pair.
//! All arms start from the same random seed set; each round retrains a small ensemble of reward models from
//! scratch (different random trunks and bootstrap samples of the labels, [`rlhf_train::rm::run_rm`]), scores
//! the held-out pairs against gold, and selects the next batch from the unlabelled pool
//! ([`rlhf_train::select`]). `active_learning.json` is a function of the configuration alone.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rlhf_eval::report::{self, esc, Report, Section};
use rlhf_feedback::export::Format;
use rlhf_train::select::{select, PairScore, Strategy};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::annotators::{pairwise, Panel};
use crate::rm_lab::{Lab, RmSetup};
use crate::world::{Mix, Prompt};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveConfig {
    /// One full experiment per seed (world, panel, models); the curves are reported per seed and averaged.
    pub seeds: Vec<u64>,
    pub mix: Mix,
    /// The reward-model ensembles retrained every round.
    pub rm: RmSetup,
    /// Candidate pairs to choose from (one per prompt).
    pub pool_prompts: usize,
    /// Held-out prompts; their pairs whose gold rewards differ measure accuracy.
    pub eval_prompts: usize,
    /// Pairs labelled before the first selection (chosen at random, the same for every strategy).
    pub initial_pairs: usize,
    /// Pairs labelled per round: the budget every strategy gets.
    pub pairs_per_round: usize,
    pub rounds: usize,
    pub panel: Panel,
    pub strategies: Vec<Strategy>,
}

impl ActiveConfig {
    /// ≈ 10 minutes of CPU time on 2 cores: 2 seeds, 3 strategies, 6 budgets of 100 to 600 pairs.
    pub fn standard() -> Self {
        ActiveConfig {
            seeds: vec![0, 1],
            mix: Mix::default(),
            rm: RmSetup::standard(),
            pool_prompts: 1500,
            eval_prompts: 600,
            initial_pairs: 100,
            pairs_per_round: 100,
            rounds: 5,
            panel: Panel::default_mix(0),
            strategies: vec![Strategy::Random, Strategy::Disagreement, Strategy::Margin],
        }
    }

    /// Seconds in a test build: small pool, tiny members, 2 rounds.
    pub fn quick() -> Self {
        ActiveConfig {
            seeds: vec![0],
            rm: RmSetup::quick(),
            pool_prompts: 160,
            eval_prompts: 120,
            initial_pairs: 16,
            pairs_per_round: 16,
            rounds: 2,
            strategies: vec![Strategy::Random, Strategy::Disagreement],
            ..Self::standard()
        }
    }

    fn validate(&self) -> Result<()> {
        anyhow::ensure!(!self.seeds.is_empty(), "seeds: give at least one");
        anyhow::ensure!(!self.strategies.is_empty(), "strategies: give at least one");
        anyhow::ensure!(
            self.rm.members >= 2,
            "rm.members: an ensemble needs at least 2 (disagreement is a std over them)"
        );
        anyhow::ensure!(
            self.initial_pairs > 0 && self.pairs_per_round > 0,
            "initial_pairs and pairs_per_round must be > 0"
        );
        anyhow::ensure!(
            self.initial_pairs + self.rounds * self.pairs_per_round <= self.pool_prompts,
            "pool_prompts ({}) must hold initial_pairs + rounds × pairs_per_round ({})",
            self.pool_prompts,
            self.initial_pairs + self.rounds * self.pairs_per_round
        );
        Ok(())
    }
}

/// One point of a learning curve.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub round: usize,
    /// Pairs sent to the annotators so far (the budget).
    pub pairs: usize,
    /// Annotator labels so far (pairs × overlap).
    pub labels: usize,
    /// Exported preference rows the reward models trained on (pairs with a winner).
    pub training_pairs: usize,
    /// Held-out pairs ordered as gold orders them by the ensemble mean (ties count half).
    pub accuracy: f64,
    /// Of the pairs selected in this round (the random seed set in round 0): the share whose two replies
    /// have the same gold reward, from which no label can teach an order.
    pub selected_uninformative: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    pub seed: u64,
    pub strategy: Strategy,
    pub points: Vec<Point>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActiveSummary {
    pub config: ActiveConfig,
    /// Held-out pairs (gold rewards differ) per seed.
    pub eval_pairs: Vec<usize>,
    pub curves: Vec<Curve>,
    /// Per strategy: (pairs, accuracy averaged over seeds) per round.
    pub mean_curves: BTreeMap<String, Vec<(usize, f64)>>,
    pub findings: Vec<String>,
}

/// Runs every seed and strategy in `out` (replaced); writes `active_learning.json`, `.md` and `.html`.
pub fn run(cfg: &ActiveConfig, out: &Path) -> Result<ActiveSummary> {
    cfg.validate()?;
    crate::rm_lab::fresh_dir(out)?;
    let mut curves = Vec::new();
    let mut eval_pairs = Vec::new();
    for &seed in &cfg.seeds {
        let (c, n) = run_seed(cfg, seed, &out.join(format!("seed-{seed}")))?;
        curves.extend(c);
        eval_pairs.push(n);
    }
    let mean_curves = mean_curves(cfg, &curves);
    let findings = findings(cfg, &curves, &mean_curves);
    let summary = ActiveSummary {
        config: cfg.clone(),
        eval_pairs,
        curves,
        mean_curves,
        findings,
    };
    crate::rm_lab::write_reports(
        out,
        "active_learning",
        &serde_json::to_string_pretty(&summary)?,
        &markdown(&summary),
        &html(&summary),
    )?;
    Ok(summary)
}

fn run_seed(cfg: &ActiveConfig, seed: u64, dir: &Path) -> Result<(Vec<Curve>, usize)> {
    let lab = Lab::new(
        &cfg.rm,
        &cfg.mix,
        cfg.pool_prompts,
        cfg.eval_prompts,
        seed,
        dir,
    )?;
    let pool = &lab.pool;
    // Every pool pair labelled once by the panel; a selection reveals its row (None: no winner, e.g. a tie).
    let panel = Panel {
        seed,
        ..cfg.panel.clone()
    };
    let refs: Vec<(&Prompt, String, String)> = pool
        .iter()
        .map(|p| (&p.prompt, p.a.clone(), p.b.clone()))
        .collect();
    let mut answers: Vec<Option<Value>> = vec![None; pool.len()];
    for row in pairwise(&panel, &refs).export(Format::Preference)? {
        let item = row["item_id"]
            .as_i64()
            .context("an exported row without item_id")? as usize;
        answers[item - 1] = Some(row);
    }

    let mut initial: Vec<usize> = (0..pool.len()).collect();
    rand::seq::SliceRandom::shuffle(
        initial.as_mut_slice(),
        &mut StdRng::seed_from_u64(seed ^ 0x1417),
    );
    initial.truncate(cfg.initial_pairs);
    let uninformative = |idx: &[usize]| {
        idx.iter().filter(|&&i| pool[i].gold_diff() == 0.0).count() as f64 / idx.len().max(1) as f64
    };

    let labelled_rows =
        |idx: &[usize]| -> Vec<Value> { idx.iter().filter_map(|&i| answers[i].clone()).collect() };
    let round0 = lab.train_and_score(&labelled_rows(&initial), initial.len() as u64)?;
    let mut curves = Vec::new();
    for &strategy in &cfg.strategies {
        let mut labelled = initial.clone();
        let point = |round: usize, labelled: &[usize], accuracy: f64, selected: &[usize]| Point {
            round,
            pairs: labelled.len(),
            labels: labelled.len() * panel.overlap,
            training_pairs: labelled.iter().filter(|&&i| answers[i].is_some()).count(),
            accuracy,
            selected_uninformative: uninformative(selected),
        };
        let mut points = vec![point(0, &labelled, round0.0, &initial)];
        let mut scores = round0.1.clone();
        for round in 1..=cfg.rounds {
            let taken: HashSet<usize> = labelled.iter().copied().collect();
            let open: Vec<usize> = (0..pool.len()).filter(|i| !taken.contains(i)).collect();
            let open_scores: Vec<PairScore> = open.iter().map(|&i| scores[i]).collect();
            let pick: Vec<usize> = select(
                strategy,
                &open_scores,
                cfg.pairs_per_round,
                seed.wrapping_mul(31).wrapping_add(round as u64),
            )
            .into_iter()
            .map(|j| open[j])
            .collect();
            labelled.extend(&pick);
            let (acc, s) = lab.train_and_score(&labelled_rows(&labelled), labelled.len() as u64)?;
            scores = s;
            points.push(point(round, &labelled, acc, &pick));
            eprintln!(
                "  seed {seed} {:<12} round {round}: {} pairs, accuracy {acc:.3}",
                strategy.name(),
                labelled.len()
            );
        }
        curves.push(Curve {
            seed,
            strategy,
            points,
        });
    }
    let eval_pairs = lab.eval.len();
    lab.finish()?;
    Ok((curves, eval_pairs))
}

fn mean_curves(cfg: &ActiveConfig, curves: &[Curve]) -> BTreeMap<String, Vec<(usize, f64)>> {
    cfg.strategies
        .iter()
        .map(|s| {
            let mine: Vec<&Curve> = curves.iter().filter(|c| c.strategy == *s).collect();
            let points = (0..=cfg.rounds)
                .map(|r| {
                    let acc =
                        mine.iter().map(|c| c.points[r].accuracy).sum::<f64>() / mine.len() as f64;
                    (mine[0].points[r].pairs, acc)
                })
                .collect();
            (s.name().to_string(), points)
        })
        .collect()
}

/// Each non-random strategy against random: the mean difference over rounds ≥ 1 and seeds, and how many
/// (seed, round) cells it wins, ties or loses. Said plainly either way.
fn findings(
    cfg: &ActiveConfig,
    curves: &[Curve],
    mean: &BTreeMap<String, Vec<(usize, f64)>>,
) -> Vec<String> {
    let mut f = Vec::new();
    let Some(random) = mean.get(Strategy::Random.name()) else {
        return f;
    };
    for s in cfg.strategies.iter().filter(|s| **s != Strategy::Random) {
        let (mut win, mut tie, mut lose, mut diffs) = (0, 0, 0, Vec::new());
        for c in curves.iter().filter(|c| c.strategy == *s) {
            let r = curves
                .iter()
                .find(|r| r.strategy == Strategy::Random && r.seed == c.seed)
                .expect("random arm");
            for (p, q) in c.points.iter().zip(&r.points).skip(1) {
                let d = p.accuracy - q.accuracy;
                diffs.push(d);
                match d {
                    d if d > 1e-12 => win += 1,
                    d if d < -1e-12 => lose += 1,
                    _ => tie += 1,
                }
            }
        }
        let avg = diffs.iter().sum::<f64>() / diffs.len().max(1) as f64;
        let last = |m: &[(usize, f64)]| m.last().map_or(f64::NAN, |p| p.1);
        let mine = &mean[s.name()];
        let p = sign_test(win, lose);
        let verdict = match (p < 0.05, win > lose) {
            (true, true) => "beats random",
            (true, false) => "does NOT beat random: it is worse",
            (false, _) => "does NOT beat random: no consistent difference",
        };
        f.push(format!(
            "{} {verdict}: accuracy minus random's {:+.1} points on average over {} (seed, budget) cells, higher in {win}, equal in {tie}, lower in {lose} (two-sided sign test p = {p:.3}); at the final budget of {} pairs {:.1} % vs {:.1} %",
            s.name(),
            100.0 * avg,
            diffs.len(),
            mine.last().map_or(0, |p| p.0),
            100.0 * last(mine),
            100.0 * last(random)
        ));
        let wasted = |st: Strategy| {
            let v: Vec<f64> = curves
                .iter()
                .filter(|c| c.strategy == st)
                .flat_map(|c| c.points.iter().skip(1).map(|p| p.selected_uninformative))
                .collect();
            100.0 * v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        f.push(format!(
            "{} selected pairs with equal gold rewards (nothing to learn) {:.0} % of the time, random {:.0} %",
            s.name(),
            wasted(*s),
            wasted(Strategy::Random)
        ));
    }
    f
}

/// Two-sided sign test: the probability of a split at least this uneven between `win` and `lose` if either
/// side were equally likely (ties left out). The cells of one seed share a pool and a start, so they are not
/// independent: the p-value is a guide, not an exact level.
pub fn sign_test(win: usize, lose: usize) -> f64 {
    let n = win + lose;
    let k = win.min(lose);
    // P(X <= k) for X ~ Binomial(n, 1/2), summed in log space (n can be in the hundreds).
    let ln_choose = |n: usize, i: usize| -> f64 {
        (1..=i)
            .map(|j| ((n - i + j) as f64).ln() - (j as f64).ln())
            .sum()
    };
    let tail: f64 = (0..=k)
        .map(|i| (ln_choose(n, i) - n as f64 * std::f64::consts::LN_2).exp())
        .sum();
    (2.0 * tail).min(1.0)
}

/// The curves as a markdown table (mean over seeds, then per seed).
pub fn markdown(s: &ActiveSummary) -> String {
    let names: Vec<&String> = s.mean_curves.keys().collect();
    let mut m = String::new();
    let _ = writeln!(
        m,
        "| pairs labelled | labels | {} |",
        names
            .iter()
            .map(|n| format!("{n} (mean)"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(m, "|---|---|{}", "---|".repeat(names.len()));
    let rounds = s.mean_curves.values().next().map_or(0, Vec::len);
    for r in 0..rounds {
        let pairs = s.mean_curves[names[0]][r].0;
        let cells: Vec<String> = names
            .iter()
            .map(|n| format!("{:.1} %", 100.0 * s.mean_curves[*n][r].1))
            .collect();
        let _ = writeln!(
            m,
            "| {pairs} | {} | {} |",
            pairs * s.config.panel.overlap,
            cells.join(" | ")
        );
    }
    let _ = writeln!(m, "\nPer seed (held-out pairs: {:?}):\n", s.eval_pairs);
    let _ = writeln!(
        m,
        "| seed | strategy | {} |",
        (0..rounds)
            .map(|r| format!("round {r}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(m, "|---|---|{}", "---|".repeat(rounds));
    for c in &s.curves {
        let cells: Vec<String> = c
            .points
            .iter()
            .map(|p| format!("{:.1} %", 100.0 * p.accuracy))
            .collect();
        let _ = writeln!(
            m,
            "| {} | {} | {} |",
            c.seed,
            c.strategy.name(),
            cells.join(" | ")
        );
    }
    let _ = writeln!(m);
    for f in &s.findings {
        let _ = writeln!(m, "- {f}");
    }
    m
}

fn html(s: &ActiveSummary) -> String {
    let series: Vec<(String, Vec<(f64, f64)>)> = s
        .mean_curves
        .iter()
        .map(|(n, pts)| {
            (
                format!("{n} (mean)"),
                pts.iter().map(|&(x, y)| (x as f64, y)).collect(),
            )
        })
        .collect();
    let per_seed: Vec<(String, Vec<(f64, f64)>)> = s
        .curves
        .iter()
        .map(|c| {
            (
                format!("{} seed {}", c.strategy.name(), c.seed),
                c.points
                    .iter()
                    .map(|p| (p.pairs as f64, p.accuracy))
                    .collect(),
            )
        })
        .collect();
    let mut h = String::from("<ul>");
    for f in &s.findings {
        let _ = write!(h, "<li>{}</li>", esc(f));
    }
    h.push_str("</ul>");
    let curves =
        report::line_chart(
            "held-out accuracy against gold",
            "pairs labelled",
            "accuracy",
            &series,
            false,
        ) + &report::line_chart("per seed", "pairs labelled", "accuracy", &per_seed, false);
    let c = &s.config;
    let intro = format!(
        "<p>Pool of {} candidate pairs per seed, {} initial random pairs, then {} rounds of {} pairs chosen by each strategy; \
         an ensemble of {} reward models retrained from scratch each round; accuracy = held-out pairs ({:?} per seed) ordered as the gold reward orders them. Seeds {:?}.</p>",
        c.pool_prompts, c.initial_pairs, c.rounds, c.pairs_per_round, c.rm.members, s.eval_pairs, c.seeds
    );
    report::render(&Report {
        title: "rlhf sandbox: active learning".into(),
        intro,
        sections: vec![
            Section {
                id: "findings".into(),
                heading: "Findings".into(),
                html: h,
            },
            Section {
                id: "curves".into(),
                heading: "Learning curves".into(),
                html: curves,
            },
        ],
    })
}
