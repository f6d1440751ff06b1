//! The transformers reload check, run by hand (ignored in `cargo test`; the benchmarks that lived here are
//! `rlhf bench rm|dpo`):
//!
//! ```text
//! RLHF_OUT=/tmp/rmcheck cargo test -p rlhf-train --test pref_bench -- --ignored save_reward_model_for_reload
//! /work/venv/bin/python tools/check_reload.py /tmp/rmcheck/rm /tmp/rmcheck/rm_scores.safetensors
//! ```

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rlhf_model::seq_cls::SeqCls;
use rlhf_model::CausalLm;

fn tokenizer_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/tokenizer"
    ))
}

/// Writes a reward model made from the causal fixture (new head) and its scores on a padded batch, for
/// `tools/check_reload.py`.
#[test]
#[ignore]
fn save_reward_model_for_reload() {
    let out = PathBuf::from(std::env::var("RLHF_OUT").expect("set RLHF_OUT"));
    let lm = CausalLm::load(
        &PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/models/llama"
        )),
        &Device::Cpu,
    )
    .unwrap();
    let rm = SeqCls::from_causal_lm(lm, 1, None, 7).unwrap();
    rm.save(&out.join("rm")).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(tokenizer_dir().join(f), out.join("rm").join(f)).unwrap();
    }
    let ids = Tensor::new(
        &[
            [1u32, 52, 29, 296, 14, 426, 32, 366, 2],
            [1, 273, 29, 272, 29, 0, 0, 0, 0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(
        &[[1i64, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let scores = rm.forward(&ids, &[9, 5]).unwrap().squeeze(1).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            (
                "input_ids".to_string(),
                ids.to_dtype(candle_core::DType::I64).unwrap(),
            ),
            ("attention_mask".to_string(), mask),
            ("scores".to_string(), scores),
        ]),
        out.join("rm_scores.safetensors"),
    )
    .unwrap();
}
