//! `rlhf-feedback`: a web app for collecting human feedback on model responses
//! (pairwise comparisons, Likert ratings, corrections, critiques, demonstrations) with
//! quality control, and export to TRL-style training JSONL.
//!
//! Entry points for the workspace CLI: [`cli::FeedbackArgs`] (clap) and [`cli::run`].

pub mod auth;
pub mod cli;
pub mod db;
pub mod diff;
pub mod error;
pub mod export;
pub mod import;
pub mod model;
pub mod quality;
pub mod reliability;
pub mod stats;
pub mod store;
pub mod throttle;
pub mod web;

pub use db::Db;
pub use error::{Error, Result};
