//! `rlhf eval` and `rlhf sandbox` end to end through the binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn rlhf(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env("RUST_LOG", "off")
        .output()
        .expect("cannot run the rlhf binary")
}

fn ok(cwd: &Path, args: &[&str]) -> String {
    let out = rlhf(cwd, args);
    assert!(
        out.status.success(),
        "rlhf {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Exit 1, one `error:` line containing every needle, no panic.
fn fails(cwd: &Path, args: &[&str], needles: &[&str]) {
    let out = rlhf(cwd, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "rlhf {args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one-line error expected: {stderr}");
    for n in needles {
        assert!(
            lines[0].contains(n),
            "error should mention {n:?}: {}",
            lines[0]
        );
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn eval_two_models_with_gold_and_exact_rewards() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let world = rlhf_sandbox::generate(12, &rlhf_sandbox::Mix::default(), 1, "e-");
    rlhf_sandbox::write_prompts(&t.join("prompts.jsonl"), &world).unwrap();
    let llama = root().join("fixtures/models/llama");
    copy_dir(&llama, &t.join("twin"));
    let l = llama.to_str().unwrap();
    let stdout = ok(
        t,
        &[
            "eval",
            "--model",
            &format!("orig={l}"),
            "--model",
            "twin",
            "--prompts",
            "prompts.jsonl",
            "--reward",
            "gold",
            "--reward",
            "exact:answer",
            "--reference",
            l,
            "--max-new-tokens",
            "6",
            "--out",
            "s.json",
            "--report",
            "r.html",
        ],
    );
    assert!(stdout.contains("reward gold on 12 prompts"), "{stdout}");
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("s.json")).unwrap()).unwrap();
    assert_eq!(s["prompts"], 12);
    let models = s["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["name"], "orig");
    assert_eq!(models[1]["name"], "twin");
    // Identical weights and seeds: identical samples, zero KL to itself, every prompt a tie.
    assert_eq!(models[0]["kl_to_reference"]["mean"], 0.0);
    assert_eq!(models[0]["rewards"], models[1]["rewards"]);
    for w in s["win_rates"].as_array().unwrap() {
        assert_eq!(w["win_rate"], 0.5, "{w}");
    }
    let gold = &models[0]["rewards"][0];
    assert_eq!(gold["source"], "gold");
    assert_eq!(gold["reward"]["n"], 12);
    let (lo, mean, hi) = (
        gold["reward"]["ci_low"].as_f64().unwrap(),
        gold["reward"]["mean"].as_f64().unwrap(),
        gold["reward"]["ci_high"].as_f64().unwrap(),
    );
    assert!(lo <= mean && mean <= hi && (-1.0..=1.0).contains(&mean));
    // exact:answer scores only the rows that have an answer.
    let numeric = world.iter().filter(|p| p.gold.answer.is_some()).count();
    assert_eq!(models[0]["rewards"][1]["reward"]["n"], numeric as u64);
    assert!(models[0]["token_entropy"].as_f64().unwrap() > 0.0);
    let html = std::fs::read_to_string(t.join("r.html")).unwrap();
    for id in [
        "rewards",
        "indicators",
        "win-rates",
        "diversity",
        "examples",
    ] {
        assert!(
            html.contains(&format!("id=\"{id}\"")),
            "section {id} missing"
        );
    }
    assert!(html.matches("<svg").count() >= 3);
    assert!(!html.contains("<script"));
}

#[test]
fn eval_failures_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let l = root().join("fixtures/models/llama");
    let l = l.to_str().unwrap();
    std::fs::write(
        t.join("p.jsonl"),
        "{\"prompt\": \"Q: 1+1=\", \"id\": \"x\"}\n{\"prompt\": 3}\n",
    )
    .unwrap();
    fails(
        t,
        &[
            "eval",
            "--model",
            l,
            "--prompts",
            "p.jsonl",
            "--reward",
            "exact:answer",
        ],
        &["p.jsonl:2", "\"prompt\" must be a string"],
    );
    std::fs::write(
        t.join("p.jsonl"),
        "{\"prompt\": \"Q: 1+1=\", \"id\": \"x\"}\n",
    )
    .unwrap();
    fails(
        t,
        &[
            "eval",
            "--model",
            l,
            "--prompts",
            "p.jsonl",
            "--reward",
            "gold",
        ],
        &["p.gold.jsonl", "cannot read the gold file"],
    );
    fails(
        t,
        &[
            "eval",
            "--model",
            l,
            "--prompts",
            "p.jsonl",
            "--reward",
            "bleu",
        ],
        &["unknown reward source \"bleu\""],
    );
    fails(
        t,
        &[
            "eval",
            "--model",
            l,
            "--prompts",
            "p.jsonl",
            "--reward",
            "exact:answer",
            "--max-new-tokens",
            "2",
        ],
        &["exact:answer applies to none of the 1 prompts"],
    );
    fails(
        t,
        &[
            "eval",
            "--model",
            "nope",
            "--prompts",
            "p.jsonl",
            "--reward",
            "exact:id",
        ],
        &["nope"],
    );
    assert!(
        !t.join("eval_summary.json").exists(),
        "nothing written on failure"
    );
    // The sandbox's JSON configuration: unknown keys and missing files are named.
    let cfg = ok(t, &["sandbox", "--quick", "--print-config"]);
    std::fs::write(
        t.join("c.json"),
        cfg.replace("\"corpus_prompts\"", "\"corpus_prompt\""),
    )
    .unwrap();
    fails(
        t,
        &["sandbox", "--config", "c.json", "--out", "run"],
        &["c.json", "not a sandbox configuration", "corpus_prompt"],
    );
    fails(
        t,
        &["sandbox", "--config", "missing.json"],
        &["missing.json", "cannot read"],
    );
    let mut bad: Value = serde_json::from_str(&cfg).unwrap();
    bad["label_noise"] = serde_json::json!([0.0, 1.5]);
    std::fs::write(t.join("c.json"), bad.to_string()).unwrap();
    fails(
        t,
        &["sandbox", "--config", "c.json", "--out", "run"],
        &["label_noise", "1.5", "[0, 1]"],
    );
    for (key, value, says) in [
        ("export_min_confidence", serde_json::json!(0.3), "[0.5, 1]"),
        ("pairs_per_prompt", serde_json::json!(0), "compares nothing"),
    ] {
        let mut bad: Value = serde_json::from_str(&cfg).unwrap();
        bad[key] = value;
        std::fs::write(t.join("c.json"), bad.to_string()).unwrap();
        fails(
            t,
            &["sandbox", "--config", "c.json", "--out", "run"],
            &[key, says],
        );
    }
    assert!(!t.join("run").exists());
}

/// The sandbox's quick budget end to end: real improvements, the report's sections, and the same seed giving
/// the same summary byte for byte (the second run reuses the cached base model and redoes everything else).
#[test]
fn sandbox_quick_run_is_reproducible_and_measures_improvement() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let stdout = ok(t, &["sandbox", "--quick", "--out", "run", "--seed", "0"]);
    assert!(
        stdout.contains("gold reward on 600 held-out prompts"),
        "{stdout}"
    );
    let first = std::fs::read(t.join("run/summary.json")).unwrap();
    let s: Value = serde_json::from_slice(&first).unwrap();
    let gold = |name: &str| {
        let m = s["eval"]["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap()
            .clone();
        let r = &m["rewards"][0]["reward"];
        (
            r["ci_low"].as_f64().unwrap(),
            r["mean"].as_f64().unwrap(),
            r["ci_high"].as_f64().unwrap(),
        )
    };
    let (base, sft) = (gold("base"), gold("sft"));
    assert!(
        sft.0 > base.2,
        "SFT should beat the base model beyond the CIs: base {base:?}, sft {sft:?}"
    );
    // RLHF works in the sandbox: both online policies beat SFT by the hidden gold reward, beyond the intervals.
    for rl in ["ppo", "grpo"] {
        let r = gold(rl);
        assert!(
            r.0 > sft.2,
            "{rl} should beat SFT beyond the CIs: sft {sft:?}, {rl} {r:?}"
        );
    }
    // Best-of-n against the proxy: n doubles up to the configured maximum, KL is the analytic bound, and the
    // proxy score of the pick never falls as n grows (the samples are shared).
    let bon = s["best_of_n"].as_array().unwrap();
    let ns: Vec<u64> = bon.iter().map(|p| p["n"].as_u64().unwrap()).collect();
    assert_eq!(ns, [1, 2, 4, 8]);
    assert_eq!(bon[0]["kl"].as_f64(), Some(0.0));
    let proxy: Vec<f64> = bon.iter().map(|p| p["proxy"].as_f64().unwrap()).collect();
    assert!(proxy.windows(2).all(|w| w[1] >= w[0]), "{proxy:?}");
    // Label noise: one reward model per level on nested flips of the same training pairs; level 0 is the
    // pipeline's own reward model, and best-of-n picked by it is the sweep's largest n (the same samples).
    let in_ci = |e: &Value, lo: f64, hi: f64| {
        let (l, m, h) = (
            e["ci_low"].as_f64().unwrap(),
            e["mean"].as_f64().unwrap(),
            e["ci_high"].as_f64().unwrap(),
        );
        assert!(lo <= l && l <= m && m <= h && h <= hi, "{e}");
        m
    };
    let noise = s["label_noise"].as_array().unwrap();
    let levels: Vec<f64> = noise.iter().map(|l| l["noise"].as_f64().unwrap()).collect();
    assert_eq!(levels, [0.0, 0.2, 0.4]);
    let train_pairs = noise[0]["train_pairs"].as_u64().unwrap();
    let flipped: Vec<u64> = noise
        .iter()
        .map(|l| l["flipped"].as_u64().unwrap())
        .collect();
    for (l, f) in noise.iter().zip(&flipped) {
        assert_eq!(l["train_pairs"].as_u64(), Some(train_pairs));
        assert_eq!(
            *f,
            (l["noise"].as_f64().unwrap() * train_pairs as f64).round() as u64
        );
        for k in ["rm_gold_agreement", "rm_eval_accuracy"] {
            assert!((0.0..=1.0).contains(&l[k].as_f64().unwrap()), "{k}: {l}");
        }
        assert!(l["gold_pairs"].as_u64().unwrap() > 50, "{l}");
        assert_eq!(l["best_of_n"], 8);
        in_ci(&l["best_of_n_gold"], -1.0, 1.0);
    }
    assert!(flipped[0] == 0 && flipped[1] < flipped[2], "{flipped:?}");
    let rm = s["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["name"] == "rm")
        .unwrap();
    assert_eq!(
        noise[0]["rm_gold_agreement"],
        rm["gold_agreement"]["accuracy"]
    );
    assert_eq!(noise[0]["rm_eval_accuracy"], rm["eval"]["accuracy"]);
    let bon_gold = noise[0]["best_of_n_gold"]["mean"].as_f64().unwrap();
    assert!(
        (bon_gold - bon[3]["gold"].as_f64().unwrap()).abs() < 1e-9,
        "{bon_gold} vs {}",
        bon[3]
    );
    for l in &levels[1..] {
        assert!(t
            .join(format!("run/rm-noise-{:.0}/model.safetensors", 100.0 * l))
            .is_file());
    }
    // Gold along the PPO run: step 0 is SFT (KL exactly 0), then every checkpoint up to the last step.
    let along = s["ppo_checkpoints"].as_array().unwrap();
    let steps: Vec<u64> = along.iter().map(|p| p["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 10, 20, 30, 40, 50, 60]);
    assert_eq!(along[0]["kl"]["mean"].as_f64(), Some(0.0));
    for p in along {
        in_ci(&p["gold"], -1.0, 1.0);
        in_ci(&p["proxy"], f64::NEG_INFINITY, f64::INFINITY);
        assert_eq!(p["gold"]["n"], 300);
    }
    // PPO raises the score of the reward model it optimises (held-out prompts).
    let proxy = |p: &Value| p["proxy"]["mean"].as_f64().unwrap();
    assert!(proxy(&along[6]) > proxy(&along[0]), "{along:?}");
    // PPO per noise level, on the same prompts and sampling seeds: level 0 is the pipeline's PPO policy, whose
    // last checkpoint is its final model.
    for l in noise {
        in_ci(&l["ppo_gold"], -1.0, 1.0);
        assert_eq!(l["ppo_gold"]["n"], 300);
    }
    assert_eq!(
        (&noise[0]["ppo_gold"], &noise[0]["ppo_kl"]),
        (&along[6]["gold"], &along[6]["kl"])
    );
    for l in &levels[1..] {
        assert!(t
            .join(format!("run/ppo-noise-{:.0}/model.safetensors", 100.0 * l))
            .is_file());
    }
    let names: Vec<&str> = s["eval"]["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "base",
            "sft",
            "dpo",
            "ppo",
            "grpo",
            "sft-large",
            "dpo-unbiased",
            "dpo-long"
        ]
    );
    assert!(s["preference_pairs"].as_u64().unwrap() > 100);
    let findings: Vec<&str> = s["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(
        findings.iter().any(|f| f.starts_with("gold reward of dpo")),
        "{findings:?}"
    );
    assert!(
        findings
            .iter()
            .any(|f| f.starts_with("best-of-n against the reward model")),
        "{findings:?}"
    );
    assert!(
        findings
            .iter()
            .any(|f| f.starts_with("along the PPO run (7 checkpoints on 300 held-out prompts")),
        "{findings:?}"
    );
    assert!(
        findings
            .iter()
            .any(|f| f.starts_with("label noise (0 → 20 → 40 % of")),
        "{findings:?}"
    );
    assert!(
        findings
            .iter()
            .any(|f| f.starts_with("InstructGPT in miniature: ppo")),
        "{findings:?}"
    );
    // The verbosity bias of length-loving annotators reaches the policy trained on their labels.
    assert!(
        findings
            .iter()
            .any(|f| f.starts_with("length-bias probe") && f.contains("reaches the policy")),
        "{findings:?}"
    );
    let html = std::fs::read_to_string(t.join("run/report.html")).unwrap();
    for id in [
        "findings",
        "rewards",
        "indicators",
        "win-rates",
        "diversity",
        "over-optimisation",
        "label-noise",
        "annotators",
        "training",
        "examples",
    ] {
        assert!(
            html.contains(&format!("id=\"{id}\"")),
            "section {id} missing"
        );
    }
    for chart in [
        "PPO checkpoints: reward against KL",
        "reward model against label noise",
        "gold of the policies against each reward model",
    ] {
        assert!(
            html.contains(&format!("aria-label='{chart}'")),
            "chart {chart:?} missing"
        );
    }
    assert!(html.matches("<svg").count() >= 10);
    assert!(t.join("run/timings.json").is_file());
    // What the trainers read holds no gold: only the feedback app's export columns and public prompt columns.
    let keys = |file: &str| -> std::collections::BTreeSet<String> {
        let text = std::fs::read_to_string(t.join("run/data").join(file)).unwrap();
        text.lines()
            .flat_map(|l| {
                serde_json::from_str::<serde_json::Map<String, Value>>(l)
                    .unwrap()
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let export = [
        "prompt",
        "project",
        "item_id",
        "external_id",
        "annotator_ids",
        "label_ids",
        "gold",
    ];
    let allowed = |extra: &[&str], file: &str| {
        let k = keys(file);
        assert!(
            k.iter()
                .all(|k| export.contains(&k.as_str()) || extra.contains(&k.as_str())),
            "{file}: {k:?}"
        );
    };
    allowed(
        &["chosen", "rejected", "margin", "votes", "confidence"],
        "preferences.jsonl",
    );
    allowed(
        &["chosen", "rejected", "margin", "votes", "confidence"],
        "rm_train.jsonl",
    );
    allowed(&["completion"], "demonstrations.jsonl");
    allowed(&["id", "answer"], "train_prompts.jsonl");
    assert_eq!(
        keys("corpus.jsonl").into_iter().collect::<Vec<_>>(),
        ["text"]
    );
    // The demonstrations cover every behaviour, refusals and abstentions included.
    let demos = std::fs::read_to_string(t.join("run/data/demonstrations.jsonl")).unwrap();
    for reply in [
        rlhf_sandbox::world::REFUSAL,
        rlhf_sandbox::world::ABSTAIN,
        " Thanks!",
    ] {
        assert!(demos.contains(reply), "no demonstration with {reply:?}");
    }

    // The trainers' reward sources through `rlhf eval`: the run's reward model and a regex.
    let out = ok(
        t,
        &[
            "eval",
            "--model",
            "run/sft",
            "--prompts",
            "run/data/eval_prompts.jsonl",
            "--reward",
            "rm:run/rm",
            "--reward",
            "regex:[0-9]",
            "--limit",
            "20",
            "--out",
            "rm_eval.json",
        ],
    );
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("rm_eval.json")).unwrap()).unwrap();
    let r = &e["models"][0]["rewards"];
    assert_eq!(
        (r[0]["source"].as_str(), r[1]["source"].as_str()),
        (Some("rm:run/rm"), Some("regex:[0-9]")),
        "{out}"
    );
    assert!(r[0]["reward"]["mean"].as_f64().unwrap().is_finite());
    let share = r[1]["reward"]["mean"].as_f64().unwrap();
    assert!(
        (0.0..=1.0).contains(&share) && share > 0.0,
        "share of completions with a digit: {share}"
    );
    fails(
        t,
        &[
            "eval",
            "--model",
            "run/sft",
            "--prompts",
            "run/data/eval_prompts.jsonl",
            "--reward",
            "0.5*eos:1",
        ],
        &["eos", "finish reasons"],
    );

    let stderr = String::from_utf8_lossy(
        &rlhf(t, &["sandbox", "--quick", "--out", "run", "--seed", "0"]).stderr,
    )
    .into_owned();
    assert!(stderr.contains("reusing the base model"), "{stderr}");
    assert_eq!(
        std::fs::read(t.join("run/summary.json")).unwrap(),
        first,
        "same seed, different summary"
    );
}
