//! HTML helpers. Every piece of user content goes through `esc`; templates are plain
//! `format!` strings so there is no template engine or JS build step.

use crate::model::{Role, User};

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Renders guideline text: `#`/`##` headings, `-`/`*` bullet lists, blank-line
/// paragraphs, `**bold**` and `` `code` ``. Everything is escaped first, so markup in
/// the text itself never becomes HTML.
pub fn markdownish(text: &str) -> String {
    let mut out = String::new();
    let mut para: Vec<String> = Vec::new();
    let mut in_list = false;
    let flush = |out: &mut String, para: &mut Vec<String>| {
        if !para.is_empty() {
            out.push_str(&format!("<p>{}</p>\n", para.join("<br>")));
            para.clear();
        }
    };
    for line in text.lines() {
        let t = line.trim_end();
        let bullet = t
            .trim_start()
            .strip_prefix("- ")
            .or_else(|| t.trim_start().strip_prefix("* "));
        if bullet.is_none() && in_list {
            out.push_str("</ul>\n");
            in_list = false;
        }
        if let Some(h) = t.strip_prefix("## ") {
            flush(&mut out, &mut para);
            out.push_str(&format!("<h4>{}</h4>\n", inline(h)));
        } else if let Some(h) = t.strip_prefix("# ") {
            flush(&mut out, &mut para);
            out.push_str(&format!("<h3>{}</h3>\n", inline(h)));
        } else if let Some(b) = bullet {
            flush(&mut out, &mut para);
            if !in_list {
                out.push_str("<ul>\n");
                in_list = true;
            }
            out.push_str(&format!("<li>{}</li>\n", inline(b)));
        } else if t.trim().is_empty() {
            flush(&mut out, &mut para);
        } else {
            para.push(inline(t));
        }
    }
    flush(&mut out, &mut para);
    if in_list {
        out.push_str("</ul>\n");
    }
    out
}

/// `**bold**` and `` `code` `` on already-escaped text (the markers survive escaping).
fn inline(s: &str) -> String {
    let e = esc(s);
    let e = toggle(&e, "**", "<strong>", "</strong>");
    toggle(&e, "`", "<code>", "</code>")
}

fn toggle(s: &str, marker: &str, open: &str, close: &str) -> String {
    let parts: Vec<&str> = s.split(marker).collect();
    // An unmatched marker stays literal.
    if parts.len().is_multiple_of(2) {
        return s.to_string();
    }
    let mut out = String::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push_str(if i % 2 == 1 { open } else { close });
        }
        out.push_str(p);
    }
    out
}

pub fn csrf_field(token: &str) -> String {
    format!(
        r#"<input type="hidden" name="csrf" value="{}">"#,
        esc(token)
    )
}

/// Full page with navigation. `body` must already be escaped HTML.
pub fn page(title: &str, user: Option<&User>, csrf: &str, body: &str) -> String {
    let nav = match user {
        Some(u) => {
            let admin = if u.role == Role::Admin {
                r#"<a href="/admin/users">Users</a> <a href="/admin/audit">Audit log</a>"#
            } else {
                ""
            };
            format!(
                r#"<nav><a href="/">Projects</a> {admin} <span class="who">{} ({})</span>
<a href="/account/password">Password</a>
<form method="post" action="/logout" class="inline">{}<button type="submit">Log out</button></form></nav>"#,
                esc(&u.username),
                u.role.as_str(),
                csrf_field(csrf)
            )
        }
        None => String::new(),
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{} · rlhf feedback</title><link rel="stylesheet" href="/static/app.css"></head>
<body><header><strong>rlhf feedback</strong> {nav}</header>
<main>
<h1>{}</h1>
{body}
</main><script src="/static/app.js"></script></body></html>"#,
        esc(title),
        esc(title)
    )
}

/// A bar for "done of total"; with nothing in total it says so instead of "0 / 0 (100%)".
pub fn progress_bar(done: i64, total: i64, label: &str) -> String {
    let text = if total > 0 {
        format!(
            "{} {done} / {total} ({:.0}%)",
            esc(label),
            100.0 * done as f64 / total as f64
        )
    } else {
        format!("{}: none yet", esc(label))
    };
    format!(
        r#"<div class="progress"><progress value="{done}" max="{}"></progress> <span>{text}</span></div>"#,
        total.max(1)
    )
}

/// An annotator's view: their own queue and, separately, the project's completion
/// (with overlap k, "my labels / all items" is neither).
pub fn queue_progress(done: i64, open: i64, full: i64, items: i64) -> String {
    let mine = if done + open == 0 {
        "Nothing to label for you in this project right now.".to_string()
    } else {
        format!("Your labels: {done} done, {open} left for you")
    };
    format!(
        r#"<div class="progress"><progress value="{done}" max="{}"></progress> <span>{mine}</span></div>{}"#,
        (done + open).max(1),
        progress_bar(full, items, "Project: items fully labelled")
    )
}

pub fn fmt_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

pub fn fmt_opt(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(v) => format!("{v:.digits$}"),
        None => "–".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_markdown() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        let html = markdownish("# Title <b>\nIntro **bold** and `code`\n\n- one\n- <img src=x onerror=alert(1)>\nafter");
        assert_eq!(
            html,
            "<h3>Title &lt;b&gt;</h3>\n<p>Intro <strong>bold</strong> and <code>code</code></p>\n<ul>\n<li>one</li>\n<li>&lt;img src=x onerror=alert(1)&gt;</li>\n</ul>\n<p>after</p>\n"
        );
        assert_eq!(inline("a ** b"), "a ** b");
    }
}
