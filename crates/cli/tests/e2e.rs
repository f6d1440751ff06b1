//! End-to-end tests of the `rlhf` binary on the repo's addition data and fixture models: the happy paths
//! (init → generate, sft → generate, TOML config + flag override) and the failure paths, which must end with
//! exit status 1 and ONE line `error: …` naming the file (and line / field where there is one), no panic,
//! and nothing overwritten.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;
use tempfile::TempDir;

#[test]
fn init_then_generate_is_reproducible_and_keeps_columns() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let model = t.join("model");
    ok(
        t,
        &[
            "init",
            "--out",
            s(&model),
            "--preset",
            "tiny-llama",
            "--corpus",
            s(&sft_train()),
            "--vocab-size",
            "300",
        ],
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(model.join(f).is_file(), "init wrote no {f}");
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 300);
    assert_eq!(config["hidden_size"], 256);

    let p = prompts(t);
    let greedy = ["--temperature", "0"];
    let g1 = generate(t, &model, &p, &t.join("g1.jsonl"), &greedy);
    let g2 = generate(t, &model, &p, &t.join("g2.jsonl"), &greedy);
    assert_eq!(g1, g2, "greedy generation differs between runs");
    let s1 = generate(t, &model, &p, &t.join("s1.jsonl"), &["--seed", "1"]);
    let s1b = generate(t, &model, &p, &t.join("s1b.jsonl"), &["--seed", "1"]);
    let s2 = generate(t, &model, &p, &t.join("s2.jsonl"), &["--seed", "2"]);
    assert_eq!(s1, s1b, "sampling with the same seed differs between runs");
    assert_ne!(s1, s2, "sampling with seeds 1 and 2 gave identical output");

    let inputs = read_jsonl(&p);
    for file in ["g1.jsonl", "s1.jsonl"] {
        let rows = read_jsonl(&t.join(file));
        assert_eq!(rows.len(), inputs.len(), "{file}");
        for (row, input) in rows.iter().zip(&inputs) {
            for (k, v) in input {
                assert_eq!(&row[k], v, "{file}: input column {k} not kept");
            }
            let ids = row["completion_ids"].as_array().unwrap();
            let logprobs = row["logprobs"].as_array().unwrap();
            assert!(
                !ids.is_empty() && ids.len() <= 12,
                "{file}: {} completion ids",
                ids.len()
            );
            assert_eq!(
                logprobs.len(),
                ids.len(),
                "{file}: one logprob per completion id"
            );
            assert!(
                logprobs
                    .iter()
                    .all(|l| l.as_f64().is_some_and(|l| l.is_finite() && l <= 0.0)),
                "{file}: {logprobs:?}"
            );
            // Greedy and T = 1 sample from the unmodified distribution.
            assert_eq!(
                row["sampling_logprobs"].as_array(),
                Some(logprobs),
                "{file}: sampling_logprobs at T = 1"
            );
            assert!(
                ids.iter().all(|i| i.as_u64().is_some_and(|i| i < 300)),
                "{file}: id out of vocab: {ids:?}"
            );
            assert!(row["completion"].is_string());
            let reason = row["finish_reason"].as_str().unwrap();
            assert!(
                reason == "length" || ids.len() < 12,
                "{file}: finish_reason {reason} with {} ids",
                ids.len()
            );
        }
    }
}

