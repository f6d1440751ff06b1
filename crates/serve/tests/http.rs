//! `rlhf serve` over real HTTP on 127.0.0.1 with the fixture Llama (vocab 512, context 128).

mod common;

use common::*;
use rlhf_data::{Message, Text};
use rlhf_generate::Generator;
use rlhf_model::{generate, GenOutput, GenRequest, Sampling};
use serde_json::{json, Value};

/// What the server must answer for `prompt`: the same request through batched generation.
fn expected(
    g: &Generator,
    prompt: &Text,
    max: usize,
    sampling: Sampling,
    seed: u64,
    stop: &[&str],
) -> (String, GenOutput) {
    let req = GenRequest {
        prompt_ids: g.encode_prompt(prompt).unwrap(),
        max_new_tokens: max,
        sampling,
        seed,
        stop_ids: g.model.eos_token_ids(),
        stop_strings: stop.iter().map(|s| s.to_string()).collect(),
        top_logprobs: 0,
    };
    let decode = |ids: &[u32]| g.tokenizer.decode(ids, true).unwrap();
    let o = generate(&g.model, &[req], Some(&decode)).unwrap().remove(0);
    let mut text = decode(&o.tokens);
    if let Some(cut) = stop.iter().filter_map(|s| text.find(s)).min() {
        text.truncate(cut);
    }
    (text, o)
}

fn sampling(t: f32, top_p: f32) -> Sampling {
    Sampling {
        temperature: t,
        top_k: 0,
        top_p,
    }
}

#[test]
fn completions_equal_batched_generation_with_logprobs_usage_and_n() {
    let g = generator();
    let s = Server::start(g.clone(), None);
    let body = json!({
        "model": "tiny", "prompt": ["Hello there", "The cat sat"], "max_tokens": 12, "temperature": 0.8,
        "top_p": 0.9, "n": 2, "seed": 5, "logprobs": 3,
    });
    let v = s.post("/v1/completions", &body);
    assert_eq!(v["object"], "text_completion");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    let mut completion_tokens = 0;
    for (c, choice) in choices.iter().enumerate() {
        let prompt = ["Hello there", "The cat sat"][c / 2];
        // Choice c samples with seed + c, as `rlhf generate --seed 5` would for row c.
        let (text, o) = expected(
            &g,
            &Text::Plain(prompt.into()),
            12,
            sampling(0.8, 0.9),
            5 + c as u64,
            &[],
        );
        assert_eq!(choice["index"], c);
        assert_eq!(choice["text"], text.as_str(), "choice {c}");
        let lps = choice["logprobs"]["token_logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), o.tokens.len());
        for (a, b) in lps.iter().zip(&o.logprobs) {
            assert!((a.as_f64().unwrap() - *b as f64).abs() < 1e-5, "{a} vs {b}");
        }
        for (top, lp) in choice["logprobs"]["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(lps)
        {
            let top = top.as_object().unwrap();
            assert!(!top.is_empty() && top.len() <= 3);
            // The best alternative is at least as likely as the sampled token.
            let best = top
                .values()
                .map(|x| x.as_f64().unwrap())
                .fold(f64::MIN, f64::max);
            assert!(best >= lp.as_f64().unwrap() - 1e-6);
        }
        let reason = if o.tokens.len() == 12 {
            "length"
        } else {
            "stop"
        };
        assert_eq!(choice["finish_reason"], reason);
        completion_tokens += o.tokens.len();
    }
    let prompt_tokens: usize = ["Hello there", "The cat sat"]
        .iter()
        .map(|p| g.encode_prompt(&Text::Plain(p.to_string())).unwrap().len())
        .sum();
    assert_eq!(v["usage"]["completion_tokens"], completion_tokens);
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(
        v["usage"]["total_tokens"],
        completion_tokens + prompt_tokens
    );
    // A request's choices join the batch at one decode step, whenever the engine thread wakes.
    let (_, health) = s.get("/health", None);
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["stats"]["peak_batch"], 4, "{health}");
    // Choices of one request differ (different seeds) and the same request reproduces bit for bit.
    assert_ne!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(s.post("/v1/completions", &body)["choices"], v["choices"]);
}

#[test]
fn chat_completions_apply_the_chat_template() {
    let g = generator();
    let s = Server::start(g.clone(), None);
    let messages = vec![
        Message::new("system", "Be brief."),
        Message::new("user", "Hi, who are you?"),
    ];
    let body = json!({
        "model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi, who"}, {"type": "text", "text": " are you?"}]}],
        "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 2,
    });
    let v = s.post("/v1/chat/completions", &body);
    let (text, o) = expected(
        &g,
        &Text::Messages(messages),
        10,
        Sampling::greedy(),
        0,
        &[],
    );
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"],
        json!({"role": "assistant", "content": text})
    );
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), o.tokens.len());
    for (e, lp) in content.iter().zip(&o.logprobs) {
        assert!((e["logprob"].as_f64().unwrap() - *lp as f64).abs() < 1e-5);
        // Greedy: the chosen token is the top alternative.
        assert_eq!(e["top_logprobs"][0]["token"], e["token"]);
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2);
    }
    // Without max_tokens a chat answer may run to the end of the context.
    let open = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}),
    );
    assert!(open["choices"][0]["message"]["content"].is_string());
}

