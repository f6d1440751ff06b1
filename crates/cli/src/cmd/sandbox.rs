//! `rlhf sandbox`: the whole RLHF loop in the sandbox world (base → SFT → simulated preferences → reward
//! model → policy stages → evaluation), with `summary.json` and `report.html` in `--out`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, Subcommand};
use rlhf_sandbox::pipeline::{default_policy_stages, run as run_pipeline, PipelineConfig};

#[derive(ClapArgs)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub experiment: Option<Experiment>,
    /// Run directory (its earlier results are replaced; a base model built with the same settings is reused).
    #[arg(long, default_value = "runs/sandbox")]
    pub out: PathBuf,
    /// The small budget (≈ 2 minutes in a test build on 2 cores) instead of the standard one.
    #[arg(long)]
    pub quick: bool,
    /// Seed of the world, annotators and training (for the presets; a --config file carries its own).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A JSON pipeline configuration (budgets, model shape, annotator panel) instead of a preset; print one
    /// with --print-config.
    #[arg(long, conflicts_with = "quick")]
    pub config: Option<PathBuf>,
    /// Print the configuration that would run (JSON) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Experiments in the sandbox world besides the pipeline.
#[derive(Subcommand)]
pub enum Experiment {
    /// Random vs uncertainty-sampled pairs: reward-model accuracy against gold per label budget.
    ActiveLearning(super::experiments::Args),
    /// Pairwise vs ratings vs corrections: reward-model accuracy against gold per label.
    FeedbackKinds(super::experiments::Args),
}

pub fn run(a: Args) -> Result<()> {
    match a.experiment {
        Some(Experiment::ActiveLearning(x)) => return super::experiments::active_learning(x),
        Some(Experiment::FeedbackKinds(x)) => return super::experiments::feedback_kinds(x),
        None => {}
    }
    let cfg = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not a sandbox configuration", path.display()))?
        }
        None if a.quick => PipelineConfig::quick(a.seed),
        None => PipelineConfig::standard(a.seed),
    };
    if a.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let summary = run_pipeline(&cfg, &a.out, &default_policy_stages(&cfg))?;
    println!(
        "\ngold reward on {} held-out prompts: mean [95 % CI]",
        summary.eval.prompts
    );
    for m in &summary.eval.models {
        if let Some(r) = m.reward("gold") {
            println!(
                "  {:<8} {:>7.3} [{:.3}, {:.3}]",
                m.name, r.reward.mean, r.reward.ci_low, r.reward.ci_high
            );
        }
    }
    println!();
    for f in &summary.findings {
        println!("- {f}");
    }
    println!(
        "\nsummary: {}\nreport:  {}",
        a.out.join("summary.json").display(),
        a.out.join("report.html").display()
    );
    Ok(())
}
