//! `rlhf rm select`: candidate pairs ranked by a two-head reward ensemble's disagreement (or margin, or at
//! random), the output rows ready for the feedback app, and bad input reported with file:line: field.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_model::seq_cls::SeqCls;
use rlhf_train::select::{run_select, SelectArgs, Strategy};
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models"
    ))
    .join(name)
}

/// The fixture Llama with two fresh reward heads: an ensemble whose members disagree.
fn two_heads(dir: &Path) -> PathBuf {
    let out = dir.join("rm2");
    let lm = rlhf_model::CausalLm::load(&fixture("llama"), &Device::Cpu).unwrap();
    SeqCls::from_causal_lm(lm, 2, Some(0), 7)
        .unwrap()
        .save(&out)
        .unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(fixture("llama").join(f), out.join(f)).unwrap();
    }
    out
}

fn candidates(dir: &Path) -> PathBuf {
    let rows: Vec<Value> = (0..6)
        .map(|i| json!({"id": format!("c{i}"), "prompt": format!("Q: {i}+{i}="), "responses": [format!(" {}", 2 * i), format!(" {}", 100 + i)]}))
        .collect();
    let p = dir.join("cands.jsonl");
    std::fs::write(
        &p,
        rows.iter().map(|r| format!("{r}\n")).collect::<String>(),
    )
    .unwrap();
    p
}

fn args(
    models: Vec<PathBuf>,
    candidates: PathBuf,
    out: PathBuf,
    budget: usize,
    strategy: Strategy,
) -> SelectArgs {
    SelectArgs {
        models,
        candidates,
        out,
        budget,
        strategy,
        seed: 3,
        batch_size: 4,
        max_length: 64,
    }
}

fn read(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn selects_the_most_disputed_pairs_first() {
    let tmp = tempfile::tempdir().unwrap();
    let (rm, c) = (two_heads(tmp.path()), candidates(tmp.path()));
    let all = tmp.path().join("all.jsonl");
    assert_eq!(
        run_select(&args(
            vec![rm.clone()],
            c.clone(),
            all.clone(),
            10,
            Strategy::Disagreement
        ))
        .unwrap(),
        6
    );
    let ranked = read(&all);
    let u: Vec<f64> = ranked
        .iter()
        .map(|r| r["uncertainty"].as_f64().unwrap())
        .collect();
    assert!(
        u.windows(2).all(|w| w[0] >= w[1]),
        "most uncertain first: {u:?}"
    );
    assert!(
        u[0] > u[5] && u[5] >= 0.0,
        "two random heads disagree more on some pairs: {u:?}"
    );
    for r in &ranked {
        // Rows are copied through, with the external id the feedback app's import-scores looks up.
        assert_eq!(r["item_id"], r["id"]);
        assert_eq!(r["responses"].as_array().unwrap().len(), 2);
        let p = r["p_first"].as_f64().unwrap();
        assert!((p - 1.0 / (1.0 + (-r["reward_diff"].as_f64().unwrap()).exp())).abs() < 1e-12);
    }
    let top = tmp.path().join("top.jsonl");
    assert_eq!(
        run_select(&args(
            vec![rm.clone()],
            c.clone(),
            top.clone(),
            2,
            Strategy::Disagreement
        ))
        .unwrap(),
        2
    );
    assert_eq!(read(&top), ranked[..2].to_vec());

    // Margin: Bradley–Terry probability nearest ½ first.
    let m = tmp.path().join("margin.jsonl");
    run_select(&args(
        vec![rm.clone()],
        c.clone(),
        m.clone(),
        6,
        Strategy::Margin,
    ))
    .unwrap();
    let gaps: Vec<f64> = read(&m)
        .iter()
        .map(|r| (r["p_first"].as_f64().unwrap() - 0.5).abs())
        .collect();
    assert!(gaps.windows(2).all(|w| w[0] <= w[1]), "{gaps:?}");

    // Random: seeded, no uncertainty column.
    let (r1, r2) = (tmp.path().join("r1.jsonl"), tmp.path().join("r2.jsonl"));
    run_select(&args(
        vec![rm.clone()],
        c.clone(),
        r1.clone(),
        3,
        Strategy::Random,
    ))
    .unwrap();
    run_select(&args(vec![rm], c, r2.clone(), 3, Strategy::Random)).unwrap();
    assert_eq!(read(&r1), read(&r2));
    assert!(read(&r1).iter().all(|r| r.get("uncertainty").is_none()));
}

#[test]
fn bad_input_names_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = two_heads(tmp.path());
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"Q: 1+1=\", \"responses\": [\" 2\", \" 3\"]}\n{\"prompt\": \"Q: 2+2=\", \"responses\": [\" 4\"]}\n").unwrap();
    let out = tmp.path().join("out.jsonl");
    let e = run_select(&args(
        vec![rm.clone()],
        bad.clone(),
        out.clone(),
        1,
        Strategy::Disagreement,
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&format!("{}:2: field \"responses\"", bad.display()))
            && e.contains("two strings"),
        "{e}"
    );
    std::fs::write(&bad, "{\"responses\": [\" 4\", \" 5\"]}\n").unwrap();
    let e = run_select(&args(
        vec![rm],
        bad.clone(),
        out.clone(),
        1,
        Strategy::Disagreement,
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&format!("{}:1: field \"prompt\"", bad.display())),
        "{e}"
    );
    assert!(!out.exists(), "nothing written on bad input");

    // One single-head model has no disagreement to rank by.
    let e = run_select(&args(
        vec![fixture("llama-rm")],
        candidates(tmp.path()),
        out,
        1,
        Strategy::Disagreement,
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("disagreement needs an ensemble"), "{e}");
}
