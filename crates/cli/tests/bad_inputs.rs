//! What a careless or hostile user can give the CLI, through the real binary: each case must end with exit
//! status 1 and one line `error: …` naming the file / flag / key / line, without a panic, and without losing
//! anything that was on disk (the base model, a previous run, its metrics). Grouped as in the hardening issue:
//! data loss, reproducibility, garbage with exit 0, memory guards, vague errors.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use tempfile::TempDir;

fn pref_train() -> PathBuf {
    root().join("data/pref_train.jsonl")
}

/// `rlhf <cmd>` on the fixture llama for `steps` steps into `out`, plus `extra` flags.
fn train_args<'a>(cmd: &'a str, model: &'a str, data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![cmd, "--model", model, "--train-file", data, "--output-dir", out, "--batch-size", "4", "--logging-steps", "1"];
    args.extend_from_slice(extra);
    args
}

fn data_for(cmd: &str) -> PathBuf {
    if cmd == "sft" {
        sft_train()
    } else {
        pref_train()
    }
}

// ---------------------------------------------------------------------------------------------------------
// 1–4: data loss
// ---------------------------------------------------------------------------------------------------------

#[test]
fn training_into_the_model_directory_is_refused() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let model = t.join("model");
    copy_dir(&llama(), &model);
    let before = snapshot(&model);
    for cmd in ["sft", "rm", "dpo"] {
        let data = data_for(cmd);
        let args = train_args(cmd, s(&model), s(&data), s(&model), &["--max-steps", "1"]);
        fails(t, &args, &["model", "is the --model directory", "--overwrite-output-dir"]);
        // The same directory spelled differently is still the same directory.
        let dotted = format!("{}/../model", s(&model));
        let args = train_args(cmd, s(&model), s(&data), &dotted, &["--max-steps", "1"]);
        fails(t, &args, &["is the --model directory"]);
        assert_eq!(snapshot(&model), before, "{cmd} changed the base model");
    }
}

#[test]
fn training_into_a_finished_run_is_refused_unless_asked() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let m = llama();
    for cmd in ["sft", "rm", "dpo"] {
        let data = data_for(cmd);
        let out = t.join(cmd);
        ok(t, &train_args(cmd, s(&m), s(&data), s(&out), &["--max-steps", "2", "--save-steps", "1"]));
        let before = snapshot(&out);
        // A second run that would fail (non-finite loss at step 1) must not even start: the previous run's
        // model, checkpoints and metrics stay byte for byte.
        let args = train_args(cmd, s(&m), s(&data), s(&out), &["--max-steps", "3", "--learning-rate", "1e30"]);
        fails(t, &args, &[s(&out), "already holds a training run", "--overwrite-output-dir", "--resume"]);
        assert_eq!(snapshot(&out), before, "{cmd}: a refused run changed the output dir");

        // Asked explicitly: the old run's checkpoints and metrics go, the new run's replace them.
        ok(t, &train_args(cmd, s(&m), s(&data), s(&out), &["--max-steps", "1", "--overwrite-output-dir"]));
        assert!(!out.join("checkpoint-1").exists() && !out.join("checkpoint-2").exists(), "{cmd}: stale checkpoints left");
        let metrics = read_jsonl(&out.join("metrics.jsonl"));
        assert_eq!(metrics.iter().filter(|m| m.contains_key("loss")).count(), 1, "{cmd}: {metrics:?}");
    }
}

#[test]
fn resume_refuses_a_checkpoint_from_other_settings() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let m = llama();
    for cmd in ["sft", "rm", "dpo"] {
        let data = data_for(cmd);
        let out = t.join(cmd);
        let lr = ["--learning-rate", "1e-3"];
        ok(t, &train_args(cmd, s(&m), s(&data), s(&out), &[&["--max-steps", "2", "--save-steps", "2"][..], &lr[..]].concat()));
        let before = snapshot(&out);
        let args = train_args(cmd, s(&m), s(&data), s(&out), &["--max-steps", "4", "--learning-rate", "5e-4", "--resume"]);
        let line = fails(t, &args, &["checkpoint-2/training_config.json", "learning_rate (checkpoint: 0.001, now: 0.0005)"]);
        assert!(line.contains("max_steps (checkpoint: 2, now: 4)"), "{line}");
        assert_eq!(snapshot(&out), before, "{cmd}: a refused resume changed the output dir");
        // With the checkpoint's settings it continues (and may save at another cadence).
        let args = train_args(cmd, s(&m), s(&data), s(&out), &[&["--max-steps", "2", "--resume", "--save-steps", "5"][..], &lr[..]].concat());
        ok(t, &args);
    }
}

