//! The seam between the crate and its architectures. Each architecture is one module that defines
//! an [`ArchInfo`] (`ARCH`) and is listed once in the `architectures!` line of `lib.rs`; nothing
//! else in the workspace matches on the architecture (see docs/architectures.md).

use crate::attention::KvCache;
use crate::linear::Linear;
use crate::{ParamSpec, Params, Positions};
use candle_core::{Result, Tensor};
use serde_json::Value;
use std::sync::Arc;

/// The registration of one architecture: the names `transformers` uses for it and how to parse its
/// `config.json`.
pub struct ArchInfo {
    /// `config.json` `model_type`, e.g. `llama`.
    pub model_type: &'static str,
    /// `architectures` of a causal LM checkpoint, e.g. `LlamaForCausalLM`.
    pub causal_lm: &'static str,
    /// `architectures` of a sequence-classification (reward model) checkpoint.
    pub sequence_classification: &'static str,
    /// PEFT's default LoRA `target_modules` for this model type (suggested when a target matches nothing).
    pub lora_targets: &'static [&'static str],
    /// Parses and validates `config.json` (`file` names it in errors).
    pub(crate) parse: fn(raw: &Value, file: &str) -> Result<Arc<dyn Arch>>,
}

impl std::fmt::Debug for ArchInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type)
    }
}

impl ArchInfo {
    /// Whether `name` (an entry of `config.json` `architectures`) is one of this architecture's classes.
    pub fn has_class(&self, name: &str) -> bool {
        name == self.causal_lm || name == self.sequence_classification
    }
}

/// The sizes the rest of the crate reads from any architecture's config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub max_positions: usize,
    pub tie_word_embeddings: bool,
}

/// A parsed, validated `config.json` of one architecture.
pub(crate) trait Arch: std::fmt::Debug + Send + Sync {
    fn dims(&self) -> Dims;
    /// Every parameter: HF name, shape and HF-style initialisation.
    fn param_specs(&self) -> Vec<ParamSpec>;
    /// The network over the given parameter tensors (all of [`Arch::param_specs`] are present).
    fn build(&self, params: &Params) -> Result<Box<dyn Network>>;
}

/// A built network: what [`crate::CausalLm`] and generation run.
pub(crate) trait Network: std::fmt::Debug + Send + Sync {
    /// Hidden states after the final norm, `[b, t, hidden]`.
    fn hidden(&self, ids: &Tensor, pos: &Positions, cache: Option<&mut KvCache>) -> Result<Tensor>;
    /// [`Network::hidden`] on the engine ([`crate::engine`]) without a cache, when this network
    /// has a hand-written stack that can run it (`None`: use the candle graph); `groups` as
    /// [`crate::CausalLm::hidden_states_grouped`] takes them; with `at`, the states of those
    /// tokens only, `[at.len(), hidden]` (as [`crate::CausalLm::hidden_states_at`]).
    fn hidden_engine(
        &self,
        _ids: &Tensor,
        _pos: &Positions,
        _groups: Option<&[u32]>,
        _at: Option<&[u32]>,
    ) -> Option<Result<Tensor>> {
        None
    }
    /// Whether [`Network::hidden_engine`] runs attention groups (the candle graph does not).
    fn attends_by_group(&self) -> bool {
        false
    }
    /// [`Network::hidden`] through `cache` on the engine, when this network has a hand-written
    /// stack that can decode (`None`: use the candle graph).
    fn hidden_engine_cached(
        &self,
        _ids: &Tensor,
        _pos: &Positions,
        _cache: &mut KvCache,
    ) -> Option<Result<Tensor>> {
        None
    }
    fn lm_head(&self) -> &Linear;
    /// Every linear layer under its HF module name (the LoRA and precision seam).
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
    /// `(layers, kv_heads, head_dim)` of the KV cache.
    fn kv_shape(&self) -> (usize, usize, usize);
    fn clone_box(&self) -> Box<dyn Network>;
}

impl Clone for Box<dyn Network> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}
