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
fn train_args<'a>(
    cmd: &'a str,
    model: &'a str,
    data: &'a str,
    out: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        cmd,
        "--model",
        model,
        "--train-file",
        data,
        "--output-dir",
        out,
        "--batch-size",
        "4",
        "--logging-steps",
        "1",
    ];
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
        fails(
            t,
            &args,
            &[
                "model",
                "is the --model directory",
                "--overwrite-output-dir",
            ],
        );
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
        ok(
            t,
            &train_args(
                cmd,
                s(&m),
                s(&data),
                s(&out),
                &["--max-steps", "2", "--save-steps", "1"],
            ),
        );
        let before = snapshot(&out);
        // A second run that would fail (non-finite loss at step 1) must not even start: the previous run's
        // model, checkpoints and metrics stay byte for byte.
        let args = train_args(
            cmd,
            s(&m),
            s(&data),
            s(&out),
            &["--max-steps", "3", "--learning-rate", "1e30"],
        );
        fails(
            t,
            &args,
            &[
                s(&out),
                "already holds a training run",
                "--overwrite-output-dir",
                "--resume",
            ],
        );
        assert_eq!(
            snapshot(&out),
            before,
            "{cmd}: a refused run changed the output dir"
        );

        // Asked explicitly: the old run's checkpoints and metrics go, the new run's replace them.
        ok(
            t,
            &train_args(
                cmd,
                s(&m),
                s(&data),
                s(&out),
                &["--max-steps", "1", "--overwrite-output-dir"],
            ),
        );
        assert!(
            !out.join("checkpoint-1").exists() && !out.join("checkpoint-2").exists(),
            "{cmd}: stale checkpoints left"
        );
        let metrics = read_jsonl(&out.join("metrics.jsonl"));
        assert_eq!(
            metrics.iter().filter(|m| m.contains_key("loss")).count(),
            1,
            "{cmd}: {metrics:?}"
        );
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
        ok(
            t,
            &train_args(
                cmd,
                s(&m),
                s(&data),
                s(&out),
                &[&["--max-steps", "2", "--save-steps", "2"][..], &lr[..]].concat(),
            ),
        );
        let before = snapshot(&out);
        let args = train_args(
            cmd,
            s(&m),
            s(&data),
            s(&out),
            &["--max-steps", "4", "--learning-rate", "5e-4", "--resume"],
        );
        let line = fails(
            t,
            &args,
            &[
                "checkpoint-2/training_config.json",
                "learning_rate (checkpoint: 0.001, now: 0.0005)",
            ],
        );
        assert!(line.contains("max_steps (checkpoint: 2, now: 4)"), "{line}");
        assert_eq!(
            snapshot(&out),
            before,
            "{cmd}: a refused resume changed the output dir"
        );
        // With the checkpoint's settings it continues (and may save at another cadence).
        let args = train_args(
            cmd,
            s(&m),
            s(&data),
            s(&out),
            &[
                &["--max-steps", "2", "--resume", "--save-steps", "5"][..],
                &lr[..],
            ]
            .concat(),
        );
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
    ok(
        t,
        &train_args(
            "sft",
            s(&llama()),
            s(&sft_train()),
            s(&out),
            &["--max-steps", "1"],
        ),
    );
    assert!(!tmp_file.exists(), "stale temp file left behind");
    assert!(
        !out.join(".tmp-checkpoint-3").exists(),
        "stale checkpoint temp dir left behind"
    );
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
        let args = train_args(
            "sft",
            s(&model),
            s(&data),
            out,
            &[
                "--max-steps",
                "3",
                "--lora-r",
                "4",
                "--lora-dropout",
                "0.1",
                "--learning-rate",
                "1e-2",
            ],
        );
        ok(t, &args);
        std::fs::read(t.join(out).join("adapter/adapter_model.safetensors")).unwrap()
    };
    assert!(
        run("a") == run("b"),
        "two identical LoRA runs gave different adapters"
    );
}

// ---------------------------------------------------------------------------------------------------------
// 6–8: garbage with exit 0
// ---------------------------------------------------------------------------------------------------------

