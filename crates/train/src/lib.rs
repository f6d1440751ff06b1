//! Training machinery for `rlhf`: AdamW, learning-rate schedules, atomic checkpoints, metrics and the
//! trainers: SFT, reward models, the DPO family, and online RL (GRPO, RLOO, PPO) on one rollout core.

pub mod advantage;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod dpo;
pub mod ensemble;
pub mod error;
pub mod feedback_data;
pub mod grpo;
pub mod lora;
pub mod metrics;
pub mod online;
pub mod optim;
pub mod output_dir;
pub mod ppo;
pub mod pref_config;
pub mod pref_data;
pub mod pref_loss;
pub mod pref_train;
pub mod reward;
pub mod rl_bench;
pub mod rloo;
pub mod rm;
pub mod rm_loss;
pub mod rollout;
pub mod schedule;
pub mod select;
pub mod settings;
pub mod sft;
pub mod train_args;
pub mod trainer;

pub use config::{SftArgs, SftConfig};
pub use error::{Result, TrainError};
pub use sft::{run_sft, SftSummary, SftTrainer};
pub use train_args::{TrainArgs, TrainConfig, TrainDefaults};
