//! `rlhf demo`: the quick-start on bundled data. Creates a tiny model and tokenizer, measures its answers on
//! held-out addition problems, fine-tunes it on demonstrations (SFT), and measures again.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use rlhf_data::{load_dataset, Record, Text};
use rlhf_model::{GenRequest, Sampling};
use rlhf_train::{run_sft, SftConfig};
use serde_json::json;

use super::generate::write_atomic;
use rlhf_generate::Generator;
use super::init::{self, Preset};

/// The bundled addition task ("Q: 17+25=" → " 42"), embedded so the demo runs from any directory.
const BUNDLED: [(&str, &str); 2] = [
    ("sft_train.jsonl", include_str!("../../../../data/sft_train.jsonl")),
    ("sft_eval.jsonl", include_str!("../../../../data/sft_eval.jsonl")),
];

#[derive(ClapArgs)]
pub struct Args {
    /// Working directory for data, models and the summary (replaced if it holds an earlier demo).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// SFT optimizer steps.
    #[arg(long, default_value_t = 400)]
    pub steps: u64,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub learning_rate: f64,
    /// Held-out prompts scored before and after.
    #[arg(long, default_value_t = 200)]
    pub eval_prompts: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokenizer vocabulary (260 = the 256 bytes + 4 special tokens, no merges).
    #[arg(long, default_value_t = 260)]
    pub vocab_size: usize,
}

pub fn run(a: Args) -> Result<()> {
    if a.out.join("summary.json").exists() {
        std::fs::remove_dir_all(&a.out).with_context(|| format!("{}: cannot clear the old demo", a.out.display()))?;
    }
    let data = a.out.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("{}: cannot create", data.display()))?;
    for (name, text) in BUNDLED {
        std::fs::write(data.join(name), text).with_context(|| format!("{}: cannot write", data.join(name).display()))?;
    }
    let base = a.out.join("base");
    eprintln!("[1/4] init: tiny Llama + byte-level BPE tokenizer trained on the demonstrations → {}", base.display());
    init::init(&init::Args {
        out: base.clone(),
        preset: Some(Preset::TinyLlama),
        config: None,
        corpus: vec![data.join("sft_train.jsonl")],
        // Bytes and specials only: one token per digit, which a tiny model learns arithmetic on more easily.
        vocab_size: a.vocab_size,
        add_bos: false,
        seed: a.seed,
    })?;

    let prompts = data.join("sft_eval.jsonl");
    eprintln!("[2/4] answers of the random model on {} held-out problems", a.eval_prompts);
    let before = score(&base, &prompts, a.eval_prompts)?;

    let sft_dir = a.out.join("sft");
    eprintln!("[3/4] SFT: {} steps × {} demonstrations → {}", a.steps, a.batch_size, sft_dir.display());
    let mut cfg = SftConfig::with_defaults(base.clone(), data.join("sft_train.jsonl"), sft_dir.clone());
    cfg.eval_file = Some(data.join("sft_eval.jsonl"));
    cfg.max_steps = Some(a.steps);
    cfg.batch_size = a.batch_size;
    cfg.learning_rate = a.learning_rate;
    cfg.lr_scheduler_type = rlhf_train::schedule::ScheduleKind::Cosine;
    cfg.warmup_steps = a.steps / 20;
    cfg.logging_steps = 20;
    cfg.save_steps = 0;
    cfg.seed = a.seed;
    // The demo's working directory is its own: an interrupted earlier demo's SFT run is replaced.
    cfg.overwrite_output_dir = true;
    let summary = run_sft(&cfg)?;

    eprintln!("[4/4] answers of the fine-tuned model");
    let after = score(&sft_dir, &prompts, a.eval_prompts)?;

    println!("\n{:<14} {:>8}  {:<12} {:<12}", "prompt", "answer", "before SFT", "after SFT");
    for (b, f) in before.rows.iter().zip(&after.rows).take(10) {
        println!("{:<14} {:>8}  {:<12} {:<12}", b.0, b.1, format!("{:?}", b.2), format!("{:?}", f.2));
    }
    println!("\non {} held-out problems      before SFT   after SFT", before.rows.len());
    println!("exact match                  {:>9.1}%  {:>9.1}%", 100.0 * before.exact_match, 100.0 * after.exact_match);
    println!("answer is a number           {:>9.1}%  {:>9.1}%", 100.0 * before.numeric, 100.0 * after.numeric);
    println!("mean |error| of numbers      {:>10}  {:>10}", fmt_opt(before.mean_abs_error), fmt_opt(after.mean_abs_error));
    println!("eval loss after SFT: {:.3}", summary.eval.as_ref().map_or(f64::NAN, |e| e.eval_loss));
    let report = json!({
        "before": {"exact_match": before.exact_match, "numeric": before.numeric, "mean_abs_error": before.mean_abs_error},
        "after": {"exact_match": after.exact_match, "numeric": after.numeric, "mean_abs_error": after.mean_abs_error},
        "eval_prompts": before.rows.len(), "sft": summary,
    });
    write_atomic(&a.out.join("summary.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    println!("summary: {}", a.out.join("summary.json").display());
    Ok(())
}

struct Score {
    /// (prompt, expected answer, completion)
    rows: Vec<(String, i64, String)>,
    exact_match: f64,
    /// Share of completions that start with a number.
    numeric: f64,
    /// Mean |answer − expected| over the completions that start with a number.
    mean_abs_error: Option<f64>,
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.1}"))
}

/// Greedy answers to held-out addition demonstrations; a hit is a completion whose leading integer equals the
/// demonstration's.
fn score(model_dir: &Path, prompts: &Path, limit: usize) -> Result<Score> {
    let generator = Generator::load(model_dir)?;
    let data = load_dataset(prompts)?;
    let mut texts = Vec::new();
    let mut answers = Vec::new();
    let mut ids = Vec::new();
    for row in data.rows.iter().take(limit) {
        let Record::PromptCompletion(pc) = &row.record else {
            anyhow::bail!("{}: prompt/completion rows expected", data.source);
        };
        let prompt = &pc.prompt;
        let answer = pc.completion.as_plain().and_then(leading_integer).context("a numeric completion expected")?;
        texts.push(match prompt {
            Text::Plain(s) => s.clone(),
            Text::Messages(_) => String::from("(chat)"),
        });
        answers.push(answer);
        ids.push(generator.encode_prompt(prompt)?);
    }
    let template = GenRequest { max_new_tokens: 6, sampling: Sampling::greedy(), ..Default::default() };
    let seeds = vec![0; ids.len()];
    let outputs = generator.run(&ids, &seeds, &template, 64)?;
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for ((prompt, answer), (completion, _)) in texts.into_iter().zip(answers).zip(outputs) {
        if let Some(n) = leading_integer(&completion) {
            errors.push((n - answer).abs() as f64);
        }
        rows.push((prompt, answer, completion));
    }
    let n = rows.len().max(1) as f64;
    Ok(Score {
        exact_match: errors.iter().filter(|&&e| e == 0.0).count() as f64 / n,
        numeric: errors.len() as f64 / n,
        mean_abs_error: (!errors.is_empty()).then(|| errors.iter().sum::<f64>() / errors.len() as f64),
        rows,
    })
}

fn leading_integer(s: &str) -> Option<i64> {
    let t = s.trim_start();
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    t[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::leading_integer;

    #[test]
    fn leading_integer_reads_the_answer_prefix() {
        assert_eq!(leading_integer(" 42</s>"), Some(42));
        assert_eq!(leading_integer("  7 apples"), Some(7));
        assert_eq!(leading_integer("x42"), None);
        assert_eq!(leading_integer(""), None);
    }
}
