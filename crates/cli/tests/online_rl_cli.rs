//! `rlhf grpo|rloo|ppo` through the real binary: the example configs run (with the fixture tiny Llama and a few
//! steps given as flags that override them), `--help` works, and bad settings exit non-zero with the file, line
//! and key named.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn rlhf(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &std::process::Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn run_example(trainer: &str, out: &Path, extra: &[&str]) -> serde_json::Value {
    let config = format!("examples/{trainer}.toml");
    let out = out.display().to_string();
    let mut args = vec![
        trainer,
        "--config",
        config.as_str(),
        "--model",
        "fixtures/models/llama",
        "--output-dir",
        out.as_str(),
        "--max-steps",
        "2",
        "--prompts-per-step",
        "2",
        "--save-steps",
        "1",
    ];
    args.extend_from_slice(extra);
    ok(&rlhf(&args))
}

#[test]
fn example_configs_run_with_flag_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    for (trainer, extra) in [
        ("grpo", &["--num-generations", "2"][..]),
        ("rloo", &["--num-generations", "2"][..]),
        ("ppo", &["--reward", "rm:fixtures/models/llama-rm"][..]),
    ] {
        let out = tmp.path().join(trainer);
        let s = run_example(trainer, &out, extra);
        assert_eq!(s["steps"], 2, "{trainer}: {s}");
        assert!(s["final_metrics"]["reward"].is_number(), "{trainer}: {s}");
        assert!(
            out.join("model.safetensors").is_file() && out.join("checkpoint-2").is_dir(),
            "{trainer}"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .count(),
            2,
            "{trainer}"
        );
    }
}

#[test]
fn help_and_bad_settings() {
    let help = rlhf(&["grpo", "--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--num-generations")
            && text.contains("--loss-type")
            && text.contains("--reward"),
        "{text}"
    );

    let bad_flag = rlhf(&["ppo", "--kl-coeff", "0.1"]);
    assert_eq!(bad_flag.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_flag.stderr).contains("--kl-coeff"));

    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("grpo.toml");
    std::fs::write(
        &cfg,
        "model = \"fixtures/models/llama\"\nnum_generation = 4\n",
    )
    .unwrap();
    let out = rlhf(&["grpo", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("grpo.toml:2")
            && err.contains("num_generation")
            && err.contains("unknown key"),
        "{err}"
    );

    std::fs::write(&cfg, "model = \"fixtures/models/llama\"\nprompts = \"data/prompts.jsonl\"\noutput_dir = \"x\"\nreward = [\"exact:answer\"]\ntemperature = -1.0\n").unwrap();
    let out = rlhf(&["grpo", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("temperature") && err.contains("> 0"), "{err}");
}
