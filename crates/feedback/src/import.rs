//! JSONL import of prompts and candidate responses, and candidate generation through an
//! OpenAI-compatible `/v1/completions` endpoint.
//!
//! Accepted rows (one JSON object per line):
//! - `{"prompt": ..., "responses": [...]}` (this app's own format)
//! - TRL preference `{"prompt", "chosen", "rejected"}` → responses `[chosen, rejected]`
//! - TRL prompt-completion / KTO `{"prompt", "completion"[, "label"]}` → `[completion]`
//! - prompt-only `{"prompt"}` (demonstrations, or with generation)
//!
//! Text fields may be strings or TRL conversational message lists. Optional `"id"`
//! (string or number) and `"gold"` (known answer) fields.

use serde_json::{json, Value};

use crate::error::{invalid, Error, Result};
use crate::model::{NewItem, TaskKind};
use crate::store::token_hash;

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub line: usize,
    pub id: Option<String>,
    pub prompt: String,
    pub responses: Vec<String>,
    pub gold: Option<Value>,
}

/// Text of a string field or of a conversational message list.
fn text(v: &Value, src: &str, line: usize, field: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(msgs) if !msgs.is_empty() => {
            let mut parts = Vec::new();
            for m in msgs {
                let content = m.get("content").and_then(Value::as_str);
                let role = m.get("role").and_then(Value::as_str);
                match (role, content) {
                    (Some(r), Some(c)) => parts.push((r.to_string(), c.to_string())),
                    _ => {
                        return Err(invalid(format!(
                            "{src}:{line}: field \"{field}\": expected a string or a list of {{\"role\", \"content\"}} messages"
                        )))
                    }
                }
            }
            // A single message (e.g. the assistant turn of `chosen`) is just its content.
            Ok(if parts.len() == 1 {
                parts.remove(0).1
            } else {
                parts
                    .iter()
                    .map(|(r, c)| format!("{r}: {c}"))
                    .collect::<Vec<_>>()
                    .join("\n\n")
            })
        }
        _ => Err(invalid(format!(
            "{src}:{line}: field \"{field}\": expected a string or a list of messages"
        ))),
    }
}

/// Decodes a file's bytes as UTF-8; an invalid byte is reported with its line.
pub fn decode_utf8(src: &str, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let (b, at) = (e.as_bytes(), e.utf8_error().valid_up_to());
        let line = b[..at].iter().filter(|&&c| c == b'\n').count() + 1;
        let col = at
            - b[..at]
                .iter()
                .rposition(|&c| c == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        invalid(format!(
            "{src}:{line}: invalid UTF-8 at byte {col} of the line (save the file as UTF-8)"
        ))
    })
}

/// Parses JSONL text. `src` names the file in error messages. Blank lines are allowed.
pub fn parse_jsonl(src: &str, data: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, raw) in data.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(raw)
            .map_err(|e| invalid(format!("{src}:{line}: invalid JSON: {e}")))?;
        let Value::Object(obj) = &v else {
            return Err(invalid(format!("{src}:{line}: expected a JSON object")));
        };
        let prompt = match obj.get("prompt") {
            Some(p) => text(p, src, line, "prompt")?,
            None => {
                return Err(invalid(format!(
                "{src}:{line}: field \"prompt\": missing (implicit-prompt rows are not supported)"
            )))
            }
        };
        let responses = if let Some(r) = obj.get("responses") {
            let Value::Array(list) = r else {
                return Err(invalid(format!(
                    "{src}:{line}: field \"responses\": expected a list"
                )));
            };
            list.iter()
                .enumerate()
                .map(|(j, x)| text(x, src, line, &format!("responses[{j}]")))
                .collect::<Result<Vec<_>>>()?
        } else if obj.contains_key("chosen") || obj.contains_key("rejected") {
            let get = |f: &str| {
                obj.get(f)
                    .ok_or_else(|| invalid(format!("{src}:{line}: field \"{f}\": missing")))
            };
            vec![
                text(get("chosen")?, src, line, "chosen")?,
                text(get("rejected")?, src, line, "rejected")?,
            ]
        } else if let Some(c) = obj.get("completion") {
            vec![text(c, src, line, "completion")?]
        } else {
            vec![]
        };
        let id = match obj.get("id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(_) => {
                return Err(invalid(format!(
                    "{src}:{line}: field \"id\": expected a string or number"
                )))
            }
        };
        rows.push(Row {
            line,
            id,
            prompt,
            responses,
            gold: obj.get("gold").filter(|g| !g.is_null()).cloned(),
        });
    }
    Ok(rows)
}

