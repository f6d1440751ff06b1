//! A real `rlhf serve` on 127.0.0.1 over the fixture Llama, and a small HTTP client for the tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use rlhf_generate::Generator;
use rlhf_serve::{router, Engine, ServeOptions};
use serde_json::Value;

pub fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/llama")
}

pub fn generator() -> Arc<Generator> {
    Arc::new(Generator::load(&fixture_model()).unwrap())
}

/// A server on a free port; stops when dropped.
pub struct Server {
    pub url: String,
    pub rt: tokio::runtime::Runtime,
    pub http: reqwest::Client,
}

impl Server {
    pub fn start(generator: Arc<Generator>, api_key: Option<&str>) -> Self {
        let engine = Engine::start(generator, 8);
        let opts = ServeOptions {
            model_name: "tiny".into(),
            api_key: api_key.map(str::to_string),
        };
        Self::with_router(router(engine, opts))
    }

    pub fn with_router(app: Router) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            url,
            rt,
            http: reqwest::Client::new(),
        }
    }

    /// POSTs `body` (raw) with an optional bearer token; returns (status, body text).
    pub fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
        self.rt.block_on(async {
            let mut req = self
                .http
                .post(format!("{}{path}", self.url))
                .header("content-type", "application/json")
                .body(body.to_string());
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
    }

    /// POSTs JSON and parses the JSON answer, asserting HTTP 200.
    pub fn post(&self, path: &str, body: &Value) -> Value {
        let (status, text) = self.post_raw(path, &body.to_string(), None);
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    pub fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        self.rt.block_on(async {
            let mut req = self.http.get(format!("{}{path}", self.url));
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
    }

    /// A streamed request's events: the JSON of every `data:` line before `[DONE]` (which must end it).
    pub fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let (status, text) = self.post_raw(path, &body.to_string(), None);
        assert_eq!(status, 200, "{text}");
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
        data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }
}
