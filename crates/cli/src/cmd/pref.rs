//! `rlhf rm` (train a reward model), `rlhf rm score` (score completions) and `rlhf dpo` (the DPO family).

use anyhow::Result;
use clap::{Args as ClapArgs, Subcommand};
use rlhf_train::{dpo, rm};

#[derive(ClapArgs)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RmCommand {
    #[command(subcommand)]
    pub action: Option<RmAction>,
    #[command(flatten)]
    pub train: rm::RmArgs,
}

#[derive(Subcommand)]
pub enum RmAction {
    /// Score prompt/completion rows with a reward model (or an ensemble: repeat --model).
    Score(rm::RmScoreArgs),
    /// Pick the candidate pairs to label next by ensemble disagreement, Bradley–Terry margin or at random.
    Select(rlhf_train::select::SelectArgs),
}

pub fn run_rm(c: RmCommand) -> Result<()> {
    match c.action {
        Some(RmAction::Score(a)) => {
            let n = rm::run_rm_score(&a)?;
            eprintln!("scored {n} rows → {}", a.output.display());
        }
        Some(RmAction::Select(a)) => {
            let n = rlhf_train::select::run_select(&a)?;
            eprintln!("selected {n} pairs ({}) → {}", a.strategy.name(), a.out.display());
        }
        None => {
            let summary = rm::run_rm(&c.train.resolve()?)?;
            println!("{}", serde_json::to_string(&summary)?);
        }
    }
    Ok(())
}

pub fn run_dpo(a: dpo::DpoArgs) -> Result<()> {
    let summary = dpo::run_dpo(&a.resolve()?)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
