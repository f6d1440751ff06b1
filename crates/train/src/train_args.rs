//! The settings every trainer shares (`rlhf sft`, `rm`, `dpo`, `grpo`, `rloo`, `ppo`): output directory,
//! optimizer, schedule, run length, cadence, seed, resume, bf16 and LoRA. [`TrainArgs`] is what each trainer's
//! settings struct flattens (flags and TOML keys of the same names, each optional); [`TrainArgs::resolve`] fills
//! what is unset from the trainer's [`TrainDefaults`] (TRL's defaults differ per trainer) and validates, giving
//! [`TrainConfig`], which the core loop reads (held by [`crate::trainer::LoopSettings`]), and the source of AdamW's
//! ([`TrainConfig::adamw`]).

use std::path::PathBuf;

use rlhf_model::lora::LoraConfig;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::lora::LoraArgs;
use crate::optim::AdamWConfig;
use crate::schedule::{ScheduleKind, Warmup};

/// The shared settings as given (TOML key ⇔ flag); unset ones take the trainer's [`TrainDefaults`], which
/// `--help` shows.
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct TrainArgs {
    /// Where checkpoints, metrics.jsonl and the final model go.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Peak learning rate.
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// constant, linear or cosine.
    #[arg(long, value_enum)]
    pub lr_scheduler_type: Option<ScheduleKind>,
    /// Linear warmup steps.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of all steps (instead of warmup_steps).
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Decoupled weight decay (not applied to norms and biases).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW beta1.
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// AdamW beta2.
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// AdamW epsilon.
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    /// Clip gradients to this global L2 norm; 0 disables.
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Total optimizer steps; overrides num_train_epochs when set.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Passes over the training data (or prompts).
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Write a metrics line (means over the window) every N steps.
    #[arg(long)]
    pub logging_steps: Option<u64>,
    /// Evaluate every N steps (and always at the end when there is eval data); 0 = only at the end.
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// Checkpoint every N steps; 0 disables.
    #[arg(long)]
    pub save_steps: Option<u64>,
    /// Keep only the newest N checkpoints.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Seed of the data order, new heads, LoRA init and dropout, and sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue from the newest complete checkpoint in output_dir (its settings must match these).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub resume: Option<bool>,
    /// Train into an output_dir that holds a previous run (or the model itself), replacing it.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite_output_dir: Option<bool>,
    /// bf16 matrix products with f32 accumulation, f32 weights and optimizer, as TRL's `bf16=True`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub bf16: Option<bool>,
    /// How the model's forward and backward run: `engine` (hand-written passes of the whole stack, the
    /// default) or `candle` (candle's autograd graph, the reference implementation).
    #[arg(long)]
    pub backend: Option<rlhf_model::Backend>,
    /// LoRA: train adapters only; the output dir gets the merged model and the adapter in `adapter/`.
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraArgs,
}

/// The shared settings whose default differs between trainers (TRL's per-trainer configs); the others have
/// one default everywhere (see [`TrainConfig::new`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainDefaults {
    pub learning_rate: f64,
    pub num_train_epochs: f64,
    pub logging_steps: u64,
    pub save_steps: u64,
}

impl TrainDefaults {
    /// TRL's SFTConfig (transformers' TrainingArguments: 3 epochs, save every 500 steps).
    pub const SFT: Self = Self {
        learning_rate: 2e-5,
        num_train_epochs: 3.0,
        logging_steps: 10,
        save_steps: 500,
    };
    /// TRL 1.16's RewardConfig.
    pub const RM: Self = Self {
        learning_rate: 1e-4,
        num_train_epochs: 1.0,
        logging_steps: 10,
        save_steps: 500,
    };
    /// TRL 1.16's DPOConfig.
    pub const DPO: Self = Self {
        learning_rate: 1e-6,
        num_train_epochs: 1.0,
        logging_steps: 10,
        save_steps: 500,
    };
    /// GRPO, RLOO and PPO: a metrics line every step, no checkpoints unless asked.
    pub const ONLINE: Self = Self {
        learning_rate: 1e-6,
        num_train_epochs: 1.0,
        logging_steps: 1,
        save_steps: 0,
    };

