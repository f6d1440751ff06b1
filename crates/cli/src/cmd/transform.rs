//! `rlhf transform`: the feedback app's critique and demonstration exports → preference and SFT rows
//! ([`rlhf_train::feedback_data`]).

use anyhow::Result;
use clap::Subcommand;
use rlhf_train::feedback_data::{
    critic_sft, demo_pairs, revise, CriticArgs, DemoPairsArgs, ReviseArgs,
};

#[derive(Subcommand)]
pub enum Transform {
    /// Critiques → the policy's revision conditioned on each critique → `revision ≻ original` preference pairs.
    Revise(ReviseArgs),
    /// Critiques → prompt/completion rows (prompt + response → critique) that train a generative critic.
    CriticSft(CriticArgs),
    /// Demonstrations → `demonstration ≻ policy sample` preference pairs.
    DemoPairs(DemoPairsArgs),
}

pub fn run(t: Transform) -> Result<()> {
    let (s, out) = match &t {
        Transform::Revise(a) => (revise(a)?, &a.out),
        Transform::CriticSft(a) => (critic_sft(a)?, &a.out),
        Transform::DemoPairs(a) => (demo_pairs(a)?, &a.out),
    };
    println!("{}", serde_json::to_string(&s)?);
    eprintln!(
        "{} of {} rows → {}",
        s.output_rows,
        s.input_rows,
        out.display()
    );
    Ok(())
}
