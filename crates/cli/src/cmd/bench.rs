//! `rlhf bench …`: speed and memory, one JSON line per shape on stdout. Compare only against numbers
//! measured in the same run on the same machine (`../shared/bench-trl/run_all.sh` back to back).

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use rlhf_model::{bench, lora::LoraConfig, Backend, CausalLm, ModelConfig, Precision};
use rlhf_train::bench::{bench_sft, peak_rss_mb, BenchData, SftBenchShape};
use serde_json::json;

#[derive(Clone, Copy, PartialEq, ValueEnum)]
pub enum Shape {
    /// The tiny Llama of ../shared/bench-trl (vocab 512, hidden 256, 4 layers, untied).
    Tiny,
    /// SmolLM2-135M's shape, random init.
    Smollm2,
}

impl Shape {
    pub fn config(self) -> ModelConfig {
        match self {
            Shape::Tiny => bench::tiny_llama_config(),
            Shape::Smollm2 => bench::smollm2_135m_config(),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Shape::Tiny => "tiny-llama",
            Shape::Smollm2 => "smollm2-135m",
        }
    }
}

#[derive(ClapArgs)]
pub struct Common {
    /// Shapes to measure (repeatable; default: all the benchmark defines).
    #[arg(long, value_enum)]
    shape: Vec<Shape>,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Matrix products of the linear layers: fp32, or bf16 operands with f32 accumulation.
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// Training steps' forward and backward: the engine, or candle's autograd graph (sft, rm, dpo).
    #[arg(long, default_value = "engine")]
    backend: Backend,
}

impl Common {
    fn shapes(&self) -> Vec<Shape> {
        if self.shape.is_empty() {
            vec![Shape::Tiny, Shape::Smollm2]
        } else {
            self.shape.clone()
        }
    }
}

#[derive(ClapArgs)]
pub struct Training {
    #[command(flatten)]
    common: Common,
    /// Timed optimizer steps (after 5 warm-up steps).
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Byte-level tokenizer for the addition data (vocab 512, as ../shared/bench-trl's).
    #[arg(long, default_value = "fixtures/tokenizer")]
    tokenizer: PathBuf,
    /// Prompt/completion data for the tiny shape's SFT steps.
    #[arg(long, default_value = "data/sft_train.jsonl")]
    data: PathBuf,
    /// Train LoRA adapters of this rank instead of all weights (rm, dpo), to measure the memory saved.
    #[arg(long)]
    lora_r: Option<usize>,
}

#[derive(Subcommand)]
pub enum Bench {
    /// Sampled generation: 32 prompts × 8 tokens → 64 new tokens each, KV cache, T = 1.
    Generate(Common),
    /// GFLOP/s of one matrix product: 1024³, the SmolLM2-135M linear-layer shapes (8 × 128 tokens; 32 rows = decoding)
    /// and the tiny Llama's on 144 rows.
    Gemm(GemmArgs),
    /// SFT steps: tiny = batch 8 addition samples (completion-only loss); smollm2 = batch 8 × 128 random tokens.
    Sft(Training),
    /// Reward-model (Bradley–Terry) steps, 8 pairs each, tiny shape.
    Rm(Training),
    /// DPO (sigmoid, β 0.1) steps, 8 pairs each with a reference forward every step, tiny shape.
    Dpo(Training),
    /// `rlhf serve` under 32 concurrent HTTP clients vs. the same requests through batched generation.
    Serve(crate::cmd::serve::BenchArgs),
    /// GRPO steps as bench-trl's bench_grpo.py: 8 prompts × 4 generations × 8 new tokens, tiny shape.
    Grpo(Online),
    /// RLOO steps with the GRPO benchmark's settings (bench_grpo.py --algo rloo), tiny shape.
    Rloo(Online),
    /// PPO updates as bench-trl's bench_ppo.py: 32 rollouts × 8 new tokens, 4 epochs, 1 mini-batch, tiny shape.
    Ppo(Online),
}

#[derive(ClapArgs)]
pub struct GemmArgs {
    /// fp32, or bf16 operands with f32 accumulation.
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// Timed repetitions per shape (the median is reported).
    #[arg(long, default_value_t = 10)]
    repeats: usize,
}

#[derive(ClapArgs)]
pub struct Online {
    /// Timed steps (after 5 warm-up steps).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Byte-level tokenizer of the addition data (vocab 512, as ../shared/bench-trl's).
    #[arg(long, default_value = "fixtures/tokenizer")]
    tokenizer: PathBuf,
    /// Prompts with an `answer` column.
    #[arg(long, default_value = "data/prompts.jsonl")]
    prompts: PathBuf,
    /// fp32, or bf16 matrix products with f32 accumulation (the trainers' `--bf16`).
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// The trainers' `--backend`: engine, or candle's autograd graph.
    #[arg(long, default_value = "engine")]
    backend: Backend,
    /// Policy (and reference) model directory, e.g. bench-trl's `$TRLBASE/out/sft/final`, so both sides start
    /// from the same weights; default: a random-init tiny Llama (whose completions run to the token limit).
    #[arg(long)]
    model: Option<PathBuf>,
    /// PPO's reward model (and value-model initialisation), e.g. `$TRLBASE/out/rm/final`; default: random init.
    #[arg(long)]
    reward_model: Option<PathBuf>,
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Generate(c) => {
            for shape in c.shapes() {
                println!("{}", bench_generate(shape, c.repeats.max(1), c.precision)?);
            }
        }
        Bench::Gemm(g) => {
            // (m, k, n): C[m, n] = A[m, k] · W[n, k]ᵀ.
            let shapes = [
                (1024, 1024, 1024),
                (1024, 576, 576),
                (1024, 576, 192),
                (1024, 576, 1536),
                (1024, 1536, 576),
                (1024, 576, 256),
                (32, 576, 1536),
                // The tiny Llama's products on one thread's share of an online-RL batch (144 rows):
                // gate/up, down and attention projections, and a weight gradient (k = rows).
                (144, 256, 688),
                (144, 688, 256),
                (144, 256, 256),
                (688, 144, 256),
            ];
            for (m, k, n) in shapes {
                let r = bench::bench_gemm(m, k, n, g.precision, g.repeats);
                println!(
                    "{}",
                    json!({
                        "bench": "gemm", "precision": g.precision.name(), "kernel": kernel_name(g.precision),
                        "m": m, "k": k, "n": n, "sec_median": round(r.seconds, 6), "gflops": round(r.gflops, 1),
                        "gflops_operands_preconverted": round(r.gflops_kernel, 1),
                        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
                    })
                );
            }
        }
        Bench::Sft(t) => {
            for shape in t.common.shapes() {
                reset_peak_rss();
                // Untimed warm-up steps as bench-trl: 5 for the tiny SFT run, 2 in torch_135m.py.
                let (data, warmup_steps, steps) = match shape {
                    Shape::Tiny => (
                        BenchData::Addition {
                            tokenizer_dir: t.tokenizer.clone(),
                            data_file: t.data.clone(),
                        },
                        5,
                        t.steps,
                    ),
                    // A 135M step takes seconds: fewer timed steps.
                    Shape::Smollm2 => (
                        BenchData::Random {
                            seq_len: 128,
                            num_rows: 64,
                        },
                        2,
                        t.steps.min(5),
                    ),
                };
                let mut model = CausalLm::init_random(shape.config(), 1234, &Device::Cpu)?;
                model.set_precision(t.common.precision);
                model.set_backend(t.common.backend);
                let mut v = bench_sft(SftBenchShape {
                    name: shape.name().into(),
                    model,
                    data,
                    batch_size: 8,
                    warmup_steps,
                    steps,
                })?;
                v["precision"] = json!(t.common.precision.name());
                v["bf16_kernel"] = json!(kernel_name(t.common.precision));
                v["backend"] = json!(t.common.backend);
                println!("{v}");
            }
        }
        Bench::Rm(t) | Bench::Dpo(t)
            if t.common.shapes() != [Shape::Tiny] && !t.common.shape.is_empty() =>
        {
            anyhow::bail!("the rm and dpo benchmarks measure the tiny shape only (--shape tiny)")
        }
        Bench::Serve(a) => crate::cmd::serve::bench(a)?,
        Bench::Rm(t) => println!(
            "{}",
            rlhf_train::rm::bench_rm(
                &t.tokenizer,
                t.steps,
                lora(&t).as_ref(),
                t.common.backend,
                t.common.precision
            )?
        ),
        Bench::Dpo(t) => println!(
            "{}",
            rlhf_train::dpo::bench_dpo(
                &t.tokenizer,
                t.steps,
                lora(&t).as_ref(),
                t.common.backend,
                t.common.precision
            )?
        ),
        Bench::Grpo(o) => println!("{}", online("grpo", &o)?),
        Bench::Rloo(o) => println!("{}", online("rloo", &o)?),
        Bench::Ppo(o) => println!("{}", online("ppo", &o)?),
    }
    Ok(())
}