/// Turns rows into items for a project kind: pairwise items are every pair of a row's
/// responses, single-response kinds get one item per response, demonstrations keep
/// the prompt with all responses as references. Gold answers are validated and
/// re-indexed for each expanded item.
pub fn expand(
    src: &str,
    rows: &[Row],
    kind: TaskKind,
    criteria: &[String],
    likert_max: i64,
) -> Result<Vec<NewItem>> {
    let mut items = Vec::new();
    // Explicit ids must be unique within a file: a repeated row is skipped, but a
    // different row under a used id would be dropped silently by the store.
    let mut by_id: std::collections::HashMap<&str, &Row> = std::collections::HashMap::new();
    for row in rows {
        if let Some(id) = row.id.as_deref() {
            if let Some(first) = by_id.get(id) {
                if (&first.prompt, &first.responses, &first.gold)
                    != (&row.prompt, &row.responses, &row.gold)
                {
                    return Err(invalid(format!(
                        "{src}:{}: field \"id\": {id:?} is already used on line {} by a row with different content; ids must be unique",
                        row.line, first.line
                    )));
                }
                continue;
            }
            by_id.insert(id, row);
        }
        let base = row.id.clone().unwrap_or_else(|| {
            // Content hash, so re-importing the same file doesn't duplicate items.
            token_hash(&serde_json::to_string(&(&row.prompt, &row.responses)).unwrap_or_default())
                [..16]
                .to_string()
        });
        let err = |msg: String| invalid(format!("{src}:{}: {msg}", row.line));
        match kind {
            TaskKind::Pairwise => {
                let n = row.responses.len();
                if n < 2 {
                    return Err(err(format!("field \"responses\": a pairwise project needs at least 2 responses, got {n}")));
                }
                let gold = row
                    .gold
                    .as_ref()
                    .map(|g| pairwise_gold(g, n))
                    .transpose()
                    .map_err(&err)?;
                for i in 0..n {
                    for j in i + 1..n {
                        let g = gold.as_ref().and_then(|g| match g {
                            PairGold::Index(k) if *k == i => Some(json!(0)),
                            PairGold::Index(k) if *k == j => Some(json!(1)),
                            PairGold::Index(_) => None,
                            PairGold::Tie => Some(json!("tie")),
                            PairGold::BothBad => Some(json!("both_bad")),
                        });
                        let id = if n == 2 {
                            base.clone()
                        } else {
                            format!("{base}#{i}-{j}")
                        };
                        items.push(NewItem {
                            external_id: id,
                            prompt: row.prompt.clone(),
                            responses: vec![row.responses[i].clone(), row.responses[j].clone()],
                            gold: g,
                        });
                    }
                }
            }
            TaskKind::Rating | TaskKind::Correction | TaskKind::Critique => {
                let n = row.responses.len();
                if n == 0 {
                    return Err(err(format!(
                        "field \"responses\": a {} project needs at least one response",
                        kind.as_str()
                    )));
                }
                let golds: Vec<Option<Value>> = match (&row.gold, kind) {
                    (None, _) => vec![None; n],
                    (Some(g), TaskKind::Rating) => rating_gold(g, n, criteria, likert_max).map_err(&err)?,
                    (Some(_), _) => return Err(err(format!("field \"gold\": gold answers apply to pairwise and rating projects, not {}", kind.as_str()))),
                };
                for (i, (resp, g)) in row.responses.iter().zip(golds).enumerate() {
                    let id = if n == 1 {
                        base.clone()
                    } else {
                        format!("{base}#{i}")
                    };
                    items.push(NewItem {
                        external_id: id,
                        prompt: row.prompt.clone(),
                        responses: vec![resp.clone()],
                        gold: g,
                    });
                }
            }
            TaskKind::Demonstration => {
                if row.gold.is_some() {
                    return Err(err(
                        "field \"gold\": demonstration projects have no gold answers".into(),
                    ));
                }
                items.push(NewItem {
                    external_id: base,
                    prompt: row.prompt.clone(),
                    responses: row.responses.clone(),
                    gold: None,
                });
            }
        }
    }
    Ok(items)
}

enum PairGold {
    Index(usize),
    Tie,
    BothBad,
}

fn pairwise_gold(g: &Value, n: usize) -> Result<PairGold, String> {
    match g {
        Value::Number(x) => match x.as_u64() {
            Some(k) if (k as usize) < n => Ok(PairGold::Index(k as usize)),
            _ => Err(format!(
                "field \"gold\": expected a response index 0..{}, got {x}",
                n - 1
            )),
        },
        Value::String(s) if s == "tie" => Ok(PairGold::Tie),
        Value::String(s) if s == "both_bad" => Ok(PairGold::BothBad),
        _ => Err(
            "field \"gold\": expected the index of the better response, \"tie\" or \"both_bad\""
                .into(),
        ),
    }
}

