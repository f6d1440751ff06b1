//! `rlhf generate`: prompts JSONL in, completions JSONL out (one row per prompt, input columns kept).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use rlhf_data::load_dataset;
use rlhf_generate::Generator;
use rlhf_model::{GenRequest, Sampling};
use serde_json::{json, Value};

#[derive(ClapArgs)]
pub struct Args {
    /// Model directory (config.json, safetensors, tokenizer files).
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL/Parquet with a `prompt` column (a string, or a list of messages rendered with the chat template).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output JSONL: every input column plus `completion`, `completion_ids`, `logprobs` (T = 1),
    /// `sampling_logprobs` (under `log_softmax(logits / temperature)`, as TRL), `finish_reason`.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// 0 = no top-k truncation.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Request i samples with seed + i (or the row's own integer `seed` column), so reruns reproduce.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the completion ends with this string (repeatable); EOS always stops.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Prompts per generation batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

pub fn run(a: Args) -> Result<()> {
    let generator = Generator::load(&a.model)?;
    let data = load_dataset(&a.prompts)?;
    let mut prompts = Vec::with_capacity(data.rows.len());
    let mut seeds = Vec::with_capacity(data.rows.len());
    for (i, row) in data.rows.iter().enumerate() {
        let prompt = row.record.prompt().with_context(|| {
            format!("{}: {} rows have no `prompt` column to generate from", data.source, data.format)
        })?;
        prompts.push(generator.encode_prompt(prompt)?);
        seeds.push(row.extra.get("seed").and_then(Value::as_u64).unwrap_or(a.seed + i as u64));
    }
    let template = GenRequest {
        max_new_tokens: a.max_new_tokens,
        sampling: Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p },
        stop_strings: a.stop.clone(),
        ..Default::default()
    };
    let outputs = generator.run(&prompts, &seeds, &template, a.batch_size)?;
    let mut text = String::new();
    for (row, (completion, o)) in data.rows.iter().zip(outputs) {
        let mut obj = row.to_json();
        obj.insert("completion".into(), json!(completion));
        obj.insert("completion_ids".into(), json!(o.tokens));
        obj.insert("logprobs".into(), json!(o.logprobs));
        obj.insert("sampling_logprobs".into(), json!(o.sampling_logprobs));
        obj.insert("finish_reason".into(), json!(format!("{:?}", o.finish_reason).to_lowercase()));
        text.push_str(&serde_json::to_string(&obj)?);
        text.push('\n');
    }
    write_atomic(&a.out, text.as_bytes())?;
    eprintln!("wrote {} completions to {}", data.rows.len(), a.out.display());
    Ok(())
}

/// Writes via a temp file + rename so an interrupted run never leaves a half-written output.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}
