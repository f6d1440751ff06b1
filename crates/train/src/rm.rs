//! Reward modelling (`rlhf rm`, TRL `RewardTrainer` semantics) and the pieces `rlhf dpo` shares with it:
//! the preference-training config ([`PrefConfig`], a TOML file + flags), the training loop (logging,
//! evaluation, atomic checkpoints, non-finite stop) and benchmarks.
//!
//! The reward model is a [`SeqCls`] (`score.weight` on the last non-pad token); pairs train it with
//! Bradley–Terry (optionally with margins and reward centering), `rating` rows with an MSE regression on the
//! score normalised to [0, 1], and `correction` rows as pairs (corrected ≻ original). `num_heads = k > 1`
//! trains an ensemble of k heads on one trunk (each head its own Bradley–Terry loss, averaged).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use clap::Args;
use rlhf_data::{
    collate_preference, tokenize_pair, Dataset, Format, LoadOptions, Preference, PreferenceExample, Record, Row,
    ScoreScale, Text, Tokenizer, Truncation, EpochSampler,
};
use rlhf_model::lora::{Lora, LoraConfig};

pub(crate) use crate::lora::attach_lora;
use rlhf_model::seq_cls::SeqCls;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::checkpoint::{self, TrainerState};
use crate::dpo::DpoOptions;
use crate::ensemble::{mean_std, Ensemble};
use crate::error::{io_err, Result, TrainError};
use crate::metrics::Progress;
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::{Schedule, ScheduleKind, Warmup};

// ---------------------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------------------

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
    /// Seed of the data order, new heads and LoRA init [default: 42]
    #[arg(long)]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub lora: crate::lora::LoraArgs,
}

/// `rlhf rm` flags.
#[derive(Debug, Clone, Default, Args)]
pub struct RmArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Reward-centering coefficient η of η·mean((r_c + r_r)²) (off by default)
    #[arg(long)]
    pub center_rewards_coefficient: Option<f64>,
    /// Reward heads on one trunk; > 1 trains an ensemble [default: 1]
    #[arg(long)]
    pub num_heads: Option<usize>,
    /// Lowest score of rating rows that declare no scale
    #[arg(long)]
    pub score_min: Option<f64>,
    /// Highest score of rating rows that declare no scale
    #[arg(long)]
    pub score_max: Option<f64>,
}

/// `rlhf rm score` flags: score prompt/completion rows with one reward model or an ensemble.
#[derive(Debug, Clone, Args)]
pub struct RmScoreArgs {
    /// Reward-model directory; repeat for an ensemble of models.
    #[arg(long = "model", required = true)]
    pub models: Vec<PathBuf>,
    /// JSONL/Parquet with `prompt` and `completion` (other columns, e.g. `item_id`, are copied through).
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSONL: each row plus `reward` (and `reward_std`, and `uncertainty` when it has an `item_id`).
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    #[arg(long)]
    pub chat_template: Option<String>,
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

fn cfg_err(file: &str, key: &str, msg: impl Into<String>) -> TrainError {
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
            logging_steps, eval_steps, save_steps, seed
        );
        c.lora = a.lora.apply(c.lora.take());
        Ok(c)
    }

    fn origin(&self, a: Option<&Path>) -> String {
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
        if !train.is_file() {
            return Err(cfg_err(&f, "train_file", format!("{}: no such file", train.display())));
        }
        if let Some(e) = &self.eval_file {
            if !e.is_file() {
                return Err(cfg_err(&f, "eval_file", format!("{}: no such file", e.display())));
            }
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
        if self.max_steps.is_none() && !(self.num_train_epochs.is_finite() && self.num_train_epochs > 0.0) {
            return Err(cfg_err(&f, "num_train_epochs", "must be > 0"));
        }
        if let Some(l) = &self.lora {
            crate::lora::check(l).map_err(|(k, m)| cfg_err(&f, &format!("lora.{k}"), m))?;
        }
        Ok(())
    }

    fn required(&self) -> (PathBuf, PathBuf, PathBuf) {
        let get = |p: &Option<PathBuf>| p.clone().expect("validated");
        (get(&self.model), get(&self.train_file), get(&self.output_dir))
    }

    fn max_grad_norm(&self) -> Option<f64> {
        (self.max_grad_norm > 0.0).then_some(self.max_grad_norm)
    }
}

