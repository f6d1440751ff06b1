//! The OpenAI request bodies `rlhf serve` accepts, parsed into generation requests with a clear
//! 4xx [`ApiError`] naming the offending field; unknown fields are ignored (clients send many).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rlhf_data::{Message, Text};
use rlhf_generate::Generator;
use rlhf_model::{GenRequest, Sampling};
use serde_json::{json, Map, Value};

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: Some(code),
        }
    }

    pub fn to_json(&self) -> Value {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.to_json())).into_response()
    }
}

type Res<T> = std::result::Result<T, ApiError>;

/// Which endpoint a body is for: they differ in the prompt field and the `logprobs` type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// A parsed request: one generation request per choice, `n` per prompt, in choice order.
#[derive(Debug)]
pub struct Parsed {
    pub requests: Vec<GenRequest>,
    pub prompt_tokens: usize,
    pub stop: Vec<String>,
    /// Top alternatives per token; `None` = no logprobs in the response.
    pub logprobs: Option<usize>,
    pub stream: bool,
}

/// Most choices one request may ask for (prompts × n), so one client cannot take the whole batch.
pub const MAX_CHOICES: usize = 64;
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Parses a request body for `kind`, encoding prompts with `generator`; `model` is the served name.
pub fn parse(body: &[u8], kind: Kind, generator: &Generator, model: &str) -> Res<Parsed> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("invalid JSON body: {e}")))?;
    let Value::Object(o) = v else {
        return Err(ApiError::bad("body", "the body must be a JSON object"));
    };
    let f = Fields(&o);
    if let Some(m) = f.str("model")? {
        if m != model {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("the model `{m}` does not exist; this server serves `{model}`"),
            ));
        }
    }
    unsupported(&f)?;
    let prompts = match kind {
        Kind::Completion => completion_prompts(&o, generator)?,
        Kind::Chat => vec![chat_prompt(&o, generator)?],
    };
    let context = generator.model.config().max_position_embeddings();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_tokens = match kind {
        Kind::Completion => f.usize("max_tokens")?,
        Kind::Chat => f.usize("max_completion_tokens")?.or(f.usize("max_tokens")?),
    };
    // Chat answers may run to the end of the context; plain completions default to 16 as OpenAI's.
    let max_tokens = max_tokens.unwrap_or(if kind == Kind::Chat {
        context.saturating_sub(longest)
    } else {
        16
    });
    if max_tokens == 0 {
        return Err(ApiError::bad("max_tokens", "max_tokens must be at least 1"));
    }
    if longest + max_tokens > context {
        return Err(ApiError::bad(
            "max_tokens",
            format!(
                "this model's context is {context} tokens, but the prompt has {longest} and max_tokens asks for {max_tokens} more"
            ),
        ));
    }
    let temperature = f.f32("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature",
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = f.f32("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = f.usize("top_k")?.unwrap_or(0);
    let n = f.usize("n")?.unwrap_or(1);
    if n == 0 || n * prompts.len() > MAX_CHOICES {
        return Err(ApiError::bad(
            "n",
            format!(
                "n × prompts must be between 1 and {MAX_CHOICES}, got {n} × {}",
                prompts.len()
            ),
        ));
    }
    let stop = stops(&o)?;
    let logprobs = match kind {
        Kind::Completion => f.usize("logprobs")?,
        Kind::Chat => match f.bool("logprobs")? {
            Some(true) => Some(f.usize("top_logprobs")?.unwrap_or(0)),
            _ if f.usize("top_logprobs")?.is_some_and(|k| k > 0) => {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "top_logprobs needs \"logprobs\": true",
                ))
            }
            _ => None,
        },
    };
    if let Some(k) = logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
        return Err(ApiError::bad(
            "logprobs",
            format!("at most {MAX_TOP_LOGPROBS} top logprobs, got {k}"),
        ));
    }
    // Unseeded requests still get a seed, so every choice of one request differs.
    let seed = f.u64("seed")?.unwrap_or_else(rand::random::<u64>);
    let stream = f.bool("stream")?.unwrap_or(false);
    let eos = generator.model.eos_token_ids();
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let mut requests = Vec::with_capacity(prompts.len() * n);
    for (i, p) in prompts.into_iter().enumerate() {
        for j in 0..n {
            requests.push(GenRequest {
                prompt_ids: p.clone(),
                max_new_tokens: max_tokens,
                sampling: Sampling {
                    temperature,
                    top_k,
                    top_p,
                },
                // As `rlhf generate --seed S`: choice c samples with S + c.
                seed: seed.wrapping_add((i * n + j) as u64),
                stop_ids: eos.clone(),
                stop_strings: stop.clone(),
                top_logprobs: logprobs.unwrap_or(0),
            });
        }
    }
    Ok(Parsed {
        requests,
        prompt_tokens,
        stop,
        logprobs,
        stream,
    })
}

