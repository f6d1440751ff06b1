//! Evaluation of policies on held-out prompts (`rlhf eval`): mean reward with 95 % intervals, win rates,
//! KL to a reference model, response length, distinct-1/2 and token entropy, and a self-contained HTML
//! report. Reward sources implement [`RewardSource`].

pub mod evaluate;
pub mod report;
pub mod reward;
pub mod stats;

pub use evaluate::{evaluate, EvalConfig, ModelSpec, ModelSummary, Summary};
pub use reward::{read_prompt_rows, ExactMatch, RewardSource, Row};
pub use stats::Estimate;
