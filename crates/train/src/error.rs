//! One error type for the whole crate: every variant names what the user must fix (file, key, step).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration value is missing, unknown or invalid.
    #[error("{file}: key \"{key}\": {msg}")]
    Config {
        file: String,
        key: String,
        msg: String,
    },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A checkpoint or optimizer-state file exists but cannot be used.
    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    /// The output directory cannot be used as it is (it is the base model, or holds another run).
    #[error("{}: {msg}", path.display())]
    OutputDir { path: PathBuf, msg: String },

    /// Training diverged (loss or gradient norm is NaN/inf) at `step`; `last_checkpoint` is the newest one
    /// saved (or resumed from). Checkpoints are left untouched; the message names the last one whose weights
    /// did not produce the divergence.
    #[error("non-finite {what} ({value}) at step {step}; training stopped{}", last_good_note(*step, last_checkpoint))]
    NonFinite {
        step: u64,
        what: &'static str,
        value: f64,
        last_checkpoint: Option<PathBuf>,
    },

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

/// The loss of step `s` is computed with the weights after step `s − 1`: a checkpoint of step `s − 1` holds
/// exactly the weights that diverged, so the last good one is the newest earlier checkpoint still on disk
/// (`save_total_limit` may have pruned it).
fn last_good_note(step: u64, newest: &Option<PathBuf>) -> String {
    let Some(newest) = newest else {
        return ", no checkpoint was saved yet".into();
    };
    let step_of = |p: &std::path::Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit('-').next())
            .and_then(|s| s.parse::<u64>().ok())
    };
    if step_of(newest).is_none_or(|s| s + 1 < step) {
        return format!(", last good checkpoint: {}", newest.display());
    }
    let earlier = newest
        .parent()
        .and_then(|dir| crate::checkpoint::list_checkpoints(dir).ok())
        .and_then(|all| all.into_iter().rev().find(|(s, _)| s + 1 < step));
    match earlier {
        Some((_, good)) => format!(
            ", last good checkpoint: {} ({} holds the weights that diverged)",
            good.display(),
            newest.display()
        ),
        None => format!(
            ", no good checkpoint is left ({} holds the weights that diverged)",
            newest.display()
        ),
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// Attach a path to an io error.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
