//! `rlhf grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), with the variants TRL
//! 1.16 offers: DAPO's decoupled clip range and token-level normalisation, Dr. GRPO's constant normaliser,
//! GSPO's sequence-level importance ratio, and μ-fold reuse of a rollout batch.
//!
//! For each prompt, G completions are sampled; their rewards, centred (and scaled) within the group, are the
//! advantage Â of every token of the completion. The per-token loss is the clipped surrogate
//! `−min(r·Â, clip(r, 1−ε_low, 1+ε_high)·Â)` plus `β·KL_k3(π‖π_ref)`, aggregated as `loss_type` says.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::advantage::{group_advantages, ScaleRewards};
use crate::error::Result;
use crate::online::{self, Algorithm, Batch, Metrics, OnlineArgs, OnlineSummary, Policy, Step};
use crate::rollout::{self, SeqBatch};

/// How per-token losses are aggregated (TRL `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLoss {
    /// Mean over each sequence's tokens, then over sequences (the GRPO paper; biased toward short answers).
    Grpo,
    /// Sum over the batch's tokens / their number.
    Bnpo,
    /// Sum over the batch's tokens / (sequences × max_new_tokens) (Dr. GRPO).
    #[value(name = "dr_grpo")]
    DrGrpo,
    /// Sum over the tokens / tokens of the whole generation batch (DAPO; TRL's default).
    Dapo,
}

/// Where the importance ratio lives (TRL `importance_sampling_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RatioLevel {
    /// One ratio per token (GRPO).
    Token,
    /// exp(mean log-ratio) of the sequence for all its tokens (GSPO).
    Sequence,
}

/// Settings of `rlhf grpo`: the online-RL settings plus these.
#[derive(Debug, Clone, PartialEq, clap::Parser, Serialize, Deserialize)]
#[command(about = "Group Relative Policy Optimization (GRPO, DAPO, Dr. GRPO, GSPO)")]
pub struct GrpoArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub online: OnlineArgs,
    /// Completions sampled per prompt (G ≥ 2).
    #[arg(long, default_value_t = 8)]
    pub num_generations: usize,
    /// KL coefficient β to the reference (0: no reference model is loaded).
    #[arg(long, default_value_t = 0.0)]
    pub beta: f64,
    /// Lower clip range ε (and the upper one unless epsilon_high is set).
    #[arg(long, default_value_t = 0.2)]
    pub epsilon: f64,
    /// Upper clip range ε_high (DAPO's clip-higher).
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    /// grpo, bnpo, dr_grpo or dapo.
    #[arg(long, value_enum, default_value_t = GrpoLoss::Dapo)]
    pub loss_type: GrpoLoss,
    /// Advantage scaling: group (std of the group), batch (std of the batch) or none.
    #[arg(long, value_enum, default_value_t = ScaleRewards::Group)]
    pub scale_rewards: ScaleRewards,
    /// token (GRPO) or sequence (GSPO).
    #[arg(long, value_enum, default_value_t = RatioLevel::Token)]
    pub importance_sampling_level: RatioLevel,
    /// μ: optimizer steps on each batch of rollouts.
    #[arg(long, default_value_t = 1)]
    pub num_iterations: usize,
    /// Leave groups whose rewards are all equal out of the loss (they carry no signal).
    #[arg(long)]
    pub skip_zero_std_groups: bool,
    /// Multiply the KL term by the importance ratio, making its gradient the unbiased reverse-KL gradient
    /// (DeepSeek-V3.2; TRL 1.16's default). Changes the gradient even on-policy.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub use_bias_correction_kl: bool,
}

impl crate::settings::Settings for GrpoArgs {
    fn help_defaults() -> Vec<(&'static str, String)> {
        crate::train_args::TrainDefaults::ONLINE.help()
    }
}

impl GrpoArgs {
    pub fn validate(&self) -> Result<()> {
        if self.num_generations < 2 {
            return Err(self.online.setting_err(
                "num_generations",
                format!(
                    "must be at least 2 (a group needs a baseline), got {}",
                    self.num_generations
                ),
            ));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(self
                .online
                .setting_err("beta", "must be a finite number >= 0"));
        }
        for (k, e) in [
            ("epsilon", Some(self.epsilon)),
            ("epsilon_high", self.epsilon_high),
        ] {
            if let Some(e) = e {
                if !(e.is_finite() && e > 0.0) {
                    return Err(self.online.setting_err(k, "must be a finite number > 0"));
                }
            }
        }
        if self.num_iterations == 0 {
            return Err(self
                .online
                .setting_err("num_iterations", "must be at least 1"));
        }
        Ok(())
    }
}

