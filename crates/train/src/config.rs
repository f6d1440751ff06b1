//! SFT configuration: a TOML file and CLI flags with the same names (`learning_rate` ⇔
//! `--learning-rate`); a flag overrides the file. [`SftArgs`] is what the CLI mounts
//! (`#[command(flatten)]`), [`SftArgs::resolve`] turns it into a validated [`SftConfig`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser};
use serde::{Deserialize, Serialize};

use rlhf_model::lora::LoraConfig;

use crate::error::{Result, TrainError};
use crate::schedule::{ScheduleKind, Warmup};

/// Every SFT setting, each optional so that file and flags can be merged. Field docs are the CLI help.
// No `deny_unknown_fields`: serde does not support it with `flatten`; `read_toml` checks the keys.
#[derive(Debug, Clone, Default, PartialEq, Args, Deserialize)]
pub struct SftArgs {
    /// TOML file with any of the settings below (flags override it).
    #[arg(long = "config", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model directory (config.json, model.safetensors, tokenizer files).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data (JSONL/Parquet: prompt/completion, messages, or text).
    #[arg(long)]
    pub train_file: Option<PathBuf>,
    /// Evaluation data (same formats); enables eval_loss / eval_mean_token_accuracy.
    #[arg(long)]
    pub eval_file: Option<PathBuf>,
    /// Where checkpoints, metrics.jsonl and the final model go.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Truncate tokenized sequences to this many tokens [default: 1024].
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Pack sequences into rows of max_length tokens [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub packing: Option<bool>,
    /// Loss on completion tokens only (prompt/completion data) [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub completion_only_loss: Option<bool>,
    /// Sequences per micro-batch [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Peak learning rate [default: 2e-5].
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// constant, linear or cosine [default: linear].
    #[arg(long, value_enum)]
    pub lr_scheduler_type: Option<ScheduleKind>,
    /// Linear warmup steps [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of all steps (instead of warmup_steps).
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Decoupled weight decay (not applied to norms and biases) [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW beta1 [default: 0.9].
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// AdamW beta2 [default: 0.999].
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// AdamW epsilon [default: 1e-8].
    #[arg(long)]
    pub adam_epsilon: Option<f64>,
    /// Clip gradients to this global L2 norm; 0 disables [default: 1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Total optimizer steps; overrides num_train_epochs when set.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Epochs over the training data [default: 3].
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Log every N steps [default: 10].
    #[arg(long)]
    pub logging_steps: Option<u64>,
    /// Evaluate every N steps (and always at the end when eval_file is set); 0 = only at the end.
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// Checkpoint every N steps; 0 disables [default: 500].
    #[arg(long)]
    pub save_steps: Option<u64>,
    /// Keep only the newest N checkpoints.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Seed for data shuffling [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue from the newest complete checkpoint in output_dir [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub resume: Option<bool>,
    /// Train into an output_dir that holds a previous run (or the model itself), replacing it [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite_output_dir: Option<bool>,
    /// bf16 matrix products with f32 accumulation, f32 weights and optimizer, as TRL's `bf16=True` [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub bf16: Option<bool>,
    /// LoRA: train adapters only; the output dir gets the merged model and the adapter in `adapter/`.
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: crate::lora::LoraArgs,
}

/// Validated SFT settings (also stored in every checkpoint as `training_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftConfig {
    pub model: PathBuf,
    pub train_file: PathBuf,
    pub eval_file: Option<PathBuf>,
    pub output_dir: PathBuf,
    pub max_length: usize,
    pub packing: bool,
    pub completion_only_loss: bool,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler_type: ScheduleKind,
    pub warmup_steps: u64,
    pub warmup_ratio: Option<f64>,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub max_steps: Option<u64>,
    pub num_train_epochs: f64,
    pub logging_steps: u64,
    pub eval_steps: u64,
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
}

impl SftConfig {
    /// The defaults (TRL's SFTConfig where it has one) for the three required settings.
    pub fn with_defaults(model: PathBuf, train_file: PathBuf, output_dir: PathBuf) -> Self {
        Self {
            model,
            train_file,
            eval_file: None,
            output_dir,
            max_length: 1024,
            packing: false,
            completion_only_loss: true,
            batch_size: 8,
            gradient_accumulation_steps: 1,
            learning_rate: 2e-5,
            lr_scheduler_type: ScheduleKind::Linear,
            warmup_steps: 0,
            warmup_ratio: None,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            max_steps: None,
            num_train_epochs: 3.0,
            logging_steps: 10,
            eval_steps: 0,
            save_steps: 500,
            save_total_limit: None,
            seed: 42,
            resume: false,
            overwrite_output_dir: false,
            lora: None,
            bf16: false,
        }
    }

    pub fn warmup(&self) -> Warmup {
        match self.warmup_ratio {
            Some(r) => Warmup::Ratio(r),
            None => Warmup::Steps(self.warmup_steps),
        }
    }