impl RmArgs {
    /// File + flags, validated for reward modelling.
    pub fn resolve(&self) -> Result<PrefConfig> {
        let mut c = PrefConfig::from_common(&self.common)?;
        if let Some(v) = self.center_rewards_coefficient {
            c.rm.center_rewards_coefficient = Some(v);
        }
        if let Some(v) = self.num_heads {
            c.rm.num_heads = v;
        }
        if let Some(v) = self.score_min {
            c.rm.score_min = Some(v);
        }
        if let Some(v) = self.score_max {
            c.rm.score_max = Some(v);
        }
        c.validate(self.common.config.as_deref())?;
        let f = c.origin(self.common.config.as_deref());
        if c.rm.num_heads == 0 {
            return Err(cfg_err(&f, "rm.num_heads", "must be at least 1"));
        }
        if let (Some(lo), Some(hi)) = (c.rm.score_min, c.rm.score_max) {
            if lo >= hi {
                return Err(cfg_err(&f, "rm.score_max", format!("must be greater than score_min ({lo})")));
            }
        }
        if c.rm.score_min.is_some() != c.rm.score_max.is_some() {
            return Err(cfg_err(&f, "rm.score_min", "set both score_min and score_max, or neither"));
        }
        Ok(c)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Shared training loop
// ---------------------------------------------------------------------------------------------------------

/// Metrics of one step or evaluation, under TRL's names.
pub type Metrics = BTreeMap<String, f64>;

/// What a preference trainer's forward pass over one batch produced.
pub struct Forward {
    pub loss: Tensor,
    pub metrics: Metrics,
    /// Non-pad tokens of the batch (chosen + rejected counted once, as TRL).
    pub num_tokens: usize,
}

/// A model + objective the shared loop drives.
/// Per-example means of the loss and metrics over `n` examples, run in chunks of `batch_size` (the chunks only
/// bound memory), for [`Objective::evaluate`].
pub(crate) fn eval_means(n: usize, batch_size: usize, forward: impl Fn(&[usize]) -> Result<Forward>) -> Result<Metrics> {
    let idx: Vec<usize> = (0..n).collect();
    let mut sums = Metrics::new();
    for chunk in idx.chunks(batch_size) {
        let out = forward(chunk)?;
        let w = chunk.len() as f64;
        *sums.entry("loss".into()).or_default() += out.loss.to_scalar::<f32>()? as f64 * w;
        for (k, v) in out.metrics {
            *sums.entry(k).or_default() += v * w;
        }
    }
    Ok(sums.into_iter().map(|(k, v)| (k, v / n as f64)).collect())
}

pub trait Objective {
    fn num_examples(&self) -> usize;
    /// Loss (differentiable) and metrics of the examples `idx`.
    fn forward(&mut self, idx: &[usize]) -> Result<Forward>;
    /// Eval metrics (keys without the `eval_` prefix), None without eval data.
    fn evaluate(&mut self) -> Result<Option<Metrics>>;
    fn optimizer(&self) -> &AdamW;
    fn optimizer_mut(&mut self) -> &mut AdamW;
    /// Writes the trained model (or adapter) to `dir`.
    fn save(&self, dir: &Path) -> Result<()>;
}

/// Outcome of a training run.
#[derive(Debug, Clone, Serialize)]
pub struct PrefSummary {
    pub steps: u64,
    pub train_loss: f64,
    pub final_loss: f64,
    /// Train metrics of the last step.
    pub final_metrics: Metrics,
    pub eval: Option<Metrics>,
    pub num_tokens: u64,
    pub train_runtime_s: f64,
    pub output_dir: PathBuf,
    pub metrics_file: PathBuf,
}

pub const METRICS_FILE: &str = "metrics.jsonl";
const TOKENIZER_FILES: [&str; 4] = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// Copies the tokenizer files of `src` next to a saved model so the directory is complete.
pub(crate) fn copy_tokenizer(src: &Path, dir: &Path) -> Result<()> {
    for name in TOKENIZER_FILES {
        let from = src.join(name);
        if from.is_file() && src != dir {
            std::fs::copy(&from, dir.join(name)).map_err(io_err(&from))?;
        }
    }
    Ok(())
}

/// One optimizer step: forward, finite check (before touching the weights), backward, clip, AdamW.
/// Returns (loss, grad norm, metrics, tokens).
pub(crate) fn optimizer_step(
    obj: &mut dyn Objective,
    idx: &[usize],
    lr: f64,
    max_grad_norm: Option<f64>,
    step: u64,
    last_checkpoint: &Option<PathBuf>,
) -> Result<(f64, f64, Metrics, usize)> {
    let out = obj.forward(idx)?;
    let loss = out.loss.to_scalar::<f32>()? as f64;
    let non_finite = |what, value| TrainError::NonFinite { step, what, value, last_checkpoint: last_checkpoint.clone() };
    if !loss.is_finite() {
        return Err(non_finite("loss", loss));
    }
    let store = out.loss.backward()?;
    let opt = obj.optimizer_mut();
    let grads = opt.collect_grads(&store)?;
    let grad_norm = grads.global_norm()?;
    if !grad_norm.is_finite() {
        return Err(non_finite("gradient norm", grad_norm));
    }
    opt.step(&grads, lr, max_grad_norm)?;
    Ok((loss, grad_norm, out.metrics, out.num_tokens))
}

fn write_line(file: &mut File, path: &Path, v: &Map<String, Value>) -> Result<()> {
    let line = serde_json::to_string(v).expect("plain data serialises");
    writeln!(file, "{line}").and_then(|_| file.flush()).map_err(io_err(path))
}

/// The full loop: `total_steps` steps over shuffled epochs, a JSONL log line every `logging_steps` (means over
/// the window), evaluation every `eval_steps` and at the end, checkpoints every `save_steps`, final save.
pub fn train_loop(obj: &mut dyn Objective, cfg: &PrefConfig, lr: f64) -> Result<PrefSummary> {
    let t_run = Instant::now();
    let (_, _, out_dir) = cfg.required();
    std::fs::create_dir_all(&out_dir).map_err(io_err(&out_dir))?;
    let n = obj.num_examples();
    let steps_per_epoch = n.div_ceil(cfg.batch_size) as u64;
    let total = cfg.max_steps.unwrap_or_else(|| ((cfg.num_train_epochs * steps_per_epoch as f64).ceil() as u64).max(1));
    let schedule = Schedule::new(cfg.lr_scheduler_type, lr, Warmup::Steps(cfg.warmup_steps), total);
    let metrics_path = out_dir.join(METRICS_FILE);
    let mut log = File::create(&metrics_path).map_err(io_err(&metrics_path))?;
    let progress = Progress::new(total, 0);
    let mut sampler = EpochSampler::new(n, cfg.seed, true);
    let mut state = TrainerState { global_step: 0, data: sampler.state(), shuffle_seed: cfg.seed, num_tokens: 0 };
    let mut last_checkpoint: Option<PathBuf> = None;
    let (mut window, mut window_steps) = (Metrics::new(), 0u64);
    let (mut loss_sum, mut final_loss, mut final_metrics, mut eval) = (0.0, f64::NAN, Metrics::new(), None);
    let config_json = serde_json::to_value(cfg).expect("config serialises");
    while state.global_step < total {
        let idx = sampler.next_batch(cfg.batch_size, false);
        let step = state.global_step + 1;
        let t0 = Instant::now();
        let (loss, grad_norm, metrics, tokens) = optimizer_step(
            obj,
            &idx,
            schedule.lr(state.global_step),
            cfg.max_grad_norm(),
            step,
            &last_checkpoint,
        )?;
        state.data = sampler.state();
        state.global_step = step;
        state.num_tokens += tokens as u64;
        loss_sum += loss;
        final_loss = loss;
        for (k, v) in metrics.iter().map(|(k, v)| (k.as_str(), *v)).chain([("loss", loss), ("grad_norm", grad_norm)]) {
            *window.entry(k.to_string()).or_default() += v;
        }
        *window.entry("step_time_s".into()).or_default() += t0.elapsed().as_secs_f64();
        window_steps += 1;
        final_metrics = metrics;
        progress.update(step, Some(loss));
        let epoch = step as f64 / steps_per_epoch as f64;
        if step.is_multiple_of(cfg.logging_steps) || step == total {
            let mut line = Map::new();
            line.insert("step".into(), json!(step));
            line.insert("epoch".into(), json!(epoch));
            for (k, v) in std::mem::take(&mut window) {
                line.insert(k, json!(v / window_steps as f64));
            }
            line.insert("learning_rate".into(), json!(schedule.lr(step)));
            line.insert("num_tokens".into(), json!(state.num_tokens));
            window_steps = 0;
            write_line(&mut log, &metrics_path, &line)?;
        }
        if (cfg.eval_steps > 0 && step.is_multiple_of(cfg.eval_steps)) || step == total {
            eval = obj.evaluate()?;
            if let Some(e) = &eval {
                let mut line = Map::new();
                line.insert("step".into(), json!(step));
                line.insert("epoch".into(), json!(epoch));
                for (k, v) in e {
                    line.insert(format!("eval_{k}"), json!(v));
                }
                write_line(&mut log, &metrics_path, &line)?;
            }
        }
        if cfg.save_steps > 0 && step.is_multiple_of(cfg.save_steps) {
            let o: &dyn Objective = obj;
            let dir = checkpoint::save_checkpoint(&out_dir, |d| o.save(d), o.optimizer(), &state, &config_json, cfg.save_total_limit)?;
            last_checkpoint = Some(dir);
        }
    }
    progress.finish();
    obj.save(&out_dir)?;
    Ok(PrefSummary {
        steps: state.global_step,
        train_loss: loss_sum / state.global_step.max(1) as f64,
        final_loss,
        final_metrics,
        eval,
        num_tokens: state.num_tokens,
        train_runtime_s: t_run.elapsed().as_secs_f64(),
        output_dir: out_dir,
        metrics_file: metrics_path,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------------------

/// Reward-model training data: pairs (preference, implicit preference, correction) or ratings.
#[derive(Debug, Clone)]
pub enum RmData {
    Pairs(Vec<PreferenceExample>),
    /// Full sequence (prompt + completion) and the score normalised to [0, 1].
    Ratings(Vec<(Vec<u32>, f32)>),
}

impl RmData {
    pub fn len(&self) -> usize {
        match self {
            RmData::Pairs(p) => p.len(),
            RmData::Ratings(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn data_err(e: rlhf_data::DataError) -> TrainError {
    TrainError::Data(e.to_string())
}

/// Prompt and completion tokenized as the chosen side of a pair (TRL's prompt+completion tokenization).
pub(crate) fn tokenize_completion(
    prompt: &Text,
    completion: &Text,
    tokenizer: &Tokenizer,
    template: Option<&rlhf_data::ChatTemplate>,
) -> rlhf_data::Result<(Vec<u32>, Vec<u32>)> {
    let p = Preference { prompt: prompt.clone(), chosen: completion.clone(), rejected: completion.clone(), margin: None };
    let ex = tokenize_pair(&p, tokenizer, template)?;
    Ok((ex.prompt_ids, ex.chosen_ids))
}

/// An error about one row (file:line: field ...).
pub(crate) fn row_err(ds: &Dataset, row: &Row, e: rlhf_data::DataError) -> TrainError {
    data_err(ds.row_error(row, e.field.as_deref(), e.message))
}

/// Loads and tokenizes a reward-model dataset. Pairs longer than `max_length` are dropped (as TRL); it is an
/// error when nothing is left.
pub fn load_rm_data(path: &Path, tokenizer: &Tokenizer, cfg: &PrefConfig) -> Result<RmData> {
    let scale = match (cfg.rm.score_min, cfg.rm.score_max) {
        (Some(min), Some(max)) => Some(ScoreScale { min, max }),
        _ => None,
    };
    let ds = rlhf_data::load_dataset_with(path, &LoadOptions { score_scale: scale }).map_err(data_err)?;
    let source = path.display().to_string();
    let data = match ds.format {
        Format::Preference | Format::ImplicitPreference | Format::Correction => {
            let pairs = rlhf_data::tokenize_preferences(&ds, tokenizer, cfg.chat_template.as_deref()).map_err(data_err)?;
            RmData::Pairs(pairs.into_iter().filter(|p| p.fits_reward(Some(cfg.max_length))).collect())
        }
        Format::Rating => {
            let template = if ds.conversational { Some(tokenizer.chat_template(cfg.chat_template.as_deref()).map_err(data_err)?) } else { None };
            let mut rows = Vec::with_capacity(ds.len());
            for row in &ds.rows {
                let Record::Rating(r) = &row.record else { unreachable!("dataset rows share one format") };
                let s = r.scale.or(scale).ok_or_else(|| {
                    data_err(ds.row_error(row, Some("score"), "no score scale: add score_min/score_max to the row or set rm.score_min/score_max"))
                })?;
                let (p, c) = tokenize_completion(&r.prompt, &r.completion, tokenizer, template).map_err(|e| row_err(&ds, row, e))?;
                let mut ids = [p, c].concat();
                ids.truncate(cfg.max_length);
                rows.push((ids, crate::rm_loss::normalise_score(r.score, s.min, s.max) as f32));
            }
            RmData::Ratings(rows)
        }
        other => {
            return Err(TrainError::Data(format!(
                "{source}: a reward model trains on preference, implicit_preference, correction or rating data, not {other}"
            )))
        }
    };
    if data.is_empty() {
        return Err(TrainError::Data(format!("{source}: no example fits max_length {}", cfg.max_length)));
    }
    Ok(data)
}

/// Right-pads token rows into a u32 `[b, t]` tensor; returns it with the row lengths.
pub(crate) fn pad_rows(rows: &[&[u32]], pad: u32, device: &Device) -> Result<(Tensor, Vec<usize>)> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![pad; rows.len() * t];
    for (i, r) in rows.iter().enumerate() {
        ids[i * t..i * t + r.len()].copy_from_slice(r);
    }
    Ok((Tensor::from_vec(ids, (rows.len(), t), device)?, rows.iter().map(|r| r.len()).collect()))
}

// ---------------------------------------------------------------------------------------------------------
// Reward-model trainer
// ---------------------------------------------------------------------------------------------------------

fn adamw(params: Vec<(String, Var)>, cfg: &PrefConfig) -> Result<AdamW> {
    AdamW::new(params, AdamWConfig { weight_decay: cfg.weight_decay, ..AdamWConfig::default() })
}

fn vars(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    varmap.data().lock().expect("VarMap lock poisoned").iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Reward-model trainer (drive with [`train_loop`], or call [`Objective::forward`] directly in tests).
pub struct RmTrainer {
    model: SeqCls,
    lora: Option<Lora>,
    optimizer: AdamW,
    train: RmData,
    eval: Option<RmData>,
    batch_size: usize,
    max_length: usize,
    center: Option<f64>,
    /// Where the model came from: its tokenizer files are copied into saves; PEFT's `base_model_name_or_path`.
    source_dir: Option<PathBuf>,
}

impl RmTrainer {
    /// Loads the model (a reward-model dir, or a causal LM with a new head), tokenizer and data of `cfg`.
    pub fn new(cfg: &PrefConfig) -> Result<Self> {
        let (model_dir, train_file, _) = cfg.required();
        let tokenizer = Tokenizer::from_dir(&model_dir).map_err(data_err)?;
        let pad = tokenizer.pad_id().ok();
        let model = SeqCls::load(&model_dir, cfg.rm.num_heads, pad, cfg.seed, &Device::Cpu)
            .map_err(|e| TrainError::Model(e.to_string()))?;
        // Token ids past the embedding table would otherwise fail deep inside the forward pass.
        tokenizer.check_vocab(model.lm.vocab_size(), model_dir.join("config.json")).map_err(data_err)?;
        let train = load_rm_data(&train_file, &tokenizer, cfg)?;
        let eval = cfg.eval_file.as_deref().map(|f| load_rm_data(f, &tokenizer, cfg)).transpose()?;
        let mut t = Self::from_parts(model, train, eval, cfg)?;
        t.source_dir = Some(model_dir);
        Ok(t)
    }

    /// A trainer over a loaded model and tokenized data (tests, benchmarks).
    pub fn from_parts(mut model: SeqCls, train: RmData, eval: Option<RmData>, cfg: &PrefConfig) -> Result<Self> {
        let lora = attach_lora(&mut model.lm, cfg.lora.as_ref(), cfg.seed)?;
        let params = match &lora {
            // The head is new for the task, so it trains with the adapters (PEFT's modules_to_save).
            Some(l) => [vars(l.varmap()), vars(model.head())].concat(),
            None => model.trainable_vars(),
        };
        let optimizer = adamw(params, cfg)?;
        Ok(Self {
            model,
            lora,
            optimizer,
            train,
            eval,
            batch_size: cfg.batch_size,
            max_length: cfg.max_length,
            center: cfg.rm.center_rewards_coefficient,
            source_dir: None,
        })
    }

    pub fn model(&self) -> &SeqCls {
        &self.model
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// Rewards `[B, k]` of the chosen and of the rejected sequences, in one forward over `2B` rows.
    pub fn pair_rewards(&self, pairs: &[&PreferenceExample]) -> Result<(Tensor, Tensor, Option<Tensor>, usize)> {
        let b = pairs.len();
        let batch = collate_preference(pairs, self.model.pad_token_id(), Some(self.max_length), Truncation::KeepStart);
        let tb = &batch.tokens;
        let ids = Tensor::from_vec(tb.input_ids.clone(), (tb.batch_size, tb.seq_len), &Device::Cpu)?;
        let r = self.model.forward(&ids, &tb.lengths())?;
        let margin = match &batch.margins {
            Some(m) => Some(Tensor::from_vec(m.clone(), (b, 1), &Device::Cpu)?.broadcast_as((b, self.model.num_labels()))?.contiguous()?),
            None => None,
        };
        Ok((r.narrow(0, 0, b)?, r.narrow(0, b, b)?, margin, tb.num_tokens))
    }

    fn data_forward(&self, data: &RmData, idx: &[usize]) -> Result<Forward> {
        match data {
            RmData::Pairs(p) => {
                let pairs: Vec<&PreferenceExample> = idx.iter().map(|&i| &p[i]).collect();
                let (c, r, m, num_tokens) = self.pair_rewards(&pairs)?;
                let loss = crate::rm_loss::pair_loss(&c, &r, m.as_ref(), self.center)?;
                // Accuracy and margin of the ensemble mean (the single reward when k = 1).
                let (cm, rm) = (c.detach().mean(1)?.to_vec1::<f32>()?, r.detach().mean(1)?.to_vec1::<f32>()?);
                let (acc, margin) = crate::rm_loss::pair_metrics(&cm, &rm);
                let metrics = Metrics::from([("accuracy".to_string(), acc), ("margin".to_string(), margin)]);
                Ok(Forward { loss, metrics, num_tokens })
            }
            RmData::Ratings(rows) => {
                let seqs: Vec<&[u32]> = idx.iter().map(|&i| rows[i].0.as_slice()).collect();
                let (ids, lengths) = pad_rows(&seqs, self.model.pad_token_id(), &Device::Cpu)?;
                let k = self.model.num_labels();
                let target: Vec<f32> = idx.iter().map(|&i| rows[i].1).collect();
                let target = Tensor::from_vec(target, (idx.len(), 1), &Device::Cpu)?.broadcast_as((idx.len(), k))?.contiguous()?;
                let r = self.model.forward(&ids, &lengths)?;
                let loss = crate::rm_loss::rating_mse(&r, &target)?;
                Ok(Forward { loss, metrics: Metrics::new(), num_tokens: lengths.iter().sum() })
            }
        }
    }
}

impl Objective for RmTrainer {
    fn num_examples(&self) -> usize {
        self.train.len()
    }

    fn forward(&mut self, idx: &[usize]) -> Result<Forward> {
        if let Some(l) = &self.lora {
            l.set_training(true);
        }
        self.data_forward(&self.train, idx)
    }

    /// Loss, accuracy and margin over the whole eval set (per-pair means; batches only bound memory).
    fn evaluate(&mut self) -> Result<Option<Metrics>> {
        let Some(eval) = &self.eval else { return Ok(None) };
        if let Some(l) = &self.lora {
            l.set_training(false);
        }
        eval_means(eval.len(), self.batch_size, |chunk| self.data_forward(eval, chunk)).map(Some)
    }

    fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    /// A `*ForSequenceClassification` directory, or with LoRA a PEFT `SEQ_CLS` adapter (head as `score`).
    fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let model_err = |e: candle_core::Error| TrainError::Model(e.to_string());
        match &self.lora {
            Some(l) => {
                let base = self.source_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
                l.save(dir, &base, "SEQ_CLS", &[("score", self.model.score_weight())]).map_err(model_err)?
            }
            None => self.model.save(dir).map_err(model_err)?,
        }
        match &self.source_dir {
            Some(src) => copy_tokenizer(src, dir),
            None => Ok(()),
        }
    }
}

/// `rlhf rm`: trains a reward model as configured; the model is written to `output_dir`.
pub fn run_rm(cfg: &PrefConfig) -> Result<PrefSummary> {
    let mut t = RmTrainer::new(cfg)?;
    train_loop(&mut t, cfg, cfg.learning_rate.unwrap_or(1e-4))
}

/// `rlhf rm score`: rewards for prompt/completion rows. Writes each input row plus `reward` (ensemble mean),
/// with an ensemble also `reward_std`, and for rows with an `item_id` also `uncertainty` (= the std, what the
/// feedback app imports). Returns the number of rows scored.
pub fn run_rm_score(args: &RmScoreArgs) -> Result<usize> {
    let device = Device::Cpu;
    let ensemble = Ensemble::load(&args.models, &device)?;
    let tokenizer = Tokenizer::from_dir(&args.models[0]).map_err(data_err)?;
    let ds = rlhf_data::load_dataset(&args.input).map_err(data_err)?;
    let template = if ds.conversational { Some(tokenizer.chat_template(args.chat_template.as_deref()).map_err(data_err)?) } else { None };
    let mut seqs = Vec::with_capacity(ds.len());
    for row in &ds.rows {
        let (prompt, completion) = match &row.record {
            Record::PromptCompletion(r) => (&r.prompt, &r.completion),
            Record::Unpaired(r) => (&r.prompt, &r.completion),
            Record::Rating(r) => (&r.prompt, &r.completion),
            other => {
                return Err(data_err(ds.row_error(
                    row,
                    None,
                    format!("rows to score need \"prompt\" and \"completion\" fields; this row is {}", other.format()),
                )))
            }
        };
        let (p, c) = tokenize_completion(prompt, completion, &tokenizer, template).map_err(|e| row_err(&ds, row, e))?;
        let mut ids = [p, c].concat();
        ids.truncate(args.max_length);
        seqs.push(ids);
    }
    let mut out = File::create(&args.output).map_err(io_err(&args.output))?;
    for (rows, seq_chunk) in ds.rows.chunks(args.batch_size.max(1)).zip(seqs.chunks(args.batch_size.max(1))) {
        let refs: Vec<&[u32]> = seq_chunk.iter().map(|s| s.as_slice()).collect();
        let (ids, lengths) = pad_rows(&refs, ensemble.pad_token_id(), &device)?;
        let (mean, std) = mean_std(&ensemble.scores(&ids, &lengths)?)?;
        for (i, row) in rows.iter().enumerate() {
            let mut obj = row.to_json();
            obj.insert("reward".into(), json!(mean[i]));
            if ensemble.size() > 1 {
                obj.insert("reward_std".into(), json!(std[i]));
                if obj.contains_key("item_id") {
                    obj.insert("uncertainty".into(), json!(std[i]));
                }
            }
            write_line(&mut out, &args.output, &obj)?;
        }
    }
    Ok(ds.len())
}

/// Reward-model benchmark at the TRL baseline's shape (tiny Llama + a fresh head, 8 pairs/step, lr 1e-3):
/// median s/step, tokens/s (chosen + rejected), peak RSS. `tokenizer_dir`: e.g. `fixtures/tokenizer`; `lora`:
/// train adapters (and the head) instead of the whole trunk.
pub fn bench_rm(tokenizer_dir: &Path, steps: usize, lora: Option<&LoraConfig>) -> Result<Value> {
    rlhf_model::tune_allocator();
    let tokenizer = Tokenizer::from_dir(tokenizer_dir).map_err(data_err)?;
    let model_err = |e: candle_core::Error| TrainError::Model(e.to_string());
    let config = rlhf_model::bench::tiny_llama_config();
    let lm = rlhf_model::CausalLm::init_random(config, 1234, &Device::Cpu).map_err(model_err)?;
    let model = SeqCls::from_causal_lm(lm, 1, Some(0), 1234).map_err(model_err)?;
    let pairs = crate::dpo::bench_pairs(&tokenizer, 8 * (steps + 5), 1234)?;
    let cfg = PrefConfig { batch_size: 8, max_length: 64, lora: lora.cloned(), ..Default::default() };
    let mut t = RmTrainer::from_parts(model, RmData::Pairs(pairs), None, &cfg)?;
    let mut v = crate::dpo::bench_steps(&mut t, steps, 5, 1e-3)?;
    v["trainer"] = json!("rm");
    v["lora"] = json!(lora);
    Ok(v)
}