/// `r_t(θ) = exp(log π_θ(o_t) − log π_old(o_t))` per token, or GSPO's `exp(mean_t log-ratio)` of the sequence
/// spread over its tokens.
pub fn importance_ratio(
    logp: &Tensor,
    old_logp: &Tensor,
    level: RatioLevel,
    seqs: &SeqBatch,
) -> Result<Tensor> {
    let log_ratio = (logp - old_logp)?;
    let log_w = match level {
        RatioLevel::Token => log_ratio,
        RatioLevel::Sequence => {
            let m = seqs.membership()?;
            let lens: Vec<f32> = seqs.lengths().iter().map(|&l| l as f32).collect();
            let lens = Tensor::from_vec(lens, seqs.rows, logp.device())?;
            let seq_mean = (m.matmul(&log_ratio.unsqueeze(1)?)?.squeeze(1)? / lens)?;
            m.t()?
                .contiguous()?
                .matmul(&seq_mean.unsqueeze(1)?)?
                .squeeze(1)?
        }
    };
    Ok(log_w.exp()?)
}

/// The PPO-clip surrogate per token: `−min(r·Â, clip(r, 1−ε_low, 1+ε_high)·Â)`.
pub fn clipped_surrogate(
    ratio: &Tensor,
    advantage: &Tensor,
    eps_low: f64,
    eps_high: f64,
) -> Result<Tensor> {
    let unclipped = (ratio * advantage)?;
    let clipped = (ratio.clamp(1.0 - eps_low, 1.0 + eps_high)? * advantage)?;
    Ok(unclipped.minimum(&clipped)?.neg()?)
}

/// The k3 estimator of KL(π_θ‖π_ref) per token: `exp(ref − logp) − (ref − logp) − 1`.
pub fn k3_kl(logp: &Tensor, ref_logp: &Tensor) -> Result<Tensor> {
    let d = (ref_logp - logp)?;
    Ok(((d.exp()? - &d)? - 1.0)?)
}

/// Per-token weights that turn a sum of per-token losses into the `loss_type` aggregate. Rows with
/// `keep[i] == false` get weight 0 and are not counted.
pub fn token_weights(
    loss_type: GrpoLoss,
    lengths: &[usize],
    keep: &[bool],
    max_new_tokens: usize,
) -> Vec<f32> {
    let rows = keep.iter().filter(|&&k| k).count().max(1) as f32;
    let tokens = lengths
        .iter()
        .zip(keep)
        .filter(|(_, &k)| k)
        .map(|(l, _)| *l)
        .sum::<usize>()
        .max(1) as f32;
    lengths
        .iter()
        .zip(keep)
        .flat_map(|(&len, &k)| {
            let w = if !k {
                0.0
            } else {
                match loss_type {
                    GrpoLoss::Grpo => 1.0 / (rows * len.max(1) as f32),
                    GrpoLoss::Bnpo | GrpoLoss::Dapo => 1.0 / tokens,
                    GrpoLoss::DrGrpo => 1.0 / (rows * max_new_tokens as f32),
                }
            };
            std::iter::repeat_n(w, len)
        })
        .collect()
}

/// Masked mean of a 0/1 condition over the kept tokens.
fn fraction(cond: impl Iterator<Item = bool>, keep: &[f32]) -> f64 {
    let (mut hit, mut n) = (0.0, 0.0);
    for (c, &k) in cond.zip(keep) {
        if k > 0.0 {
            n += 1.0;
            if c {
                hit += 1.0;
            }
        }
    }
    if n > 0.0 {
        hit / n
    } else {
        0.0
    }
}

/// The GRPO step on a batch: advantages from the group rewards, then μ optimizer steps.
pub struct Grpo {
    args: GrpoArgs,
}

impl Grpo {
    pub fn new(args: GrpoArgs) -> Result<Self> {
        args.validate()?;
        Ok(Self { args })
    }

