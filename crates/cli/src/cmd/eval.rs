//! `rlhf eval`: policies on held-out prompts — mean reward with 95 % intervals per reward source, win rates,
//! KL to a reference, length, distinct-1/2 and token entropy; summary JSON and optionally an HTML report.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;
use rlhf_eval::report::{self, Report};
use rlhf_eval::{evaluate, read_prompt_rows, EvalConfig, ModelSpec, Summary};
use rlhf_sandbox::source::reward_source;

use super::generate::write_atomic;

#[derive(ClapArgs)]
pub struct Args {
    /// Model directory to evaluate (repeatable); `NAME=DIR` sets its label (default: the directory name).
    #[arg(long = "model", required = true)]
    pub models: Vec<String>,
    /// Prompts JSONL: a string `prompt` per row plus any columns reward sources read (e.g. `id`, `answer`).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Reward source (repeatable): `gold` (the sandbox's gold reward, from PROMPTS.gold.jsonl next to the
    /// prompts), `gold:FILE`, `exact:COLUMN` (1 when the completion equals the row's COLUMN), or a trainer's
    /// source: `rm:DIR`, `regex:PATTERN`, `length:COEF`, `cmd:COMMAND` (optionally weighted, `0.5*rm:DIR`).
    #[arg(long = "reward", required = true)]
    pub rewards: Vec<String>,
    /// Reference model for the KL column (same tokenizer).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Summary JSON to write.
    #[arg(long, default_value = "eval_summary.json")]
    pub out: PathBuf,
    /// Also write a self-contained HTML report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Evaluate on the first N prompts only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Sampling temperature (0 = greedy); KL and entropy are of the T = 1 distribution.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn model_spec(s: &str) -> ModelSpec {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !name.contains('/') => ModelSpec {
            name: name.into(),
            dir: dir.into(),
        },
        _ => {
            let dir = PathBuf::from(s);
            let name = dir
                .file_name()
                .map_or_else(|| s.to_string(), |n| n.to_string_lossy().into_owned());
            ModelSpec { name, dir }
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let mut models: Vec<ModelSpec> = a.models.iter().map(|m| model_spec(m)).collect();
    for i in 1..models.len() {
        if models[..i].iter().any(|m| m.name == models[i].name) {
            models[i].name = format!("{}#{}", models[i].name, i + 1);
        }
    }
    let mut rows = read_prompt_rows(&a.prompts)?;
    if let Some(n) = a.limit {
        rows.truncate(n.max(1));
    }
    let first = &models[0].dir;
    let rewards = a
        .rewards
        .iter()
        .map(|r| reward_source(r, &a.prompts, first, 1024))
        .collect::<Result<Vec<_>>>()?;
    let cfg = EvalConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        batch_size: a.batch_size,
        ..EvalConfig::default()
    };
    let summary = evaluate(&models, a.reference.as_deref(), &rows, &rewards, &cfg)?;
    print_table(&summary);
    write_atomic(&a.out, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    println!("summary: {}", a.out.display());
    if let Some(path) = &a.report {
        let intro = format!(
            "<p>Prompts: <code>{}</code>.</p>",
            report::esc(&a.prompts.display().to_string())
        );
        let html = report::render(&Report {
            title: "rlhf eval".into(),
            intro,
            sections: report::eval_sections(&summary),
        });
        write_atomic(path, html.as_bytes())?;
        println!("report: {}", path.display());
    }
    Ok(())
}

fn print_table(s: &Summary) {
    for (i, source) in s.models[0].rewards.iter().map(|r| &r.source).enumerate() {
        println!("\nreward {source} on {} prompts: mean [95 % CI]", s.prompts);
        for m in &s.models {
            let e = m.rewards[i].reward;
            println!(
                "  {:<16} {:>7.3} [{:.3}, {:.3}]  n={}",
                m.name, e.mean, e.ci_low, e.ci_high, e.n
            );
        }
    }
    println!(
        "\n{:<16} {:>10} {:>9} {:>11} {:>11} {:>9}",
        "model", "KL to ref", "tokens", "distinct-1", "distinct-2", "entropy"
    );
    for m in &s.models {
        let kl = m
            .kl_to_reference
            .map_or("-".into(), |k| format!("{:.3}", k.mean));
        println!(
            "{:<16} {:>10} {:>9.1} {:>11.3} {:>11.3} {:>9.3}",
            m.name, kl, m.length_tokens.mean, m.distinct_1, m.distinct_2, m.token_entropy
        );
    }
    for w in &s.win_rates {
        println!(
            "win rate {} vs {} ({}): {:.1} % of {} prompts",
            w.model,
            w.versus,
            w.source,
            100.0 * w.win_rate,
            w.n
        );
    }
}
