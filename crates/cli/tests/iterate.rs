//! `rlhf iterate` as a process on the fixture tiny Llama: two rounds labelled by a program reward, the shipped
//! example (sandbox annotators), resume after `kill -9` in the middle of labelling (by a program, and while
//! waiting for a live feedback app's annotators) without a lost or duplicated label, and bad configs named by
//! file, line and key.

#[path = "../../iterate/tests/common/mod.rs"]
mod feedback_app;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn rlhf(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.current_dir(root()).args(args).env("RUST_LOG", "off");
    c
}

fn ok(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap()
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Scores a candidate by the length of its JSON row, after `pause` seconds.
fn scorer(pause: &str) -> String {
    format!("cmd:sleep {pause}; while read -r l; do echo ${{#l}}; done")
}

/// Held-out prompts: the last 8 of the bundled addition prompts (training takes windows from the start).
fn eval_prompts(dir: &Path) -> String {
    let text = std::fs::read_to_string(root().join("data/prompts.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let p = dir.join("eval.jsonl");
    std::fs::write(&p, lines[lines.len() - 8..].join("\n")).unwrap();
    p.display().to_string()
}

fn base_args<'a>(runs: &'a str, eval: &'a str, labels: &'a str) -> Vec<&'a str> {
    vec![
        "iterate",
        "--model",
        "fixtures/models/llama",
        "--prompts",
        "data/prompts.jsonl",
        "--eval-prompts",
        eval,
        "--runs-dir",
        runs,
        "--name",
        "t",
        "--labels",
        labels,
        "--rounds",
        "2",
        "--prompts-per-round",
        "6",
        "--candidates",
        "2",
        "--max-new-tokens",
        "6",
        "--dpo-steps",
        "2",
        "--batch-size",
        "4",
        "--eval-reward",
        "exact:answer",
    ]
}

#[test]
fn program_reward_two_rounds_then_resume_after_kill_9_without_losing_or_duplicating_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs").display().to_string();
    let eval = eval_prompts(tmp.path());

    // Uninterrupted reference run.
    let fast = scorer("0");
    let s = ok(&rlhf(&base_args(&runs, &eval, &fast)).output().unwrap());
    let run = tmp.path().join("runs/t");
    assert_eq!(s["rounds"].as_array().unwrap().len(), 2, "{s}");
    for k in 1..=2 {
        let rd = run.join(format!("round-{k}"));
        let labels = jsonl(&rd.join("labels.jsonl"));
        assert_eq!(labels.len(), 6, "one pair per prompt");
        // Every training row is its pair's higher-scored candidate over the lower one, traced to its label.
        let cands = jsonl(&rd.join("candidates.jsonl"));
        assert_eq!(cands.len(), 6);
        let rows = jsonl(&rd.join("train.jsonl"));
        let decided = labels
            .iter()
            .filter(|l| l["detail"]["scores"][0] != l["detail"]["scores"][1])
            .count();
        assert_eq!(rows.len(), decided);
        for (row, prov) in rows.iter().zip(jsonl(&rd.join("training_rows.jsonl"))) {
            let ids = prov["label_ids"].as_array().unwrap();
            assert_eq!(ids.len(), 1, "{prov}");
            let l = labels.iter().find(|l| l["id"] == ids[0]).unwrap();
            let (sa, sb) = (
                l["detail"]["scores"][0].as_f64().unwrap(),
                l["detail"]["scores"][1].as_f64().unwrap(),
            );
            let texts = &cands[l["prompt_index"].as_u64().unwrap() as usize]["candidates"];
            let (win, lose) = if sa > sb { (0, 1) } else { (1, 0) };
            assert_eq!(
                (&row["chosen"], &row["rejected"]),
                (&texts[win]["text"], &texts[lose]["text"]),
                "{row} {l}"
            );
            assert_eq!(
                row["prompt"],
                cands[l["prompt_index"].as_u64().unwrap() as usize]["row"]["prompt"]
            );
        }
        assert!(rd.join("model/model.safetensors").is_file() && rd.join("MODEL_CARD.md").is_file());
        let m = &s["rounds"][k - 1];
        assert_eq!(m["round"], k);
        assert!(
            m["eval"]["trained"]["rewards"]["exact:answer"]["mean"].is_number(),
            "{m}"
        );
        assert!(
            m["eval"]["trained"]["kl_to_start"]["mean"].is_number(),
            "{m}"
        );
        let card: Value =
            serde_json::from_str(&std::fs::read_to_string(rd.join("model_card.json")).unwrap())
                .unwrap();
        assert_eq!(card["labels"]["total"], 6);
        assert_eq!(card["training"]["rows"], m["training_rows"]);
    }
    // Round 2 starts from round 1's model.
    assert!(s["rounds"][1]["start_policy"]
        .as_str()
        .unwrap()
        .ends_with("round-1/model"));

    // The same run, killed while labelling (each prompt's scoring takes 0.4 s), then rerun to the end.
    let slow = scorer("0.4");
    let mut child = rlhf(&base_args(&runs, &eval, &slow))
        .arg("--name")
        .arg("k")
        .spawn()
        .unwrap();
    let labels_file = tmp.path().join("runs/k/round-1/labels.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&labels_file).map_or(0, |t| t.lines().count()) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no labels appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = std::fs::read_to_string(&labels_file).unwrap();
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("runs/k/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            state["round"].as_u64(),
            state["done"].as_array().unwrap().len()
        ),
        (Some(1), 1),
        "killed during labelling: {state}"
    );
    assert!(
        before.lines().count() < 6,
        "the kill came too late to test anything"
    );

    let resumed = ok(&rlhf(&base_args(&runs, &eval, &slow))
        .arg("--name")
        .arg("k")
        .output()
        .unwrap());
    let after = std::fs::read_to_string(&labels_file).unwrap();
    assert!(
        after.starts_with(before.trim_end_matches(|c| c != '\n')),
        "labels given before the kill are kept as they were"
    );
    for k in 1..=2 {
        let labels = jsonl(&tmp.path().join(format!("runs/k/round-{k}/labels.jsonl")));
        let ids: HashSet<&str> = labels.iter().map(|l| l["id"].as_str().unwrap()).collect();
        assert_eq!(
            (labels.len(), ids.len()),
            (6, 6),
            "round {k}: every pair labelled exactly once"
        );
    }
    // Same seeds, same labels, same decisions: the resumed run trained on the rows the uninterrupted one did.
    for k in 0..2 {
        assert_eq!(
            resumed["rounds"][k]["training_rows"],
            s["rounds"][k]["training_rows"]
        );
        assert_eq!(
            resumed["rounds"][k]["eval"]["trained"]["rewards"],
            s["rounds"][k]["eval"]["trained"]["rewards"]
        );
    }
    // A finished run reruns as a no-op.
    let again = ok(&rlhf(&base_args(&runs, &eval, &slow))
        .arg("--name")
        .arg("k")
        .output()
        .unwrap());
    assert_eq!(again["rounds"], resumed["rounds"]);
    // Other settings under the same name are refused, naming what differs.
    let o = rlhf(&base_args(&runs, &eval, &slow))
        .args(["--name", "k", "--rounds", "3"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("state.json") && err.contains("rounds (was 2, now 3)"),
        "{err}"
    );
}

#[test]
fn the_example_config_runs_with_the_sandbox_annotators() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().display().to_string();
    let s = ok(&rlhf(&[
        "iterate",
        "--config",
        "examples/iterate.toml",
        "--model",
        "fixtures/models/llama",
        "--runs-dir",
        &runs,
        "--prompts-per-round",
        "6",
        "--dpo-steps",
        "2",
        "--sandbox-eval-prompts",
        "8",
        "--max-new-tokens",
        "8",
        "--rounds",
        "2",
    ])
    .output()
    .unwrap());
    let rd = tmp.path().join("iterate-sandbox/round-2");
    // Three annotators per pair, 4 candidates = 6 pairs per prompt.
    let labels = jsonl(&rd.join("labels.jsonl"));
    assert_eq!(labels.len(), 6 * 6 * 3);
    assert!(labels
        .iter()
        .all(|l| l["source"] == "sandbox" && l["by"].as_str().unwrap().starts_with("sandbox:")));
    let card: Value =
        serde_json::from_str(&std::fs::read_to_string(rd.join("model_card.json")).unwrap())
            .unwrap();
    let stats = &card["labellers"]["stats"];
    assert_eq!(stats["annotators"].as_array().unwrap().len(), 6, "{stats}");
    assert!(
        stats["agreement"].as_array().is_some_and(|a| !a.is_empty()),
        "{stats}"
    );
    // The annotators' decisive labels checked against the hidden gold reward.
    let g = &card["labellers"]["agreement_with_gold"];
    let by: u64 = g["by_labeller"]
        .as_object()
        .unwrap()
        .values()
        .map(|a| a["compared"].as_u64().unwrap())
        .sum();
    assert_eq!(g["compared"].as_u64(), Some(by), "{g}");
    assert!(
        g["compared"].as_u64().unwrap() > 0 && g["agree"].as_u64() <= g["compared"].as_u64(),
        "{g}"
    );
    let decisive = labels
        .iter()
        .filter(|l| l["p_a"].as_f64() != Some(0.5))
        .count() as u64;
    assert!(by <= decisive);
    let gold = &s["rounds"][1]["eval"]["trained"]["rewards"]["gold"];
    assert!(
        (-1.0..=1.0).contains(&gold["mean"].as_f64().unwrap()),
        "{gold}"
    );
    let md = std::fs::read_to_string(rd.join("MODEL_CARD.md")).unwrap();
    assert!(
        md.contains("| careless |") && md.contains("## Provenance of the training rows"),
        "{md}"
    );
}