#[test]
fn init_refuses_an_existing_model_dir_and_changes_nothing() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let model = t.join("model");
    let corpus = sft_train();
    ok(
        t,
        &[
            "init",
            "--out",
            s(&model),
            "--corpus",
            s(&corpus),
            "--vocab-size",
            "300",
        ],
    );
    let before = snapshot(&model);
    fails(
        t,
        &[
            "init",
            "--out",
            s(&model),
            "--corpus",
            s(&corpus),
            "--vocab-size",
            "400",
            "--seed",
            "7",
        ],
        &[s(&model), "already holds a model"],
    );
    assert_eq!(
        snapshot(&model),
        before,
        "a refused init changed the directory"
    );

    // A directory holding only a tokenizer is refused too: init would overwrite tokenizer.json.
    let tok_only = t.join("tok_only");
    std::fs::create_dir(&tok_only).unwrap();
    std::fs::copy(
        model.join("tokenizer.json"),
        tok_only.join("tokenizer.json"),
    )
    .unwrap();
    let before = snapshot(&tok_only);
    fails(
        t,
        &["init", "--out", s(&tok_only), "--corpus", s(&corpus)],
        &["tokenizer.json", "already holds a model"],
    );
    assert_eq!(snapshot(&tok_only), before);

    // A failed init leaves nothing behind: not the directory it created, nor files in an existing one.
    let fresh = t.join("fresh");
    fails(
        t,
        &["init", "--out", s(&fresh), "--corpus", "missing.txt"],
        &["missing.txt"],
    );
    assert!(
        !fresh.exists(),
        "a failed init left {} behind",
        fresh.display()
    );
    write(
        &t.join("bad.jsonl"),
        "{\"text\": \"1+1=2\"}\n{\"text\": 3}\n",
    );
    fails(
        t,
        &[
            "init",
            "--out",
            s(&fresh),
            "--corpus",
            s(&corpus),
            "--corpus",
            "bad.jsonl",
        ],
        &["bad.jsonl:2:", "field \"text\""],
    );
    assert!(
        !fresh.exists(),
        "a failed init left {} behind",
        fresh.display()
    );
    let empty = t.join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(
        t,
        &[
            "init",
            "--out",
            s(&empty),
            "--corpus",
            s(&corpus),
            "--corpus",
            "bad.jsonl",
        ],
        &["bad.jsonl:2:"],
    );
    assert!(
        snapshot(&empty).is_empty(),
        "a failed init left files in {}",
        empty.display()
    );
}