#[test]
fn rm_score_refuses_a_language_model_and_long_rows() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let items = write(
        &t.join("items.jsonl"),
        "{\"prompt\": \"Q: 1+1=\", \"completion\": \" 2\"}\n",
    );
    fails(
        t,
        &[
            "rm",
            "score",
            "--model",
            s(&llama()),
            "--input",
            s(&items),
            "--output",
            "scores.jsonl",
        ],
        &[
            "llama/config.json",
            "LlamaForCausalLM",
            "not a reward model",
        ],
    );
    let rm = root().join("fixtures/models/llama-rm");
    fails(
        t,
        &[
            "rm",
            "score",
            "--model",
            s(&rm),
            "--input",
            s(&items),
            "--output",
            "scores.jsonl",
            "--max-length",
            "3",
        ],
        &["items.jsonl:1:", "longer than --max-length 3"],
    );
    assert!(!t.join("scores.jsonl").exists());
}

#[test]
fn generate_refuses_meaningless_sampling_flags() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let p = prompts(t);
    let model = llama();
    let gen = |extra: &[&str], needles: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            s(&model),
            "--prompts",
            s(&p),
            "--out",
            "out.jsonl",
        ];
        args.extend_from_slice(extra);
        fails(t, &args, needles);
    };
    gen(&["--temperature", "NaN"], &["--temperature", "NaN"]);
    gen(&["--temperature=-1"], &["--temperature", "-1"]);
    gen(&["--top-p", "0"], &["--top-p", "(0, 1]"]);
    gen(&["--top-p", "2"], &["--top-p"]);
    gen(&["--batch-size", "0"], &["--batch-size", "at least 1"]);
    gen(&["--stop", ""], &["--stop", "empty"]);
    // `rlhf chat` shares the flags and their checks.
    fails(
        t,
        &["chat", "--model", s(&model), "--top-p", "2"],
        &["--top-p", "(0, 1]"],
    );
    // A bad --precision is a usage error (clap: exit 2) naming the flag and the accepted values.
    let bad = rlhf(
        t,
        &[
            "generate",
            "--model",
            s(&model),
            "--prompts",
            s(&p),
            "--out",
            "out.jsonl",
            "--precision",
            "fp16",
        ],
    );
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        bad.status.code() == Some(2)
            && err.contains("--precision")
            && err.contains("expected fp32 or bf16"),
        "{err}"
    );
    // bf16 products (weights converted once, f32 accumulation) generate normally.
    let args = [
        "generate",
        "--model",
        s(&model),
        "--prompts",
        s(&p),
        "--out",
        "bf16.jsonl",
        "--precision",
        "bf16",
    ];
    ok(
        t,
        &[&args[..], &["--max-new-tokens", "4", "--temperature", "0"]].concat(),
    );
    let rows = std::fs::read_to_string(t.join("bf16.jsonl")).unwrap();
    assert!(
        !rows.is_empty() && rows.lines().all(|l| l.contains("\"completion_ids\"")),
        "{rows}"
    );
    // Prompt + new tokens beyond the model's context (the fixture's max_position_embeddings is 128).
    gen(
        &["--max-new-tokens", "200"],
        &["prompts.jsonl:1:", "max_position_embeddings 128"],
    );
    write(
        &t.join("seeds.jsonl"),
        "{\"prompt\": \"Q: 1+1=\", \"seed\": 3}\n{\"prompt\": \"Q: 1+2=\", \"seed\": \"x\"}\n",
    );
    fails(
        t,
        &[
            "generate",
            "--model",
            s(&llama()),
            "--prompts",
            "seeds.jsonl",
            "--out",
            "out.jsonl",
        ],
        &["seeds.jsonl:2:", "field \"seed\""],
    );
    // A tokenizer without BOS (init's default) encodes an empty prompt as no token at all.
    let no_bos = t.join("no_bos");
    ok(
        t,
        &[
            "init",
            "--out",
            s(&no_bos),
            "--corpus",
            s(&sft_train()),
            "--vocab-size",
            "300",
        ],
    );
    write(
        &t.join("empty_prompt.jsonl"),
        "{\"prompt\": \"Q: 1+1=\"}\n{\"prompt\": \"\"}\n",
    );
    fails(
        t,
        &[
            "generate",
            "--model",
            s(&no_bos),
            "--prompts",
            "empty_prompt.jsonl",
            "--out",
            "out.jsonl",
        ],
        &["empty_prompt.jsonl:2:", "prompt is empty"],
    );
    assert!(!t.join("out.jsonl").exists());
}

