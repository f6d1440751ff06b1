//! Training machinery for `rlhf`: AdamW, learning-rate schedules, atomic checkpoints, metrics and the
//! SFT trainer.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod dpo;
pub mod ensemble;
pub mod error;
pub mod lora;
pub mod metrics;
pub mod optim;
pub mod output_dir;
pub mod pref_config;
pub mod pref_data;
pub mod pref_loss;
pub mod pref_train;
pub mod rm;
pub mod rm_loss;
pub mod schedule;
pub mod sft;

pub use error::{Result, TrainError};
pub use config::{SftArgs, SftConfig};
pub use sft::{run_sft, SftSummary, SftTrainer};
