//! End-to-end DPO-family training on the fixture tiny Llama: preference accuracy and margins move the right
//! way, every loss type trains, and the failure paths (missing reference, mismatched data, bad config).

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rlhf_train::dpo::{DpoArgs, DpoTrainer};
use rlhf_train::pref_config::PrefConfig;
use rlhf_train::pref_loss::LossType;
use rlhf_train::pref_train::{train_loop, Objective};
use rlhf_train::settings::load;
use rlhf_train::TrainDefaults;
use serde_json::{json, Value};

fn llama() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models/llama"
    ))
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let mut f = std::fs::File::create(path).unwrap();
    for r in rows {
        writeln!(f, "{r}").unwrap();
    }
}

/// Chosen = the correct sum, rejected = a random far-off number.
fn sum_pairs(n: usize, seed: u64) -> Vec<Value> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (a, b) = (rng.gen_range(10..100), rng.gen_range(10..100));
            let wrong: u32 = rng.gen_range(1000..10000);
            json!({"prompt": format!("Q: {a}+{b}="), "chosen": format!(" {}", a + b), "rejected": format!(" {wrong}")})
        })
        .collect()
}

fn cfg(dir: &Path, loss: LossType) -> PrefConfig {
    write_jsonl(&dir.join("train.jsonl"), &sum_pairs(160, 1));
    write_jsonl(&dir.join("eval.jsonl"), &sum_pairs(64, 2));
    let mut c = PrefConfig {
        eval_file: Some(dir.join("eval.jsonl")),
        max_length: 64,
        batch_size: 8,
        ..PrefConfig::new(
            llama(),
            dir.join("train.jsonl"),
            dir.join("out"),
            &TrainDefaults::DPO,
        )
    };
    c.train.learning_rate = 5e-4;
    c.train.lr_scheduler_type = rlhf_train::schedule::ScheduleKind::Constant;
    c.train.max_steps = Some(20);
    c.dpo.loss_type = loss;
    c
}

#[test]
fn dpo_moves_preference_accuracy_and_margins_the_right_way() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path(), LossType::Sigmoid);
    c.train.max_steps = Some(60);
    let mut t = DpoTrainer::new(&c).unwrap();
    let before = t.evaluate().unwrap().unwrap();
    // Policy = reference at the start: every implicit reward is 0.
    assert!(
        before["rewards/margins"].abs() < 1e-6
            && (before["loss"] - std::f64::consts::LN_2).abs() < 1e-5
    );
    let s = train_loop(&mut t, &c).unwrap();
    let after = s.eval.clone().unwrap();
    // From all-ties (accuracy 0, margin 0) to a clear held-out preference (60 steps at β 0.1, lr 5e-4).
    assert!(
        after["rewards/accuracies"] >= 0.75,
        "eval reward accuracy {}",
        after["rewards/accuracies"]
    );
    assert!(
        after["rewards/margins"] > 0.2,
        "eval margin {}",
        after["rewards/margins"]
    );
    assert!(after["rewards/chosen"] > after["rewards/rejected"]);
    assert!(
        after["loss"] < std::f64::consts::LN_2 - 0.1,
        "eval loss {}",
        after["loss"]
    );
    let line: Value = serde_json::from_str(
        std::fs::read_to_string(&s.metrics_file)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    for k in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(line.get(k).is_some(), "metrics line lacks {k}: {line}");
    }
    assert!(
        tmp.path().join("out/model.safetensors").is_file()
            && tmp.path().join("out/tokenizer.json").is_file()
    );
}

#[test]
fn every_loss_type_trains() {
    for loss in [
        LossType::Ipo,
        LossType::Robust,
        LossType::Hinge,
        LossType::Kto,
        LossType::Orpo,
        LossType::Simpo,
        LossType::Cpl,
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(tmp.path(), loss);
        c.dpo.params.label_smoothing = if loss == LossType::Robust { 0.1 } else { 0.0 };
        if loss == LossType::Simpo {
            c.dpo.params.beta = 2.0;
        }
        let mut t = DpoTrainer::new(&c).unwrap();
        let before = t.evaluate().unwrap().unwrap();
        let s = train_loop(&mut t, &c).unwrap();
        let after = s.eval.unwrap();
        assert!(
            after["loss"] < before["loss"],
            "{loss:?}: eval loss {} -> {}",
            before["loss"],
            after["loss"]
        );
        assert!(
            after["rewards/margins"] > before["rewards/margins"],
            "{loss:?}: margins {} -> {}",
            before["rewards/margins"],
            after["rewards/margins"]
        );
        if loss == LossType::Kto {
            assert!(after.contains_key("kl"));
        }
    }
}

#[test]
fn precomputed_reference_log_probs_give_the_same_first_step() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path(), LossType::Sigmoid);
    let mut live = DpoTrainer::new(&c).unwrap();
    c.dpo.precompute_ref_log_probs = true;
    let mut pre = DpoTrainer::new(&c).unwrap();
    for _ in 0..2 {
        let (a, b) = (
            live.forward(&[0, 1, 2, 3]).unwrap(),
            pre.forward(&[0, 1, 2, 3]).unwrap(),
        );
        let (la, lb) = (
            a.loss.to_scalar::<f32>().unwrap(),
            b.loss.to_scalar::<f32>().unwrap(),
        );
        assert!((la - lb).abs() < 1e-6, "{la} vs {lb}");
        for t in [&mut live, &mut pre] {
            let o = t.forward(&[0, 1, 2, 3]).unwrap();
            let g = t
                .optimizer()
                .collect_grads(&rlhf_model::backward(&o.loss).unwrap())
                .unwrap();
            t.optimizer_mut().step(&g, 1e-3, None).unwrap();
        }
    }
}