/// Overwrites every value of tensor `name` in `dir/model.safetensors` with NaN.
fn poison(dir: &Path, name: &str) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let range = header[name]["data_offsets"].as_array().unwrap();
    let (a, b) = (
        range[0].as_u64().unwrap() as usize,
        range[1].as_u64().unwrap() as usize,
    );
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
    fails(
        t,
        &[
            "generate",
            "--model",
            s(&model),
            "--prompts",
            s(&prompts(t)),
            "--out",
            s(&out),
            "--temperature",
            "0",
        ],
        &["nan/model.safetensors", "non-finite"],
    );
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
        fails(
            t,
            &[
                "generate",
                "--model",
                s(&dir),
                "--prompts",
                s(&p),
                "--out",
                "x.jsonl",
            ],
            &[&format!("{key}/config.json"), &field, needle],
        );
        // `init --config` reads the same checks before training a tokenizer or allocating anything.
        let out = t.join(format!("init_{key}"));
        fails(
            t,
            &[
                "init",
                "--out",
                s(&out),
                "--config",
                s(&config),
                "--corpus",
                s(&sft_train()),
            ],
            &[&field],
        );
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
    fails(
        t,
        &train_args("sft", s(&m), s(&sft), "o", &["--max-steps", "0"]),
        &["key \"max_steps\"", "at least 1"],
    );
    fails(
        t,
        &train_args("rm", s(&m), s(&pref), "o", &["--max-steps", "0"]),
        &["key \"max_steps\"", "at least 1"],
    );
    fails(
        t,
        &train_args(
            "rm",
            s(&m),
            s(&pref),
            "o",
            &["--center-rewards-coefficient", "nan"],
        ),
        &["key \"center_rewards_coefficient\""],
    );
    fails(
        t,
        &train_args(
            "dpo",
            s(&m),
            s(&pref),
            "o",
            &["--loss-type", "simpo", "--simpo-gamma", "nan"],
        ),
        &["key \"simpo_gamma\"", "finite"],
    );
    write(&t.join("ratings.jsonl"), "{\"prompt\": \"Q: 1+1=\", \"completion\": \" 2\", \"score\": 3, \"score_min\": 1, \"score_max\": 1}\n");
    fails(
        t,
        &train_args("rm", s(&m), "ratings.jsonl", "o", &["--max-steps", "1"]),
        &[
            "ratings.jsonl:1:",
            "field \"score_min\"",
            "less than score_max",
        ],
    );
    write(
        &t.join("chat.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"1+1?\"}, {\"role\": \"asistant\", \"content\": \"2\"}]}\n",
    );
    fails(
        t,
        &train_args("sft", s(&m), "chat.jsonl", "o", &["--max-steps", "1"]),
        &[
            "chat.jsonl:1:",
            "messages[1].role",
            "unknown role \"asistant\"",
        ],
    );
    assert!(
        !t.join("o").exists(),
        "a refused run created its output dir"
    );
}

// ---------------------------------------------------------------------------------------------------------
// 9: memory guards
// ---------------------------------------------------------------------------------------------------------

