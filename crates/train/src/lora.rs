//! LoRA settings shared by every trainer: the `--lora-*` flags and TOML keys `lora_r`, … (part of
//! [`crate::train_args::TrainArgs`]; an older file's `[lora]` section `r = …` reads as `lora_r`), their
//! validation, and attaching adapters to a model.

use std::path::Path;

use candle_core::Var;
use clap::Args;
use rlhf_model::lora::{Lora, LoraConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// PEFT's prefix of every tensor name in `adapter_model.safetensors`.
pub(crate) const PEFT_PREFIX: &str = "base_model.model.";
/// Where a LoRA run's output directory keeps the adapter (PEFT layout), beside the merged model.
pub const ADAPTER_DIR: &str = "adapter";

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
    /// Comma-separated module names to adapt [default: the architecture's, as PEFT: q_proj,v_proj; c_attn for GPT-2]
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
    Ok(())
}

/// Freezes `lm` and attaches LoRA adapters when configured.
pub(crate) fn attach_lora(
    lm: &mut rlhf_model::CausalLm,
    lora: Option<&LoraConfig>,
    seed: u64,
) -> Result<Option<Lora>> {
    lora.map(|l| Lora::attach(lm, l, seed).map_err(|e| TrainError::Model(e.to_string())))
        .transpose()
}

/// The final output of a LoRA run: the adapter (PEFT layout; `extra` are fully trained modules such as a
/// reward head) in `out/adapter`, then folded into `model`, which the caller saves in `out`: every trainer's
/// output directory is a complete model, as `generate`, `serve` and transformers load it.
pub(crate) fn save_and_merge(
    lora: Lora,
    model: &mut rlhf_model::CausalLm,
    out: &Path,
    base: &Path,
    task_type: &str,
    extra: &[(&str, &candle_core::Tensor)],
) -> Result<()> {
    lora.save(
        &out.join(ADAPTER_DIR),
        &base.display().to_string(),
        task_type,
        extra,
    )
    .and_then(|()| lora.merge_into(model))
    .map_err(|e| TrainError::Model(e.to_string()))
}

