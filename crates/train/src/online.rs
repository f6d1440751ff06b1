//! The online-RL core shared by `rlhf grpo`, `rlhf rloo` and `rlhf ppo`: settings common to all three, the
//! policy with its frozen reference, and the loop — sample prompts → generate rollouts → score them → let the
//! algorithm take its optimizer steps → metrics → atomic checkpoints — with exact resume.
//!
//! An [`Algorithm`] only turns a [`Batch`] of scored rollouts into losses (its file holds its settings, its
//! loss as small named functions and its step); everything else lives here. Sampling needs no RNG state:
//! every completion's seed derives from (seed, step, index), so a resumed run draws what the uninterrupted one
//! would have. LoRA dropout is off during RL (as TRL disables dropout for PPO), which keeps the importance
//! ratio of the first inner step exactly 1.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use rlhf_data::{EpochSampler, Tokenizer};
use rlhf_model::lora::Lora;
use rlhf_model::{CausalLm, Sampling};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::checkpoint::{self, TrainerState};
use crate::error::{io_err, Result, TrainError};
use crate::lora::LoraArgs;
use crate::metrics::{MetricsWriter, Progress};
use crate::optim::{AdamW, AdamWConfig};
use crate::reward::{Rewards, Sample};
use crate::rollout::{self, PromptRow, Rollout, SampleSpec, SeqBatch};
use crate::schedule::{Schedule, ScheduleKind, Warmup};

pub type Metrics = BTreeMap<String, f64>;

pub const METRICS_FILE: &str = "metrics.jsonl";
const ADAPTER_DIR: &str = "adapter";

/// Settings of every online-RL trainer (TOML key ⇔ flag of the same name).
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct OnlineArgs {
    /// TOML file with any of these settings; flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Policy model directory (HF layout); also the frozen reference unless reference_model is set.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training prompts (JSONL/Parquet with a `prompt` column; other columns reach the reward sources).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Held-out prompts: greedy completions scored every eval_steps and at the end (`eval_reward`).
    #[arg(long)]
    pub eval_prompts: Option<PathBuf>,
    /// Where checkpoints, metrics.jsonl and the final model go.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Reward source `[WEIGHT*]KIND:ARG`, repeatable (summed): rm:DIR, exact:COLUMN, regex:PATTERN, length:COEF,
    /// eos:PENALTY, cmd:COMMAND, judge:URL[,model=ID] (an LLM judge's 1–9 rating; see docs/serve.md).
    #[arg(long)]
    pub reward: Vec<String>,
    /// Frozen reference model directory (default: the initial policy; with LoRA, the base without adapters).
    #[arg(long)]
    pub reference_model: Option<PathBuf>,
    /// Chat template name for conversational prompts (default: the tokenizer's).
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Longest prompt in tokens; a longer one is an error naming its row.
    #[arg(long, default_value_t = 256)]
    pub max_prompt_length: usize,
    /// Tokens generated per completion at most (TRL max_completion_length).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature of the rollouts (> 0); log-probs are those of softmax(logits / temperature).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Keep the top_k most likely tokens when sampling; 0 disables.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold in (0, 1]; 1 disables.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Prompts per step (each sampled num_generations times where the algorithm groups).
    #[arg(long, default_value_t = 8)]
    pub prompts_per_step: usize,
    /// Completions generated in one batch.
    #[arg(long, default_value_t = 64)]
    pub generation_batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-6)]
    pub learning_rate: f64,
    /// constant, linear or cosine.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Linear)]
    pub lr_scheduler_type: ScheduleKind,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// AdamW weight decay (not applied to norms and biases).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Steps to run (default: num_train_epochs passes over the prompts).
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    pub num_train_epochs: f64,
    /// Write a metrics line (means over the window) every N steps.
    #[arg(long, default_value_t = 1)]
    pub logging_steps: u64,
    /// Evaluate on eval_prompts every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_steps: u64,
    /// Checkpoint every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    pub save_steps: u64,
    /// Keep only the newest N checkpoints.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Continue from the newest checkpoint in output_dir (its settings must match these).
    #[arg(long)]
    pub resume: bool,
    /// Replace what output_dir holds instead of refusing.
    #[arg(long)]
    pub overwrite_output_dir: bool,
    /// Extra attempts for a reward source that fails or returns a non-finite score.
    #[arg(long, default_value_t = 2)]
    pub reward_retries: usize,
    /// Time limit of one call of a `cmd:` reward source.
    #[arg(long, default_value_t = 60.0)]
    pub reward_timeout_s: f64,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraArgs,
}