    /// `(key, default)` of every shared setting that has one, for `--help`.
    pub fn help(&self) -> Vec<(&'static str, String)> {
        let d = TrainConfig::new(PathBuf::new(), self);
        let a = AdamWConfig::default();
        vec![
            ("learning_rate", format!("{:e}", d.learning_rate)),
            ("lr_scheduler_type", "linear".into()),
            ("warmup_steps", d.warmup_steps.to_string()),
            ("weight_decay", d.weight_decay.to_string()),
            ("adam_beta1", a.beta1.to_string()),
            ("adam_beta2", a.beta2.to_string()),
            ("adam_epsilon", format!("{:e}", a.eps)),
            ("max_grad_norm", d.max_grad_norm.to_string()),
            ("num_train_epochs", d.num_train_epochs.to_string()),
            ("logging_steps", d.logging_steps.to_string()),
            ("eval_steps", d.eval_steps.to_string()),
            ("save_steps", d.save_steps.to_string()),
            ("seed", d.seed.to_string()),
            ("resume", "false".into()),
            ("overwrite_output_dir", "false".into()),
            ("bf16", "false".into()),
            ("backend", "engine".into()),
        ]
    }
}

/// The shared settings resolved and validated. Trainers flatten it into the settings they store in every
/// checkpoint (`training_config.json`, compared on resume), so its keys stay the flat TOML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub output_dir: PathBuf,
    pub learning_rate: f64,
    pub lr_scheduler_type: ScheduleKind,
    pub warmup_steps: u64,
    pub warmup_ratio: Option<f64>,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// Global gradient-norm clip; 0 disables.
    pub max_grad_norm: f64,
    /// Overrides `num_train_epochs`.
    pub max_steps: Option<u64>,
    pub num_train_epochs: f64,
    pub logging_steps: u64,
    /// 0: evaluate only at the end.
    pub eval_steps: u64,
    /// 0: no checkpoints.
    pub save_steps: u64,
    pub save_total_limit: Option<usize>,
    pub seed: u64,
    pub resume: bool,
    /// Replace a previous run in output_dir (see [`crate::output_dir::prepare`]).
    #[serde(default)]
    pub overwrite_output_dir: bool,
    /// LoRA adapters instead of full fine-tuning.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// Linear layers' matrix products in bf16 (see `rlhf_model::CausalLm::set_precision`).
    #[serde(default)]
    pub bf16: bool,
    /// See [`TrainArgs::backend`].
    #[serde(default)]
    pub backend: rlhf_model::Backend,
}

impl TrainConfig {
    /// The defaults of a trainer (`d`) writing to `output_dir`.
    pub fn new(output_dir: PathBuf, d: &TrainDefaults) -> Self {
        let a = AdamWConfig::default();
        Self {
            output_dir,
            learning_rate: d.learning_rate,
            lr_scheduler_type: ScheduleKind::Linear,
            warmup_steps: 0,
            warmup_ratio: None,
            weight_decay: a.weight_decay,
            adam_beta1: a.beta1,
            adam_beta2: a.beta2,
            adam_epsilon: a.eps,
            max_grad_norm: 1.0,
            max_steps: None,
            num_train_epochs: d.num_train_epochs,
            logging_steps: d.logging_steps,
            eval_steps: 0,
            save_steps: d.save_steps,
            save_total_limit: None,
            seed: 42,
            resume: false,
            overwrite_output_dir: false,
            lora: None,
            bf16: false,
            backend: rlhf_model::Backend::Engine,
        }
    }

    /// Sets a trained model's precision and backend from these settings.
    pub fn configure(&self, model: &mut rlhf_model::CausalLm) {
        if self.bf16 {
            model.set_precision(rlhf_model::Precision::Bf16);
        }
        model.set_backend(self.backend);
    }

    pub fn warmup(&self) -> Warmup {
        match self.warmup_ratio {
            Some(r) => Warmup::Ratio(r),
            None => Warmup::Steps(self.warmup_steps),
        }
    }

    /// AdamW's settings.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_epsilon,
            weight_decay: self.weight_decay,
        }
    }
}