#[test]
fn bad_configs_name_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("it.toml");
    let run = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        let o = rlhf(&[
            "iterate",
            "--config",
            cfg.to_str().unwrap(),
            "--runs-dir",
            tmp.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run("model = \"fixtures/models/llama\"\nround = 3\n");
    assert!(
        e.contains("it.toml:2") && e.contains("\"round\"") && e.contains("unknown key"),
        "{e}"
    );
    let e =
        run("model = \"fixtures/models/llama\"\nlabels = \"sandbox\"\n\ncandidates = \"two\"\n");
    assert!(
        e.contains("it.toml:4") && e.contains("\"candidates\""),
        "{e}"
    );
    let e = run("model = \"fixtures/models/llama\"\nlabels = \"sandbox\"\ncandidates = 1\n");
    assert!(
        e.contains("it.toml:3") && e.contains("\"candidates\"") && e.contains("at least 2"),
        "{e}"
    );
    let e = run("model = \"fixtures/models/llama\"\nlabels = \"exact:answer\"\n");
    assert!(e.contains("\"prompts\"") && e.contains("required"), "{e}");
    let e = run("model = \"fixtures/models/llama\"\nlabels = \"feedback:http://127.0.0.1:1\"\nprompts = \"data/prompts.jsonl\"\n");
    assert!(
        e.contains("\"feedback_project\"") && e.contains("required"),
        "{e}"
    );
    let e = run("model = \"fixtures/models/llama\"\nlabels = \"sandbox\"\nprompts = \"data/prompts.jsonl\"\n");
    assert!(
        e.contains("it.toml:3") && e.contains("\"prompts\"") && e.contains("sandbox world"),
        "{e}"
    );
    let e = run("model = \"fixtures/models/llama\"\nprompts = \"data/prompts.jsonl\"\n\nlabels = \"rgx:[0-9]\"\n");
    assert!(
        e.contains("it.toml:4") && e.contains("\"labels\"") && e.contains("unknown kind `rgx`"),
        "{e}"
    );
    let e = run("model = \"fixtures/models/llama\"\nprompts = \"data/prompts.jsonl\"\nlabels = \"exact:answer\"\neval_reward = [\"exact:answer\"]\n");
    assert!(
        e.contains("\"eval_prompts\"") && e.contains("required with eval_reward"),
        "{e}"
    );
    assert!(
        !tmp.path().join("iterate").exists(),
        "nothing is written for a bad config"
    );
}

#[test]
fn rm_retrain_then_grpo_rounds() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs").display().to_string();
    let eval = eval_prompts(tmp.path());
    let fast = scorer("0");
    let mut a = base_args(&runs, &eval, &fast);
    a.extend([
        "--trainer",
        "rm_grpo",
        "--rm-steps",
        "3",
        "--grpo-steps",
        "2",
        "--batch-size",
        "2",
        "--learning-rate",
        "1e-5",
    ]);
    let s = ok(&rlhf(&a).output().unwrap());
    let run = tmp.path().join("runs/t");
    let rows = |k: usize| jsonl(&run.join(format!("round-{k}/train.jsonl"))).len();
    // The reward model of round 2 learns from the pairs of both rounds.
    assert_eq!(
        jsonl(&run.join("round-2/rm_train.jsonl")).len(),
        rows(1) + rows(2)
    );
    for k in 1..=2 {
        let rd = run.join(format!("round-{k}"));
        let t: Value =
            serde_json::from_str(&std::fs::read_to_string(rd.join("train_summary.json")).unwrap())
                .unwrap();
        assert_eq!(
            (
                t["summary"]["rm"]["steps"].as_u64(),
                t["summary"]["steps"].as_u64()
            ),
            (Some(3), Some(2)),
            "{t}"
        );
        assert!(
            t["summary"]["final_metrics"]["kl"].is_number(),
            "GRPO with β > 0 reports its KL: {t}"
        );
        assert_eq!(t["config"]["grpo"]["beta"], 0.05);
        assert!(
            rd.join("rm/model.safetensors").is_file()
                && rd.join("model/model.safetensors").is_file()
        );
        assert!(s["rounds"][k - 1]["eval"]["trained"]["kl_to_start"]["mean"].is_number());
        let md = std::fs::read_to_string(rd.join("MODEL_CARD.md")).unwrap();
        assert!(md.contains("then GRPO") && md.contains("\"rm\""), "{md}");
    }
}

