//! `Qwen2ForCausalLM`: the Llama decoder with biases on q/k/v (not on o_proj or the MLP).

use crate::llama::{default_act, default_init_range, DecoderSpec, RopeParameters, RopeSpec};
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    32768
}

impl Qwen2Config {
    pub(crate) fn spec(&self, file: &str) -> Result<DecoderSpec> {
        if self.hidden_act != "silu" {
            bail!(
                "{file}: field \"hidden_act\": only \"silu\" is supported, got \"{}\"",
                self.hidden_act
            )
        }
        if self.use_sliding_window {
            bail!("{file}: field \"use_sliding_window\": sliding-window attention is not supported")
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let scaling = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let spec = DecoderSpec {
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            inter: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            eps: self.rms_norm_eps,
            rope: RopeSpec::new(head_dim, self.rope_theta, scaling, file)?,
            tie: self.tie_word_embeddings,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            init_std: self.initializer_range,
        };
        spec.check(file)?;
        Ok(spec)
    }
}
