//! SFT configuration: a TOML file and CLI flags with the same names (`learning_rate` ⇔
//! `--learning-rate`), loaded by [`crate::settings::load`] (a flag overrides the file); the keys every trainer
//! shares are [`TrainArgs`]. [`SftArgs::resolve`] turns the merged settings into a validated [`SftConfig`].

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::settings::{load, setting_err, Settings};
use crate::train_args::{TrainArgs, TrainConfig, TrainDefaults};

/// Every SFT setting, each optional so that file and flags can be merged ([`crate::settings::load`]). Field
/// docs are the CLI help.
#[derive(Debug, Clone, Default, PartialEq, Parser, Serialize, Deserialize)]
#[command(
    about = "Supervised fine-tuning on demonstrations (prompt/completion, messages or text data)"
)]
pub struct SftArgs {
    /// TOML file with any of the settings below (flags override it).
    #[arg(long = "config", value_name = "FILE")]
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
    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl Settings for SftArgs {
    fn help_defaults() -> Vec<(&'static str, String)> {
        TrainDefaults::SFT.help()
    }
}

/// Validated SFT settings (also stored in every checkpoint as `training_config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftConfig {
    pub model: PathBuf,
    pub train_file: PathBuf,
    pub eval_file: Option<PathBuf>,
    pub max_length: usize,
    pub packing: bool,
    pub completion_only_loss: bool,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// The settings every trainer shares.
    #[serde(flatten)]
    pub train: TrainConfig,
}

impl SftConfig {
    /// The defaults (TRL's SFTConfig where it has one) for the three required settings.
    pub fn with_defaults(model: PathBuf, train_file: PathBuf, output_dir: PathBuf) -> Self {
        Self {
            model,
            train_file,
            eval_file: None,
            max_length: 1024,
            packing: false,
            completion_only_loss: true,
            batch_size: 8,
            gradient_accumulation_steps: 1,
            train: TrainConfig::new(output_dir, &TrainDefaults::SFT),
        }
    }

    /// Read and validate a TOML file alone (no flags).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let args: SftArgs = load("sft", &["--config".into(), path.into()])?;
        args.resolve()
    }
}

impl SftArgs {
    /// Fill defaults and validate (after [`crate::settings::load`] merged the file and the flags).
    pub fn resolve(&self) -> Result<SftConfig> {
        let config = self.config.as_deref();
        let err = |key: &str, msg: String| setting_err(config, key, msg);
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
        let d = SftConfig::with_defaults(
            required(&self.model, "model")?,
            required(&self.train_file, "train_file")?,
            PathBuf::new(),
        );
        let cfg = SftConfig {
            eval_file: self.eval_file.clone(),
            max_length: self.max_length.unwrap_or(d.max_length),
            packing: self.packing.unwrap_or(d.packing),
            completion_only_loss: self.completion_only_loss.unwrap_or(d.completion_only_loss),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            gradient_accumulation_steps: self
                .gradient_accumulation_steps
                .unwrap_or(d.gradient_accumulation_steps),
            train: self.train.resolve(&TrainDefaults::SFT, &err)?,
            ..d
        };
        for (key, v) in [
            ("max_length", cfg.max_length),
            ("batch_size", cfg.batch_size),
            (
                "gradient_accumulation_steps",
                cfg.gradient_accumulation_steps,
            ),
        ] {
            if v == 0 {
                return Err(err(key, "must be at least 1".into()));
            }
        }
        if !cfg.model.join("config.json").is_file() {
            return Err(err(
                "model",
                format!("{} has no config.json", cfg.model.display()),
            ));
        }
        check_data_file(&cfg.train_file).map_err(|m| err("train_file", m))?;
        if let Some(f) = &cfg.eval_file {
            check_data_file(f).map_err(|m| err("eval_file", m))?;
        }
        Ok(cfg)
    }
}

/// Why `path` cannot be a data file (missing, or a directory), as an error message naming it.
pub(crate) fn check_data_file(path: &Path) -> std::result::Result<(), String> {
    if path.is_dir() {
        Err(format!(
            "{}: is a directory, not a data file (expected a .jsonl, .json or .parquet file)",
            path.display()
        ))
    } else if !path.is_file() {
        Err(format!("{}: no such file", path.display()))
    } else {
        Ok(())
    }
}
