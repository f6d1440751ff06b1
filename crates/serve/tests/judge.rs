//! The AI-feedback judge against scripted OpenAI-compatible endpoints (exact verdict arithmetic) and
//! against a real `rlhf serve` over the fixture Llama.

mod common;

use axum::routing::{get, post};
use axum::{Json, Router};
use common::*;
use rlhf_serve::judge::{Api, Judge, JudgeConfig};
use rlhf_serve::Client;
use serde_json::{json, Value};

/// The first token's alternatives (token, probability) and the answer text.
type Answer = (Vec<(&'static str, f64)>, &'static str);

/// A scripted endpoint: `answer(prompt)` gives the first token's alternatives (token, probability)
/// and the answer text; both endpoints return them in their own logprobs format.
fn scripted(answer: fn(&str) -> Answer) -> Server {
    let app = Router::new()
        .route("/v1/models", get(|| async { Json(json!({"data": [{"id": "judge"}]})) }))
        .route(
            "/v1/completions",
            post(move |Json(b): Json<Value>| async move {
                assert_eq!(b["model"], "judge");
                assert_eq!(b["temperature"], 0.0);
                let (top, text) = answer(b["prompt"].as_str().unwrap());
                let top: serde_json::Map<String, Value> = top.iter().map(|(t, p)| (t.to_string(), json!(p.ln()))).collect();
                let logprobs = if top.is_empty() { Value::Null } else { json!({"top_logprobs": [top]}) };
                Json(json!({"choices": [{"text": text, "logprobs": logprobs, "finish_reason": "length"}]}))
            }),
        )
        .route(
            "/v1/chat/completions",
            post(move |Json(b): Json<Value>| async move {
                let (top, text) = answer(b["messages"][0]["content"].as_str().unwrap());
                let top: Vec<Value> = top.iter().map(|(t, p)| json!({"token": t, "logprob": p.ln()})).collect();
                Json(json!({"choices": [{"message": {"role": "assistant", "content": text},
                    "logprobs": {"content": [{"token": "x", "logprob": 0.0, "top_logprobs": top}]}, "finish_reason": "stop"}]}))
            }),
        );
    Server::with_router(app)
}

fn judge(s: &Server, api: Api) -> Judge {
    Judge::new(
        Client::new(&s.url, None).unwrap(),
        JudgeConfig {
            api,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The text shown as response A in a pairwise prompt.
fn response_a(prompt: &str) -> &str {
    prompt
        .split("Response A:\n")
        .nth(1)
        .unwrap()
        .split("\n\nResponse B:")
        .next()
        .unwrap()
}

#[test]
fn both_orders_cancel_position_bias() {
    // Always 80% for whatever is shown first: no information, so exactly 0.5 either way round.
    let s = scripted(|_| (vec![(" A", 0.8), (" B", 0.2)], " A"));
    for api in [Api::Completions, Api::Chat] {
        let j = judge(&s, api);
        assert!((j.compare("q", "x", "y").unwrap() - 0.5).abs() < 1e-12);
    }
    // Likes "good" but is biased to position A: P(A) = 0.9 when A is good, 0.3 when B is.
    let s = scripted(|p| {
        if response_a(p).contains("good") {
            (vec![("A", 0.9), ("B", 0.1)], "A")
        } else {
            (vec![("A", 0.3), ("B", 0.7)], "A")
        }
    });
    for api in [Api::Completions, Api::Chat] {
        let j = judge(&s, api);
        assert!((j.compare("q", "good answer", "bad answer").unwrap() - 0.8).abs() < 1e-12);
        assert!((j.compare("q", "bad answer", "good answer").unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(j.undecided(), 0);
    }
}

#[test]
fn verdicts_fall_back_to_the_answer_text() {
    // No logprobs: the letter in the text decides each order.
    let s = scripted(|p| {
        (
            vec![],
            if response_a(p).contains("good") {
                " A."
            } else {
                " B"
            },
        )
    });
    let j = judge(&s, Api::Completions);
    assert_eq!(j.compare("q", "good", "bad").unwrap(), 1.0);
    assert_eq!(j.compare("q", "bad", "good").unwrap(), 0.0);
    let s = scripted(|_| (vec![], "no idea"));
    let j = judge(&s, Api::Completions);
    assert_eq!(j.compare("q", "a", "b").unwrap(), 0.5);
    assert_eq!(j.rate(&[("q".into(), "a".into())]).unwrap(), [5.0]);
    assert_eq!(j.undecided(), 3);
}

#[test]
fn ratings_are_the_expected_digit() {
    // Mass on 7 (0.5) and 9 (0.25); the rest on a non-digit is ignored: (3.5 + 2.25) / 0.75.
    let s = scripted(|p| {
        assert!(
            p.contains("Response:\nmy answer") && p.contains("Harmless"),
            "{p}"
        );
        (vec![(" 7", 0.5), ("9", 0.25), (" x", 0.25)], "7")
    });
    let j = judge(&s, Api::Completions);
    let r = j
        .rate(&[
            ("q".into(), "my answer".into()),
            ("q2".into(), "my answer".into()),
        ])
        .unwrap();
    assert_eq!(r.len(), 2);
    assert!((r[0] - 23.0 / 3.0).abs() < 1e-9, "{r:?}");
    let s = scripted(|_| (vec![], "Rating: 4 out of 9"));
    assert_eq!(
        judge(&s, Api::Chat)
            .rate(&[("q".into(), "a".into())])
            .unwrap(),
        [4.0]
    );
}

#[test]
fn templates_must_have_their_placeholders() {
    let s = scripted(|_| (vec![], "A"));
    let cfg = JudgeConfig {
        pairwise_template: "Which is better, {response_a} or this?".into(),
        ..Default::default()
    };
    let err = Judge::new(Client::new(&s.url, None).unwrap(), cfg)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("pairwise") && err.contains("{prompt}"),
        "{err}"
    );
    let err = Client::new("https://api.example.com", None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("http://"), "{err}");
    let err = Judge::new(
        Client::new("http://127.0.0.1:9", None).unwrap(),
        JudgeConfig::default(),
    )
    .err()
    .unwrap();
    assert!(format!("{err:#}").contains("127.0.0.1:9"), "{err:#}");
}

#[test]
fn judging_with_rlhf_serve_as_the_endpoint() {
    let s = Server::start(generator(), Some("k"));
    let client = Client::new(&format!("{}/v1", s.url), Some("k".into())).unwrap();
    assert_eq!(client.models().unwrap(), ["tiny"]);
    // The fixture's context is 128 tokens: short templates (the default rubric alone is longer).
    let cfg = JudgeConfig {
        rubric: "Be right.".into(),
        pairwise_template: "{rubric} Q: {prompt} A: {response_a} B: {response_b} Better:".into(),
        rating_template: "{rubric} Q: {prompt} R: {response} Score:".into(),
        ..Default::default()
    };
    let j = Judge::new(client, cfg).unwrap();
    let ab = j.compare("What is 2 + 2?", "4", "5").unwrap();
    let ba = j.compare("What is 2 + 2?", "5", "4").unwrap();
    assert!((0.0..=1.0).contains(&ab), "{ab}");
    assert!((ab + ba - 1.0).abs() < 1e-9, "{ab} + {ba}");
    assert_eq!(
        j.compare("What is 2 + 2?", "4", "5").unwrap(),
        ab,
        "greedy judging is deterministic"
    );
    let r = j.rate(&[("What is 2 + 2?".into(), "4".into())]).unwrap();
    assert!((1.0..=9.0).contains(&r[0]), "{r:?}");
}