#[test]
fn streaming_sends_the_same_text_as_one_response() {
    let g = generator();
    let s = Server::start(g, None);
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 14, "seed": 3, "n": 2}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 14, "seed": 3}),
        ),
    ] {
        let whole = s.post(path, &body);
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let events = s.stream(path, &streamed);
        for (i, choice) in whole["choices"].as_array().unwrap().iter().enumerate() {
            let mine: Vec<&Value> = events
                .iter()
                .map(|e| &e["choices"][0])
                .filter(|c| c["index"] == i)
                .collect();
            let text: String = mine
                .iter()
                .map(|c| {
                    if path.contains("chat") {
                        c["delta"]["content"].as_str().unwrap()
                    } else {
                        c["text"].as_str().unwrap()
                    }
                })
                .collect();
            let full = if path.contains("chat") {
                &choice["message"]["content"]
            } else {
                &choice["text"]
            };
            assert_eq!(text, full.as_str().unwrap(), "{path}");
            assert!(mine.len() >= 2, "{path}: {} chunks", mine.len());
            // Only the last chunk of a choice carries its finish reason.
            assert_eq!(
                mine.last().unwrap()["finish_reason"],
                choice["finish_reason"]
            );
            assert!(mine[..mine.len() - 1]
                .iter()
                .all(|c| c["finish_reason"].is_null()));
            if path.contains("chat") {
                assert_eq!(mine[0]["delta"]["role"], "assistant");
                assert_eq!(events[0]["object"], "chat.completion.chunk");
            }
        }
    }
}

