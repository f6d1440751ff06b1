//! A blocking client for OpenAI-compatible endpoints (`rlhf serve`, vLLM, OpenAI, ...): plain HTTP
//! (this build has no TLS), bearer token, `/v1/completions` and `/v1/chat/completions`.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

pub struct Client {
    base: String,
    api_key: Option<String>,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

/// Sampling settings of one call.
#[derive(Debug, Clone)]
pub struct Params {
    pub max_tokens: usize,
    pub temperature: f32,
    /// Alternatives per token with their log-probs (0 = none).
    pub top_logprobs: usize,
    pub seed: Option<u64>,
}

/// The first choice of a response.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish_reason: String,
    /// Per generated token: the alternatives `(token text, log-prob)` the endpoint listed.
    pub top_logprobs: Vec<Vec<(String, f64)>>,
}

impl Client {
    /// `base_url` like `http://127.0.0.1:8000` (a trailing `/v1` is accepted).
    pub fn new(base_url: &str, api_key: Option<String>) -> Result<Self> {
        let base = base_url
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .to_string();
        if !base.starts_with("http://") {
            bail!("endpoint {base_url}: only http:// URLs are supported (no TLS in this build; use a local proxy)")
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            base,
            api_key,
            http,
            rt,
        })
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        self.rt.block_on(async {
            let mut req = self.http.request(method, &url);
            if let Some(key) = &self.api_key {
                req = req.bearer_auth(key);
            }
            if let Some(body) = body {
                req = req.json(&body);
            }
            let resp = req
                .send()
                .await
                .with_context(|| format!("{url}: request failed"))?;
            let status = resp.status();
            let text = resp
                .text()
                .await
                .with_context(|| format!("{url}: cannot read the response"))?;
            let v: Value = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{url}: HTTP {status}, not JSON: {}",
                    text.chars().take(200).collect::<String>()
                )
            })?;
            if !status.is_success() {
                let msg = v["error"]["message"].as_str().unwrap_or(&text);
                bail!("{url}: HTTP {status}: {msg}")
            }
            Ok(v)
        })
    }

    /// Ids of the served models.
    pub fn models(&self) -> Result<Vec<String>> {
        let v = self.call(reqwest::Method::GET, "/v1/models", None)?;
        Ok(v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect())
    }

    /// `/v1/completions` with a raw prompt.
    pub fn complete(&self, model: &str, prompt: &str, p: &Params) -> Result<Completion> {
        let mut body = json!({"model": model, "prompt": prompt, "max_tokens": p.max_tokens, "temperature": p.temperature, "seed": p.seed});
        if p.top_logprobs > 0 {
            body["logprobs"] = json!(p.top_logprobs);
        }
        let v = self.call(reqwest::Method::POST, "/v1/completions", Some(body))?;
        let c = &v["choices"][0];
        let top = c["logprobs"]["top_logprobs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|pos| {
                pos.as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(t, lp)| Some((t.clone(), lp.as_f64()?)))
                    .collect()
            })
            .collect();
        choice(c, c["text"].as_str(), top)
    }

    /// `/v1/chat/completions` with one user message.
    pub fn chat(&self, model: &str, user: &str, p: &Params) -> Result<Completion> {
        let mut body = json!({
            "model": model, "messages": [{"role": "user", "content": user}],
            "max_tokens": p.max_tokens, "temperature": p.temperature, "seed": p.seed,
        });
        if p.top_logprobs > 0 {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(p.top_logprobs);
        }
        let v = self.call(reqwest::Method::POST, "/v1/chat/completions", Some(body))?;
        let c = &v["choices"][0];
        let top = c["logprobs"]["content"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|pos| {
                pos["top_logprobs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| {
                        Some((e["token"].as_str()?.to_string(), e["logprob"].as_f64()?))
                    })
                    .collect()
            })
            .collect();
        choice(c, c["message"]["content"].as_str(), top)
    }
}

fn choice(
    c: &Value,
    text: Option<&str>,
    top_logprobs: Vec<Vec<(String, f64)>>,
) -> Result<Completion> {
    Ok(Completion {
        text: text
            .ok_or_else(|| anyhow!("response has no choices[0] text: {c}"))?
            .to_string(),
        finish_reason: c["finish_reason"].as_str().unwrap_or_default().to_string(),
        top_logprobs,
    })
}