#[test]
fn sizes_are_checked_before_allocating() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let out = t.join("huge");
    fails(
        t,
        &[
            "init",
            "--out",
            s(&out),
            "--corpus",
            s(&sft_train()),
            "--vocab-size",
            "1000000000",
        ],
        &["vocab_size 1000000000", "too large"],
    );
    assert!(!out.exists());
    // A config whose parameters alone exceed any memory.
    let (dir, _) = llama_with(t, "wide", "vocab_size", "4000000000");
    fails(
        t,
        &[
            "generate",
            "--model",
            s(&dir),
            "--prompts",
            s(&prompts(t)),
            "--out",
            "x.jsonl",
        ],
        &["wide/config.json", "GiB"],
    );
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
    fails(
        t,
        &train_args("sft", s(&m), "data_dir.jsonl", "o", &["--max-steps", "1"]),
        &["data_dir.jsonl", "is a directory"],
    );
    fails(
        t,
        &[
            "generate",
            "--model",
            s(&m),
            "--prompts",
            s(t),
            "--out",
            "x.jsonl",
        ],
        &["is a directory"],
    );
    write(
        &t.join("array.jsonl"),
        "[\n  {\"prompt\": \"Q: 1+1=\", \"completion\": \" 2\"}\n]\n",
    );
    fails(
        t,
        &train_args("sft", s(&m), "array.jsonl", "o", &["--max-steps", "1"]),
        &["array.jsonl", "JSON array", "name it .json"],
    );
    assert!(!t.join("o").exists());

    let sharded = t.join("sharded");
    copy_dir(&root().join("fixtures/models/llama-sharded"), &sharded);
    std::fs::remove_file(sharded.join("model-00002-of-00004.safetensors")).unwrap();
    fails(
        t,
        &[
            "generate",
            "--model",
            s(&sharded),
            "--prompts",
            s(&prompts(t)),
            "--out",
            "x.jsonl",
        ],
        &[
            "model-00002-of-00004.safetensors",
            "model.safetensors.index.json",
            "does not exist",
        ],
    );
}

#[test]
fn a_row_too_long_for_any_max_length_is_refused_before_tokenizing() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let m = llama();
    // 210 kB in one field: far more than 64 tokens of this tokenizer can cover (tokenizing a 50 MB line took
    // 18.6 GB and minutes before it was cut to max_length).
    let long = "ab ".repeat(70_000);
    let row = |fields: &[(&str, &str)]| {
        let obj: serde_json::Map<String, Value> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        format!("{}\n", Value::Object(obj))
    };
    write(
        &t.join("text.jsonl"),
        &format!("{}{}", row(&[("text", "short")]), row(&[("text", &long)])),
    );
    fails(
        t,
        &train_args(
            "sft",
            s(&m),
            "text.jsonl",
            "o",
            &["--max-steps", "1", "--max-length", "64"],
        ),
        &[
            "text.jsonl:2:",
            "field \"text\"",
            "210000 bytes of text cannot fit in 64 tokens (max_length",
        ],
    );
    write(
        &t.join("pairs.jsonl"),
        &row(&[("prompt", "Q: 1+1="), ("chosen", &long), ("rejected", " 3")]),
    );
    for cmd in ["rm", "dpo"] {
        fails(
            t,
            &train_args(
                cmd,
                s(&m),
                "pairs.jsonl",
                "o",
                &["--max-steps", "1", "--max-length", "64"],
            ),
            &[
                "pairs.jsonl:1:",
                "field \"chosen\"",
                "cannot fit in 64 tokens",
            ],
        );
    }
    assert!(!t.join("o").exists());
    write(
        &t.join("items.jsonl"),
        &row(&[("prompt", "Q: 1+1="), ("completion", &long)]),
    );
    let rm = root().join("fixtures/models/llama-rm");
    fails(
        t,
        &[
            "rm",
            "score",
            "--model",
            s(&rm),
            "--input",
            "items.jsonl",
            "--output",
            "scores.jsonl",
        ],
        &["items.jsonl:1:", "field \"completion\"", "(--max-length;"],
    );
    // generate: bounded by the model's context (the long completion is not what it reads, the prompt is).
    write(
        &t.join("prompts.jsonl"),
        &format!(
            "{}{}",
            row(&[("prompt", "Q: 1+1="), ("completion", &long)]),
            row(&[("prompt", &long), ("completion", "x")])
        ),
    );
    fails(
        t,
        &[
            "generate",
            "--model",
            s(&m),
            "--prompts",
            "prompts.jsonl",
            "--out",
            "out.jsonl",
        ],
        &[
            "prompts.jsonl:2:",
            "field \"prompt\"",
            "cannot fit in 128 tokens (the model's max_position_embeddings",
        ],
    );
}

