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
    /// RNG state of the data order: drawn from ChaCha8(seed) on stream `epoch`, so the seed together with
    /// `data.epoch` is its whole state.
    pub shuffle_seed: u64,
    /// Non-pad tokens seen so far (TRL's `num_tokens`).
    pub num_tokens: u64,
    /// RNG state of LoRA dropout: masks drawn so far per adapted layer ([`rlhf_model::lora::Lora::dropout_state`]);
    /// empty without LoRA. (The models themselves are dropout-free.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora_dropout: Vec<u64>,
}

impl TrainerState {
    /// The state before the first step of a run whose data order is `data` drawn from `seed`.
    pub fn new(data: SamplerState, seed: u64) -> Self {
        Self {
            global_step: 0,
            data,
            shuffle_seed: seed,
            num_tokens: 0,
            lora_dropout: Vec::new(),
        }
    }
}

/// The newest complete checkpoint of `output_dir`, for `--resume`; an error when there is none.
pub fn resume_dir(output_dir: &Path) -> Result<PathBuf> {
    latest_checkpoint(output_dir)?.ok_or_else(|| TrainError::Checkpoint {
        path: output_dir.to_path_buf(),
        msg: "--resume: no complete checkpoint-<step> directory here".into(),
    })
}

/// Settings a resumed run may change: they decide where and when to log, evaluate and save, not what is
/// trained.
pub const RESUME_FREE_KEYS: &[&str] = &[
    "output_dir",
    "resume",
    "overwrite_output_dir",
    "eval_file",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
];

/// Refuses to resume from a checkpoint whose `training_config.json` (`saved`) differs from this run's
/// settings (`current`, the same serialisation) in any key but `free` (settings that do not change what is
/// trained, such as logging cadence). The error names every differing key with both values.
pub fn check_resume_config(
    dir: &Path,
    saved: &serde_json::Value,
    current: &serde_json::Value,
    free: &[&str],
) -> Result<()> {
    let null = serde_json::Value::Null;
    let empty = serde_json::Map::new();
    let (s, c) = (
        saved.as_object().unwrap_or(&empty),
        current.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = s
        .keys()
        .chain(c.keys())
        .filter(|k| !free.contains(&k.as_str()))
        .collect();
    keys.sort();
    keys.dedup();
    // A key missing on one side (a checkpoint from an older version) reads as null = unset.
    let differing: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let (old, new) = (s.get(k).unwrap_or(&null), c.get(k).unwrap_or(&null));
            (old != new).then(|| format!("{k} (checkpoint: {old}, now: {new})"))
        })
        .collect();
    if differing.is_empty() {
        return Ok(());
    }
    Err(TrainError::Config {
        file: dir.join(CONFIG_FILE).display().to_string(),
        key: differing.iter().map(|d| d.split(' ').next().unwrap_or_default()).collect::<Vec<_>>().join(", "),
        msg: format!(
            "--resume with different settings than the checkpoint: {}; resume with the checkpoint's settings, or start a new run in another --output-dir",
            differing.join("; ")
        ),
    })
}

/// Removes what interrupted writers left in `output_dir`: `.tmp-checkpoint-*` directories and the
/// `.<name>.tmp<pid>` files of [`rlhf_model::io::write_atomic`], unless the process that owns them still runs.
pub fn remove_stale_temporaries(output_dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(output_dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry.map_err(io_err(output_dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let stale = if name.starts_with(TMP_PREFIX) {
            true
        } else if let Some(pid) = name
            .strip_prefix('.')
            .and_then(|n| n.rsplit_once(".tmp"))
            .map(|(_, pid)| pid)
        {
            !pid.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
                && !Path::new("/proc").join(pid).exists()
        } else {
            false
        };
        if stale {
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(io_err(&path))?;
        }
    }
    Ok(())
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
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|s| s.parse().ok())
        else {
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
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: state_path.clone(),
        msg: e.to_string(),
    })?;
    optimizer.load_state(&dir.join(OPTIMIZER_FILE))?;
    Ok(state)
}

/// The training configuration stored in a checkpoint.
pub fn load_checkpoint_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path,
        msg: e.to_string(),
    })
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
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}
