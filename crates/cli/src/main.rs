//! `rlhf`: the command line. Thin: every subcommand parses its flags and calls a library crate.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rlhf",
    version,
    about = "Reinforcement learning from human feedback, end to end"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole RLHF loop in the sandbox world (`rlhf sandbox` with its presets), with a report.
    Demo(cmd::demo::Args),
    /// Create a new model (random init from a preset or config.json) and train its byte-level BPE tokenizer.
    Init(cmd::init::Args),
    /// Generate completions for a JSONL of prompts.
    Generate(cmd::generate::Args),
    /// Supervised fine-tuning on demonstrations (prompt/completion, messages or text data).
    Sft(cmd::settings::Raw),
    /// Train a reward model (Bradley–Terry, margins, ratings, ensembles); `rlhf rm score` scores completions,
    /// `rlhf rm select` picks pairs to label.
    Rm(cmd::settings::Raw),
    /// Direct preference optimisation: sigmoid (DPO), ipo, robust, hinge, kto, orpo, simpo, cpl.
    Dpo(cmd::settings::Raw),
    /// Online RL: Group Relative Policy Optimization (GRPO, DAPO, Dr. GRPO, GSPO) with reward sources.
    Grpo(cmd::settings::Raw),
    /// Online RL: REINFORCE Leave-One-Out (RLOO) and REINFORCE++.
    Rloo(cmd::settings::Raw),
    /// Online RL: PPO with a KL penalty to a frozen reference and a value model.
    Ppo(cmd::settings::Raw),
    /// The feedback app: serve it, manage users and projects, import items, export training data.
    Feedback(rlhf_feedback::cli::FeedbackArgs),
    /// OpenAI-compatible server (completions, chat, streaming, continuous batching) for a model directory.
    Serve(cmd::serve::Args),
    /// Chat with a model in the terminal (its chat template; replies stream as they are sampled).
    Chat(cmd::chat::Args),
    /// AI feedback: preference labels for completion pairs from an LLM judge behind an OpenAI-compatible endpoint.
    Judge(cmd::judge::Args),
    /// Iterated RLHF: rounds of sampling, labelling (reward, judge, simulated annotators or a feedback-app project), DPO and evaluation.
    Iterate(cmd::settings::Raw),
    /// Critiques and demonstrations → training rows: revision pairs, critic SFT data, demonstration pairs.
    #[command(subcommand)]
    Transform(cmd::transform::Transform),
    /// Evaluate models on held-out prompts: reward with 95 % CIs, win rates, KL, length, diversity; HTML report.
    Eval(cmd::eval::Args),
    /// The whole RLHF loop in a small world with a hidden gold reward and simulated annotators.
    Sandbox(cmd::sandbox::Args),
    /// LoRA adapters: `rlhf lora merge` folds one into its base model.
    #[command(subcommand)]
    Lora(cmd::lora::LoraCommand),
    /// Benchmarks; each prints one JSON line per measured shape.
    #[command(subcommand)]
    Bench(cmd::bench::Bench),
}

fn main() {
    // Library errors (candle's) carry a backtrace when RUST_BACKTRACE is set; errors stay one line unless the
    // user asks for library backtraces explicitly. Panics still honour RUST_BACKTRACE.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    rlhf_model::tune_allocator();
    rlhf_serve::judge_reward::register();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let command = Cli::parse().command;
    // Servers stay on the main thread: their request threads use the pool, which a worker blocked serving
    // would leave one thread short.
    let serves = matches!(
        command,
        Command::Feedback(_) | Command::Serve(_) | Command::Bench(cmd::bench::Bench::Serve(_))
    );
    let result = if serves {
        run(command)
    } else {
        on_pool_worker(move || run(command))
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs `f` on a worker of rayon's global pool. The project's own parallel ops (its f32 products included) run on
/// `rlhf_model::par`, where the calling thread takes part; candle's own products (the `candle` backend's) use
/// rayon, and a parallel op started on a worker is shared with the other
/// worker by work stealing, while one started from the main thread is handed to the pool and waited for (two
/// thread wake-ups per op). Numbers are the same either way: every parallel reduction has a fixed split.
fn on_pool_worker(f: impl FnOnce() -> anyhow::Result<()> + Send) -> anyhow::Result<()> {
    // A roomy stack: the worker now runs what the main thread ran (autograd walks deep graphs recursively).
    rayon::ThreadPoolBuilder::new()
        .stack_size(64 << 20)
        .build_global()?;
    rayon::scope(|_| f())
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Init(a) => cmd::init::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Sft(a) => cmd::sft::run(a),
        Command::Rm(a) => cmd::pref::run_rm(a),
        Command::Dpo(a) => cmd::pref::run_dpo(a),
        Command::Grpo(a) => cmd::rl::grpo(a),
        Command::Rloo(a) => cmd::rl::rloo(a),
        Command::Ppo(a) => cmd::rl::ppo(a),
        Command::Feedback(a) => rlhf_feedback::cli::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::Judge(a) => cmd::judge::run(a),
        Command::Transform(t) => cmd::transform::run(t),
        Command::Bench(b) => cmd::bench::run(b),
        Command::Lora(c) => cmd::lora::run(c),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Iterate(a) => cmd::iterate::run(a),
        Command::Sandbox(a) => cmd::sandbox::run(a),
    }
}
