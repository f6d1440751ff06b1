//! The training loop of the offline preference trainers (`rlhf rm`, `rlhf dpo`): a trainer implements
//! [`Objective`] (loss of a batch, evaluation, save) and [`train_loop`] does the rest: shuffled epochs,
//! schedule, clipping, AdamW, a JSONL log line every `logging_steps`, evaluation, atomic checkpoints that hold
//! every RNG, bit-identical `--resume`, the non-finite stop and the final save. Also the step timer the
//! preference benchmarks share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use rlhf_data::EpochSampler;
use rlhf_model::lora::Lora;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::checkpoint::{self, TrainerState};
use crate::error::{io_err, Result, TrainError};
use crate::metrics::{MetricsWriter, Progress};
use crate::optim::AdamW;
use crate::pref_config::PrefConfig;
use crate::schedule::{Schedule, Warmup};

/// Metrics of one step or evaluation, under TRL's names.
pub type Metrics = BTreeMap<String, f64>;

/// What a preference trainer's forward pass over one batch produced.
pub struct Forward {
    pub loss: Tensor,
    pub metrics: Metrics,
    /// Non-pad tokens of the batch (chosen + rejected counted once, as TRL).
    pub num_tokens: usize,
}

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

/// A model + objective the shared loop drives.
pub trait Objective {
    fn num_examples(&self) -> usize;
    /// Loss (differentiable) and metrics of the examples `idx`.
    fn forward(&mut self, idx: &[usize]) -> Result<Forward>;
    /// Eval metrics (keys without the `eval_` prefix), None without eval data.
    fn evaluate(&mut self) -> Result<Option<Metrics>>;
    fn optimizer(&self) -> &AdamW;
    fn optimizer_mut(&mut self) -> &mut AdamW;
    /// Writes the trained model (or adapter) to `dir` (checkpoints).
    fn save(&self, dir: &Path) -> Result<()>;
    /// Writes the final output to `dir`: a complete model (with LoRA: merged, the adapter in `dir/adapter`).
    fn save_final(&mut self, dir: &Path) -> Result<()>;
    /// The adapters being trained, whose dropout RNG checkpoints hold.
    fn lora(&self) -> Option<&Lora> {
        None
    }
}

/// Outcome of a training run.
#[derive(Debug, Clone, Serialize)]
pub struct PrefSummary {
    pub steps: u64,
    pub train_loss: f64,
    pub final_loss: f64,
    /// Train metrics of the last step.
    pub final_metrics: Metrics,
    /// Eval metrics of the end (keys without the `eval_` prefix; the JSON summary has them with it, as
    /// metrics.jsonl and `rlhf sft`'s summary do: `eval_loss`, `eval_accuracy`, …).
    #[serde(serialize_with = "eval_prefixed")]
    pub eval: Option<Metrics>,
    pub num_tokens: u64,
    pub train_runtime_s: f64,
    pub output_dir: PathBuf,
    pub metrics_file: PathBuf,
    /// Step the run resumed from (None for a fresh start).
    pub resumed_from_step: Option<u64>,
}

