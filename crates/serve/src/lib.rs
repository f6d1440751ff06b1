//! Serving and AI feedback.
//!
//! - [`engine`]: continuous batching over [`rlhf_model::Decoder`] on a dedicated thread.
//! - [`server`]: `rlhf serve`, an OpenAI-compatible API (`/v1/completions`, `/v1/chat/completions`,
//!   `/v1/models`, SSE streaming, optional bearer token).
//! - [`client`]: a small blocking client for any OpenAI-compatible endpoint.
//! - [`judge`]: an LLM judge (RLAIF): ratings and position-debiased pairwise preferences.
//! - [`judge_reward`]: the judge as an online-RL reward source (`judge:URL`).

pub mod api;
pub mod bench;
pub mod client;
pub mod engine;
pub mod judge;
pub mod judge_reward;
pub mod server;
pub mod text;

pub use client::Client;
pub use engine::{Engine, Stats};
pub use judge::{Judge, JudgeConfig};
pub use server::{router, serve, ServeOptions};
pub use text::TextStream;