/// One online trainer's steps with the benchmark's settings.
fn online(algo: &str, o: &Online) -> Result<serde_json::Value> {
    Ok(rlhf_train::rl_bench::bench_online(
        algo,
        &o.tokenizer,
        &o.prompts,
        o.steps,
        o.precision,
        o.backend,
        o.model.as_deref(),
        o.reward_model.as_deref(),
    )?)
}

fn lora(t: &Training) -> Option<LoraConfig> {
    t.lora_r.map(|r| LoraConfig {
        r,
        ..Default::default()
    })
}

/// The bf16 kernel this CPU runs (`null` at fp32).
fn kernel_name(p: Precision) -> Option<&'static str> {
    (p == Precision::Bf16).then(|| rlhf_model::bf16::Kernel::detect().name())
}

fn bench_generate(shape: Shape, repeats: usize, precision: Precision) -> Result<serde_json::Value> {
    let (prompts, prompt_len, new) = (32, 8, 64);
    reset_peak_rss();
    let mut model = CausalLm::init_random(shape.config(), 1234, &Device::Cpu)?;
    model.set_precision(precision);
    bench::bench_generate(&model, 2, prompt_len, 4, 0)?; // warm-up
    let mut runs = (0..repeats)
        .map(|i| bench::bench_generate(&model, prompts, prompt_len, new, i as u64))
        .collect::<candle_core::Result<Vec<_>>>()?;
    runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let m = &runs[runs.len() / 2];
    Ok(json!({
        "bench": "generate", "shape": shape.name(), "prompts": prompts, "prompt_tokens": prompt_len,
        "max_new_tokens": new, "new_tokens": m.new_tokens, "sec_median": round(m.seconds, 4),
        "new_tokens_per_sec": round(m.new_tokens_per_sec, 1), "peak_rss_mb": peak_rss_mb().map(|x| round(x, 1)),
        "precision": precision.name(), "bf16_kernel": kernel_name(precision),
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
    }))
}

pub fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// Resets the kernel's peak-RSS counter so each shape reports its own peak (Linux ≥ 4.0).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
