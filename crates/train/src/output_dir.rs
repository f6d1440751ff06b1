//! The output directory of a training run: it must not be the base model's directory nor hold a previous
//! run, unless the user asks for that (`--overwrite-output-dir`, TRL's name) or continues that run
//! (`--resume`). Checked before anything is written, so a refused or failing run changes nothing there.

use std::path::{Path, PathBuf};

use crate::checkpoint;
use crate::error::{io_err, Result, TrainError};

/// Files and directories a finished or interrupted run leaves in its output directory (checkpoints aside).
const RUN_FILES: [&str; 7] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "metrics.jsonl",
    "adapter",
];
/// The part of [`RUN_FILES`] that is a model (kept until the new run's final save replaces it).
const MODEL_FILES: [&str; 3] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "config.json",
];

/// Checks `output_dir` against `model` and what is already there; with `overwrite`, removes a previous run's
/// metrics, adapter and checkpoints (its model files are replaced when the new run saves). Leftover
/// temporaries of an interrupted writer are always removed.
pub fn prepare(model: &Path, output_dir: &Path, overwrite: bool, resume: bool) -> Result<()> {
    let err = |msg: String| TrainError::OutputDir {
        path: output_dir.to_path_buf(),
        msg,
    };
    if same_dir(model, output_dir) && !overwrite {
        return Err(err(
            "this is the --model directory: training would overwrite the base model; choose another --output-dir \
             (or pass --overwrite-output-dir to replace the model)"
                .into(),
        ));
    }
    checkpoint::remove_stale_temporaries(output_dir)?;
    if resume {
        return Ok(());
    }
    let previous = previous_run(output_dir)?;
    match (previous.first(), overwrite) {
        (None, _) => Ok(()),
        (Some(found), false) => Err(err(format!(
            "already holds a training run ({}); pass --overwrite-output-dir to replace it, --resume to \
             continue it, or choose another --output-dir",
            found.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ))),
        (Some(_), true) => {
            // Model files are replaced by the final save; the previous run's metrics, adapter and
            // checkpoints would otherwise mix with the new run's (and `--resume` would pick an old checkpoint).
            // Never what the new run reads its model from (e.g. `--model run/checkpoint-500 --output-dir run`).
            let source = model.canonicalize().ok();
            let is_source = |p: &Path| source.as_ref().zip(p.canonicalize().ok()).is_some_and(|(s, p)| s.starts_with(p));
            for path in previous.into_iter().filter(|p| !MODEL_FILES.iter().any(|f| p.ends_with(f)) && !is_source(p)) {
                let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                removed.map_err(io_err(&path))?;
            }
            Ok(())
        }
    }
}

/// The files of a previous run in `dir` (none when it does not exist).
fn previous_run(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = RUN_FILES
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .collect();
    found.extend(
        checkpoint::list_checkpoints(dir)?
            .into_iter()
            .map(|(_, p)| p),
    );
    Ok(found)
}

/// Whether `a` and `b` name the same existing directory (symlinks and `..` resolved).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
