//! `rlhf generate`: prompts in (a JSONL/Parquet file, JSONL on stdin, or `--prompt TEXT`), completions JSONL
//! out (one row per prompt, every input column kept).

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use rlhf_data::{load_dataset, Dataset, LoadOptions, PromptOnly, Record, Row, Text};
use rlhf_generate::Generator;
use rlhf_model::GenRequest;
use serde_json::json;

use super::sampling::{bad, SamplingArgs};

/// Where the generated text goes unless `--completion-column` says otherwise.
const COMPLETION: &str = "completion";
/// Where it goes when the input rows have a `completion` column of their own (e.g. reference answers).
const GENERATED: &str = "generated";
/// The other columns generate adds to every row.
const OUTPUT_COLUMNS: [&str; 4] = [
    "completion_ids",
    "logprobs",
    "sampling_logprobs",
    "finish_reason",
];

#[derive(ClapArgs)]
pub struct Args {
    /// Model directory (config.json, safetensors, tokenizer files).
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL/Parquet with a `prompt` column (a string, or a list of messages rendered with the chat template);
    /// `-` reads JSONL from stdin.
    #[arg(long, required_unless_present = "prompt", conflicts_with = "prompt")]
    pub prompts: Option<PathBuf>,
    /// One prompt given on the command line (instead of --prompts).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Output JSONL (stdout when not given): every input column plus the completion (see
    /// --completion-column), `completion_ids`, `logprobs` (T = 1), `sampling_logprobs` (under
    /// `log_softmax(logits / temperature)`, as TRL), `finish_reason`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Column of the generated text [default: `completion`, or `generated` when the input rows have a
    /// `completion` column, which is kept]. A name the input already has is refused.
    #[arg(long)]
    pub completion_column: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Request i samples with seed + i (or the row's own integer `seed` column), so reruns reproduce.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts per generation batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Matrix products of the linear layers: fp32, or bf16 weights/activations with f32 accumulation.
    #[arg(long, default_value = "fp32")]
    pub precision: rlhf_model::Precision,
}

impl Args {
    /// Refuses sampling settings that can only produce garbage, naming the flag.
    fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.batch_size == 0 {
            return Err(bad("batch-size", "must be at least 1".into()));
        }
        if self.max_new_tokens == 0 {
            return Err(bad("max-new-tokens", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// The prompts of `--prompt`, `--prompts -` (stdin) or `--prompts FILE`.
fn read_prompts(a: &Args) -> Result<Dataset> {
    match (&a.prompt, &a.prompts) {
        (Some(text), _) => {
            let row = Row::new(Record::PromptOnly(PromptOnly {
                prompt: Text::Plain(text.clone()),
            }));
            Ok(Dataset::from_rows("--prompt", vec![row])?)
        }
        (None, Some(p)) if p.as_os_str() == "-" => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("stdin: cannot read")?;
            Ok(Dataset::parse_jsonl(
                "<stdin>",
                &bytes,
                &LoadOptions::default(),
            )?)
        }
        (None, Some(p)) => Ok(load_dataset(p)?),
        (None, None) => unreachable!("clap requires --prompts or --prompt"),
    }
}

/// The column of the generated text; refuses one that would overwrite an input column.
fn completion_column(a: &Args, data: &Dataset) -> Result<String> {
    let columns: Vec<_> = data.rows.iter().map(|r| r.to_json()).collect();
    let column = match &a.completion_column {
        Some(c) => c.clone(),
        None if columns.iter().any(|c| c.contains_key(COMPLETION)) => GENERATED.to_string(),
        None => COMPLETION.to_string(),
    };
    for (row, cols) in data.rows.iter().zip(&columns) {
        if let Some(key) = std::iter::once(column.as_str())
            .chain(OUTPUT_COLUMNS)
            .find(|k| cols.contains_key(*k))
        {
            let hint = if key == column {
                "choose another --completion-column"
            } else {
                "rename or drop it"
            };
            let msg = format!(
                "the input already has a column \"{key}\" that generate would overwrite; {hint}"
            );
            return Err(data.row_error(row, Some(key), msg).into());
        }
    }
    Ok(column)
}

pub fn run(a: Args) -> Result<()> {
    a.validate()?;
    let mut generator = Generator::load(&a.model)?;
    generator.model.set_precision(a.precision);
    let data = read_prompts(&a)?;
    let column = completion_column(&a, &data)?;
    let context = generator.model.config().max_position_embeddings();
    // A multi-megabyte prompt would cost gigabytes to tokenize before the context check below refuses it.
    data.check_text_size(
        &generator.tokenizer,
        context,
        "the model's max_position_embeddings",
        &["prompt"],
    )?;
    let mut prompts = Vec::with_capacity(data.rows.len());
    let mut seeds = Vec::with_capacity(data.rows.len());
    for (i, row) in data.rows.iter().enumerate() {
        let prompt = row.record.prompt().with_context(|| {
            format!(
                "{}: {} rows have no `prompt` column to generate from",
                data.source, data.format
            )
        })?;
        let ids = generator.encode_prompt(prompt)?;
        let row_err = |msg: String| data.row_error(row, Some("prompt"), msg);
        if ids.is_empty() {
            return Err(row_err("the prompt is empty (no token to generate from)".into()).into());
        }
        if ids.len() + a.max_new_tokens > context {
            return Err(row_err(format!(
                "{} prompt tokens + --max-new-tokens {} exceed the model's max_position_embeddings {context}",
                ids.len(),
                a.max_new_tokens
            ))
            .into());
        }
        prompts.push(ids);
        let seed = match row.extra.get("seed") {
            None => a.seed + i as u64,
            Some(v) => v.as_u64().ok_or_else(|| {
                data.row_error(
                    row,
                    Some("seed"),
                    format!("expected a non-negative integer, got {v}"),
                )
            })?,
        };
        seeds.push(seed);
    }
    let template = GenRequest {
        max_new_tokens: a.max_new_tokens,
        sampling: a.sampling.sampling(),
        stop_strings: a.sampling.stop.clone(),
        ..Default::default()
    };
    let outputs = generator.run(&prompts, &seeds, &template, a.batch_size)?;
    let mut text = String::new();
    for (row, (completion, o)) in data.rows.iter().zip(outputs) {
        // NaN/inf weights give NaN log-probs (and token 0 as the argmax of NaNs): refuse, not garbage.
        if o.logprobs.iter().any(|l| !l.is_finite()) {
            let msg = "the model produced non-finite log-probabilities (NaN or inf weights?); nothing written";
            return Err(anyhow::anyhow!(
                "{}: {msg}",
                a.model.join("model.safetensors").display()
            ));
        }
        let mut obj = row.to_json();
        obj.insert(column.clone(), json!(completion));
        obj.insert("completion_ids".into(), json!(o.tokens));
        obj.insert("logprobs".into(), json!(o.logprobs));
        obj.insert("sampling_logprobs".into(), json!(o.sampling_logprobs));
        obj.insert(
            "finish_reason".into(),
            json!(format!("{:?}", o.finish_reason).to_lowercase()),
        );
        text.push_str(&serde_json::to_string(&obj)?);
        text.push('\n');
    }
    match &a.out {
        Some(out) => {
            write_atomic(out, text.as_bytes())?;
            eprintln!(
                "wrote {} completions (column \"{column}\") to {}",
                data.rows.len(),
                out.display()
            );
        }
        None => std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .context("stdout: cannot write")?,
    }
    Ok(())
}

/// Writes via a temp file + rename so an interrupted run never leaves a half-written output.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}