#[test]
fn leftovers_of_a_killed_writer_are_removed_by_the_next_run() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let out = t.join("run");
    std::fs::create_dir(&out).unwrap();
    // What a kill during the final save leaves: write_atomic's temp file (of a process that no longer
    // exists) and a half-written checkpoint directory.
    let tmp_file = out.join(".model.safetensors.tmp999999999");
    std::fs::write(&tmp_file, b"half a model").unwrap();
    std::fs::create_dir(out.join(".tmp-checkpoint-3")).unwrap();
    ok(t, &train_args("sft", s(&llama()), s(&sft_train()), s(&out), &["--max-steps", "1"]));
    assert!(!tmp_file.exists(), "stale temp file left behind");
    assert!(!out.join(".tmp-checkpoint-3").exists(), "stale checkpoint temp dir left behind");
    assert!(out.join("model.safetensors").is_file());
}

// ---------------------------------------------------------------------------------------------------------
// 5: reproducibility
// ---------------------------------------------------------------------------------------------------------

#[test]
fn lora_runs_with_dropout_are_reproducible() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let (model, data) = (llama(), sft_train());
    let run = |out: &str| {
        let args = train_args("sft", s(&model), s(&data), out, &["--max-steps", "3", "--lora-r", "4", "--lora-dropout", "0.1", "--learning-rate", "1e-2"]);
        ok(t, &args);
        std::fs::read(t.join(out).join("adapter/adapter_model.safetensors")).unwrap()
    };
    assert!(run("a") == run("b"), "two identical LoRA runs gave different adapters");
}

// ---------------------------------------------------------------------------------------------------------
// 6–8: garbage with exit 0
// ---------------------------------------------------------------------------------------------------------

#[test]
fn rm_score_refuses_a_language_model_and_long_rows() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let items = write(&t.join("items.jsonl"), "{\"prompt\": \"Q: 1+1=\", \"completion\": \" 2\"}\n");
    fails(t, &["rm", "score", "--model", s(&llama()), "--input", s(&items), "--output", "scores.jsonl"], &[
        "llama/config.json",
        "LlamaForCausalLM",
        "not a reward model",
    ]);
    let rm = root().join("fixtures/models/llama-rm");
    fails(t, &["rm", "score", "--model", s(&rm), "--input", s(&items), "--output", "scores.jsonl", "--max-length", "3"], &[
        "items.jsonl:1:",
        "longer than --max-length 3",
    ]);
    assert!(!t.join("scores.jsonl").exists());
}