/// Rating gold: one `{criterion: score}` object (single response) or a list aligned with
/// the responses (null entries allowed).
fn rating_gold(
    g: &Value,
    n: usize,
    criteria: &[String],
    likert_max: i64,
) -> Result<Vec<Option<Value>>, String> {
    let check = |o: &Value| -> Result<Value, String> {
        let Value::Object(m) = o else {
            return Err("field \"gold\": expected {\"criterion\": score, ...}".into());
        };
        for (k, v) in m {
            if !criteria.contains(k) {
                return Err(format!(
                    "field \"gold\": unknown criterion {k:?} (project criteria: {})",
                    criteria.join(", ")
                ));
            }
            match v.as_i64() {
                Some(s) if (1..=likert_max).contains(&s) => {}
                _ => {
                    return Err(format!(
                        "field \"gold.{k}\": expected an integer score 1..{likert_max}"
                    ))
                }
            }
        }
        Ok(o.clone())
    };
    match g {
        Value::Array(list) if list.len() == n => list
            .iter()
            .map(|x| {
                if x.is_null() {
                    Ok(None)
                } else {
                    check(x).map(Some)
                }
            })
            .collect(),
        Value::Array(list) => Err(format!(
            "field \"gold\": {} entries for {n} responses",
            list.len()
        )),
        o if n == 1 => Ok(vec![Some(check(o)?)]),
        _ => Err("field \"gold\": with several responses give a list aligned with them".into()),
    }
}

/// Parses a reward-model scores file: `{"item_id": <id or external id>, "uncertainty": <number>}`.
pub fn parse_scores(src: &str, data: &str) -> Result<Vec<(String, f64, usize)>> {
    let mut out = Vec::new();
    for (i, raw) in data.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(raw)
            .map_err(|e| invalid(format!("{src}:{line}: invalid JSON: {e}")))?;
        let id = match v.get("item_id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                return Err(invalid(format!(
                    "{src}:{line}: field \"item_id\": expected a string or number"
                )))
            }
        };
        let u = v
            .get("uncertainty")
            .and_then(Value::as_f64)
            .filter(|u| u.is_finite())
            .ok_or_else(|| {
                invalid(format!(
                    "{src}:{line}: field \"uncertainty\": expected a finite number"
                ))
            })?;
        out.push((id, u, line));
    }
    Ok(out)
}

/// Settings for generating candidates with an OpenAI-compatible server.
#[derive(Debug, Clone)]
pub struct Generate {
    /// Base URL (`http://host:port`) or the full `/v1/completions` URL.
    pub url: String,
    pub model: String,
    pub n: usize,
    pub max_tokens: u32,
    pub temperature: f64,
    pub api_key: Option<String>,
}

impl Generate {
    fn endpoint(&self) -> String {
        let u = self.url.trim_end_matches('/');
        if u.ends_with("/v1/completions") {
            u.to_string()
        } else if u.ends_with("/v1") {
            format!("{u}/completions")
        } else {
            format!("{u}/v1/completions")
        }
    }

