//! One error type for the whole crate: every variant names what the user must fix (file, key, step).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration value is missing, unknown or invalid.
    #[error("{file}: key \"{key}\": {msg}")]
    Config { file: String, key: String, msg: String },

    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A checkpoint or optimizer-state file exists but cannot be used.
    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    /// Training diverged (loss or gradient norm is NaN/inf); the last good checkpoint is left untouched.
    #[error("non-finite {what} ({value}) at step {step}; training stopped{}", match last_checkpoint {
        Some(p) => format!(", last good checkpoint: {}", p.display()),
        None => ", no checkpoint was saved yet".to_string(),
    })]
    NonFinite { step: u64, what: &'static str, value: f64, last_checkpoint: Option<PathBuf> },

    #[error("model: {0}")]
    Model(String),

    #[error("data: {0}")]
    Data(String),

    /// A reward source failed, timed out or returned a non-finite score (after its retries).
    #[error("reward source `{source_name}`: {msg}")]
    Reward { source_name: String, msg: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// Attach a path to an io error.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
