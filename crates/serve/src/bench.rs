//! `rlhf bench serve`: concurrent HTTP clients against the server vs. the same requests through
//! batched [`rlhf_model::generate`], on one machine in one run.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Result};
use rlhf_generate::Generator;
use rlhf_model::bench::pseudo_ids;
use rlhf_model::{generate, GenRequest, Sampling};
use serde_json::{json, Value};

use crate::{router, Engine, ServeOptions};

#[derive(Debug, Clone)]
pub struct ServeBench {
    pub clients: usize,
    /// Requests each client sends one after another.
    pub requests_per_client: usize,
    pub prompt_len: usize,
    /// Request r asks for `max_tokens - (r % 4) * max_tokens / 8` tokens: uneven lengths, as real traffic.
    pub max_tokens: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn summary(seconds: f64, tokens: usize, mut latencies: Vec<f64>) -> Value {
    latencies.sort_by(f64::total_cmp);
    json!({
        "seconds": seconds, "new_tokens_per_sec": tokens as f64 / seconds,
        "p50_latency_s": percentile(&latencies, 0.5), "p99_latency_s": percentile(&latencies, 0.99),
    })
}

/// Runs both sides and returns one JSON object: tokens/s and p50/p99 request latency of each, and
/// whether every request got the same completion both ways (batching must not change outputs).
pub fn bench_serve(generator: Arc<Generator>, b: &ServeBench) -> Result<Value> {
    let vocab = generator
        .model
        .vocab_size()
        .min(generator.tokenizer.vocab_size());
    let eos = generator.model.eos_token_ids();
    let n = b.clients * b.requests_per_client;
    let requests: Vec<GenRequest> = (0..n)
        .map(|r| GenRequest {
            prompt_ids: pseudo_ids(b.prompt_len, vocab, r as u64),
            max_new_tokens: (b.max_tokens - (r % 4) * b.max_tokens / 8).max(1),
            sampling: Sampling::default(),
            seed: r as u64,
            stop_ids: eos.clone(),
            ..Default::default()
        })
        .collect();

    // Batched generation, `clients` requests per batch (as `rlhf generate --batch-size <clients>`);
    // a request's latency is the end of its batch.
    let t = Instant::now();
    let mut batch_out = Vec::with_capacity(n);
    let mut batch_lat = Vec::with_capacity(n);
    for chunk in requests.chunks(b.clients) {
        batch_out.extend(generate(&generator.model, chunk, None)?);
        batch_lat.extend(std::iter::repeat_n(t.elapsed().as_secs_f64(), chunk.len()));
    }
    let batch_s = t.elapsed().as_secs_f64();
    let tokens: usize = batch_out.iter().map(|o| o.tokens.len()).sum();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let engine = Engine::start(generator.clone(), b.clients);
    let app = router(
        engine,
        ServeOptions {
            model_name: "bench".into(),
            api_key: None,
        },
    );
    let (serve_s, results) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1/completions", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        let t = Instant::now();
        let clients: Vec<_> = (0..b.clients)
            .map(|c| {
                let (http, url) = (http.clone(), url.clone());
                let mine: Vec<(usize, GenRequest)> =
                    (0..b.requests_per_client).map(|k| k * b.clients + c).map(|r| (r, requests[r].clone())).collect();
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for (r, req) in mine {
                        let body = json!({
                            "model": "bench", "prompt": req.prompt_ids, "max_tokens": req.max_new_tokens,
                            "temperature": 1.0, "seed": req.seed,
                        });
                        let start = Instant::now();
                        let v: Value = http.post(&url).json(&body).send().await?.error_for_status()?.json().await?;
                        let lat = start.elapsed().as_secs_f64();
                        let text = v["choices"][0]["text"].as_str().unwrap_or_default().to_string();
                        out.push((r, lat, text, v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize));
                    }
                    anyhow::Ok(out)
                })
            })
            .collect();
        let mut results = Vec::with_capacity(n);
        for c in clients {
            results.extend(c.await??);
        }
        anyhow::Ok((t.elapsed().as_secs_f64(), results))
    })?;
    ensure!(
        results.len() == n,
        "{} of {n} requests answered",
        results.len()
    );
    let serve_tokens: usize = results.iter().map(|r| r.3).sum();
    let decode = |ids: &[u32]| generator.tokenizer.decode(ids, true).unwrap_or_default();
    let identical = serve_tokens == tokens
        && results
            .iter()
            .all(|(r, _, text, _)| *text == decode(&batch_out[*r].tokens));
    Ok(json!({
        "bench": "serve", "clients": b.clients, "requests": n, "prompt_len": b.prompt_len,
        "max_tokens": b.max_tokens, "new_tokens": tokens,
        "serve": summary(serve_s, serve_tokens, results.iter().map(|r| r.1).collect()),
        "batch_generate": summary(batch_s, tokens, batch_lat),
        "identical_outputs": identical,
    }))
}
