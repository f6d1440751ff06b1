//! TRL's dataset formats, defined once: detection from a row's keys, per-row validation into typed records,
//! conversions between formats, and writing records back as JSON (same field names as TRL).
//!
//! | format              | fields                                                  |
//! |---------------------|---------------------------------------------------------|
//! | language_modeling   | `text`                                                  |
//! | conversational      | `messages`                                              |
//! | prompt_only         | `prompt`                                                |
//! | prompt_completion   | `prompt`, `completion`                                  |
//! | preference          | `prompt`, `chosen`, `rejected` (+ optional `margin`)    |
//! | implicit_preference | `chosen`, `rejected`                                    |
//! | unpaired            | `prompt`, `completion`, `label` (KTO)                   |
//! | rating              | `prompt`, `completion`, `score` (+ `score_min`/`score_max`) |
//! | correction          | `prompt`, `completion`, `corrected`                     |
//!
//! Text fields hold either a string or a list of `{role, content}` messages ("conversational"); within one row
//! they must all be of the same kind. Keys that are not part of the format are kept as `extra` columns.

use std::fmt;

use serde_json::{Map, Value};

use crate::error::{DataError, Position, Result};

/// One chat message. Keys other than `role`/`content` (e.g. `name`) are kept so templates can see them.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
    pub extra: Map<String, Value>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            extra: Map::new(),
        }
    }

    pub fn to_json(&self) -> Value {
        let mut obj = Map::new();
        obj.insert("role".into(), Value::String(self.role.clone()));
        obj.insert("content".into(), Value::String(self.content.clone()));
        obj.extend(self.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        Value::Object(obj)
    }
}

/// A text field: a plain string, or a conversation (list of messages).
#[derive(Debug, Clone, PartialEq)]
pub enum Text {
    Plain(String),
    Messages(Vec<Message>),
}

impl Text {
    pub fn is_conversational(&self) -> bool {
        matches!(self, Text::Messages(_))
    }

    pub fn as_plain(&self) -> Option<&str> {
        match self {
            Text::Plain(s) => Some(s),
            Text::Messages(_) => None,
        }
    }

    pub fn as_messages(&self) -> Option<&[Message]> {
        match self {
            Text::Plain(_) => None,
            Text::Messages(m) => Some(m),
        }
    }

    /// Bytes of text: the string, or the sum of the messages' contents.
    pub fn byte_len(&self) -> usize {
        match self {
            Text::Plain(s) => s.len(),
            Text::Messages(ms) => messages_bytes(ms),
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            Text::Plain(s) => Value::String(s.clone()),
            Text::Messages(ms) => Value::Array(ms.iter().map(Message::to_json).collect()),
        }
    }
}

fn messages_bytes(ms: &[Message]) -> usize {
    ms.iter().map(|m| m.content.len()).sum()
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Text::Plain(s.to_string())
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text::Plain(s)
    }
}

impl From<Vec<Message>> for Text {
    fn from(m: Vec<Message>) -> Self {
        Text::Messages(m)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    LanguageModeling,
    Conversational,
    PromptOnly,
    PromptCompletion,
    Preference,
    ImplicitPreference,
    Unpaired,
    Rating,
    Correction,
}

impl Format {
    pub const ALL: [Format; 9] = [
        Format::LanguageModeling,
        Format::Conversational,
        Format::PromptOnly,
        Format::PromptCompletion,
        Format::Preference,
        Format::ImplicitPreference,
        Format::Unpaired,
        Format::Rating,
        Format::Correction,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::LanguageModeling => "language_modeling",
            Format::Conversational => "conversational",
            Format::PromptOnly => "prompt_only",
            Format::PromptCompletion => "prompt_completion",
            Format::Preference => "preference",
            Format::ImplicitPreference => "implicit_preference",
            Format::Unpaired => "unpaired",
            Format::Rating => "rating",
            Format::Correction => "correction",
        }
    }

