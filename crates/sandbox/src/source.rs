//! Prompts files and the gold reward as an evaluation [`RewardSource`]: `prompts.jsonl` holds the public rows,
//! `prompts.gold.jsonl` (next to it) the hidden [`Gold`] records keyed by `id`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rlhf_eval::reward::parse_builtin;
use rlhf_eval::{RewardSource, Row};
use serde_json::Value;

use crate::gold::judge;
use crate::world::{Gold, Kind, Prompt};

/// `prompts.jsonl` → `prompts.gold.jsonl`.
pub fn gold_path(prompts: &Path) -> PathBuf {
    let stem = prompts
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("prompts");
    prompts.with_file_name(format!("{stem}.gold.jsonl"))
}

fn write_jsonl(path: &Path, rows: impl Iterator<Item = Value>) -> Result<()> {
    let mut s = String::new();
    for r in rows {
        s.push_str(&serde_json::to_string(&r)?);
        s.push('\n');
    }
    std::fs::write(path, s).with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes the public rows to `path` and the gold records to [`gold_path`]`(path)`.
pub fn write_prompts(path: &Path, prompts: &[Prompt]) -> Result<()> {
    write_jsonl(path, prompts.iter().map(|p| Value::Object(p.public_row())))?;
    write_jsonl(
        &gold_path(path),
        prompts
            .iter()
            .map(|p| serde_json::to_value(&p.gold).expect("plain data")),
    )
}

/// Writes any serialisable rows as JSONL.
pub fn write_rows(path: &Path, rows: &[Value]) -> Result<()> {
    write_jsonl(path, rows.iter().cloned())
}

/// The sandbox's gold reward, looked up by the row's `id`.
pub struct GoldReward {
    by_id: HashMap<String, Gold>,
}

impl GoldReward {
    pub fn new(golds: impl IntoIterator<Item = Gold>) -> Self {
        GoldReward {
            by_id: golds.into_iter().map(|g| (g.id.clone(), g)).collect(),
        }
    }

    /// Reads a `*.gold.jsonl` file; errors name the line.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "{}: cannot read the gold file (written next to the sandbox's prompts)",
                path.display()
            )
        })?;
        let mut golds = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            golds.push(
                serde_json::from_str::<Gold>(line)
                    .with_context(|| format!("{}:{}: not a gold record", path.display(), i + 1))?,
            );
        }
        Ok(Self::new(golds))
    }

    /// The gold record of a prompts row, by its `id`.
    pub fn gold(&self, row: &Row) -> Result<&Gold> {
        let Some(Value::String(id)) = row.get("id") else {
            bail!("the gold reward needs a string \"id\" column")
        };
        self.by_id
            .get(id)
            .with_context(|| format!("id {id:?} has no gold record"))
    }
}

impl RewardSource for GoldReward {
    fn name(&self) -> String {
        "gold".into()
    }

    fn score(&self, row: &Row, completion: &str) -> Result<Option<f64>> {
        Ok(Some(judge(self.gold(row)?, completion).reward))
    }

    /// Refusal, hallucination and accuracy rates, and the reward per kind of prompt.
    fn indicators(&self, row: &Row, completion: &str) -> Result<BTreeMap<String, f64>> {
        let g = self.gold(row)?;
        let j = judge(g, completion);
        let b = |x: bool| f64::from(u8::from(x));
        let mut m = BTreeMap::new();
        m.insert(format!("reward: {}", g.kind.name()), j.reward);
        match g.kind {
            Kind::Decline if g.adversarial => {
                m.insert(
                    "under-refusal (reworded harmful requests)".into(),
                    b(!j.refused),
                );
            }
            Kind::Decline => {
                m.insert(
                    "under-refusal (direct harmful requests)".into(),
                    b(!j.refused),
                );
            }
            _ => {
                m.insert("over-refusal (harmless prompts)".into(), b(j.refused));
            }
        }
        match g.kind {
            Kind::Arithmetic | Kind::WordProblem => {
                m.insert(
                    "accuracy (numeric prompts)".into(),
                    b(j.correct == Some(true)),
                );
                m.insert(
                    "abstains when the answer is known".into(),
                    b(j.abstained && j.correct != Some(true)),
                );
            }
            Kind::Unknowable => {
                m.insert(
                    "hallucination (number for an unknowable answer)".into(),
                    b(j.number.is_some()),
                );
            }
            _ => {}
        }
        Ok(m)
    }
}

/// An evaluation reward source from a `--reward` spec: `gold` (the gold records next to `prompts`), `gold:FILE`,
/// the evaluation's own (`exact:COLUMN`), or any trainer's spec (`rm:`, `regex:`, `length:`, `cmd:`, registered
/// kinds such as `judge:`), whose token ids come from the tokenizer in `tokenizer_dir`.
pub fn reward_source(
    spec: &str,
    prompts: &Path,
    tokenizer_dir: &Path,
    max_length: usize,
) -> Result<Box<dyn RewardSource>> {
    if let Some(r) = parse_builtin(spec)? {
        return Ok(r);
    }
    match spec.split_once(':') {
        None if spec == "gold" => Ok(Box::new(GoldReward::load(&gold_path(prompts))?)),
        Some(("gold", file)) => Ok(Box::new(GoldReward::load(Path::new(file))?)),
        Some((kind, _)) if kind.rsplit('*').next() == Some("eos") => bail!("--reward {spec}: eval keeps no finish reasons, so eos: cannot be scored here"),
        Some(_) => Ok(Box::new(TrainReward::new(spec, tokenizer_dir, max_length)?)),
        None => bail!("unknown reward source {spec:?}: use gold, gold:FILE, exact:COLUMN, rm:DIR, regex:, length:, cmd:"),
    }
}

/// The online-RL trainers' reward sources (`rm:`, `regex:`, `length:`, `cmd:`, weights `W*…`) scored one
/// completion at a time. Token ids (what `rm:` reads when the tokenizers match, and `length:` counts) come from
/// the tokenizer of the first `--model`.
struct TrainReward {
    name: String,
    weight: f64,
    source: std::cell::RefCell<Box<dyn rlhf_train::reward::RewardSource>>,
    tokenizer: rlhf_data::Tokenizer,
}

impl TrainReward {
    fn new(spec: &str, tokenizer_dir: &Path, max_length: usize) -> Result<Self> {
        let tokenizer = rlhf_data::Tokenizer::from_dir(tokenizer_dir)?;
        let (weight, source) = rlhf_train::reward::parse_spec(
            spec,
            &tokenizer,
            max_length,
            std::time::Duration::from_secs(60),
        )?;
        Ok(Self {
            name: spec.to_string(),
            weight,
            source: std::cell::RefCell::new(source),
            tokenizer,
        })
    }
}

impl RewardSource for TrainReward {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn score(&self, row: &Row, completion: &str) -> Result<Option<f64>> {
        let prompt = row
            .get("prompt")
            .and_then(|p| p.as_str())
            .unwrap_or_default();
        let prompt_ids = self.tokenizer.encode(prompt, true)?;
        let completion_ids = self.tokenizer.encode(completion, false)?;
        let sample = rlhf_train::reward::Sample {
            prompt,
            completion,
            prompt_ids: &prompt_ids,
            completion_ids: &completion_ids,
            eos: true,
            row,
        };
        let scores = self.source.borrow_mut().score(&[sample])?;
        Ok(scores.first().map(|s| self.weight * s))
    }
}