#[test]
fn rm_score_refuses_a_classifier_but_scores_an_ensemble() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    ok(
        t,
        &train_args(
            "rm",
            s(&llama()),
            s(&pref_train()),
            "ens",
            &["--max-steps", "1", "--num-heads", "3"],
        ),
    );
    let items = write(
        &t.join("items.jsonl"),
        "{\"prompt\": \"Q: 1+1=\", \"completion\": \" 2\", \"item_id\": 7}\n",
    );
    ok(
        t,
        &[
            "rm",
            "score",
            "--model",
            "ens",
            "--input",
            s(&items),
            "--output",
            "scores.jsonl",
        ],
    );
    let scored = read_jsonl(&t.join("scores.jsonl"));
    assert!(
        scored[0]["reward_std"].as_f64().unwrap() > 0.0
            && scored[0]["uncertainty"] == scored[0]["reward_std"],
        "{scored:?}"
    );
    // The same weights with a classifier's labels: its label scores are not rewards.
    let cls = t.join("cls");
    copy_dir(&t.join("ens"), &cls);
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(cls.join("config.json")).unwrap()).unwrap();
    config["id2label"] = serde_json::json!({"0": "negative", "1": "neutral", "2": "positive"});
    std::fs::write(cls.join("config.json"), config.to_string()).unwrap();
    fails(
        t,
        &[
            "rm",
            "score",
            "--model",
            "cls",
            "--input",
            s(&items),
            "--output",
            "cls.jsonl",
        ],
        &[
            "cls/config.json",
            "field \"num_labels\"",
            "3 labels (negative, neutral, positive) make a classifier",
        ],
    );
    assert!(!t.join("cls.jsonl").exists());
}

#[test]
fn a_diverged_run_names_a_checkpoint_whose_weights_did_not_diverge() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    // A warmup towards lr 1e30: finite losses for a step or two, then NaN; a checkpoint after every step.
    let diverge = [
        "--max-steps",
        "8",
        "--save-steps",
        "1",
        "--learning-rate",
        "1e30",
        "--warmup-steps",
        "100000",
    ];
    let line = fails(
        t,
        &train_args("sft", s(&llama()), s(&sft_train()), "run", &diverge),
        &["non-finite loss", "last good checkpoint: run/checkpoint-"],
    );
    let named = |marker: &str| {
        let rest = &line[line.find(marker).unwrap() + marker.len()..];
        rest.split([' ', ')', ',']).next().unwrap().to_string()
    };
    let good = named("last good checkpoint: ");
    let bad = named(&format!("{good} ("));
    assert!(
        line.contains(&format!("({bad} holds the weights that diverged)")),
        "{line}"
    );
    // What the message calls good generates; the newest checkpoint holds the weights that produced NaN.
    let p = prompts(t);
    ok(
        t,
        &[
            "generate",
            "--model",
            &good,
            "--prompts",
            s(&p),
            "--out",
            "good.jsonl",
            "--max-new-tokens",
            "2",
        ],
    );
    fails(
        t,
        &[
            "generate",
            "--model",
            &bad,
            "--prompts",
            s(&p),
            "--out",
            "bad.jsonl",
            "--max-new-tokens",
            "2",
        ],
        &["non-finite"],
    );
    // With only the newest checkpoint kept, no good one is left, and the message says so.
    let keep_one = [&diverge[..], &["--save-total-limit", "1"]].concat();
    fails(
        t,
        &train_args("dpo", s(&llama()), s(&pref_train()), "run1", &keep_one),
        &["no good checkpoint is left (run1/checkpoint-"],
    );
}

// ---------------------------------------------------------------------------------------------------------
// 13–15: the newcomer's path
// ---------------------------------------------------------------------------------------------------------