#[test]
fn generate_refuses_meaningless_sampling_flags() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let p = prompts(t);
    let model = llama();
    let gen = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["generate", "--model", s(&model), "--prompts", s(&p), "--out", "out.jsonl"];
        args.extend_from_slice(extra);
        fails(t, &args, needles);
    };
    gen(&["--temperature", "NaN"], &["--temperature", "NaN"]);
    gen(&["--temperature=-1"], &["--temperature", "-1"]);
    gen(&["--top-p", "0"], &["--top-p", "(0, 1]"]);
    gen(&["--top-p", "2"], &["--top-p"]);
    gen(&["--batch-size", "0"], &["--batch-size", "at least 1"]);
    gen(&["--stop", ""], &["--stop", "empty"]);
    // A bad --precision is a usage error (clap: exit 2) naming the flag and the accepted values.
    let bad = rlhf(t, &["generate", "--model", s(&model), "--prompts", s(&p), "--out", "out.jsonl", "--precision", "fp16"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(bad.status.code() == Some(2) && err.contains("--precision") && err.contains("expected fp32 or bf16"), "{err}");
    // bf16 products (weights converted once, f32 accumulation) generate normally.
    let args = ["generate", "--model", s(&model), "--prompts", s(&p), "--out", "bf16.jsonl", "--precision", "bf16"];
    ok(t, &[&args[..], &["--max-new-tokens", "4", "--temperature", "0"]].concat());
    let rows = std::fs::read_to_string(t.join("bf16.jsonl")).unwrap();
    assert!(!rows.is_empty() && rows.lines().all(|l| l.contains("\"completion_ids\"")), "{rows}");
    // Prompt + new tokens beyond the model's context (the fixture's max_position_embeddings is 128).
    gen(&["--max-new-tokens", "200"], &["prompts.jsonl:1:", "max_position_embeddings 128"]);
    write(&t.join("seeds.jsonl"), "{\"prompt\": \"Q: 1+1=\", \"seed\": 3}\n{\"prompt\": \"Q: 1+2=\", \"seed\": \"x\"}\n");
    fails(t, &["generate", "--model", s(&llama()), "--prompts", "seeds.jsonl", "--out", "out.jsonl"], &[
        "seeds.jsonl:2:",
        "field \"seed\"",
    ]);
    // A tokenizer without BOS (init's default) encodes an empty prompt as no token at all.
    let no_bos = t.join("no_bos");
    ok(t, &["init", "--out", s(&no_bos), "--corpus", s(&sft_train()), "--vocab-size", "300"]);
    write(&t.join("empty_prompt.jsonl"), "{\"prompt\": \"Q: 1+1=\"}\n{\"prompt\": \"\"}\n");
    fails(t, &["generate", "--model", s(&no_bos), "--prompts", "empty_prompt.jsonl", "--out", "out.jsonl"], &[
        "empty_prompt.jsonl:2:",
        "prompt is empty",
    ]);
    assert!(!t.join("out.jsonl").exists());
}

/// Overwrites every value of tensor `name` in `dir/model.safetensors` with NaN.
fn poison(dir: &Path, name: &str) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let range = header[name]["data_offsets"].as_array().unwrap();
    let (a, b) = (range[0].as_u64().unwrap() as usize, range[1].as_u64().unwrap() as usize);
    for chunk in bytes[8 + n + a..8 + n + b].chunks_mut(4) {
        chunk.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn generate_with_nan_weights_fails_instead_of_answering_garbage() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let model = t.join("nan");
    copy_dir(&llama(), &model);
    poison(&model, "model.norm.weight");
    let out = write(&t.join("out.jsonl"), "previous\n");
    fails(t, &["generate", "--model", s(&model), "--prompts", s(&prompts(t)), "--out", s(&out), "--temperature", "0"], &[
        "nan/model.safetensors",
        "non-finite",
    ]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous\n");
}

#[test]
fn config_values_that_can_only_produce_nan_are_refused_naming_the_key() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let p = prompts(t);
    for (key, value, needle) in [
        ("rms_norm_eps", "-1e-6", "must be a finite number > 0"),
        ("rope_theta", "-10000.0", "must be a finite number > 0"),
        ("hidden_size", "0", "must be at least 1"),
        ("num_attention_heads", "0", "must be at least 1"),
    ] {
        let (dir, _) = llama_with(t, key, key, value);
        let config = dir.join("config.json");
        // The fixture sets rope_theta inside rope_parameters too: the edit hits that one, named as such.
        let field = format!("{key}\"");
        fails(t, &["generate", "--model", s(&dir), "--prompts", s(&p), "--out", "x.jsonl"], &[
            &format!("{key}/config.json"),
            &field,
            needle,
        ]);
        // `init --config` reads the same checks before training a tokenizer or allocating anything.
        let out = t.join(format!("init_{key}"));
        fails(t, &["init", "--out", s(&out), "--config", s(&config), "--corpus", s(&sft_train())], &[&field]);
        assert!(!out.exists());
    }
}

#[test]
fn training_settings_and_rows_that_can_only_produce_nan_are_refused() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let m = llama();
    let (sft, pref) = (sft_train(), pref_train());
    // --max-steps 0 used to train three epochs.
    fails(t, &train_args("sft", s(&m), s(&sft), "o", &["--max-steps", "0"]), &["key \"max_steps\"", "at least 1"]);
    fails(t, &train_args("rm", s(&m), s(&pref), "o", &["--max-steps", "0"]), &["key \"max_steps\"", "at least 1"]);
    fails(t, &train_args("rm", s(&m), s(&pref), "o", &["--center-rewards-coefficient", "nan"]), &[
        "key \"rm.center_rewards_coefficient\"",
    ]);
    fails(t, &train_args("dpo", s(&m), s(&pref), "o", &["--loss-type", "simpo", "--simpo-gamma", "nan"]), &[
        "key \"dpo.simpo_gamma\"",
        "finite",
    ]);
    write(&t.join("ratings.jsonl"), "{\"prompt\": \"Q: 1+1=\", \"completion\": \" 2\", \"score\": 3, \"score_min\": 1, \"score_max\": 1}\n");
    fails(t, &train_args("rm", s(&m), "ratings.jsonl", "o", &["--max-steps", "1"]), &[
        "ratings.jsonl:1:",
        "field \"score_min\"",
        "less than score_max",
    ]);
    write(
        &t.join("chat.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"1+1?\"}, {\"role\": \"asistant\", \"content\": \"2\"}]}\n",
    );
    fails(t, &train_args("sft", s(&m), "chat.jsonl", "o", &["--max-steps", "1"]), &[
        "chat.jsonl:1:",
        "messages[1].role",
        "unknown role \"asistant\"",
    ]);
    assert!(!t.join("o").exists(), "a refused run created its output dir");
}

// ---------------------------------------------------------------------------------------------------------
// 9: memory guards
// ---------------------------------------------------------------------------------------------------------

#[test]
fn sizes_are_checked_before_allocating() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let out = t.join("huge");
    fails(t, &["init", "--out", s(&out), "--corpus", s(&sft_train()), "--vocab-size", "1000000000"], &["vocab_size 1000000000", "too large"]);
    assert!(!out.exists());
    // A config whose parameters alone exceed any memory.
    let (dir, _) = llama_with(t, "wide", "vocab_size", "4000000000");
    fails(t, &["generate", "--model", s(&dir), "--prompts", s(&prompts(t)), "--out", "x.jsonl"], &["wide/config.json", "GiB"]);
}