impl TrainArgs {
    /// The settings given here over the trainer's defaults `d`, validated; `err(key, msg)` makes an error that
    /// names where the settings came from.
    pub fn resolve(
        &self,
        d: &TrainDefaults,
        err: &dyn Fn(&str, String) -> TrainError,
    ) -> Result<TrainConfig> {
        let output_dir = self.output_dir.clone().ok_or_else(|| {
            err(
                "output_dir",
                "required (set it in the config file or pass --output-dir)".into(),
            )
        })?;
        let base = TrainConfig::new(output_dir, d);
        let cfg = TrainConfig {
            learning_rate: self.learning_rate.unwrap_or(base.learning_rate),
            lr_scheduler_type: self.lr_scheduler_type.unwrap_or(base.lr_scheduler_type),
            warmup_steps: self.warmup_steps.unwrap_or(base.warmup_steps),
            warmup_ratio: self.warmup_ratio,
            weight_decay: self.weight_decay.unwrap_or(base.weight_decay),
            adam_beta1: self.adam_beta1.unwrap_or(base.adam_beta1),
            adam_beta2: self.adam_beta2.unwrap_or(base.adam_beta2),
            adam_epsilon: self.adam_epsilon.unwrap_or(base.adam_epsilon),
            max_grad_norm: self.max_grad_norm.unwrap_or(base.max_grad_norm),
            max_steps: self.max_steps,
            num_train_epochs: self.num_train_epochs.unwrap_or(base.num_train_epochs),
            logging_steps: self.logging_steps.unwrap_or(base.logging_steps),
            eval_steps: self.eval_steps.unwrap_or(base.eval_steps),
            save_steps: self.save_steps.unwrap_or(base.save_steps),
            save_total_limit: self.save_total_limit,
            seed: self.seed.unwrap_or(base.seed),
            resume: self.resume.unwrap_or(base.resume),
            overwrite_output_dir: self
                .overwrite_output_dir
                .unwrap_or(base.overwrite_output_dir),
            lora: self.lora.apply(None),
            bf16: self.bf16.unwrap_or(base.bf16),
            backend: self.backend.unwrap_or(base.backend),
            ..base
        };
        cfg.validate(err)?;
        Ok(cfg)
    }
}

impl TrainConfig {
    /// The first invalid setting as an error made by `err(key, msg)`.
    pub fn validate(&self, err: &dyn Fn(&str, String) -> TrainError) -> Result<()> {
        let in_range = |v: f64, key: &str, lo: f64, hi: f64, what: &str| {
            if v.is_finite() && v >= lo && v <= hi {
                Ok(())
            } else {
                Err(err(key, format!("{v} is not {what}")))
            }
        };
        in_range(
            self.learning_rate,
            "learning_rate",
            f64::MIN_POSITIVE,
            f64::MAX,
            "a finite number > 0",
        )?;
        in_range(
            self.weight_decay,
            "weight_decay",
            0.0,
            f64::MAX,
            "a finite number >= 0",
        )?;
        in_range(
            self.max_grad_norm,
            "max_grad_norm",
            0.0,
            f64::MAX,
            "a finite number >= 0 (0 disables clipping)",
        )?;
        in_range(
            self.adam_beta1,
            "adam_beta1",
            0.0,
            1.0 - f64::EPSILON,
            "in [0, 1)",
        )?;
        in_range(
            self.adam_beta2,
            "adam_beta2",
            0.0,
            1.0 - f64::EPSILON,
            "in [0, 1)",
        )?;
        in_range(
            self.adam_epsilon,
            "adam_epsilon",
            0.0,
            f64::MAX,
            "a finite number >= 0",
        )?;
        if let Some(r) = self.warmup_ratio {
            in_range(r, "warmup_ratio", 0.0, 1.0, "in [0, 1]")?;
            if self.warmup_steps > 0 {
                return Err(err(
                    "warmup_ratio",
                    "set either warmup_steps or warmup_ratio, not both".into(),
                ));
            }
        }
        if self.max_steps == Some(0) {
            return Err(err(
                "max_steps",
                "must be at least 1 (leave it unset to train num_train_epochs epochs)".into(),
            ));
        }
        if self.max_steps.is_none() {
            in_range(
                self.num_train_epochs,
                "num_train_epochs",
                f64::MIN_POSITIVE,
                f64::MAX,
                "a finite number > 0",
            )?;
        }
        if self.logging_steps == 0 {
            return Err(err("logging_steps", "must be at least 1".into()));
        }
        if self.save_total_limit == Some(0) {
            return Err(err("save_total_limit", "must be at least 1".into()));
        }
        if let Some(l) = &self.lora {
            crate::lora::check(l).map_err(|(k, m)| err(&format!("lora_{k}"), m.into()))?;
        }
        Ok(())
    }
}