#[test]
fn stop_strings_end_and_cut_the_text_also_when_streamed() {
    let g = generator();
    let s = Server::start(g.clone(), None);
    let free = s.post(
        "/v1/completions",
        &json!({"prompt": "The cat", "max_tokens": 20, "temperature": 0}),
    );
    let free_text = free["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the free completion.
    let chars: Vec<char> = free_text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let (text, o) = expected(
        &g,
        &Text::Plain("The cat".into()),
        20,
        Sampling::greedy(),
        0,
        &[&stop],
    );
    assert!(
        free_text.starts_with(&text) && text.len() < free_text.len(),
        "{free_text:?} / {stop:?} / {text:?}"
    );
    assert_eq!(o.finish_reason, rlhf_model::FinishReason::StopString);
    let body = json!({"prompt": "The cat", "max_tokens": 20, "temperature": 0, "stop": [stop, "never-produced"]});
    let v = s.post("/v1/completions", &body);
    assert_eq!(v["choices"][0]["text"], text.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let got: String = s
        .stream("/v1/completions", &streamed)
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, text);
}

#[test]
fn concurrent_requests_share_decode_steps_and_get_their_own_answers() {
    let g = generator();
    let s = Server::start(g.clone(), None);
    let bodies: Vec<Value> = (0..6)
        .map(|i| json!({"prompt": format!("Request number {i} says"), "max_tokens": 6 + 3 * i, "seed": 100 + i}))
        .collect();
    // A long streamed request is decoding while the others arrive, so they join its batch.
    let long = json!({"prompt": "Hold on", "max_tokens": 100, "stream": true});
    let url = format!("{}/v1/completions", s.url);
    let answers: Vec<Value> = s.rt.block_on(async {
        let mut held = s.http.post(&url).json(&long).send().await.unwrap();
        assert!(held.chunk().await.unwrap().is_some(), "its first token");
        let calls = bodies.iter().map(|b| {
            let (http, url) = (s.http.clone(), url.clone());
            async move {
                http.post(url)
                    .json(b)
                    .send()
                    .await
                    .unwrap()
                    .json::<Value>()
                    .await
                    .unwrap()
            }
        });
        let answers = futures_util::future::join_all(calls).await;
        while held.chunk().await.unwrap().is_some() {}
        answers
    });
    for (i, (b, v)) in bodies.iter().zip(&answers).enumerate() {
        let prompt = Text::Plain(b["prompt"].as_str().unwrap().into());
        let (text, _) = expected(
            &g,
            &prompt,
            6 + 3 * i,
            Sampling::default(),
            100 + i as u64,
            &[],
        );
        assert_eq!(v["choices"][0]["text"], text.as_str(), "request {i}");
    }
    let (_, health) = s.get("/health", None);
    let health: Value = serde_json::from_str(&health).unwrap();
    assert!(
        health["stats"]["peak_batch"].as_u64().unwrap() >= 2,
        "{health}"
    );
    assert_eq!(health["stats"]["running"], 0);
}

#[test]
fn bad_requests_get_a_clear_4xx_and_the_server_keeps_serving() {
    let s = Server::start(generator(), None);
    let cases: &[(&str, &str, u16, &str)] = &[
        ("/v1/completions", "{not json", 400, "invalid JSON body"),
        ("/v1/completions", "[1, 2]", 400, "JSON object"),
        (
            "/v1/completions",
            r#"{"max_tokens": 3}"#,
            400,
            "prompt is required",
        ),
        (
            "/v1/completions",
            r#"{"prompt": {"a": 1}}"#,
            400,
            "prompt must be",
        ),
        ("/v1/completions", r#"{"prompt": [9999]}"#, 400, "9999"),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": 3}"#,
            400,
            "temperature must be in [0, 2]",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": "hot"}"#,
            400,
            "temperature must be a number",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "top_p": 0}"#,
            400,
            "top_p",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "n": 0}"#,
            400,
            "n × prompts",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 0}"#,
            400,
            "at least 1",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 1000}"#,
            400,
            "context is 128 tokens",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "stop": 7}"#,
            400,
            "stop must be",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "logprobs": 50}"#,
            400,
            "at most 20",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "echo": true}"#,
            400,
            "echo is not supported",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "model": "gpt-4"}"#,
            404,
            "`gpt-4` does not exist",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": []}"#,
            400,
            "messages is empty",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user"}]}"#,
            400,
            "messages[0]",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#,
            400,
            "logprobs",
        ),
        ("/v1/nothing", "{}", 404, "no route"),
    ];
    for &(path, body, status, needle) in cases {
        let (got, text) = s.post_raw(path, body, None);
        assert_eq!(got, status, "{path} {body}: {text}");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{path} {body}: not JSON: {text}"));
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{path} {body}: {msg}");
    }
    let (status, text) = s.get("/v1/completions", None);
    assert_eq!(status, 405, "{text}");
    assert!(text.contains("not allowed"));
    let ok = s.post(
        "/v1/completions",
        &json!({"prompt": "still alive", "max_tokens": 2}),
    );
    assert_eq!(
        ok["choices"][0]["finish_reason"]
            .as_str()
            .map(|r| r == "length" || r == "stop"),
        Some(true)
    );
}

#[test]
fn bearer_token_guards_the_api_when_set() {
    let s = Server::start(generator(), Some("s3cret"));
    let body = r#"{"prompt": "hi", "max_tokens": 2}"#;
    for key in [None, Some("wrong")] {
        let (status, text) = s.post_raw("/v1/completions", body, key);
        assert_eq!(status, 401, "{text}");
        assert!(text.contains("bearer token"), "{text}");
        assert_eq!(s.get("/v1/models", key).0, 401);
    }
    assert_eq!(s.post_raw("/v1/completions", body, Some("s3cret")).0, 200);
    let (status, models) = s.get("/v1/models", Some("s3cret"));
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["max_model_len"], 128);
    assert_eq!(s.get("/health", None).0, 200, "health needs no token");
}

#[test]
fn the_engine_skips_requests_whose_client_is_gone() {
    let g = generator();
    let engine = rlhf_serve::Engine::start(g.clone(), 4);
    let req = |seed| GenRequest {
        prompt_ids: g.encode_prompt(&Text::Plain("hello".into())).unwrap(),
        max_new_tokens: 5,
        sampling: Sampling::default(),
        seed,
        ..Default::default()
    };
    let (gone, rx) = tokio::sync::mpsc::unbounded_channel();
    drop(rx);
    engine.submit(&[req(1)], &gone).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine.submit(&[req(2)], &tx).unwrap();
    let mut tokens = vec![];
    while let Some((tag, ev)) = rx.blocking_recv() {
        assert_eq!(tag, 0);
        let t = ev.unwrap();
        tokens.push(t.token);
        if let Some(o) = t.finished {
            assert_eq!(o.tokens, tokens);
            break;
        }
    }
    assert_eq!(tokens.len(), 5);
    // Only the live request's 5 tokens were generated (the stats follow the tokens' delivery).
    let settled = (0..100)
        .map(|_| std::thread::sleep(std::time::Duration::from_millis(10)))
        .find_map(|_| {
            let st = engine.stats();
            (st.running == 0).then_some(st.tokens)
        });
    assert_eq!(settled, Some(5));
}