    /// Asks the endpoint for `n` completions of `prompt`.
    pub async fn complete(&self, client: &reqwest::Client, prompt: &str) -> Result<Vec<String>> {
        let url = self.endpoint();
        let body = json!({
            "model": self.model, "prompt": prompt, "n": self.n,
            "max_tokens": self.max_tokens, "temperature": self.temperature,
        });
        let mut req = client.post(&url).json(&body);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Error::Other(anyhow::anyhow!("{url}: request failed: {e}")))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| Error::Other(anyhow::anyhow!("{url}: reading response: {e}")))?;
        if !status.is_success() {
            return Err(invalid(format!(
                "{url}: HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            )));
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("{url}: response is not JSON: {e}")))?;
        let choices = v
            .get("choices")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(format!("{url}: response has no \"choices\" list")))?;
        let texts: Vec<String> = choices
            .iter()
            .map(|c| {
                c.get("text")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| invalid(format!("{url}: choices[].text missing")))
            })
            .collect::<Result<_>>()?;
        if texts.is_empty() {
            return Err(invalid(format!("{url}: returned no choices")));
        }
        Ok(texts)
    }

    /// Fills in candidates for rows that have none.
    pub async fn fill(&self, rows: &mut [Row]) -> Result<usize> {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|e| Error::Other(e.into()))?;
        let mut generated = 0;
        for row in rows.iter_mut().filter(|r| r.responses.is_empty()) {
            row.responses = self.complete(&client, &row.prompt).await?;
            generated += 1;
        }
        Ok(generated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let data = r#"{"prompt": "p1", "responses": ["a", "b", "c"], "id": 7, "gold": 2}
{"prompt": "p2", "chosen": "good", "rejected": "bad"}

{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go away"}]}
{"prompt": "p4", "completion": "c4", "label": true}
{"prompt": "p5"}"#;
        let rows = parse_jsonl("in.jsonl", data).unwrap();
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[0].id.as_deref(), Some("7"));
        assert_eq!(rows[1].responses, vec!["good", "bad"]);
        assert_eq!(rows[2].prompt, "hi");
        assert_eq!(rows[2].line, 4);
        assert_eq!(rows[2].responses, vec!["hello", "go away"]);
        assert_eq!(rows[3].responses, vec!["c4"]);
        assert!(rows[4].responses.is_empty());

        let crit = vec!["helpful".to_string()];
        let pw = expand("in.jsonl", &rows[..3], TaskKind::Pairwise, &crit, 5).unwrap();
        // 3 pairs from the first row + 1 + 1
        assert_eq!(pw.len(), 5);
        assert_eq!(pw[0].external_id, "7#0-1");
        assert_eq!(pw[0].gold, None);
        assert_eq!(pw[1].external_id, "7#0-2");
        assert_eq!(pw[1].gold, Some(json!(1)));
        assert_eq!(pw[2].gold, Some(json!(1)));
        let err = expand("in.jsonl", &rows[3..4], TaskKind::Pairwise, &crit, 5)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "in.jsonl:5: field \"responses\": a pairwise project needs at least 2 responses, got 1"
        );
        let demo = expand("in.jsonl", &rows[4..], TaskKind::Demonstration, &crit, 5).unwrap();
        assert_eq!(demo.len(), 1);
        // Same content → same id, so re-imports are deduplicated.
        let again = expand(
            "x",
            &parse_jsonl("x", r#"{"prompt": "p5"}"#).unwrap(),
            TaskKind::Demonstration,
            &crit,
            5,
        )
        .unwrap();
        assert_eq!(again[0].external_id, demo[0].external_id);
    }

    #[test]
    fn errors_name_file_line_field() {
        let e = |d: &str| parse_jsonl("data/f.jsonl", d).unwrap_err().to_string();
        assert_eq!(
            e("{\"prompt\": 3}"),
            "data/f.jsonl:1: field \"prompt\": expected a string or a list of messages"
        );
        assert!(e("\n{oops").starts_with("data/f.jsonl:2: invalid JSON"));
        assert_eq!(
            e("{\"prompt\": \"p\", \"chosen\": \"c\"}"),
            "data/f.jsonl:1: field \"rejected\": missing"
        );
        assert_eq!(e("[1]"), "data/f.jsonl:1: expected a JSON object");
        let rows = parse_jsonl(
            "g",
            r#"{"prompt": "p", "responses": ["a"], "gold": {"helpful": 9}}"#,
        )
        .unwrap();
        let err = expand("g", &rows, TaskKind::Rating, &["helpful".into()], 5)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "g:1: field \"gold.helpful\": expected an integer score 1..5"
        );
        let s = parse_scores(
            "s.jsonl",
            "{\"item_id\": 1, \"uncertainty\": 0.5}\n{\"item_id\": \"x\"}",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            s,
            "s.jsonl:2: field \"uncertainty\": expected a finite number"
        );
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let bytes = b"{\"prompt\": \"ok\"}\n{\"prompt\": \"caf\xe9\"}\n".to_vec();
        let e = decode_utf8("in.jsonl", bytes).unwrap_err().to_string();
        assert_eq!(
            e,
            "in.jsonl:2: invalid UTF-8 at byte 16 of the line (save the file as UTF-8)"
        );
        assert_eq!(decode_utf8("x", "é\n".as_bytes().to_vec()).unwrap(), "é\n");
    }

    #[test]
    fn a_reused_id_with_other_content_names_both_lines() {
        let crit = vec!["helpful".to_string()];
        let data = "{\"id\": \"q1\", \"prompt\": \"p\", \"responses\": [\"a\", \"b\"]}\n\
                    {\"id\": \"q2\", \"prompt\": \"p2\", \"responses\": [\"a\", \"b\"]}\n\
                    {\"id\": \"q1\", \"prompt\": \"p\", \"responses\": [\"a\", \"b\"]}\n\
                    {\"id\": \"q1\", \"prompt\": \"p\", \"responses\": [\"a\", \"c\"]}\n";
        let rows = parse_jsonl("d.jsonl", data).unwrap();
        // Line 3 repeats line 1 exactly: skipped. Line 4 differs: refused.
        assert_eq!(
            expand("d.jsonl", &rows[..3], TaskKind::Pairwise, &crit, 5)
                .unwrap()
                .len(),
            2
        );
        let e = expand("d.jsonl", &rows, TaskKind::Pairwise, &crit, 5)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "d.jsonl:4: field \"id\": \"q1\" is already used on line 1 by a row with different content; ids must be unique");
    }
}
