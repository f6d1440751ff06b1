//! Parity with `transformers` on the fixtures of `tools/make_fixtures.py` (see fixtures/README.md).

use candle_core::{DType, Device, Tensor};
use rlhf_model::seq_cls::SeqCls;
use rlhf_model::{generate, CausalLm, GenRequest, Sampling};
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

fn load(name: &str) -> CausalLm {
    CausalLm::load(&fixtures().join("models").join(name), &Device::Cpu).unwrap()
}

fn reference_logits() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("reference/logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// Max |Δ| over the valid (non-pad) positions.
fn valid_max_diff(ours: &Tensor, theirs: &Tensor, lengths: &[i64]) -> f32 {
    let mut worst = 0f32;
    for (row, &len) in lengths.iter().enumerate() {
        let a = ours.get(row).unwrap().narrow(0, 0, len as usize).unwrap();
        let b = theirs.get(row).unwrap().narrow(0, 0, len as usize).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        worst = worst.max(d.to_scalar::<f32>().unwrap());
    }
    worst
}

#[test]
fn logits_match_transformers() {
    let r = reference_logits();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let lengths = r["lengths"].to_vec1::<i64>().unwrap();
    for (dir, key) in [
        ("llama", "llama"),
        ("llama-sharded", "llama"),
        ("qwen2", "qwen2"),
        ("gpt2", "gpt2"),
        ("mistral", "mistral"),
    ] {
        let m = load(dir);
        let logits = m.forward(&ids).unwrap();
        let d = valid_max_diff(&logits, &r[&format!("{key}.logits")], &lengths);
        eprintln!("{dir}: max |Δlogits| vs transformers = {d:.2e}");
        assert!(d <= 1e-4, "{dir}: max |Δlogits| = {d}");
    }
}

fn greedy_reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("reference/greedy.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn greedy_generation_matches_transformers() {
    let g = greedy_reference();
    let max_new = g["max_new_tokens"].as_u64().unwrap() as usize;
    let prompts: Vec<Vec<u32>> = g["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids_of)
        .collect();
    for name in ["llama", "qwen2", "gpt2", "mistral"] {
        let m = load(name);
        let expect = g["models"][name].as_array().unwrap();
        // One prompt at a time, EOS disabled / EOS 2 / custom stop id.
        for (p, e) in prompts.iter().zip(expect) {
            let req = |stop_ids: Vec<u32>| GenRequest {
                prompt_ids: p.clone(),
                max_new_tokens: max_new,
                sampling: Sampling::greedy(),
                stop_ids,
                ..Default::default()
            };
            let out = generate(&m, &[req(vec![])], None).unwrap();
            assert_eq!(
                out[0].tokens,
                ids_of(&e["no_eos_stop"]),
                "{name} no_eos_stop"
            );
            let out = generate(&m, &[req(vec![2])], None).unwrap();
            assert_eq!(out[0].tokens, ids_of(&e["eos_stop"]), "{name} eos_stop");
            let stop = e["custom_stop"]["eos_token_id"].as_u64().unwrap() as u32;
            let out = generate(&m, &[req(vec![stop])], None).unwrap();
            assert_eq!(
                out[0].tokens,
                ids_of(&e["custom_stop"]["ids"]),
                "{name} custom_stop"
            );
            assert_eq!(out[0].finish_reason, rlhf_model::FinishReason::Eos);
        }
        // All prompts in one left-padded batch.
        let reqs: Vec<GenRequest> = prompts
            .iter()
            .map(|p| GenRequest {
                prompt_ids: p.clone(),
                max_new_tokens: max_new,
                sampling: Sampling::greedy(),
                ..Default::default()
            })
            .collect();
        let out = generate(&m, &reqs, None).unwrap();
        let batched = g["batched_left_padded"]["models"][name].as_array().unwrap();
        for (o, e) in out.iter().zip(batched) {
            assert_eq!(o.tokens, ids_of(e), "{name} batched");
        }
    }
}

/// `*ForSequenceClassification` checkpoints written by transformers: scores at the last token and at
/// every position, then a save / load round trip that keeps the architecture's class name.
#[test]
fn reward_models_match_transformers_and_round_trip() {
    let r = reference_logits();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let lengths = r["lengths"].to_vec1::<i64>().unwrap();
    let lens: Vec<usize> = lengths.iter().map(|&l| l as usize).collect();
    for (name, class) in [
        ("llama-rm", "LlamaForSequenceClassification"),
        ("mistral-rm", "MistralForSequenceClassification"),
    ] {
        let rm = SeqCls::load(
            &fixtures().join("models").join(name),
            1,
            None,
            0,
            &Device::Cpu,
        )
        .unwrap();
        let scores = rm.forward(&ids, &lens).unwrap();
        let want = &r[&format!("{name}.scores")];
        let d = (scores.squeeze(1).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-4, "{name}: max |Δscore| = {d}");
        let per_pos = rm.token_scores(&ids).unwrap();
        let d = valid_max_diff(&per_pos, &r[&format!("{name}.token_scores")], &lengths);
        assert!(d <= 1e-4, "{name}: max |Δtoken score| = {d}");

        let dir = tempfile::tempdir().unwrap();
        rm.save(dir.path()).unwrap();
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architectures"][0], class, "{name}");
        let again = SeqCls::load(dir.path(), 1, None, 0, &Device::Cpu).unwrap();
        let again = again.forward(&ids, &lens).unwrap();
        assert_eq!(
            again.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            scores.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name} reloaded"
        );
    }
}

/// The fixture Mistral has `sliding_window` 96, which transformers applies (tools/make_fixtures.py checks
/// that it changes the logits beyond 96 tokens): 96 tokens run, 97 are refused with an error naming the
/// field, in a plain forward and in generation.
#[test]
fn mistral_refuses_sequences_longer_than_its_sliding_window() {
    let m = load("mistral");
    let window = m.config().raw["sliding_window"].as_u64().unwrap() as usize;
    let row = |n: usize| {
        Tensor::from_vec(
            (0..n as u32).map(|i| 4 + i % 500).collect::<Vec<_>>(),
            (1, n),
            &Device::Cpu,
        )
        .unwrap()
    };
    m.forward(&row(window)).unwrap();
    let err = m.forward(&row(window + 1)).unwrap_err().to_string();
    assert!(
        err.contains("sliding_window") && err.contains("96"),
        "{err}"
    );

    let req = |prompt: usize, new: usize| GenRequest {
        prompt_ids: (0..prompt as u32).map(|i| 4 + i).collect(),
        max_new_tokens: new,
        sampling: Sampling::greedy(),
        ..Default::default()
    };
    // The last generated token is not fed back, so prompt + new − 1 positions are run.
    assert_eq!(
        generate(&m, &[req(90, 7)], None).unwrap()[0].tokens.len(),
        7
    );
    let err = generate(&m, &[req(90, 8)], None).unwrap_err().to_string();
    assert!(err.contains("sliding_window"), "{err}");
}
