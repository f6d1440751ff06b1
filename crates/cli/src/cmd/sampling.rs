//! The sampling flags `rlhf generate` and `rlhf chat` share, and their validation.

use anyhow::{anyhow, Result};
use clap::Args as ClapArgs;
use rlhf_model::Sampling;

#[derive(ClapArgs, Clone, Debug)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// 0 = no top-k truncation.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Stop when the completion ends with this string (repeatable; not shown); EOS always stops.
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// Refuses settings that can only produce garbage, naming the flag.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(bad(
                "temperature",
                format!(
                    "{} is not a finite number >= 0 (0 = greedy)",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad(
                "top-p",
                format!(
                    "{} is not in (0, 1] (1 = no nucleus truncation)",
                    self.top_p
                ),
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(bad(
                "stop",
                "an empty stop string would stop before the first token".into(),
            ));
        }
        Ok(())
    }

    pub fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

/// An error about a command-line flag, worded as the other commands word them.
pub fn bad(flag: &str, msg: String) -> anyhow::Error {
    anyhow!("command line: flag --{flag}: {msg}")
}
