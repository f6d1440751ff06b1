//! Settings of the offline preference trainers (`rlhf rm`, `rlhf dpo`): [`PrefConfig`] (a TOML file whose
//! sections `[lora]`, `[rm]` and `[dpo]` hold what only LoRA / one trainer reads), the flags both commands
//! share ([`CommonArgs`]) and their validation. Each trainer's own flags live with the trainer.

use std::path::{Path, PathBuf};

use clap::Args;
use rlhf_model::lora::LoraConfig;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{io_err, Result, TrainError};
use crate::pref_loss::{LossParams, LossType};
use crate::schedule::ScheduleKind;

/// Settings of `rlhf rm` and `rlhf dpo` (TOML keys; flags use the same names with dashes). Sections `[lora]`,
/// `[rm]` and `[dpo]` hold what only LoRA / one trainer reads. See docs/preference.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefConfig {
    /// Model directory (HF layout): the policy / reward-model initialisation and its tokenizer.
    pub model: Option<PathBuf>,
    pub train_file: Option<PathBuf>,
    pub eval_file: Option<PathBuf>,
    pub output_dir: Option<PathBuf>,
    /// Chat template name for conversational data (default: the tokenizer's).
    pub chat_template: Option<String>,
    /// Longest sequence (prompt + completion) in tokens.
    pub max_length: usize,
    /// Pairs (or examples) per optimizer step.
    pub batch_size: usize,
    /// Default: 1e-4 for `rm`, 1e-6 for `dpo` (TRL 1.16's RewardConfig / DPOConfig).
    pub learning_rate: Option<f64>,
    pub lr_scheduler_type: ScheduleKind,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables.
    pub max_grad_norm: f64,
    /// Stop after this many steps (overrides `num_train_epochs`).
    pub max_steps: Option<u64>,
    pub num_train_epochs: f64,
    pub logging_steps: u64,
    /// Evaluate every N steps (0: only at the end).
    pub eval_steps: u64,
    /// Checkpoint every N steps (0: never).
    pub save_steps: u64,
    pub save_total_limit: Option<usize>,
    pub seed: u64,
    /// Continue from the newest complete checkpoint in `output_dir`.
    pub resume: bool,
    /// Train into an `output_dir` that holds a previous run (or the model itself), replacing it.
    pub overwrite_output_dir: bool,
    /// Linear layers' matrix products in bf16 (f32 accumulation, weights and optimizer), as TRL's `bf16=True`.
    pub bf16: bool,
    /// LoRA adapters instead of full fine-tuning (section `[lora]`).
    pub lora: Option<LoraConfig>,
    pub rm: RmOptions,
    pub dpo: DpoOptions,
}

impl Default for PrefConfig {
    fn default() -> Self {
        Self {
            model: None,
            train_file: None,
            eval_file: None,
            output_dir: None,
            chat_template: None,
            max_length: 1024,
            batch_size: 8,
            learning_rate: None,
            lr_scheduler_type: ScheduleKind::Linear,
            warmup_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            max_steps: None,
            num_train_epochs: 1.0,
            logging_steps: 10,
            eval_steps: 0,
            save_steps: 500,
            save_total_limit: None,
            seed: 42,
            resume: false,
            overwrite_output_dir: false,
            bf16: false,
            lora: None,
            rm: RmOptions::default(),
            dpo: DpoOptions::default(),
        }
    }
}

/// Section `[rm]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
        Self { center_rewards_coefficient: None, num_heads: 1, score_min: None, score_max: None }
    }
}

