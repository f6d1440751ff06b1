//! Tiny configurations of every supported architecture, shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use candle_core::{Device, Result, Tensor};
use rlhf_model::{CausalLm, ModelConfig};
use serde_json::json;

/// Llama with GQA (4 query heads / 2 kv heads), untied head and all optional biases on.
pub fn llama_config() -> ModelConfig {
    let raw = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": false,
        "attention_bias": true, "mlp_bias": true, "initializer_range": 0.1,
        "bos_token_id": 1, "eos_token_id": 2
    });
    ModelConfig::from_json(raw, "llama test config").unwrap()
}

/// Qwen2 (q/k/v biases) with tied embeddings and transformers-5 style `rope_parameters`.
pub fn qwen2_config() -> ModelConfig {
    let raw = json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 89, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "max_position_embeddings": 64, "tie_word_embeddings": true, "initializer_range": 0.1
    });
    ModelConfig::from_json(raw, "qwen2 test config").unwrap()
}

pub fn gpt2_config() -> ModelConfig {
    let raw = json!({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": 83, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
        "activation_function": "gelu_new", "initializer_range": 0.1
    });
    ModelConfig::from_json(raw, "gpt2 test config").unwrap()
}

/// Mistral with an explicit head_dim (≠ hidden / heads) and a sliding window as long as the context, so
/// every sequence the tests run fits in it.
pub fn mistral_config() -> ModelConfig {
    let raw = json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "vocab_size": 91, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 64, "sliding_window": 64,
        "tie_word_embeddings": false, "initializer_range": 0.1
    });
    ModelConfig::from_json(raw, "mistral test config").unwrap()
}

pub fn all_configs() -> Vec<(&'static str, ModelConfig)> {
    vec![
        ("llama", llama_config()),
        ("qwen2", qwen2_config()),
        ("gpt2", gpt2_config()),
        ("mistral", mistral_config()),
    ]
}

pub fn model(cfg: ModelConfig, seed: u64) -> CausalLm {
    CausalLm::init_random(cfg, seed, &Device::Cpu).unwrap()
}

/// Deterministic pseudo-random token ids `[b, t]` below `vocab`.
pub fn ids(b: usize, t: usize, vocab: usize, seed: u32) -> Tensor {
    let v: Vec<u32> = (0..b * t)
        .map(|i| {
            ((i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed.wrapping_mul(40503))
                >> 7)
                % vocab as u32
        })
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// `f()` with its parallel ops on one thread (`threads == 1`) or split over the pool's threads.
pub fn on_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    assert!(
        rlhf_model::par::threads() >= 2,
        "this test compares one thread with two: run it on 2+ cores"
    );
    if threads == 1 {
        rlhf_model::par::serially(f)
    } else {
        f()
    }
}
