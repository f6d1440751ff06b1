//! Every kind of feedback trains something (`rlhf transform …`): the feedback app's critique and
//! demonstration exports become rows the existing trainers read unchanged.
//!
//! - critique → revision (Constitutional AI's critique-revision step): the policy rewrites its response
//!   conditioned on the critique, and `revision ≻ original` becomes an explicit preference pair (`rlhf rm`,
//!   `rlhf dpo`);
//! - critique → a generative critic: prompt/completion rows `(prompt + response → critique)` for `rlhf sft`;
//!   the trained critic writes critiques for new responses (`rlhf generate` with the same template);
//! - demonstration → `demonstration ≻ policy sample` pairs for `rlhf rm` / `rlhf dpo` (the demonstrations
//!   themselves train `rlhf sft` as they are).
//!
//! Every output row keeps the input row's provenance columns (`item_id`, `label_ids`, …) and names its
//! `source`. Input errors name the file, line and field.

use std::path::{Path, PathBuf};

use clap::Args;
use rlhf_data::{Dataset, Format, Record, Row, Text};
use rlhf_generate::Generator;
use rlhf_model::{GenRequest, Sampling};
use serde_json::{json, Map, Value};

use crate::error::{io_err, Result, TrainError};
use crate::pref_data::data_err;

/// What the policy is asked when it revises (Constitutional AI's revision request, in plain text).
pub const REVISION_TEMPLATE: &str =
    "{prompt}\nDraft:{response}\nCritique: {critique}\nRevised reply:";
/// What the critic sees; its completion is the critique.
pub const CRITIC_TEMPLATE: &str = "{prompt}\nResponse:{response}\nCritique:";
/// Starts the critic's last line, `Score: N` with N in 1..=9, when critic-sft is given a score column: the
/// verdict the critic judge (`judge:…,mode=critic`) reads.
pub const VERDICT_PREFIX: &str = "Score:";
/// The verdict scale (single digits: one token in any tokenizer).
pub const VERDICT_SCALE: std::ops::RangeInclusive<i64> = 1..=9;

/// Sampling of the policy's revisions or samples.
#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    /// Policy model directory.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Row i samples with seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

/// `rlhf transform revise`.
#[derive(Debug, Clone, Args)]
pub struct ReviseArgs {
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Critique rows `{"prompt", "completion", "critique"}` (`rlhf feedback export --format critique`).
    #[arg(long)]
    pub critiques: PathBuf,
    /// Output JSONL: explicit preference rows `{"prompt", "chosen": revision, "rejected": completion}`.
    #[arg(long)]
    pub out: PathBuf,
    /// The revision request; `{prompt}`, `{response}` and `{critique}` are replaced.
    #[arg(long, default_value = REVISION_TEMPLATE)]
    pub template: String,
    /// Leave out rows whose critique contains this text (e.g. "nothing to fix"); repeatable.
    #[arg(long = "skip-containing")]
    pub skip_containing: Vec<String>,
}

/// `rlhf transform critic-sft`.
#[derive(Debug, Clone, Args)]
pub struct CriticArgs {
    /// Critique rows `{"prompt", "completion", "critique"}`.
    #[arg(long)]
    pub critiques: PathBuf,
    /// Output JSONL: prompt/completion rows, prompt = the template, completion = " " + critique.
    #[arg(long)]
    pub out: PathBuf,
    /// The critic's input; `{prompt}` and `{response}` are replaced.
    #[arg(long, default_value = CRITIC_TEMPLATE)]
    pub template: String,
    /// A column holding the response's score, an integer 1..=9 (e.g. a rating of the same response): the
    /// completion then ends in a verdict line `Score: N`, which makes the trained critic usable as a judge.
    #[arg(long, value_name = "COLUMN")]
    pub score_column: Option<String>,
}

/// `rlhf transform demo-pairs`.
#[derive(Debug, Clone, Args)]
pub struct DemoPairsArgs {
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Demonstration rows `{"prompt", "completion"}` (`rlhf feedback export --format demonstration`).
    #[arg(long)]
    pub demonstrations: PathBuf,
    /// Output JSONL: `{"prompt", "chosen": demonstration, "rejected": policy sample}`.
    #[arg(long)]
    pub out: PathBuf,
}

