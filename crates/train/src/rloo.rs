//! `rlhf rloo`: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics"), as TRL 1.16's RLOOTrainer:
//! each completion is one action; its reward, less `β·KL(π_old‖π_ref)` summed over its tokens, minus the mean
//! reward of the prompt's other completions is its advantage; the loss is the clipped sequence-level
//! surrogate `−min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)` with `r = exp(Σ_t log π_θ − Σ_t log π_old)`, averaged
//! over sequences. `advantage_estimator = reinforce_pp` uses REINFORCE++'s batch-normalised advantage instead.

use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::advantage::{leave_one_out_advantages, normalize};
use crate::error::Result;
use crate::grpo::clipped_surrogate;
use crate::online::{self, Algorithm, Batch, Metrics, OnlineArgs, OnlineSummary, Policy, Step};
use crate::rollout;

/// The baseline of the advantage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageEstimator {
    /// Reward minus the mean reward of the prompt's other completions.
    Rloo,
    /// REINFORCE++: reward whitened over the whole batch (Hu 2025).
    #[value(name = "reinforce_pp")]
    ReinforcePp,
}

/// Settings of `rlhf rloo`: the online-RL settings plus these.
#[derive(Debug, Clone, PartialEq, clap::Parser, Serialize, Deserialize)]
#[command(about = "REINFORCE Leave-One-Out (RLOO) and REINFORCE++")]
pub struct RlooArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub online: OnlineArgs,
    /// Completions sampled per prompt (k ≥ 2).
    #[arg(long, default_value_t = 2)]
    pub num_generations: usize,
    /// KL coefficient β: the reward is reduced by β·Σ_t (log π_old − log π_ref) (0: no reference model).
    #[arg(long, default_value_t = 0.05)]
    pub beta: f64,
    #[arg(long, default_value_t = 0.2)]
    pub epsilon: f64,
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    /// rloo or reinforce_pp.
    #[arg(long, value_enum, default_value_t = AdvantageEstimator::Rloo)]
    pub advantage_estimator: AdvantageEstimator,
    /// Whiten the advantages over the batch ((A − mean) / (std + 1e-4)).
    #[arg(long)]
    pub normalize_advantages: bool,
    /// Optimizer steps on each batch of rollouts.
    #[arg(long, default_value_t = 1)]
    pub num_iterations: usize,
}

/// RLOO's KL-shaped sequence reward: `R_i − β·Σ_t (log π_old − log π_ref)`.
pub fn kl_shaped_rewards(
    rewards: &[f32],
    old: &[f32],
    reference: &[f32],
    offsets: &[usize],
    beta: f64,
) -> (Vec<f32>, Vec<f32>) {
    let kl: Vec<f32> = offsets
        .windows(2)
        .map(|w| (w[0]..w[1]).map(|t| old[t] - reference[t]).sum())
        .collect();
    let shaped = rewards
        .iter()
        .zip(&kl)
        .map(|(r, k)| r - beta as f32 * k)
        .collect();
    (shaped, kl)
}

pub struct Rloo {
    args: RlooArgs,
}

impl crate::settings::Settings for RlooArgs {
    fn help_defaults() -> Vec<(&'static str, String)> {
        crate::train_args::TrainDefaults::ONLINE.help()
    }
}

impl Rloo {
    pub fn new(args: RlooArgs) -> Result<Self> {
        if args.num_generations < 2 {
            return Err(args.online.setting_err(
                "num_generations",
                format!(
                    "must be at least 2 (the leave-one-out baseline needs another sample), got {}",
                    args.num_generations
                ),
            ));
        }
        if !(args.beta.is_finite() && args.beta >= 0.0) {
            return Err(args
                .online
                .setting_err("beta", "must be a finite number >= 0"));
        }
        if !(args.epsilon.is_finite() && args.epsilon > 0.0)
            || args
                .epsilon_high
                .is_some_and(|e| !(e.is_finite() && e > 0.0))
        {
            return Err(args
                .online
                .setting_err("epsilon", "clip ranges must be finite numbers > 0"));
        }
        if args.num_iterations == 0 {
            return Err(args
                .online
                .setting_err("num_iterations", "must be at least 1"));
        }
        Ok(Self { args })
    }

