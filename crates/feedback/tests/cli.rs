//! The `rlhf-feedback` command line on bad databases and bad import files, through the
//! real binary: clear errors naming the file (and line), non-zero exit, nothing created
//! or half-imported.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf-feedback"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run rlhf-feedback");
    (out, t.elapsed())
}

fn fails_with(args: &[&str], needles: &[&str]) -> Duration {
    let (out, took) = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks {n:?}:\n{err}");
    }
    took
}

fn ok(args: &[&str]) -> String {
    let (out, _) = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn corrupt_database_fails_fast_naming_file_and_cause() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("corrupt.sqlite");
    std::fs::write(&db, "this is not a database, just text\n".repeat(200)).unwrap();
    let items = dir.path().join("items.jsonl");
    std::fs::write(
        &items,
        "{\"prompt\": \"p\", \"responses\": [\"a\", \"b\"]}\n",
    )
    .unwrap();
    let db_s = db.to_str().unwrap();
    for args in [
        vec!["export", "--db", db_s, "--project", "p"],
        vec![
            "import",
            "--db",
            db_s,
            "--project",
            "p",
            items.to_str().unwrap(),
        ],
    ] {
        let took = fails_with(
            &args,
            &[
                db_s,
                "not a readable SQLite database",
                "file is not a database",
            ],
        );
        assert!(
            took < Duration::from_secs(10),
            "{args:?} took {took:?} (used to hang 30 s on the pool)"
        );
    }
}

#[test]
fn reading_commands_do_not_create_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.sqlite");
    let t = typo.to_str().unwrap();
    fails_with(
        &["export", "--db", t, "--project", "p"],
        &["no database at", t, "does not create one"],
    );
    fails_with(
        &["assign", "--db", t, "--project", "p", "bob"],
        &["no database at"],
    );
    assert!(!Path::new(t).exists(), "export created {t}");
    // A command that sets one up still creates it.
    ok(&[
        "create-project",
        "--db",
        t,
        "--name",
        "p",
        "--kind",
        "pairwise",
    ]);
    assert!(Path::new(t).exists());
    assert_eq!(ok(&["export", "--db", t, "--project", "p"]), "");
    assert_eq!(
        ok(&[
            "export",
            "--db",
            t,
            "--project",
            "p",
            "--by-reliability",
            "--min-confidence",
            "0.9"
        ]),
        ""
    );
    fails_with(
        &[
            "export",
            "--db",
            t,
            "--project",
            "p",
            "--min-confidence",
            "1.5",
        ],
        &["minimum confidence must be between 0 and 1, got 1.5"],
    );
}

#[test]
fn bad_import_files_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fb.sqlite");
    let db_s = db.to_str().unwrap();
    ok(&[
        "create-project",
        "--db",
        db_s,
        "--name",
        "p",
        "--kind",
        "pairwise",
    ]);
    let bad = dir.path().join("latin1.jsonl");
    std::fs::write(&bad, b"{\"prompt\": \"a\", \"responses\": [\"x\", \"y\"]}\n{\"prompt\": \"caf\xe9\", \"responses\": [\"x\", \"y\"]}\n").unwrap();
    let bad_s = bad.to_str().unwrap();
    fails_with(
        &["import", "--db", db_s, "--project", "p", bad_s],
        &[&format!("{bad_s}:2: invalid UTF-8")],
    );
    let dup = dir.path().join("dup.jsonl");
    std::fs::write(
        &dup,
        "{\"id\": 1, \"prompt\": \"a\", \"responses\": [\"x\", \"y\"]}\n{\"id\": 2, \"prompt\": \"b\", \"responses\": [\"x\", \"y\"]}\n{\"id\": 1, \"prompt\": \"a changed\", \"responses\": [\"x\", \"y\"]}\n",
    )
    .unwrap();
    let dup_s = dup.to_str().unwrap();
    fails_with(
        &["import", "--db", db_s, "--project", "p", dup_s],
        &[&format!(
            "{dup_s}:3: field \"id\": \"1\" is already used on line 1"
        )],
    );
    // Nothing was imported by either failed command.
    let good = dir.path().join("good.jsonl");
    std::fs::write(
        &good,
        "{\"id\": 1, \"prompt\": \"a\", \"responses\": [\"x\", \"y\"]}\n",
    )
    .unwrap();
    assert!(ok(&[
        "import",
        "--db",
        db_s,
        "--project",
        "p",
        good.to_str().unwrap()
    ])
    .contains("1 items added, 0 already present"));
}
