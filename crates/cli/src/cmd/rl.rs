//! `rlhf grpo|rloo|ppo`: online RL (flags: [`super::settings`]).

use anyhow::Result;
use rlhf_train::grpo::{run_grpo, GrpoArgs};
use rlhf_train::ppo::{run_ppo, PpoArgs};
use rlhf_train::rloo::{run_rloo, RlooArgs};

use super::settings::{settings, Raw};

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
