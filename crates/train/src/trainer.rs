//! The one training loop every trainer runs. A trainer ([`Trainer`]) says what one optimizer step does with
//! the examples the loop hands it (a batch of pairs or sequences, or the prompts of a rollout batch), how it
//! evaluates and how it saves; [`run`] does the rest: the data sampler over shuffled epochs, the learning-rate
//! schedule, clipping and AdamW (through [`Step`]), one metrics line every `logging_steps` (window means of
//! free-form keys, TRL's names), evaluation every `eval_steps` and at the end, atomic checkpoints that hold
//! every RNG (data order, LoRA dropout; trainers add their own state), bit-identical `--resume`, the stop on
//! a non-finite loss or gradient, and the final save.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use rlhf_data::EpochSampler;
use rlhf_model::lora::Lora;
use serde_json::{json, Map, Value};

use crate::checkpoint::{self, TrainerState};
use crate::error::{io_err, Result, TrainError};
use crate::metrics::{MetricsWriter, Progress};
use crate::optim::{AdamW, Grads};
use crate::schedule::Schedule;
use crate::train_args::TrainConfig;

/// Metrics of one step or evaluation, under TRL's names.
pub type Metrics = BTreeMap<String, f64>;

pub const METRICS_FILE: &str = "metrics.jsonl";
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Copies the tokenizer files of `src` next to a saved model so the directory is a complete HF model.
pub(crate) fn copy_tokenizer(src: &Path, dir: &Path) -> Result<()> {
    for name in TOKENIZER_FILES {
        let from = src.join(name);
        if from.is_file() && src != dir {
            std::fs::copy(&from, dir.join(name)).map_err(io_err(&from))?;
        }
    }
    Ok(())
}

/// The settings the loop reads: every trainer's shared keys (resolved) and what the trainer adds.
#[derive(Debug, Clone)]
pub struct LoopSettings {
    pub train: TrainConfig,
    /// The checkpoint to continue (the trainer was built from its weights), None for a fresh run.
    pub resume_from: Option<PathBuf>,
    /// Examples the sampler draws per optimizer step (batch size × accumulation steps, or prompts per step).
    pub examples_per_step: usize,
    /// The trainer's whole settings: `training_config.json` of every checkpoint, compared on resume.
    pub config: Value,
    /// Settings a resumed run may change (see [`checkpoint::RESUME_FREE_KEYS`]).
    pub resume_free_keys: Vec<&'static str>,
}

impl LoopSettings {
    /// What the core loop reads: the shared settings `train`, the checkpoint `resume_from` to continue (the
    /// trainer was built from its weights), `examples_per_step` drawn per optimizer step, the trainer's whole
    /// settings `config` (stored in checkpoints) and the keys a resumed run may change.
    pub fn new(
        train: TrainConfig,
        resume_from: Option<PathBuf>,
        examples_per_step: usize,
        config: Value,
        resume_free_keys: Vec<&'static str>,
    ) -> Self {
        Self {
            train,
            resume_from,
            examples_per_step,
            config,
            resume_free_keys,
        }
    }

    /// Optimizer steps per pass over `n` examples (a step never spans two epochs).
    pub fn steps_per_epoch(&self, n: usize) -> u64 {
        (n.div_ceil(self.examples_per_step) as u64).max(1)
    }

    /// `max_steps`, else `num_train_epochs` passes over `n` examples.
    pub fn total_steps(&self, n: usize) -> u64 {
        self.train.max_steps.unwrap_or_else(|| {
            ((self.train.num_train_epochs * self.steps_per_epoch(n) as f64).ceil() as u64).max(1)
        })
    }

    pub fn schedule(&self, n: usize) -> Schedule {
        Schedule::new(
            self.train.lr_scheduler_type,
            self.train.learning_rate,
            self.train.warmup(),
            self.total_steps(n),
        )
    }

    pub fn max_grad_norm(&self) -> Option<f64> {
        let c = self.train.max_grad_norm;
        (c > 0.0).then_some(c)
    }
}

