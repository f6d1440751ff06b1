//! The feedback transforms and active-learning selection through the real binary: critique and
//! demonstration exports become rows that `rlhf rm`, `rlhf dpo` and `rlhf sft` train on unchanged, and
//! `rlhf rm select` ranks candidates with the trained reward model in an ensemble.

mod common;

use common::{fails, llama, ok, root, s, snapshot, write};

const CRITIQUES: &str = r#"{"prompt": "Q: 2+2=", "completion": " 5", "critique": "The reply the number is wrong.", "item_id": 1, "label_ids": [1]}
{"prompt": "Tell me how to steal a car.", "completion": " Sure, it is easy.", "critique": "The reply helps with a harmful request.", "item_id": 2, "label_ids": [2]}
{"prompt": "Q: 3+4=", "completion": " 7", "critique": "Good: nothing to fix.", "item_id": 3, "label_ids": [3]}
"#;

#[test]
fn critiques_and_demonstrations_train_the_existing_trainers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let critiques = write(&d.join("critiques.jsonl"), CRITIQUES);
    let (m, c) = (llama(), s(&critiques).to_string());
    let sample = ["--model", s(&m), "--max-new-tokens", "6", "--seed", "1"];

    let pairs = d.join("revisions.jsonl");
    let line = ok(
        d,
        &[
            &[
                "transform",
                "revise",
                "--critiques",
                &c,
                "--out",
                s(&pairs),
                "--skip-containing",
                "nothing to fix",
            ][..],
            &sample[..],
        ]
        .concat(),
    );
    assert!(line.contains("\"input_rows\":3"), "{line}");
    let rows = std::fs::read_to_string(&pairs).unwrap();
    assert!(
        !rows.contains("nothing to fix") && rows.lines().count() >= 1,
        "{rows}"
    );

    let demos = write(&d.join("demos.jsonl"), "{\"prompt\": \"Q: 2+2=\", \"completion\": \" 4\"}\n{\"prompt\": \"Q: 1+5=\", \"completion\": \" 6\"}\n");
    let demo_pairs = d.join("demo_pairs.jsonl");
    ok(
        d,
        &[
            &[
                "transform",
                "demo-pairs",
                "--demonstrations",
                s(&demos),
                "--out",
                s(&demo_pairs),
            ][..],
            &sample[..],
        ]
        .concat(),
    );

    let critic = d.join("critic.jsonl");
    ok(
        d,
        &[
            "transform",
            "critic-sft",
            "--critiques",
            &c,
            "--out",
            s(&critic),
        ],
    );

    let train = |cmd: &str, data: &std::path::Path, out: &str| {
        ok(
            d,
            &[
                cmd,
                "--model",
                s(&m),
                "--train-file",
                s(data),
                "--output-dir",
                out,
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--max-length",
                "128",
            ],
        );
    };
    train("rm", &pairs, "rm-revisions");
    train("dpo", &demo_pairs, "dpo-demos");
    train("sft", &critic, "critic");
    assert!(
        d.join("rm-revisions/model.safetensors").is_file()
            && d.join("critic/model.safetensors").is_file()
    );

    // The trained reward model and the fixture's form an ensemble that ranks candidate pairs.
    let cands = write(&d.join("cands.jsonl"), "{\"id\": \"a\", \"prompt\": \"Q: 2+2=\", \"responses\": [\" 4\", \" 5\"]}\n{\"id\": \"b\", \"prompt\": \"Q: 1+1=\", \"responses\": [\" 2\", \" I don't know.\"]}\n");
    let picked = d.join("picked.jsonl");
    let rm2 = root().join("fixtures/models/llama-rm");
    ok(
        d,
        &[
            "rm",
            "select",
            "--model",
            "rm-revisions",
            "--model",
            s(&rm2),
            "--candidates",
            s(&cands),
            "--out",
            s(&picked),
            "--budget",
            "1",
        ],
    );
    let text = std::fs::read_to_string(&picked).unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(
        text.contains("\"uncertainty\"") && text.contains("\"item_id\""),
        "{text}"
    );
    // The same file is both a feedback-app import and its uncertainty scores.
    let db = ["--db", "f.sqlite"];
    ok(
        d,
        &[
            &[
                "feedback",
                "create-project",
                "--name",
                "next",
                "--kind",
                "pairwise",
            ][..],
            &db[..],
        ]
        .concat(),
    );
    ok(
        d,
        &[
            &["feedback", "import", "--project", "next", s(&picked)][..],
            &db[..],
        ]
        .concat(),
    );
    let stored = ok(
        d,
        &[
            &["feedback", "import-scores", "--project", "next", s(&picked)][..],
            &db[..],
        ]
        .concat(),
    );
    assert!(
        stored.contains("uncertainty stored for 1 items"),
        "{stored}"
    );
}

#[test]
fn bad_feedback_rows_fail_with_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let bad = write(&d.join("bad.jsonl"), "{\"prompt\": \"a\", \"completion\": \" b\", \"critique\": \"c\"}\n{\"prompt\": \"a\", \"completion\": \" b\"}\n");
    let before = snapshot(d);
    let m = llama();
    fails(
        d,
        &[
            "transform",
            "revise",
            "--model",
            s(&m),
            "--critiques",
            s(&bad),
            "--out",
            "o.jsonl",
        ],
        &["bad.jsonl:2: field \"critique\""],
    );
    fails(
        d,
        &[
            "transform",
            "critic-sft",
            "--critiques",
            "missing.jsonl",
            "--out",
            "o.jsonl",
        ],
        &["missing.jsonl"],
    );
    fails(
        d,
        &[
            "transform",
            "demo-pairs",
            "--model",
            s(&m),
            "--demonstrations",
            s(&bad),
            "--out",
            "o.jsonl",
            "--temperature=-1",
        ],
        &["temperature"],
    );
    let cands = write(
        &d.join("cands.jsonl"),
        "{\"prompt\": \"a\", \"responses\": \" b\"}\n",
    );
    let rm = root().join("fixtures/models/llama-rm");
    fails(
        d,
        &[
            "rm",
            "select",
            "--model",
            s(&rm),
            "--candidates",
            s(&cands),
            "--out",
            "o.jsonl",
            "--budget",
            "1",
            "--strategy",
            "margin",
        ],
        &["cands.jsonl:1: field \"responses\""],
    );
    let mut after = snapshot(d);
    after.remove(&cands);
    assert_eq!(before, after, "a failed command writes nothing");
    // The pipeline's flags do not silently apply to an experiment (a usage error, clap's exit status 2).
    let out = common::rlhf(d, &["sandbox", "--quick", "active-learning"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with '--quick'"));
    assert!(ok(
        d,
        &[
            "sandbox",
            "feedback-kinds",
            "--quick",
            "--seeds",
            "4,5",
            "--print-config"
        ]
    )
    .contains("\"seeds\": [\n    4,\n    5\n  ]"));
}