#[test]
fn every_trainer_writes_a_complete_model_and_lora_merge_rebuilds_it() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    // A base without generation_config.json: every output gets one, from config.json's special tokens.
    let base = t.join("base");
    copy_dir(&llama(), &base);
    std::fs::remove_file(base.join("generation_config.json")).unwrap();
    let lora = [
        "--max-steps",
        "2",
        "--lora-r",
        "4",
        "--learning-rate",
        "1e-2",
    ];
    let p = prompts(t);
    for cmd in ["sft", "dpo", "rm"] {
        let out = t.join(format!("{cmd}_lora"));
        ok(
            t,
            &train_args(cmd, s(&base), s(&data_for(cmd)), s(&out), &lora),
        );
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
        ] {
            assert!(out.join(f).is_file(), "{cmd}: no {f} in the output dir");
        }
        // The output dir is the usable model; `rlhf lora merge` rebuilds it from the adapter and the base.
        let merged = t.join(format!("{cmd}_merged"));
        ok(
            t,
            &[
                "lora",
                "merge",
                "--adapter",
                s(&out.join("adapter")),
                "--model",
                s(&base),
                "--out",
                s(&merged),
            ],
        );
        assert!(
            std::fs::read(merged.join("model.safetensors")).unwrap()
                == std::fs::read(out.join("model.safetensors")).unwrap(),
            "{cmd}"
        );
        if cmd == "rm" {
            let items = write(
                &t.join("items.jsonl"),
                "{\"prompt\": \"Q: 1+1=\", \"completion\": \" 2\"}\n",
            );
            ok(
                t,
                &[
                    "rm",
                    "score",
                    "--model",
                    s(&out),
                    "--input",
                    s(&items),
                    "--output",
                    "scores.jsonl",
                ],
            );
        } else {
            ok(
                t,
                &[
                    "generate",
                    "--model",
                    s(&out),
                    "--prompts",
                    s(&p),
                    "--out",
                    "gen.jsonl",
                    "--max-new-tokens",
                    "2",
                ],
            );
            let g: Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("generation_config.json")).unwrap(),
            )
            .unwrap();
            let c: Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
                assert_eq!(g[k], c[k], "{cmd}: generation_config.json {k}");
            }
        }
    }
    // Merging refuses what it would overwrite, and names a missing adapter file.
    let adapter = t.join("dpo_lora/adapter");
    fails(
        t,
        &[
            "lora",
            "merge",
            "--adapter",
            s(&adapter),
            "--model",
            s(&base),
            "--out",
            s(&base),
        ],
        &["base model's directory"],
    );
    fails(
        t,
        &[
            "lora",
            "merge",
            "--adapter",
            s(&adapter),
            "--model",
            s(&base),
            "--out",
            "sft_merged",
        ],
        &["sft_merged", "already holds a model"],
    );
    fails(
        t,
        &[
            "lora",
            "merge",
            "--adapter",
            s(&t.join("dpo_lora")),
            "--model",
            s(&base),
            "--out",
            "m",
        ],
        &[
            "dpo_lora/adapter_config.json",
            "not found",
            "output_dir/adapter",
        ],
    );
    // init writes generation_config.json with its tokenizer's ids.
    ok(
        t,
        &[
            "init",
            "--out",
            "fresh",
            "--corpus",
            s(&sft_train()),
            "--vocab-size",
            "300",
            "--add-bos",
        ],
    );
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(t.join("fresh/generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (g["bos_token_id"].as_u64(), g["eos_token_id"].as_u64()),
        (Some(1), Some(2)),
        "{g}"
    );
}

/// `rlhf ARGS` with `stdin` piped in and logging at its default level, stderr not a terminal (as in CI).
fn rlhf_logged(cwd: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "rlhf {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn training_without_a_terminal_logs_one_line_per_logging_step() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let m = llama();
    for cmd in ["sft", "dpo"] {
        let data = data_for(cmd);
        let args = [
            cmd,
            "--model",
            s(&m),
            "--train-file",
            s(&data),
            "--output-dir",
            cmd,
            "--max-steps",
            "4",
            "--logging-steps",
            "2",
        ];
        let stderr = String::from_utf8(rlhf_logged(t, &args, "").stderr).unwrap();
        let steps: Vec<&str> = stderr.lines().filter(|l| l.contains("\"loss\":")).collect();
        assert_eq!(steps.len(), 2, "{cmd}: {stderr}");
        assert!(
            steps[0].contains("{\"step\":2,") && steps[1].contains("{\"step\":4,"),
            "{cmd}: {stderr}"
        );
        assert!(
            !stderr.contains('\u{1b}'),
            "{cmd}: colour codes in a log file: {stderr}"
        );
    }
}

