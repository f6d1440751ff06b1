//! JSON Lines: one JSON object per line. Blank lines are allowed only at the end of the file (a blank line in
//! the middle usually means a truncated or hand-mangled file, so it is reported).

use std::fs;
use std::io::Write;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{DataError, Result};
use crate::formats::{json_type, Row};

/// The objects of JSONL text with their 1-based line numbers; `file` only labels errors.
pub fn parse_objects(file: &str, bytes: &[u8]) -> Result<Vec<(usize, Map<String, Value>)>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let bad = e.valid_up_to();
        let line_start = bytes[..bad]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let line = 1 + bytes[..bad].iter().filter(|&&b| b == b'\n').count();
        DataError::new(
            file,
            format!("invalid UTF-8 at byte {} of the line", bad - line_start + 1),
        )
        .at_line(line)
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    let mut first_blank: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            first_blank.get_or_insert(line_no);
            continue;
        }
        if let Some(blank) = first_blank {
            return Err(DataError::new(
                file,
                "blank line inside the file (blank lines are only allowed at the end)",
            )
            .at_line(blank));
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|e| DataError::new(file, format!("invalid JSON: {e}")).at_line(line_no))?;
        match value {
            Value::Object(obj) => out.push((line_no, obj)),
            other => {
                return Err(DataError::new(
                    file,
                    format!("expected a JSON object, got {}", json_type(&other)),
                )
                .at_line(line_no))
            }
        }
    }
    Ok(out)
}

/// A `.json` file holding one JSON array of objects (the other layout `datasets` reads); 1-based element numbers.
pub fn parse_array(file: &str, bytes: &[u8]) -> Result<Vec<(usize, Map<String, Value>)>> {
    let items: Vec<Value> = serde_json::from_slice(bytes)
        .map_err(|e| DataError::new(file, format!("invalid JSON: {e}")))?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(obj) => Ok((i + 1, obj)),
            other => Err(DataError::new(
                file,
                format!("expected a JSON object, got {}", json_type(&other)),
            )
            .at(crate::error::Position::Element(i + 1))),
        })
        .collect()
}

/// One row as a JSON line (no trailing newline): the record's TRL fields, then the extra columns.
pub fn to_line(row: &Row) -> String {
    Value::Object(row.to_json()).to_string()
}

/// Writes rows as JSONL, creating parent directories. Writes to a temporary file first and renames it, so a
/// crash never leaves a half-written dataset behind.
pub fn write_rows<'a>(path: &Path, rows: impl IntoIterator<Item = &'a Row>) -> Result<()> {
    let io_err = |e: std::io::Error| DataError::in_file(path, format!("cannot write: {e}"));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_err)?;
    }
    let mut buf = Vec::new();
    for row in rows {
        buf.extend_from_slice(to_line(row).as_bytes());
        buf.push(b'\n');
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);
    let mut f = fs::File::create(tmp).map_err(io_err)?;
    f.write_all(&buf).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    fs::rename(tmp, path).map_err(io_err)
}
