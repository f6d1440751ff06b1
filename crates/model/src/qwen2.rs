//! `Qwen2ForCausalLM`: the shared decoder ([`crate::decoder`]) with biases on q/k/v (not on o_proj
//! or the MLP).

use crate::arch::{Arch, ArchInfo};
use crate::decoder::{DecoderConfig, DecoderOptions};
use candle_core::{bail, Result};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

pub(crate) const ARCH: ArchInfo = ArchInfo {
    model_type: "qwen2",
    causal_lm: "Qwen2ForCausalLM",
    sequence_classification: "Qwen2ForSequenceClassification",
    lora_targets: &["q_proj", "v_proj"],
    parse,
};

/// Qwen2's own `config.json` fields (the shared ones are in [`DecoderConfig`]).
#[derive(Debug, Clone, Deserialize)]
struct Config {
    #[serde(default)]
    use_sliding_window: bool,
}

fn parse(raw: &Value, file: &str) -> Result<Arc<dyn Arch>> {
    let c: Config = crate::typed(raw, file)?;
    if c.use_sliding_window {
        // Qwen2 windows only the layers from `max_window_layers` on, which a length limit does not capture.
        bail!("{file}: field \"use_sliding_window\": sliding-window attention is not supported")
    }
    let options = DecoderOptions {
        default_max_positions: 32768,
        qkv_bias: true,
        o_bias: false,
        mlp_bias: false,
        sliding_window: None,
    };
    Ok(Arc::new(crate::typed::<DecoderConfig>(raw, file)?.spec(options, file)?))
}