    /// The loss of the batch under the current policy, with its metrics (used by `learn` and the parity tests).
    pub fn loss(
        &self,
        policy: &Policy,
        batch: &Batch,
        advantages: &[f32],
        keep: &[bool],
        ref_logp: Option<&[f32]>,
        with_entropy: bool,
    ) -> Result<(Tensor, Metrics)> {
        let a = &self.args;
        let dev = policy.model.device();
        let seqs = &batch.seqs;
        let n = seqs.num_tokens();
        let (logp, entropy) =
            rollout::token_logprobs(&policy.model, seqs, batch.temperature, with_entropy)?;
        let old = Tensor::from_slice(&batch.old_logprobs, n, dev)?;
        let adv_tok = seqs.per_token(advantages);
        let adv = Tensor::from_slice(&adv_tok, n, dev)?;
        let ratio = importance_ratio(&logp, &old, a.importance_sampling_level, seqs)?;
        let (eps_low, eps_high) = (a.epsilon, a.epsilon_high.unwrap_or(a.epsilon));
        let mut per_token = clipped_surrogate(&ratio, &adv, eps_low, eps_high)?;
        let mut metrics = Metrics::new();
        let w = token_weights(a.loss_type, &seqs.lengths(), keep, a.online.max_new_tokens);
        let kept: Vec<f32> = seqs.per_token(
            &keep
                .iter()
                .map(|&k| if k { 1.0 } else { 0.0 })
                .collect::<Vec<_>>(),
        );
        if let Some(r) = ref_logp {
            let mut kl = k3_kl(&logp, &Tensor::from_slice(r, n, dev)?)?;
            let kl_v: Vec<f32> = kl.to_vec1()?;
            if a.use_bias_correction_kl {
                kl = (kl * &ratio)?;
            }
            metrics.insert(
                "kl".into(),
                kl_v.iter()
                    .zip(&kept)
                    .map(|(k, m)| (k * m) as f64)
                    .sum::<f64>()
                    / kept.iter().sum::<f32>().max(1.0) as f64,
            );
            per_token = (per_token + (kl * a.beta)?)?;
        }
        let loss = (per_token * Tensor::from_vec(w, n, dev)?)?.sum_all()?;
        if let Some(e) = entropy {
            metrics.insert(
                "entropy".into(),
                e.iter()
                    .zip(&kept)
                    .map(|(e, m)| (e * m) as f64)
                    .sum::<f64>()
                    / kept.iter().sum::<f32>().max(1.0) as f64,
            );
        }
        let r: Vec<f32> = ratio.to_dtype(DType::F32)?.to_vec1()?;
        let low = r
            .iter()
            .zip(&adv_tok)
            .map(|(&r, &a)| (r as f64) < 1.0 - eps_low && a < 0.0);
        let high = r
            .iter()
            .zip(&adv_tok)
            .map(|(&r, &a)| (r as f64) > 1.0 + eps_high && a > 0.0);
        let region = r.iter().zip(&adv_tok).map(|(&r, &a)| {
            ((r as f64) < 1.0 - eps_low && a < 0.0) || ((r as f64) > 1.0 + eps_high && a > 0.0)
        });
        metrics.insert("clip_ratio/low_mean".into(), fraction(low, &kept));
        metrics.insert("clip_ratio/high_mean".into(), fraction(high, &kept));
        metrics.insert("clip_ratio/region_mean".into(), fraction(region, &kept));
        Ok((loss, metrics))
    }

    /// Group-normalised advantages of the batch and which rows enter the loss.
    pub fn advantages(&self, batch: &Batch) -> (Vec<f32>, Vec<bool>, f64) {
        let g = self.args.num_generations;
        let (adv, zero_std) = group_advantages(&batch.rewards, g, self.args.scale_rewards);
        let keep: Vec<bool> = (0..batch.rewards.len())
            .map(|i| !(self.args.skip_zero_std_groups && zero_std[i / g]))
            .collect();
        let frac_zero =
            zero_std.iter().filter(|&&z| z).count() as f64 / zero_std.len().max(1) as f64;
        (adv, keep, frac_zero)
    }
}

impl Algorithm for Grpo {
    fn generations(&self) -> usize {
        self.args.num_generations
    }

    fn needs_reference(&self) -> bool {
        self.args.beta != 0.0
    }

    fn learn(&mut self, policy: &Policy, step: &mut Step, batch: &Batch) -> Result<Metrics> {
        let (adv, keep, frac_zero) = self.advantages(batch);
        let ref_logp = if self.args.beta != 0.0 {
            Some(policy.reference_logprobs(&batch.seqs, batch.temperature)?)
        } else {
            None
        };
        let mut metrics = Metrics::new();
        if keep.iter().any(|&k| k) {
            for it in 0..self.args.num_iterations {
                let (loss, m) =
                    self.loss(policy, batch, &adv, &keep, ref_logp.as_deref(), it == 0)?;
                let value = step.apply(&loss)?;
                if it == 0 {
                    metrics = m;
                    metrics.insert("loss".into(), value);
                }
            }
        }
        metrics.insert("frac_reward_zero_std".into(), frac_zero);
        Ok(metrics)
    }
}

/// `rlhf grpo` with resolved settings.
pub fn run_grpo(args: &GrpoArgs) -> Result<OnlineSummary> {
    let settings = serde_json::to_value(args).expect("settings serialise");
    let algo = Grpo::new(args.clone())?;
    online::run(
        &args.online,
        &settings,
        args.beta != 0.0,
        |_: &Policy, _: Option<&Path>| Ok(algo),
    )
}
