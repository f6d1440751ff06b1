//! `rlhf bench …`: speed and memory, one JSON line per shape on stdout. Compare only against numbers
//! measured in the same run on the same machine (`../shared/bench-trl/run_all.sh` back to back).

use anyhow::Result;
use candle_core::Device;
use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use rlhf_model::{bench, CausalLm, ModelConfig};
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

#[derive(Subcommand)]
pub enum Bench {
    /// Sampled generation: 32 prompts × 8 tokens → 64 new tokens each, KV cache, T = 1.
    Generate(Common),
}

pub fn run(b: Bench) -> Result<()> {
    match b {
        Bench::Generate(c) => {
            for shape in c.shapes() {
                println!("{}", bench_generate(shape, c.repeats.max(1))?);
            }
        }
    }
    Ok(())
}

fn bench_generate(shape: Shape, repeats: usize) -> Result<serde_json::Value> {
    let (prompts, prompt_len, new) = (32, 8, 64);
    reset_peak_rss();
    let model = CausalLm::init_random(shape.config(), 1234, &Device::Cpu)?;
    bench::bench_generate(&model, 2, prompt_len, 4, 0)?; // warm-up
    let mut runs = (0..repeats)
        .map(|i| bench::bench_generate(&model, prompts, prompt_len, new, i as u64))
        .collect::<candle_core::Result<Vec<_>>>()?;
    runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let m = &runs[runs.len() / 2];
    Ok(json!({
        "bench": "generate", "shape": shape.name(), "prompts": prompts, "prompt_tokens": prompt_len,
        "max_new_tokens": new, "new_tokens": m.new_tokens, "sec_median": round(m.seconds, 4),
        "new_tokens_per_sec": round(m.new_tokens_per_sec, 1), "peak_rss_mb": peak_rss_mb(),
        "threads": candle_core::utils::get_num_threads(),
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

/// Peak resident set size (VmHWM) in MB, or null where /proc is unavailable.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(round(kb / 1024.0, 1))
}
