//! Online RL on the training core (`rlhf grpo`, `rlhf rloo`, `rlhf ppo`): the settings common to the three, the
//! policy with its frozen reference, and [`run`], which drives an [`Algorithm`] through [`crate::trainer::run`]:
//! each step samples its prompts' rollouts, scores them and lets the algorithm take its optimizer steps; the core
//! does the schedule, metrics, evaluation cadence, checkpoints and exact resume.
//!
//! An [`Algorithm`] only turns a [`Batch`] of scored rollouts into losses (its file holds its settings, its
//! loss as small named functions and its step). Sampling needs no RNG state: every completion's seed derives
//! from (seed, step, index), so a resumed run draws what the uninterrupted one would have. LoRA dropout is off
//! during RL (as TRL disables dropout for PPO), which keeps the importance ratio of the first inner step exactly 1.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Var};
use rlhf_data::Tokenizer;
use rlhf_model::lora::Lora;
use rlhf_model::{CausalLm, Sampling};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::checkpoint;
use crate::error::{io_err, Result, TrainError};
use crate::lora::ADAPTER_DIR;
use crate::optim::AdamW;
use crate::reward::{Rewards, Sample};
use crate::rollout::{self, PromptRow, Rollout, SampleSpec, SeqBatch};
use crate::train_args::{TrainArgs, TrainConfig, TrainDefaults};
use crate::trainer::{StepInfo, StepOut, Trainer};

pub use crate::trainer::{Metrics, Step, METRICS_FILE};

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
    /// Extra attempts for a reward source that fails or returns a non-finite score.
    #[arg(long, default_value_t = 2)]
    pub reward_retries: usize,
    /// Time limit of one call of a `cmd:` reward source.
    #[arg(long, default_value_t = 60.0)]
    pub reward_timeout_s: f64,
    /// The settings every trainer shares (bf16 applies to the policy, its reference, the rollouts and reward
    /// models).
    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl OnlineArgs {
    /// An invalid-setting error naming where settings came from (the config file, else the command line).
    pub fn setting_err(&self, key: &str, msg: impl Into<String>) -> TrainError {
        crate::settings::setting_err(self.config.as_deref(), key, msg)
    }

    /// The shared settings over the online trainers' defaults, validated.
    pub fn train(&self) -> Result<TrainConfig> {
        self.train
            .resolve(&TrainDefaults::ONLINE, &|k, m| self.setting_err(k, m))
    }
}

/// A required path setting.
fn required<'a>(v: &'a Option<PathBuf>, key: &str) -> Result<&'a PathBuf> {
    v.as_ref().ok_or_else(|| TrainError::Config {
        file: "settings".into(),
        key: key.into(),
        msg: format!(
            "required (set it in the config file or pass --{})",
            key.replace('_', "-")
        ),
    })
}

