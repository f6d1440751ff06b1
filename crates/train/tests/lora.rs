//! LoRA: identity at attach, only adapters train, PEFT file layout, reload and merge equivalence, with DPO and
//! reward-model training.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rlhf_model::lora::{Lora, LoraConfig};
use rlhf_model::seq_cls::SeqCls;
use rlhf_model::CausalLm;
use rlhf_train::dpo::run_dpo;
use rlhf_train::pref_config::PrefConfig;
use rlhf_train::pref_loss::LossType;
use rlhf_train::rm::run_rm;
use serde_json::{json, Value};

fn llama() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models/llama"
    ))
}

fn ids() -> Tensor {
    Tensor::new(
        &[
            [1u32, 52, 29, 296, 14, 426, 32, 366, 2],
            [1, 273, 29, 272, 29, 296, 14, 22, 28],
        ],
        &Device::Cpu,
    )
    .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// LoRA training on `pairs_file(d)` into `d/out` (the learning rate is set, so the trainer's defaults do not matter).
fn lora_pref_config(d: &Path) -> PrefConfig {
    let mut c = PrefConfig {
        max_length: 64,
        ..PrefConfig::new(
            llama(),
            pairs_file(d),
            d.join("out"),
            &rlhf_train::TrainDefaults::DPO,
        )
    };
    c.train.learning_rate = 5e-3;
    c.train.max_steps = Some(12);
    c.train.lora = Some(lora_cfg());
    c
}

fn pairs_file(dir: &Path) -> PathBuf {
    let p = dir.join("train.jsonl");
    let mut f = std::fs::File::create(&p).unwrap();
    for i in 0..48u32 {
        let (a, b) = (10 + i, 30 + 2 * i);
        writeln!(f, "{}", json!({"prompt": format!("Q: {a}+{b}="), "chosen": format!(" {}", a + b), "rejected": format!(" {}", 1000 + 37 * i)})).unwrap();
    }
    p
}

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    }
}

#[test]
fn attach_is_identity_and_counts_only_adapters() {
    let base = CausalLm::load(&llama(), &Device::Cpu).unwrap();
    let want = base.forward(&ids()).unwrap();
    let mut m = CausalLm::load(&llama(), &Device::Cpu).unwrap();
    let lora = Lora::attach(&mut m, &lora_cfg(), 0).unwrap();
    assert_eq!(
        max_diff(&m.forward(&ids()).unwrap(), &want),
        0.0,
        "B = 0: the adapted model equals the base"
    );
    // Per layer: q (64→64), v (64→32), down (176→64); r = 4.
    assert_eq!(
        lora.num_parameters(),
        2 * 4 * ((64 + 64) + (64 + 32) + (176 + 64))
    );
    assert_eq!(lora.modules().len(), 6);
    let bad = Lora::attach(
        &mut CausalLm::load(&llama(), &Device::Cpu).unwrap(),
        &LoraConfig {
            target_modules: vec!["qkv".into()],
            ..lora_cfg()
        },
        0,
    );
    assert!(bad
        .err()
        .unwrap()
        .to_string()
        .contains("matches no linear layer"));
}

