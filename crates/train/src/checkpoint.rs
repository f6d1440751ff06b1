//! Atomic training checkpoints.
//!
//! A checkpoint is `<output>/checkpoint-<step>/` holding the model in HF layout (so the directory also
//! loads as a model), `optimizer.safetensors`, `trainer_state.json` (step, data position, RNG, token
//! count) and `training_config.json`. It is written under a temporary name, fsynced, then renamed: a
//! directory named `checkpoint-<step>` is therefore always complete, whatever killed the writer.

use std::fs;
use std::path::{Path, PathBuf};

use rlhf_data::SamplerState;
use serde::{Deserialize, Serialize};

use crate::error::{io_err, Result, TrainError};
use crate::optim::AdamW;

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const CONFIG_FILE: &str = "training_config.json";
const PREFIX: &str = "checkpoint-";
const TMP_PREFIX: &str = ".tmp-checkpoint-";

/// Everything besides weights and optimizer moments that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub global_step: u64,
    /// Data position: epoch and index of the next example in that epoch's order.
    pub data: SamplerState,
    /// RNG state. The only randomness in training is the epoch order, drawn from ChaCha8(seed) on
    /// stream `epoch` (models are dropout-free), so the seed together with `data.epoch` is the whole state.
    pub shuffle_seed: u64,
    /// Non-pad tokens seen so far (TRL's `num_tokens`).
    pub num_tokens: u64,
}

/// `checkpoint-<step>` directories of `output_dir` (complete ones only), oldest first.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(output_dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(output_dir))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|s| s.parse().ok()) else {
            continue;
        };
        // The state file is written last inside the temp dir; its presence double-checks completeness.
        if entry.path().join(STATE_FILE).is_file() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The most recent complete checkpoint, if any (what `--resume` continues from).
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(output_dir)?.pop().map(|(_, p)| p))
}

/// Write a checkpoint for `state.global_step` atomically and prune to the newest `save_total_limit`.
/// `save_model` writes the model (HF layout: weights, config, tokenizer files) into the directory it is
/// given.
pub fn save_checkpoint(
    output_dir: &Path,
    save_model: impl FnOnce(&Path) -> Result<()>,
    optimizer: &AdamW,
    state: &TrainerState,
    config: &serde_json::Value,
    save_total_limit: Option<usize>,
) -> Result<PathBuf> {
    fs::create_dir_all(output_dir).map_err(io_err(output_dir))?;
    let step = state.global_step;
    let tmp = output_dir.join(format!("{TMP_PREFIX}{step}"));
    let dst = output_dir.join(format!("{PREFIX}{step}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;

    save_model(&tmp)?;
    optimizer.save_state(&tmp.join(OPTIMIZER_FILE))?;
    write_json(&tmp.join(CONFIG_FILE), config)?;
    write_json(&tmp.join(STATE_FILE), state)?;
    sync_tree(&tmp)?;

    if dst.exists() {
        // Re-saving a step (e.g. a resumed run saving where it started): move the old one aside first so
        // a complete checkpoint-<step> exists at every instant.
        let old = output_dir.join(format!("{TMP_PREFIX}{step}.old"));
        fs::rename(&dst, &old).map_err(io_err(&dst))?;
        fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    }
    sync_dir(output_dir)?;

    if let Some(limit) = save_total_limit {
        let all = list_checkpoints(output_dir)?;
        let excess = all.len().saturating_sub(limit.max(1));
        for (_, path) in &all[..excess] {
            fs::remove_dir_all(path).map_err(io_err(path))?;
        }
    }
    Ok(dst)
}

/// Restore optimizer state from a checkpoint and return its trainer state. The model weights are
/// loaded by the caller from the same directory (it is a model directory).
pub fn load_checkpoint(dir: &Path, optimizer: &mut AdamW) -> Result<TrainerState> {
    let state_path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| TrainError::Checkpoint { path: state_path.clone(), msg: e.to_string() })?;
    optimizer.load_state(&dir.join(OPTIMIZER_FILE))?;
    Ok(state)
}

/// The training configuration stored in a checkpoint.
pub fn load_checkpoint_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint { path, msg: e.to_string() })
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("plain data serialises");
    fs::write(path, text + "\n").map_err(io_err(path))
}

/// fsync every file below `dir`, then the directories themselves, so the rename publishes durable data.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io_err(&path))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io_err(dir))
}
