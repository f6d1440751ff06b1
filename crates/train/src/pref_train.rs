//! The preference trainers (`rlhf rm`, `rlhf dpo`) on the core loop: a trainer implements [`Objective`] (loss of
//! a batch, evaluation, save) and [`train_loop`] runs it with [`crate::trainer::run`] (schedule, clipping,
//! AdamW, metrics, evaluation, checkpoints, bit-identical `--resume`, final save). Also the step timer the
//! preference benchmarks share.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use rlhf_model::lora::Lora;
use serde::Serialize;
use serde_json::{json, Value};

use crate::checkpoint;
use crate::error::Result;
use crate::optim::AdamW;
use crate::pref_config::PrefConfig;
use crate::trainer::{StepInfo, StepOut, Trainer};

pub use crate::trainer::Metrics;

/// What a preference trainer's forward pass over one batch produced.
pub struct Forward {
    pub loss: Tensor,
    pub metrics: Metrics,
    /// Non-pad tokens of the batch (chosen + rejected counted once, as TRL).
    pub num_tokens: usize,
}

/// Per-example means of the loss and metrics over `n` examples, run in chunks of `batch_size` (the chunks only
/// bound memory), for [`Objective::evaluate`].
pub(crate) fn eval_means(
    n: usize,
    batch_size: usize,
    forward: impl Fn(&[usize]) -> Result<Forward>,
) -> Result<Metrics> {
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

fn eval_prefixed<S: serde::Serializer>(
    eval: &Option<Metrics>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    let prefixed = eval.as_ref().map(|m| {
        m.iter()
            .map(|(k, v)| (format!("eval_{k}"), *v))
            .collect::<Metrics>()
    });
    prefixed.serialize(s)
}

pub use crate::trainer::METRICS_FILE;

/// Checks the output directory of a validated `cfg` before anything is loaded or written
/// (see [`crate::output_dir::prepare`]); returns the checkpoint to resume from when `cfg.resume`.
pub fn prepare_run(cfg: &PrefConfig) -> Result<Option<PathBuf>> {
    let t = &cfg.train;
    crate::output_dir::prepare(&cfg.model, &t.output_dir, t.overwrite_output_dir, t.resume)?;
    t.resume
        .then(|| checkpoint::resume_dir(&t.output_dir))
        .transpose()
}

/// One optimizer step on the examples `idx`: forward, backward, clip, AdamW (refusing a non-finite loss or
/// gradient before the weights change). Returns the metrics with `loss` and `grad_norm`, and the tokens.
fn step_on(obj: &mut dyn Objective, idx: &[usize], info: &StepInfo) -> Result<StepOut> {
    let out = obj.forward(idx)?;
    let mut step = info.step_with(obj.optimizer_mut());
    let loss = step.backward(&out.loss)?;
    let grad_norm = step.update()?;
    let mut metrics = out.metrics;
    metrics.insert("loss".into(), loss);
    metrics.insert("grad_norm".into(), grad_norm);
    Ok(StepOut {
        metrics,
        num_tokens: out.num_tokens as u64,
        ..Default::default()
    })
}

/// An [`Objective`] as the core loop drives it.
struct PrefTrainer<'a>(&'a mut dyn Objective);

impl Trainer for PrefTrainer<'_> {
    fn num_examples(&self) -> usize {
        self.0.num_examples()
    }
    fn train_step(&mut self, idx: &[usize], info: &StepInfo) -> Result<StepOut> {
        step_on(&mut *self.0, idx, info)
    }
    fn evaluate(&mut self) -> Result<Option<Metrics>> {
        self.0.evaluate()
    }
    fn optimizer(&self) -> &AdamW {
        self.0.optimizer()
    }
    fn optimizer_mut(&mut self) -> &mut AdamW {
        self.0.optimizer_mut()
    }
    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.0.save(dir)
    }
    fn save_final(&mut self, dir: &Path) -> Result<()> {
        self.0.save_final(dir)
    }
    fn lora(&self) -> Option<&Lora> {
        self.0.lora()
    }
}

/// The core loop ([`crate::trainer::run`]) over `obj` with the settings of `cfg`.
/// With `cfg.train.resume` it continues the newest checkpoint exactly where it stopped.
pub fn train_loop(obj: &mut dyn Objective, cfg: &PrefConfig) -> Result<PrefSummary> {
    let output_dir = cfg.train.output_dir.clone();
    let resume_from = if cfg.train.resume {
        Some(checkpoint::resume_dir(&output_dir)?)
    } else {
        None
    };
    let config = serde_json::to_value(cfg).expect("config serialises");
    let settings = crate::trainer::LoopSettings::new(
        cfg.train.clone(),
        resume_from,
        cfg.batch_size,
        config,
        checkpoint::RESUME_FREE_KEYS.to_vec(),
    );
    let r = crate::trainer::run(&mut PrefTrainer(obj), &settings)?;
    let mut final_metrics = r.final_metrics;
    let final_loss = final_metrics.remove("loss").unwrap_or(f64::NAN);
    for k in ["grad_norm", "step_time_s"] {
        final_metrics.remove(k);
    }
    Ok(PrefSummary {
        steps: r.steps,
        train_loss: r.train_loss,
        final_loss,
        final_metrics,
        eval: r.eval,
        num_tokens: r.num_tokens,
        train_runtime_s: r.train_runtime_s,
        output_dir,
        metrics_file: r.metrics_file,
        resumed_from_step: r.resumed_from_step,
    })
}

/// Times `steps` optimizer steps of `obj` on 8-example batches (after `warmup` untimed ones): median s/step,
/// tokens/s (chosen + rejected counted once, as TRL) and peak RSS.
pub(crate) fn bench_steps(
    obj: &mut dyn Objective,
    steps: usize,
    warmup: usize,
    lr: f64,
) -> Result<Value> {
    use crate::bench::{cpu_snapshot, median, peak_rss_mb};
    let n = obj.num_examples();
    let (mut times, mut tokens, mut total_s, mut cpu_start) = (Vec::new(), 0usize, 0.0, None);
    for s in 0..steps + warmup {
        if s == warmup {
            cpu_start = cpu_snapshot();
        }
        let idx: Vec<usize> = (0..8).map(|j| (s * 8 + j) % n).collect();
        let t0 = Instant::now();
        let none = None;
        let info = StepInfo {
            step: s as u64 + 1,
            lr,
            max_grad_norm: None,
            last_checkpoint: &none,
        };
        let tok = step_on(obj, &idx, &info)?.num_tokens;
        let dt = t0.elapsed().as_secs_f64();
        if s >= warmup {
            times.push(dt);
            tokens += tok as usize;
            total_s += dt;
        }
    }
    // As bench-trl: CPU used by other processes meanwhile (cores; > 0.2 = contaminated) and our own CPU time.
    let (other_cores, own_cpu_per_step) = match (cpu_start, cpu_snapshot()) {
        (Some((busy0, own0)), Some((busy1, own1))) => (
            Some((((busy1 - busy0) - (own1 - own0)) / total_s).max(0.0)),
            Some((own1 - own0) / steps as f64),
        ),
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
        "threads": rlhf_model::par::threads(),
        "peak_rss_mb": peak_rss_mb(),
    }))
}