#[test]
fn generate_keeps_input_columns_and_takes_prompts_from_the_command_line_or_stdin() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let m = llama();
    // Reference answers in `completion` stay; the generated text goes to `generated`.
    let refs = write(
        &t.join("refs.jsonl"),
        "{\"prompt\": \"Q: 1+1=\", \"completion\": \" 2\", \"id\": 4}\n",
    );
    ok(
        t,
        &[
            "generate",
            "--model",
            s(&m),
            "--prompts",
            s(&refs),
            "--out",
            "gen.jsonl",
            "--max-new-tokens",
            "3",
        ],
    );
    let rows = read_jsonl(&t.join("gen.jsonl"));
    assert_eq!(
        (rows[0]["completion"].as_str(), rows[0]["id"].as_u64()),
        (Some(" 2"), Some(4))
    );
    assert_eq!(rows[0]["completion_ids"].as_array().unwrap().len(), 3);
    assert!(rows[0]["generated"].is_string(), "{rows:?}");
    // Prompt-only rows get `completion` (prompt/completion data for rm score, sft, eval).
    ok(
        t,
        &[
            "generate",
            "--model",
            s(&m),
            "--prompts",
            s(&prompts(t)),
            "--out",
            "plain.jsonl",
            "--max-new-tokens",
            "3",
        ],
    );
    let plain = read_jsonl(&t.join("plain.jsonl"));
    assert!(
        plain[0]["completion"].is_string() && !plain[0].contains_key("generated"),
        "{plain:?}"
    );
    // A column name the input has, or an input column generate writes, is refused rather than overwritten.
    fails(
        t,
        &[
            "generate",
            "--model",
            s(&m),
            "--prompts",
            s(&refs),
            "--out",
            "x.jsonl",
            "--completion-column",
            "id",
        ],
        &["refs.jsonl:1:", "field \"id\"", "--completion-column"],
    );
    fails(
        t,
        &[
            "generate",
            "--model",
            s(&m),
            "--prompts",
            "plain.jsonl",
            "--out",
            "x.jsonl",
        ],
        &["plain.jsonl:1:", "field \"completion_ids\"", "overwrite"],
    );
    // --prompt TEXT and --prompts - (JSONL on stdin) write JSONL to stdout without --out.
    let greedy = ["--max-new-tokens", "3", "--temperature", "0"];
    let one = rlhf_logged(
        t,
        &[
            &["generate", "--model", s(&m), "--prompt", "Q: 7+5="][..],
            &greedy[..],
        ]
        .concat(),
        "",
    );
    let piped = rlhf_logged(
        t,
        &[
            &["generate", "--model", s(&m), "--prompts", "-"][..],
            &greedy[..],
        ]
        .concat(),
        "{\"prompt\": \"Q: 7+5=\", \"k\": 1}\n",
    );
    let a: Value = serde_json::from_slice(&one.stdout).unwrap();
    let b: Value = serde_json::from_slice(&piped.stdout).unwrap();
    assert_eq!(
        (a["prompt"].as_str(), b["k"].as_u64()),
        (Some("Q: 7+5="), Some(1))
    );
    assert_eq!(
        a["completion_ids"], b["completion_ids"],
        "the same prompt, greedy: the same completion"
    );
    assert_eq!(a["completion_ids"].as_array().unwrap().len(), 3);
}

// ---------------------------------------------------------------------------------------------------------
// 17: documented behaviour
// ---------------------------------------------------------------------------------------------------------

#[test]
fn every_trainer_summary_names_eval_metrics_alike() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    for (cmd, eval, metric) in [
        ("sft", "sft_eval", "eval_mean_token_accuracy"),
        ("rm", "pref_eval", "eval_accuracy"),
        ("dpo", "pref_eval", "eval_rewards/accuracies"),
    ] {
        let eval = root().join(format!("data/{eval}.jsonl"));
        let stdout = ok(
            t,
            &train_args(
                cmd,
                s(&llama()),
                s(&data_for(cmd)),
                cmd,
                &["--max-steps", "1", "--eval-file", s(&eval)],
            ),
        );
        let summary: Value = serde_json::from_str(&stdout).unwrap();
        assert!(
            summary["eval"]["eval_loss"]
                .as_f64()
                .is_some_and(f64::is_finite),
            "{cmd}: {summary}"
        );
        assert!(summary["eval"][metric].is_number(), "{cmd}: {summary}");
    }
}
