//! `LlamaForCausalLM`: the shared decoder ([`crate::decoder`]) with optional biases on the four
//! attention projections (`attention_bias`) and on the MLP (`mlp_bias`).

use crate::arch::{Arch, ArchInfo};
use crate::decoder::{DecoderConfig, DecoderOptions};
use candle_core::Result;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

pub(crate) const ARCH: ArchInfo = ArchInfo {
    model_type: "llama",
    causal_lm: "LlamaForCausalLM",
    sequence_classification: "LlamaForSequenceClassification",
    lora_targets: &["q_proj", "v_proj"],
    parse,
};

/// Llama's own `config.json` fields (the shared ones are in [`DecoderConfig`]).
#[derive(Debug, Clone, Deserialize)]
struct Config {
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

fn parse(raw: &Value, file: &str) -> Result<Arc<dyn Arch>> {
    let c: Config = crate::typed(raw, file)?;
    let options = DecoderOptions {
        default_max_positions: 2048,
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        mlp_bias: c.mlp_bias,
        sliding_window: None,
    };
    Ok(Arc::new(crate::typed::<DecoderConfig>(raw, file)?.spec(options, file)?))
}
