//! GRPO with the exact-answer verifier repairs what flawed demonstrations taught, through the real binary:
//! a tiny Llama with a digit-splitting tokenizer is SFT'd on the bundled addition problems whose demonstrations
//! drop the units carry on 60 % of the carry problems (a systematic human error), so its greedy answer to many
//! carry problems is the carry-less sum while its samples still hold the correct one. GRPO on the same prompts,
//! rewarded only by `exact:answer`, moves that probability mass: held-out greedy exact match must rise beyond
//! the SFT model's 95 % interval. Deterministic (fixed seeds); about two minutes in a release build.

mod common;

use std::path::Path;

use common::{ok as rlhf, root};
use serde_json::Value;

/// The bundled demonstrations with the carry dropped (answer − 10) on 6 of every 10 carry problems.
fn flawed_demonstrations(path: &Path) -> usize {
    let text = std::fs::read_to_string(root().join("data/sft_train.jsonl")).unwrap();
    let mut rows = String::new();
    let (mut carries, mut flawed) = (0, 0);
    for line in text.lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        let prompt = row["prompt"].as_str().unwrap();
        let (a, b) = prompt
            .trim_start_matches("Q: ")
            .trim_end_matches('=')
            .split_once('+')
            .unwrap();
        let (a, b): (i64, i64) = (a.parse().unwrap(), b.parse().unwrap());
        let mut answer = a + b;
        if a % 10 + b % 10 >= 10 {
            carries += 1;
            if carries % 10 < 6 {
                answer -= 10;
                flawed += 1;
            }
        }
        rows.push_str(
            &serde_json::json!({"prompt": prompt, "completion": format!(" {answer}")}).to_string(),
        );
        rows.push('\n');
    }
    std::fs::write(path, rows).unwrap();
    flawed
}

/// Held-out greedy exact match (mean, ci_low, ci_high) of each model, from one `rlhf eval` run.
fn greedy_exact(dir: &Path, models: &[&str]) -> Vec<(f64, f64, f64)> {
    let eval = root().join("data/sft_eval.jsonl");
    let mut args = vec![
        "eval",
        "--prompts",
        eval.to_str().unwrap(),
        "--reward",
        "exact:completion",
        "--temperature",
        "0",
    ];
    args.extend(["--max-new-tokens", "6", "--out", "eval.json"]);
    for m in models {
        args.extend(["--model", m]);
    }
    rlhf(dir, &args);
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    summary["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let r = &m["rewards"][0]["reward"];
            (
                r["mean"].as_f64().unwrap(),
                r["ci_low"].as_f64().unwrap(),
                r["ci_high"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn grpo_with_the_exact_answer_verifier_raises_held_out_greedy_exact_match_above_sft() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let flawed = flawed_demonstrations(&t.join("demos.jsonl"));
    assert!(flawed > 400, "{flawed} flawed demonstrations");
    rlhf(
        t,
        &[
            "init",
            "--out",
            "base",
            "--preset",
            "tiny-llama",
            "--corpus",
            "demos.jsonl",
            "--split-digits",
            "--vocab-size",
            "300",
        ],
    );
    rlhf(
        t,
        &[
            "sft",
            "--model",
            "base",
            "--train-file",
            "demos.jsonl",
            "--output-dir",
            "sft",
            "--max-length",
            "64",
            "--batch-size",
            "32",
            // SFT's loss plateaus at ≈ 0.65 until the model learns to add digit by digit, then drops to ≈ 0.1.
            // At peak lr 1e-3 that drop came late and at a seed- and float-order-dependent step (800 on the
            // candle graph for seed 42; on the engine still under way at step 1,500: SFT exact 0.12), as at
            // 1e-3 the loss only falls once the cosine schedule has brought the rate down (constant 1e-3: no
            // drop in 1,500 steps). At 4e-4 it starts by step 400–600 for every seed measured, and the 2,000
            // steps leave the model converged (loss ≈ 0.06), which GRPO's repair needs: GRPO also pushes the carry
            // onto no-carry problems whose units sum is near 10, the more so the less sharply SFT learnt where a
            // carry starts (with 1,500 steps at 3e-4, 4e-4 or 5e-4, one seed in three had GRPO's interval
            // overlap SFT's). Held-out greedy exact on the engine, SFT [high] → GRPO [low] after 300 GRPO steps,
            // seeds 42 / 1 / 2 / 3 / 7 (init 0 / 1 / 2 / 3 / 7): 0.680 [0.745] → 0.880 [0.835]; 0.710 [0.770] →
            // 0.865 [0.815]; 0.675 [0.740] → 0.830 [0.775]; 0.685 [0.750] → 0.895 [0.850]; 0.680 [0.745] →
            // 0.885 [0.840]. `--backend candle` for both runs, seed 42: 0.675 [0.735] → 0.875 [0.825].
            "--learning-rate",
            "4e-4",
            "--lr-scheduler-type",
            "cosine",
            "--warmup-steps",
            "20",
            "--max-steps",
            "2000",
            "--save-steps",
            "0",
            "--logging-steps",
            "100",
        ],
    );
    let prompts = root().join("data/prompts.jsonl");
    rlhf(
        t,
        &[
            "grpo",
            "--model",
            "sft",
            "--prompts",
            prompts.to_str().unwrap(),
            "--output-dir",
            "grpo",
            "--reward",
            "exact:answer",
            "--num-generations",
            "8",
            "--prompts-per-step",
            "8",
            "--max-new-tokens",
            "6",
            "--temperature",
            "1.0",
            "--learning-rate",
            "3e-5",
            "--lr-scheduler-type",
            "constant",
            // 300 steps, not 200: after 200 the same five seeds' margins (GRPO low − SFT high) were
            // +0.100 / +0.035 / +0.080 / +0.010 / +0.125, after 300 +0.090 / +0.045 / +0.035 / +0.100 / +0.095.
            "--max-steps",
            "300",
            "--loss-type",
            "dapo",
            "--beta",
            "0",
            "--save-steps",
            "0",
        ],
    );
    let scores = greedy_exact(t, &["sft", "grpo"]);
    let ((sft, _, sft_high), (grpo, grpo_low, _)) = (scores[0], scores[1]);
    eprintln!(
        "held-out greedy exact: SFT {:?}, GRPO {:?}",
        scores[0], scores[1]
    );
    // The flaw must be visible in the SFT model, or the test would measure nothing.
    assert!(
        (0.3..0.85).contains(&sft),
        "SFT greedy exact {sft}: the flawed-demonstration setup no longer bites"
    );
    assert!(
        grpo > sft + 0.1 && grpo_low > sft_high,
        "GRPO {grpo} (low {grpo_low}) vs SFT {sft} (high {sft_high})"
    );
}
