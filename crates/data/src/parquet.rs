//! Parquet files as `datasets` (pyarrow) writes them: string, bool, int, double columns and
//! `list<struct<role, content>>` message columns. Rows are converted to the same JSON objects a JSONL line
//! gives, so validation is shared; positions are 1-based row numbers.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::{Map, Number, Value};

use crate::error::{DataError, Result};

/// The rows of a Parquet file as JSON objects with their 1-based row numbers.
///
/// A null top-level column is left out of the object: Parquet stores every column for every row, so a column
/// that only some rows use (say `margin`) is null elsewhere, which is what "absent" means in JSONL.
pub fn read_objects(path: &Path) -> Result<Vec<(usize, Map<String, Value>)>> {
    let file =
        File::open(path).map_err(|e| DataError::in_file(path, format!("cannot read: {e}")))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| DataError::in_file(path, format!("not a readable Parquet file: {e}")))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| DataError::in_file(path, format!("cannot read Parquet rows: {e}")))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let row_no = i + 1;
        let row = row.map_err(|e| {
            DataError::in_file(path, format!("cannot decode row: {e}")).at_row(row_no)
        })?;
        let mut obj = Map::new();
        for (column, field) in row.get_column_iter() {
            let value = to_json(field).map_err(|m| {
                DataError::in_file(path, m)
                    .at_row(row_no)
                    .with_field(column.as_str())
            })?;
            if !value.is_null() {
                obj.insert(column.clone(), value);
            }
        }
        out.push((row_no, obj));
    }
    Ok(out)
}

fn float(x: f64) -> Result<Value, String> {
    Number::from_f64(x)
        .map(Value::Number)
        .ok_or_else(|| format!("{x} is not a valid number (NaN or infinite)"))
}

fn to_json(field: &Field) -> Result<Value, String> {
    Ok(match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(x) => Value::from(*x),
        Field::Short(x) => Value::from(*x),
        Field::Int(x) => Value::from(*x),
        Field::Long(x) => Value::from(*x),
        Field::UByte(x) => Value::from(*x),
        Field::UShort(x) => Value::from(*x),
        Field::UInt(x) => Value::from(*x),
        Field::ULong(x) => Value::from(*x),
        Field::Float16(x) => float(f64::from(*x))?,
        Field::Float(x) => float(f64::from(*x))?,
        Field::Double(x) => float(*x)?,
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => return Err("binary column that is not UTF-8 text".into()),
        },
        Field::Group(row) => {
            let mut obj = Map::new();
            for (k, f) in row.get_column_iter() {
                obj.insert(k.clone(), to_json(f).map_err(|m| format!("{k}: {m}"))?);
            }
            Value::Object(obj)
        }
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .enumerate()
                .map(|(i, f)| to_json(f).map_err(|m| format!("[{i}]: {m}")))
                .collect::<Result<_, _>>()?,
        ),
        Field::MapInternal(map) => {
            let mut obj = Map::new();
            for (k, v) in map.entries() {
                let key = match to_json(k)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                obj.insert(key, to_json(v)?);
            }
            Value::Object(obj)
        }
        // Dates, times and decimals only appear in provenance columns: keep their printed form.
        Field::Decimal(_)
        | Field::Date(_)
        | Field::TimeMillis(_)
        | Field::TimeMicros(_)
        | Field::TimestampMillis(_)
        | Field::TimestampMicros(_) => Value::String(field.to_string()),
    })
}