/// Flags shared by `rlhf rm` and `rlhf dpo`; each overrides the TOML key of the same name.
#[derive(Debug, Clone, Default, Args)]
pub struct CommonArgs {
    /// TOML file with any of the settings (flags override it).
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Model directory (HF layout: config.json, weights, tokenizer)
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data (JSONL or Parquet, TRL formats)
    #[arg(long)]
    pub train_file: Option<PathBuf>,
    /// Evaluation data (same formats)
    #[arg(long)]
    pub eval_file: Option<PathBuf>,
    /// Where the model, metrics.jsonl and checkpoints go
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Chat template name for conversational data (default: the tokenizer's)
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Longest prompt + completion in tokens [default: 1024]
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Pairs (or KTO examples) per optimizer step [default: 8]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate [default: rm 1e-4, dpo 1e-6]
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Learning-rate schedule [default: linear]
    #[arg(long, value_enum)]
    pub lr_scheduler_type: Option<ScheduleKind>,
    /// Linear warmup steps [default: 0]
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// AdamW weight decay [default: 0]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip, 0 disables [default: 1.0]
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Stop after this many optimizer steps (overrides --num-train-epochs)
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Epochs over the training data [default: 1]
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Write a metrics line every N steps [default: 10]
    #[arg(long)]
    pub logging_steps: Option<u64>,
    /// Evaluate every N steps, 0 = only at the end [default: 0]
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// Checkpoint every N steps, 0 = never [default: 500]
    #[arg(long)]
    pub save_steps: Option<u64>,
    /// Keep at most this many checkpoints
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Seed of the data order, new heads, LoRA init and LoRA dropout [default: 42]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue from the newest complete checkpoint in the output dir [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub resume: Option<bool>,
    /// Train into an output dir that holds a previous run (or the model itself), replacing it [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite_output_dir: Option<bool>,
    /// bf16 matrix products with f32 accumulation, weights and optimizer (TRL's `bf16=True`) [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub bf16: Option<bool>,
    #[command(flatten)]
    pub lora: crate::lora::LoraArgs,
}

/// `rlhf rm` flags.
/// Section `[dpo]`: the objective and the reference model. The loss hyper-parameters (`beta`,
/// `label_smoothing`, `simpo_gamma`, `orpo_lambda`, `cpl_alpha`, `cpl_lambda`, `cpl_bc_weight`,
/// `desirable_weight`, `undesirable_weight`) sit in the same section.
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
        Self { loss_type: LossType::Sigmoid, reference_model: None, precompute_ref_log_probs: false, params: LossParams::default() }
    }
}