impl OnlineArgs {
    /// An invalid-setting error naming where settings came from (the config file, else the command line).
    pub fn setting_err(&self, key: &str, msg: impl Into<String>) -> TrainError {
        let file = self.config.as_ref().map_or("command line".to_string(), |p| format!("{} (or the command line)", p.display()));
        TrainError::Config { file, key: key.into(), msg: msg.into() }
    }
}

/// A required path setting.
fn required<'a>(v: &'a Option<PathBuf>, key: &str) -> Result<&'a PathBuf> {
    v.as_ref().ok_or_else(|| TrainError::Config {
        file: "settings".into(),
        key: key.into(),
        msg: format!("required (set it in the config file or pass --{})", key.replace('_', "-")),
    })
}

impl OnlineArgs {
    pub fn validate(&self) -> Result<()> {
        required(&self.model, "model")?;
        required(&self.prompts, "prompts")?;
        required(&self.output_dir, "output_dir")?;
        if self.reward.is_empty() {
            return Err(self.setting_err("reward", "no reward source: pass --reward KIND:ARG (e.g. exact:answer or rm:runs/rm)"));
        }
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(self.setting_err(key, format!("must be a finite number > 0, got {v}")))
            }
        };
        positive("temperature", self.temperature)?;
        positive("learning_rate", self.learning_rate)?;
        positive("num_train_epochs", self.num_train_epochs)?;
        positive("reward_timeout_s", self.reward_timeout_s)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(self.setting_err("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(self.setting_err("weight_decay", "must be a finite number >= 0"));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(self.setting_err("max_grad_norm", "must be a finite number >= 0 (0 disables clipping)"));
        }
        for (key, v) in [
            ("max_new_tokens", self.max_new_tokens),
            ("prompts_per_step", self.prompts_per_step),
            ("max_prompt_length", self.max_prompt_length),
            ("generation_batch_size", self.generation_batch_size),
            ("logging_steps", self.logging_steps as usize),
        ] {
            if v == 0 {
                return Err(self.setting_err(key, "must be at least 1"));
            }
        }
        if self.max_steps == Some(0) {
            return Err(self.setting_err("max_steps", "must be at least 1 (or leave it unset for num_train_epochs)"));
        }
        if let Some(l) = self.lora.apply(None) {
            crate::lora::check(&l).map_err(|(k, m)| self.setting_err(&format!("lora_{k}"), m))?;
        }
        Ok(())
    }

    pub fn sampling(&self) -> SampleSpec {
        SampleSpec {
            sampling: Sampling { temperature: self.temperature as f32, top_k: self.top_k, top_p: self.top_p as f32 },
            max_new_tokens: self.max_new_tokens,
            batch_size: self.generation_batch_size,
        }
    }
}

/// Where reference log-probs come from.
enum Reference {
    Model(Box<CausalLm>),
    /// The policy with its LoRA adapters switched off: no second copy in memory.
    BaseOfAdapters,
}

/// The policy being trained, its tokenizer and (when an algorithm needs one) its frozen reference.
pub struct Policy {
    pub model: CausalLm,
    pub lora: Option<Lora>,
    pub tokenizer: Tokenizer,
    reference: Option<Reference>,
    model_dir: PathBuf,
}

