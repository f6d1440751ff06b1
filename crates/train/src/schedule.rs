//! Learning-rate schedules with the formulas of transformers' `get_*_schedule_with_warmup`.
//!
//! `lr(step)` is the rate for the optimizer step that follows `step` completed steps (LambdaLR's
//! `last_epoch`): the first update uses `lr(0)`, which is 0 whenever there is warmup.

use std::f64::consts::PI;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Warmup (if any), then flat (transformers `constant` / `constant_with_warmup`).
    #[default]
    Constant,
    /// Warmup, then linear decay to 0 at the last step.
    Linear,
    /// Warmup, then half a cosine down to 0 at the last step.
    Cosine,
}

impl FromStr for ScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, true)
    }
}

/// Warmup length given as steps or as a fraction of the total steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    Steps(u64),
    /// transformers: `ceil(total_steps * ratio)`.
    Ratio(f64),
}

impl Warmup {
    pub fn steps(self, total_steps: u64) -> u64 {
        match self {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) => (total_steps as f64 * r).ceil() as u64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    pub fn new(kind: ScheduleKind, base_lr: f64, warmup: Warmup, total_steps: u64) -> Self {
        Self {
            kind,
            base_lr,
            warmup_steps: warmup.steps(total_steps),
            total_steps,
        }
    }

    /// Multiplier of `base_lr` after `step` completed optimizer steps.
    pub fn factor(&self, step: u64) -> f64 {
        let (step, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < warmup {
            return step / warmup.max(1.0);
        }
        let progress = (step - warmup) / (total - warmup).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            // num_cycles = 0.5: cos(pi * 0.5 * 2 * progress)
            ScheduleKind::Cosine => (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0),
        }
    }

    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}