    /// Read and validate a TOML file alone (no flags).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        SftArgs { config: Some(path.to_path_buf()), ..Default::default() }.resolve()
    }
}

/// Applies macro `$m` to the list of setting fields (everything but `config`).
macro_rules! with_fields {
    ($m:ident) => {
        $m!(
            model, train_file, eval_file, output_dir, max_length, packing, completion_only_loss, batch_size,
            gradient_accumulation_steps, learning_rate, lr_scheduler_type, warmup_steps, warmup_ratio,
            weight_decay, adam_beta1, adam_beta2, adam_epsilon, max_grad_norm, max_steps, num_train_epochs,
            logging_steps, eval_steps, save_steps, save_total_limit, seed, resume, overwrite_output_dir, bf16
        )
    };
}

/// Parses `SftArgs` from an argument list (tests, embedding).
#[derive(Parser)]
struct Standalone {
    #[command(flatten)]
    args: SftArgs,
}

impl SftArgs {
    /// Parse flags alone, e.g. `["--learning-rate", "1e-4"]`.
    pub fn parse_flags<I, T>(flags: I) -> std::result::Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("sft")).chain(flags.into_iter().map(Into::into));
        let matches: ArgMatches = Standalone::command().try_get_matches_from(argv)?;
        Ok(Standalone::from_arg_matches(&matches)?.args)
    }

    /// Setting names accepted in the TOML file (the flag names in snake_case).
    pub fn keys() -> Vec<String> {
        Standalone::command()
            .get_arguments()
            .map(|a| a.get_id().as_str().to_string())
            .filter(|k| k != "config" && k != "help")
            .collect()
    }

    /// Load `--config` (if given), let every flag set here override it, fill defaults and validate.
    pub fn resolve(&self) -> Result<SftConfig> {
        let (file_args, file_name) = match &self.config {
            Some(path) => (read_toml(path)?, path.display().to_string()),
            None => (SftArgs::default(), String::new()),
        };
        let flags = self.set_keys();
        let merged = file_args.overridden_by(self);
        // Errors name where the offending value came from.
        let origin = |key: &str| -> String {
            if flags.contains(key) || file_name.is_empty() {
                "command line".to_string()
            } else {
                file_name.clone()
            }
        };
        let err = |key: &str, msg: String| TrainError::Config { file: origin(key), key: key.to_string(), msg };
        let required = |v: &Option<PathBuf>, key: &str| {
            v.clone().ok_or_else(|| err(key, format!("required (set it in the config file or pass --{})", key.replace('_', "-"))))
        };

        let d = SftConfig::with_defaults(
            required(&merged.model, "model")?,
            required(&merged.train_file, "train_file")?,
            required(&merged.output_dir, "output_dir")?,
        );
        let cfg = SftConfig {
            eval_file: merged.eval_file.clone(),
            max_length: merged.max_length.unwrap_or(d.max_length),
            packing: merged.packing.unwrap_or(d.packing),
            completion_only_loss: merged.completion_only_loss.unwrap_or(d.completion_only_loss),
            batch_size: merged.batch_size.unwrap_or(d.batch_size),
            gradient_accumulation_steps: merged.gradient_accumulation_steps.unwrap_or(d.gradient_accumulation_steps),
            learning_rate: merged.learning_rate.unwrap_or(d.learning_rate),
            lr_scheduler_type: merged.lr_scheduler_type.unwrap_or(d.lr_scheduler_type),
            warmup_steps: merged.warmup_steps.unwrap_or(d.warmup_steps),
            warmup_ratio: merged.warmup_ratio,
            weight_decay: merged.weight_decay.unwrap_or(d.weight_decay),
            adam_beta1: merged.adam_beta1.unwrap_or(d.adam_beta1),
            adam_beta2: merged.adam_beta2.unwrap_or(d.adam_beta2),
            adam_epsilon: merged.adam_epsilon.unwrap_or(d.adam_epsilon),
            max_grad_norm: merged.max_grad_norm.unwrap_or(d.max_grad_norm),
            max_steps: merged.max_steps,
            num_train_epochs: merged.num_train_epochs.unwrap_or(d.num_train_epochs),
            logging_steps: merged.logging_steps.unwrap_or(d.logging_steps),
            eval_steps: merged.eval_steps.unwrap_or(d.eval_steps),
            save_steps: merged.save_steps.unwrap_or(d.save_steps),
            save_total_limit: merged.save_total_limit,
            seed: merged.seed.unwrap_or(d.seed),
            resume: merged.resume.unwrap_or(d.resume),
            overwrite_output_dir: merged.overwrite_output_dir.unwrap_or(d.overwrite_output_dir),
            lora: merged.lora.apply(None),
            bf16: merged.bf16.unwrap_or(d.bf16),
            ..d
        };

        let positive = |v: usize, key: &str| if v == 0 { Err(err(key, "must be at least 1".into())) } else { Ok(()) };
        positive(cfg.max_length, "max_length")?;
        positive(cfg.batch_size, "batch_size")?;
        positive(cfg.gradient_accumulation_steps, "gradient_accumulation_steps")?;
        positive(cfg.logging_steps as usize, "logging_steps")?;
        if let Some(0) = cfg.max_steps {
            return Err(err("max_steps", "must be at least 1 (leave it unset to train num_train_epochs epochs)".into()));
        }
        if let Some(0) = cfg.save_total_limit {
            return Err(err("save_total_limit", "must be at least 1".into()));
        }
        let finite_in = |v: f64, key: &str, lo: f64, hi: f64, what: &str| {
            if v.is_finite() && v >= lo && v <= hi {
                Ok(())
            } else {
                Err(err(key, format!("{v} is not {what}")))
            }
        };
        finite_in(cfg.learning_rate, "learning_rate", f64::MIN_POSITIVE, f64::MAX, "a finite number > 0")?;
        finite_in(cfg.weight_decay, "weight_decay", 0.0, f64::MAX, "a finite number >= 0")?;
        finite_in(cfg.max_grad_norm, "max_grad_norm", 0.0, f64::MAX, "a finite number >= 0 (0 disables clipping)")?;
        finite_in(cfg.adam_beta1, "adam_beta1", 0.0, 1.0 - f64::EPSILON, "in [0, 1)")?;
        finite_in(cfg.adam_beta2, "adam_beta2", 0.0, 1.0 - f64::EPSILON, "in [0, 1)")?;
        finite_in(cfg.adam_epsilon, "adam_epsilon", 0.0, f64::MAX, "a finite number >= 0")?;
        if let Some(r) = cfg.warmup_ratio {
            finite_in(r, "warmup_ratio", 0.0, 1.0, "in [0, 1]")?;
            if merged.warmup_steps.is_some_and(|s| s > 0) {
                return Err(err("warmup_ratio", "set either warmup_steps or warmup_ratio, not both".into()));
            }
        }
        if cfg.max_steps.is_none() {
            finite_in(cfg.num_train_epochs, "num_train_epochs", f64::MIN_POSITIVE, f64::MAX, "a finite number > 0")?;
        }
        if let Some(l) = &cfg.lora {
            crate::lora::check(l).map_err(|(k, m)| err(&format!("lora_{k}"), m.into()))?;
        }
        if !cfg.model.join("config.json").is_file() {
            return Err(err("model", format!("{} has no config.json", cfg.model.display())));
        }
        check_data_file(&cfg.train_file).map_err(|m| err("train_file", m))?;
        if let Some(f) = &cfg.eval_file {
            check_data_file(f).map_err(|m| err("eval_file", m))?;
        }
        Ok(cfg)
    }

    /// `self` with every field that `other` sets replaced by `other`'s value.
    fn overridden_by(mut self, other: &SftArgs) -> SftArgs {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f.clone(); } )* };
        }
        with_fields!(take);
        self.lora = self.lora.overridden_by(&other.lora);
        self
    }

    /// Names of the settings given here.
    fn set_keys(&self) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        macro_rules! put {
            ($($f:ident),*) => { $( if self.$f.is_some() { keys.insert(stringify!($f).to_string()); } )* };
        }
        with_fields!(put);
        keys.extend(self.lora.set_keys().into_iter().map(String::from));
        keys
    }
}

