//! SFT configuration: TOML file + flags, defaults, and errors that name the file and key.

mod common;

use rlhf_train::schedule::ScheduleKind;
use rlhf_train::{SftArgs, SftConfig};

fn write(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("sft.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn base(dir: &std::path::Path) -> String {
    let root = common::root();
    format!(
        "model = \"{}\"\ntrain_file = \"{}\"\noutput_dir = \"{}\"\n",
        common::model_dir().display(),
        root.join("data/sft_train.jsonl").display(),
        dir.join("out").display()
    )
}

#[test]
fn file_values_defaults_and_flag_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &(base(dir.path()) + "learning_rate = 1e-3\nbatch_size = 4\nlr_scheduler_type = \"cosine\"\npacking = true\n"));
    let cfg = SftConfig::from_toml_file(&path).unwrap();
    assert_eq!(
        (
            cfg.train.learning_rate,
            cfg.batch_size,
            cfg.train.lr_scheduler_type,
            cfg.packing
        ),
        (1e-3, 4, ScheduleKind::Cosine, true)
    );
    // Untouched keys keep the defaults.
    let d = SftConfig::with_defaults(
        cfg.model.clone(),
        cfg.train_file.clone(),
        cfg.train.output_dir.clone(),
    );
    assert_eq!(
        (
            cfg.train.max_grad_norm,
            cfg.completion_only_loss,
            cfg.train.seed
        ),
        (d.train.max_grad_norm, d.completion_only_loss, d.train.seed)
    );

    let config_flag = format!("--config={}", path.display());
    let cfg = common::sft_flags(&[
        config_flag.as_str(),
        "--learning-rate",
        "5e-4",
        "--packing",
        "false",
        "--resume",
    ])
    .unwrap();
    assert_eq!(
        (
            cfg.train.learning_rate,
            cfg.batch_size,
            cfg.packing,
            cfg.train.resume
        ),
        (5e-4, 4, false, true)
    );
}

#[test]
fn every_setting_is_a_flag_and_a_key() {
    let keys: Vec<String> = serde_json::to_value(SftArgs::default())
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "config")
        .cloned()
        .collect();
    for k in [
        "model",
        "train_file",
        "eval_file",
        "output_dir",
        "max_length",
        "packing",
        "completion_only_loss",
        "batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "max_steps",
        "num_train_epochs",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "seed",
        "resume",
    ] {
        assert!(keys.iter().any(|x| x == k), "no setting {k}");
    }
    // The resolved config serialises with the same names (it is stored in checkpoints).
    let dir = tempfile::tempdir().unwrap();
    let cfg = SftConfig::from_toml_file(&write(dir.path(), &base(dir.path()))).unwrap();
    let json = serde_json::to_value(&cfg).unwrap();
    // The `lora_*` keys are stored together as `lora` (a LoraConfig, null without LoRA).
    for k in keys.iter().filter(|k| !k.starts_with("lora_")) {
        assert!(json.get(k).is_some(), "config JSON lacks {k}");
    }
    assert!(json.get("lora").is_some(), "config JSON lacks lora");
}

fn error_for(extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &(base(dir.path()) + extra));
    SftConfig::from_toml_file(&path).unwrap_err().to_string()
}

#[test]
fn bad_files_name_file_and_key() {
    let e = error_for("learnin_rate = 1e-3\n");
    assert!(
        e.contains("sft.toml") && e.contains("\"learnin_rate\"") && e.contains("unknown key"),
        "{e}"
    );
    let e = error_for("learning_rate = nan\n");
    assert!(
        e.contains("sft.toml") && e.contains("\"learning_rate\"") && e.contains("NaN"),
        "{e}"
    );
    let e = error_for("batch_size = \"eight\"\n");
    assert!(
        e.contains("sft.toml") && e.contains("\"batch_size\""),
        "{e}"
    );
    let e = error_for("eval_file = \"/nonexistent/eval.jsonl\"\n");
    assert!(
        e.contains("\"eval_file\"") && e.contains("/nonexistent/eval.jsonl"),
        "{e}"
    );
    let e = error_for("warmup_ratio = 0.1\nwarmup_steps = 5\n");
    assert!(e.contains("\"warmup_ratio\""), "{e}");
    let e = error_for("lr_scheduler_type = \"cosine_with_restarts\"\n");
    assert!(e.contains("\"lr_scheduler_type\""), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let e = SftConfig::from_toml_file(&missing).unwrap_err().to_string();
    assert!(e.contains("nope.toml"), "{e}");
}

#[test]
fn flag_errors_name_the_command_line() {
    let e = common::sft_flags(&[
        "--model",
        "/nonexistent",
        "--train-file",
        "x",
        "--output-dir",
        "o",
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("command line") && e.contains("\"model\""), "{e}");
    let e = common::sft_flags(&["--learning-rate", "1e-3"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"model\"") && e.contains("required"), "{e}");
    assert!(common::sft_flags(&["--learning-rate", "fast"]).is_err());
}
