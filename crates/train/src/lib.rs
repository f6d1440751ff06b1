//! Training machinery for `rlhf`: AdamW, learning-rate schedules, atomic checkpoints, metrics and the
//! trainers: SFT, reward models, the DPO family, and online RL (GRPO, RLOO, PPO) on one rollout core.

pub mod advantage;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod dpo;
pub mod ensemble;
pub mod error;
pub mod grpo;
pub mod lora;
pub mod metrics;
pub mod online;
pub mod optim;
pub mod ppo;
pub mod reward;
pub mod rl_bench;
pub mod rloo;
pub mod rm;
pub mod rollout;
pub mod pref_loss;
pub mod rm_loss;
pub mod schedule;
pub mod settings;
pub mod sft;

pub use error::{Result, TrainError};
pub use config::{SftArgs, SftConfig};
pub use sft::{run_sft, SftSummary, SftTrainer};
