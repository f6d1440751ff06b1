//! `rlhf sandbox active-learning` and `rlhf sandbox feedback-kinds`: label experiments in the sandbox world
//! ([`rlhf_sandbox::active`], [`rlhf_sandbox::kinds`]), with the same flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(ClapArgs)]
pub struct Args {
    /// Run directory (replaced) [default: runs/<experiment>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The test-sized budget (one seed, tiny models) instead of the standard one.
    #[arg(long)]
    pub quick: bool,
    /// Seeds, comma-separated (each a full experiment).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Option<Vec<u64>>,
    /// A JSON configuration instead of a preset; print one with --print-config.
    #[arg(long, conflicts_with = "quick")]
    pub config: Option<PathBuf>,
    /// Print the configuration that would run (JSON) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// One experiment: its presets, where the seeds live, and a run returning the markdown table it printed.
pub struct Experiment<C> {
    pub name: &'static str,
    pub quick: fn() -> C,
    pub standard: fn() -> C,
    pub seeds: fn(&mut C) -> &mut Vec<u64>,
    pub run: fn(&C, &Path) -> Result<String>,
}

pub fn run<C: Serialize + DeserializeOwned>(a: Args, e: Experiment<C>) -> Result<()> {
    let mut cfg: C = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!("{}: not a valid {} configuration", path.display(), e.name)
            })?
        }
        None if a.quick => (e.quick)(),
        None => (e.standard)(),
    };
    if let Some(seeds) = a.seeds {
        *(e.seeds)(&mut cfg) = seeds;
    }
    if a.print_config {
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let out = a.out.unwrap_or_else(|| PathBuf::from("runs").join(e.name));
    println!("{}", (e.run)(&cfg, &out)?);
    println!("results in {} (.json, .md, .html)", out.display());
    Ok(())
}

pub fn active_learning(a: Args) -> Result<()> {
    use rlhf_sandbox::active::{markdown, run as go, ActiveConfig};
    run(
        a,
        Experiment {
            name: "active-learning",
            quick: ActiveConfig::quick,
            standard: ActiveConfig::standard,
            seeds: |c| &mut c.seeds,
            run: |c, out| Ok(markdown(&go(c, out)?)),
        },
    )
}

pub fn feedback_kinds(a: Args) -> Result<()> {
    use rlhf_sandbox::kinds::{markdown, run as go, KindsConfig};
    run(
        a,
        Experiment {
            name: "feedback-kinds",
            quick: KindsConfig::quick,
            standard: KindsConfig::standard,
            seeds: |c| &mut c.seeds,
            run: |c, out| Ok(markdown(&go(c, out)?)),
        },
    )
}
