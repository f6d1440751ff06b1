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
use rlhf_sandbox::gold::gold_reward;
use rlhf_sandbox::world::Gold;
use serde_json::{json, Map, Value};

fn rows(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))
        })
        .collect()
}

fn field<'a>(row: &'a Value, key: &str, path: &Path, line: usize) -> Result<&'a str> {
    row[key]
        .as_str()
        .with_context(|| format!("{}:{line}: no string field `{key}`", path.display()))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [prompts, input] = args.as_slice() else {
        bail!("usage: gold_scores PROMPTS ROWS (see the file's header)");
    };
    let (prompts, input) = (Path::new(prompts), Path::new(input));
    let gold_path = prompts.with_extension("gold.jsonl");
    let mut golds: HashMap<String, Gold> = HashMap::new();
    for (i, g) in rows(&gold_path)?.into_iter().enumerate() {
        let g: Gold = serde_json::from_value(g)
            .with_context(|| format!("{}:{}: not a gold record", gold_path.display(), i + 1))?;
        golds.insert(g.id.clone(), g);
    }
    let mut by_text: HashMap<String, &Gold> = HashMap::new();
    for (i, p) in rows(prompts)?.iter().enumerate() {
        let id = field(p, "id", prompts, i + 1)?;
        let gold = golds
            .get(id)
            .with_context(|| format!("{}: no gold record for `{id}`", gold_path.display()))?;
        by_text.insert(field(p, "prompt", prompts, i + 1)?.to_string(), gold);
    }
    let mut stdout = std::io::stdout().lock();
    for (i, r) in rows(input)?.iter().enumerate() {
        let prompt = field(r, "prompt", input, i + 1)?;
        let gold = by_text.get(prompt).with_context(|| {
            format!(
                "{}:{}: the prompt is not in {}",
                input.display(),
                i + 1,
                prompts.display()
            )
        })?;
        let mut out = Map::new();
        out.insert("kind".into(), json!(gold.kind));
        for key in ["completion", "chosen", "rejected"] {
            if let Some(text) = r[key].as_str() {
                out.insert(key.into(), json!(gold_reward(gold, text)));
            }
        }
        writeln!(stdout, "{}", Value::Object(out))?;
    }
    Ok(())
}
