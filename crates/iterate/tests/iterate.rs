//! `rlhf_iterate::run` on the fixture tiny Llama with labellers behind real HTTP: an LLM judge served by
//! `rlhf serve`'s router (the same fixture model), and a live feedback-app project whose simulated annotators log
//! in and label through the app's own pages.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{feedback_app, start_annotators, ANNOTATORS, PASSWORD};
use rlhf_iterate::{run, IterateArgs};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Settings as flags (parsed as `rlhf iterate` parses them).
fn args(runs: &Path, extra: &[&str]) -> IterateArgs {
    let base = [
        "--model",
        "fixtures/models/llama",
        "--prompts",
        "data/prompts.jsonl",
        "--rounds",
        "2",
        "--prompts-per-round",
        "4",
        "--candidates",
        "2",
        "--max-new-tokens",
        "5",
        "--dpo-steps",
        "2",
        "--batch-size",
        "4",
    ];
    parse(&base, runs, extra)
}

/// `base` flags, then `--runs-dir runs`, then `extra`, parsed as `rlhf iterate` parses them.
fn parse(base: &[&str], runs: &Path, extra: &[&str]) -> IterateArgs {
    let mut a: Vec<std::ffi::OsString> = base.iter().map(Into::into).collect();
    a.extend(["--runs-dir".into(), runs.as_os_str().to_owned()]);
    a.extend(extra.iter().map(Into::into));
    rlhf_train::settings::load::<IterateArgs>("rlhf iterate", &a).unwrap()
}

/// A server on a free port (tokio runtime kept alive by the returned value).
fn serve(app: axum::Router) -> (String, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rt)
}

#[test]
fn two_rounds_labelled_by_a_served_judge() {
    std::env::set_current_dir(root()).unwrap();
    let g = Arc::new(rlhf_generate::Generator::load(Path::new("fixtures/models/llama")).unwrap());
    let engine = rlhf_serve::Engine::start(g, 8);
    let (url, _rt) = serve(rlhf_serve::router(
        engine,
        rlhf_serve::ServeOptions {
            model_name: "tiny".into(),
            api_key: None,
        },
    ));
    let tmp = tempfile::tempdir().unwrap();
    // The fixture has 128 positions: a short rubric and pairwise template.
    let (rubric, pairwise) = (
        tmp.path().join("rubric.txt"),
        tmp.path().join("pairwise.txt"),
    );
    std::fs::write(&rubric, "Right sums win.").unwrap();
    std::fs::write(
        &pairwise,
        "{rubric}\n{prompt}\nA:{response_a}\nB:{response_b}\nBetter:",
    )
    .unwrap();
    let labels = format!(
        "judge:{url},model=tiny,rubric={},pairwise={}",
        rubric.display(),
        pairwise.display()
    );
    let s = run(&args(tmp.path(), &["--labels", &labels, "--name", "j"])).unwrap();
    assert_eq!(s.rounds.len(), 2);
    for k in 1..=2 {
        let rd = tmp.path().join(format!("j/round-{k}"));
        let labels = jsonl(&rd.join("labels.jsonl"));
        assert_eq!(labels.len(), 4, "one pair per prompt");
        for l in &labels {
            assert_eq!(
                (l["source"].as_str(), l["by"].as_str()),
                (Some("judge"), Some(format!("judge:{url}#tiny").as_str()))
            );
            let p = l["p_a"].as_f64().unwrap();
            assert!(
                (0.0..=1.0).contains(&p) && l["detail"]["orders"] == 2,
                "{l}"
            );
        }
        // Rows: the pairs the judge did not find a coin flip, chosen = the side it preferred.
        let rows = jsonl(&rd.join("train.jsonl"));
        let decided: Vec<&Value> = labels
            .iter()
            .filter(|l| l["p_a"].as_f64() != Some(0.5))
            .collect();
        assert_eq!(rows.len(), decided.len());
        assert!(!rows.is_empty(), "the judge decided no pair: {labels:?}");
        let cands = jsonl(&rd.join("candidates.jsonl"));
        for (row, l) in rows.iter().zip(&decided) {
            let texts = &cands[l["prompt_index"].as_u64().unwrap() as usize]["candidates"];
            let win = if l["p_a"].as_f64().unwrap() > 0.5 {
                0
            } else {
                1
            };
            assert_eq!(row["chosen"], texts[win]["text"], "{row} {l}");
        }
        let card = read_json(&rd.join("model_card.json"));
        assert_eq!(card["labellers"]["judge"]["rubric"], "Right sums win.");
        assert_eq!(card["labellers"]["judge"]["model"], "tiny");
        assert!(std::fs::read_to_string(rd.join("MODEL_CARD.md"))
            .unwrap()
            .contains("> Right sums win."));
    }

    // An endpoint nothing listens on: retried, then an error naming it; the run stops after sampling.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let e = run(&args(
        tmp.path(),
        &[
            "--labels",
            &format!("judge:{dead_url}"),
            "--name",
            "dead",
            "--reward-retries",
            "1",
        ],
    ))
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("round 1, phase label")
            && e.contains(&dead_url)
            && e.contains("after 2 attempts"),
        "{e}"
    );
    let state = read_json(&tmp.path().join("dead/state.json"));
    assert_eq!(state["done"], serde_json::json!(["sample"]));
}

