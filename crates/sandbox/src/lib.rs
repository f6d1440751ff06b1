//! The sandbox: a small world with a hidden gold reward ([`world`], [`gold`]), simulated annotators that
//! label through the feedback app's data model ([`annotators`]), the gold reward as an evaluation source
//! ([`source`]), and the end-to-end pipeline run in it ([`pipeline`]).
//!
//! Nothing a trainer reads carries gold information: prompts files hold `id`, `prompt` and (arithmetic only)
//! the reference `answer`; the gold side lives in a separate `*.gold.jsonl` that only the evaluation opens.

pub mod active;
pub mod annotators;
pub mod gold;
pub mod kinds;
pub mod overopt;
pub mod pipeline;
pub mod rm_lab;
pub mod source;
pub mod world;

pub use gold::{gold_reward, judge, Judgement};
pub use source::{write_prompts, GoldReward};
pub use world::{generate, Gold, Kind, Mix, Prompt};
