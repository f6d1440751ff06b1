//! The sandbox's gold reward of given completions, for measuring a reward model against gold on pairs of your
//! own (the pipeline does this on its held-out pairs):
//!
//! `cargo run --release -p rlhf-sandbox --example gold_scores -- PROMPTS ROWS > OUT`
//!
//! PROMPTS is a sandbox prompts file (`id`, `prompt`) with its `.gold.jsonl` beside it; ROWS is JSONL with a
//! `prompt` and any of `completion`, `chosen`, `rejected`. Each output line gives the prompt's `kind` and the gold
//! reward of each of those fields present.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rlhf_eval::{read_prompt_rows, Row};
use rlhf_sandbox::source::gold_path;
use rlhf_sandbox::{gold_reward, GoldReward};
use serde_json::{json, Map, Value};

fn prompt(row: &Row) -> &str {
    row["prompt"].as_str().expect("read_prompt_rows checked it")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [prompts, input] = args.as_slice() else {
        bail!("usage: gold_scores PROMPTS ROWS (see the file's header)");
    };
    let (prompts, input) = (Path::new(prompts), Path::new(input));
    let golds = GoldReward::load(&gold_path(prompts))?;
    let prompt_rows = read_prompt_rows(prompts)?;
    let by_text: HashMap<&str, &Row> = prompt_rows.iter().map(|r| (prompt(r), r)).collect();
    let mut stdout = std::io::stdout().lock();
    for (i, r) in read_prompt_rows(input)?.iter().enumerate() {
        let at = || format!("{}:{}", input.display(), i + 1);
        let p = by_text
            .get(prompt(r))
            .with_context(|| format!("{}: the prompt is not in {}", at(), prompts.display()))?;
        let gold = golds
            .gold(p)
            .with_context(|| format!("{}: {}", at(), prompts.display()))?;
        let mut out = Map::new();
        out.insert("kind".into(), json!(gold.kind));
        for key in ["completion", "chosen", "rejected"] {
            if let Some(text) = r.get(key).and_then(Value::as_str) {
                out.insert(key.into(), json!(gold_reward(gold, text)));
            }
        }
        writeln!(stdout, "{}", Value::Object(out))?;
    }
    Ok(())
}