/// Fields OpenAI defines that this server does not implement: refused rather than silently ignored.
fn unsupported(f: &Fields) -> Res<()> {
    if f.bool("echo")? == Some(true) {
        return Err(ApiError::bad("echo", "echo is not supported"));
    }
    if f.usize("best_of")?.is_some_and(|b| b > 1) {
        return Err(ApiError::bad("best_of", "best_of is not supported (use n)"));
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if f.f32(key)?.is_some_and(|p| p != 0.0) {
            return Err(ApiError::bad(key, format!("{key} is not supported")));
        }
    }
    if f.0
        .get("logit_bias")
        .is_some_and(|b| b.as_object().is_some_and(|m| !m.is_empty()))
    {
        return Err(ApiError::bad("logit_bias", "logit_bias is not supported"));
    }
    if f.0.get("suffix").is_some_and(|s| !s.is_null()) {
        return Err(ApiError::bad("suffix", "suffix is not supported"));
    }
    Ok(())
}

fn completion_prompts(o: &Map<String, Value>, generator: &Generator) -> Res<Vec<Vec<u32>>> {
    let bad = |m: &str| ApiError::bad("prompt", m);
    let shape =
        "prompt must be a string, a list of strings, a list of token ids or a list of such lists";
    let encode = |s: &str| {
        generator
            .encode_prompt(&Text::Plain(s.to_string()))
            .map_err(|e| bad(&format!("cannot encode the prompt: {e}")))
    };
    let ids = |v: &[Value]| -> Res<Vec<u32>> {
        v.iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| bad(shape))
            })
            .collect()
    };
    let prompts = match o.get("prompt") {
        None | Some(Value::Null) => return Err(bad("prompt is required")),
        Some(Value::String(s)) => vec![encode(s)?],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| encode(s.as_str().unwrap_or_default()))
            .collect::<Res<_>>()?,
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => vec![ids(a)?],
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| p.as_array().ok_or_else(|| bad(shape)).and_then(|p| ids(p)))
            .collect::<Res<_>>()?,
        Some(_) => return Err(bad(shape)),
    };
    let vocab = generator.model.vocab_size();
    if prompts.is_empty() {
        return Err(bad("prompt is an empty list"));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(bad(&format!("prompt {i} encodes to no tokens")));
        }
        if let Some(t) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(bad(&format!(
                "prompt {i}: token id {t} is out of range for vocab size {vocab}"
            )));
        }
    }
    Ok(prompts)
}

fn chat_prompt(o: &Map<String, Value>, generator: &Generator) -> Res<Vec<u32>> {
    let Some(Value::Array(ms)) = o.get("messages") else {
        return Err(ApiError::bad(
            "messages",
            "messages must be a non-empty list of {role, content}",
        ));
    };
    if ms.is_empty() {
        return Err(ApiError::bad("messages", "messages is empty"));
    }
    let mut messages = Vec::with_capacity(ms.len());
    for (i, m) in ms.iter().enumerate() {
        let param = format!("messages[{i}]");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad(&param, format!("{param}: role must be a string")))?;
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            // Content parts: only text parts can reach a text model.
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => Err(ApiError::bad(
                            &param,
                            format!("{param}: only text content parts are supported"),
                        )),
                    }
                })
                .collect::<Res<Vec<_>>>()?
                .concat(),
            _ => {
                return Err(ApiError::bad(
                    &param,
                    format!("{param}: content must be a string or a list of text parts"),
                ))
            }
        };
        messages.push(Message::new(role, content));
    }
    let ids = generator
        .encode_prompt(&Text::Messages(messages))
        .map_err(|e| ApiError::bad("messages", format!("cannot apply the chat template: {e}")))?;
    if ids.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "the chat template renders to no tokens",
        ));
    }
    Ok(ids)
}

fn stops(o: &Map<String, Value>) -> Res<Vec<String>> {
    let bad = || {
        ApiError::bad(
            "stop",
            "stop must be a non-empty string or a list of up to 4 of them",
        )
    };
    let stops = match o.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Res<_>>()?,
        Some(_) => return Err(bad()),
    };
    if stops.len() > 4 || stops.iter().any(String::is_empty) {
        return Err(bad());
    }
    Ok(stops)
}

/// Typed optional fields with errors that name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get<T>(&self, key: &str, what: &str, conv: impl Fn(&Value) -> Option<T>) -> Res<Option<T>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => conv(v)
                .map(Some)
                .ok_or_else(|| ApiError::bad(key, format!("{key} must be {what}, got {v}"))),
        }
    }
    fn str(&self, key: &str) -> Res<Option<String>> {
        self.get(key, "a string", |v| v.as_str().map(str::to_string))
    }
    fn f32(&self, key: &str) -> Res<Option<f32>> {
        self.get(key, "a number", |v| v.as_f64().map(|x| x as f32))
    }
    fn u64(&self, key: &str) -> Res<Option<u64>> {
        self.get(key, "a non-negative integer", Value::as_u64)
    }
    fn usize(&self, key: &str) -> Res<Option<usize>> {
        self.get(key, "a non-negative integer", |v| {
            v.as_u64().and_then(|x| usize::try_from(x).ok())
        })
    }
    fn bool(&self, key: &str) -> Res<Option<bool>> {
        self.get(key, "true or false", Value::as_bool)
    }
}