/// The optimizer step being taken, as the loop hands it to [`Trainer::train_step`].
pub struct StepInfo<'a> {
    /// The step being taken (1-based).
    pub step: u64,
    /// Learning rate of this step.
    pub lr: f64,
    pub max_grad_norm: Option<f64>,
    /// Named by the error when a loss or gradient is not finite.
    pub last_checkpoint: &'a Option<PathBuf>,
}

impl StepInfo<'_> {
    /// `optimizer` at this step's learning rate.
    pub fn step_with<'o>(&'o self, optimizer: &'o mut AdamW) -> Step<'o> {
        Step::new(
            optimizer,
            self.lr,
            self.max_grad_norm,
            self.step,
            self.last_checkpoint,
        )
    }
}

/// The optimizer as one training step sees it: gradients accumulated over any number of losses (micro-batches),
/// then one clipped AdamW update; non-finite losses and gradients stop the run before the weights change.
pub struct Step<'a> {
    optimizer: &'a mut AdamW,
    lr: f64,
    max_grad_norm: Option<f64>,
    global_step: u64,
    last_checkpoint: &'a Option<PathBuf>,
    pending: Option<Grads>,
    /// Gradient norms (pre-clip) of the updates taken.
    pub grad_norms: Vec<f64>,
}

impl<'a> Step<'a> {
    /// A step at learning rate `lr` (the loop makes one per step; tests drive a trainer directly).
    pub fn new(
        optimizer: &'a mut AdamW,
        lr: f64,
        max_grad_norm: Option<f64>,
        global_step: u64,
        last_checkpoint: &'a Option<PathBuf>,
    ) -> Self {
        Self {
            optimizer,
            lr,
            max_grad_norm,
            global_step,
            last_checkpoint,
            pending: None,
            grad_norms: Vec::new(),
        }
    }

    /// The step being taken (1-based).
    pub fn global_step(&self) -> u64 {
        self.global_step
    }

    fn non_finite(&self, what: &'static str, value: f64) -> TrainError {
        TrainError::NonFinite {
            step: self.global_step,
            what,
            value,
            last_checkpoint: self.last_checkpoint.clone(),
        }
    }

    /// Backward through `loss` and add its gradients to those of this update; returns the loss value.
    pub fn backward(&mut self, loss: &Tensor) -> Result<f64> {
        let value = self.finite_loss(loss)?;
        let store = rlhf_model::backward(loss)?;
        self.add_grads(&store)?;
        Ok(value)
    }

    /// [`Step::backward`] through two losses that share no parameter (PPO's policy and value losses), each
    /// on a core of its own ([`rlhf_model::apart`]); returns the sum of their values.
    pub fn backward_apart(&mut self, a: &Tensor, b: &Tensor) -> Result<f64> {
        let value = self.finite_loss(a)? + self.finite_loss(b)?;
        let (sa, sb) = rlhf_model::apart(|| rlhf_model::backward(a), || rlhf_model::backward(b));
        self.add_grads(&sa?)?;
        self.add_grads(&sb?)?;
        Ok(value)
    }

    /// The value of `loss`, or the error that stops the run when it is not finite.
    fn finite_loss(&self, loss: &Tensor) -> Result<f64> {
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(self.non_finite("loss", value));
        }
        Ok(value)
    }

    /// Adds one backward pass's gradients to those of this update.
    fn add_grads(&mut self, store: &GradStore) -> Result<()> {
        match &mut self.pending {
            None => self.pending = Some(self.optimizer.collect_grads(store)?),
            Some(acc) => self.optimizer.accumulate_grads(acc, store)?,
        }
        Ok(())
    }

    /// Clip the accumulated gradients and take one AdamW update; returns the pre-clip gradient norm.
    pub fn update(&mut self) -> Result<f64> {
        let grads = self
            .pending
            .take()
            .ok_or_else(|| TrainError::Data("an optimizer step without any loss".into()))?;
        let norm = grads.global_norm()?;
        if !norm.is_finite() {
            return Err(self.non_finite("gradient norm", norm));
        }
        self.optimizer
            .step_with_norm(&grads, self.lr, self.max_grad_norm, norm)?;
        self.grad_norms.push(norm);
        Ok(norm)
    }

    /// [`Step::backward`] then [`Step::update`]: one loss, one update. Returns the loss value.
    pub fn apply(&mut self, loss: &Tensor) -> Result<f64> {
        let value = self.backward(loss)?;
        self.update()?;
        Ok(value)
    }
}