    /// Advantages per completion, and the mean per-token KL (TRL's `kl`) when β > 0.
    pub fn advantages(&self, batch: &Batch, ref_logp: Option<&[f32]>) -> (Vec<f32>, Option<f64>) {
        let (rewards, kl) = match ref_logp {
            Some(r) => {
                let (s, kl) = kl_shaped_rewards(
                    &batch.rewards,
                    &batch.old_logprobs,
                    r,
                    &batch.seqs.offsets,
                    self.args.beta,
                );
                (
                    s,
                    Some(
                        kl.iter().map(|&k| k as f64).sum::<f64>()
                            / batch.seqs.num_tokens().max(1) as f64,
                    ),
                )
            }
            None => (batch.rewards.clone(), None),
        };
        let mut adv = match self.args.advantage_estimator {
            AdvantageEstimator::Rloo => {
                leave_one_out_advantages(&rewards, self.args.num_generations)
            }
            AdvantageEstimator::ReinforcePp => normalize(&rewards),
        };
        if self.args.normalize_advantages {
            let m = crate::advantage::mean(&adv);
            let s = crate::advantage::std_unbiased(&adv);
            adv = adv.iter().map(|a| (a - m) / (s + 1e-4)).collect();
        }
        (adv, kl)
    }

    /// Sequence-level clipped loss of the batch (mean over completions).
    pub fn loss(
        &self,
        policy: &Policy,
        batch: &Batch,
        advantages: &[f32],
        with_entropy: bool,
    ) -> Result<(Tensor, Metrics)> {
        let seqs = &batch.seqs;
        let dev = policy.model.device();
        let (logp, entropy) =
            rollout::token_logprobs(&policy.model, seqs, batch.temperature, with_entropy)?;
        let m = seqs.membership()?;
        let seq_logp = m.matmul(&logp.unsqueeze(1)?)?.squeeze(1)?;
        let old: Vec<f32> = seqs
            .offsets
            .windows(2)
            .map(|w| batch.old_logprobs[w[0]..w[1]].iter().sum())
            .collect();
        let ratio = (seq_logp - Tensor::from_vec(old, seqs.rows, dev)?)?.exp()?;
        let adv = Tensor::from_slice(advantages, seqs.rows, dev)?;
        let (lo, hi) = (
            self.args.epsilon,
            self.args.epsilon_high.unwrap_or(self.args.epsilon),
        );
        let loss = clipped_surrogate(&ratio, &adv, lo, hi)?.mean_all()?;
        let mut metrics = Metrics::new();
        if let Some(e) = entropy {
            metrics.insert(
                "entropy".into(),
                e.iter().map(|&x| x as f64).sum::<f64>() / e.len().max(1) as f64,
            );
        }
        let r: Vec<f32> = ratio.to_vec1()?;
        let clipped = r
            .iter()
            .zip(advantages)
            .filter(|(&r, &a)| {
                ((r as f64) < 1.0 - lo && a < 0.0) || ((r as f64) > 1.0 + hi && a > 0.0)
            })
            .count();
        metrics.insert(
            "clip_ratio/region_mean".into(),
            clipped as f64 / r.len().max(1) as f64,
        );
        Ok((loss, metrics))
    }
}

impl Algorithm for Rloo {
    fn generations(&self) -> usize {
        self.args.num_generations
    }

    fn needs_reference(&self) -> bool {
        self.args.beta != 0.0
    }

    fn learn(&mut self, policy: &Policy, step: &mut Step, batch: &Batch) -> Result<Metrics> {
        let ref_logp = if self.args.beta != 0.0 {
            Some(policy.reference_logprobs(&batch.seqs, batch.temperature)?)
        } else {
            None
        };
        let (adv, kl) = self.advantages(batch, ref_logp.as_deref());
        let mut metrics = Metrics::new();
        for it in 0..self.args.num_iterations {
            let (loss, m) = self.loss(policy, batch, &adv, it == 0)?;
            let value = step.apply(&loss)?;
            if it == 0 {
                metrics = m;
                metrics.insert("loss".into(), value);
            }
        }
        if let Some(kl) = kl {
            metrics.insert("kl".into(), kl);
        }
        Ok(metrics)
    }
}

/// `rlhf rloo` with resolved settings.
pub fn run_rloo(args: &RlooArgs) -> Result<OnlineSummary> {
    let settings = serde_json::to_value(args).expect("settings serialise");
    let algo = Rloo::new(args.clone())?;
    online::run(
        &args.online,
        &settings,
        args.beta != 0.0,
        |_: &Policy, _: Option<&Path>| Ok(algo),
    )
}