/// What each transform did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TransformSummary {
    pub input_rows: usize,
    pub output_rows: usize,
    /// Rows left out: the critique matched `--skip-containing`, or the policy's text equals the other side.
    pub skipped: usize,
}

/// A prompt/completion file whose rows are plain strings and carry the string column `extra` (if given).
fn load_rows(path: &Path, extra: Option<&str>) -> Result<Dataset> {
    let ds = rlhf_data::load_dataset(path).map_err(data_err)?;
    if ds.format != Format::PromptCompletion {
        return Err(TrainError::Data(format!(
            "{}: expected prompt/completion rows (the feedback app's export), got {}",
            ds.source, ds.format
        )));
    }
    for row in &ds.rows {
        let Record::PromptCompletion(r) = &row.record else {
            unreachable!("checked the format")
        };
        for (field, text) in [("prompt", &r.prompt), ("completion", &r.completion)] {
            if text.as_plain().is_none() {
                return Err(data_err(ds.row_error(
                    row,
                    Some(field),
                    "expected a string (message lists are not supported here)",
                )));
            }
        }
        if let Some(col) = extra {
            if !row.extra.get(col).is_some_and(Value::is_string) {
                return Err(data_err(ds.row_error(
                    row,
                    Some(col),
                    "missing or not a string",
                )));
            }
        }
    }
    Ok(ds)
}

/// (prompt, completion) of a row checked by [`load_rows`].
fn texts(row: &Row) -> (&str, &str) {
    let Record::PromptCompletion(r) = &row.record else {
        unreachable!("checked by load_rows")
    };
    (
        r.prompt.as_plain().expect("checked by load_rows"),
        r.completion.as_plain().expect("checked by load_rows"),
    )
}

/// The critique of a row checked by [`load_rows`] with `extra = Some("critique")`.
fn critique(row: &Row) -> &str {
    row.extra
        .get("critique")
        .and_then(Value::as_str)
        .expect("checked by load_rows")
}

fn fill(template: &str, prompt: &str, response: &str, critique: &str) -> String {
    template
        .replace("{prompt}", prompt)
        .replace("{response}", response)
        .replace("{critique}", critique)
}

/// The provenance columns of `row` (everything but the texts) plus the given fields.
fn output_row(row: &Row, source: &str, fields: Vec<(&str, Value)>) -> Map<String, Value> {
    let mut m: Map<String, Value> = fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    m.insert("source".into(), json!(source));
    for (k, v) in &row.extra {
        m.entry(k.clone()).or_insert_with(|| v.clone());
    }
    m
}

/// Writes the rows (all at once, after everything succeeded: a failed run leaves no partial file).
/// Writes `rows` to `path` (JSONL) and says how many of `input_rows` gave no row.
fn write_out(
    path: &Path,
    rows: &[Map<String, Value>],
    input_rows: usize,
) -> Result<TransformSummary> {
    let text: String = rows
        .iter()
        .map(|r| format!("{}\n", Value::Object(r.clone())))
        .collect();
    std::fs::write(path, text).map_err(io_err(path))?;
    Ok(TransformSummary {
        input_rows,
        output_rows: rows.len(),
        skipped: input_rows - rows.len(),
    })
}

/// Completions of the policy for plain-text `prompts`, row i sampled with seed + i.
fn sample(args: &SampleArgs, prompts: &[String]) -> Result<Vec<String>> {
    let model_err =
        |e: anyhow::Error| TrainError::Model(format!("{}: {e:#}", args.model.display()));
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        return Err(TrainError::Config {
            file: "command line".into(),
            key: "temperature".into(),
            msg: format!(
                "{} is not a finite number >= 0 (0 = greedy)",
                args.temperature
            ),
        });
    }
    let g = Generator::load(&args.model).map_err(model_err)?;
    let ids = prompts
        .iter()
        .map(|p| g.encode_prompt(&Text::Plain(p.clone())))
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(model_err)?;
    let seeds: Vec<u64> = (0..prompts.len() as u64)
        .map(|i| args.seed.wrapping_add(i))
        .collect();
    let template = GenRequest {
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            ..Sampling::default()
        },
        ..Default::default()
    };
    Ok(g.run(&ids, &seeds, &template, args.batch_size)
        .map_err(model_err)?
        .into_iter()
        .map(|(t, _)| t)
        .collect())
}

