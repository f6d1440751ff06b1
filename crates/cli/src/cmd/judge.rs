//! `rlhf judge`: AI-feedback preference labels for pairs of completions from an LLM judge behind an
//! OpenAI-compatible endpoint (e.g. `rlhf serve`) or in a local model directory, or from a trained critic
//! (`--mode critic`). Writes TRL explicit-preference JSONL.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use rlhf_serve::judge::{Api, Judge, JudgeConfig, Mode};
use serde_json::{json, Map, Value};

use crate::cmd::generate::write_atomic;

#[derive(Clone, Copy, ValueEnum)]
pub enum ApiKind {
    Completions,
    Chat,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModeKind {
    /// The judge answers A/B right after the pairwise template.
    Verdict,
    /// A critic (trained on `rlhf transform critic-sft --score-column` rows) critiques each response and ends
    /// with `Score: N`; the higher score wins. An output without that line is an error.
    Critic,
}

#[derive(ClapArgs)]
pub struct Args {
    /// Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000, or a local model directory.
    #[arg(long)]
    pub endpoint: String,
    #[arg(long, env = "RLHF_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Judge model id (default: the endpoint's first model).
    #[arg(long)]
    pub model: Option<String>,
    /// JSONL rows with `prompt` and either `chosen`/`rejected` (agreement with these labels is reported)
    /// or `response_a`/`response_b`. Strings, or message lists (rendered as `role: content` lines).
    #[arg(long)]
    pub pairs: PathBuf,
    /// Output JSONL: `prompt`, `chosen`, `rejected` as the judge prefers, `probability` (that `chosen` is
    /// better, averaged over both presentation orders) and `margin` = logit(probability), plus input columns.
    #[arg(long)]
    pub out: PathBuf,
    /// `completions` sends the filled template as a raw prompt; `chat` as a user message.
    #[arg(long, value_enum, default_value = "completions")]
    pub api: ApiKind,
    /// Rubric file replacing the default constitution-style principles.
    #[arg(long)]
    pub rubric: Option<PathBuf>,
    /// Pairwise template file with {rubric} {prompt} {response_a} {response_b}.
    #[arg(long)]
    pub template: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "verdict")]
    pub mode: ModeKind,
    /// Critic mode: the critic's input template file with {prompt} {response} (default: critic-sft's).
    #[arg(long)]
    pub critic_template: Option<PathBuf>,
    /// Critic mode: tokens of critique and verdict generated (greedy).
    #[arg(long, default_value_t = 64)]
    pub critic_max_tokens: usize,
}

/// A text field as the judge reads it: strings as is, message lists as `role: content` lines.
fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(ms) => ms
            .iter()
            .map(|m| {
                Some(format!(
                    "{}: {}",
                    m.get("role")?.as_str()?,
                    m.get("content")?.as_str()?
                ))
            })
            .collect::<Option<Vec<_>>>()
            .map(|l| l.join("\n")),
        _ => None,
    }
}

pub fn run(a: Args) -> Result<()> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))
    };
    let mut cfg = JudgeConfig {
        model: a.model.clone(),
        api: match a.api {
            ApiKind::Completions => Api::Completions,
            ApiKind::Chat => Api::Chat,
        },
        mode: match a.mode {
            ModeKind::Verdict => Mode::Verdict,
            ModeKind::Critic => Mode::Critic,
        },
        critic_max_tokens: a.critic_max_tokens,
        ..Default::default()
    };
    if let Some(p) = &a.critic_template {
        cfg.critic_template = read(p)?;
    }
    if let Some(p) = &a.rubric {
        cfg.rubric = read(p)?;
    }
    if let Some(p) = &a.template {
        cfg.pairwise_template = read(p)?;
    }
    let src = a.pairs.display().to_string();
    let mut rows = Vec::new();
    for (i, line) in read(&a.pairs)?
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = format!("{src}:{}", i + 1);
        let row: Map<String, Value> =
            serde_json::from_str(line).with_context(|| format!("{at}: not a JSON object"))?;
        let field = |k: &str| {
            row.get(k).map(|v| {
                as_text(v).with_context(|| {
                    format!("{at}: field `{k}` must be a string or a list of messages")
                })
            })
        };
        let prompt = field("prompt").with_context(|| format!("{at}: missing field `prompt`"))??;
        let (a_key, b_key, labelled) =
            match (row.contains_key("chosen"), row.contains_key("response_a")) {
                (true, _) => ("chosen", "rejected", true),
                (false, true) => ("response_a", "response_b", false),
                _ => bail!("{at}: needs `chosen`/`rejected` or `response_a`/`response_b`"),
            };
        let ra = field(a_key).with_context(|| format!("{at}: missing field `{a_key}`"))??;
        let rb = field(b_key).with_context(|| format!("{at}: missing field `{b_key}`"))??;
        rows.push((row, prompt, ra, rb, a_key, b_key, labelled, at));
    }
    let judge = Judge::open(&a.endpoint, a.api_key.clone(), cfg)?;
    let (mut text, mut agree, mut labelled_rows) = (String::new(), 0usize, 0usize);
    for (row, prompt, ra, rb, a_key, b_key, labelled, at) in rows {
        let p = judge
            .compare(&prompt, &ra, &rb)
            .with_context(|| format!("{at}: judging the pair"))?;
        if labelled {
            labelled_rows += 1;
            agree += usize::from(p > 0.5);
        }
        let (chosen, rejected, prob) = if p >= 0.5 {
            (a_key, b_key, p)
        } else {
            (b_key, a_key, 1.0 - p)
        };
        let mut obj = row.clone();
        for k in ["chosen", "rejected", "response_a", "response_b"] {
            obj.remove(k);
        }
        obj.insert("chosen".into(), row[chosen].clone());
        obj.insert("rejected".into(), row[rejected].clone());
        obj.insert("probability".into(), json!(prob));
        let q = prob.clamp(1e-3, 1.0 - 1e-3);
        obj.insert("margin".into(), json!((q / (1.0 - q)).ln()));
        text.push_str(&serde_json::to_string(&obj)?);
        text.push('\n');
    }
    write_atomic(&a.out, text.as_bytes())?;
    let summary = json!({
        "pairs": text.lines().count(), "out": a.out.display().to_string(), "undecided_verdicts": judge.undecided(),
        "agreement_with_input_labels": (labelled_rows > 0).then(|| agree as f64 / labelled_rows as f64),
    });
    println!("{summary}");
    Ok(())
}
