//! Evaluating policies on held-out prompts: each model samples one completion per prompt (the same seeds for
//! every model, so comparisons share their randomness), every reward source scores it, and the summary holds
//! mean rewards with 95 % intervals, win rates, KL to a reference, length, diversity and entropy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use rlhf_data::Text;
use rlhf_generate::Generator;
use rlhf_model::{CausalLm, GenRequest, Sampling};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::reward::{RewardSource, Row};
use crate::stats::{bootstrap, distinct_n, mean, win_rate, Estimate};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    pub max_new_tokens: usize,
    /// Sampling temperature (≤ 0: greedy). KL and entropy are always of the T = 1 distribution.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub batch_size: usize,
    /// Completions kept per model in the summary as examples.
    pub examples: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            max_new_tokens: 48,
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
            batch_size: 32,
            examples: 6,
        }
    }
}

/// A model to evaluate, under a display name.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardSummary {
    pub source: String,
    pub reward: Estimate,
    /// The source's indicators (e.g. `over_refusal`), each over the rows it applies to.
    pub indicators: BTreeMap<String, Estimate>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub prompt: String,
    pub completion: String,
    /// One per reward source, in order (None: the source does not apply to the prompt).
    pub rewards: Vec<Option<f64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub name: String,
    pub dir: String,
    pub rewards: Vec<RewardSummary>,
    /// Mean per-sequence Σ log p − log q on the model's own samples (q = reference); None without one.
    pub kl_to_reference: Option<Estimate>,
    /// New tokens per completion (EOS not counted).
    pub length_tokens: Estimate,
    pub length_chars: Estimate,
    pub distinct_1: f64,
    pub distinct_2: f64,
    /// Mean entropy (nats) of the next-token distribution over the completion's positions.
    pub token_entropy: f64,
    pub examples: Vec<Example>,
    /// Per prompt, per source: the rewards (for win rates; not serialised).
    #[serde(skip)]
    pub per_prompt: Vec<Vec<Option<f64>>>,
    #[serde(skip)]
    pub completions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WinRate {
    pub source: String,
    pub model: String,
    pub versus: String,
    /// Share of prompts where `model` scores higher (ties half), over the prompts the source scores.
    pub win_rate: f64,
    /// Share of those prompts where both score the same.
    pub ties: f64,
    pub n: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub config: EvalConfig,
    pub prompts: usize,
    pub reference: Option<String>,
    pub models: Vec<ModelSummary>,
    pub win_rates: Vec<WinRate>,
}

impl Summary {
    pub fn model(&self, name: &str) -> Option<&ModelSummary> {
        self.models.iter().find(|m| m.name == name)
    }
}

impl ModelSummary {
    pub fn reward(&self, source: &str) -> Option<&RewardSummary> {
        self.rewards.iter().find(|r| r.source == source)
    }
}

