//! `rlhf ppo`: PPO with a KL penalty to a frozen reference (Ziegler et al. 2019; Ouyang et al. 2022), as TRL's
//! PPOTrainer (1.12) does it: one completion per prompt; per-token reward `−β·KL_t` plus the score at the last
//! token; a separate value model (initialised from the reward model or the policy's trunk); GAE(γ, λ);
//! whitened advantages; several epochs × mini-batches of the clipped policy loss and the clipped value loss.
//! An adaptive KL controller (target, horizon) can steer β.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rlhf_model::apart;
use rlhf_model::seq_cls::SeqCls;
use serde::{Deserialize, Serialize};

use crate::advantage::{gae, kl_estimate, whiten, AdaptiveKl, KlEstimator};
use crate::error::{io_err, Result, TrainError};
use crate::online::{self, Algorithm, Batch, Metrics, OnlineArgs, OnlineSummary, Policy, Step};
use crate::rollout::{self, sample_seed, SeqBatch};

const VALUE_DIR: &str = "value";
const STATE_FILE: &str = "ppo_state.json";

/// Settings of `rlhf ppo`: the online-RL settings plus these.
#[derive(Debug, Clone, PartialEq, clap::Parser, Serialize, Deserialize)]
#[command(about = "PPO with a KL penalty to a frozen reference and a value model")]
pub struct PpoArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub online: OnlineArgs,
    /// Value model initialisation: a reward-model directory (TRL's usual choice), or unset for the policy's
    /// trunk with a fresh head (default: the reward model when the reward is one `rm:` source).
    #[arg(long)]
    pub value_model: Option<PathBuf>,
    /// Passes over each batch of rollouts.
    #[arg(long, default_value_t = 4)]
    pub num_ppo_epochs: usize,
    /// Mini-batches per pass.
    #[arg(long, default_value_t = 1)]
    pub num_mini_batches: usize,
    /// KL penalty coefficient β (the starting value with target_kl).
    #[arg(long, default_value_t = 0.05)]
    pub kl_coef: f64,
    /// k1, k2 or k3.
    #[arg(long, value_enum, default_value_t = KlEstimator::K1)]
    pub kl_estimator: KlEstimator,
    /// Adaptive KL: steer the per-sequence KL toward this target (unset: fixed β).
    #[arg(long)]
    pub target_kl: Option<f64>,
    /// Horizon of the adaptive KL controller, in samples.
    #[arg(long, default_value_t = 10000.0)]
    pub kl_horizon: f64,
    /// Policy clip range ε.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange: f64,
    /// Value clip range.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange_value: f64,
    /// Weight of the value loss.
    #[arg(long, default_value_t = 0.1)]
    pub vf_coef: f64,
    /// Discount γ.
    #[arg(long, default_value_t = 1.0)]
    pub gamma: f64,
    /// GAE λ.
    #[arg(long, default_value_t = 0.95)]
    pub lam: f64,
    /// Whiten the per-token rewards before GAE.
    #[arg(long)]
    pub whiten_rewards: bool,
}

impl crate::settings::Settings for PpoArgs {
    fn help_defaults() -> Vec<(&'static str, String)> {
        crate::train_args::TrainDefaults::ONLINE.help()
    }
}

impl PpoArgs {
    pub fn validate(&self) -> Result<()> {
        for (k, v) in [
            ("num_ppo_epochs", self.num_ppo_epochs),
            ("num_mini_batches", self.num_mini_batches),
        ] {
            if v == 0 {
                return Err(self.online.setting_err(k, "must be at least 1"));
            }
        }
        if self.num_mini_batches > self.online.prompts_per_step {
            return Err(self.online.setting_err(
                "num_mini_batches",
                format!(
                    "{} mini-batches of {} rollouts",
                    self.num_mini_batches, self.online.prompts_per_step
                ),
            ));
        }
        for (k, v) in [("kl_coef", self.kl_coef), ("vf_coef", self.vf_coef)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(self.online.setting_err(k, "must be a finite number >= 0"));
            }
        }
        for (k, v) in [
            ("cliprange", self.cliprange),
            ("cliprange_value", self.cliprange_value),
            ("kl_horizon", self.kl_horizon),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(self.online.setting_err(k, "must be a finite number > 0"));
            }
        }
        for (k, v) in [("gamma", self.gamma), ("lam", self.lam)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(self.online.setting_err(k, "must be in [0, 1]"));
            }
        }
        if self.target_kl.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
            return Err(self
                .online
                .setting_err("target_kl", "must be a finite number > 0"));
        }
        Ok(())
    }
}