#[test]
fn failure_paths_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_jsonl(&d.join("train.jsonl"), &sum_pairs(8, 1));
    let (model, train, out) = (
        llama().display().to_string(),
        d.join("train.jsonl").display().to_string(),
        d.join("out").display().to_string(),
    );
    let dpo = |extra: &[&str]| -> rlhf_train::Result<PrefConfig> {
        let flags: Vec<std::ffi::OsString> = [
            "--model",
            &model,
            "--train-file",
            &train,
            "--output-dir",
            &out,
        ]
        .iter()
        .chain(extra)
        .map(Into::into)
        .collect();
        load::<DpoArgs>("dpo", &flags)?.resolve()
    };
    let missing = d.join("no-such-ref").display().to_string();
    let err = dpo(&["--reference-model", &missing])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"reference_model\"")
            && err.contains("no-such-ref")
            && err.contains("command line"),
        "{err}"
    );

    let err = dpo(&["--beta", "0"]).unwrap_err().to_string();
    assert!(err.contains("\"beta\""), "{err}");

    let file = d.join("dpo.toml").display().to_string();
    std::fs::write(
        &file,
        "[dpo]\nloss_type = \"sigmoid\"\nbeta = 0.2\ngamma = 1\n",
    )
    .unwrap();
    let err = dpo(&["--config", &file]).unwrap_err().to_string();
    assert!(
        err.contains("dpo.toml:4") && err.contains("dpo.gamma") && err.contains("unknown key"),
        "{err}"
    );

    // The sections of older files read as the flat keys: `[dpo] simpo_gamma` is `simpo_gamma`, `[lora] r` is `lora_r`.
    std::fs::write(
        &file,
        "[dpo]\nloss_type = \"simpo\"\nsimpo_gamma = 1.0\n[lora]\nr = 4\n",
    )
    .unwrap();
    let ok = dpo(&["--config", &file]).unwrap();
    assert_eq!(
        (
            ok.dpo.loss_type,
            ok.dpo.params.simpo_gamma,
            ok.train.lora.as_ref().unwrap().r
        ),
        (LossType::Simpo, 1.0, 4)
    );

    // Unpaired rows only fit kto.
    write_jsonl(
        &d.join("unpaired.jsonl"),
        &[json!({"prompt": "Q: 1+1=", "completion": " 2", "label": true})],
    );
    let mut c = cfg(d, LossType::Sigmoid);
    c.train_file = d.join("unpaired.jsonl");
    let err = DpoTrainer::new(&c)
        .err()
        .expect("unpaired data for sigmoid")
        .to_string();
    assert!(
        err.contains("unpaired.jsonl") && err.contains("not unpaired"),
        "{err}"
    );
}

/// `bf16 = true` (TOML key or `--bf16`) runs the policy and its reference with bf16 matrix products, and DPO
/// still learns the preference; the numbers differ from the f32 run's (the bf16 path is taken) but stay close.
#[test]
fn bf16_dpo_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut c = cfg(d, LossType::Sigmoid);
    c.train.logging_steps = 1;
    std::fs::write(d.join("bf16.toml"), "bf16 = true\n").unwrap();
    let bf16 = |extra: &[&str]| {
        let file = d.join("bf16.toml");
        let flags: Vec<std::ffi::OsString> = ["--config", file.to_str().unwrap()]
            .iter()
            .chain(extra)
            .map(Into::into)
            .collect();
        load::<DpoArgs>("dpo", &flags).unwrap().common.train.bf16
    };
    assert_eq!(
        (bf16(&[]), bf16(&["--bf16", "false"])),
        (Some(true), Some(false))
    );

    let losses = |c: &PrefConfig| -> Vec<f64> {
        let mut t = DpoTrainer::new(c).unwrap();
        let want = if c.train.bf16 {
            rlhf_model::Precision::Bf16
        } else {
            rlhf_model::Precision::Fp32
        };
        assert_eq!(t.policy().precision(), want);
        let s = train_loop(&mut t, c).unwrap();
        std::fs::read_to_string(&s.metrics_file)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter_map(|v| v["loss"].as_f64())
            .collect()
    };
    let mut c32 = c.clone();
    c32.train.output_dir = d.join("out32");
    let l32 = losses(&c32);
    c.train.bf16 = true;
    c.train.max_steps = Some(60);
    let l16 = losses(&c);
    // Step 1: policy = reference in both precisions, so the loss is ln 2 exactly; from step 2 on bf16 rounding shows.
    assert_eq!(l32[0], l16[0]);
    assert!(
        (l16[0] - std::f64::consts::LN_2).abs() < 1e-6,
        "step-1 loss {}",
        l16[0]
    );
    let rel = (l32[1] - l16[1]).abs() / l32[1];
    assert!(
        rel > 0.0 && rel < 1e-2,
        "step-2 loss: f32 {} vs bf16 {}",
        l32[1],
        l16[1]
    );
    let eval = std::fs::read_to_string(d.join("out/metrics.jsonl")).unwrap();
    let last: Value = serde_json::from_str(eval.lines().last().unwrap()).unwrap();
    assert!(
        last["eval_rewards/accuracies"].as_f64().unwrap() >= 0.75,
        "bf16 eval: {last}"
    );
    assert!(
        last["eval_loss"].as_f64().unwrap() < std::f64::consts::LN_2 - 0.1,
        "bf16 eval: {last}"
    );
}
