//! Reward sources the evaluation scores completions with. A source sees the public prompt row (its columns)
//! and the completion; new sources (reward models, verifiers) implement [`RewardSource`].

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// One prompt row as read from the prompts file: `prompt` plus any other (public) columns.
pub type Row = Map<String, Value>;

pub trait RewardSource {
    /// Label in tables and the summary (e.g. `gold`, `exact:answer`).
    fn name(&self) -> String;
    /// Reward of `completion` to the prompt of `row`; None where the source does not apply to the row (e.g. no
    /// reference answer). Errors name the row's problem.
    fn score(&self, row: &Row, completion: &str) -> Result<Option<f64>>;
    /// Named 0/1 (or real) indicators that apply to this row, averaged over the rows that report them (e.g.
    /// `over_refusal`, `hallucination`). Default: none.
    fn indicators(&self, _row: &Row, _completion: &str) -> Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }
}

/// 1 when the completion, trimmed and without a final period, equals the row's reference column; else 0.
/// Rows without the column are not scored.
pub struct ExactMatch {
    pub column: String,
}

impl RewardSource for ExactMatch {
    fn name(&self) -> String {
        format!("exact:{}", self.column)
    }

    fn score(&self, row: &Row, completion: &str) -> Result<Option<f64>> {
        let want = match row.get(&self.column) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Null) | None => return Ok(None),
            Some(other) => bail!(
                "column {:?} must be a string or number, got {other}",
                self.column
            ),
        };
        let norm = |s: &str| s.trim().trim_end_matches('.').trim().to_string();
        Ok(Some(f64::from(u8::from(norm(completion) == norm(&want)))))
    }
}

/// Parses a `--reward` value the evaluation knows itself (`exact:COLUMN`); others return None so callers
/// (the CLI, which also knows the sandbox's `gold`) can try theirs.
pub fn parse_builtin(spec: &str) -> Result<Option<Box<dyn RewardSource>>> {
    if let Some(col) = spec.strip_prefix("exact:") {
        if col.is_empty() {
            bail!("--reward exact:COLUMN needs a column name");
        }
        return Ok(Some(Box::new(ExactMatch { column: col.into() })));
    }
    Ok(None)
}

/// The rows of a prompts JSONL file; each needs a string `prompt`. Errors name the file and line.
pub fn read_prompt_rows(path: &std::path::Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let Value::Object(m) = v else {
            bail!("{}: a JSON object expected", at())
        };
        match m.get("prompt") {
            Some(Value::String(_)) => {}
            Some(_) => bail!("{}: field \"prompt\" must be a string", at()),
            None => bail!("{}: field \"prompt\" is missing", at()),
        }
        rows.push(m);
    }
    if rows.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(rows)
}