fn model_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Model(e.to_string())
}

impl Policy {
    /// Loads the policy from `args.model` (or its weights from checkpoint `resume`), attaches LoRA when
    /// configured, and the reference when `with_reference`.
    pub fn load(args: &OnlineArgs, with_reference: bool, resume: Option<&Path>) -> Result<Self> {
        let dir = required(&args.model, "model")?.clone();
        let device = Device::Cpu;
        let lora_cfg = args.lora.apply(None);
        let weights_dir = match (resume, &lora_cfg) {
            (Some(ckpt), None) => ckpt.to_path_buf(),
            _ => dir.clone(),
        };
        let mut model = CausalLm::load(&weights_dir, &device).map_err(|e| model_err(format!("{}: {e}", weights_dir.display())))?;
        let tokenizer = Tokenizer::from_dir(&dir).map_err(|e| TrainError::Data(e.to_string()))?;
        tokenizer.check_vocab(model.vocab_size(), dir.join("config.json")).map_err(|e| TrainError::Data(e.to_string()))?;
        let reference = match (with_reference, &args.reference_model, &lora_cfg) {
            (false, _, _) => None,
            (true, Some(r), _) => {
                let mut m = CausalLm::load(r, &device).map_err(|e| model_err(format!("{}: {e}", r.display())))?;
                m.set_trainable(false).map_err(model_err)?;
                Some(Reference::Model(Box::new(m)))
            }
            (true, None, Some(_)) => Some(Reference::BaseOfAdapters),
            (true, None, None) => {
                let mut m = if resume.is_some() {
                    CausalLm::load(&dir, &device).map_err(model_err)?
                } else {
                    model.duplicate().map_err(model_err)?
                };
                m.set_trainable(false).map_err(model_err)?;
                Some(Reference::Model(Box::new(m)))
            }
        };
        let lora = match (&lora_cfg, resume) {
            (Some(_), Some(ckpt)) => Some(Lora::load(&mut model, &ckpt.join(ADAPTER_DIR)).map_err(model_err)?),
            (cfg, _) => crate::lora::attach_lora(&mut model, cfg.as_ref(), args.seed)?,
        };
        if let Some(l) = &lora {
            l.set_training(false);
        }
        Ok(Self { model, lora, tokenizer, reference, model_dir: dir })
    }

    /// The trainable parameters (the adapters with LoRA), named `policy.*`.
    pub fn params(&self) -> Vec<(String, Var)> {
        let vm = self.lora.as_ref().map_or(self.model.varmap(), |l| l.varmap());
        crate::optim::sorted_params(vm).into_iter().map(|(k, v)| (format!("policy.{k}"), v)).collect()
    }

    /// Per-token log-probs of the batch under the frozen reference (detached).
    pub fn reference_logprobs(&self, batch: &SeqBatch, temperature: f64) -> Result<Vec<f32>> {
        let lp = match &self.reference {
            None => return Err(model_err("this trainer was built without a reference model")),
            Some(Reference::Model(m)) => rollout::token_logprobs(m, batch, temperature, false)?.0,
            Some(Reference::BaseOfAdapters) => {
                let l = self.lora.as_ref().expect("BaseOfAdapters is only chosen with LoRA");
                l.set_enabled(false);
                let out = rollout::token_logprobs(&self.model, batch, temperature, false);
                l.set_enabled(true);
                out?.0
            }
        };
        Ok(lp.detach().to_vec1()?)
    }

