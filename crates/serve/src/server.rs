//! `rlhf serve`: the OpenAI-compatible HTTP API over the [`Engine`]. Every choice of every request is
//! one engine request; responses are assembled (or streamed as server-sent events) from its tokens.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rlhf_data::Tokenizer;
use rlhf_model::{FinishReason, StepToken};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{self, ApiError, Kind, Parsed};
use crate::engine::{Engine, Event};
use crate::text::TextStream;

/// What the server needs besides the engine.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The id `/v1/models` lists and requests' `model` must name.
    pub model_name: String,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

struct AppState {
    engine: Engine,
    opts: ServeOptions,
    next_id: AtomicU64,
}

/// The router of the API: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`.
pub fn router(engine: Engine, opts: ServeOptions) -> Router {
    let state = Arc::new(AppState {
        engine,
        opts,
        next_id: AtomicU64::new(0),
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(|method: Method, uri: Uri| async move {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route {method} {uri}"),
            )
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on {uri}"),
            )
        })
        .with_state(state)
}

/// Serves `router` on `listener` until ctrl-c.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.opts.api_key else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing or wrong bearer token (Authorization: Bearer <key>)",
        ))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &headers)?;
    Ok(Json(json!({"object": "list", "data": [{
        "id": s.opts.model_name, "object": "model", "created": 0, "owned_by": "rlhf",
        "max_model_len": s.engine.generator().model.config().max_position_embeddings(),
    }]})))
}

async fn health(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"status": "ok", "model": s.opts.model_name, "stats": s.engine.stats()}))
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    respond(s, headers, body, Kind::Completion)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(s, headers, body, Kind::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn respond(
    s: Arc<AppState>,
    headers: HeaderMap,
    body: Bytes,
    kind: Kind,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let parsed = api::parse(&body, kind, s.engine.generator(), &s.opts.model_name)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    s.engine.submit(&parsed.requests, &tx).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "engine_stopped",
            e.to_string(),
        )
    })?;
    // Only the engine holds senders now: if it stops, the receiver sees the end instead of hanging.
    drop(tx);
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let id = format!("{prefix}-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let reply = Reply {
        state: s,
        kind,
        id,
        created: now(),
        parsed,
    };
    if reply.parsed.stream {
        Ok(reply.stream(rx).into_response())
    } else {
        reply.collect(rx).await.map(IntoResponse::into_response)
    }
}

/// One choice being generated.
struct Choice {
    text: TextStream,
    /// Tokens whose logprobs have not been sent yet (streaming) or all of them.
    logprobs: Vec<StepToken>,
    finish: Option<FinishReason>,
}

struct Reply {
    state: Arc<AppState>,
    kind: Kind,
    id: String,
    created: u64,
    parsed: Parsed,
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Eos | FinishReason::StopString => "stop",
        FinishReason::Length => "length",
    }
}

fn engine_error(e: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "generation_failed", e)
}

impl Reply {
    fn tokenizer(&self) -> &Tokenizer {
        &self.state.engine.generator().tokenizer
    }

