//! Training logs: one JSON line per logged step (TRL metric names) and a progress bar on a terminal.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::error::{io_err, Result};

/// One logged step. Absent values are omitted from the line (train and eval lines carry different keys,
/// as in TRL's log history).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    pub step: u64,
    /// Fractional epoch: epochs completed + fraction of the current one.
    pub epoch: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_token_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_mean_token_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_time_s: Option<f64>,
}

/// Appends records to a JSONL file, flushing each line so a crashed run leaves a readable log. When stderr is
/// not a terminal (logs, CI, `nohup`: no progress bar), each line is also logged there at level info, so a
/// run shows its progress once per logging step.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
    echo: bool,
}

impl MetricsWriter {
    /// `append`: keep earlier lines (a resumed run continues the same log).
    pub fn open(path: &Path, append: bool) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .map_err(io_err(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            echo: !std::io::stderr().is_terminal(),
        })
    }

    /// Continue the log of a run resumed at `step`: lines for later steps (written after the checkpoint
    /// by the interrupted run) are dropped so every step is logged once. A torn last line (the run was
    /// killed mid-write) is dropped too. Kept lines stay byte for byte (whatever keys they hold), and the
    /// file is replaced atomically, so a crash here loses nothing.
    pub fn open_resumed(path: &Path, step: u64) -> Result<Self> {
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(io_err(path))?;
            let complete = match text.rfind('\n') {
                Some(i) => &text[..=i],
                None => "",
            };
            let mut kept = String::new();
            for (i, line) in complete
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                #[derive(Deserialize)]
                struct Step {
                    step: u64,
                }
                let s: Step =
                    serde_json::from_str(line).map_err(|e| crate::TrainError::Checkpoint {
                        path: PathBuf::from(format!("{}:{}", path.display(), i + 1)),
                        msg: e.to_string(),
                    })?;
                if s.step <= step {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
            rlhf_model::io::write_atomic(path, kept.as_bytes())
                .map_err(|e| crate::TrainError::Model(e.to_string()))?;
            Self::open(path, true)
        } else {
            Self::open(path, false)
        }
    }

    pub fn write(&mut self, record: &LogRecord) -> Result<()> {
        self.write_line(record)
    }

    /// Writes any serialisable record (e.g. a map of free-form metric names) as one line.
    pub fn write_line<T: Serialize + ?Sized>(&mut self, record: &T) -> Result<()> {
        let line = serde_json::to_string(record).expect("plain data serialises");
        if self.echo {
            tracing::info!("{line}");
        }
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(io_err(&self.path))
    }
}

/// Read a metrics file back (tests, reports).
pub fn read_metrics(path: &Path) -> Result<Vec<LogRecord>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    parse_metrics(path, &text)
}

fn parse_metrics(path: &Path, text: &str) -> Result<Vec<LogRecord>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| crate::TrainError::Checkpoint {
                path: PathBuf::from(format!("{}:{}", path.display(), i + 1)),
                msg: e.to_string(),
            })
        })
        .collect()
}

/// Step progress on stderr; hidden unless stderr is a terminal (tests, CI, redirected logs).
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new(total_steps: u64, start_step: u64) -> Self {
        let bar = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("static template"),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        bar.set_position(start_step);
        Self { bar }
    }

    pub fn update(&self, step: u64, loss: Option<f64>) {
        self.bar.set_position(step);
        if let Some(loss) = loss {
            self.bar.set_message(format!("loss {loss:.4}"));
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