    /// Writes the policy into checkpoint dir `dir` (the adapter alone with LoRA).
    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        match &self.lora {
            Some(l) => l.save(&dir.join(ADAPTER_DIR), &self.model_dir.display().to_string(), "CAUSAL_LM", &[]).map_err(model_err),
            None => {
                self.model.save(dir).map_err(model_err)?;
                crate::pref_train::copy_tokenizer(&self.model_dir, dir)
            }
        }
    }

    /// The final model: with LoRA the adapter in `out/adapter` and the merged model in `out`.
    fn save_final(mut self, out: &Path) -> Result<()> {
        if let Some(l) = self.lora.take() {
            l.save(&out.join(ADAPTER_DIR), &self.model_dir.display().to_string(), "CAUSAL_LM", &[]).map_err(model_err)?;
            l.merge_into(&mut self.model).map_err(model_err)?;
        }
        self.model.save(out).map_err(model_err)?;
        crate::pref_train::copy_tokenizer(&self.model_dir, out)
    }
}

/// The scored rollouts of one step, in groups of `generations` per prompt.
pub struct Batch {
    pub rollouts: Vec<Rollout>,
    /// The prompt tokens of each rollout.
    pub prompt_ids: Vec<Vec<u32>>,
    pub seqs: SeqBatch,
    /// Flat per-token log-probs from generation (π_old).
    pub old_logprobs: Vec<f32>,
    /// One total reward per rollout.
    pub rewards: Vec<f32>,
    pub generations: usize,
    /// Sampling temperature (re-scoring uses the same).
    pub temperature: f64,
}