#[test]
fn sft_writes_a_loadable_model_and_metrics() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let out = t.join("sft");
    let stdout = ok(
        t,
        &[
            "sft",
            "--model",
            s(&llama()),
            "--train-file",
            s(&sft_train()),
            "--output-dir",
            s(&out),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--logging-steps",
            "1",
            "--learning-rate",
            "1e-3",
        ],
    );
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["steps"], 3, "{summary}");
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "sft output has no {f}");
    }
    assert_ne!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(llama().join("model.safetensors")).unwrap(),
        "sft did not change the weights"
    );
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    assert_eq!(
        metrics
            .iter()
            .map(|m| m["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for m in &metrics {
        for k in ["loss", "grad_norm", "learning_rate"] {
            assert!(
                m[k].as_f64().is_some_and(f64::is_finite),
                "metrics.jsonl {k}: {m:?}"
            );
        }
    }
    // Linear decay from the peak: step 1 has the highest rate.
    assert!(metrics[0]["learning_rate"].as_f64() > metrics[2]["learning_rate"].as_f64());

    let gen = t.join("gen.jsonl");
    generate(t, &out, &prompts(t), &gen, &["--temperature", "0"]);
    assert_eq!(read_jsonl(&gen).len(), 3);
}

#[test]
fn sft_config_file_with_a_flag_override() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let toml = format!(
        "model = {:?}\ntrain_file = {:?}\noutput_dir = \"run\"\nmax_steps = 2\nbatch_size = 4\n\
         learning_rate = 5e-4\nlogging_steps = 1\nsave_steps = 3\n",
        s(&llama()),
        s(&sft_train())
    );
    let cfg = write(&t.join("sft.toml"), &toml);
    ok(t, &["sft", "--config", s(&cfg), "--max-steps", "3"]);
    let metrics = read_jsonl(&t.join("run/metrics.jsonl"));
    assert_eq!(
        metrics.len(),
        3,
        "--max-steps 3 should override max_steps = 2"
    );
    // The checkpoint's training_config.json shows both sources merged.
    let saved: Value = serde_json::from_slice(
        &std::fs::read(t.join("run/checkpoint-3/training_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["max_steps"], 3);
    assert_eq!(saved["learning_rate"], 5e-4);
    assert_eq!(saved["batch_size"], 4);
}

#[test]
fn missing_model_files() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let p = prompts(t);
    let missing = t.join("nope");
    fails(
        t,
        &[
            "generate",
            "--model",
            s(&missing),
            "--prompts",
            s(&p),
            "--out",
            "x.jsonl",
        ],
        &["nope/config.json"],
    );
    fails(
        t,
        &[
            "sft",
            "--model",
            s(&missing),
            "--train-file",
            s(&sft_train()),
            "--output-dir",
            "o",
        ],
        &["model", "nope"],
    );

    let no_tok = t.join("no_tok");
    copy_dir(&llama(), &no_tok);
    std::fs::remove_file(no_tok.join("tokenizer.json")).unwrap();
    fails(
        t,
        &[
            "generate",
            "--model",
            s(&no_tok),
            "--prompts",
            s(&p),
            "--out",
            "x.jsonl",
        ],
        &["no_tok/tokenizer.json"],
    );
    fails(
        t,
        &[
            "sft",
            "--model",
            s(&no_tok),
            "--train-file",
            s(&sft_train()),
            "--output-dir",
            "o",
        ],
        &["no_tok/tokenizer.json"],
    );
    assert!(
        !t.join("x.jsonl").exists() && !t.join("o").exists(),
        "a failed command left output behind"
    );
}

#[test]
fn bad_dataset_lines_name_file_line_and_field() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let model = llama();
    let m = s(&model);
    // A previous output must survive a failed run.
    let out = write(&t.join("out.jsonl"), "previous\n");

    write(
        &t.join("malformed.jsonl"),
        "{\"prompt\": \"Q: 1+1=\"}\n{\"prompt\": \"Q: 2+2=\"\n",
    );
    fails(
        t,
        &[
            "generate",
            "--model",
            m,
            "--prompts",
            "malformed.jsonl",
            "--out",
            "out.jsonl",
        ],
        &["malformed.jsonl:2:", "invalid JSON"],
    );
    write(
        &t.join("wrong_type.jsonl"),
        "{\"prompt\": \"Q: 1+1=\"}\n{\"prompt\": \"Q: 2+2=\"}\n{\"prompt\": 4}\n",
    );
    fails(
        t,
        &[
            "generate",
            "--model",
            m,
            "--prompts",
            "wrong_type.jsonl",
            "--out",
            "out.jsonl",
        ],
        &["wrong_type.jsonl:3:", "field \"prompt\""],
    );
    write(&t.join("empty.jsonl"), "");
    fails(
        t,
        &[
            "generate",
            "--model",
            m,
            "--prompts",
            "empty.jsonl",
            "--out",
            "out.jsonl",
        ],
        &["empty.jsonl", "empty"],
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous\n");

    let sft = |file: &str, needles: &[&str]| {
        fails(
            t,
            &[
                "sft",
                "--model",
                m,
                "--train-file",
                file,
                "--output-dir",
                "o",
                "--max-steps",
                "1",
            ],
            needles,
        );
    };
    write(&t.join("sft_type.jsonl"), "{\"prompt\": \"Q: 1+1=\", \"completion\": \" 2\"}\n{\"prompt\": \"Q: 2+2=\", \"completion\": 4}\n");
    sft(
        "sft_type.jsonl",
        &["sft_type.jsonl:2:", "field \"completion\""],
    );
    sft("malformed.jsonl", &["malformed.jsonl:2:", "invalid JSON"]);
    sft("empty.jsonl", &["empty.jsonl", "empty"]);
    assert!(!t.join("o").exists(), "a failed sft created its output dir");
}

#[test]
fn bad_model_config_names_file_and_field() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let p = prompts(t);
    let gen = |dir: &Path, needles: &[&str]| {
        fails(
            t,
            &[
                "generate",
                "--model",
                s(dir),
                "--prompts",
                s(&p),
                "--out",
                "x.jsonl",
            ],
            needles,
        );
    };
    let (dir, _) = llama_with(t, "unknown_type", "model_type", "\"mamba9\"");
    gen(
        &dir,
        &["unknown_type/config.json", "field \"model_type\"", "mamba9"],
    );
    // Without model_type the architecture comes from `architectures`.
    let (dir, _) = llama_with(t, "unknown_arch", "architectures", "[\"MambaForCausalLM\"]");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config: String = config
        .lines()
        .filter(|l| !l.contains("\"model_type\""))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("config.json"), config).unwrap();
    gen(
        &dir,
        &[
            "unknown_arch/config.json",
            "field \"architectures\"",
            "MambaForCausalLM",
        ],
    );
    // 1e999 overflows f64: not a finite number, rejected by the JSON parser with its position.
    let (dir, line) = llama_with(t, "inf_eps", "rms_norm_eps", "1e999");
    gen(&dir, &["inf_eps/config.json", &format!("line {line} ")]);
    let (dir, _) = llama_with(t, "str_eps", "rms_norm_eps", "\"1e-6\"");
    gen(&dir, &["str_eps/config.json", "field \"rms_norm_eps\""]);
    let (dir, _) = llama_with(t, "str_hidden", "hidden_size", "\"64\"");
    gen(&dir, &["str_hidden/config.json", "field \"hidden_size\""]);
    // A config that disagrees with the weights names the tensor.
    let (dir, _) = llama_with(t, "small_vocab", "vocab_size", "100");
    gen(
        &dir,
        &[
            "small_vocab/model.safetensors",
            "model.embed_tokens.weight",
            "config.json",
        ],
    );
}

