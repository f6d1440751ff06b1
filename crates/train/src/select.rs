//! Active learning: which unlabelled candidate pairs go to people next (`rlhf rm select`).
//!
//! Each pair (a, b) is scored by a reward-model ensemble: member j gives d_j = r_j(a) − r_j(b). The
//! ensemble's *disagreement* is the sample standard deviation of d_j over the members (epistemic
//! uncertainty: the members, trained on the same labels, disagree about the order); the *margin* signal is
//! |σ(mean d) − ½|, how close the Bradley–Terry probability of the ensemble mean is to a coin flip. `random`
//! is the baseline every selection rule has to beat (measured in `rlhf sandbox active-learning`).

use std::path::PathBuf;

use candle_core::Device;
use clap::Args;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rlhf_data::{Text, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ensemble::Ensemble;
use crate::error::{io_err, Result, TrainError};
use crate::pref_data::{data_err, pad_rows};

/// How to pick the pairs to label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Uniformly at random (seeded): the baseline.
    Random,
    /// Largest ensemble standard deviation of the reward difference first (needs ≥ 2 members).
    Disagreement,
    /// Bradley–Terry probability of the ensemble mean closest to ½ first.
    Margin,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Random => "random",
            Strategy::Disagreement => "disagreement",
            Strategy::Margin => "margin",
        }
    }

    /// How much this rule wants the pair labelled (higher first); `None` for `random`.
    pub fn priority(self, s: &PairScore) -> Option<f64> {
        match self {
            Strategy::Random => None,
            Strategy::Disagreement => Some(s.disagreement),
            Strategy::Margin => Some(0.5 - (s.p_first - 0.5).abs()),
        }
    }
}

/// What the ensemble thinks of one candidate pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairScore {
    /// Ensemble mean of r(a) − r(b).
    pub reward_diff: f64,
    /// Sample standard deviation of r(a) − r(b) over the members (0 for one member).
    pub disagreement: f64,
    /// σ(reward_diff): the Bradley–Terry probability that a is preferred.
    pub p_first: f64,
}

/// Member rewards `[n][k]` of token sequences, in batches of `batch_size`.
pub fn member_rewards(
    ensemble: &Ensemble,
    seqs: &[Vec<u32>],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        let (ids, lengths) = pad_rows(&refs, ensemble.pad_token_id(), &Device::Cpu)?;
        out.extend(ensemble.scores(&ids, &lengths)?.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// Scores pairs given as (tokens of prompt + a, tokens of prompt + b).
pub fn score_pairs(
    ensemble: &Ensemble,
    pairs: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
) -> Result<Vec<PairScore>> {
    let seqs: Vec<Vec<u32>> = pairs
        .iter()
        .flat_map(|(a, b)| [a.clone(), b.clone()])
        .collect();
    let r = member_rewards(ensemble, &seqs, batch_size)?;
    Ok(r.chunks(2).map(|ab| pair_score(&ab[0], &ab[1])).collect())
}

/// [`PairScore`] from the member rewards of the two responses.
pub fn pair_score(a: &[f32], b: &[f32]) -> PairScore {
    let d: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| x as f64 - y as f64)
        .collect();
    let k = d.len() as f64;
    let mean = d.iter().sum::<f64>() / k;
    let disagreement = if d.len() > 1 {
        (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (k - 1.0)).sqrt()
    } else {
        0.0
    };
    PairScore {
        reward_diff: mean,
        disagreement,
        p_first: 1.0 / (1.0 + (-mean).exp()),
    }
}

/// Indices of the `budget` pairs to label, most wanted first. Ties keep the input order, so the choice is a
/// function of the scores (and, for `random`, of `seed`) alone.
pub fn select(strategy: Strategy, scores: &[PairScore], budget: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    match strategy {
        Strategy::Random => idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed)),
        _ => {
            let p = |i: usize| strategy.priority(&scores[i]).unwrap_or(0.0);
            idx.sort_by(|&i, &j| p(j).total_cmp(&p(i)));
        }
    }
    idx.truncate(budget);
    idx
}

/// `rlhf rm select` flags.
#[derive(Debug, Clone, Args)]
pub struct SelectArgs {
    /// Reward-model directory: one multi-head model, or repeat for an ensemble of models.
    #[arg(long = "model", required = true)]
    pub models: Vec<PathBuf>,
    /// Candidate pairs, JSONL rows `{"prompt": str, "responses": [str, str]}` (the feedback app's import
    /// format; other columns such as `id` are copied through).
    #[arg(long)]
    pub candidates: PathBuf,
    /// Output JSONL: the selected rows, most wanted first, plus `reward_diff`, `p_first` and (not for
    /// `random`) `uncertainty`, the strategy's priority (rows with an `id` also get `item_id` = `id`): the
    /// file is both a `rlhf feedback import` file and a `rlhf feedback import-scores` file.
    #[arg(long)]
    pub out: PathBuf,
    /// How many pairs to select.
    #[arg(long)]
    pub budget: usize,
    #[arg(long, value_enum, default_value_t = Strategy::Disagreement)]
    pub strategy: Strategy,
    /// Seed of `--strategy random`.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
}