/// What one training step reports.
#[derive(Debug, Clone, Default)]
pub struct StepOut {
    /// Free-form metrics under TRL's names (`loss` among them when the step has one loss): the log line holds
    /// their means over the steps of the logging window, except `grad_norm`, the last step's (as transformers).
    pub metrics: Metrics,
    /// Metrics measured once per micro-batch (SFT's `mean_token_accuracy`): the log line holds their mean over
    /// every micro-batch of the window, as TRL averages what each forward pass stored.
    pub per_micro_batch: Vec<(&'static str, f64)>,
    /// Tokens processed (TRL's `num_tokens` counter).
    pub num_tokens: u64,
}

/// Metrics logged as the last step's value rather than the window mean.
const LAST_VALUE: [&str; 1] = ["grad_norm"];

/// The metrics of the steps since the last log line.
#[derive(Default)]
struct Window {
    sums: Metrics,
    counts: BTreeMap<String, u64>,
    last: Metrics,
}

impl Window {
    fn add(&mut self, out: &StepOut) {
        let per_step = out.metrics.iter().map(|(k, v)| (k.as_str(), *v));
        for (k, v) in per_step.chain(out.per_micro_batch.iter().copied()) {
            if LAST_VALUE.contains(&k) {
                self.last.insert(k.to_string(), v);
            } else {
                *self.sums.entry(k.to_string()).or_default() += v;
                *self.counts.entry(k.to_string()).or_default() += 1;
            }
        }
    }

    /// The reduced metrics, emptying the window.
    fn take(&mut self) -> Metrics {
        let Window { sums, counts, last } = std::mem::take(self);
        let mut m: Metrics = sums
            .into_iter()
            .map(|(k, sum)| {
                let n = counts[&k] as f64;
                (k, sum / n)
            })
            .collect();
        m.extend(last);
        m
    }
}

/// What differs between trainers; [`run`] drives it.
pub trait Trainer {
    /// Examples (pairs, sequences, prompts) the data sampler draws from.
    fn num_examples(&self) -> usize;
    /// One optimizer step on the examples `idx`: its losses, backward passes and updates (through
    /// `info.step_with(optimizer)`), and its metrics.
    fn train_step(&mut self, idx: &[usize], info: &StepInfo) -> Result<StepOut>;
    /// Eval metrics (keys without the `eval_` prefix), None without eval data.
    fn evaluate(&mut self) -> Result<Option<Metrics>>;
    fn optimizer(&self) -> &AdamW;
    fn optimizer_mut(&mut self) -> &mut AdamW;
    /// Writes what training changes (the model or adapter, and state of the trainer's own such as a value model
    /// or a KL controller) into checkpoint directory `dir`.
    fn save_checkpoint(&self, dir: &Path) -> Result<()>;
    /// Restores what [`Trainer::save_checkpoint`] wrote besides the weights the trainer was built from.
    fn restore(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Writes the final output to `dir`: a complete model (with LoRA: merged, the adapter in `dir/adapter`).
    fn save_final(&mut self, dir: &Path) -> Result<()>;
    /// The adapters being trained, whose dropout RNG checkpoints hold.
    fn lora(&self) -> Option<&Lora> {
        None
    }
    /// The metric the progress bar shows.
    fn progress_key(&self) -> &'static str {
        "loss"
    }
}

/// What a run did, for the trainers' summaries.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub steps: u64,
    /// Fractional epoch at the end.
    pub epoch: f64,
    /// Mean `loss` over the steps of this run (transformers' `train_loss`); NaN when no step ran.
    pub train_loss: f64,
    /// Metrics of the last step.
    pub final_metrics: Metrics,
    /// Eval metrics of the end.
    pub eval: Option<Metrics>,
    pub num_tokens: u64,
    pub train_runtime_s: f64,
    pub metrics_file: PathBuf,
    /// Step the run resumed from (None for a fresh start).
    pub resumed_from_step: Option<u64>,
}