#[test]
fn killed_while_waiting_for_the_feedback_app_then_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, project, _rt) = feedback_app::feedback_app(tmp.path());
    let runs = tmp.path().join("runs").display().to_string();
    let labels = format!("feedback:{url}");
    let project_s = project.to_string();
    let eval = eval_prompts(tmp.path());
    let mut a = base_args(&runs, &eval, &labels);
    a.extend([
        "--feedback-project",
        &project_s,
        "--feedback-poll-s",
        "0.05",
        "--feedback-deadline-s",
        "120",
        "--rounds",
        "1",
    ]);
    let cmd = || {
        let mut c = rlhf(&a);
        c.env("RLHF_FEEDBACK_PASSWORD", feedback_app::PASSWORD);
        c
    };
    let mut child = cmd().spawn().unwrap();
    // Wait until the round's items are in the app (nobody labels yet), then kill the waiting run.
    let mut admin =
        rlhf_iterate::feedback::App::login(&url, "admin", feedback_app::PASSWORD).unwrap();
    let ours = |admin: &mut rlhf_iterate::feedback::App| {
        let (_, counts) = admin.label_counts(project).unwrap();
        counts
            .into_iter()
            .filter(|(id, _)| id.starts_with("t/r1-"))
            .collect::<Vec<_>>()
    };
    let t0 = Instant::now();
    while ours(&mut admin).len() < 6 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "items never arrived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("runs/t/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["done"],
        serde_json::json!(["sample"]),
        "killed while waiting for labels"
    );

    // The annotators come; the same command pushes again (nothing duplicated), waits and pulls.
    let (stop, workers) = feedback_app::start_annotators(&url, project);
    let s = ok(&cmd().output().unwrap());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let submitted: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let items = ours(&mut admin);
    assert_eq!(items.len(), 6, "one item per pair, however often pushed");
    assert!(items.iter().all(|(_, n)| *n == 2), "{items:?}");
    assert_eq!(submitted, 12);
    let labels = jsonl(&tmp.path().join("runs/t/round-1/labels.jsonl"));
    let ids: HashSet<&str> = labels.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), labels.len());
    assert_eq!(s["rounds"][0]["labels"].as_u64(), Some(labels.len() as u64));
    assert!(labels
        .iter()
        .all(|l| l["detail"]["label_ids"].as_array().unwrap().len() == 2));
}