#[test]
fn dpo_with_lora_trains_adapters_only_and_round_trips_through_peft_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut cfg = lora_pref_config(d);
    cfg.dpo.loss_type = LossType::Sigmoid;
    let s = run_dpo(&cfg).unwrap();
    assert!(
        s.final_metrics["rewards/margins"] > 0.0,
        "{:?}",
        s.final_metrics
    );

    // PEFT layout in out/adapter; out itself is the merged model.
    let out = d.join("out");
    let adapter = out.join("adapter");
    let ac: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ac["peft_type"], "LORA");
    assert_eq!(ac["task_type"], "CAUSAL_LM");
    assert_eq!(
        (ac["r"].as_u64(), ac["lora_alpha"].as_f64()),
        (Some(4), Some(8.0))
    );
    assert_eq!(
        ac["target_modules"],
        json!(["q_proj", "v_proj", "down_proj"])
    );
    assert_eq!(
        ac["base_model_name_or_path"],
        json!(llama().display().to_string())
    );
    let w = candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(w.len(), 12);
    assert_eq!(
        w["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dims(),
        &[4, 64]
    );
    assert_eq!(
        w["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].dims(),
        &[32, 4]
    );
    assert_eq!(
        w["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].dims(),
        &[4, 176]
    );
    assert!(
        w["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0,
        "B trained"
    );

    // Reload onto the untouched base, then merge: same function without adapters.
    let base = CausalLm::load(&llama(), &Device::Cpu).unwrap();
    let base_logits = base.forward(&ids()).unwrap();
    let mut m = CausalLm::load(&llama(), &Device::Cpu).unwrap();
    let lora = Lora::load(&mut m, &adapter).unwrap();
    lora.set_training(false);
    let adapted = m.forward(&ids()).unwrap();
    assert!(
        max_diff(&adapted, &base_logits) > 1e-3,
        "training changed the function"
    );
    lora.set_enabled(false);
    assert_eq!(
        max_diff(&m.forward(&ids()).unwrap(), &base_logits),
        0.0,
        "disabled adapters = the frozen base"
    );
    lora.set_enabled(true);
    lora.merge_into(&mut m).unwrap();
    assert!(
        max_diff(&m.forward(&ids()).unwrap(), &adapted) < 1e-4,
        "merged = base + adapters"
    );
    m.save(&d.join("merged")).unwrap();
    let reloaded = CausalLm::load(&d.join("merged"), &Device::Cpu).unwrap();
    assert!(max_diff(&reloaded.forward(&ids()).unwrap(), &adapted) < 1e-4);
    // The run's own output is that merged model.
    let output = CausalLm::load(&out, &Device::Cpu).unwrap();
    assert!(
        max_diff(&output.forward(&ids()).unwrap(), &adapted) < 1e-4,
        "output_dir holds the merged model"
    );
}

#[test]
fn reward_model_with_lora_saves_adapters_and_head() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = lora_pref_config(d);
    let s = run_rm(&cfg).unwrap();
    assert!(s.final_metrics["accuracy"] >= 0.5);
    let out = d.join("out");
    let adapter = out.join("adapter");
    let ac: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (ac["task_type"].as_str(), ac["modules_to_save"].clone()),
        (Some("SEQ_CLS"), json!(["score"]))
    );
    let w = candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(w["base_model.model.score.weight"].dims(), &[1, 64]);
    // The adapters load back onto a fresh trunk (the head is PEFT's modules_to_save entry).
    let mut rm =
        SeqCls::from_causal_lm(CausalLm::load(&llama(), &Device::Cpu).unwrap(), 1, None, 0)
            .unwrap();
    let lora = Lora::load(&mut rm.lm, &adapter).unwrap();
    lora.set_training(false);
    assert_eq!(lora.modules().len(), 6);
    // out itself is the merged reward model: base + adapters, with the trained head.
    let head = &w["base_model.model.score.weight"];
    for var in rm.head().all_vars() {
        var.set(head).unwrap();
    }
    let merged = SeqCls::load(&out, 1, None, 0, &Device::Cpu).unwrap();
    let lengths = vec![ids().dims()[1]; ids().dims()[0]];
    let (a, b) = (
        rm.forward(&ids(), &lengths).unwrap(),
        merged.forward(&ids(), &lengths).unwrap(),
    );
    assert!(
        max_diff(&a, &b) < 1e-4,
        "output_dir holds base + adapters + head"
    );
}

#[test]
fn merge_handles_transposed_conv1d_weights() {
    // GPT-2 stores Conv1D weights [in, out]; the merged delta must be transposed to match.
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models/gpt2"
    ));
    let mut m = CausalLm::load(&dir, &Device::Cpu).unwrap();
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["c_attn".into(), "c_fc".into()],
    };
    let lora = Lora::attach(&mut m, &cfg, 3).unwrap();
    assert_eq!(lora.modules().len(), 4);
    // Give B non-zero values so the adapters change the function.
    for v in lora.varmap().all_vars() {
        let t = v.as_tensor();
        v.set(&(Tensor::randn(0f32, 0.1, t.dims(), &Device::Cpu).unwrap() + t).unwrap())
            .unwrap();
    }
    let adapted = m.forward(&ids()).unwrap();
    let base = CausalLm::load(&dir, &Device::Cpu)
        .unwrap()
        .forward(&ids())
        .unwrap();
    assert!(max_diff(&adapted, &base) > 1e-3);
    lora.merge_into(&mut m).unwrap();
    assert!(max_diff(&m.forward(&ids()).unwrap(), &adapted) < 1e-4);
}

#[test]
fn default_targets_are_the_architectures_as_in_peft() {
    // No target_modules: PEFT's per-model-type default (q_proj + v_proj for Llama, c_attn for GPT-2).
    let gpt2 = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models/gpt2"
    ));
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        ..LoraConfig::default()
    };
    for (dir, want) in [(llama(), vec!["q_proj", "v_proj"]), (gpt2, vec!["c_attn"])] {
        let mut m = CausalLm::load(&dir, &Device::Cpu).unwrap();
        let lora = Lora::attach(&mut m, &cfg, 0).unwrap();
        let layers = m.config().num_layers();
        assert_eq!(
            lora.modules().len(),
            want.len() * layers,
            "{}",
            dir.display()
        );
        assert!(
            lora.modules()
                .iter()
                .all(|n| want.iter().any(|t| n.ends_with(&format!(".{t}")))),
            "{:?}",
            lora.modules()
        );
        let tmp = tempfile::tempdir().unwrap();
        lora.save(tmp.path(), "base", "CAUSAL_LM", &[]).unwrap();
        let ac: Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            ac["target_modules"],
            json!(want),
            "the saved adapter names the modules it adapted"
        );
    }
}
