//! `rlhf demo`: the README's first command — the whole RLHF loop of the sandbox (base → SFT → simulated
//! preferences → reward model → DPO, PPO and GRPO → evaluation against the hidden gold reward), i.e.
//! `rlhf sandbox` with its presets, writing to `runs/demo` (so `runs/demo/sft` is there for the examples).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;

#[derive(ClapArgs)]
pub struct Args {
    /// Run directory (its earlier results are replaced; a base model built with the same settings is reused).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// The small budget (≈ 2 minutes in a test build on 2 cores) instead of the standard one.
    #[arg(long)]
    pub quick: bool,
    /// Seed of the world, annotators and training.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    super::sandbox::run(super::sandbox::Args {
        experiment: None,
        out: a.out,
        quick: a.quick,
        seed: a.seed,
        config: None,
        print_config: false,
    })
}