/// What a trainer file provides to the core.
pub trait Algorithm {
    /// Completions sampled per prompt.
    fn generations(&self) -> usize;
    fn needs_reference(&self) -> bool;
    /// Parameters trained beside the policy's (PPO's value model), named uniquely.
    fn extra_params(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// Learns from one batch: computes advantages and takes its optimizer steps through [`Step::apply`].
    fn learn(&mut self, policy: &Policy, step: &mut Step, batch: &Batch) -> Result<Metrics>;
    /// Writes algorithm state (value model, KL controller) into checkpoint `dir`.
    fn save(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Restores what [`Algorithm::save`] wrote.
    fn restore(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// The optimizer as one RL step sees it: gradient steps at this step's learning rate, with finite checks.
pub struct Step<'a> {
    optimizer: &'a mut AdamW,
    lr: f64,
    max_grad_norm: Option<f64>,
    global_step: u64,
    last_checkpoint: &'a Option<PathBuf>,
    /// Gradient norms of the optimizer steps taken.
    pub grad_norms: Vec<f64>,
}

impl<'a> Step<'a> {
    /// A step at learning rate `lr` (the core makes one per RL step; tests drive an algorithm directly).
    pub fn new(optimizer: &'a mut AdamW, lr: f64, max_grad_norm: Option<f64>, global_step: u64, last_checkpoint: &'a Option<PathBuf>) -> Self {
        Self { optimizer, lr, max_grad_norm, global_step, last_checkpoint, grad_norms: Vec::new() }
    }

    /// The RL step being taken (1-based).
    pub fn global_step(&self) -> u64 {
        self.global_step
    }

    /// Backward through `loss`, clip, AdamW. Refuses a non-finite loss or gradient before touching the weights.
    pub fn apply(&mut self, loss: &Tensor) -> Result<f64> {
        let value = loss.to_scalar::<f32>()? as f64;
        let non_finite = |what, value| TrainError::NonFinite {
            step: self.global_step,
            what,
            value,
            last_checkpoint: self.last_checkpoint.clone(),
        };
        if !value.is_finite() {
            return Err(non_finite("loss", value));
        }
        let store = loss.backward()?;
        let grads = self.optimizer.collect_grads(&store)?;
        let norm = grads.global_norm()?;
        if !norm.is_finite() {
            return Err(non_finite("gradient norm", norm));
        }
        self.optimizer.step_with_norm(&grads, self.lr, self.max_grad_norm, norm)?;
        self.grad_norms.push(norm);
        Ok(value)
    }
}

/// Outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct OnlineSummary {
    pub steps: u64,
    /// Metrics of the last step.
    pub final_metrics: Metrics,
    /// Mean reward of greedy completions on eval_prompts at the end.
    pub eval: Option<Metrics>,
    pub num_tokens: u64,
    pub train_runtime_s: f64,
    pub output_dir: PathBuf,
    pub metrics_file: PathBuf,
}

/// Settings that may change when a run is resumed: the shared cadence keys, plus the run length (continuing an
/// RL run for more steps is the usual reason to resume) and the held-out prompts.
fn resume_free_keys() -> Vec<&'static str> {
    let mut keys = checkpoint::RESUME_FREE_KEYS.to_vec();
    keys.extend(["max_steps", "eval_prompts"]);
    keys
}

/// What the reward sources see of each rollout.
fn samples<'a>(rollouts: &'a [Rollout], prompts: &[&'a PromptRow]) -> Vec<Sample<'a>> {
    rollouts
        .iter()
        .map(|r| {
            let p = prompts[r.prompt];
            Sample { prompt: &p.text, completion: &r.completion, prompt_ids: &p.ids, completion_ids: &r.completion_ids, eos: r.eos, row: &p.row }
        })
        .collect()
}

fn mean(v: &[f32]) -> f64 {
    crate::advantage::mean(v) as f64
}

/// Runs an algorithm with `args`. `settings` is the trainer's whole settings struct (stored in checkpoints and
/// compared on resume); `with_reference` loads the frozen reference; `make` builds the algorithm once the policy is loaded (with the checkpoint to restore
/// from, if resuming).
pub fn run<A: Algorithm>(
    args: &OnlineArgs,
    settings: &Value,
    with_reference: bool,
    make: impl FnOnce(&Policy, Option<&Path>) -> Result<A>,
) -> Result<OnlineSummary> {
    let t_run = Instant::now();
    args.validate()?;
    let out = required(&args.output_dir, "output_dir")?.clone();
    crate::output_dir::prepare(required(&args.model, "model")?, &out, args.overwrite_output_dir, args.resume)?;
    let resume_dir = if args.resume { Some(checkpoint::resume_dir(&out)?) } else { None };
    if let Some(dir) = &resume_dir {
        checkpoint::check_resume_config(dir, &checkpoint::load_checkpoint_config(dir)?, settings, &resume_free_keys())?;
    }
    let prompts_path = required(&args.prompts, "prompts")?;

    // Everything that can fail on bad input is checked before the output directory is touched.
    let policy = Policy::load(args, with_reference, resume_dir.as_deref())?;
    let mut algo = make(&policy, resume_dir.as_deref())?;
    let g = algo.generations();
    let prompts = rollout::load_prompts(prompts_path, &policy.tokenizer, args.chat_template.as_deref(), args.max_prompt_length)?;
    let eval_prompts = match &args.eval_prompts {
        Some(p) => rollout::load_prompts(p, &policy.tokenizer, args.chat_template.as_deref(), args.max_prompt_length)?,
        None => Vec::new(),
    };
    let positions = policy.model.config().max_position_embeddings();
    let longest = prompts.iter().chain(&eval_prompts).map(|p| p.ids.len()).max().unwrap_or(0);
    if longest + args.max_new_tokens > positions {
        return Err(args.setting_err(
            "max_new_tokens",
            format!(
                "the longest prompt ({longest} tokens) + max_new_tokens ({}) exceeds the model's max_position_embeddings ({positions}): lower max_new_tokens or shorten the prompts",
                args.max_new_tokens
            ),
        ));
    }
    let max_len = positions;
    let mut rewards = Rewards::from_specs(&args.reward, &policy.tokenizer, max_len, args.reward_timeout_s, args.reward_retries)?;
    let mut params = policy.params();
    params.extend(algo.extra_params());
    let mut optimizer = AdamW::new(params, AdamWConfig { weight_decay: args.weight_decay, ..Default::default() })?;

    let steps_per_epoch = prompts.len().div_ceil(args.prompts_per_step) as u64;
    let total = args.max_steps.unwrap_or_else(|| ((args.num_train_epochs * steps_per_epoch as f64).ceil() as u64).max(1));
    let schedule = Schedule::new(args.lr_scheduler_type, args.learning_rate, Warmup::Steps(args.warmup_steps), total);
    let mut sampler = EpochSampler::new(prompts.len(), args.seed, true);
    let mut state = TrainerState::new(sampler.state(), args.seed);
    let metrics_path = out.join(METRICS_FILE);
    if let Some(dir) = &resume_dir {
        state = checkpoint::load_checkpoint(dir, &mut optimizer)?;
        algo.restore(dir)?;
        sampler = EpochSampler::resume(prompts.len(), args.seed, true, state.data);
    }
    let mut log = match &resume_dir {
        Some(_) => MetricsWriter::open_resumed(&metrics_path, state.global_step)?,
        None => MetricsWriter::open(&metrics_path, false)?,
    };
    let spec = args.sampling();
    let mut last_checkpoint = resume_dir.clone();
    let progress = Progress::new(total, state.global_step);
    let (mut window, mut window_steps) = (Metrics::new(), 0u64);
    let mut final_metrics = Metrics::new();
    let mut eval = None;
    let evaluate = |policy: &Policy, rewards: &mut Rewards| -> Result<Option<Metrics>> {
        if eval_prompts.is_empty() {
            return Ok(None);
        }
        evaluate_greedy(policy, rewards, &eval_prompts, args).map(Some)
    };

    while state.global_step < total {
        let step_no = state.global_step + 1;
        let idx = sampler.next_batch(args.prompts_per_step, false);
        let chosen: Vec<&PromptRow> = idx.iter().map(|&i| &prompts[i]).collect();

        let t0 = Instant::now();
        let rollouts = rollout::sample(&policy.model, &policy.tokenizer, &chosen, g, &spec, args.seed, step_no)?;
        let t_gen = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let scored = rewards.score(&samples(&rollouts, &chosen))?;
        let t_score = t1.elapsed().as_secs_f64();

        let t2 = Instant::now();
        let pairs: Vec<(&[u32], &[u32])> = rollouts.iter().map(|r| (chosen[r.prompt].ids.as_slice(), r.completion_ids.as_slice())).collect();
        let seqs = SeqBatch::new(&pairs, policy.tokenizer.pad_id().unwrap_or(0), &Device::Cpu)?;
        let batch = Batch {
            prompt_ids: rollouts.iter().map(|r| chosen[r.prompt].ids.clone()).collect(),
            old_logprobs: rollouts.iter().flat_map(|r| r.sampling_logprobs.iter().copied()).collect(),
            rewards: scored.total.iter().map(|&r| r as f32).collect(),
            seqs,
            rollouts,
            generations: g,
            temperature: args.temperature,
        };
        let mut step = Step::new(
            &mut optimizer,
            schedule.lr(state.global_step),
            (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
            step_no,
            &last_checkpoint,
        );
        let mut metrics = algo.learn(&policy, &mut step, &batch)?;
        let t_train = t2.elapsed().as_secs_f64();

        let lengths: Vec<f32> = batch.rollouts.iter().map(|r| r.completion_ids.len() as f32).collect();
        let tokens: usize = batch.rollouts.iter().map(|r| r.completion_ids.len() + chosen[r.prompt].ids.len()).sum();
        metrics.insert("reward".into(), mean(&batch.rewards));
        metrics.insert("reward_std".into(), crate::advantage::std_unbiased(&batch.rewards) as f64);
        for (name, v) in &scored.per_source {
            metrics.insert(format!("rewards/{name}/mean"), v.iter().sum::<f64>() / v.len() as f64);
        }
        metrics.insert("completions/mean_length".into(), mean(&lengths));
        metrics.insert("completions/clipped_ratio".into(), batch.rollouts.iter().filter(|r| !r.eos).count() as f64 / lengths.len() as f64);
        if !step.grad_norms.is_empty() {
            metrics.insert("grad_norm".into(), step.grad_norms.iter().sum::<f64>() / step.grad_norms.len() as f64);
        }
        metrics.insert("timing/generation_s".into(), t_gen);
        metrics.insert("timing/scoring_s".into(), t_score);
        metrics.insert("timing/training_s".into(), t_train);
        metrics.insert("timing/step_s".into(), t0.elapsed().as_secs_f64());
        metrics.insert("step_tokens".into(), tokens as f64);
        state.global_step = step_no;
        state.data = sampler.state();
        state.num_tokens += tokens as u64;
        progress.update(step_no, metrics.get("reward").copied());
        for (k, v) in &metrics {
            *window.entry(k.clone()).or_default() += v;
        }
        window_steps += 1;
        final_metrics = metrics;

        if step_no.is_multiple_of(args.logging_steps) || step_no == total {
            let mut line = Map::new();
            line.insert("step".into(), json!(step_no));
            line.insert("epoch".into(), json!(step_no as f64 / steps_per_epoch as f64));
            for (k, v) in std::mem::take(&mut window) {
                line.insert(k, json!(v / window_steps as f64));
            }
            line.insert("learning_rate".into(), json!(schedule.lr(state.global_step - 1)));
            line.insert("num_tokens".into(), json!(state.num_tokens));
            window_steps = 0;
            log.write_line(&line)?;
        }
        if (args.eval_steps > 0 && step_no.is_multiple_of(args.eval_steps)) || step_no == total {
            eval = evaluate(&policy, &mut rewards)?;
            if let Some(e) = &eval {
                let mut line = Map::new();
                line.insert("step".into(), json!(step_no));
                for (k, v) in e {
                    line.insert(format!("eval_{k}"), json!(v));
                }
                log.write_line(&line)?;
            }
        }
        if args.save_steps > 0 && step_no.is_multiple_of(args.save_steps) {
            let dir = checkpoint::save_checkpoint(
                &out,
                |d| {
                    policy.save_checkpoint(d)?;
                    algo.save(d)
                },
                &optimizer,
                &state,
                settings,
                args.save_total_limit,
            )?;
            last_checkpoint = Some(dir);
        }
    }
    progress.finish();
    policy.save_final(&out)?;
    let cfg_path = out.join(checkpoint::CONFIG_FILE);
    fs::write(&cfg_path, serde_json::to_string_pretty(settings).expect("plain data")).map_err(io_err(&cfg_path))?;
    Ok(OnlineSummary {
        steps: state.global_step,
        final_metrics,
        eval,
        num_tokens: state.num_tokens,
        train_runtime_s: t_run.elapsed().as_secs_f64(),
        output_dir: out,
        metrics_file: metrics_path,
    })
}

/// Greedy completions of `prompts` scored by `rewards`: `reward` (mean) and one mean per source.
pub fn evaluate_greedy(policy: &Policy, rewards: &mut Rewards, prompts: &[PromptRow], args: &OnlineArgs) -> Result<Metrics> {
    let spec = SampleSpec { sampling: Sampling::greedy(), max_new_tokens: args.max_new_tokens, batch_size: args.generation_batch_size };
    let refs: Vec<&PromptRow> = prompts.iter().collect();
    let rollouts = rollout::sample(&policy.model, &policy.tokenizer, &refs, 1, &spec, args.seed, 0)?;
    let scored = rewards.score(&samples(&rollouts, &refs))?;
    let mut m = Metrics::new();
    m.insert("reward".into(), scored.total.iter().sum::<f64>() / scored.total.len() as f64);
    for (name, v) in &scored.per_source {
        m.insert(format!("rewards/{name}/mean"), v.iter().sum::<f64>() / v.len() as f64);
    }
    let lengths: Vec<f32> = rollouts.iter().map(|r| r.completion_ids.len() as f32).collect();
    m.insert("completions/mean_length".into(), mean(&lengths));
    Ok(m)
}