fn same(a: &str, b: &str) -> bool {
    a.trim() == b.trim()
}

/// Critique → the policy's revision → `revision ≻ original` pairs.
pub fn revise(args: &ReviseArgs) -> Result<TransformSummary> {
    let ds = load_rows(&args.critiques, Some("critique"))?;
    let keep: Vec<&Row> = ds
        .rows
        .iter()
        .filter(|r| {
            let c = critique(r);
            !args.skip_containing.iter().any(|s| c.contains(s.as_str()))
        })
        .collect();
    let requests: Vec<String> = keep
        .iter()
        .map(|r| {
            let ((p, c), k) = (texts(r), critique(r));
            fill(&args.template, p, c, k)
        })
        .collect();
    let revisions = sample(&args.sample, &requests)?;
    let rows: Vec<Map<String, Value>> = keep
        .iter()
        .zip(&revisions)
        .filter(|(r, rev)| !rev.trim().is_empty() && !same(rev, texts(r).1))
        .map(|(r, rev)| {
            let (p, c) = texts(r);
            output_row(
                r,
                "critique-revision",
                vec![
                    ("prompt", json!(p)),
                    ("chosen", json!(rev)),
                    ("rejected", json!(c)),
                ],
            )
        })
        .collect();
    write_out(&args.out, &rows, ds.len())
}

/// The verdict line of a critic's completion.
pub fn verdict_line(score: i64) -> String {
    format!("{VERDICT_PREFIX} {score}")
}

/// The score of `row` in `column`: an integer on the verdict scale.
fn score(ds: &Dataset, row: &Row, column: &str) -> Result<i64> {
    match row.extra.get(column).and_then(Value::as_f64) {
        Some(s) if s.fract() == 0.0 && VERDICT_SCALE.contains(&(s as i64)) => Ok(s as i64),
        _ => Err(data_err(ds.row_error(
            row,
            Some(column),
            format!(
                "expected an integer score {}..={}",
                VERDICT_SCALE.start(),
                VERDICT_SCALE.end()
            ),
        ))),
    }
}

/// Critique rows → SFT rows of a generative critic (ending in a verdict line when `score_column` is given).
pub fn critic_sft(args: &CriticArgs) -> Result<TransformSummary> {
    let ds = load_rows(&args.critiques, Some("critique"))?;
    let rows: Vec<Map<String, Value>> = ds
        .rows
        .iter()
        .map(|r| {
            let ((p, c), k) = (texts(r), critique(r));
            let completion = match &args.score_column {
                Some(col) => format!(" {}\n{}", k.trim(), verdict_line(score(&ds, r, col)?)),
                None => format!(" {}", k.trim()),
            };
            Ok(output_row(
                r,
                "critic",
                vec![
                    ("prompt", json!(fill(&args.template, p, c, ""))),
                    ("completion", json!(completion)),
                ],
            ))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .map(|mut m| {
            // The critique is now the completion; a copy under its old name would only confuse format detection.
            m.remove("critique");
            m
        })
        .collect();
    write_out(&args.out, &rows, ds.len())
}

/// Demonstrations → `demonstration ≻ policy sample` pairs.
pub fn demo_pairs(args: &DemoPairsArgs) -> Result<TransformSummary> {
    let ds = load_rows(&args.demonstrations, None)?;
    let prompts: Vec<String> = ds.rows.iter().map(|r| texts(r).0.to_string()).collect();
    let samples = sample(&args.sample, &prompts)?;
    let rows: Vec<Map<String, Value>> = ds
        .rows
        .iter()
        .zip(&samples)
        .filter(|(r, s)| !same(s, texts(r).1))
        .map(|(r, s)| {
            let (p, demo) = texts(r);
            output_row(
                r,
                "demonstration-vs-policy",
                vec![
                    ("prompt", json!(p)),
                    ("chosen", json!(demo)),
                    ("rejected", json!(s)),
                ],
            )
        })
        .collect();
    write_out(&args.out, &rows, ds.len())
}
