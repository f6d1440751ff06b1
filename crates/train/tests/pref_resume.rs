//! `rlhf rm` / `rlhf dpo` resume: a run interrupted after a checkpoint and resumed ends bit-identical to an
//! uninterrupted one (full fine-tuning and LoRA with dropout > 0, whose masks are seeded and checkpointed),
//! logs every step once, and a checkpoint trained with other settings is refused, naming the keys.

use std::io::Write;
use std::path::{Path, PathBuf};

use rlhf_model::lora::LoraConfig;
use rlhf_train::pref_config::PrefConfig;
use rlhf_train::pref_loss::LossType;
use rlhf_train::pref_train::PrefSummary;
use rlhf_train::TrainDefaults;
use serde_json::{json, Value};

fn llama() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models/llama"
    ))
}

fn pairs(path: &Path, n: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    for i in 0..n {
        let (a, b) = (10 + i % 83, 17 + (i * 7) % 71);
        let row = json!({"prompt": format!("Q: {a}+{b}="), "chosen": format!(" {}", a + b), "rejected": format!(" {}", a * b + 1000)});
        writeln!(f, "{row}").unwrap();
    }
}

fn cfg(data: &Path, out: &Path, lora: bool) -> PrefConfig {
    let mut c = PrefConfig {
        max_length: 64,
        batch_size: 4,
        ..PrefConfig::new(llama(), data.into(), out.into(), &TrainDefaults::DPO)
    };
    let t = &mut c.train;
    t.learning_rate = 1e-3;
    t.max_steps = Some(6);
    t.save_steps = 3;
    t.logging_steps = 1;
    t.lora = lora.then(|| LoraConfig {
        dropout: 0.1,
        ..LoraConfig::default()
    });
    c
}

type Run = fn(&PrefConfig) -> rlhf_train::Result<PrefSummary>;

/// The files that hold the trained weights.
fn weight_files(lora: bool) -> &'static [&'static str] {
    if lora {
        &["adapter/adapter_model.safetensors", "model.safetensors"]
    } else {
        &["model.safetensors", "config.json"]
    }
}

fn train_lines(out: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                format!("{} {} {}", v["loss"], v["grad_norm"], v["learning_rate"]),
            )
        })
        .collect()
}

/// Uninterrupted run vs. a run "killed" after checkpoint-3 (later checkpoint and final weights lost) and resumed.
fn assert_resume_is_bit_identical(run: Run, loss: Option<LossType>, lora: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pairs.jsonl");
    pairs(&data, 40);
    let (full, killed) = (tmp.path().join("full"), tmp.path().join("killed"));
    let config = |out: &Path| {
        let mut c = cfg(&data, out, lora);
        if let Some(l) = loss {
            c.dpo.loss_type = l;
        }
        c
    };
    run(&config(&full)).unwrap();
    run(&config(&killed)).unwrap();
    std::fs::remove_dir_all(killed.join("checkpoint-6")).unwrap();
    for f in weight_files(lora) {
        std::fs::remove_file(killed.join(f)).unwrap();
    }
    let mut c = config(&killed);
    c.train.resume = true;
    let s = run(&c).unwrap();
    assert_eq!((s.resumed_from_step, s.steps), (Some(3), 6));
    for f in weight_files(lora) {
        assert!(
            std::fs::read(full.join(f)).unwrap() == std::fs::read(killed.join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
    let (a, b) = (train_lines(&full), train_lines(&killed));
    assert_eq!(
        a.iter().map(|l| l.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(a, b, "resumed metrics differ");
}

#[test]
fn rm_resume_is_bit_identical() {
    assert_resume_is_bit_identical(rlhf_train::rm::run_rm, None, false);
}

#[test]
fn rm_lora_with_dropout_resume_is_bit_identical() {
    assert_resume_is_bit_identical(rlhf_train::rm::run_rm, None, true);
}

#[test]
fn dpo_resume_is_bit_identical() {
    assert_resume_is_bit_identical(rlhf_train::dpo::run_dpo, Some(LossType::Sigmoid), false);
}

#[test]
fn dpo_lora_with_dropout_resume_is_bit_identical() {
    assert_resume_is_bit_identical(rlhf_train::dpo::run_dpo, Some(LossType::Sigmoid), true);
}

#[test]
fn lora_dropout_runs_are_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pairs.jsonl");
    pairs(&data, 40);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut c = cfg(&data, &a, true);
    c.train.save_steps = 0;
    rlhf_train::dpo::run_dpo(&c).unwrap();
    c.train.output_dir = b.clone();
    rlhf_train::dpo::run_dpo(&c).unwrap();
    let read = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        read(&a) == read(&b),
        "two identical LoRA runs with dropout 0.1 gave different adapters"
    );
    // And dropout is on: another seed gives another adapter.
    c.train.output_dir = tmp.path().join("c");
    c.train.seed = 7;
    rlhf_train::dpo::run_dpo(&c).unwrap();
    assert!(read(&a) != read(&tmp.path().join("c")));
}

#[test]
fn resume_refuses_a_checkpoint_with_other_settings_naming_every_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pairs.jsonl");
    pairs(&data, 40);
    let out = tmp.path().join("out");
    let mut c = cfg(&data, &out, false);
    c.train.max_steps = Some(3);
    rlhf_train::rm::run_rm(&c).unwrap();
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    c.train.resume = true;
    c.train.learning_rate = 5e-4;
    c.train.max_steps = Some(5);
    // Logging cadence may change.
    c.train.logging_steps = 2;
    let e = rlhf_train::rm::run_rm(&c).unwrap_err().to_string();
    assert!(e.contains("checkpoint-3/training_config.json"), "{e}");
    assert!(
        e.contains("learning_rate (checkpoint: 0.001, now: 0.0005)")
            && e.contains("max_steps (checkpoint: 3, now: 5)"),
        "{e}"
    );
    assert!(!e.contains("logging_steps"), "{e}");
    assert_eq!(
        std::fs::read(out.join("metrics.jsonl")).unwrap(),
        before,
        "a refused resume changed metrics.jsonl"
    );
}
