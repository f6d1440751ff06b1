//! Reference model shapes and timing helpers for benchmark commands (`rlhf bench ...`).

use crate::{generate, CausalLm, GenRequest, ModelConfig, Sampling};
use candle_core::{Device, Result, Tensor};
use serde_json::json;
use std::time::Instant;

/// The tiny Llama of the TRL baseline: vocab 512, hidden 256, 4 layers, 4 heads, MLP 688, untied.
pub fn tiny_llama_config() -> ModelConfig {
    let raw = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 512, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
    });
    ModelConfig::from_json(raw, "tiny_llama_config").expect("valid built-in config")
}

/// The SmolLM2-135M shape (random weights): vocab 49152, hidden 576, 30 layers, 9/3 heads, tied.
pub fn smollm2_135m_config() -> ModelConfig {
    let raw = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true,
        "bos_token_id": 0, "eos_token_id": 0
    });
    ModelConfig::from_json(raw, "smollm2_135m_config").expect("valid built-in config")
}

/// `n` pseudo-random token ids (xorshift; ids 3.. so no special token): benchmark inputs without a dataset.
pub fn pseudo_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (3 + s % (vocab as u64 - 3)) as u32
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct GenBench {
    pub requests: usize,
    pub new_tokens: usize,
    pub seconds: f64,
    pub new_tokens_per_sec: f64,
}

/// Times one [`generate`] call: `prompts` random prompts of `prompt_len` tokens, each sampling
/// exactly `new_tokens` tokens at T = 1 (no stop ids).
pub fn bench_generate(
    model: &CausalLm,
    prompts: usize,
    prompt_len: usize,
    new_tokens: usize,
    seed: u64,
) -> Result<GenBench> {
    let ids = pseudo_ids(prompts * prompt_len, model.vocab_size(), seed);
    let reqs: Vec<GenRequest> = ids
        .chunks(prompt_len)
        .enumerate()
        .map(|(i, p)| GenRequest {
            prompt_ids: p.to_vec(),
            max_new_tokens: new_tokens,
            sampling: Sampling::default(),
            seed: seed + i as u64,
            ..Default::default()
        })
        .collect();
    let t = Instant::now();
    let out = generate(model, &reqs, None)?;
    let seconds = t.elapsed().as_secs_f64();
    let n: usize = out.iter().map(|o| o.tokens.len()).sum();
    Ok(GenBench {
        requests: prompts,
        new_tokens: n,
        seconds,
        new_tokens_per_sec: n as f64 / seconds,
    })
}

#[derive(Debug, Clone)]
pub struct StepBench {
    pub tokens: usize,
    pub forward_s: f64,
    pub backward_s: f64,
}

/// Times the forward pass (to the mean token log-prob loss, through the trainers' seam
/// [`CausalLm::token_logprobs_from_hidden`]) and the backward pass of one
/// training step on a random `[batch, seq_len]` batch (the optimizer update is not included).
pub fn bench_train_step(
    model: &CausalLm,
    batch: usize,
    seq_len: usize,
    seed: u64,
) -> Result<StepBench> {
    let ids = pseudo_ids(batch * (seq_len + 1), model.vocab_size(), seed);
    let all =
        Tensor::from_vec(ids, (batch, seq_len + 1), &Device::Cpu)?.to_device(model.device())?;
    let input = all.narrow(1, 0, seq_len)?.contiguous()?;
    let targets = all.narrow(1, 1, seq_len)?.contiguous()?;
    let t = Instant::now();
    let hidden = model.hidden_states(&input, None)?;
    let loss = model
        .token_logprobs_from_hidden(&hidden, &targets)?
        .mean_all()?
        .neg()?;
    loss.to_scalar::<f32>()?;
    let forward_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let grads = crate::engine::backward(&loss)?;
    let backward_s = t.elapsed().as_secs_f64();
    drop(grads);
    Ok(StepBench {
        tokens: batch * seq_len,
        forward_s,
        backward_s,
    })
}

#[derive(Debug, Clone)]
pub struct GemmBench {
    /// Median seconds per product, operand conversion included (what a linear layer pays per call).
    pub seconds: f64,
    pub gflops: f64,
    /// The same with the operands converted beforehand (the kernel alone; equal to `gflops` at fp32).
    pub gflops_kernel: f64,
}

/// Times `C = A · Bᵀ` for random `A [m, k]` and `B [n, k]` (the `nn.Linear` layout, read through a
/// transposed view as the linear layers do) at `precision`, split over the pool as theirs are; medians of
/// `repeats` runs after one warm-up.
pub fn bench_gemm(
    m: usize,
    k: usize,
    n: usize,
    precision: crate::Precision,
    repeats: usize,
) -> GemmBench {
    use crate::bf16::{gemm_ops, Lhs, Rhs};
    use crate::matmul::MatRef;
    let a: Vec<f32> = pseudo_ids(m * k, 1000, 1)
        .iter()
        .map(|&x| x as f32 / 500.0 - 1.0)
        .collect();
    let b: Vec<f32> = pseudo_ids(n * k, 1000, 2)
        .iter()
        .map(|&x| x as f32 / 500.0 - 1.0)
        .collect();
    let (am, bm) = (MatRef::new(&a, m, k, k), MatRef::new(&b, n, k, k).t());
    let mut c = vec![0f32; m * n];
    let median = |f: &mut dyn FnMut()| {
        f();
        let mut ts: Vec<f64> = (0..repeats.max(1))
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect();
        ts.sort_by(f64::total_cmp);
        ts[ts.len() / 2]
    };
    let seconds = median(&mut || {
        gemm_ops(
            &mut c,
            n,
            false,
            &Lhs::new(precision, am, true),
            &Rhs::new(precision, bm, true),
            true,
        )
    });
    let (lhs, rhs) = (Lhs::new(precision, am, true), Rhs::new(precision, bm, true));
    let kernel = median(&mut || gemm_ops(&mut c, n, false, &lhs, &rhs, true));
    let flop = 2.0 * (m * k * n) as f64;
    GemmBench {
        seconds,
        gflops: flop / seconds / 1e9,
        gflops_kernel: flop / kernel / 1e9,
    }
}
