//! The trainers' flags (`rlhf sft|rm|dpo|grpo|rloo|ppo|iterate`): each is parsed by the trainer's own settings
//! struct ([`rlhf_train::settings::load`]), so that a flag given on the command line overrides the same key of
//! `--config FILE` even when it equals the default, and `--help` shows the trainer's defaults.

use std::ffi::OsString;

use anyhow::Result;
use clap::Args as ClapArgs;
use rlhf_train::settings::{load, LoadError, Settings};

/// Every flag of the trainer (see `rlhf <trainer> --help`).
#[derive(ClapArgs)]
#[command(disable_help_flag = true)]
pub struct Raw {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<OsString>,
}

/// The settings `C` from the flags; a flag error or `--help` is printed and exits.
pub(crate) fn settings<C: Settings>(name: &str, raw: &Raw) -> Result<C> {
    match load::<C>(name, &raw.args) {
        Ok(c) => Ok(c),
        Err(LoadError::Cli(e)) => e.exit(),
        Err(LoadError::Settings(e)) => Err(e.into()),
    }
}
