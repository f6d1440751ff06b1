//! Chat templates rendered the way transformers' `apply_chat_template` renders them (Jinja2 sandbox with
//! `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, its own `tojson`, and
//! Python string/dict methods), with minijinja.
//!
//! `{% generation %}…{% endgeneration %}` (transformers' `AssistantTracker`) is supported: the spans it marks are
//! returned with the rendered text, for assistant-only loss masks.

use std::fmt::Write as _;
use std::ops::Range;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value as JValue};
use serde_json::{Map, Value};

use crate::error::{DataError, Result};
use crate::formats::Message;

/// Private-use characters standing in for `{% generation %}`/`{% endgeneration %}` while rendering.
const GEN_START: char = '\u{E000}';
const GEN_END: char = '\u{E001}';
/// Prefix of the error `raise_exception` raises, to tell it apart from template bugs.
const RAISED: &str = "\u{E002}raised:";

#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from (e.g. `model/tokenizer_config.json`), for error messages.
    origin: String,
}

/// A rendered conversation: the text and the byte ranges inside `{% generation %}` blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub generation_spans: Vec<Range<usize>>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names the file it came from in errors.
    pub fn new(source: &str, origin: impl Into<String>) -> Result<Self> {
        let origin = origin.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<JValue, Error> {
                Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{RAISED}{message}"),
                ))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat_template", rewrite_generation_tags(source))
            .map_err(|e| {
                DataError::new(
                    &origin,
                    format!("chat template does not compile: {}", describe(&e)),
                )
            })?;
        Ok(ChatTemplate { env, origin })
    }

    /// Renders `messages` with transformers' variables: `messages`, `add_generation_prompt`, `tools` and
    /// `documents` (None), plus `vars` (the special tokens: `bos_token`, `eos_token`, ...).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        vars: &Map<String, Value>,
    ) -> Result<Rendered> {
        let mut ctx: Map<String, Value> = vars.clone();
        ctx.insert(
            "messages".into(),
            Value::Array(messages.iter().map(Message::to_json).collect()),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        ctx.insert("tools".into(), Value::Null);
        ctx.insert("documents".into(), Value::Null);
        let template = self
            .env
            .get_template("chat_template")
            .expect("added in new()");
        let raw = template.render(JValue::from_serialize(&ctx)).map_err(|e| {
            let message = match e.detail().and_then(|d| d.strip_prefix(RAISED)) {
                Some(raised) => format!("chat template raised an exception: {raised}"),
                None => format!("chat template failed: {}", describe(&e)),
            };
            DataError::new(&self.origin, message)
        })?;
        Ok(split_generation_markers(&raw))
    }
}

/// minijinja's message plus the template line, without the source dump of its alternate Display.
fn describe(e: &Error) -> String {
    let mut s = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        let _ = write!(s, " (line {line})");
    }
    s
}

/// Replaces `{% generation %}`/`{% endgeneration %}` (with any `-`/`+` whitespace control) by
/// `{% if true %}{{ marker }}{% endif %}`: the outer tags sit where the original tag sat, so trim_blocks,
/// lstrip_blocks and the whitespace markers act exactly as on the original.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let Some(close_rel) = rest[open..].find("%}") else {
            break;
        };
        let close = open + close_rel;
        let inner = &rest[open + 2..close];
        let (left, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, right) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[body.len() - 1..]),
            None => (body, ""),
        };
        let marker = match body.trim() {
            "generation" => Some(GEN_START),
            "endgeneration" => Some(GEN_END),
            _ => None,
        };
        out.push_str(&rest[..open]);
        match marker {
            Some(m) => {
                let _ = write!(
                    out,
                    "{{%{left} if true %}}{{{{ \"{m}\" }}}}{{% endif {right}%}}"
                );
            }
            None => out.push_str(&rest[open..close + 2]),
        }
        rest = &rest[close + 2..];
    }
    out.push_str(rest);
    out
}

fn split_generation_markers(raw: &str) -> Rendered {
    let mut text = String::with_capacity(raw.len());
    let mut spans = Vec::new();
    let mut start = None;
    for c in raw.chars() {
        match c {
            GEN_START => start = Some(text.len()),
            GEN_END => {
                if let Some(s) = start.take() {
                    spans.push(s..text.len());
                }
            }
            _ => text.push(c),
        }
    }
    Rendered {
        text,
        generation_spans: spans,
    }
}

/// `strftime_now(format)`: the local time formatted like Python's `datetime.now().strftime(format)`.
fn strftime_now(format: String) -> std::result::Result<String, Error> {
    let mut s = String::new();
    write!(s, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("invalid strftime format {format:?}"),
        )
    })?;
    Ok(s)
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// i.e. Python's separators (`, ` and `: `, or `,` with indent) and no HTML escaping (unlike Jinja's own).
fn tojson(
    value: JValue,
    ensure_ascii: Option<bool>,
    indent: Option<JValue>,
    kwargs: Kwargs,
) -> std::result::Result<String, Error> {
    let ensure_ascii = match kwargs.get::<Option<bool>>("ensure_ascii")? {
        Some(b) => b,
        None => ensure_ascii.unwrap_or(false),
    };
    let indent = kwargs
        .get::<Option<JValue>>("indent")?
        .or(indent)
        .filter(|v| !v.is_none() && !v.is_undefined());
    let indent = match indent {
        None => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v.clone()).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or string",
                )
            })?),
        }),
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: cannot serialize: {e}"),
        )
    })?;
    let printer = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    printer.write(&mut out, &json, 0);
    Ok(out)
}

struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, out: &mut String, level: usize) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn string(&self, out: &mut String, s: &str) {
        let escaped = serde_json::to_string(s).expect("strings serialize");
        if self.ensure_ascii {
            for c in escaped.chars() {
                if c.is_ascii() {
                    out.push(c);
                } else {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
            }
        } else {
            out.push_str(&escaped);
        }
    }

    fn write(&self, out: &mut String, v: &Value, level: usize) {
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => match n.as_f64().filter(|_| n.is_f64()) {
                Some(x) => out.push_str(&python_float_repr(x)),
                None => out.push_str(&n.to_string()),
            },
            Value::String(s) => self.string(out, s),
            Value::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, level + 1);
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push(']');
            }
            Value::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, level + 1);
                    self.string(out, k);
                    out.push_str(&self.key_sep);
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push('}');
            }
        }
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16 (`1e+16`, `1e-05`).
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let a = x.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e').expect("{:e} has an exponent");
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        format!("{mantissa}e{sign}{digits:0>2}")
    } else {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        for (x, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
            (123.25, "123.25"),
            (-2e-5, "-2e-05"),
        ] {
            assert_eq!(python_float_repr(x), want);
        }
    }

    #[test]
    fn generation_tags_keep_whitespace_control() {
        assert_eq!(
            rewrite_generation_tags("a{%- generation -%}b{% endgeneration %}c"),
            "a{%- if true %}{{ \"\u{E000}\" }}{% endif -%}b{% if true %}{{ \"\u{E001}\" }}{% endif %}c"
        );
    }
}