#[test]
fn two_rounds_labelled_by_annotators_through_a_live_feedback_app() {
    std::env::set_current_dir(root()).unwrap();
    std::env::set_var("RLHF_FEEDBACK_PASSWORD", PASSWORD);
    let tmp = tempfile::tempdir().unwrap();
    let (url, project, _rt) = feedback_app(tmp.path());
    let (stop, workers) = start_annotators(&url, project);
    let labels = format!("feedback:{url}");
    let project_s = project.to_string();
    let a = args(
        tmp.path(),
        &[
            "--labels",
            &labels,
            "--feedback-project",
            &project_s,
            "--feedback-poll-s",
            "0.05",
            "--feedback-deadline-s",
            "120",
            "--name",
            "fb",
        ],
    );
    let s = run(&a).unwrap();
    stop.store(true, Ordering::Relaxed);
    let submitted: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    // 2 rounds × 4 items × overlap 2.
    assert_eq!(submitted, 16);
    assert_eq!(s.rounds.len(), 2);
    for k in 1..=2 {
        let rd = tmp.path().join(format!("fb/round-{k}"));
        let info = read_json(&rd.join("label_info.json"));
        assert_eq!(
            (
                info["feedback"]["items_short_of_overlap"].as_u64(),
                info["feedback"]["deadline_passed"].as_bool()
            ),
            (Some(0), Some(false)),
            "{info}"
        );
        let labels = jsonl(&rd.join("labels.jsonl"));
        let cands = jsonl(&rd.join("candidates.jsonl"));
        let rows = jsonl(&rd.join("train.jsonl"));
        // Decided items (both annotators agree unless the lengths tie) come back with the app's ids.
        assert_eq!(rows.len(), labels.len());
        assert!(!rows.is_empty());
        for l in &labels {
            assert_eq!(l["source"], "feedback");
            assert_eq!(l["detail"]["label_ids"].as_array().unwrap().len(), 2, "{l}");
            assert_eq!(
                l["detail"]["annotator_ids"].as_array().unwrap().len(),
                2,
                "{l}"
            );
            let texts = &cands[l["prompt_index"].as_u64().unwrap() as usize]["candidates"];
            let (ta, tb) = (
                texts[0]["text"].as_str().unwrap().chars().count(),
                texts[1]["text"].as_str().unwrap().chars().count(),
            );
            assert_ne!(ta, tb, "a tie is not exported as a preference");
            assert_eq!(
                l["p_a"].as_f64().unwrap(),
                if ta < tb { 1.0 } else { 0.0 },
                "the shorter response wins: {l}"
            );
        }
        for (row, prov) in rows.iter().zip(jsonl(&rd.join("training_rows.jsonl"))) {
            assert!(
                row["chosen"].as_str().unwrap().chars().count()
                    < row["rejected"].as_str().unwrap().chars().count()
            );
            assert_eq!(
                prov["app_label_ids"][0].as_array().unwrap().len(),
                2,
                "{prov}"
            );
        }
        let card = read_json(&rd.join("model_card.json"));
        // The app's statistics cover whoever labelled (which annotators did depends on who was fastest).
        let stats = card["labellers"]["stats"]["annotators"].as_array().unwrap();
        let in_stats: Vec<i64> = stats
            .iter()
            .map(|a| a["user_id"].as_i64().unwrap())
            .collect();
        for l in &labels {
            assert!(
                l["detail"]["annotator_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|id| in_stats.contains(&id.as_i64().unwrap())),
                "{l} {stats:?}"
            );
        }
        assert!(
            stats
                .iter()
                .all(|a| ANNOTATORS.contains(&a["username"].as_str().unwrap())
                    && a["labels"].as_u64() > Some(0)),
            "{stats:?}"
        );
    }

    // Nobody labels: the deadline passes, the round trains on nothing and says so.
    let a = args(
        tmp.path(),
        &[
            "--labels",
            &labels,
            "--feedback-project",
            &project_s,
            "--feedback-poll-s",
            "0.05",
            "--feedback-deadline-s",
            "0.3",
            "--name",
            "late",
            "--rounds",
            "1",
        ],
    );
    let s = run(&a).unwrap();
    let rd = tmp.path().join("late/round-1");
    let info = read_json(&rd.join("label_info.json"));
    assert_eq!(
        (
            info["feedback"]["items_short_of_overlap"].as_u64(),
            info["feedback"]["deadline_passed"].as_bool()
        ),
        (Some(4), Some(true)),
        "{info}"
    );
    assert_eq!(s.rounds[0]["training_rows"], 0);
    assert_eq!(
        std::fs::read(rd.join("model/model.safetensors")).unwrap(),
        std::fs::read(root().join("fixtures/models/llama/model.safetensors")).unwrap()
    );
}

/// Sandbox settings (the world's prompts) with the given budgets.
fn sandbox_args(runs: &Path, extra: &[&str]) -> IterateArgs {
    let base = [
        "--model",
        "fixtures/models/llama",
        "--labels",
        "sandbox",
        "--rounds",
        "1",
        "--prompts-per-round",
        "4",
        "--candidates",
        "2",
        "--max-new-tokens",
        "6",
        "--dpo-steps",
        "2",
        "--batch-size",
        "4",
        "--sandbox-eval-prompts",
        "4",
    ];
    parse(&base, runs, extra)
}

#[test]
fn a_round_mixes_every_kind_of_sandbox_feedback_traces_each_row_and_resumes_without_duplicates() {
    std::env::set_current_dir(root()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let budgets = [
        "--pairwise-budget",
        "3",
        "--rating-budget",
        "4",
        "--correction-budget",
        "3",
        "--demonstration-budget",
        "2",
        "--critique-budget",
        "3",
    ];
    let a = sandbox_args(tmp.path(), &[&["--name", "mix"][..], &budgets].concat());
    run(&a).unwrap();
    let rd = tmp.path().join("mix/round-1");
    let labels = jsonl(&rd.join("labels.jsonl"));
    let count = |kind: &str| labels.iter().filter(|l| l["kind"] == kind).count();
    // Pairs and ratings by the panel's overlap (3), the free-text kinds by one annotator each (the fixture's
    // replies are never perfect, so every correction is made).
    assert_eq!(
        (
            count("pairwise"),
            count("rating"),
            count("correction"),
            count("demonstration"),
            count("critique")
        ),
        (9, 12, 3, 2, 3),
        "{labels:?}"
    );
    let items: std::collections::HashSet<&str> = labels
        .iter()
        .filter(|l| l["kind"] == "pairwise")
        .map(|l| l["item"].as_str().unwrap())
        .collect();
    assert_eq!(items.len(), 3, "the pairwise budget");
    let by_id: std::collections::HashMap<&str, &Value> = labels
        .iter()
        .map(|l| (l["id"].as_str().unwrap(), l))
        .collect();
    assert_eq!(by_id.len(), labels.len(), "label ids are unique");

    let (rows, prov) = (
        jsonl(&rd.join("train.jsonl")),
        jsonl(&rd.join("training_rows.jsonl")),
    );
    let cands = jsonl(&rd.join("candidates.jsonl"));
    assert_eq!(rows.len(), prov.len());
    let mut kinds_seen = std::collections::BTreeSet::new();
    for (i, (row, p)) in rows.iter().zip(&prov).enumerate() {
        assert_eq!(
            (p["row"].as_u64(), &p["kind"]),
            (Some(i as u64), &row["kind"]),
            "{p}"
        );
        kinds_seen.insert(row["kind"].as_str().unwrap().to_string());
        let ls: Vec<&Value> = p["label_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| by_id[id.as_str().unwrap()])
            .collect();
        assert!(
            !ls.is_empty() && ls.iter().all(|l| l["kind"] == row["kind"]),
            "every row traces to labels of its kind: {p}"
        );
        let text = |l: &Value, c: &str| {
            cands[l["prompt_index"].as_u64().unwrap() as usize]["candidates"]
                [l[c].as_u64().unwrap() as usize]["text"]
                .clone()
        };
        match row["kind"].as_str().unwrap() {
            "correction" => assert_eq!(
                (&row["chosen"], &row["rejected"]),
                (&ls[0]["detail"]["corrected"], &text(ls[0], "a")),
                "corrected ≻ original"
            ),
            "demonstration" => assert_eq!(
                row["chosen"], ls[0]["detail"]["text"],
                "demonstration ≻ sample"
            ),
            "rating" => {
                let mean = |t: &Value| {
                    let s: Vec<f64> = ls
                        .iter()
                        .filter(|l| &text(l, "a") == t)
                        .map(|l| l["detail"]["score"].as_f64().unwrap())
                        .collect();
                    s.iter().sum::<f64>() / s.len() as f64
                };
                assert!(
                    mean(&row["chosen"]) > mean(&row["rejected"]),
                    "the higher mean rating wins: {row}"
                );
            }
            "critique" => assert_eq!(row["rejected"], text(ls[0], "a"), "revision ≻ original"),
            _ => {}
        }
    }
    assert!(
        kinds_seen.contains("correction") && kinds_seen.contains("demonstration"),
        "{kinds_seen:?}"
    );
    // Critiques that found something to fix were revised by the policy.
    let fixable = labels
        .iter()
        .filter(|l| {
            l["kind"] == "critique"
                && !l["detail"]["text"]
                    .as_str()
                    .unwrap()
                    .contains("nothing to fix")
        })
        .count();
    assert_eq!(jsonl(&rd.join("critiques.jsonl")).len(), fixable);
    let card = read_json(&rd.join("model_card.json"));
    assert_eq!(
        card["labels"]["by_kind"],
        serde_json::json!({"pairwise": 9, "rating": 12, "correction": 3, "demonstration": 2, "critique": 3})
    );
    let per_kind: u64 = card["training"]["rows_by_kind"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(per_kind, rows.len() as u64);
    let md = std::fs::read_to_string(rd.join("MODEL_CARD.md")).unwrap();
    assert!(
        md.contains("| rating | 12 |") && md.contains("| correction | 3 |"),
        "{md}"
    );

    // What a kill -9 during labelling leaves: the state before the label phase and a log cut mid-line. The rerun
    // asks only for the missing labels and ends with the same ones, each once.
    let log = rd.join("labels.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let kept: String = text.lines().take(10).map(|l| format!("{l}\n")).collect();
    std::fs::write(
        &log,
        format!("{kept}{}", &text.lines().nth(10).unwrap()[..20]),
    )
    .unwrap();
    let mut state = read_json(&tmp.path().join("mix/state.json"));
    (state["round"], state["done"]) = (serde_json::json!(1), serde_json::json!(["sample"]));
    std::fs::write(tmp.path().join("mix/state.json"), state.to_string()).unwrap();
    run(&a).unwrap();
    let again = jsonl(&log);
    assert_eq!(again.len(), labels.len(), "no label lost or duplicated");
    assert!(
        std::fs::read_to_string(&log).unwrap().starts_with(&kept),
        "labels given before the kill are kept as they were"
    );
    let ids = |ls: &[Value]| {
        ls.iter()
            .map(|l| l["id"].as_str().unwrap().to_string())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(ids(&again), ids(&labels));
    assert_eq!(
        jsonl(&rd.join("train.jsonl")),
        rows,
        "the same rows from the same labels"
    );

    // Kinds other than pairwise need the sandbox's annotators.
    let mut bad = a.clone();
    bad.labels = Some("exact:answer".into());
    bad.prompts = Some("data/prompts.jsonl".into());
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("rating_budget") && e.contains("sandbox"), "{e}");
}
