//! Training machinery for `rlhf`: AdamW, learning-rate schedules, atomic checkpoints, metrics and the
//! SFT trainer.

pub mod checkpoint;
pub mod error;
pub mod metrics;
pub mod optim;
pub mod schedule;

pub use error::{Result, TrainError};
