//! The one error type of this crate: every failure names the file and, where known, the line (or Parquet row)
//! and the field, so a user can go straight to the bad input.

use std::fmt;
use std::path::Path;

/// Where in a file the problem is, 1-based: a JSONL line, a Parquet row, or an element of a `.json` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Line(usize),
    Row(usize),
    Element(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataError {
    /// The file as the user named it (or a descriptive source such as `<memory>`).
    pub file: String,
    /// The record the problem is in, when it is inside one.
    pub position: Option<Position>,
    /// Field (JSONL key or Parquet column) at fault, when one is.
    pub field: Option<String>,
    pub message: String,
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    pub fn new(file: impl Into<String>, message: impl Into<String>) -> Self {
        DataError {
            file: file.into(),
            position: None,
            field: None,
            message: message.into(),
        }
    }

    /// An error about a file, with the path rendered as given.
    pub fn in_file(path: &Path, message: impl Into<String>) -> Self {
        Self::new(path.display().to_string(), message)
    }

    pub fn at_line(mut self, line: usize) -> Self {
        self.position = Some(Position::Line(line));
        self
    }

    pub fn at_row(mut self, row: usize) -> Self {
        self.position = Some(Position::Row(row));
        self
    }

    pub fn at(mut self, position: Position) -> Self {
        self.position = Some(position);
        self
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// The 1-based line (JSONL), row (Parquet) or element (JSON array) of the error, if it is inside a record.
    pub fn line(&self) -> Option<usize> {
        match self.position {
            Some(Position::Line(n)) | Some(Position::Row(n)) | Some(Position::Element(n)) => {
                Some(n)
            }
            None => None,
        }
    }
}

impl fmt::Display for DataError {
    /// `data/train.jsonl:17: field "chosen": expected ...` for JSONL,
    /// `data/train.parquet: row 17: column "chosen": expected ...` for Parquet.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        let field_word = match self.position {
            Some(Position::Line(n)) => {
                write!(f, ":{n}")?;
                "field"
            }
            Some(Position::Row(n)) => {
                write!(f, ": row {n}")?;
                "column"
            }
            Some(Position::Element(n)) => {
                write!(f, ": element {n}")?;
                "field"
            }
            None => "field",
        };
        if let Some(field) = &self.field {
            write!(f, ": {field_word} \"{field}\"")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for DataError {}
