//! Stand-alone `rlhf-feedback` binary (same commands as `rlhf feedback ...`).

use clap::Parser;
use rlhf_feedback::cli::FeedbackArgs;

#[derive(Parser)]
#[command(name = "rlhf-feedback", about = "Human feedback collection web app")]
struct Cli {
    #[command(flatten)]
    args: FeedbackArgs,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = rlhf_feedback::cli::run(Cli::parse().args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
