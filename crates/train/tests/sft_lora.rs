//! SFT with LoRA adapters on the addition data with the tiny fixture Llama: only the adapters train,
//! checkpoints resume bit-identically, and the output holds the adapter and the merged model.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use rlhf_model::lora::{Lora, LoraConfig};
use rlhf_model::CausalLm;
use rlhf_train::metrics::read_metrics;
use rlhf_train::{SftConfig, SftTrainer};

fn lora_config(out: &Path) -> SftConfig {
    let mut cfg = common::addition_config(out);
    // Adapters start at B = 0 and need a larger step than full fine-tuning to move in a few steps.
    cfg.train.learning_rate = 1e-2;
    cfg.train.max_steps = Some(12);
    // Dropout on: its masks are seeded and checkpointed, so runs and resumes are still exact.
    cfg.train.lora = Some(LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    });
    cfg
}

fn adapter_values(lora: &Lora) -> std::collections::BTreeMap<String, Vec<f32>> {
    let data = lora.varmap().data().lock().unwrap();
    data.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

fn logits(model: &CausalLm, ids: &Tensor) -> Vec<f32> {
    let h = model.hidden_states(ids, None).unwrap();
    let (b, t, d) = h.dims3().unwrap();
    model
        .logits(&h.reshape((b * t, d)).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn lora_trains_only_adapters_and_saves_adapter_and_merged_model() {
    let out = tempfile::tempdir().unwrap();
    let base_before = common::weights(&common::load(&common::model_dir()));
    let mut trainer = SftTrainer::new(lora_config(out.path())).unwrap();
    let adapters_before = adapter_values(trainer.lora().unwrap());
    // Only the adapters are optimised.
    let trained: Vec<&str> = trainer.optimizer().params().map(|(n, _)| n).collect();
    assert!(
        !trained.is_empty()
            && trained
                .iter()
                .all(|n| n.contains(".lora_A.") || n.contains(".lora_B.")),
        "{trained:?}"
    );

    let first = trainer.step().unwrap().loss;
    for _ in 1..6 {
        trainer.step().unwrap();
    }
    assert_eq!(
        common::weights(trainer.model()),
        base_before,
        "base weights changed"
    );
    let adapters_after = adapter_values(trainer.lora().unwrap());
    let moved = adapters_before
        .iter()
        .filter(|(k, v)| adapters_after[*k] != **v)
        .count();
    assert_eq!(
        moved,
        adapters_before.len(),
        "every adapter matrix should have moved"
    );

    let summary = trainer.train().unwrap();
    assert_eq!(summary.steps, 12);
    let losses: Vec<f64> = read_metrics(&summary.metrics_file)
        .unwrap()
        .iter()
        .filter_map(|r| r.loss)
        .collect();
    assert_eq!(losses.len(), 6, "train() logs the steps it ran (7..12)");
    let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(
        last < 0.9 * first,
        "loss did not drop: step 1 {first:.3}, last 3 steps {last:.3}"
    );

    // PEFT adapter in adapter/, a complete HF model (merged) in the output dir.
    let adapter_dir = out.path().join("adapter");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(adapter_dir.join(f).is_file(), "missing adapter/{f}");
    }
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.path().join(f).is_file(), "missing {f}");
    }
    let ac: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (ac["task_type"].as_str(), ac["r"].as_u64()),
        (Some("CAUSAL_LM"), Some(4))
    );

    // base + saved adapter computes what the merged model computes.
    let mut with_adapter = common::load(&common::model_dir());
    let lora = Lora::load(&mut with_adapter, &adapter_dir).unwrap();
    lora.set_training(false);
    let merged = common::load(out.path());
    let ids = Tensor::new(
        &[
            [1u32, 17, 42, 99, 5, 300, 7, 64],
            [3, 8, 13, 21, 34, 55, 89, 144],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let (a, b) = (logits(&with_adapter, &ids), logits(&merged, &ids));
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff <= 1e-4,
        "merged logits differ from base + adapter by {max_diff}"
    );
    // And the adapter matters: the merged model is not the base.
    let base_logits = logits(&common::load(&common::model_dir()), &ids);
    assert!(base_logits
        .iter()
        .zip(&b)
        .any(|(x, y)| (x - y).abs() > 1e-3));
}

