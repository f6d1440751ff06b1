//! `rlhf bench grpo|rloo|ppo`: the online-RL trainers on `../shared/bench-trl`'s tiny Llama shape with its
//! settings, through the real CLI code path (settings → rollouts → rewards → optimizer → metrics), reporting
//! seconds per step, tokens/s (prompt + completion tokens of every rollout, TRL's counter) and the
//! generation / scoring / training split of a step. GRPO and RLOO: 8 prompts × 4 generations × 8 new tokens,
//! T = 1, lr 1e-4, reward 1 iff the leading integer is the sum. PPO: 32 rollouts × 8 new tokens, 4 epochs,
//! 1 mini-batch, kl 0.05, lr 1e-5, a reward model of the same shape that also initialises the value model.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_model::seq_cls::SeqCls;
use rlhf_model::CausalLm;
use serde_json::{json, Value};

use crate::bench::{cpu_snapshot, mean, median, peak_rss_mb, percentile};
use crate::error::{io_err, Result, TrainError};
use crate::online::OnlineSummary;
use crate::settings::load;

const WARMUP: usize = 5;

fn model_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Model(e.to_string())
}

/// Writes a random-init tiny Llama as `dir/policy` unless `policy` is given (and, when `with_rm`, a reward model
/// of the same shape as `dir/rm` unless `rm` is given), each with the tokenizer of `tokenizer_dir`; returns the
/// policy and reward-model directories to train with.
fn make_models(
    dir: &Path,
    tokenizer_dir: &Path,
    with_rm: bool,
    policy: Option<&Path>,
    rm: Option<&Path>,
) -> Result<(PathBuf, PathBuf)> {
    let copy_tok = |to: &Path| crate::trainer::copy_tokenizer(tokenizer_dir, to);
    let dirs = (
        policy.map_or_else(|| dir.join("policy"), Path::to_path_buf),
        rm.map_or_else(|| dir.join("rm"), Path::to_path_buf),
    );
    if policy.is_none() {
        let lm = CausalLm::init_random(rlhf_model::bench::tiny_llama_config(), 1234, &Device::Cpu)
            .map_err(model_err)?;
        lm.save(&dirs.0).map_err(model_err)?;
        copy_tok(&dirs.0)?;
    }
    if with_rm && rm.is_none() {
        let lm = CausalLm::init_random(rlhf_model::bench::tiny_llama_config(), 4321, &Device::Cpu)
            .map_err(model_err)?;
        SeqCls::from_causal_lm(lm, 1, Some(0), 4321)
            .and_then(|m| m.save(&dirs.1))
            .map_err(model_err)?;
        copy_tok(&dirs.1)?;
    }
    Ok(dirs)
}