/// Sets each variable `(name, var)` of `vars` to the tensor `<prefix><name>` of the safetensors file `path` (a
/// checkpoint's adapter, which must hold exactly these tensors, with the same shapes).
pub(crate) fn restore_vars(vars: &[(String, Var)], path: &Path, prefix: &str) -> Result<()> {
    let ckpt_err = |msg: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let device = vars
        .first()
        .map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
    let saved =
        rlhf_model::lora::read_safetensors(path, &device).map_err(|e| ckpt_err(e.to_string()))?;
    if saved.len() != vars.len() {
        return Err(ckpt_err(format!(
            "{} tensors, this run's LoRA config trains {}",
            saved.len(),
            vars.len()
        )));
    }
    for (name, var) in vars {
        let key = format!("{prefix}{name}");
        let t = saved
            .get(&key)
            .ok_or_else(|| ckpt_err(format!("missing tensor `{key}`")))?;
        if t.dims() != var.dims() {
            return Err(ckpt_err(format!(
                "`{key}` has shape {:?}, this run expects {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(t)?;
        rlhf_model::weights_changed(var.as_tensor());
    }
    Ok(())
}

/// `rlhf lora merge`: folds the PEFT LoRA adapter in `adapter` into its base model (`base`, or else the
/// adapter's `base_model_name_or_path`) and writes the merged model, with the base's tokenizer files, to `out`
/// (which must not be the base nor hold a model). A `CAUSAL_LM` adapter gives a language model; a `SEQ_CLS` one
/// (from `rlhf rm`, its head stored beside the adapters) a reward model. Returns the base used.
pub fn merge_adapter(
    adapter: &Path,
    base: Option<&Path>,
    out: &Path,
) -> Result<std::path::PathBuf> {
    use rlhf_model::lora::{read_safetensors, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
    let model_err = |e: candle_core::Error| TrainError::Model(e.to_string());
    let cfg_path = adapter.join(ADAPTER_CONFIG);
    if !cfg_path.is_file() {
        let msg = "not found: --adapter must be a PEFT adapter directory (e.g. a LoRA run's output_dir/adapter)";
        return Err(TrainError::Model(format!("{}: {msg}", cfg_path.display())));
    }
    let raw = rlhf_model::io::read_json(&cfg_path).map_err(model_err)?;
    let field = |k: &str| {
        raw.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let cfg_err = |key: &str, msg: String| TrainError::Config {
        file: cfg_path.display().to_string(),
        key: key.into(),
        msg,
    };
    let base = match base {
        Some(b) => b.to_path_buf(),
        None if !field("base_model_name_or_path").is_empty() => {
            field("base_model_name_or_path").into()
        }
        None => {
            return Err(cfg_err(
                "base_model_name_or_path",
                "empty: pass the base model with --model".into(),
            ))
        }
    };
    // Never over a model: neither the base itself nor any directory that already holds one.
    let out_err = |msg: &str| TrainError::OutputDir {
        path: out.to_path_buf(),
        msg: msg.into(),
    };
    if out
        .canonicalize()
        .ok()
        .is_some_and(|o| base.canonicalize().ok() == Some(o))
    {
        return Err(out_err(
            "this is the base model's directory; merging writes a new model: choose another --out",
        ));
    }
    if ["config.json", "model.safetensors", ADAPTER_CONFIG]
        .iter()
        .any(|f| out.join(f).exists())
    {
        return Err(out_err(
            "already holds a model or adapter; choose a new --out directory",
        ));
    }
    let device = candle_core::Device::Cpu;
    match field("task_type").as_str() {
        "CAUSAL_LM" => {
            let mut lm = rlhf_model::CausalLm::load(&base, &device).map_err(model_err)?;
            Lora::load(&mut lm, adapter)
                .and_then(|l| l.merge_into(&mut lm))
                .map_err(model_err)?;
            lm.save(out).map_err(model_err)?;
        }
        "SEQ_CLS" => {
            let weights = adapter.join(ADAPTER_WEIGHTS);
            let head_name = format!("{PEFT_PREFIX}{}", rlhf_model::seq_cls::HEAD);
            let score = read_safetensors(&weights, &device)
                .map_err(model_err)?
                .remove(&head_name)
                .ok_or_else(|| TrainError::Checkpoint {
                    path: weights.clone(),
                    msg: format!("no tensor `{head_name}` (the reward head)"),
                })?;
            let pad = rlhf_data::Tokenizer::from_dir(&base)
                .ok()
                .and_then(|t| t.pad_id().ok());
            let mut model =
                rlhf_model::seq_cls::SeqCls::load(&base, score.dims()[0], pad, 0, &device)
                    .map_err(model_err)?;
            if model.score_weight().dims() != score.dims() {
                let msg = format!(
                    "`{head_name}` has shape {:?}, the base's head {:?}",
                    score.dims(),
                    model.score_weight().dims()
                );
                return Err(TrainError::Checkpoint { path: weights, msg });
            }
            for var in model.head().all_vars() {
                var.set(&score)?;
                rlhf_model::weights_changed(var.as_tensor());
            }
            Lora::load(&mut model.lm, adapter)
                .and_then(|l| l.merge_into(&mut model.lm))
                .map_err(model_err)?;
            model.save(out).map_err(model_err)?;
        }
        other => {
            return Err(cfg_err(
                "task_type",
                format!("{other:?}: expected \"CAUSAL_LM\" or \"SEQ_CLS\""),
            ))
        }
    }
    let tokenizer_from = if base.join("tokenizer.json").is_file() {
        base.clone()
    } else {
        adapter.to_path_buf()
    };
    crate::trainer::copy_tokenizer(&tokenizer_from, out)?;
    Ok(base)
}
