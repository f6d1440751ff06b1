//! `rlhf chat`: a terminal REPL over the model's chat template, streaming the reply as it is sampled.
//! Lines from stdin are user turns; `/reset` forgets the conversation, `/exit` (or end of input) quits.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use clap::Args as ClapArgs;
use rlhf_data::{Message, Text};
use rlhf_generate::Generator;
use rlhf_model::GenRequest;
use rlhf_serve::{Engine, TextStream};

use super::sampling::SamplingArgs;

#[derive(ClapArgs)]
pub struct Args {
    /// Model directory with a chat template.
    #[arg(long)]
    pub model: PathBuf,
    /// A system message opening every conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Turn i samples with seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    a.sampling.validate()?;
    let generator = Arc::new(Generator::load(&a.model)?);
    generator
        .tokenizer
        .chat_template(None)
        .map_err(|e| anyhow!("{}: cannot chat: {e}", a.model.display()))?;
    let engine = Engine::start(generator.clone(), 1);
    let context = generator.model.config().max_position_embeddings();
    let opening: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message::new("system", s.as_str()))
        .collect();
    let mut history = opening.clone();
    let (stdin, mut out) = (std::io::stdin(), std::io::stdout());
    let mut turn = 0u64;
    eprint!("> ");
    for line in stdin.lock().lines() {
        let line = line?;
        match line.trim() {
            "" => {}
            "/exit" | "/quit" => break,
            "/reset" => {
                history = opening.clone();
                eprintln!("(conversation reset)");
            }
            user => {
                history.push(Message::new("user", user));
                let prompt_ids = generator.encode_prompt(&Text::Messages(history.clone()))?;
                if prompt_ids.len() >= context {
                    history.pop();
                    eprintln!(
                        "(the conversation is {} tokens, the model's context is {context}: /reset)",
                        prompt_ids.len()
                    );
                    eprint!("> ");
                    continue;
                }
                let req = GenRequest {
                    max_new_tokens: a.max_new_tokens.min(context - prompt_ids.len()),
                    prompt_ids,
                    sampling: a.sampling.sampling(),
                    seed: a.seed + turn,
                    stop_ids: generator.model.eos_token_ids(),
                    stop_strings: a.sampling.stop.clone(),
                    top_logprobs: 0,
                };
                let reply = stream_reply(&engine, req, &a.sampling.stop, &mut out)?;
                history.push(Message::new("assistant", reply));
                turn += 1;
            }
        }
        eprint!("> ");
    }
    eprintln!();
    Ok(())
}

/// Prints the reply as it is generated and returns it.
fn stream_reply(
    engine: &Engine,
    req: GenRequest,
    stop: &[String],
    out: &mut impl Write,
) -> Result<String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine.submit(&[req], &tx)?;
    let tok = &engine.generator().tokenizer;
    let mut text = TextStream::new(stop);
    loop {
        let Some((_, ev)) = rx.blocking_recv() else {
            bail!("the generation engine stopped")
        };
        let t = ev.map_err(|e| anyhow!(e))?;
        let done = t.finished.is_some();
        write!(out, "{}", text.push(tok, t.token))?;
        if done {
            writeln!(out, "{}", text.finish(tok))?;
            out.flush()?;
            return Ok(text.text(tok));
        }
        out.flush()?;
    }
}