#[test]
fn lora_resume_is_bit_identical() {
    let full_dir = tempfile::tempdir().unwrap();
    let killed_dir = tempfile::tempdir().unwrap();
    let config = |dir: &Path| {
        let mut cfg = lora_config(dir);
        cfg.train.max_steps = Some(7);
        cfg.train.save_steps = 3;
        cfg.train.weight_decay = 0.01;
        cfg
    };
    let mut full = SftTrainer::new(config(full_dir.path())).unwrap();
    full.train().unwrap();

    SftTrainer::new(config(killed_dir.path()))
        .unwrap()
        .train()
        .unwrap();
    let ckpt = killed_dir.path().join("checkpoint-3");
    // A LoRA checkpoint holds the adapter, not a full model.
    assert!(
        ckpt.join("adapter_model.safetensors").is_file()
            && !ckpt.join("model.safetensors").exists()
    );
    std::fs::remove_dir_all(killed_dir.path().join("checkpoint-6")).unwrap();
    std::fs::remove_dir_all(killed_dir.path().join("adapter")).unwrap();
    std::fs::remove_file(killed_dir.path().join("model.safetensors")).unwrap();
    let mut cfg = config(killed_dir.path());
    cfg.train.resume = true;
    let mut resumed = SftTrainer::new(cfg).unwrap();
    assert_eq!(resumed.state().global_step, 3);
    resumed.train().unwrap();

    let (a, b) = (
        common::weights(full.model()),
        common::weights(resumed.model()),
    );
    for (name, w) in &a {
        assert!(
            w.iter()
                .zip(&b[name])
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs after resume"
        );
    }
    for (name, _) in full.optimizer().params() {
        let (m1, v1, s1) = full.optimizer().state_of(name).unwrap();
        let (m2, v2, s2) = resumed.optimizer().state_of(name).unwrap();
        assert!(
            s1 == s2 && m1 == m2 && v1 == v2,
            "{name}: optimizer state differs"
        );
    }
    let read = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(
        read(full_dir.path()),
        read(killed_dir.path()),
        "saved adapters differ"
    );

    // Resuming with another LoRA rank is refused.
    let mut cfg = config(killed_dir.path());
    cfg.train.resume = true;
    cfg.train.lora.as_mut().unwrap().r = 2;
    let e = SftTrainer::new(cfg)
        .err()
        .expect("rank change must be refused")
        .to_string();
    assert!(e.contains("lora"), "{e}");
}

#[test]
fn lora_flags_and_toml_keys() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("sft.toml");
    let root = common::root();
    std::fs::write(
        &toml,
        format!(
            "model = {:?}\ntrain_file = {:?}\noutput_dir = {:?}\nlora_r = 16\nlora_alpha = 32\nlora_target_modules = [\"q_proj\", \"k_proj\"]\n",
            common::model_dir(),
            root.join("data/sft_train.jsonl"),
            dir.path().join("out")
        ),
    )
    .unwrap();
    let cfg = SftConfig::from_toml_file(&toml).unwrap();
    let l = cfg.train.lora.unwrap();
    assert_eq!(
        (l.r, l.alpha, l.dropout),
        (16, 32.0, LoraConfig::default().dropout)
    );
    assert_eq!(l.target_modules, ["q_proj", "k_proj"]);

    let flag = format!("--config={}", toml.display());
    let cfg = common::sft_flags(&[flag.as_str(), "--lora-r", "2", "--lora-dropout", "0"]).unwrap();
    let l = cfg.train.lora.unwrap();
    assert_eq!((l.r, l.alpha, l.dropout), (2, 32.0, 0.0));

    // Without any lora key, full fine-tuning.
    let plain = common::sft_flags(&[
        "--model",
        common::model_dir().to_str().unwrap(),
        "--train-file",
        root.join("data/sft_train.jsonl").to_str().unwrap(),
        "--output-dir",
        "o",
    ])
    .unwrap();
    assert!(plain.train.lora.is_none());

    let e = common::sft_flags(&[flag.as_str(), "--lora-dropout", "1.5"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora_dropout") && e.contains("[0, 1)"), "{e}");
    std::fs::write(&toml, "lora_r = \"eight\"\n").unwrap();
    let e = SftConfig::from_toml_file(&toml).unwrap_err().to_string();
    assert!(e.contains("sft.toml") && e.contains("lora_r"), "{e}");
}
