//! Helpers of the CLI test suites: run the real `rlhf` binary as a user would and check the failure contract
//! (exit status 1, ONE line `error: …`, no panic), plus fixtures and directory snapshots.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn llama() -> PathBuf {
    root().join("fixtures/models/llama")
}

pub fn sft_train() -> PathBuf {
    root().join("data/sft_train.jsonl")
}

/// Runs `rlhf ARGS` in `cwd` as a user would: no backtraces requested, logging off so stderr is only what
/// the command itself prints.
pub fn rlhf(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env("RUST_LOG", "off")
        .output()
        .expect("cannot run the rlhf binary")
}

/// Asserts success; returns stdout.
pub fn ok(cwd: &Path, args: &[&str]) -> String {
    let out = rlhf(cwd, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rlhf {args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts the failure contract and that the error line contains every `needles`; returns the line.
pub fn fails(cwd: &Path, args: &[&str], needles: &[&str]) -> String {
    let out = rlhf(cwd, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "rlhf {args:?}: expected exit 1, stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "rlhf {args:?} panicked: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "rlhf {args:?}: expected a one-line error, got: {stderr}"
    );
    let line = lines[0];
    assert!(line.starts_with("error: "), "rlhf {args:?}: {line}");
    for n in needles {
        assert!(
            line.contains(n),
            "rlhf {args:?}: error should mention {n:?}: {line}"
        );
    }
    line.to_string()
}

pub fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `dir` with its bytes, to prove a failing command changed nothing.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(snapshot(&p));
        } else {
            files.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    files
}

pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
}

pub fn read_jsonl(path: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match serde_json::from_str(l).unwrap() {
            Value::Object(m) => m,
            other => panic!("{}: not an object: {other}", path.display()),
        })
        .collect()
}

/// A copy of the fixture llama whose config.json has `"key": old` replaced by `"key": new`; returns the dir
/// and the 1-based line of the edit.
pub fn llama_with(tmp: &Path, name: &str, key: &str, new: &str) -> (PathBuf, usize) {
    let dir = tmp.join(name);
    copy_dir(&llama(), &dir);
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let prefix = format!("\"{key}\": ");
    let line = text
        .lines()
        .position(|l| l.trim_start().starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {key}"));
    let edited: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i != line {
                return l.to_string();
            }
            let comma = if l.trim_end().ends_with(',') { "," } else { "" };
            format!(" {prefix}{new}{comma}")
        })
        .collect();
    std::fs::write(dir.join("config.json"), edited.join("\n")).unwrap();
    (dir, line + 1)
}

/// Three prompts of the addition task with extra columns that generate must keep.
pub fn prompts(tmp: &Path) -> PathBuf {
    write(
        &tmp.join("prompts.jsonl"),
        "{\"prompt\": \"Q: 60+62=\", \"answer\": 122, \"id\": \"a\"}\n\
         {\"prompt\": \"Q: 39+97=\", \"answer\": 136, \"id\": \"b\"}\n\
         {\"prompt\": \"Q: 7+5=\", \"answer\": 12, \"id\": \"c\"}\n",
    )
}

pub fn generate(cwd: &Path, model: &Path, prompts: &Path, out: &Path, extra: &[&str]) -> Vec<u8> {
    let mut args = vec![
        "generate",
        "--model",
        s(model),
        "--prompts",
        s(prompts),
        "--out",
        s(out),
        "--max-new-tokens",
        "12",
    ];
    args.extend_from_slice(extra);
    ok(cwd, &args);
    std::fs::read(out).unwrap()
}