/// Errors on the first key of `table` (recursively) that `known` (a JSON object) lacks.
fn check_keys(table: &toml::Table, known: &Value, prefix: &str, file: &str) -> Result<()> {
    for (k, v) in table {
        let path = format!("{prefix}{k}");
        match known.get(k) {
            None => {
                let names: Vec<&String> = known.as_object().map(|o| o.keys().collect()).unwrap_or_default();
                return Err(cfg_err(file, &path, format!("unknown key (known here: {names:?})")));
            }
            Some(sub @ Value::Object(_)) => {
                if let toml::Value::Table(t) = v {
                    check_keys(t, sub, &format!("{path}."), file)?;
                }
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The key (`section.key` inside sections) whose value has the wrong type, found by deserializing one
/// key at a time.
fn type_error(table: &toml::Table, file: &str) -> Option<TrainError> {
    let fails = |t: toml::Table| t.try_into::<PrefConfig>().err();
    for (k, v) in table {
        let Some(e) = fails(toml::Table::from_iter([(k.clone(), v.clone())])) else { continue };
        if let toml::Value::Table(inner) = v {
            for (ik, iv) in inner {
                let one = toml::Table::from_iter([(k.clone(), toml::Value::Table(toml::Table::from_iter([(ik.clone(), iv.clone())])))]);
                if let Some(e) = fails(one) {
                    return Some(cfg_err(file, &format!("{k}.{ik}"), e.message()));
                }
            }
        }
        return Some(cfg_err(file, k, e.message()));
    }
    None
}

pub(crate) fn cfg_err(file: &str, key: &str, msg: impl Into<String>) -> TrainError {
    TrainError::Config { file: file.into(), key: key.into(), msg: msg.into() }
}

impl PrefConfig {
    /// Reads a TOML file: unknown keys and ill-typed values are errors naming the file and key.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| cfg_err(&file, "-", e.message().to_string()))?;
        // Every key must exist in the (fully populated) defaults, checked section by section.
        let known = serde_json::to_value(PrefConfig { lora: Some(LoraConfig::default()), ..Default::default() }).expect("serialises");
        check_keys(&table, &known, "", &file)?;
        table.clone().try_into().map_err(|e: toml::de::Error| type_error(&table, &file).unwrap_or_else(|| cfg_err(&file, "-", e.message())))
    }

    /// The file named by `--config` (or defaults) with every given flag applied.
    pub fn from_common(a: &CommonArgs) -> Result<Self> {
        let mut c = match &a.config {
            Some(p) => Self::from_toml_file(p)?,
            None => Self::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &a.$f { c.$f = v.clone().into(); } )* };
        }
        set!(model, train_file, eval_file, output_dir, chat_template, learning_rate, max_steps, save_total_limit);
        macro_rules! set_plain {
            ($($f:ident),*) => { $( if let Some(v) = a.$f { c.$f = v; } )* };
        }
        set_plain!(
            max_length, batch_size, lr_scheduler_type, warmup_steps, weight_decay, max_grad_norm, num_train_epochs,
            logging_steps, eval_steps, save_steps, seed, resume, overwrite_output_dir, bf16
        );
        c.lora = a.lora.apply(c.lora.take());
        Ok(c)
    }

    pub(crate) fn origin(&self, a: Option<&Path>) -> String {
        a.map(|p| p.display().to_string()).unwrap_or_else(|| "command line".into())
    }

    /// Checks what every preference trainer needs; `config_file` labels errors.
    pub fn validate(&self, config_file: Option<&Path>) -> Result<()> {
        let f = self.origin(config_file);
        let need = |v: &Option<PathBuf>, key: &str| -> Result<PathBuf> {
            v.clone().ok_or_else(|| {
                cfg_err(&f, key, format!("required (set it in the config file or pass --{})", key.replace('_', "-")))
            })
        };
        let model = need(&self.model, "model")?;
        let train = need(&self.train_file, "train_file")?;
        need(&self.output_dir, "output_dir")?;
        if !model.join("config.json").is_file() {
            return Err(cfg_err(&f, "model", format!("{} has no config.json", model.display())));
        }
        crate::config::check_data_file(&train).map_err(|m| cfg_err(&f, "train_file", m))?;
        if let Some(e) = &self.eval_file {
            crate::config::check_data_file(e).map_err(|m| cfg_err(&f, "eval_file", m))?;
        }
        for (k, v) in [("max_length", self.max_length), ("batch_size", self.batch_size), ("logging_steps", self.logging_steps as usize)] {
            if v == 0 {
                return Err(cfg_err(&f, k, "must be at least 1"));
            }
        }
        if let Some(lr) = self.learning_rate {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(cfg_err(&f, "learning_rate", format!("{lr} is not a finite number > 0")));
            }
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(cfg_err(&f, "max_grad_norm", "must be a finite number >= 0 (0 disables clipping)"));
        }
        if self.max_steps == Some(0) {
            return Err(cfg_err(&f, "max_steps", "must be at least 1 (leave it unset to train num_train_epochs epochs)"));
        }
        if self.max_steps.is_none() && !(self.num_train_epochs.is_finite() && self.num_train_epochs > 0.0) {
            return Err(cfg_err(&f, "num_train_epochs", "must be > 0"));
        }
        if let Some(l) = &self.lora {
            crate::lora::check(l).map_err(|(k, m)| cfg_err(&f, &format!("lora.{k}"), m))?;
        }
        Ok(())
    }

    pub(crate) fn required(&self) -> (PathBuf, PathBuf, PathBuf) {
        let get = |p: &Option<PathBuf>| p.clone().expect("validated");
        (get(&self.model), get(&self.train_file), get(&self.output_dir))
    }
}