impl OnlineArgs {
    /// Validates the settings; returns the shared ones resolved.
    pub fn validate(&self) -> Result<TrainConfig> {
        required(&self.model, "model")?;
        required(&self.prompts, "prompts")?;
        let train = self.train()?;
        if self.reward.is_empty() {
            return Err(self.setting_err(
                "reward",
                "no reward source: pass --reward KIND:ARG (e.g. exact:answer or rm:runs/rm)",
            ));
        }
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(self.setting_err(key, format!("must be a finite number > 0, got {v}")))
            }
        };
        positive("temperature", self.temperature)?;
        positive("reward_timeout_s", self.reward_timeout_s)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(self.setting_err("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        for (key, v) in [
            ("max_new_tokens", self.max_new_tokens),
            ("prompts_per_step", self.prompts_per_step),
            ("max_prompt_length", self.max_prompt_length),
            ("generation_batch_size", self.generation_batch_size),
        ] {
            if v == 0 {
                return Err(self.setting_err(key, "must be at least 1"));
            }
        }
        Ok(train)
    }

    pub fn sampling(&self) -> SampleSpec {
        SampleSpec {
            sampling: Sampling {
                temperature: self.temperature as f32,
                top_k: self.top_k,
                top_p: self.top_p as f32,
            },
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
        let train = args.train()?;
        let lora_cfg = train.lora.clone();
        let weights_dir = match (resume, &lora_cfg) {
            (Some(ckpt), None) => ckpt.to_path_buf(),
            _ => dir.clone(),
        };
        let mut model = CausalLm::load(&weights_dir, &device)
            .map_err(|e| model_err(format!("{}: {e}", weights_dir.display())))?;
        train.configure(&mut model);
        let tokenizer = Tokenizer::from_dir(&dir).map_err(|e| TrainError::Data(e.to_string()))?;
        tokenizer
            .check_vocab(model.vocab_size(), dir.join("config.json"))
            .map_err(|e| TrainError::Data(e.to_string()))?;
        let reference = match (with_reference, &args.reference_model, &lora_cfg) {
            (false, _, _) => None,
            (true, Some(r), _) => {
                let mut m = CausalLm::load(r, &device)
                    .map_err(|e| model_err(format!("{}: {e}", r.display())))?;
                m.set_precision(model.precision());
                m.set_backend(model.backend());
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
                m.set_precision(model.precision());
                m.set_backend(model.backend());
                m.set_trainable(false).map_err(model_err)?;
                Some(Reference::Model(Box::new(m)))
            }
        };
        let lora = match (&lora_cfg, resume) {
            (Some(_), Some(ckpt)) => {
                Some(Lora::load(&mut model, &ckpt.join(ADAPTER_DIR)).map_err(model_err)?)
            }
            (cfg, _) => crate::lora::attach_lora(&mut model, cfg.as_ref(), train.seed)?,
        };
        if let Some(l) = &lora {
            l.set_training(false);
        }
        Ok(Self {
            model,
            lora,
            tokenizer,
            reference,
            model_dir: dir,
        })
    }

    /// The trainable parameters (the adapters with LoRA), named `policy.*`.
    pub fn params(&self) -> Vec<(String, Var)> {
        let vm = self
            .lora
            .as_ref()
            .map_or(self.model.varmap(), |l| l.varmap());
        crate::optim::sorted_params(vm)
            .into_iter()
            .map(|(k, v)| (format!("policy.{k}"), v))
            .collect()
    }

    /// Whether the policy (and its reference) run [`SeqBatch::grouped`] batches.
    pub fn groups_prompts(&self) -> bool {
        self.model.attends_by_group()
            && match &self.reference {
                Some(Reference::Model(m)) => m.attends_by_group(),
                _ => true,
            }
    }

    /// Per-token log-probs of the batch under the frozen reference (detached).
    pub fn reference_logprobs(&self, batch: &SeqBatch, temperature: f64) -> Result<Vec<f32>> {
        let lp = match &self.reference {
            None => {
                return Err(model_err(
                    "this trainer was built without a reference model",
                ))
            }
            Some(Reference::Model(m)) => rollout::token_logprobs(m, batch, temperature, false)?.0,
            Some(Reference::BaseOfAdapters) => {
                let l = self
                    .lora
                    .as_ref()
                    .expect("BaseOfAdapters is only chosen with LoRA");
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
            Some(l) => l
                .save(
                    &dir.join(ADAPTER_DIR),
                    &self.model_dir.display().to_string(),
                    "CAUSAL_LM",
                    &[],
                )
                .map_err(model_err),
            None => {
                self.model.save(dir).map_err(model_err)?;
                crate::trainer::copy_tokenizer(&self.model_dir, dir)
            }
        }
    }

    /// The final model: with LoRA the adapter in `out/adapter` and the merged model in `out`.
    fn save_final(&mut self, out: &Path) -> Result<()> {
        if let Some(l) = self.lora.take() {
            l.save(
                &out.join(ADAPTER_DIR),
                &self.model_dir.display().to_string(),
                "CAUSAL_LM",
                &[],
            )
            .map_err(model_err)?;
            l.merge_into(&mut self.model).map_err(model_err)?;
        }
        self.model.save(out).map_err(model_err)?;
        crate::trainer::copy_tokenizer(&self.model_dir, out)
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
    /// Whether the algorithm's own models (PPO's value model) run [`SeqBatch::grouped`] batches.
    fn runs_grouped(&self) -> bool {
        true
    }
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
            Sample {
                prompt: &p.text,
                completion: &r.completion,
                prompt_ids: &p.ids,
                completion_ids: &r.completion_ids,
                eos: r.eos,
                row: &p.row,
            }
        })
        .collect()
}

fn mean(v: &[f32]) -> f64 {
    crate::advantage::mean(v) as f64
}

/// An [`Algorithm`] with its policy, reward sources and prompts, as the core loop drives it: each step samples
/// rollouts of its prompts, scores them and lets the algorithm learn from them.
struct OnlineTrainer<'a, A> {
    args: &'a OnlineArgs,
    /// Seed of the sampling (every completion's seed derives from it, the step and its index).
    seed: u64,
    /// The trainer's whole settings, written beside the final model.
    settings: &'a Value,
    policy: Policy,
    algo: A,
    optimizer: AdamW,
    rewards: Rewards,
    prompts: Vec<PromptRow>,
    eval_prompts: Vec<PromptRow>,
}