fn prompt_text(row: &Row) -> &str {
    row.get("prompt")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Evaluates `models` on `rows` with every source of `rewards`; `reference` (a model directory with the same
/// tokenizer) enables the KL column.
pub fn evaluate(
    models: &[ModelSpec],
    reference: Option<&Path>,
    rows: &[Row],
    rewards: &[Box<dyn RewardSource + '_>],
    cfg: &EvalConfig,
) -> Result<Summary> {
    ensure!(!models.is_empty(), "no model to evaluate");
    ensure!(!rows.is_empty(), "no prompts to evaluate on");
    let reference_model = match reference {
        Some(dir) => Some(
            Generator::load(dir).with_context(|| format!("reference model {}", dir.display()))?,
        ),
        None => None,
    };
    let mut out = Vec::with_capacity(models.len());
    for spec in models {
        out.push(evaluate_one(
            spec,
            reference_model.as_ref(),
            rows,
            rewards,
            cfg,
        )?);
    }
    let mut win_rates = Vec::new();
    for (s, source) in rewards.iter().enumerate() {
        for a in &out {
            for b in out.iter().filter(|b| b.name != a.name) {
                let (xa, xb): (Vec<f64>, Vec<f64>) = a
                    .per_prompt
                    .iter()
                    .zip(&b.per_prompt)
                    .filter_map(|(ra, rb)| Some((ra[s]?, rb[s]?)))
                    .unzip();
                win_rates.push(WinRate {
                    source: source.name(),
                    model: a.name.clone(),
                    versus: b.name.clone(),
                    win_rate: win_rate(&xa, &xb),
                    ties: xa.iter().zip(&xb).filter(|(x, y)| x == y).count() as f64
                        / xa.len().max(1) as f64,
                    n: xa.len(),
                });
            }
        }
    }
    Ok(Summary {
        config: cfg.clone(),
        prompts: rows.len(),
        reference: reference.map(|p| p.display().to_string()),
        models: out,
        win_rates,
    })
}

fn evaluate_one(
    spec: &ModelSpec,
    reference: Option<&Generator>,
    rows: &[Row],
    rewards: &[Box<dyn RewardSource + '_>],
    cfg: &EvalConfig,
) -> Result<ModelSummary> {
    let g = Generator::load(&spec.dir).with_context(|| format!("model {}", spec.dir.display()))?;
    let prompts: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| g.encode_prompt(&Text::Plain(prompt_text(r).into())))
        .collect::<Result<_>>()?;
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!(
            "prompt {} encodes to no tokens (empty prompt and no BOS token)",
            i + 1
        );
    }
    if let Some(r) = reference {
        ensure!(
            r.model.vocab_size() == g.model.vocab_size(),
            "reference vocabulary ({}) differs from {}'s ({}): KL needs the same tokenizer",
            r.model.vocab_size(),
            spec.dir.display(),
            g.model.vocab_size()
        );
        for (row, ids) in rows.iter().zip(&prompts) {
            if r.encode_prompt(&Text::Plain(prompt_text(row).into()))? != *ids {
                bail!(
                    "reference tokenizer encodes {:?} differently from {}'s: KL needs the same tokenizer",
                    prompt_text(row),
                    spec.dir.display()
                );
            }
        }
    }
    let seeds: Vec<u64> = (0..rows.len() as u64)
        .map(|i| cfg.seed.wrapping_mul(1_000_003).wrapping_add(i))
        .collect();
    let sampling = Sampling {
        temperature: cfg.temperature,
        top_k: 0,
        top_p: cfg.top_p,
    };
    let template = GenRequest {
        max_new_tokens: cfg.max_new_tokens,
        sampling,
        ..Default::default()
    };
    let outputs = g.run(&prompts, &seeds, &template, cfg.batch_size)?;
    let eos = g.model.config().eos_token_ids();

    let mut per_prompt = Vec::with_capacity(rows.len());
    let mut indicators: Vec<BTreeMap<String, Vec<f64>>> = vec![BTreeMap::new(); rewards.len()];
    let (mut kls, mut entropies, mut len_tok, mut len_chr): (
        Vec<f64>,
        Vec<f64>,
        Vec<f64>,
        Vec<f64>,
    ) = Default::default();
    let mut completions = Vec::with_capacity(rows.len());
    for (i, ((row, ids), (text, o))) in rows.iter().zip(&prompts).zip(&outputs).enumerate() {
        let mut rs = Vec::with_capacity(rewards.len());
        for (s, source) in rewards.iter().enumerate() {
            let at = || {
                format!(
                    "prompt {} ({:?}), reward {}",
                    i + 1,
                    prompt_text(row),
                    source.name()
                )
            };
            rs.push(source.score(row, text).with_context(at)?);
            for (k, v) in source.indicators(row, text).with_context(at)? {
                indicators[s].entry(k).or_default().push(v);
            }
        }
        per_prompt.push(rs);
        if !o.tokens.is_empty() {
            let (logp, entropy) = score_tokens(&g.model, ids, &o.tokens)?;
            entropies.extend(entropy);
            if let Some(r) = reference {
                let (logq, _) = score_tokens(&r.model, ids, &o.tokens)?;
                kls.push(logp.iter().zip(&logq).map(|(p, q)| p - q).sum::<f64>());
            }
        } else if reference.is_some() {
            kls.push(0.0);
        }
        len_tok.push(o.tokens.iter().filter(|t| !eos.contains(t)).count() as f64);
        len_chr.push(text.chars().count() as f64);
        completions.push(text.clone());
    }
    for (s, source) in rewards.iter().enumerate() {
        if per_prompt.iter().all(|r| r[s].is_none()) {
            bail!(
                "reward {} applies to none of the {} prompts (a missing column?)",
                source.name(),
                rows.len()
            );
        }
    }
    let seed = cfg.seed;
    let rewards_out = rewards
        .iter()
        .enumerate()
        .map(|(s, source)| RewardSummary {
            source: source.name(),
            reward: bootstrap(
                &per_prompt.iter().filter_map(|r| r[s]).collect::<Vec<_>>(),
                seed,
            ),
            indicators: indicators[s]
                .iter()
                .map(|(k, v)| (k.clone(), bootstrap(v, seed)))
                .collect(),
        })
        .collect();
    let examples = rows
        .iter()
        .zip(&completions)
        .zip(&per_prompt)
        .take(cfg.examples)
        .map(|((row, c), r)| Example {
            prompt: prompt_text(row).into(),
            completion: c.clone(),
            rewards: r.clone(),
        })
        .collect();
    Ok(ModelSummary {
        name: spec.name.clone(),
        dir: spec.dir.display().to_string(),
        rewards: rewards_out,
        kl_to_reference: reference.map(|_| bootstrap(&kls, seed)),
        length_tokens: bootstrap(&len_tok, seed),
        length_chars: bootstrap(&len_chr, seed),
        distinct_1: distinct_n(&completions, 1),
        distinct_2: distinct_n(&completions, 2),
        token_entropy: mean(&entropies),
        examples,
        per_prompt,
        completions,
    })
}

/// Per completion token: log p(token) and the entropy of the next-token distribution it was drawn from
/// (T = 1), from one full forward over prompt + completion.
fn score_tokens(
    model: &CausalLm,
    prompt: &[u32],
    completion: &[u32],
) -> Result<(Vec<f64>, Vec<f64>)> {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let logits = model.forward(&input)?.squeeze(0)?.to_vec2::<f32>()?;
    let mut logp = Vec::with_capacity(completion.len());
    let mut entropy = Vec::with_capacity(completion.len());
    for (j, &tok) in completion.iter().enumerate() {
        // Position p-1+j predicts completion token j.
        let row = &logits[prompt.len() + j - 1];
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        logp.push(row[tok as usize] as f64 - lse);
        entropy.push(
            -row.iter()
                .map(|&x| {
                    let lp = x as f64 - lse;
                    lp.exp() * lp
                })
                .sum::<f64>(),
        );
    }
    Ok((logp, entropy))
}
