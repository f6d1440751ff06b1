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

    /// Training diverged; the last good checkpoint (if any) is left untouched.
    #[error("non-finite loss ({loss}) at step {step}; training stopped{}", match last_checkpoint {
        Some(p) => format!(", last good checkpoint: {}", p.display()),
        None => ", no checkpoint was saved yet".to_string(),
    })]
    NonFiniteLoss { step: u64, loss: f64, last_checkpoint: Option<PathBuf> },

    #[error("model: {0}")]
    Model(String),

    #[error("data: {0}")]
    Data(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// Attach a path to an io error.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
