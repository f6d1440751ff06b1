//! SFT step benchmark: median seconds per optimizer step, non-pad tokens per second, peak RSS, and where
//! the step time goes (forward / backward / optimizer), measured the way ../shared/bench-trl does
//! (warm-up steps excluded, wall time between consecutive steps, other processes' CPU use reported).

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rlhf_data::TokenizedSequence;
use rlhf_model::CausalLm;
use serde_json::{json, Value};

use crate::config::SftConfig;
use crate::error::{Result, TrainError};
use crate::schedule::ScheduleKind;
use crate::sft::{SftTrainer, StepStats};

/// What the benchmark trains on.
pub enum BenchData {
    /// A prompt/completion JSONL file tokenized with the tokenizer in `tokenizer_dir`, completion-only
    /// loss, cut to 64 tokens (bench-trl's SFT settings).
    Addition {
        tokenizer_dir: PathBuf,
        data_file: PathBuf,
    },
    /// Uniformly random token ids, every token trained (bench-trl's `torch_135m.py` step).
    Random { seq_len: usize, num_rows: usize },
}

pub struct SftBenchShape {
    pub name: String,
    pub model: CausalLm,
    pub data: BenchData,
    pub batch_size: usize,
    /// Untimed first steps (allocator and cache warm-up): bench-trl skips 5 SFT steps, its
    /// `torch_135m.py` 2.
    pub warmup_steps: usize,
    /// Timed steps.
    pub steps: usize,
}

/// Run the benchmark; one JSON object with the measurements.
pub fn bench_sft(shape: SftBenchShape) -> Result<Value> {
    let SftBenchShape {
        name,
        model,
        data,
        batch_size,
        warmup_steps,
        steps,
    } = shape;
    let steps = steps.max(1);
    let vocab = model.vocab_size();
    let params = model.num_parameters();
    let (rows, pad_id, data_desc) = match &data {
        BenchData::Addition {
            tokenizer_dir,
            data_file,
        } => {
            let tok = rlhf_data::Tokenizer::from_dir(tokenizer_dir)
                .map_err(|e| TrainError::Data(e.to_string()))?;
            let pad = tok.pad_id().map_err(|e| TrainError::Data(e.to_string()))?;
            let dataset =
                rlhf_data::load_dataset(data_file).map_err(|e| TrainError::Data(e.to_string()))?;
            let cfg = rlhf_data::SftConfig {
                max_length: Some(64),
                ..Default::default()
            };
            let rows = rlhf_data::tokenize_sft(&dataset, &tok, &cfg)
                .map_err(|e| TrainError::Data(e.to_string()))?
                .rows;
            (
                rows,
                pad,
                format!("{} (completion-only, max_length 64)", data_file.display()),
            )
        }
        BenchData::Random { seq_len, num_rows } => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
            let rows = (0..*num_rows)
                .map(|_| {
                    let ids: Vec<u32> = (0..*seq_len)
                        .map(|_| rng.gen_range(0..vocab as u32))
                        .collect();
                    let labels = ids.iter().map(|&i| i as i64).collect();
                    TokenizedSequence::new(ids, labels)
                })
                .collect();
            (
                rows,
                0,
                format!("random ids, {seq_len} tokens per row, all trained"),
            )
        }
    };

    let total = warmup_steps + steps;
    let unused = PathBuf::from("/nonexistent");
    let mut cfg = SftConfig::with_defaults(unused.clone(), unused.clone(), unused);
    cfg.batch_size = batch_size;
    cfg.train.learning_rate = 1e-3;
    cfg.train.lr_scheduler_type = ScheduleKind::Constant;
    cfg.train.max_steps = Some(total as u64);
    // The trainer sets up the model from its settings: keep the precision and backend it came with.
    cfg.train.bf16 = model.precision() == rlhf_model::Precision::Bf16;
    cfg.train.backend = model.backend();
    let mut trainer = SftTrainer::from_parts(cfg, model, rows, Vec::new(), pad_id)?;

    let mut stats: Vec<StepStats> = Vec::with_capacity(total);
    let mut wall = Vec::with_capacity(total);
    let mut last = std::time::Instant::now();
    let mut cpu_start = None;
    for i in 0..total {
        if i == warmup_steps {
            cpu_start = Some(cpu_snapshot());
        }
        stats.push(trainer.step()?);
        // Wall time between consecutive steps, as bench-trl's callback measures it.
        wall.push(last.elapsed().as_secs_f64());
        last = std::time::Instant::now();
    }
    let cpu_end = cpu_snapshot();
    let timed = &stats[warmup_steps..];
    let timed_wall = &wall[warmup_steps..];
    let tokens: usize = timed.iter().map(|s| s.num_tokens).sum();
    let pick = |f: fn(&StepStats) -> f64| median(timed.iter().map(f).collect());
    let timed_secs: f64 = timed_wall.iter().sum();
    // bench-trl's contamination check: CPU used by other processes while we ran, in cores.
    let (other_cores, own_cpu_per_step) = match (cpu_start.flatten(), cpu_end) {
        (Some((busy0, own0)), Some((busy1, own1))) => (
            Some((((busy1 - busy0) - (own1 - own0)) / timed_secs).max(0.0)),
            Some((own1 - own0) / timed.len() as f64),
        ),
        _ => (None, None),
    };
    Ok(json!({
        "bench": "sft",
        "shape": name,
        "params": params,
        "batch": batch_size,
        "data": data_desc,
        "steps": steps,
        "sec_per_step_median": median(timed_wall.to_vec()),
        "tokens_per_step_mean": tokens as f64 / timed.len() as f64,
        "tokens_per_sec": tokens as f64 / timed_secs,
        "own_cpu_s_per_step": own_cpu_per_step,
        "other_procs_cpu_cores": other_cores,
        "forward_s_median": pick(|s| s.forward_s),
        "backward_s_median": pick(|s| s.backward_s),
        "optimizer_s_median": pick(|s| s.optimizer_s),
        "first_loss": stats[0].loss,
        "final_loss": stats[total - 1].loss,
        "threads": rlhf_model::par::threads(),
        "peak_rss_mb": peak_rss_mb(),
    }))
}

/// The arithmetic mean (NaN when empty).
pub(crate) fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The nearest-rank `q`-quantile, `q` in (0, 1] (NaN when empty).
pub(crate) fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n => v[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// (CPU-seconds the whole machine was busy, CPU-seconds of this process) from /proc; None off Linux.
pub(crate) fn cpu_snapshot() -> Option<(f64, f64)> {
    // USER_HZ is 100 on every Linux configuration procfs is read with.
    const HZ: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum::<f64>()
        / HZ;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (rest.get(11)?.parse().ok()?, rest.get(12)?.parse().ok()?);
    Some((busy, (utime + stime) / HZ))
}

/// Peak resident set size of this process (VmHWM), in MB; None off Linux.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_time_statistics() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(median(v.clone()), 5.5);
        assert_eq!(mean(&v), 5.5);
        assert_eq!(percentile(v.clone(), 0.9), 9.0);
        assert_eq!(percentile(v.clone(), 1.0), 10.0);
        assert_eq!(percentile(vec![3.0, 1.0, 2.0], 0.5), 2.0);
        assert!(mean(&[]).is_nan() && percentile(vec![], 0.9).is_nan());
    }
}