    /// Fields every row of this format must have, in the order they are written.
    pub fn required_fields(self) -> &'static [&'static str] {
        match self {
            Format::LanguageModeling => &["text"],
            Format::Conversational => &["messages"],
            Format::PromptOnly => &["prompt"],
            Format::PromptCompletion => &["prompt", "completion"],
            Format::Preference => &["prompt", "chosen", "rejected"],
            Format::ImplicitPreference => &["chosen", "rejected"],
            Format::Unpaired => &["prompt", "completion", "label"],
            Format::Rating => &["prompt", "completion", "score"],
            Format::Correction => &["prompt", "completion", "corrected"],
        }
    }

    /// Fields a row of this format may have; they belong to the record, not to the extra columns.
    pub fn optional_fields(self) -> &'static [&'static str] {
        match self {
            Format::Preference => &["margin"],
            Format::Rating => &["score_min", "score_max"],
            _ => &[],
        }
    }

    /// The format a row with these keys is in. The most specific marker key wins (`chosen`/`rejected`, then
    /// `label`, `score`, `corrected`, `completion`, `messages`, `text`, `prompt`), so a row that lacks a field
    /// its marker needs is reported as a missing field rather than as another format. None: no marker at all.
    pub fn detect(has: impl Fn(&str) -> bool) -> Option<Format> {
        let format = if has("chosen") || has("rejected") {
            if has("prompt") {
                Format::Preference
            } else {
                Format::ImplicitPreference
            }
        } else if has("label") {
            Format::Unpaired
        } else if has("score") {
            Format::Rating
        } else if has("corrected") {
            Format::Correction
        } else if has("completion") {
            Format::PromptCompletion
        } else if has("messages") {
            Format::Conversational
        } else if has("text") {
            Format::LanguageModeling
        } else if has("prompt") {
            Format::PromptOnly
        } else {
            return None;
        };
        Some(format)
    }

    /// `text | messages | prompt | prompt+completion | ...`: the key sets, for "unknown format" messages.
    pub fn all_key_sets() -> String {
        Format::ALL
            .iter()
            .map(|f| f.required_fields().join("+"))
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LanguageModeling {
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Conversational {
    pub messages: Vec<Message>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptOnly {
    pub prompt: Text,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptCompletion {
    pub prompt: Text,
    pub completion: Text,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Preference {
    pub prompt: Text,
    pub chosen: Text,
    pub rejected: Text,
    /// How much better `chosen` is (TRL's RewardTrainer `margin` column).
    pub margin: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImplicitPreference {
    pub chosen: Text,
    pub rejected: Text,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Unpaired {
    pub prompt: Text,
    pub completion: Text,
    /// true: desirable completion (KTO).
    pub label: bool,
}

/// Inclusive range a rating's score must lie in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreScale {
    pub min: f64,
    pub max: f64,
}

impl ScoreScale {
    pub fn contains(&self, score: f64) -> bool {
        self.min <= score && score <= self.max
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rating {
    pub prompt: Text,
    pub completion: Text,
    pub score: f64,
    /// Scale declared on the row itself (`score_min`/`score_max`); None when the dataset-level scale applies.
    pub scale: Option<ScoreScale>,
}

/// An annotator's edit of a completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Correction {
    pub prompt: Text,
    pub completion: Text,
    pub corrected: Text,
}

impl ImplicitPreference {
    /// Splits off the shared prompt exactly as TRL's `extract_prompt`: the prompt is the longest common prefix
    /// (of messages, or of characters), except that a space right before the divergence goes to the
    /// completions, and when one side is a prefix of the other the last shared element is left to the
    /// completions too (TRL's loop variable stops at `min_len - 1`). Errors when both sides are empty.
    pub fn to_explicit(&self) -> std::result::Result<Preference, String> {
        fn split<T: PartialEq + Clone>(
            c: &[T],
            r: &[T],
            is_space: impl Fn(&T) -> bool,
        ) -> Option<usize> {
            let n = c.len().min(r.len());
            if n == 0 {
                return None;
            }
            // TRL's loop variable ends at `n - 1` when no element differs.
            let mut idx = n - 1;
            for i in 0..n {
                if c[i] != r[i] {
                    // (TRL also reads `chosen[-1]` when the sides differ at 0; a prompt is empty then anyway.)
                    idx = if i > 0 && is_space(&c[i - 1]) {
                        i - 1
                    } else {
                        i
                    };
                    break;
                }
            }
            Some(idx)
        }
        let empty = || "cannot extract a prompt: \"chosen\" or \"rejected\" is empty".to_string();
        match (&self.chosen, &self.rejected) {
            (Text::Plain(c), Text::Plain(r)) => {
                let cc: Vec<char> = c.chars().collect();
                let rc: Vec<char> = r.chars().collect();
                let idx = split(&cc, &rc, |ch| *ch == ' ').ok_or_else(empty)?;
                let s = |v: &[char]| v.iter().collect::<String>();
                Ok(Preference {
                    prompt: Text::Plain(s(&cc[..idx])),
                    chosen: Text::Plain(s(&cc[idx..])),
                    rejected: Text::Plain(s(&rc[idx..])),
                    margin: None,
                })
            }
            (Text::Messages(c), Text::Messages(r)) => {
                let idx = split(c, r, |_| false).ok_or_else(empty)?;
                Ok(Preference {
                    prompt: Text::Messages(c[..idx].to_vec()),
                    chosen: Text::Messages(c[idx..].to_vec()),
                    rejected: Text::Messages(r[idx..].to_vec()),
                    margin: None,
                })
            }
            _ => Err(
                "\"chosen\" and \"rejected\" must both be strings or both be message lists".into(),
            ),
        }
    }
}

impl Correction {
    /// The annotator's edit is preferred over the original completion.
    pub fn to_preference(&self) -> Preference {
        Preference {
            prompt: self.prompt.clone(),
            chosen: self.corrected.clone(),
            rejected: self.completion.clone(),
            margin: None,
        }
    }

    /// The edit as a supervised demonstration.
    pub fn to_demonstration(&self) -> PromptCompletion {
        PromptCompletion {
            prompt: self.prompt.clone(),
            completion: self.corrected.clone(),
        }
    }
}

impl Rating {
    /// Checks the score against the row's own scale, else `default`; a rating needs some declared scale.
    pub fn check_scale(&self, default: Option<ScoreScale>) -> std::result::Result<(), String> {
        let scale = self.scale.or(default).ok_or_else(|| {
            "no score scale declared: add \"score_min\"/\"score_max\" to the row or set the dataset's score scale"
                .to_string()
        })?;
        if !self.score.is_finite() || !scale.contains(self.score) {
            return Err(format!(
                "score {} is outside the scale [{}, {}]",
                self.score, scale.min, scale.max
            ));
        }
        Ok(())
    }
}

/// A validated row in one of the formats.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    LanguageModeling(LanguageModeling),
    Conversational(Conversational),
    PromptOnly(PromptOnly),
    PromptCompletion(PromptCompletion),
    Preference(Preference),
    ImplicitPreference(ImplicitPreference),
    Unpaired(Unpaired),
    Rating(Rating),
    Correction(Correction),
}

impl Record {
    pub fn format(&self) -> Format {
        match self {
            Record::LanguageModeling(_) => Format::LanguageModeling,
            Record::Conversational(_) => Format::Conversational,
            Record::PromptOnly(_) => Format::PromptOnly,
            Record::PromptCompletion(_) => Format::PromptCompletion,
            Record::Preference(_) => Format::Preference,
            Record::ImplicitPreference(_) => Format::ImplicitPreference,
            Record::Unpaired(_) => Format::Unpaired,
            Record::Rating(_) => Format::Rating,
            Record::Correction(_) => Format::Correction,
        }
    }

    /// Whether the text fields are message lists (`conversational` is always, `language_modeling` never).
    pub fn is_conversational(&self) -> bool {
        match self {
            Record::LanguageModeling(_) => false,
            Record::Conversational(_) => true,
            Record::PromptOnly(r) => r.prompt.is_conversational(),
            Record::PromptCompletion(r) => r.prompt.is_conversational(),
            Record::Preference(r) => r.chosen.is_conversational(),
            Record::ImplicitPreference(r) => r.chosen.is_conversational(),
            Record::Unpaired(r) => r.prompt.is_conversational(),
            Record::Rating(r) => r.prompt.is_conversational(),
            Record::Correction(r) => r.prompt.is_conversational(),
        }
    }

    /// The record's own fields as JSON, in TRL's field order (extra columns are the row's business).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        match self {
            Record::LanguageModeling(r) => put("text", Value::String(r.text.clone())),
            Record::Conversational(r) => {
                put("messages", Text::Messages(r.messages.clone()).to_json())
            }
            Record::PromptOnly(r) => put("prompt", r.prompt.to_json()),
            Record::PromptCompletion(r) => {
                put("prompt", r.prompt.to_json());
                put("completion", r.completion.to_json());
            }
            Record::Preference(r) => {
                put("prompt", r.prompt.to_json());
                put("chosen", r.chosen.to_json());
                put("rejected", r.rejected.to_json());
                if let Some(margin) = r.margin {
                    put("margin", number(margin));
                }
            }
            Record::ImplicitPreference(r) => {
                put("chosen", r.chosen.to_json());
                put("rejected", r.rejected.to_json());
            }
            Record::Unpaired(r) => {
                put("prompt", r.prompt.to_json());
                put("completion", r.completion.to_json());
                put("label", Value::Bool(r.label));
            }
            Record::Rating(r) => {
                put("prompt", r.prompt.to_json());
                put("completion", r.completion.to_json());
                put("score", number(r.score));
                if let Some(scale) = r.scale {
                    put("score_min", number(scale.min));
                    put("score_max", number(scale.max));
                }
            }
            Record::Correction(r) => {
                put("prompt", r.prompt.to_json());
                put("completion", r.completion.to_json());
                put("corrected", r.corrected.to_json());
            }
        }
        m
    }

    /// As a preference pair, for formats that carry one (preference, implicit preference, correction).
    pub fn to_preference(&self) -> Option<std::result::Result<Preference, String>> {
        match self {
            Record::Preference(p) => Some(Ok(p.clone())),
            Record::ImplicitPreference(p) => Some(p.to_explicit()),
            Record::Correction(c) => Some(Ok(c.to_preference())),
            _ => None,
        }
    }

    /// Each text field with its size in bytes (message lists: the sum of their contents), for bounding what
    /// one row may cost before it is tokenized.
    pub fn text_fields(&self) -> Vec<(&'static str, usize)> {
        match self {
            Record::LanguageModeling(r) => vec![("text", r.text.len())],
            Record::Conversational(r) => vec![("messages", messages_bytes(&r.messages))],
            Record::PromptOnly(r) => vec![("prompt", r.prompt.byte_len())],
            Record::PromptCompletion(r) => vec![
                ("prompt", r.prompt.byte_len()),
                ("completion", r.completion.byte_len()),
            ],
            Record::Preference(r) => vec![
                ("prompt", r.prompt.byte_len()),
                ("chosen", r.chosen.byte_len()),
                ("rejected", r.rejected.byte_len()),
            ],
            Record::ImplicitPreference(r) => vec![
                ("chosen", r.chosen.byte_len()),
                ("rejected", r.rejected.byte_len()),
            ],
            Record::Unpaired(r) => vec![
                ("prompt", r.prompt.byte_len()),
                ("completion", r.completion.byte_len()),
            ],
            Record::Rating(r) => vec![
                ("prompt", r.prompt.byte_len()),
                ("completion", r.completion.byte_len()),
            ],
            Record::Correction(r) => vec![
                ("prompt", r.prompt.byte_len()),
                ("completion", r.completion.byte_len()),
                ("corrected", r.corrected.byte_len()),
            ],
        }
    }

    /// The prompt, for formats that have one (what online RL samples completions for).
    pub fn prompt(&self) -> Option<&Text> {
        match self {
            Record::PromptOnly(r) => Some(&r.prompt),
            Record::PromptCompletion(r) => Some(&r.prompt),
            Record::Preference(r) => Some(&r.prompt),
            Record::Unpaired(r) => Some(&r.prompt),
            Record::Rating(r) => Some(&r.prompt),
            Record::Correction(r) => Some(&r.prompt),
            Record::LanguageModeling(_)
            | Record::Conversational(_)
            | Record::ImplicitPreference(_) => None,
        }
    }
}

/// Integral floats are written as integers (`3`, not `3.0`), like Python's json for ints read from the data.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        serde_json::Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

/// Dataset-wide options for reading rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    /// Scale for `rating` rows that do not declare `score_min`/`score_max` themselves.
    pub score_scale: Option<ScoreScale>,
}

/// One row of a dataset: the record, the columns outside the format (provenance, ids, answers...), and where
/// it came from (for error messages in later stages, e.g. tokenization).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub record: Record,
    pub extra: Map<String, Value>,
    pub position: Option<Position>,
}

impl Row {
    pub fn new(record: Record) -> Self {
        Row {
            record,
            extra: Map::new(),
            position: None,
        }
    }

    pub fn with_extra(mut self, key: impl Into<String>, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }

    /// The record's fields followed by the extra columns.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = self.record.to_json();
        for (k, v) in &self.extra {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
        m
    }

    /// Validates one JSON object (a JSONL line or a converted Parquet row). `file`/`position` only label errors.
    pub fn from_json(
        obj: Map<String, Value>,
        file: &str,
        position: Option<Position>,
        options: &LoadOptions,
    ) -> Result<Row> {
        RowParser {
            file,
            position,
            obj,
            conversational: None,
        }
        .parse(options)
    }
}

/// Type of a JSON value, as an error message says it.
pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

struct RowParser<'a> {
    file: &'a str,
    position: Option<Position>,
    obj: Map<String, Value>,
    /// Kind of the first text field read: (field, conversational); later text fields must match it.
    conversational: Option<(&'static str, bool)>,
}

/// Message roles chat templates know (OpenAI's and TRL's names); anything else is most likely a typo
/// that a template would silently drop or render wrongly.
const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

const TEXT_EXPECTED: &str = "expected a string or a list of {role, content} messages";

impl<'a> RowParser<'a> {
    fn err(&self, field: Option<&str>, message: impl Into<String>) -> DataError {
        let mut e = DataError::new(self.file, message);
        e.position = self.position;
        e.field = field.map(str::to_string);
        e
    }

    fn parse(mut self, options: &LoadOptions) -> Result<Row> {
        let format = Format::detect(|k| self.obj.contains_key(k)).ok_or_else(|| {
            let keys: Vec<String> = self.obj.keys().map(|k| format!("{k:?}")).collect();
            self.err(
                None,
                format!(
                    "unknown dataset format: keys [{}] match none of {}",
                    keys.join(", "),
                    Format::all_key_sets()
                ),
            )
        })?;
        for field in format.required_fields() {
            if !self.obj.contains_key(*field) {
                let needed: Vec<String> = format
                    .required_fields()
                    .iter()
                    .map(|f| format!("{f:?}"))
                    .collect();
                return Err(self.err(
                    Some(field),
                    format!(
                        "missing (a {} row needs {})",
                        format.name(),
                        needed.join(", ")
                    ),
                ));
            }
        }
        let record = match format {
            Format::LanguageModeling => {
                let text = self.string("text")?;
                Record::LanguageModeling(LanguageModeling { text })
            }
            Format::Conversational => {
                let v = self.take("messages");
                let messages = self.messages("messages", v)?;
                Record::Conversational(Conversational { messages })
            }
            Format::PromptOnly => Record::PromptOnly(PromptOnly {
                prompt: self.text("prompt")?,
            }),
            Format::PromptCompletion => Record::PromptCompletion(PromptCompletion {
                prompt: self.text("prompt")?,
                completion: self.text("completion")?,
            }),
            Format::Preference => Record::Preference(Preference {
                prompt: self.text("prompt")?,
                chosen: self.text("chosen")?,
                rejected: self.text("rejected")?,
                margin: self.optional_number("margin")?,
            }),
            Format::ImplicitPreference => Record::ImplicitPreference(ImplicitPreference {
                chosen: self.text("chosen")?,
                rejected: self.text("rejected")?,
            }),
            Format::Unpaired => Record::Unpaired(Unpaired {
                prompt: self.text("prompt")?,
                completion: self.text("completion")?,
                label: self.boolean("label")?,
            }),
            Format::Rating => {
                let prompt = self.text("prompt")?;
                let completion = self.text("completion")?;
                let score = self.number("score")?;
                let scale = match (
                    self.optional_number("score_min")?,
                    self.optional_number("score_max")?,
                ) {
                    (Some(min), Some(max)) if min < max => Some(ScoreScale { min, max }),
                    // An empty scale would normalise every score to 0/0 = NaN.
                    (Some(min), Some(max)) => {
                        return Err(self.err(
                            Some("score_min"),
                            format!("score_min {min} must be less than score_max {max}"),
                        ))
                    }
                    (None, None) => None,
                    (Some(_), None) => {
                        return Err(self.err(Some("score_max"), "missing (score_min is set)"))
                    }
                    (None, Some(_)) => {
                        return Err(self.err(Some("score_min"), "missing (score_max is set)"))
                    }
                };
                let rating = Rating {
                    prompt,
                    completion,
                    score,
                    scale,
                };
                rating
                    .check_scale(options.score_scale)
                    .map_err(|m| self.err(Some("score"), m))?;
                Record::Rating(rating)
            }
            Format::Correction => Record::Correction(Correction {
                prompt: self.text("prompt")?,
                completion: self.text("completion")?,
                corrected: self.text("corrected")?,
            }),
        };
        Ok(Row {
            record,
            extra: self.obj,
            position: self.position,
        })
    }

    fn take(&mut self, field: &str) -> Value {
        self.obj.shift_remove(field).unwrap_or(Value::Null)
    }

    fn string(&mut self, field: &'static str) -> Result<String> {
        match self.take(field) {
            Value::String(s) => Ok(s),
            other => Err(self.err(
                Some(field),
                format!("expected a string, got {}", json_type(&other)),
            )),
        }
    }

    fn text(&mut self, field: &'static str) -> Result<Text> {
        let text = match self.take(field) {
            Value::String(s) => Text::Plain(s),
            v @ Value::Array(_) => Text::Messages(self.messages(field, v)?),
            other => {
                return Err(self.err(
                    Some(field),
                    format!("{TEXT_EXPECTED}, got {}", json_type(&other)),
                ))
            }
        };
        let conv = text.is_conversational();
        match self.conversational {
            None => self.conversational = Some((field, conv)),
            Some((first, first_conv)) if first_conv != conv => {
                let (want, got) = if first_conv {
                    ("a list of messages", "a string")
                } else {
                    ("a string", "a list")
                };
                return Err(self.err(
                    Some(field),
                    format!("expected {want} like field \"{first}\" (all text fields of a row must agree), got {got}"),
                ));
            }
            Some(_) => {}
        }
        Ok(text)
    }

    fn messages(&self, field: &str, v: Value) -> Result<Vec<Message>> {
        let Value::Array(items) = v else {
            return Err(self.err(
                Some(field),
                format!(
                    "expected a list of {{role, content}} messages, got {}",
                    json_type(&v)
                ),
            ));
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let at = format!("{field}[{i}]");
                let Value::Object(mut m) = item else {
                    return Err(self.err(
                        Some(&at),
                        format!(
                            "expected a {{role, content}} message object, got {}",
                            json_type(&item)
                        ),
                    ));
                };
                let mut get = |key: &str| match m.shift_remove(key) {
                    Some(Value::String(s)) => Ok(s),
                    Some(other) => Err(self.err(
                        Some(&format!("{at}.{key}")),
                        format!("expected a string, got {}", json_type(&other)),
                    )),
                    None => Err(self.err(Some(&format!("{at}.{key}")), "missing")),
                };
                let role = get("role")?;
                if !ROLES.contains(&role.as_str()) {
                    return Err(self.err(
                        Some(&format!("{at}.role")),
                        format!(
                            "unknown role \"{role}\" (expected one of {})",
                            ROLES.join(", ")
                        ),
                    ));
                }
                let content = get("content")?;
                Ok(Message {
                    role,
                    content,
                    extra: m,
                })
            })
            .collect()
    }

    fn number(&mut self, field: &'static str) -> Result<f64> {
        match self.take(field) {
            Value::Number(n) => Ok(n.as_f64().expect("serde_json numbers convert to f64")),
            other => Err(self.err(
                Some(field),
                format!("expected a number, got {}", json_type(&other)),
            )),
        }
    }

    /// Absent and null both mean "not given".
    fn optional_number(&mut self, field: &'static str) -> Result<Option<f64>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => {
                self.obj.shift_remove(field);
                Ok(None)
            }
            Some(_) => self.number(field).map(Some),
        }
    }

    fn boolean(&mut self, field: &'static str) -> Result<bool> {
        match self.take(field) {
            Value::Bool(b) => Ok(b),
            other => Err(self.err(
                Some(field),
                format!("expected a boolean (true/false), got {}", json_type(&other)),
            )),
        }
    }
}