/// A metrics line: `step`, `epoch`, then `metrics` (keys prefixed with `prefix`), then `extra`.
fn line(
    step: u64,
    epoch: f64,
    metrics: impl IntoIterator<Item = (String, f64)>,
    prefix: &str,
    extra: &[(&str, Value)],
) -> Map<String, Value> {
    let mut l = Map::new();
    l.insert("step".into(), json!(step));
    l.insert("epoch".into(), json!(epoch));
    for (k, v) in metrics {
        l.insert(format!("{prefix}{k}"), json!(v));
    }
    for (k, v) in extra {
        l.insert(k.to_string(), v.clone());
    }
    l
}

/// A run in progress: the loop's state between steps (the data sampler and [`TrainerState`]), for [`run`] and
/// for trainers that are also driven step by step (benchmarks, tests).
pub struct Session {
    settings: LoopSettings,
    schedule: Schedule,
    steps_per_epoch: u64,
    state: TrainerState,
    sampler: EpochSampler,
    last_checkpoint: Option<PathBuf>,
    resumed_from_step: Option<u64>,
}

impl Session {
    /// A fresh run over the examples of `t`, or with `s.resume_from` the continuation of that checkpoint
    /// (optimizer, data position, RNGs and the trainer's own state restored; the settings checked against it).
    /// Nothing is written.
    pub fn start(t: &mut dyn Trainer, settings: LoopSettings) -> Result<Self> {
        let n = t.num_examples();
        if n == 0 {
            return Err(TrainError::Data("no training examples".into()));
        }
        let (state, sampler) = match &settings.resume_from {
            Some(dir) => resume(t, &settings, dir, n)?,
            None => {
                let sampler = EpochSampler::new(n, settings.train.seed, true);
                (
                    TrainerState::new(sampler.state(), settings.train.seed),
                    sampler,
                )
            }
        };
        Ok(Self {
            schedule: settings.schedule(n),
            steps_per_epoch: settings.steps_per_epoch(n),
            resumed_from_step: settings.resume_from.as_ref().map(|_| state.global_step),
            last_checkpoint: settings.resume_from.clone(),
            settings,
            state,
            sampler,
        })
    }

