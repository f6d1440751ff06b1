//! Settings of the offline preference trainers (`rlhf rm`, `rlhf dpo`): the keys both read ([`PrefArgs`], with
//! the keys every trainer shares, [`TrainArgs`]), resolved into [`PrefConfig`]. Each trainer's own keys live
//! with the trainer ([`crate::rm::RmArgs`], [`crate::dpo::DpoArgs`]) and resolve into [`RmOptions`] /
//! [`DpoOptions`]. Files may still group them in sections `[rm]`, `[dpo]`, `[lora]` ([`crate::settings`]).

use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::pref_loss::{LossParams, LossType};
use crate::settings::setting_err;
use crate::train_args::{TrainArgs, TrainConfig, TrainDefaults};

/// Settings `rlhf rm` and `rlhf dpo` both read (TOML keys; flags use the same names with dashes), each optional
/// so that file and flags can be merged. See docs/preference.md.
#[derive(Debug, Clone, Default, PartialEq, Args, Serialize, Deserialize)]
pub struct PrefArgs {
    /// TOML file with any of the settings (flags override it).
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Model directory (HF layout: config.json, weights, tokenizer): the policy / reward-model initialisation.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data (JSONL or Parquet, TRL formats).
    #[arg(long)]
    pub train_file: Option<PathBuf>,
    /// Evaluation data (same formats).
    #[arg(long)]
    pub eval_file: Option<PathBuf>,
    /// Chat template name for conversational data (default: the tokenizer's).
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Longest prompt + completion in tokens [default: 1024].
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Pairs (or KTO examples) per optimizer step [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainArgs,
}

/// Validated settings of `rlhf rm` and `rlhf dpo` (stored in every checkpoint as `training_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefConfig {
    /// Model directory (HF layout): the policy / reward-model initialisation and its tokenizer.
    pub model: PathBuf,
    pub train_file: PathBuf,
    pub eval_file: Option<PathBuf>,
    /// Chat template name for conversational data (default: the tokenizer's).
    pub chat_template: Option<String>,
    /// Longest sequence (prompt + completion) in tokens.
    pub max_length: usize,
    /// Pairs (or examples) per optimizer step.
    pub batch_size: usize,
    /// The settings every trainer shares.
    #[serde(flatten)]
    pub train: TrainConfig,
    pub rm: RmOptions,
    pub dpo: DpoOptions,
}

impl PrefConfig {
    /// The defaults of the trainer whose shared defaults are `d` ([`TrainDefaults::RM`] or [`TrainDefaults::DPO`])
    /// for the three required settings.
    pub fn new(
        model: PathBuf,
        train_file: PathBuf,
        output_dir: PathBuf,
        d: &TrainDefaults,
    ) -> Self {
        Self {
            model,
            train_file,
            eval_file: None,
            chat_template: None,
            max_length: 1024,
            batch_size: 8,
            train: TrainConfig::new(output_dir, d),
            rm: RmOptions::default(),
            dpo: DpoOptions::default(),
        }
    }
}

impl PrefArgs {
    /// An invalid-setting error naming where the settings came from.
    pub fn err(&self, key: &str, msg: impl Into<String>) -> TrainError {
        setting_err(self.config.as_deref(), key, msg)
    }

    /// The settings given here over the defaults (`d`: the trainer's shared ones), validated.
    pub fn resolve(&self, d: &TrainDefaults) -> Result<PrefConfig> {
        let err = |key: &str, msg: String| self.err(key, msg);
        let required = |v: &Option<PathBuf>, key: &str| {
            v.clone().ok_or_else(|| {
                err(
                    key,
                    format!(
                        "required (set it in the config file or pass --{})",
                        key.replace('_', "-")
                    ),
                )
            })
        };
        let model = required(&self.model, "model")?;
        let train_file = required(&self.train_file, "train_file")?;
        let base = PrefConfig::new(model, train_file, PathBuf::new(), d);
        let c = PrefConfig {
            eval_file: self.eval_file.clone(),
            chat_template: self.chat_template.clone(),
            max_length: self.max_length.unwrap_or(base.max_length),
            batch_size: self.batch_size.unwrap_or(base.batch_size),
            train: self.train.resolve(d, &err)?,
            ..base
        };
        if !c.model.join("config.json").is_file() {
            return Err(err(
                "model",
                format!("{} has no config.json", c.model.display()),
            ));
        }
        crate::config::check_data_file(&c.train_file).map_err(|m| err("train_file", m))?;
        if let Some(e) = &c.eval_file {
            crate::config::check_data_file(e).map_err(|m| err("eval_file", m))?;
        }
        for (k, v) in [("max_length", c.max_length), ("batch_size", c.batch_size)] {
            if v == 0 {
                return Err(err(k, "must be at least 1".into()));
            }
        }
        Ok(c)
    }
}

/// What only `rlhf rm` reads (stored as `rm` in its checkpoints; TOML keys and flags of the same names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RmOptions {
    /// η of the reward-centering term η·mean((r_c + r_r)²) (TRL `center_rewards_coefficient`); none = off.
    pub center_rewards_coefficient: Option<f64>,
    /// Heads on one trunk (an ensemble when > 1: `rm score` reports their mean and std).
    pub num_heads: usize,
    /// Scale of `rating` rows that declare none themselves.
    pub score_min: Option<f64>,
    pub score_max: Option<f64>,
}

impl Default for RmOptions {
    fn default() -> Self {
        Self {
            center_rewards_coefficient: None,
            num_heads: 1,
            score_min: None,
            score_max: None,
        }
    }
}

/// What only `rlhf dpo` reads (stored as `dpo` in its checkpoints): the objective, the reference model and the
/// loss hyper-parameters (TOML keys and flags of the same names: `beta`, `label_smoothing`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DpoOptions {
    pub loss_type: LossType,
    /// Frozen reference model directory (default: the initial `model`).
    pub reference_model: Option<PathBuf>,
    /// Compute the reference log-probs once before training instead of a reference forward every step.
    pub precompute_ref_log_probs: bool,
    #[serde(flatten)]
    pub params: LossParams,
}

impl Default for DpoOptions {
    fn default() -> Self {
        Self {
            loss_type: LossType::Sigmoid,
            reference_model: None,
            precompute_ref_log_probs: false,
            params: LossParams::default(),
        }
    }
}