#[test]
fn tokenizer_larger_than_model_vocab() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    // A 600-token tokenizer from init next to the fixture llama's 512-row embedding.
    let big = t.join("big");
    ok(
        t,
        &[
            "init",
            "--out",
            s(&big),
            "--corpus",
            s(&sft_train()),
            "--corpus",
            s(&root().join("data/pref_train.jsonl")),
            "--vocab-size",
            "600",
        ],
    );
    let n = serde_json::from_slice::<Value>(&std::fs::read(big.join("config.json")).unwrap())
        .unwrap()["vocab_size"]
        .as_u64()
        .unwrap();
    assert!(n > 512, "init's tokenizer has only {n} tokens");
    let dir = t.join("mismatch");
    copy_dir(&llama(), &dir);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(big.join(f), dir.join(f)).unwrap();
    }
    let expected = [
        "mismatch/tokenizer.json",
        "mismatch/config.json",
        "vocab_size",
    ];
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
        &expected,
    );
    let pref = root().join("data/pref_train.jsonl");
    for (cmd, data) in [("sft", sft_train()), ("rm", pref.clone()), ("dpo", pref)] {
        fails(
            t,
            &[
                cmd,
                "--model",
                s(&dir),
                "--train-file",
                s(&data),
                "--output-dir",
                "out",
                "--max-steps",
                "1",
            ],
            &expected,
        );
        assert!(
            !t.join("out").join("model.safetensors").exists(),
            "{cmd} wrote a model"
        );
    }
}

#[test]
fn unknown_or_ill_typed_toml_key() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let base = format!(
        "model = {:?}\ntrain_file = {:?}\noutput_dir = \"run\"\n",
        s(&llama()),
        s(&sft_train())
    );
    let cfg = write(&t.join("sft.toml"), &format!("{base}learning_rte = 1e-3\n"));
    fails(
        t,
        &["sft", "--config", s(&cfg)],
        &["sft.toml", "\"learning_rte\"", "unknown"],
    );
    let cfg = write(
        &t.join("typed.toml"),
        &format!("{base}logging_steps = \"ten\"\n"),
    );
    fails(
        t,
        &["sft", "--config", s(&cfg)],
        &["typed.toml", "\"logging_steps\""],
    );
    // A bad flag value names the flag, not the file.
    let cfg = write(&t.join("ok.toml"), &base);
    fails(
        t,
        &["sft", "--config", s(&cfg), "--learning-rate=-1"],
        &["command line", "learning_rate"],
    );
    assert!(!t.join("run").exists());
}