impl<A: Algorithm> Trainer for OnlineTrainer<'_, A> {
    fn num_examples(&self) -> usize {
        self.prompts.len()
    }

    /// Sampling needs no RNG state: every completion's seed derives from (seed, step, index).
    fn train_step(&mut self, idx: &[usize], info: &StepInfo) -> Result<StepOut> {
        let args = self.args;
        let g = self.algo.generations();
        let chosen: Vec<&PromptRow> = idx.iter().map(|&i| &self.prompts[i]).collect();

        let t0 = Instant::now();
        let rollouts = rollout::sample(
            &self.policy.model,
            &self.policy.tokenizer,
            &chosen,
            g,
            &args.sampling(),
            self.seed,
            info.step,
        )?;
        let t_gen = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let scored = self.rewards.score(&samples(&rollouts, &chosen))?;
        let t_score = t1.elapsed().as_secs_f64();

        let t2 = Instant::now();
        let pairs: Vec<(&[u32], &[u32])> = rollouts
            .iter()
            .map(|r| (chosen[r.prompt].ids.as_slice(), r.completion_ids.as_slice()))
            .collect();
        let pad = self.policy.tokenizer.pad_id().unwrap_or(0);
        // A prompt's tokens run once for all its completions, and short rollouts share input rows.
        let seqs = if self.policy.groups_prompts() && self.algo.runs_grouped() {
            SeqBatch::grouped(&pairs, pad, &Device::Cpu)?
        } else {
            SeqBatch::new(&pairs, pad, &Device::Cpu)?
        };
        let batch = Batch {
            prompt_ids: rollouts
                .iter()
                .map(|r| chosen[r.prompt].ids.clone())
                .collect(),
            old_logprobs: rollouts
                .iter()
                .flat_map(|r| r.sampling_logprobs.iter().copied())
                .collect(),
            rewards: scored.total.iter().map(|&r| r as f32).collect(),
            seqs,
            rollouts,
            generations: g,
            temperature: args.temperature,
        };
        let mut step = info.step_with(&mut self.optimizer);
        let mut metrics = self.algo.learn(&self.policy, &mut step, &batch)?;
        let t_train = t2.elapsed().as_secs_f64();

        let lengths: Vec<f32> = batch
            .rollouts
            .iter()
            .map(|r| r.completion_ids.len() as f32)
            .collect();
        let tokens: usize = batch
            .rollouts
            .iter()
            .map(|r| r.completion_ids.len() + chosen[r.prompt].ids.len())
            .sum();
        metrics.insert("reward".into(), mean(&batch.rewards));
        metrics.insert(
            "reward_std".into(),
            crate::advantage::std_unbiased(&batch.rewards) as f64,
        );
        for (name, v) in &scored.per_source {
            metrics.insert(
                format!("rewards/{name}/mean"),
                v.iter().sum::<f64>() / v.len() as f64,
            );
        }
        metrics.insert("completions/mean_length".into(), mean(&lengths));
        metrics.insert(
            "completions/clipped_ratio".into(),
            batch.rollouts.iter().filter(|r| !r.eos).count() as f64 / lengths.len() as f64,
        );
        if !step.grad_norms.is_empty() {
            metrics.insert(
                "grad_norm".into(),
                step.grad_norms.iter().sum::<f64>() / step.grad_norms.len() as f64,
            );
        }
        metrics.insert("timing/generation_s".into(), t_gen);
        metrics.insert("timing/scoring_s".into(), t_score);
        metrics.insert("timing/training_s".into(), t_train);
        metrics.insert("timing/step_s".into(), t0.elapsed().as_secs_f64());
        metrics.insert("step_tokens".into(), tokens as f64);
        Ok(StepOut {
            metrics,
            num_tokens: tokens as u64,
            ..Default::default()
        })
    }

    fn evaluate(&mut self) -> Result<Option<Metrics>> {
        if self.eval_prompts.is_empty() {
            return Ok(None);
        }
        evaluate_greedy(
            &self.policy,
            &mut self.rewards,
            &self.eval_prompts,
            self.args,
            self.seed,
        )
        .map(Some)
    }

    fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.policy.save_checkpoint(dir)?;
        self.algo.save(dir)
    }

    fn restore(&mut self, dir: &Path) -> Result<()> {
        self.algo.restore(dir)
    }

    fn save_final(&mut self, out: &Path) -> Result<()> {
        self.policy.save_final(out)?;
        let cfg_path = out.join(checkpoint::CONFIG_FILE);
        fs::write(
            &cfg_path,
            serde_json::to_string_pretty(self.settings).expect("plain data"),
        )
        .map_err(io_err(&cfg_path))
    }

    fn lora(&self) -> Option<&Lora> {
        self.policy.lora.as_ref()
    }

    fn progress_key(&self) -> &'static str {
        "reward"
    }
}

/// The trainer's settings as stored (checkpoints, the final model's `training_config.json`): the shared keys
/// resolved (`lora_*` as one `lora` object, as every trainer stores them) instead of as given.
fn resolved_settings(settings: &Value, train: &TrainConfig) -> Value {
    let mut out = settings.as_object().cloned().unwrap_or_default();
    if let Value::Object(given) = serde_json::to_value(TrainArgs::default()).expect("plain data") {
        for k in given.keys() {
            out.remove(k);
        }
    }
    if let Value::Object(resolved) = serde_json::to_value(train).expect("plain data") {
        out.extend(resolved);
    }
    Value::Object(out)
}