/// Clipped value loss per token: `½ max((V − R)², (clip(V, V_old ± c) − R)²)`; also whether the clip bound.
pub fn value_loss(
    v: &Tensor,
    v_old: &Tensor,
    returns: &Tensor,
    c: f64,
) -> Result<(Tensor, Tensor)> {
    let clipped = (v_old + (v - v_old)?.clamp(-c, c)?)?;
    let l1 = (v - returns)?.sqr()?;
    let l2 = (clipped - returns)?.sqr()?;
    let was_clipped = l2.gt(&l1)?;
    Ok(((l1.maximum(&l2)? * 0.5)?, was_clipped))
}

/// PPO's clipped policy loss per token: `max(−Â·r, −Â·clip(r, 1 ± ε))`; also whether the clip bound.
pub fn policy_loss(ratio: &Tensor, adv: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let l1 = (adv * ratio)?.neg()?;
    let l2 = (adv * ratio.clamp(1.0 - eps, 1.0 + eps)?)?.neg()?;
    let was_clipped = l2.gt(&l1)?;
    Ok((l1.maximum(&l2)?, was_clipped))
}

/// Per-token rewards: `−β·KL_t`, plus the sequence's score at its last token.
pub fn token_rewards(scores: &[f32], kl: &[f32], offsets: &[usize], beta: f64) -> Vec<f32> {
    let mut r: Vec<f32> = kl.iter().map(|k| -(beta as f32) * k).collect();
    for (i, w) in offsets.windows(2).enumerate() {
        r[w[1] - 1] += scores[i];
    }
    r
}

/// Value estimates of the value model at the completion positions (`[tokens]`).
pub fn token_values(value: &SeqCls, seqs: &SeqBatch) -> Result<Tensor> {
    let hidden = rollout::completion_hidden(&value.lm, seqs)?;
    Ok(value.score_hidden(&hidden)?.squeeze(1)?)
}

#[derive(Serialize, Deserialize)]
struct PpoState {
    kl_coef: f64,
}

pub struct Ppo {
    args: PpoArgs,
    /// Seed of the value head and the mini-batch order.
    seed: u64,
    value: SeqCls,
    kl: AdaptiveKl,
}

fn model_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Model(e.to_string())
}

impl Ppo {
    /// The value model from checkpoint `resume`, else from `value_model` / the single reward model / the policy.
    pub fn new(args: PpoArgs, policy: &Policy, resume: Option<&Path>) -> Result<Self> {
        args.validate()?;
        let seed = args.online.train()?.seed;
        let device = Device::Cpu;
        let pad = policy.tokenizer.pad_id().ok();
        let single_rm = match args.online.reward.as_slice() {
            [one] => one
                .strip_prefix("rm:")
                .filter(|d| !d.contains(','))
                .map(PathBuf::from),
            _ => None,
        };
        let mut value = match (resume, args.value_model.clone().or(single_rm)) {
            (Some(ckpt), _) => SeqCls::load(&ckpt.join(VALUE_DIR), 1, pad, seed, &device),
            (None, Some(dir)) => SeqCls::load(&dir, 1, pad, seed, &device),
            (None, None) => {
                SeqCls::from_causal_lm(policy.model.duplicate().map_err(model_err)?, 1, pad, seed)
            }
        }
        .map_err(|e| model_err(format!("value model: {e}")))?;
        // A value model loaded from a directory computes like the policy (one duplicated from it already does).
        value.lm.set_precision(policy.model.precision());
        value.lm.set_backend(policy.model.backend());
        let kl = AdaptiveKl {
            beta: args.kl_coef,
            target: args.target_kl.unwrap_or(1.0),
            horizon: args.kl_horizon,
        };
        Ok(Self {
            args,
            seed,
            value,
            kl,
        })
    }

    pub fn kl_coef(&self) -> f64 {
        self.kl.beta
    }
}