/// The checkpoint a non-finite-loss error says holds the diverged weights: `… (DIR holds the weights …)`.
fn diverged_checkpoint(line: &str) -> &str {
    let rest = &line[line.rfind(" (").expect("a checkpoint in parentheses") + 2..];
    rest.split_whitespace().next().unwrap()
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let out = t.join("run");
    let line = fails(
        t,
        &[
            "sft",
            "--model",
            s(&llama()),
            "--train-file",
            s(&sft_train()),
            "--output-dir",
            s(&out),
            "--max-steps",
            "6",
            "--batch-size",
            "4",
            "--learning-rate",
            "1e30",
            "--save-steps",
            "1",
            "--logging-steps",
            "1",
        ],
        &[
            "non-finite loss",
            "no good checkpoint is left (",
            "holds the weights that diverged)",
        ],
    );
    // The named checkpoint exists, is complete, and loads.
    let ckpt = diverged_checkpoint(&line);
    let ckpt = out.join(Path::new(ckpt).file_name().unwrap());
    assert!(ckpt.join("model.safetensors").is_file(), "{line}");
    assert!(
        !out.join("model.safetensors").exists(),
        "a diverged run saved a final model"
    );
    for m in read_jsonl(&out.join("metrics.jsonl")) {
        assert!(
            m["loss"].as_f64().is_some_and(f64::is_finite),
            "metrics.jsonl logged a non-finite loss: {m:?}"
        );
    }
    // The checkpoint loads as a model. Its weights took one step at lr 1e30 (they gave the NaN loss of step
    // 2, which is why the message calls them diverged), so generation from it refuses the non-finite
    // log-probs instead of writing garbage.
    let (gen, p) = (t.join("gen.jsonl"), prompts(t));
    let args = [
        "generate",
        "--model",
        s(&ckpt),
        "--prompts",
        s(&p),
        "--out",
        s(&gen),
        "--temperature",
        "0",
    ];
    fails(
        t,
        &args,
        &["model.safetensors", "non-finite log-probabilities"],
    );
    assert!(!gen.exists());
}

