//! `rlhf serve`, `rlhf chat` and `rlhf judge` as processes, on the fixture Llama.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use rlhf_data::{Message, Text};
use rlhf_generate::Generator;
use rlhf_model::{GenRequest, Sampling};
use rlhf_serve::Client;
use serde_json::Value;
use tempfile::TempDir;

fn llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models/llama")
        .canonicalize()
        .unwrap()
}

fn rlhf() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.env_remove("RUST_BACKTRACE").env("RUST_LOG", "off");
    c
}

/// A `rlhf serve` process on a free port, killed when dropped.
struct Served {
    child: Child,
    url: String,
    /// Kept open: a closed stderr would make the server's later writes fail.
    _stderr: BufReader<std::process::ChildStderr>,
}

impl Served {
    fn start(extra: &[&str]) -> Self {
        Self::model(&llama(), extra)
    }

    fn model(dir: &Path, extra: &[&str]) -> Self {
        let mut child = rlhf()
            .args(["serve", "--model", dir.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        stderr.read_line(&mut line).unwrap();
        let url = line.trim().rsplit(' ').next().unwrap().to_string();
        assert!(
            line.starts_with("serving ") && line.contains(" on http://127.0.0.1:"),
            "{line}"
        );
        Self {
            child,
            url,
            _stderr: stderr,
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The greedy reply the chat template + batched generation give for `history`.
fn greedy_reply(g: &Generator, history: &[Message], max: usize) -> String {
    let req = GenRequest {
        prompt_ids: g.encode_prompt(&Text::Messages(history.to_vec())).unwrap(),
        max_new_tokens: max,
        sampling: Sampling::greedy(),
        stop_ids: g.model.eos_token_ids(),
        ..Default::default()
    };
    let o = rlhf_model::generate(&g.model, &[req], None)
        .unwrap()
        .remove(0);
    g.tokenizer.decode(&o.tokens, true).unwrap()
}

#[test]
fn serve_answers_an_openai_client_and_refuses_without_the_token() {
    let s = Served::start(&["--api-key", "k1"]);
    let client = Client::new(&s.url, Some("k1".into())).unwrap();
    assert_eq!(client.models().unwrap(), ["llama"]);
    let p = rlhf_serve::client::Params {
        max_tokens: 5,
        temperature: 0.0,
        top_logprobs: 1,
        seed: None,
    };
    let c = client.complete("llama", "Hello", &p).unwrap();
    assert_eq!(
        c.top_logprobs.len() + usize::from(c.finish_reason == "stop"),
        5,
        "{c:?}"
    );
    let err = Client::new(&s.url, None)
        .unwrap()
        .models()
        .unwrap_err()
        .to_string();
    assert!(err.contains("401") && err.contains("bearer token"), "{err}");
}

#[test]
fn serve_fails_cleanly_on_a_missing_model() {
    let tmp = TempDir::new().unwrap();
    let out: Output = rlhf()
        .args([
            "serve",
            "--model",
            tmp.path().join("nope").to_str().unwrap(),
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("nope") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn chat_streams_replies_over_the_template_and_reset_forgets() {
    let mut child = rlhf()
        .args([
            "chat",
            "--model",
            llama().to_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
            "--system",
            "Be kind.",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello\nHow are you?\n/reset\nHello\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let g = Generator::load(&llama()).unwrap();
    let mut history = vec![
        Message::new("system", "Be kind."),
        Message::new("user", "Hello"),
    ];
    let first = greedy_reply(&g, &history, 8);
    history.push(Message::new("assistant", first.clone()));
    history.push(Message::new("user", "How are you?"));
    let second = greedy_reply(&g, &history, 8);
    // After /reset the same first question gets the same first answer.
    assert_eq!(stdout, format!("{first}\n{second}\n{first}\n"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("(conversation reset)"));
}

#[test]
fn judge_labels_pairs_from_a_served_model() {
    let s = Served::start(&[]);
    let tmp = TempDir::new().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &pairs,
        concat!(
            r#"{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "id": 1}"#, "\n",
            r#"{"prompt": [{"role": "user", "content": "Say hi"}], "response_a": "Hi!", "response_b": "No."}"#, "\n",
        ),
    )
    .unwrap();
    let out_file = tmp.path().join("prefs.jsonl");
    // The fixture's context is 128 tokens: a short rubric and template.
    let rubric = tmp.path().join("rubric.txt");
    std::fs::write(&rubric, "Be right.").unwrap();
    let template = tmp.path().join("template.txt");
    std::fs::write(
        &template,
        "{rubric} Q: {prompt} A: {response_a} B: {response_b} Better:",
    )
    .unwrap();
    let (pairs_s, out_s) = (pairs.to_str().unwrap(), out_file.to_str().unwrap());
    let (rubric_s, template_s) = (rubric.to_str().unwrap(), template.to_str().unwrap());
    let args = [
        "judge",
        "--endpoint",
        &s.url,
        "--pairs",
        pairs_s,
        "--out",
        out_s,
        "--rubric",
        rubric_s,
        "--template",
        template_s,
    ];
    let out = rlhf().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["pairs"], 2);
    let rows: Vec<Value> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    let agree = summary["agreement_with_input_labels"].as_f64().unwrap();
    let right = rows[0]["chosen"] == "4" && rows[0]["probability"].as_f64().unwrap() > 0.5;
    assert_eq!(agree, if right { 1.0 } else { 0.0 });
    assert_eq!(rows[0]["id"], 1, "input columns are kept");
    for (row, pair) in rows.iter().zip([["4", "5"], ["Hi!", "No."]]) {
        let p = row["probability"].as_f64().unwrap();
        assert!((0.5..=1.0).contains(&p), "{row}");
        let q = p.clamp(1e-3, 1.0 - 1e-3);
        assert!((row["margin"].as_f64().unwrap() - (q / (1.0 - q)).ln()).abs() < 1e-9);
        let mut got = [
            row["chosen"].as_str().unwrap(),
            row["rejected"].as_str().unwrap(),
        ];
        got.sort();
        let mut want = pair;
        want.sort();
        assert_eq!(got, want);
        assert!(row.get("response_a").is_none());
    }
    // Bad input names the file and line, and nothing is written.
    std::fs::write(&pairs, "{\"prompt\": \"x\", \"chosen\": \"a\"}\n").unwrap();
    let bad_out = tmp.path().join("bad.jsonl");
    let out = rlhf()
        .args([
            "judge",
            "--endpoint",
            &s.url,
            "--pairs",
            pairs.to_str().unwrap(),
            "--out",
            bad_out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pairs.jsonl:1") && stderr.contains("rejected"),
        "{stderr}"
    );
    assert!(!bad_out.exists());
}

#[test]
fn grpo_takes_its_reward_from_a_served_judge_and_stops_clearly_when_it_is_unreachable() {
    let s = Served::start(&[]);
    let tmp = TempDir::new().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = tmp.path().join("grpo");
    // The fixture has 128 positions: a one-line rubric and rating prompt.
    let (rubric, template) = (tmp.path().join("rubric.txt"), tmp.path().join("rate.txt"));
    std::fs::write(&rubric, "Correct sums are best.").unwrap();
    std::fs::write(&template, "{rubric}\n{prompt}{response}\nScore 1-9:").unwrap();
    let spec = format!(
        "judge:{},model=llama,rubric={},template={}",
        s.url,
        rubric.display(),
        template.display()
    );
    let grpo = |reward: &str, out: &Path| {
        rlhf()
            .current_dir(&root)
            .args([
                "grpo",
                "--model",
                "fixtures/models/llama",
                "--prompts",
                "data/prompts.jsonl",
                "--reward",
                reward,
            ])
            .args([
                "--output-dir",
                out.to_str().unwrap(),
                "--max-steps",
                "2",
                "--prompts-per-step",
                "2",
                "--num-generations",
                "2",
            ])
            .args(["--max-new-tokens", "4", "--learning-rate", "1e-4"])
            .output()
            .unwrap()
    };
    let o = grpo(&spec, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["steps"], 2);
    // The judge's expected rating on the 1–9 scale, for every step's rollouts.
    let r = summary["final_metrics"][format!("rewards/{spec}/mean")]
        .as_f64()
        .unwrap_or_else(|| panic!("{summary}"));
    assert!((1.0..=9.0).contains(&r), "{r}");
    assert!(out.join("model.safetensors").is_file());

    // A port nothing listens on: retried, then a non-zero exit naming the source and the attempts.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let o = grpo(&format!("judge:{url}"), &tmp.path().join("dead"));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("reward source `judge:{url}`"))
            && err.contains("3 attempts")
            && err.contains("request failed"),
        "{err}"
    );
    assert!(!tmp.path().join("dead/model.safetensors").exists());
}

/// A critic trained (tiny, overfitted) on critic-sft rows that end in a verdict line judges pairs from its model
/// directory and through `rlhf serve`, labels an `rlhf iterate` round and scores as a reward source; a model that
/// writes no verdict is an error naming the pair, not a silent score.
#[test]
fn a_trained_critic_is_a_judge_locally_served_and_in_iterate() {
    let tmp = TempDir::new().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    std::fs::write(
        p("critiques.jsonl"),
        concat!(
            r#"{"prompt": "2+2=", "completion": " 4", "critique": "Right.", "verdict": 9, "label_ids": [1]}"#, "\n",
            r#"{"prompt": "2+2=", "completion": " 5", "critique": "Wrong sum.", "verdict": 1, "label_ids": [2]}"#, "\n",
        ),
    )
    .unwrap();
    let ok = |out: Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    ok(rlhf()
        .args([
            "transform",
            "critic-sft",
            "--critiques",
            &p("critiques.jsonl"),
            "--out",
            &p("critic.jsonl"),
            "--score-column",
            "verdict",
        ])
        .output()
        .unwrap());
    let rows: Vec<Value> = std::fs::read_to_string(p("critic.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[0]["prompt"], "2+2=\nResponse: 4\nCritique:");
    assert_eq!(
        (
            rows[0]["completion"].as_str(),
            rows[1]["completion"].as_str()
        ),
        (Some(" Right.\nScore: 9"), Some(" Wrong sum.\nScore: 1"))
    );
    // A score off the scale names the file, line and column.
    std::fs::write(
        p("bad.jsonl"),
        r#"{"prompt": "x", "completion": "y", "critique": "z", "verdict": 12}"#,
    )
    .unwrap();
    let out = rlhf()
        .args([
            "transform",
            "critic-sft",
            "--critiques",
            &p("bad.jsonl"),
            "--out",
            &p("bad_out.jsonl"),
            "--score-column",
            "verdict",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("bad.jsonl:1")
            && stderr.contains("verdict")
            && stderr.contains("1..=9"),
        "{stderr}"
    );

    ok(rlhf()
        .args([
            "sft",
            "--model",
            llama().to_str().unwrap(),
            "--train-file",
            &p("critic.jsonl"),
            "--output-dir",
            &p("critic"),
            "--max-steps",
            "60",
        ])
        .args([
            "--learning-rate",
            "3e-3",
            "--batch-size",
            "2",
            "--lr-scheduler-type",
            "constant",
            "--save-steps",
            "0",
        ])
        .output()
        .unwrap());
    std::fs::write(
        p("pairs.jsonl"),
        concat!(
            r#"{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}"#,
            "\n",
            r#"{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}"#,
            "\n"
        ),
    )
    .unwrap();
    let judge = |endpoint: &str, out: &str| {
        rlhf()
            .args([
                "judge",
                "--endpoint",
                endpoint,
                "--mode",
                "critic",
                "--pairs",
                &p("pairs.jsonl"),
                "--out",
                &p(out),
            ])
            .output()
            .unwrap()
    };
    let local: Value =
        serde_json::from_slice(&ok(judge(&p("critic"), "local.jsonl")).stdout).unwrap();
    assert_eq!(local["agreement_with_input_labels"], 1.0, "{local}");
    let judged: Vec<Value> = std::fs::read_to_string(p("local.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        (
            judged[0]["chosen"].as_str(),
            judged[0]["probability"].as_f64()
        ),
        (Some(" 4"), Some(1.0)),
        "score 9 beats score 1"
    );
    let served = Served::model(Path::new(&p("critic")), &[]);
    let remote: Value =
        serde_json::from_slice(&ok(judge(&served.url, "served.jsonl")).stdout).unwrap();
    assert_eq!(remote["agreement_with_input_labels"], 1.0, "{remote}");
    assert_eq!(
        std::fs::read_to_string(p("served.jsonl")).unwrap(),
        std::fs::read_to_string(p("local.jsonl")).unwrap(),
        "the same greedy critiques"
    );

    // The untrained fixture writes no verdict line: an error naming the pair and the missing line.
    let out = judge(llama().to_str().unwrap(), "none.jsonl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pairs.jsonl:1") && stderr.contains("no verdict line `Score: N`"),
        "{stderr}"
    );
    assert!(!tmp.path().join("none.jsonl").exists());

    // The served critic labels an iterate round, and the local one is its evaluation reward.
    std::fs::write(
        p("prompts.jsonl"),
        "{\"prompt\": \"2+2=\"}\n{\"prompt\": \"2+2=\"}\n",
    )
    .unwrap();
    let critic_spec = |target: &str| format!("judge:{target},mode=critic,max_tokens=12");
    let out = ok(rlhf()
        .args([
            "iterate",
            "--model",
            llama().to_str().unwrap(),
            "--prompts",
            &p("prompts.jsonl"),
            "--eval-prompts",
            &p("prompts.jsonl"),
        ])
        .args([
            "--labels",
            &critic_spec(&served.url),
            "--eval-reward",
            &critic_spec(&p("critic")),
            "--runs-dir",
            &p("runs"),
            "--name",
            "c",
        ])
        .args([
            "--rounds",
            "1",
            "--prompts-per-round",
            "2",
            "--candidates",
            "2",
            "--max-new-tokens",
            "4",
            "--dpo-steps",
            "1",
            "--batch-size",
            "2",
        ])
        .output()
        .unwrap());
    let summary: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let eval = &summary["rounds"][0]["eval"]["trained"]["rewards"];
    let score = eval.as_object().unwrap().values().next().unwrap()["mean"]
        .as_f64()
        .unwrap();
    assert!(
        (1.0..=9.0).contains(&score),
        "the critic's verdicts are the reward: {eval}"
    );
    let rd = tmp.path().join("runs/c/round-1");
    let labels: Vec<Value> = std::fs::read_to_string(rd.join("labels.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(labels.len(), 2);
    assert!(
        labels.iter().all(|l| l["detail"]["critic"] == true
            && [0.0, 0.5, 1.0].contains(&l["p_a"].as_f64().unwrap())),
        "{labels:?}"
    );
    let card = std::fs::read_to_string(rd.join("MODEL_CARD.md")).unwrap();
    assert!(
        card.contains("A trained critic") && card.contains("Critique:"),
        "{card}"
    );
}