/// The rows of `batch` listed in `rows` as their own batch, with the flat token indices they own.
fn subset(batch: &Batch, rows: &[usize]) -> Result<(SeqBatch, Vec<usize>)> {
    let pairs: Vec<(&[u32], &[u32])> = rows
        .iter()
        .map(|&i| {
            (
                batch.prompt_ids[i].as_slice(),
                batch.rollouts[i].completion_ids.as_slice(),
            )
        })
        .collect();
    let seqs = if batch.seqs.grouping.is_some() {
        SeqBatch::grouped(&pairs, 0, &Device::Cpu)?
    } else {
        SeqBatch::new(&pairs, 0, &Device::Cpu)?
    };
    let flat = rows
        .iter()
        .flat_map(|&i| batch.seqs.offsets[i]..batch.seqs.offsets[i + 1])
        .collect();
    Ok((seqs, flat))
}

fn pick(v: &[f32], idx: &[usize]) -> Vec<f32> {
    idx.iter().map(|&i| v[i]).collect()
}

fn mean_of(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()? as f64)
}

impl Algorithm for Ppo {
    fn generations(&self) -> usize {
        1
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn runs_grouped(&self) -> bool {
        self.value.lm.attends_by_group()
    }

    fn extra_params(&self) -> Vec<(String, Var)> {
        self.value
            .trainable_vars()
            .into_iter()
            .map(|(k, v)| (format!("value.{k}"), v))
            .collect()
    }

    fn learn(&mut self, policy: &Policy, step: &mut Step, batch: &Batch) -> Result<Metrics> {
        let a = &self.args;
        let seqs = &batch.seqs;
        let dev = policy.model.device().clone();
        let old = &batch.old_logprobs;
        let value = &self.value;
        let (reference, first_values) = apart(
            || policy.reference_logprobs(seqs, batch.temperature),
            || token_values(value, seqs),
        );
        let (reference, first_values) = (reference?, first_values?);
        let values: Vec<f32> = first_values.detach().to_vec1()?;
        // The first mini-batch of one spanning the batch runs the value model on the same rows and weights:
        // its forward (and tape) is this one.
        let mut first_values = (a.num_mini_batches == 1).then_some(first_values);
        let beta = self.kl.beta;
        let kl: Vec<f32> = old
            .iter()
            .zip(&reference)
            .map(|(&o, &r)| kl_estimate(o, r, a.kl_estimator))
            .collect();
        let mut rewards = token_rewards(&batch.rewards, &kl, &seqs.offsets, beta);
        if a.whiten_rewards {
            rewards = whiten(&rewards, false);
        }
        let (mut adv, mut ret) = (Vec::with_capacity(old.len()), Vec::with_capacity(old.len()));
        for w in seqs.offsets.windows(2) {
            let (x, y) = gae(
                &rewards[w[0]..w[1]],
                &values[w[0]..w[1]],
                a.gamma as f32,
                a.lam as f32,
            );
            adv.extend(x);
            ret.extend(y);
        }
        let adv = whiten(&adv, true);

        let n_rows = seqs.rows;
        let mb = n_rows.div_ceil(a.num_mini_batches);
        let (
            mut pg_losses,
            mut vf_losses,
            mut pg_clip,
            mut vf_clip,
            mut approx_kl,
            mut ratios,
            mut entropies,
        ) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(sample_seed(self.seed, step.global_step(), 0x9e37));
        for _epoch in 0..a.num_ppo_epochs {
            let mut order: Vec<usize> = (0..n_rows).collect();
            order.shuffle(&mut rng);
            for rows in order.chunks(mb) {
                let (sub_owned, flat) = if a.num_mini_batches == 1 {
                    (None, (0..old.len()).collect::<Vec<_>>())
                } else {
                    let (s, f) = subset(batch, rows)?;
                    (Some(s), f)
                };
                let sub = sub_owned.as_ref().unwrap_or(seqs);
                let n = flat.len();
                let t = |v: &[f32]| Tensor::from_vec(pick(v, &flat), n, &dev);
                let first = first_values.take();
                let (logp, vpred) = apart(
                    || rollout::token_logprobs(&policy.model, sub, batch.temperature, true),
                    || first.map_or_else(|| token_values(value, sub), Ok),
                );
                let ((new_logp, ent), vpred) = (logp?, vpred?);
                let diff = (&new_logp - t(old)?)?;
                let ratio = diff.exp()?;
                let (pg, pg_c) = policy_loss(&ratio, &t(&adv)?, a.cliprange)?;
                let (vf, vf_c) = value_loss(&vpred, &t(&values)?, &t(&ret)?, a.cliprange_value)?;
                let pg_loss = pg.mean_all()?;
                let vf_loss = vf.mean_all()?;
                // Policy and value share no parameter: their backward passes run side by side.
                step.backward_apart(&pg_loss, &(&vf_loss * a.vf_coef)?)?;
                step.update()?;
                pg_losses.push(pg_loss.to_scalar::<f32>()? as f64);
                vf_losses.push(vf_loss.to_scalar::<f32>()? as f64);
                pg_clip.push(mean_of(&pg_c)?);
                vf_clip.push(mean_of(&vf_c)?);
                approx_kl.push((diff.sqr()?.mean_all()?.to_scalar::<f32>()? * 0.5) as f64);
                ratios.push(mean_of(&ratio)?);
                let e = ent.unwrap_or_default();
                entropies.push(e.iter().map(|&x| x as f64).sum::<f64>() / e.len().max(1) as f64);
            }
        }
        let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let seq_sum = |v: &[f32]| -> Vec<f64> {
            seqs.offsets
                .windows(2)
                .map(|w| v[w[0]..w[1]].iter().map(|&x| x as f64).sum())
                .collect()
        };
        let kl_seq = seq_sum(&kl);
        let mean_kl = avg(&kl_seq);
        let non_score = -beta * mean_kl;
        let scores = batch.rewards.iter().map(|&x| x as f64).sum::<f64>() / n_rows as f64;
        let ratio_mean = avg(&ratios);
        let mut m = Metrics::new();
        m.insert("objective/kl".into(), mean_kl);
        m.insert(
            "objective/entropy".into(),
            avg(&seq_sum(&old.iter().map(|x| -x).collect::<Vec<_>>())),
        );
        m.insert("objective/non_score_reward".into(), non_score);
        m.insert("objective/rlhf_reward".into(), scores + non_score);
        m.insert("objective/scores".into(), scores);
        m.insert("policy/approxkl_avg".into(), avg(&approx_kl));
        m.insert("policy/clipfrac_avg".into(), avg(&pg_clip));
        m.insert("loss/policy_avg".into(), avg(&pg_losses));
        m.insert("loss/value_avg".into(), avg(&vf_losses));
        m.insert("val/clipfrac_avg".into(), avg(&vf_clip));
        m.insert("policy/entropy_avg".into(), avg(&entropies));
        m.insert("val/ratio".into(), ratio_mean);
        m.insert(
            "val/ratio_var".into(),
            ratios.iter().map(|r| (r - ratio_mean).powi(2)).sum::<f64>()
                / ratios.len().max(1) as f64,
        );
        m.insert(
            "val/num_eos_tokens".into(),
            batch.rollouts.iter().filter(|r| r.eos).count() as f64,
        );
        m.insert("kl_coef".into(), beta);
        m.insert("loss".into(), avg(&pg_losses) + a.vf_coef * avg(&vf_losses));
        if a.target_kl.is_some() {
            self.kl.update(mean_kl, n_rows);
        }
        Ok(m)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.value.save(&dir.join(VALUE_DIR)).map_err(model_err)?;
        let path = dir.join(STATE_FILE);
        std::fs::write(
            &path,
            serde_json::to_string(&PpoState {
                kl_coef: self.kl.beta,
            })
            .expect("plain data"),
        )
        .map_err(io_err(&path))
    }

    fn restore(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let s: PpoState = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path,
            msg: e.to_string(),
        })?;
        self.kl.beta = s.kl_coef;
        Ok(())
    }
}

/// `rlhf ppo` with resolved settings.
pub fn run_ppo(args: &PpoArgs) -> Result<OnlineSummary> {
    let settings = serde_json::to_value(args).expect("settings serialise");
    args.validate()?;
    online::run(
        &args.online,
        &settings,
        true,
        |policy: &Policy, resume: Option<&Path>| Ppo::new(args.clone(), policy, resume),
    )
}
