//! `rlhf rm` (train a reward model), `rlhf rm score` (score completions) and `rlhf dpo` (the DPO family).

use anyhow::Result;
use clap::{Parser, Subcommand};
use rlhf_train::{dpo, rm};

use super::settings::{settings, Raw};

/// `rlhf rm score|select …`.
#[derive(Parser)]
#[command(name = "rlhf rm")]
struct RmSubcommand {
    #[command(subcommand)]
    action: RmAction,
}

#[derive(Subcommand)]
pub enum RmAction {
    /// Score prompt/completion rows with a reward model (or an ensemble: repeat --model).
    Score(rm::RmScoreArgs),
    /// Pick the candidate pairs to label next by ensemble disagreement, Bradley–Terry margin or at random.
    Select(rlhf_train::select::SelectArgs),
}

/// `rlhf rm score|select …`, else training with the trainer's flags.
pub fn run_rm(raw: Raw) -> Result<()> {
    let action = match raw.args.first().and_then(|a| a.to_str()) {
        Some("score" | "select") => Some(
            RmSubcommand::parse_from(
                std::iter::once("rlhf rm".into()).chain(raw.args.iter().cloned()),
            )
            .action,
        ),
        _ => None,
    };
    match action {
        Some(RmAction::Score(a)) => {
            let n = rm::run_rm_score(&a)?;
            eprintln!("scored {n} rows → {}", a.output.display());
        }
        Some(RmAction::Select(a)) => {
            let n = rlhf_train::select::run_select(&a)?;
            eprintln!(
                "selected {n} pairs ({}) → {}",
                a.strategy.name(),
                a.out.display()
            );
        }
        None => {
            let summary = rm::run_rm(&settings::<rm::RmArgs>("rlhf rm", &raw)?.resolve()?)?;
            println!("{}", serde_json::to_string(&summary)?);
        }
    }
    Ok(())
}

pub fn run_dpo(raw: Raw) -> Result<()> {
    let summary = dpo::run_dpo(&settings::<dpo::DpoArgs>("rlhf dpo", &raw)?.resolve()?)?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
