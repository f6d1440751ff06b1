//! `MistralForCausalLM`: the shared decoder ([`crate::decoder`]) without biases. Mistral may be
//! trained with sliding-window attention (`sliding_window`, null in later releases); our attention
//! has no window, so sequences longer than the window are refused when run.

use crate::arch::{Arch, ArchInfo};
use crate::decoder::{DecoderConfig, DecoderOptions};
use candle_core::{bail, Result};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

pub(crate) const ARCH: ArchInfo = ArchInfo {
    model_type: "mistral",
    causal_lm: "MistralForCausalLM",
    sequence_classification: "MistralForSequenceClassification",
    lora_targets: &["q_proj", "v_proj"],
    parse,
};

/// Mistral's own `config.json` fields (the shared ones are in [`DecoderConfig`]).
#[derive(Debug, Clone, Deserialize)]
struct Config {
    /// Absent means 4096 (`MistralConfig`'s default); null means full attention.
    #[serde(default = "default_window")]
    sliding_window: Option<usize>,
}

fn default_window() -> Option<usize> {
    Some(4096)
}

fn parse(raw: &Value, file: &str) -> Result<Arc<dyn Arch>> {
    let c: Config = crate::typed(raw, file)?;
    if c.sliding_window == Some(0) {
        bail!("{file}: field \"sliding_window\": must be at least 1 (or null for full attention), got 0")
    }
    let options = DecoderOptions {
        default_max_positions: 4096 * 32,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        sliding_window: c.sliding_window,
    };
    Ok(Arc::new(crate::typed::<DecoderConfig>(raw, file)?.spec(options, file)?))
}