#[test]
fn reward_model_and_dpo_train_then_score_and_generate() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let (m, pref) = (llama(), root().join("data/pref_train.jsonl"));
    let train = |cmd: &str, out: &str| {
        let stdout = ok(
            t,
            &[
                cmd,
                "--model",
                s(&m),
                "--train-file",
                s(&pref),
                "--output-dir",
                out,
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--logging-steps",
                "1",
            ],
        );
        let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(summary["steps"], 2, "{cmd}: {summary}");
        for m in read_jsonl(&t.join(out).join("metrics.jsonl")) {
            assert!(
                m["loss"].as_f64().is_some_and(f64::is_finite),
                "{cmd} metrics.jsonl: {m:?}"
            );
        }
    };
    train("rm", "rm");
    let config: Value =
        serde_json::from_slice(&std::fs::read(t.join("rm/config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    let items = write(
        &t.join("items.jsonl"),
        "{\"prompt\": \"Q: 60+62=\", \"completion\": \" 122\", \"item_id\": \"x\"}\n{\"prompt\": \"Q: 60+62=\", \"completion\": \" 66\", \"item_id\": \"y\"}\n",
    );
    ok(
        t,
        &[
            "rm",
            "score",
            "--model",
            "rm",
            "--input",
            s(&items),
            "--output",
            "scores.jsonl",
        ],
    );
    let scored = read_jsonl(&t.join("scores.jsonl"));
    assert_eq!(
        scored
            .iter()
            .map(|r| r["item_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["x", "y"]
    );
    assert!(
        scored
            .iter()
            .all(|r| r["reward"].as_f64().is_some_and(f64::is_finite)),
        "{scored:?}"
    );

    train("dpo", "dpo");
    let gen = t.join("gen.jsonl");
    generate(
        t,
        &t.join("dpo"),
        &prompts(t),
        &gen,
        &["--temperature", "0"],
    );
    assert_eq!(read_jsonl(&gen).len(), 3);
}

#[test]
fn preference_failures() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let model = llama();
    let m = s(&model);
    write(&t.join("bad.jsonl"), "{\"prompt\": \"Q: 1+1=\", \"chosen\": \" 2\", \"rejected\": \" 3\"}\n{\"prompt\": \"Q: 1+2=\", \"chosen\": \" 3\", \"rejected\": 4}\n");
    for cmd in ["rm", "dpo"] {
        fails(
            t,
            &[
                cmd,
                "--model",
                m,
                "--train-file",
                "bad.jsonl",
                "--output-dir",
                "o",
                "--max-steps",
                "1",
            ],
            &["bad.jsonl:2:", "field \"rejected\""],
        );
    }
    assert!(!t.join("o").exists(), "a failed run created its output dir");
    let pref = root().join("data/pref_train.jsonl");
    let line = fails(
        t,
        &[
            "dpo",
            "--model",
            m,
            "--train-file",
            s(&pref),
            "--output-dir",
            "run",
            "--max-steps",
            "4",
            "--batch-size",
            "4",
            "--learning-rate=1e30",
            "--save-steps",
            "1",
        ],
        &["non-finite loss", "holds the weights that diverged"],
    );
    let ckpt = t
        .join("run")
        .join(Path::new(diverged_checkpoint(&line)).file_name().unwrap());
    assert!(ckpt.join("model.safetensors").is_file(), "{line}");
    assert!(
        !t.join("run/model.safetensors").exists(),
        "a diverged run saved a final model"
    );
}

#[test]
fn every_example_config_trains_a_few_steps() {
    let tmp = TempDir::new().unwrap();
    let examples: Vec<_> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    assert!(examples.len() >= 5, "{examples:?}");
    for path in examples {
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        // The file says which trainer reads it (its run line).
        let text = std::fs::read_to_string(&path).unwrap();
        let cmd = ["sft", "rm", "dpo", "grpo", "rloo", "ppo", "iterate"]
            .into_iter()
            .find(|c| text.contains(&format!("rlhf {c} --config")))
            .unwrap_or_else(|| panic!("{name}: no `rlhf <trainer> --config` run line"));
        if ["grpo", "rloo", "ppo", "iterate"].contains(&cmd) {
            continue; // online RL examples run in online_rl_cli.rs, iterate's in iterate.rs (rewards, not an eval loss)
        }
        let out = tmp.path().join(&name);
        // From the repository root, as the files say; the fixture model stands in for the demo's.
        let stdout = ok(
            &root(),
            &[
                cmd,
                "--config",
                s(&path),
                "--model",
                s(&llama()),
                "--output-dir",
                s(&out),
                "--max-steps",
                "2",
                "--eval-steps",
                "0",
                "--save-steps",
                "0",
                "--logging-steps",
                "1",
            ],
        );
        let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(summary["steps"], 2, "{name}: {summary}");
        let metrics = read_jsonl(&out.join("metrics.jsonl"));
        assert!(
            metrics
                .iter()
                .filter(|m| m.contains_key("loss"))
                .all(|m| m["loss"].as_f64().is_some_and(f64::is_finite)),
            "{name}: {metrics:?}"
        );
        assert!(
            metrics
                .iter()
                .any(|m| m.keys().any(|k| k.starts_with("eval_"))),
            "{name}: no eval line: {metrics:?}"
        );
    }
}
