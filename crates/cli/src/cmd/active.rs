//! `rlhf sandbox active-learning`: random vs uncertainty-sampled labels, the reward model's held-out
//! accuracy against gold at each budget ([`rlhf_sandbox::active`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use rlhf_sandbox::active::{markdown, run as run_active, ActiveConfig};

#[derive(ClapArgs)]
pub struct Args {
    /// Run directory (replaced): active_learning.json, .md and .html.
    #[arg(long, default_value = "runs/active-learning")]
    pub out: PathBuf,
    /// The test-sized budget (one seed, tiny models) instead of the standard one.
    #[arg(long)]
    pub quick: bool,
    /// Seeds, comma-separated (each a full experiment; for the presets).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Option<Vec<u64>>,
    /// A JSON configuration instead of a preset; print one with --print-config.
    #[arg(long, conflicts_with = "quick")]
    pub config: Option<PathBuf>,
    /// Print the configuration that would run (JSON) and exit.
    #[arg(long)]
    pub print_config: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut cfg: ActiveConfig = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!("{}: not an active-learning configuration", path.display())
            })?
        }
        None if a.quick => ActiveConfig::quick(),
        None => ActiveConfig::standard(),
    };
    if let Some(seeds) = a.seeds {
        cfg.seeds = seeds;
    }
    if a.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let summary = run_active(&cfg, &a.out)?;
    println!("{}", markdown(&summary));
    println!(
        "json:   {}\nreport: {}",
        a.out.join("active_learning.json").display(),
        a.out.join("active_learning.html").display()
    );
    Ok(())
}