    fn choices(&self) -> Vec<Choice> {
        (0..self.parsed.requests.len())
            .map(|_| Choice {
                text: TextStream::new(&self.parsed.stop),
                logprobs: vec![],
                finish: None,
            })
            .collect()
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id, "object": self.object(chunk), "created": self.created,
            "model": self.state.opts.model_name, "choices": choices,
        })
    }

    /// The `logprobs` object of a choice for `tokens`, in the endpoint's format.
    fn logprobs_json(&self, tokens: &[StepToken]) -> Value {
        if self.parsed.logprobs.is_none() {
            return Value::Null;
        }
        let tok = self.tokenizer();
        let piece = |id: u32| tok.decode(&[id], false).unwrap_or_default();
        match self.kind {
            Kind::Completion => {
                let strings: Vec<String> = tokens.iter().map(|t| piece(t.token)).collect();
                let mut offset = 0;
                let offsets: Vec<usize> = strings
                    .iter()
                    .map(|s| {
                        offset += s.len();
                        offset - s.len()
                    })
                    .collect();
                // Best first: of tokens that read the same, the map keeps the likeliest.
                let top: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut m = serde_json::Map::new();
                        for &(id, lp) in &t.top {
                            m.entry(piece(id)).or_insert(json!(lp));
                        }
                        Value::Object(m)
                    })
                    .collect();
                json!({
                    "tokens": strings,
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
            Kind::Chat => {
                let entry = |id: u32, lp: f32| {
                    let s = piece(id);
                    json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
                };
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(t.token, t.logprob);
                        e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
        }
    }

    /// Waits for every choice and answers with the whole completion.
    async fn collect(self, mut rx: UnboundedReceiver<Event>) -> Result<Json<Value>, ApiError> {
        let mut choices = self.choices();
        let mut left = choices.len();
        while left > 0 {
            let Some((i, ev)) = rx.recv().await else {
                return Err(engine_error("the engine stopped".into()));
            };
            let t = ev.map_err(engine_error)?;
            let c = &mut choices[i];
            c.text.push(self.tokenizer(), t.token);
            if let Some(o) = &t.finished {
                c.finish = Some(o.finish_reason);
                left -= 1;
            }
            c.logprobs.push(t);
        }
        let completion_tokens: usize = choices.iter().map(|c| c.text.tokens().len()).sum();
        let out: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let reason = c.finish.map_or("length", finish_reason);
                let logprobs = self.logprobs_json(&c.logprobs);
                match self.kind {
                    Kind::Completion => {
                        json!({"index": i, "text": c.text.text(self.tokenizer()), "logprobs": logprobs, "finish_reason": reason})
                    }
                    Kind::Chat => json!({
                        "index": i, "message": {"role": "assistant", "content": c.text.text(self.tokenizer())},
                        "logprobs": logprobs, "finish_reason": reason,
                    }),
                }
            })
            .collect();
        let mut body = self.envelope(false, out);
        let prompt_tokens = self.parsed.prompt_tokens;
        body["usage"] = json!({
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        });
        Ok(Json(body))
    }

    /// A chunk carrying `delta` (and the logprobs of the tokens since the last chunk) for choice `i`.
    fn chunk(
        &self,
        i: usize,
        c: &mut Choice,
        delta: String,
        finish: Option<FinishReason>,
    ) -> SseEvent {
        let logprobs = self.logprobs_json(&std::mem::take(&mut c.logprobs));
        let reason = finish.map(finish_reason);
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": i, "text": delta, "logprobs": logprobs, "finish_reason": reason})
            }
            Kind::Chat => {
                json!({"index": i, "delta": {"content": delta}, "logprobs": logprobs, "finish_reason": reason})
            }
        };
        SseEvent::default().data(self.envelope(true, vec![choice]).to_string())
    }

    /// Streams chunks as tokens arrive, then `data: [DONE]`.
    fn stream(
        self,
        rx: UnboundedReceiver<Event>,
    ) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
        struct St {
            reply: Reply,
            choices: Vec<Choice>,
            rx: UnboundedReceiver<Event>,
            queue: VecDeque<SseEvent>,
            left: usize,
            ended: bool,
        }
        let mut queue = VecDeque::new();
        if self.kind == Kind::Chat {
            for i in 0..self.parsed.requests.len() {
                let first = json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                queue.push_back(
                    SseEvent::default().data(self.envelope(true, vec![first]).to_string()),
                );
            }
        }
        let (left, choices) = (self.parsed.requests.len(), self.choices());
        let st = St {
            reply: self,
            choices,
            rx,
            queue,
            left,
            ended: false,
        };
        let events = futures_util::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(e) = st.queue.pop_front() {
                    return Some((Ok(e), st));
                }
                if st.ended {
                    return None;
                }
                if st.left == 0 {
                    st.ended = true;
                    st.queue.push_back(SseEvent::default().data("[DONE]"));
                    continue;
                }
                let (i, ev) = st
                    .rx
                    .recv()
                    .await
                    .unwrap_or((0, Err("the engine stopped".to_string())));
                let t = match ev {
                    Ok(t) => t,
                    Err(e) => {
                        st.ended = true;
                        st.queue.push_back(
                            SseEvent::default().data(engine_error(e).to_json().to_string()),
                        );
                        continue;
                    }
                };
                let tok = &st.reply.state.engine.generator().tokenizer;
                let c = &mut st.choices[i];
                let (token, finish) = (t.token, t.finished.as_ref().map(|o| o.finish_reason));
                c.logprobs.push(t);
                let mut delta = c.text.push(tok, token);
                if finish.is_some() {
                    delta.push_str(&c.text.finish(tok));
                    st.left -= 1;
                }
                if !delta.is_empty() || finish.is_some() {
                    let e = st.reply.chunk(i, c, delta, finish);
                    st.queue.push_back(e);
                }
            }
        });
        Sse::new(events)
    }
}
