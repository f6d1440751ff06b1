//! End-to-end reward modelling on the fixture tiny Llama: learning a clear preference signal (held-out
//! accuracy ≥ 0.9), the saved `LlamaForSequenceClassification` directory, `rm score` with an ensemble, ratings,
//! and the failure paths (bad rows, bad config keys, non-finite loss).

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rlhf_model::seq_cls::SeqCls;
use rlhf_train::pref_config::PrefConfig;
use rlhf_train::rm::{run_rm, run_rm_score, RmArgs, RmScoreArgs};
use rlhf_train::settings::load;
use rlhf_train::{TrainDefaults, TrainError};
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

/// Chosen = the correct sum (≤ 3 digits), rejected = a random far-off number (4 digits).
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

fn base_cfg(dir: &Path) -> PrefConfig {
    let mut c = PrefConfig {
        eval_file: Some(dir.join("eval.jsonl")),
        max_length: 64,
        batch_size: 8,
        ..PrefConfig::new(
            llama(),
            dir.join("train.jsonl"),
            dir.join("out"),
            &TrainDefaults::RM,
        )
    };
    c.train.learning_rate = 1e-3;
    c.train.max_steps = Some(40);
    c.train.logging_steps = 10;
    c
}

#[test]
fn reward_model_learns_a_clear_signal_and_scores_with_an_ensemble() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_jsonl(&d.join("train.jsonl"), &sum_pairs(320, 1));
    write_jsonl(&d.join("eval.jsonl"), &sum_pairs(100, 2));
    let mut cfg = base_cfg(d);
    cfg.rm.num_heads = 3;
    let s = run_rm(&cfg).unwrap();
    let eval = s.eval.clone().unwrap();
    assert!(
        eval["accuracy"] >= 0.9,
        "held-out accuracy {}",
        eval["accuracy"]
    );
    assert!(eval["margin"] > 0.0);
    assert!(s.final_loss < 0.69, "final loss {}", s.final_loss);

    // Metrics log: TRL names on train and eval lines.
    let log = std::fs::read_to_string(&s.metrics_file).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|l| l.get("accuracy").is_some()
        && l.get("margin").is_some()
        && l.get("loss").is_some()));
    assert!(lines.iter().any(|l| l.get("eval_accuracy").is_some()));

    // The saved directory is a 3-label LlamaForSequenceClassification.
    let out = d.join("out");
    let cfg_json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg_json["architectures"],
        json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(cfg_json["num_labels"], json!(3));
    assert_eq!(cfg_json["pad_token_id"], json!(0));
    let m = SeqCls::load(&out, 1, None, 0, &Device::Cpu).unwrap();
    assert_eq!(m.num_labels(), 3);
    assert!(out.join("tokenizer.json").is_file());

    // Scoring: rows with an item_id get the ensemble's disagreement as `uncertainty`.
    write_jsonl(
        &d.join("score.jsonl"),
        &[
            json!({"prompt": "Q: 12+30=", "completion": " 42", "item_id": "a"}),
            json!({"prompt": "Q: 12+30=", "completion": " 5821", "item_id": 7}),
        ],
    );
    let n = run_rm_score(&RmScoreArgs {
        models: vec![out.clone()],
        input: d.join("score.jsonl"),
        output: d.join("scored.jsonl"),
        batch_size: 16,
        max_length: 64,
        chat_template: None,
    })
    .unwrap();
    assert_eq!(n, 2);
    let scored: Vec<Value> = std::fs::read_to_string(d.join("scored.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(scored[0]["reward"].as_f64().unwrap() > scored[1]["reward"].as_f64().unwrap());
    for r in &scored {
        assert!(r["reward_std"].as_f64().unwrap() >= 0.0);
        assert_eq!(r["uncertainty"], r["reward_std"]);
    }
    assert_eq!(scored[1]["item_id"], json!(7));
}

#[test]
fn ratings_regress_on_the_normalised_score() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let rows: Vec<Value> = (0..64)
        .map(|_| {
            let good = rng.gen_bool(0.5);
            let (a, b) = (rng.gen_range(10..100), rng.gen_range(10..100));
            let c = if good { format!(" {}", a + b) } else { format!(" {}", rng.gen_range(1000..10000)) };
            json!({"prompt": format!("Q: {a}+{b}="), "completion": c, "score": if good { 5 } else { 1 }})
        })
        .collect();
    write_jsonl(&d.join("train.jsonl"), &rows);
    let mut cfg = base_cfg(d);
    cfg.eval_file = None;
    cfg.train.max_steps = Some(60);
    cfg.rm.score_min = Some(1.0);
    cfg.rm.score_max = Some(5.0);
    let s = run_rm(&cfg).unwrap();
    // A constant prediction scores 0.25 on these balanced 0/1 targets.
    assert!(
        s.final_loss < 0.05,
        "MSE on [0,1] targets after 60 steps: {}",
        s.final_loss
    );
}