/// Runs an algorithm with `args`. `settings` is the trainer's whole settings struct (stored in checkpoints and
/// compared on resume); `with_reference` loads the frozen reference; `make` builds the algorithm once the policy
/// is loaded (with the checkpoint to restore from, if resuming).
pub fn run<A: Algorithm>(
    args: &OnlineArgs,
    settings: &Value,
    with_reference: bool,
    make: impl FnOnce(&Policy, Option<&Path>) -> Result<A>,
) -> Result<OnlineSummary> {
    let train = args.validate()?;
    let out = train.output_dir.clone();
    crate::output_dir::prepare(
        required(&args.model, "model")?,
        &out,
        train.overwrite_output_dir,
        train.resume,
    )?;
    let resume_from = if train.resume {
        Some(checkpoint::resume_dir(&out)?)
    } else {
        None
    };
    let prompts_path = required(&args.prompts, "prompts")?;

    // Everything that can fail on bad input is checked before the output directory is touched.
    let policy = Policy::load(args, with_reference, resume_from.as_deref())?;
    let algo = make(&policy, resume_from.as_deref())?;
    let prompts = rollout::load_prompts(
        prompts_path,
        &policy.tokenizer,
        args.chat_template.as_deref(),
        args.max_prompt_length,
    )?;
    let eval_prompts = match &args.eval_prompts {
        Some(p) => rollout::load_prompts(
            p,
            &policy.tokenizer,
            args.chat_template.as_deref(),
            args.max_prompt_length,
        )?,
        None => Vec::new(),
    };
    let positions = policy.model.config().max_position_embeddings();
    let longest = prompts
        .iter()
        .chain(&eval_prompts)
        .map(|p| p.ids.len())
        .max()
        .unwrap_or(0);
    if longest + args.max_new_tokens > positions {
        return Err(args.setting_err(
            "max_new_tokens",
            format!(
                "the longest prompt ({longest} tokens) + max_new_tokens ({}) exceeds the model's max_position_embeddings ({positions}): lower max_new_tokens or shorten the prompts",
                args.max_new_tokens
            ),
        ));
    }
    let mut rewards = Rewards::from_specs(
        &args.reward,
        &policy.tokenizer,
        positions,
        args.reward_timeout_s,
        args.reward_retries,
    )?;
    rewards.set_precision(policy.model.precision());
    let mut params = policy.params();
    params.extend(algo.extra_params());
    let optimizer = AdamW::new(params, train.adamw())?;
    let settings = &resolved_settings(settings, &train);
    let loop_settings = crate::trainer::LoopSettings::new(
        train.clone(),
        resume_from,
        args.prompts_per_step,
        settings.clone(),
        resume_free_keys(),
    );
    let mut trainer = OnlineTrainer {
        args,
        seed: train.seed,
        settings,
        policy,
        algo,
        optimizer,
        rewards,
        prompts,
        eval_prompts,
    };
    let r = crate::trainer::run(&mut trainer, &loop_settings)?;
    Ok(OnlineSummary {
        steps: r.steps,
        final_metrics: r.final_metrics,
        eval: r.eval,
        num_tokens: r.num_tokens,
        train_runtime_s: r.train_runtime_s,
        output_dir: out,
        metrics_file: r.metrics_file,
    })
}

/// Greedy completions of `prompts` scored by `rewards`: `reward` (mean) and one mean per source.
pub fn evaluate_greedy(
    policy: &Policy,
    rewards: &mut Rewards,
    prompts: &[PromptRow],
    args: &OnlineArgs,
    seed: u64,
) -> Result<Metrics> {
    let spec = SampleSpec {
        sampling: Sampling::greedy(),
        max_new_tokens: args.max_new_tokens,
        batch_size: args.generation_batch_size,
    };
    let refs: Vec<&PromptRow> = prompts.iter().collect();
    let rollouts = rollout::sample(&policy.model, &policy.tokenizer, &refs, 1, &spec, seed, 0)?;
    let scored = rewards.score(&samples(&rollouts, &refs))?;
    let mut m = Metrics::new();
    m.insert(
        "reward".into(),
        scored.total.iter().sum::<f64>() / scored.total.len() as f64,
    );
    for (name, v) in &scored.per_source {
        m.insert(
            format!("rewards/{name}/mean"),
            v.iter().sum::<f64>() / v.len() as f64,
        );
    }
    let lengths: Vec<f32> = rollouts
        .iter()
        .map(|r| r.completion_ids.len() as f32)
        .collect();
    m.insert("completions/mean_length".into(), mean(&lengths));
    Ok(m)
}
