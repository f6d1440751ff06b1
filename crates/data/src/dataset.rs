//! A validated dataset: rows all in one format, loaded from JSONL or Parquet by extension.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{DataError, Position, Result};
use crate::formats::{Format, LoadOptions, Preference, Record, Row, Text};
use crate::tokenizer::Tokenizer;
use crate::{jsonl, parquet};

#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The file it was read from (labels errors of later stages).
    pub source: String,
    pub format: Format,
    /// Text fields are message lists.
    pub conversational: bool,
    pub rows: Vec<Row>,
}

/// Loads a dataset with default options (see [`load_dataset_with`]).
pub fn load_dataset(path: impl AsRef<Path>) -> Result<Dataset> {
    load_dataset_with(path, &LoadOptions::default())
}

/// Reads `*.jsonl` (JSON Lines), `*.json` (JSON Lines, or one JSON array of objects) or `*.parquet`, validates
/// every row and checks that all rows share one format.
pub fn load_dataset_with(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Dataset> {
    let path = path.as_ref();
    let source = path.display().to_string();
    if path.is_dir() {
        return Err(DataError::new(
            source,
            "is a directory, not a data file (expected a .jsonl, .json or .parquet file)",
        ));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let objects: Vec<(Position, Map<String, Value>)> = match ext.as_str() {
        "jsonl" | "json" => {
            let bytes = std::fs::read(path)
                .map_err(|e| DataError::in_file(path, format!("cannot read: {e}")))?;
            let is_array =
                ext == "json" && bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
            if is_array {
                let items = jsonl::parse_array(&source, &bytes)?;
                items
                    .into_iter()
                    .map(|(i, obj)| (Position::Element(i), obj))
                    .collect()
            } else {
                // A pretty-printed JSON array saved as .jsonl fails on its first line with a parser
                // message; say what the file is instead.
                // (A one-line list is an ordinary bad row, reported with its line.)
                let first_line = String::from_utf8_lossy(&bytes);
                let first_line = first_line
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                if first_line.trim_start().starts_with('[')
                    && serde_json::from_str::<Value>(first_line).is_err()
                {
                    return Err(DataError::new(
                        source,
                        "this is a JSON array, not JSON Lines: name it .json (or write one object per line)",
                    ));
                }
                let lines = jsonl::parse_objects(&source, &bytes)?;
                lines
                    .into_iter()
                    .map(|(line, obj)| (Position::Line(line), obj))
                    .collect()
            }
        }
        "parquet" => parquet::read_objects(path)?
            .into_iter()
            .map(|(row, obj)| (Position::Row(row), obj))
            .collect(),
        _ => {
            return Err(DataError::new(
                source,
                format!("unsupported file extension {ext:?}: expected .jsonl, .json or .parquet"),
            ))
        }
    };
    Dataset::from_objects(source, objects, options)
}

fn describe(format: Format, conversational: bool) -> String {
    let inherent = matches!(format, Format::Conversational | Format::LanguageModeling);
    if conversational && !inherent {
        format!("{format} (conversational)")
    } else {
        format.to_string()
    }
}

fn position_words(p: Option<Position>) -> String {
    match p {
        Some(Position::Line(n)) => format!("line {n}"),
        Some(Position::Row(n)) => format!("row {n}"),
        Some(Position::Element(n)) => format!("element {n}"),
        None => "the first row".into(),
    }
}

impl Dataset {
    /// Validates JSON objects (from any reader) into a dataset.
    pub fn from_objects(
        source: impl Into<String>,
        objects: Vec<(Position, Map<String, Value>)>,
        options: &LoadOptions,
    ) -> Result<Dataset> {
        let source = source.into();
        let rows = objects
            .into_iter()
            .map(|(pos, obj)| Row::from_json(obj, &source, Some(pos), options))
            .collect::<Result<Vec<_>>>()?;
        Dataset::from_rows(source, rows)
    }

    /// A dataset from JSONL bytes already in memory (e.g. an upload); `source` labels errors.
    pub fn parse_jsonl(
        source: impl Into<String>,
        bytes: &[u8],
        options: &LoadOptions,
    ) -> Result<Dataset> {
        let source = source.into();
        let lines = jsonl::parse_objects(&source, bytes)?;
        let objects = lines
            .into_iter()
            .map(|(line, obj)| (Position::Line(line), obj))
            .collect();
        Dataset::from_objects(source, objects, options)
    }

    /// A dataset of rows built in memory (e.g. the feedback app's records); checks they share one format.
    pub fn from_rows(source: impl Into<String>, rows: Vec<Row>) -> Result<Dataset> {
        let source = source.into();
        let first = rows
            .first()
            .ok_or_else(|| DataError::new(&source, "empty dataset (no rows)"))?;
        let (format, conversational) = (first.record.format(), first.record.is_conversational());
        for row in &rows[1..] {
            let (f, c) = (row.record.format(), row.record.is_conversational());
            if (f, c) != (format, conversational) {
                let mut e = DataError::new(
                    &source,
                    format!(
                        "mixed formats: this row is {} but {} is {}",
                        describe(f, c),
                        position_words(first.position),
                        describe(format, conversational)
                    ),
                );
                e.position = row.position;
                return Err(e);
            }
        }
        Ok(Dataset {
            source,
            format,
            conversational,
            rows,
        })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// An error about one row of this dataset (for later stages: conversion, tokenization).
    pub fn row_error(
        &self,
        row: &Row,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> DataError {
        let mut e = DataError::new(&self.source, message);
        e.position = row.position;
        e.field = field.map(str::to_string);
        e
    }

    /// Refuses a row with a text field longer than `max_tokens` tokens can be (see
    /// [`Tokenizer::max_token_bytes`]) before anything is tokenized: tokenizing a multi-megabyte field costs
    /// gigabytes, and all but its first `max_tokens` tokens would be cut anyway. `limit` names the bound for
    /// the message (e.g. `max_length`); `only`: check just these fields (empty: every text field).
    pub fn check_text_size(
        &self,
        tokenizer: &Tokenizer,
        max_tokens: usize,
        limit: &str,
        only: &[&str],
    ) -> Result<()> {
        let per_token = tokenizer.max_token_bytes();
        let max_bytes = max_tokens.saturating_mul(per_token);
        for row in &self.rows {
            let checked = |f: &str| only.is_empty() || only.contains(&f);
            let too_long = row
                .record
                .text_fields()
                .into_iter()
                .find(|&(f, n)| checked(f) && n > max_bytes);
            if let Some((field, n)) = too_long {
                return Err(self.row_error(
                    row,
                    Some(field),
                    format!(
                        "{n} bytes of text cannot fit in {max_tokens} tokens ({limit}; no token of this tokenizer \
                         is longer than {per_token} bytes, so at most {max_bytes} bytes fit): shorten or split the row"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Fails unless the dataset is in one of `formats`; `purpose` says what it was meant for.
    pub fn require(&self, formats: &[Format], purpose: &str) -> Result<()> {
        if formats.contains(&self.format) {
            return Ok(());
        }
        let names: Vec<&str> = formats.iter().map(|f| f.name()).collect();
        Err(DataError::new(
            &self.source,
            format!(
                "{purpose} needs a dataset in format {}, but this one is {}",
                names.join(" | "),
                self.format
            ),
        ))
    }

    /// Explicit preference pairs, for reward modelling and DPO: `preference` rows as they are, `implicit_preference`
    /// rows with their shared prompt split off, `correction` rows as corrected ≻ completion.
    pub fn preference_pairs(&self) -> Result<Vec<Preference>> {
        self.require(
            &[
                Format::Preference,
                Format::ImplicitPreference,
                Format::Correction,
            ],
            "preference training",
        )?;
        self.rows
            .iter()
            .map(|row| {
                row.record
                    .to_preference()
                    .expect("format checked above")
                    .map_err(|m| self.row_error(row, None, m))
            })
            .collect()
    }

    /// The prompt of every row, for online RL (any format that has a `prompt` field).
    pub fn prompts(&self) -> Result<Vec<&Text>> {
        if self.rows[0].record.prompt().is_none() {
            return Err(DataError::new(
                &self.source,
                format!(
                    "online RL needs a \"prompt\" field, but a {} dataset has none",
                    self.format
                ),
            ));
        }
        Ok(self
            .rows
            .iter()
            .map(|r| r.record.prompt().expect("all rows share the format"))
            .collect())
    }

    /// Writes the rows back as JSONL (TRL field names, then the extra columns).
    pub fn write_jsonl(&self, path: impl AsRef<Path>) -> Result<()> {
        jsonl::write_rows(path.as_ref(), &self.rows)
    }

    /// The records, without their extra columns.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.rows.iter().map(|r| &r.record)
    }
}