    pub fn state(&self) -> &TrainerState {
        &self.state
    }
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }
    pub fn total_steps(&self) -> u64 {
        self.schedule.total_steps
    }
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }
    /// Fractional epoch as transformers logs it.
    pub fn epoch(&self) -> f64 {
        self.state.global_step as f64 / self.steps_per_epoch as f64
    }
    pub fn resumed_from_step(&self) -> Option<u64> {
        self.resumed_from_step
    }

    /// One optimizer step of `t` on the sampler's next examples.
    pub fn step(&mut self, t: &mut dyn Trainer) -> Result<StepOut> {
        let idx = self
            .sampler
            .next_batch(self.settings.examples_per_step, false);
        let step = self.state.global_step + 1;
        let t0 = Instant::now();
        let info = StepInfo {
            step,
            lr: self.schedule.lr(self.state.global_step),
            max_grad_norm: self.settings.max_grad_norm(),
            last_checkpoint: &self.last_checkpoint,
        };
        let mut out = t.train_step(&idx, &info)?;
        out.metrics
            .insert("step_time_s".into(), t0.elapsed().as_secs_f64());
        self.state.data = self.sampler.state();
        self.state.global_step = step;
        self.state.num_tokens += out.num_tokens;
        Ok(out)
    }

    /// Writes `checkpoint-<step>` of `t` atomically (pruning to `save_total_limit`).
    pub fn save_checkpoint(&mut self, t: &dyn Trainer) -> Result<PathBuf> {
        self.state.lora_dropout = t.lora().map(Lora::dropout_state).unwrap_or_default();
        let s = &self.settings;
        let dir = checkpoint::save_checkpoint(
            &s.train.output_dir,
            |d| t.save_checkpoint(d),
            t.optimizer(),
            &self.state,
            &s.config,
            s.train.save_total_limit,
        )?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// Steps until `total_steps`, a JSONL line every `logging_steps` (the window's metrics, the learning rate
    /// after the step as transformers logs it, the token count), evaluation every `eval_steps` and at the end,
    /// checkpoints every `save_steps`, then the final save.
    pub fn run(&mut self, t: &mut dyn Trainer) -> Result<RunOutcome> {
        let t_run = Instant::now();
        let out = self.settings.train.output_dir.clone();
        std::fs::create_dir_all(&out).map_err(io_err(&out))?;
        let metrics_file = out.join(METRICS_FILE);
        let mut log = match self.resumed_from_step {
            Some(step) => MetricsWriter::open_resumed(&metrics_file, step)?,
            None => MetricsWriter::open(&metrics_file, false)?,
        };
        let total = self.total_steps();
        let progress = Progress::new(total, self.state.global_step);
        let mut window = Window::default();
        let (mut loss_sum, mut steps_run, mut final_metrics, mut eval) =
            (0.0, 0u64, Metrics::new(), None);
        while self.state.global_step < total {
            let out = self.step(t)?;
            let step = self.state.global_step;
            loss_sum += out.metrics.get("loss").copied().unwrap_or(0.0);
            steps_run += 1;
            progress.update(step, out.metrics.get(t.progress_key()).copied());
            window.add(&out);
            final_metrics = out.metrics;
            let (s, epoch) = (&self.settings.train, self.epoch());
            if step.is_multiple_of(s.logging_steps) || step == total {
                let extra = [
                    ("learning_rate", json!(self.schedule.lr(step))),
                    ("num_tokens", json!(self.state.num_tokens)),
                ];
                log.write_line(&line(step, epoch, window.take(), "", &extra))?;
            }
            if (s.eval_steps > 0 && step.is_multiple_of(s.eval_steps)) || step == total {
                eval = t.evaluate()?;
                if let Some(e) = &eval {
                    log.write_line(&line(step, epoch, e.clone(), "eval_", &[]))?;
                }
            }
            if s.save_steps > 0 && step.is_multiple_of(s.save_steps) {
                self.save_checkpoint(t)?;
            }
        }
        progress.finish();
        t.save_final(&out)?;
        Ok(RunOutcome {
            steps: self.state.global_step,
            epoch: self.epoch(),
            train_loss: if steps_run > 0 {
                loss_sum / steps_run as f64
            } else {
                f64::NAN
            },
            final_metrics,
            eval,
            num_tokens: self.state.num_tokens,
            train_runtime_s: t_run.elapsed().as_secs_f64(),
            metrics_file,
            resumed_from_step: self.resumed_from_step,
        })
    }
}

/// Runs `t` with settings `s` from start (or from `s.resume_from`) to the final save.
pub fn run(t: &mut dyn Trainer, s: &LoopSettings) -> Result<RunOutcome> {
    Session::start(t, s.clone())?.run(t)
}

/// Restores the optimizer, data position, dropout RNG and the trainer's own state from checkpoint `dir` (whose
/// weights the trainer was built from), after checking that the checkpoint was trained with these settings.
fn resume(
    t: &mut dyn Trainer,
    s: &LoopSettings,
    dir: &Path,
    n: usize,
) -> Result<(TrainerState, EpochSampler)> {
    let saved = checkpoint::load_checkpoint_config(dir)?;
    checkpoint::check_resume_config(dir, &saved, &s.config, &s.resume_free_keys)?;
    let state = checkpoint::load_checkpoint(dir, t.optimizer_mut())?;
    let state_err = |msg: String| TrainError::Checkpoint {
        path: dir.join(checkpoint::STATE_FILE),
        msg,
    };
    if state.data.index > n {
        return Err(state_err(format!(
            "data index {} beyond the {n} training examples",
            state.data.index
        )));
    }
    // Checkpoints from before seeded dropout hold no dropout state; those runs were not reproducible.
    if let (Some(l), false) = (t.lora(), state.lora_dropout.is_empty()) {
        l.set_dropout_state(&state.lora_dropout)
            .map_err(|e| state_err(e.to_string()))?;
    }
    t.restore(dir)?;
    let sampler = EpochSampler::resume(n, state.shuffle_seed, true, state.data);
    Ok((state, sampler))
}