/// Runs `algo` ("grpo", "rloo" or "ppo") for `steps` timed steps after the warm-up; one JSON object.
/// `precision` bf16 runs the trainer with `--bf16` (policy, reference and rollouts). `policy` / `rm`: model
/// directories to start from instead of random-init ones (bench-trl's SFT checkpoint and reward model).
#[allow(clippy::too_many_arguments)]
pub fn bench_online(
    algo: &str,
    tokenizer_dir: &Path,
    prompts: &Path,
    steps: usize,
    precision: rlhf_model::Precision,
    backend: rlhf_model::Backend,
    policy: Option<&Path>,
    rm: Option<&Path>,
) -> Result<Value> {
    rlhf_model::tune_allocator();
    let tmp = std::env::temp_dir().join(format!("rlhf-bench-{algo}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let (policy_dir, rm_dir) = make_models(&tmp, tokenizer_dir, algo == "ppo", policy, rm)?;
    let total = (steps + WARMUP).to_string();
    let s = |p: &Path| p.display().to_string();
    let mut flags: Vec<String> = vec![
        "--model".into(),
        s(&policy_dir),
        "--prompts".into(),
        s(prompts),
        "--output-dir".into(),
        s(&tmp.join("out")),
        "--max-new-tokens".into(),
        "8".into(),
        "--temperature".into(),
        "1.0".into(),
        "--max-steps".into(),
        total,
        "--lr-scheduler-type".into(),
        "constant".into(),
        "--max-prompt-length".into(),
        "64".into(),
    ];
    let more: &[&str] = match algo {
        "grpo" => &[
            "--prompts-per-step",
            "8",
            "--num-generations",
            "4",
            "--learning-rate",
            "1e-4",
            "--reward",
            "exact:answer",
        ],
        "rloo" => &[
            "--prompts-per-step",
            "8",
            "--num-generations",
            "4",
            "--learning-rate",
            "1e-4",
            "--reward",
            "exact:answer",
        ],
        "ppo" => &[
            "--prompts-per-step",
            "32",
            "--num-ppo-epochs",
            "4",
            "--num-mini-batches",
            "1",
            "--kl-coef",
            "0.05",
            "--learning-rate",
            "1e-5",
        ],
        other => {
            return Err(TrainError::Config {
                file: "command line".into(),
                key: "bench".into(),
                msg: format!("unknown trainer {other}"),
            })
        }
    };
    flags.extend(more.iter().map(|x| x.to_string()));
    if algo == "ppo" {
        flags.extend(["--reward".into(), format!("rm:{}", s(&rm_dir))]);
    }
    if precision == rlhf_model::Precision::Bf16 {
        flags.push("--bf16".into());
    }
    flags.extend(["--backend".into(), backend.name().into()]);
    let argv: Vec<OsString> = flags.into_iter().map(Into::into).collect();
    let settings_err = TrainError::from;
    let cpu_start = cpu_snapshot();
    let summary: OnlineSummary = match algo {
        "grpo" => crate::grpo::run_grpo(&load(algo, &argv).map_err(settings_err)?)?,
        "rloo" => crate::rloo::run_rloo(&load(algo, &argv).map_err(settings_err)?)?,
        _ => crate::ppo::run_ppo(&load(algo, &argv).map_err(settings_err)?)?,
    };
    let cpu_end = cpu_snapshot();
    let lines: Vec<Value> = std::fs::read_to_string(&summary.metrics_file)
        .map_err(io_err(&summary.metrics_file))?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &Value| v.get("timing/step_s").is_some())
        .collect();
    let timed = &lines[WARMUP.min(lines.len())..];
    let col = |k: &str| {
        timed
            .iter()
            .filter_map(|v| v.get(k).and_then(Value::as_f64))
            .collect::<Vec<f64>>()
    };
    let step_s = col("timing/step_s");
    let tokens = col("step_tokens");
    let _ = std::fs::remove_dir_all(&tmp);
    // CPU-seconds of this process per step over the whole run (warm-up steps included: the run is one call),
    // which a busy machine disturbs less than wall time.
    let own_cpu = match (cpu_start, cpu_end) {
        (Some((_, own0)), Some((_, own1))) => Some((own1 - own0) / lines.len().max(1) as f64),
        _ => None,
    };
    Ok(json!({
        "bench": algo,
        "shape": "tiny-llama",
        "precision": precision.name(),
        "backend": backend.name(),
        "init": policy.map_or("random".into(), |p| p.display().to_string()),
        "steps": timed.len(),
        "sec_per_step_median": median(step_s.clone()),
        // The mean and 90th percentile beside the median: tokens/s (total over total, as bench-trl counts
        // it) weighs in slow steps, which this box's spread makes many; bench-trl reports the same fields.
        "sec_per_step_mean": mean(&step_s),
        "sec_per_step_p90": percentile(step_s.clone(), 0.9),
        "tokens_per_step_mean": mean(&tokens),
        "tokens_per_sec": tokens.iter().sum::<f64>() / step_s.iter().sum::<f64>(),
        "generation_s_median": median(col("timing/generation_s")),
        "scoring_s_median": median(col("timing/scoring_s")),
        "training_s_median": median(col("timing/training_s")),
        "own_cpu_s_per_step": own_cpu,
        "threads": rlhf_model::par::threads(),
        "final_reward": summary.final_metrics.get("reward"),
        "peak_rss_mb": peak_rss_mb(),
    }))
}
