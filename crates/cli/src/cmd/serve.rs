//! `rlhf serve`: an OpenAI-compatible server for a model directory; `rlhf bench serve`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use rlhf_data::Tokenizer;
use rlhf_generate::Generator;
use rlhf_model::CausalLm;
use rlhf_serve::bench::{bench_serve, ServeBench};
use rlhf_serve::{router, Engine, ServeOptions};

use crate::cmd::bench::Shape;

#[derive(ClapArgs)]
pub struct Args {
    /// Model directory (config.json, safetensors, tokenizer files).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Model id for `/v1/models` and requests' `model` field (default: the directory name).
    #[arg(long)]
    pub name: Option<String>,
    /// Require `Authorization: Bearer <key>` on /v1/*.
    #[arg(long, env = "RLHF_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most requests decoded together; more wait for a free row.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
}

pub fn run(a: Args) -> Result<()> {
    let generator = Arc::new(Generator::load(&a.model)?);
    let name = a.name.clone().unwrap_or_else(|| {
        let dir = a.model.canonicalize().unwrap_or_else(|_| a.model.clone());
        dir.file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let engine = Engine::start(generator, a.max_batch);
    let app = router(
        engine,
        ServeOptions {
            model_name: name.clone(),
            api_key: a.api_key.clone(),
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!("serving {name} on http://{}", listener.local_addr()?);
        rlhf_serve::serve(listener, app)
            .await
            .context("server failed")
    })
}

#[derive(ClapArgs)]
pub struct BenchArgs {
    /// Shapes to measure (repeatable; default both).
    #[arg(long, value_enum)]
    shape: Vec<Shape>,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    #[arg(long, default_value_t = 2)]
    requests_per_client: usize,
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Tokenizer for decoding (the models are random-init; prompts are token ids).
    #[arg(long, default_value = "fixtures/tokenizer")]
    tokenizer: PathBuf,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let shapes = if a.shape.is_empty() {
        vec![Shape::Tiny, Shape::Smollm2]
    } else {
        a.shape.clone()
    };
    let b = ServeBench {
        clients: a.clients,
        requests_per_client: a.requests_per_client,
        prompt_len: a.prompt_len,
        max_tokens: a.max_tokens,
    };
    for shape in shapes {
        let model = CausalLm::init_random(shape.config(), 0, &candle_core::Device::Cpu)?;
        let tokenizer = Tokenizer::from_dir(&a.tokenizer)?;
        let generator = Arc::new(Generator::new(
            model,
            tokenizer,
            &a.tokenizer.join("tokenizer.json"),
        )?);
        let mut v = bench_serve(generator, &b)?;
        v["shape"] = shape.name().into();
        println!("{v}");
    }
    Ok(())
}
