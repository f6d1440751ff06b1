//! `rlhf grpo|rloo|ppo`: online RL. The flags are parsed by the trainer's own settings struct, so that a flag
//! given on the command line overrides the same key of `--config FILE` even when it equals the default.

use std::ffi::OsString;

use anyhow::Result;
use clap::Args as ClapArgs;
use rlhf_train::grpo::{run_grpo, GrpoArgs};
use rlhf_train::ppo::{run_ppo, PpoArgs};
use rlhf_train::rloo::{run_rloo, RlooArgs};
use rlhf_train::settings::{load, LoadError};

/// Every flag of the trainer (see `rlhf <trainer> --help`).
#[derive(ClapArgs)]
#[command(disable_help_flag = true)]
pub struct Raw {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<OsString>,
}

pub(crate) fn settings<C>(name: &str, raw: &Raw) -> Result<C>
where
    C: clap::Parser + serde::Serialize + serde::de::DeserializeOwned,
{
    match load::<C>(name, &raw.args) {
        Ok(c) => Ok(c),
        Err(LoadError::Cli(e)) => e.exit(),
        Err(LoadError::Settings(e)) => Err(e.into()),
    }
}

fn print(summary: &rlhf_train::online::OnlineSummary) -> Result<()> {
    println!("{}", serde_json::to_string(summary)?);
    Ok(())
}

pub fn grpo(raw: Raw) -> Result<()> {
    print(&run_grpo(&settings::<GrpoArgs>("rlhf grpo", &raw)?)?)
}

pub fn rloo(raw: Raw) -> Result<()> {
    print(&run_rloo(&settings::<RlooArgs>("rlhf rloo", &raw)?)?)
}

pub fn ppo(raw: Raw) -> Result<()> {
    print(&run_ppo(&settings::<PpoArgs>("rlhf ppo", &raw)?)?)
}