/// Prompt + response tokens as the reward model reads them (TRL's prompt + completion tokenization).
fn encode(tokenizer: &Tokenizer, prompt: &str, response: &str) -> rlhf_data::Result<Vec<u32>> {
    let e = rlhf_data::tokenize_completion(
        &Text::Plain(prompt.into()),
        &Text::Plain(response.into()),
        tokenizer,
        None,
    )?;
    Ok([e.prompt_ids, e.completion_ids].concat())
}

/// `rlhf rm select`: writes the `budget` candidate pairs to label next; returns how many were written.
pub fn run_select(args: &SelectArgs) -> Result<usize> {
    let ensemble = Ensemble::load(&args.models, &Device::Cpu)?;
    if args.strategy == Strategy::Disagreement && ensemble.size() < 2 {
        return Err(TrainError::Config {
            file: "command line".into(),
            key: "strategy".into(),
            msg: "disagreement needs an ensemble (several --model dirs or a model with num_heads > 1); use margin or random".into(),
        });
    }
    let tokenizer = Tokenizer::from_dir(&args.models[0]).map_err(data_err)?;
    for (dir, vocab) in args.models.iter().zip(ensemble.vocab_sizes()) {
        tokenizer
            .check_vocab(vocab, dir.join("config.json"))
            .map_err(data_err)?;
    }
    let src = args.candidates.display().to_string();
    let bytes = std::fs::read(&args.candidates).map_err(io_err(&args.candidates))?;
    let rows = rlhf_data::jsonl::parse_objects(&src, &bytes).map_err(data_err)?;
    let bad = |line: usize, field: &str, msg: &str| {
        TrainError::Data(
            rlhf_data::DataError::new(&src, msg)
                .at_line(line)
                .with_field(field)
                .to_string(),
        )
    };
    let mut pairs = Vec::with_capacity(rows.len());
    for (line, row) in &rows {
        let prompt = row
            .get("prompt")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(*line, "prompt", "missing or not a string"))?;
        let responses: Vec<&str> = match row.get("responses").and_then(Value::as_array) {
            Some(r) if r.len() == 2 => r.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if responses.len() != 2 {
            return Err(bad(*line, "responses", "expected a list of two strings"));
        }
        let enc = |r: &str| -> Result<Vec<u32>> {
            let ids =
                encode(&tokenizer, prompt, r).map_err(|e| bad(*line, "prompt", &e.message))?;
            if ids.len() > args.max_length {
                return Err(bad(
                    *line,
                    "responses",
                    &format!(
                        "{} tokens, longer than --max-length {}",
                        ids.len(),
                        args.max_length
                    ),
                ));
            }
            Ok(ids)
        };
        pairs.push((enc(responses[0])?, enc(responses[1])?));
    }
    let scores = score_pairs(&ensemble, &pairs, args.batch_size)?;
    let chosen = select(args.strategy, &scores, args.budget, args.seed);
    let mut text = String::new();
    for &i in &chosen {
        let mut row = rows[i].1.clone();
        let s = scores[i];
        if let Some(p) = args.strategy.priority(&s) {
            row.insert("uncertainty".into(), json!(p));
            // `rlhf feedback import-scores` finds the item by its external id (the imported row's `id`).
            if let Some(id) = row.get("id").cloned() {
                row.entry("item_id").or_insert(id);
            }
        }
        row.insert("reward_diff".into(), json!(s.reward_diff));
        row.insert("p_first".into(), json!(s.p_first));
        text.push_str(&Value::Object(row).to_string());
        text.push('\n');
    }
    std::fs::write(&args.out, text).map_err(io_err(&args.out))?;
    Ok(chosen.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_score_is_the_std_of_member_differences() {
        let s = pair_score(&[1.0, 2.0, 3.0], &[0.0, 0.0, 0.0]);
        assert!((s.reward_diff - 2.0).abs() < 1e-12 && (s.disagreement - 1.0).abs() < 1e-12);
        assert!((s.p_first - 1.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-12);
        // Members that agree on the order but shift both rewards alike do not disagree.
        assert_eq!(pair_score(&[1.0, 5.0], &[0.0, 4.0]).disagreement, 0.0);
        assert_eq!(pair_score(&[1.0], &[0.0]).disagreement, 0.0);
    }

    #[test]
    fn each_strategy_orders_as_documented() {
        let s = |d: f64, u: f64| PairScore {
            reward_diff: d,
            disagreement: u,
            p_first: 1.0 / (1.0 + (-d).exp()),
        };
        let scores = [s(3.0, 0.1), s(0.1, 0.5), s(-1.0, 0.9), s(-0.05, 0.2)];
        assert_eq!(select(Strategy::Disagreement, &scores, 3, 0), vec![2, 1, 3]);
        assert_eq!(select(Strategy::Margin, &scores, 2, 0), vec![3, 1]);
        let r = select(Strategy::Random, &scores, 4, 9);
        assert_eq!(r, select(Strategy::Random, &scores, 4, 9));
        let mut sorted = r.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
        assert!(select(Strategy::Disagreement, &scores, 10, 0).len() == 4);
    }
}