/// Why `path` cannot be a data file (missing, or a directory), as an error message naming it.
pub(crate) fn check_data_file(path: &Path) -> std::result::Result<(), String> {
    if path.is_dir() {
        Err(format!("{}: is a directory, not a data file (expected a .jsonl, .json or .parquet file)", path.display()))
    } else if !path.is_file() {
        Err(format!("{}: no such file", path.display()))
    } else {
        Ok(())
    }
}

/// Parse a TOML config; unknown keys and ill-typed values are errors naming the file and key.
/// Relative paths are relative to the working directory, as for flags.
fn read_toml(path: &Path) -> Result<SftArgs> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
    let table: toml::Table =
        text.parse().map_err(|e: toml::de::Error| TrainError::Config { file: file.clone(), key: "-".into(), msg: e.to_string() })?;
    let known = SftArgs::keys();
    let mut args = SftArgs::default();
    for (key, value) in table {
        if !known.contains(&key) {
            return Err(TrainError::Config { file, key, msg: format!("unknown key (known: {})", known.join(", ")) });
        }
        // One key at a time, so a type error names its key.
        let one: SftArgs = toml::Table::from_iter([(key.clone(), value)])
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Config { file: file.clone(), key: key.clone(), msg: e.message().to_string() })?;
        args = args.overridden_by(&one);
    }
    Ok(args)
}