// ---------------------------------------------------------------------------------------------------------
// 10: vague errors
// ---------------------------------------------------------------------------------------------------------

#[test]
fn data_files_that_are_not_what_they_claim() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let m = llama();
    std::fs::create_dir(t.join("data_dir.jsonl")).unwrap();
    fails(t, &train_args("sft", s(&m), "data_dir.jsonl", "o", &["--max-steps", "1"]), &["data_dir.jsonl", "is a directory"]);
    fails(t, &["generate", "--model", s(&m), "--prompts", s(t), "--out", "x.jsonl"], &["is a directory"]);
    write(&t.join("array.jsonl"), "[\n  {\"prompt\": \"Q: 1+1=\", \"completion\": \" 2\"}\n]\n");
    fails(t, &train_args("sft", s(&m), "array.jsonl", "o", &["--max-steps", "1"]), &["array.jsonl", "JSON array", "name it .json"]);
    assert!(!t.join("o").exists());

    let sharded = t.join("sharded");
    copy_dir(&root().join("fixtures/models/llama-sharded"), &sharded);
    std::fs::remove_file(sharded.join("model-00002-of-00004.safetensors")).unwrap();
    fails(t, &["generate", "--model", s(&sharded), "--prompts", s(&prompts(t)), "--out", "x.jsonl"], &[
        "model-00002-of-00004.safetensors",
        "model.safetensors.index.json",
        "does not exist",
    ]);
}
