//! LoRA settings shared by every trainer: the `--lora-*` flags (flat TOML keys `lora_r`, … in the SFT config;
//! the `[lora]` section of the preference config), their validation, and attaching adapters to a model.

use clap::Args;
use rlhf_model::lora::{Lora, LoraConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// `--lora-*` flags; any of them enables LoRA (defaults for the others).
#[derive(Debug, Clone, Default, PartialEq, Args, Serialize, Deserialize)]
pub struct LoraArgs {
    /// LoRA rank: enables LoRA (other LoRA settings from the config file or defaults) [default: 8]
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha: the update is scaled by alpha / r [default: 16]
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout on the adapter input [default: 0.05]
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated module names to adapt [default: q_proj,v_proj]
    #[arg(long, value_delimiter = ',')]
    pub lora_target_modules: Option<Vec<String>>,
}

/// Applies macro `$m` to the flag fields.
macro_rules! lora_fields {
    ($m:ident) => {
        $m!(lora_r, lora_alpha, lora_dropout, lora_target_modules)
    };
}

impl LoraArgs {
    /// `base` with every setting given here applied; `None` stays `None` when nothing is given.
    pub fn apply(&self, base: Option<LoraConfig>) -> Option<LoraConfig> {
        if self.set_keys().is_empty() {
            return base;
        }
        let mut l = base.unwrap_or_default();
        if let Some(r) = self.lora_r {
            l.r = r;
        }
        if let Some(x) = self.lora_alpha {
            l.alpha = x;
        }
        if let Some(x) = self.lora_dropout {
            l.dropout = x;
        }
        if let Some(t) = &self.lora_target_modules {
            l.target_modules = t.clone();
        }
        Some(l)
    }

    /// `self` with every field that `other` sets replaced by `other`'s value.
    pub fn overridden_by(mut self, other: &LoraArgs) -> LoraArgs {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f.clone(); } )* };
        }
        lora_fields!(take);
        self
    }

    /// Names of the settings given here.
    pub fn set_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        macro_rules! put {
            ($($f:ident),*) => { $( if self.$f.is_some() { keys.push(stringify!($f)); } )* };
        }
        lora_fields!(put);
        keys
    }
}

/// The first invalid setting of `l` as (field, message), e.g. `("dropout", "must be in [0, 1)")`.
pub fn check(l: &LoraConfig) -> std::result::Result<(), (&'static str, &'static str)> {
    if l.r == 0 {
        return Err(("r", "must be at least 1"));
    }
    if !(0.0..1.0).contains(&l.dropout) {
        return Err(("dropout", "must be in [0, 1)"));
    }
    if !(l.alpha.is_finite() && l.alpha > 0.0) {
        return Err(("alpha", "must be a finite number > 0"));
    }
    if l.target_modules.is_empty() {
        return Err(("target_modules", "must name at least one module"));
    }
    Ok(())
}

/// Freezes `lm` and attaches LoRA adapters when configured.
pub(crate) fn attach_lora(lm: &mut rlhf_model::CausalLm, lora: Option<&LoraConfig>, seed: u64) -> Result<Option<Lora>> {
    lora.map(|l| Lora::attach(lm, l, seed).map_err(|e| TrainError::Model(e.to_string()))).transpose()
}