#[test]
fn bad_rows_and_keys_are_reported_with_their_location() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(
        d.join("train.jsonl"),
        "{\"prompt\": \"Q: 1+1=\", \"chosen\": \" 2\", \"rejected\": \" 3\"}\n{\"prompt\": \"Q: 1+2=\", \"chosen\": 3, \"rejected\": \" 4\"}\n",
    )
    .unwrap();
    let mut cfg = base_cfg(d);
    cfg.eval_file = None;
    let err = run_rm(&cfg).expect_err("bad row").to_string();
    assert!(
        err.contains("train.jsonl:2") && err.contains("\"chosen\""),
        "{err}"
    );

    std::fs::write(
        d.join("rm.toml"),
        "batch_size = 4\n[rm]\nnum_heads = 2\ncenter_reward = 0.1\n",
    )
    .unwrap();
    let flags = ["--config".into(), d.join("rm.toml").into()];
    let err = load::<RmArgs>("rm", &flags)
        .unwrap_err()
        .settings()
        .unwrap()
        .to_string();
    assert!(
        err.contains("rm.toml:4")
            && err.contains("rm.center_reward")
            && err.contains("unknown key"),
        "{err}"
    );

    // Ill-typed values name their file, line and key, inside sections too.
    for (toml, key) in [
        ("batch_size = \"x\"\n", "rm.toml:1: key \"batch_size\""),
        (
            "\n[rm]\nnum_heads = 1.5\n",
            "rm.toml:3: key \"rm.num_heads\"",
        ),
    ] {
        std::fs::write(d.join("rm.toml"), toml).unwrap();
        let err = load::<RmArgs>("rm", &flags)
            .unwrap_err()
            .settings()
            .unwrap()
            .to_string();
        assert!(err.contains(key) && err.contains("invalid type"), "{err}");
    }
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_jsonl(&d.join("train.jsonl"), &sum_pairs(64, 4));
    let mut cfg = base_cfg(d);
    cfg.eval_file = None;
    // A learning rate this large overflows the activations within a few steps.
    cfg.train.learning_rate = 1e30;
    cfg.train.max_grad_norm = 0.0;
    cfg.train.save_steps = 1;
    cfg.train.max_steps = Some(20);
    match run_rm(&cfg) {
        Err(e @ TrainError::NonFinite { .. }) => {
            let TrainError::NonFinite {
                step,
                last_checkpoint,
                ..
            } = &e
            else {
                unreachable!()
            };
            let ckpt = last_checkpoint
                .clone()
                .expect("a checkpoint was saved before divergence");
            assert_eq!(ckpt, d.join("out").join(format!("checkpoint-{}", step - 1)));
            assert!(ckpt.join("model.safetensors").is_file() && ckpt.join("config.json").is_file());
            // The loss of step s is computed with the weights saved at step s − 1: the message says so.
            assert!(
                e.to_string().contains(&format!(
                    "{} holds the weights that diverged",
                    ckpt.display()
                )),
                "{e}"
            );
        }
        other => panic!(
            "expected a non-finite stop, got {:?}",
            other.map(|s| s.final_loss)
        ),
    }
}