fn eval_prefixed<S: serde::Serializer>(eval: &Option<Metrics>, s: S) -> std::result::Result<S::Ok, S::Error> {
    let prefixed = eval.as_ref().map(|m| m.iter().map(|(k, v)| (format!("eval_{k}"), *v)).collect::<Metrics>());
    prefixed.serialize(s)
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

/// Checks the output directory of a validated `cfg` before anything is loaded or written
/// (see [`crate::output_dir::prepare`]); returns the checkpoint to resume from when `cfg.resume`.
pub fn prepare_run(cfg: &PrefConfig) -> Result<Option<PathBuf>> {
    let (model, _, out) = cfg.required();
    crate::output_dir::prepare(&model, &out, cfg.overwrite_output_dir, cfg.resume)?;
    cfg.resume.then(|| checkpoint::resume_dir(&out)).transpose()
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

/// Restores the optimizer, data position and dropout RNG of `obj` from checkpoint `dir` (whose weights the
/// trainer loaded when it was built), after checking that the checkpoint was trained with these settings.
fn resume(obj: &mut dyn Objective, cfg: &PrefConfig, dir: &Path, n: usize) -> Result<(TrainerState, EpochSampler)> {
    let saved = checkpoint::load_checkpoint_config(dir)?;
    let current = serde_json::to_value(cfg).expect("config serialises");
    checkpoint::check_resume_config(dir, &saved, &current, checkpoint::RESUME_FREE_KEYS)?;
    let state = checkpoint::load_checkpoint(dir, obj.optimizer_mut())?;
    let state_err = |msg: String| TrainError::Checkpoint { path: dir.join(checkpoint::STATE_FILE), msg };
    if state.data.index > n {
        return Err(state_err(format!("data index {} beyond the {n} training examples", state.data.index)));
    }
    if let (Some(l), false) = (obj.lora(), state.lora_dropout.is_empty()) {
        l.set_dropout_state(&state.lora_dropout).map_err(|e| state_err(e.to_string()))?;
    }
    let sampler = EpochSampler::resume(n, state.shuffle_seed, true, state.data);
    Ok((state, sampler))
}

/// The full loop: `total_steps` steps over shuffled epochs, a JSONL log line every `logging_steps` (means over
/// the window), evaluation every `eval_steps` and at the end, checkpoints every `save_steps`, final save.
/// With `cfg.resume` it continues the newest checkpoint exactly where it stopped.
pub fn train_loop(obj: &mut dyn Objective, cfg: &PrefConfig, lr: f64) -> Result<PrefSummary> {
    let t_run = Instant::now();
    let (_, _, out_dir) = cfg.required();
    let resume_from = if cfg.resume { Some(checkpoint::resume_dir(&out_dir)?) } else { None };
    std::fs::create_dir_all(&out_dir).map_err(io_err(&out_dir))?;
    let n = obj.num_examples();
    let steps_per_epoch = n.div_ceil(cfg.batch_size) as u64;
    let total = cfg.max_steps.unwrap_or_else(|| ((cfg.num_train_epochs * steps_per_epoch as f64).ceil() as u64).max(1));
    let schedule = Schedule::new(cfg.lr_scheduler_type, lr, Warmup::Steps(cfg.warmup_steps), total);
    let metrics_path = out_dir.join(METRICS_FILE);
    let (mut state, mut sampler, mut log) = match &resume_from {
        Some(dir) => {
            let (state, sampler) = resume(obj, cfg, dir, n)?;
            let log = MetricsWriter::open_resumed(&metrics_path, state.global_step)?;
            (state, sampler, log)
        }
        None => {
            let sampler = EpochSampler::new(n, cfg.seed, true);
            (TrainerState::new(sampler.state(), cfg.seed), sampler, MetricsWriter::open(&metrics_path, false)?)
        }
    };
    let resumed_from_step = resume_from.as_ref().map(|_| state.global_step);
    let progress = Progress::new(total, state.global_step);
    let mut last_checkpoint = resume_from;
    let (mut window, mut window_steps) = (Metrics::new(), 0u64);
    let (mut loss_sum, mut steps_run, mut final_loss, mut final_metrics, mut eval) = (0.0, 0u64, f64::NAN, Metrics::new(), None);
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
        steps_run += 1;
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
            log.write_line(&line)?;
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
                log.write_line(&line)?;
            }
        }
        if cfg.save_steps > 0 && step.is_multiple_of(cfg.save_steps) {
            state.lora_dropout = obj.lora().map(Lora::dropout_state).unwrap_or_default();
            let o: &dyn Objective = obj;
            let dir = checkpoint::save_checkpoint(&out_dir, |d| o.save(d), o.optimizer(), &state, &config_json, cfg.save_total_limit)?;
            last_checkpoint = Some(dir);
        }
    }
    progress.finish();
    obj.save_final(&out_dir)?;
    Ok(PrefSummary {
        steps: state.global_step,
        train_loss: loss_sum / steps_run.max(1) as f64,
        final_loss,
        final_metrics,
        eval,
        num_tokens: state.num_tokens,
        train_runtime_s: t_run.elapsed().as_secs_f64(),
        output_dir: out_dir,
        metrics_file: metrics_path,
        resumed_from_step,
    })
}

/// Times `steps` optimizer steps of `obj` on 8-example batches (after `warmup` untimed ones): median s/step,
/// tokens/s (chosen + rejected counted once, as TRL) and peak RSS.
pub(crate) fn bench_steps(obj: &mut dyn Objective, steps: usize, warmup: usize, lr: f64) -> Result<Value> {
    use crate::bench::{cpu_snapshot, median, peak_rss_mb};
    let n = obj.num_examples();
    let (mut times, mut tokens, mut total_s, mut cpu_start) = (Vec::new(), 0usize, 0.0, None);
    for s in 0..steps + warmup {
        if s == warmup {
            cpu_start = cpu_snapshot();
        }
        let idx: Vec<usize> = (0..8).map(|j| (s * 8 + j) % n).collect();
        let t0 = Instant::now();
        let (_, _, _, tok) = optimizer_step(obj, &idx, lr, None, s as u64 + 1, &None)?;
        let dt = t0.elapsed().as_secs_f64();
        if s >= warmup {
            times.push(dt);
            tokens += tok;
            total_s += dt;
        }
    }
    // As bench-trl: CPU used by other processes meanwhile (cores; > 0.2 = contaminated) and our own CPU time.
    let (other_cores, own_cpu_per_step) = match (cpu_start, cpu_snapshot()) {
        (Some((busy0, own0)), Some((busy1, own1))) => {
            (Some((((busy1 - busy0) - (own1 - own0)) / total_s).max(0.0)), Some((own1 - own0) / steps as f64))
        }
        _ => (None, None),
    };
    Ok(json!({
        "steps": steps,
        "pairs_per_step": 8,
        "sec_per_step_median": median(times),
        "tokens_per_step_mean": tokens as f64 / steps as f64,
        "tokens_per_sec": tokens as f64 / total_s,
        "own_cpu_s_per_step": own_cpu_per_step,
        "other_procs_cpu_cores": other_cores,
        "threads": rayon::current_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
    }))
}
