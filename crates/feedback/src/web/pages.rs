//! Route handlers. Every page escapes user content via `esc`; every form carries the
//! CSRF token (checked in the middleware).

use std::collections::HashMap;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use serde::Deserialize;
use serde_json::{json, Value};

use super::html::{
    csrf_field, esc, fmt_opt, fmt_time, markdownish, page, progress_bar, queue_progress,
};
use super::upload::{read_upload, Upload};
use super::{AppResult, Ctx, Shared, PRE_COOKIE, SESSION_COOKIE};
use crate::auth::check_password_rules;
use crate::db::now_ms;
use crate::diff::{unified_diff, word_diff};
use crate::error::{invalid, Error};
use crate::export::{export_rows_with, to_jsonl, Format, Options as ExportOptions};
use crate::import::{decode_utf8, expand, parse_jsonl, parse_scores, Generate};
use crate::model::*;
use crate::quality::project_stats;
use crate::store::{random_token, Submitted};

const INVITE_TTL_MS: i64 = 7 * 24 * 3600 * 1000;
const MAX_TEXT_CHARS: usize = 100_000;

fn html(title: &str, ctx: &Ctx, body: String) -> Html<String> {
    Html(page(title, ctx.user.as_ref(), &ctx.csrf, &body))
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

fn num<T: std::str::FromStr>(field: &str, s: &str) -> Result<T, Error> {
    s.trim().parse().map_err(|_| {
        invalid(format!(
            "field {field:?}: expected a number, got {:?}",
            s.chars().take(40).collect::<String>()
        ))
    })
}

fn text_field(field: &str, s: Option<&String>, allow_empty: bool) -> Result<String, Error> {
    let s = s.map(String::as_str).unwrap_or("");
    if !allow_empty && s.trim().is_empty() {
        return Err(invalid(format!("field {field:?} must not be empty")));
    }
    if s.chars().count() > MAX_TEXT_CHARS {
        return Err(invalid(format!(
            "field {field:?} is longer than {MAX_TEXT_CHARS} characters"
        )));
    }
    // Browsers send CRLF from textareas; store the text as typed.
    Ok(s.replace("\r\n", "\n"))
}

pub async fn static_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../static/app.js"),
    )
}

pub async fn static_css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../static/app.css"),
    )
}

// ------------------------------------------------------------------ auth pages

fn login_page(ctx: &Ctx, error: Option<&str>) -> Html<String> {
    let err = error
        .map(|e| format!(r#"<section class="error">{}</section>"#, esc(e)))
        .unwrap_or_default();
    html(
        "Log in",
        ctx,
        format!(
            r#"{err}<section><form method="post" action="/login">{}
<p><label>Username<br><input name="username" autocomplete="username" autofocus required></label></p>
<p><label>Password<br><input name="password" type="password" autocomplete="current-password" required></label></p>
<p><button type="submit">Log in</button></p></form></section>"#,
            csrf_field(&ctx.csrf)
        ),
    )
}

pub async fn login_form(Extension(ctx): Extension<Ctx>) -> Response {
    if ctx.user.is_some() {
        return see_other("/");
    }
    login_page(&ctx, None).into_response()
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

pub async fn login(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Form(f): Form<LoginForm>,
) -> AppResult<Response> {
    let username = f.username.trim();
    let now = now_ms();
    let account = format!(
        "u:{}",
        username.chars().take(64).collect::<String>().to_lowercase()
    );
    let address = ctx.addr.map(|a| format!("a:{a}"));
    // Throttled attempts are refused before any password check: no hash, no audit row.
    let wait = st.accounts.blocked_for(&account, now).max(
        address
            .as_ref()
            .and_then(|a| st.addresses.blocked_for(a, now)),
    );
    if let Some(ms) = wait {
        let secs = (ms + 999) / 1000;
        let mut r = login_page(
            &ctx,
            Some(&format!("Too many failed log-ins. Try again in {secs} s.")),
        )
        .into_response();
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        r.headers_mut().insert(header::RETRY_AFTER, secs.into());
        return Ok(r);
    }
    let (user, hash) = match st.db.user_by_name(username).await? {
        Some((u, Some(h))) => (Some(u), Some(h)),
        _ => (None, None),
    };
    let ok = st.hashes.verify(f.password, hash).await?;
    if let Some(user) = user.filter(|_| ok) {
        st.accounts.success(&account);
        let (token, _csrf) = st.db.create_session(user.id, st.cfg.session_ttl_ms).await?;
        return Ok(session_redirect(&ctx, &token, st.cfg.session_ttl_ms, "/"));
    }
    // One audit row when a burst of failures starts and one when it first locks the
    // account or address, not one per guess.
    let shown_name: String = username.chars().take(64).collect();
    let addr = ctx.addr.map(|a| a.to_string());
    let fa = st.accounts.failure(&account, now);
    if fa.first_in_burst {
        st.db
            .audit(
                None,
                "login_failed",
                json!({"username": shown_name, "address": addr}),
            )
            .await?;
    }
    if fa.lockout_started {
        st.db
            .audit(None, "login_throttled", json!({"username": shown_name, "address": addr, "failures": fa.failures, "locked_ms": fa.blocked_for_ms}))
            .await?;
    }
    if let Some(a) = &address {
        let fb = st.addresses.failure(a, now);
        if fb.lockout_started {
            st.db.audit(None, "login_throttled", json!({"address": addr, "failures": fb.failures, "locked_ms": fb.blocked_for_ms})).await?;
        }
    }
    let mut r = login_page(&ctx, Some("Invalid username or password.")).into_response();
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    Ok(r)
}

fn session_redirect(ctx: &Ctx, token: &str, ttl_ms: i64, to: &str) -> Response {
    let mut r = see_other(to);
    let h = r.headers_mut();
    if let Ok(v) = ctx.cookie(SESSION_COOKIE, token, ttl_ms / 1000).parse() {
        h.append(header::SET_COOKIE, v);
    }
    if let Ok(v) = ctx.cookie(PRE_COOKIE, "", 0).parse() {
        h.append(header::SET_COOKIE, v);
    }
    r
}

pub async fn logout(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
) -> AppResult<Response> {
    if let (Some(tok), Some(u)) = (&ctx.session_token, &ctx.user) {
        st.db.delete_session(tok, u.id).await?;
    }
    let mut r = see_other("/login");
    if let Ok(v) = ctx.cookie(SESSION_COOKIE, "", 0).parse() {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(r)
}

pub async fn invite_form(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(token): Path<String>,
) -> AppResult<Response> {
    let Some(user) = st.db.invite_user(&token).await? else {
        return Err(
            Error::NotFound("this invite link is invalid, expired or already used".into()).into(),
        );
    };
    Ok(html(
        "Welcome",
        &ctx,
        format!(
            r#"<section><p>Choose a password for <strong>{}</strong> ({}).</p>
<form method="post" action="/invite/{}">{}
<p><label>Password (at least 8 characters)<br><input name="password" type="password" autocomplete="new-password" required></label></p>
<p><label>Repeat password<br><input name="password2" type="password" autocomplete="new-password" required></label></p>
<p><button type="submit">Set password and log in</button></p></form></section>"#,
            esc(&user.username),
            user.role.as_str(),
            esc(&token),
            csrf_field(&ctx.csrf)
        ),
    )
    .into_response())
}

#[derive(Deserialize)]
pub struct InviteForm {
    #[serde(default)]
    password: String,
    #[serde(default)]
    password2: String,
}

pub async fn invite_accept(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(token): Path<String>,
    Form(f): Form<InviteForm>,
) -> AppResult<Response> {
    if f.password != f.password2 {
        return Err(invalid("the two passwords differ").into());
    }
    // Unknown links are refused before spending a hash on them.
    if st.db.invite_user(&token).await?.is_none() {
        return Err(
            Error::NotFound("this invite link is invalid, expired or already used".into()).into(),
        );
    }
    let hash = st.hashes.hash(f.password).await?;
    let Some(user) = st.db.redeem_invite(&token, &hash).await? else {
        return Err(
            Error::NotFound("this invite link is invalid, expired or already used".into()).into(),
        );
    };
    let (tok, _) = st.db.create_session(user.id, st.cfg.session_ttl_ms).await?;
    Ok(session_redirect(&ctx, &tok, st.cfg.session_ttl_ms, "/"))
}

pub async fn password_form(Extension(ctx): Extension<Ctx>) -> AppResult<Response> {
    ctx.user()?;
    Ok(password_page(&ctx, None).into_response())
}

fn password_page(ctx: &Ctx, error: Option<&str>) -> Html<String> {
    let err = error
        .map(|e| format!(r#"<section class="error">{}</section>"#, esc(e)))
        .unwrap_or_default();
    html(
        "Change password",
        ctx,
        format!(
            r#"{err}<section><form method="post" action="/account/password">{}
<p><label>Current password<br><input name="current" type="password" autocomplete="current-password" required autofocus></label></p>
<p><label>New password (at least 8 characters)<br><input name="password" type="password" autocomplete="new-password" required></label></p>
<p><label>Repeat new password<br><input name="password2" type="password" autocomplete="new-password" required></label></p>
<p class="hint">Your other sessions (other browsers and devices) are logged out.</p>
<p><button type="submit">Change password</button></p></form></section>"#,
            csrf_field(&ctx.csrf)
        ),
    )
}

#[derive(Deserialize)]
pub struct PasswordForm {
    #[serde(default)]
    current: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    password2: String,
}

pub async fn password_change(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Form(f): Form<PasswordForm>,
) -> AppResult<Response> {
    let user = ctx.user()?;
    if f.password != f.password2 {
        return Err(invalid("the two new passwords differ").into());
    }
    check_password_rules(&f.password)?;
    // The current password is guessed like a login: the same account throttle applies.
    let account = format!("u:{}", user.username.to_lowercase());
    let now = now_ms();
    if let Some(ms) = st.accounts.blocked_for(&account, now) {
        return Err(Error::TooMany {
            msg: format!(
                "Too many wrong passwords. Try again in {} s.",
                (ms + 999) / 1000
            ),
            retry_after_s: (ms as u64).div_ceil(1000),
        }
        .into());
    }
    let hash = st
        .db
        .user_by_name(&user.username)
        .await?
        .and_then(|(_, h)| h);
    if !st.hashes.verify(f.current, hash).await? {
        st.accounts.failure(&account, now);
        let mut r = password_page(&ctx, Some("The current password is wrong.")).into_response();
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return Ok(r);
    }
    let new_hash = st.hashes.hash(f.password).await?;
    st.db
        .set_password(user.id, &new_hash, ctx.session_token.as_deref())
        .await?;
    Ok(html("Password changed", &ctx, "<section><p>Your password was changed and your other sessions were logged out.</p><p><a href=\"/\">Projects</a></p></section>".into()).into_response())
}

// ------------------------------------------------------------------ home & projects

pub async fn home(State(st): State<Shared>, Extension(ctx): Extension<Ctx>) -> AppResult<Response> {
    let user = ctx.user()?;
    let projects = st.db.projects_for(user).await?;
    let mut rows = String::new();
    for p in &projects {
        let bar = if user.role == Role::Admin {
            let (n, full, _, _) = st.db.project_counts(p).await?;
            progress_bar(full, n, "items complete")
        } else {
            let (done, open) = st.db.progress(p, user.id).await?;
            let (full, n) = st.db.completion(p).await?;
            queue_progress(done, open, full, n)
        };
        rows.push_str(&format!(
            r#"<tr><td><a href="/p/{}">{}</a></td><td>{}</td><td>{bar}</td><td><a href="/p/{}/task">Start labelling</a></td></tr>"#,
            p.id,
            esc(&p.name),
            p.kind.as_str(),
            p.id
        ));
    }
    let list = if projects.is_empty() {
        "<p>No projects yet.</p>".to_string()
    } else {
        format!(
            "<table><tr><th>Project</th><th>Task</th><th>Progress</th><th></th></tr>{rows}</table>"
        )
    };
    let mut body = format!("<section>{list}</section>");
    if user.role == Role::Admin {
        let kinds: String = TaskKind::ALL
            .iter()
            .map(|k| format!(r#"<option value="{0}">{0}</option>"#, k.as_str()))
            .collect();
        body.push_str(&format!(
            r#"<section><h2>New project</h2><form method="post" action="/projects">{}
<p><label>Name <input name="name" required></label>
<label>Task <select name="kind">{kinds}</select></label></p>
<p><label>Criteria (rating) <input name="criteria" value="helpful, truthful, harmless"></label>
<label>Likert max <input name="likert_max" value="5" size="3"></label>
<label>Annotators per item <input name="overlap" value="3" size="3"></label>
<label>Too fast below (s) <input name="min_seconds" value="3" size="4"></label></p>
<p><button type="submit">Create project</button></p></form></section>"#,
            csrf_field(&ctx.csrf)
        ));
    }
    Ok(html("Projects", &ctx, body).into_response())
}

#[derive(Deserialize)]
pub struct ProjectForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    criteria: String,
    #[serde(default)]
    likert_max: String,
    #[serde(default)]
    overlap: String,
    #[serde(default)]
    min_seconds: String,
}

pub async fn project_create(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Form(f): Form<ProjectForm>,
) -> AppResult<Response> {
    let admin = ctx.admin()?;
    let mut p = NewProject::new(f.name.trim(), TaskKind::parse(&f.kind)?);
    p.criteria = parse_criteria(&f.criteria);
    p.likert_max = num("likert_max", &f.likert_max)?;
    p.overlap = num("overlap", &f.overlap)?;
    p.min_seconds = num("min_seconds", &f.min_seconds)?;
    let id = st.db.create_project(Some(admin.id), &p).await?;
    Ok(see_other(&format!("/p/{id}")))
}

pub async fn project(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
) -> AppResult<Response> {
    let user = ctx.user()?;
    let p = st.db.project_for(user, id).await?;
    let (done, open) = st.db.progress(&p, user.id).await?;
    let (full, n) = st.db.completion(&p).await?;
    let mut body = format!(
        r#"<section><p>Task: <strong>{}</strong>{} · {} annotators per item · <a href="/p/{id}/guidelines">Guidelines</a></p>
{}<p><a href="/p/{id}/task"><button type="button">Start labelling</button></a></p></section>"#,
        p.kind.as_str(),
        if p.kind == TaskKind::Rating {
            format!(
                " (criteria: {}; scale 1–{})",
                esc(&p.criteria.join(", ")),
                p.likert_max
            )
        } else {
            String::new()
        },
        p.overlap,
        queue_progress(done, open, full, n),
    );
    let recent = st.db.recent_live_labels(p.id, user.id, 20).await?;
    if !recent.is_empty() {
        let rows: String = recent
            .iter()
            .map(|l| {
                format!(
                    r#"<tr><td>{}</td><td>{}</td><td><a href="/p/{id}/task?item={}">change</a></td></tr>"#,
                    fmt_time(l.created_at),
                    esc(&label_summary(&l.value)),
                    l.item_id
                )
            })
            .collect();
        body.push_str(&format!(
            "<section><h2>Your recent labels</h2><table><tr><th>When (UTC)</th><th>Answer</th><th></th></tr>{rows}</table></section>"
        ));
    }
    if user.role == Role::Admin {
        body.push_str(&admin_project_sections(&st, &ctx, &p).await?);
    }
    Ok(html(&p.name, &ctx, body).into_response())
}

/// One-line description of an answer for the "recent labels" list.
fn label_summary(v: &LabelValue) -> String {
    let short = |t: &str| {
        let s: String = t.chars().take(80).collect();
        if s.len() < t.len() {
            format!("{s}…")
        } else {
            s
        }
    };
    match v {
        LabelValue::Pairwise { choice, .. } => match choice {
            Choice::A => "A (left) better".into(),
            Choice::B => "B (right) better".into(),
            Choice::Tie => "tie".into(),
            Choice::BothBad => "both bad".into(),
        },
        LabelValue::Rating { scores } => scores
            .iter()
            .map(|(c, s)| format!("{c} {s}"))
            .collect::<Vec<_>>()
            .join(", "),
        LabelValue::Correction { corrected, .. } => format!("corrected: {}", short(corrected)),
        LabelValue::Critique { text } | LabelValue::Demonstration { text } => short(text),
        LabelValue::Undo => "undone".into(),
    }
}

async fn admin_project_sections(st: &Shared, ctx: &Ctx, p: &Project) -> AppResult<String> {
    let id = p.id;
    let (n, full, gold, labels) = st.db.project_counts(p).await?;
    let members = st.db.members(id).await?;
    let users = st.db.users().await?;
    let csrf = csrf_field(&ctx.csrf);
    let member_list: String = if members.is_empty() {
        "<p>No annotators assigned yet.</p>".into()
    } else {
        let mut s = String::from("<ul>");
        for m in &members {
            s.push_str(&format!(
                r#"<li>{} <form method="post" action="/p/{id}/members" class="inline">{csrf}<input type="hidden" name="user_id" value="{}"><input type="hidden" name="action" value="remove"><button type="submit">Remove</button></form></li>"#,
                esc(&m.username),
                m.id
            ));
        }
        s.push_str("</ul>");
        s
    };
    let options: String = users
        .iter()
        .filter(|u| !members.iter().any(|m| m.id == u.id))
        .map(|u| format!(r#"<option value="{}">{}</option>"#, u.id, esc(&u.username)))
        .collect();
    let formats: String = Format::for_kind(p.kind)
        .iter()
        .map(|f| format!(r#"<option value="{0}">{0}</option>"#, f.as_str()))
        .collect();
    let stats = stats_html(st, p).await?;
    Ok(format!(
        r#"<section><h2>Overview</h2><p>{n} items ({gold} gold), {labels} live labels.</p>{}</section>
<section><h2>Quality</h2><div id="live-stats" data-src="/p/{id}/stats">{stats}</div></section>
<section><h2>Annotators</h2>{member_list}
<form method="post" action="/p/{id}/members">{csrf}<select name="user_id">{options}</select><input type="hidden" name="action" value="add"> <button type="submit">Assign</button></form></section>
<section><h2>Import items</h2><form method="post" action="/p/{id}/import" enctype="multipart/form-data">{csrf}
<p class="hint">JSONL: <code>{{"prompt", "responses": [...]}}</code>, TRL <code>{{"prompt", "chosen", "rejected"}}</code> or <code>{{"prompt", "completion"}}</code>; optional <code>"id"</code> and <code>"gold"</code>. Upload a file (up to {max_mib} MiB) or paste rows below.</p>
<p><input type="file" name="file" accept=".jsonl,.json,.txt"></p>
<textarea name="jsonl" id="import-jsonl" placeholder='{{"prompt": "...", "responses": ["...", "..."]}}'></textarea>
<p>Rows without responses: generate with an OpenAI-compatible server (optional)
<input name="gen_url" placeholder="http://127.0.0.1:8000" size="28"> model <input name="gen_model" size="12">
n <input name="gen_n" value="2" size="2"> max tokens <input name="gen_max_tokens" value="256" size="4">
temperature <input name="gen_temperature" value="1.0" size="3"></p>
<p><button type="submit">Import</button></p></form></section>
<section><h2>Reward-model uncertainty</h2><form method="post" action="/p/{id}/scores" enctype="multipart/form-data">{csrf}
<p class="hint">JSONL <code>{{"item_id", "uncertainty"}}</code> (from <code>rlhf rm score</code>); queues then serve the most uncertain items first.</p>
<p><input type="file" name="file" accept=".jsonl"></p>
<textarea name="jsonl" id="scores-jsonl"></textarea><p><button type="submit">Import scores</button></p></form></section>
<section><h2>Export</h2><form method="post" action="/p/{id}/export">{csrf}
<label>Format <select name="format">{formats}</select></label>
<label><input type="checkbox" name="scrub" value="1"> scrub e-mails and phone numbers</label>
<label><input type="checkbox" name="reliability" value="1"> decide by annotator reliability</label>
<label>min. confidence <input name="min_confidence" size="4" placeholder="0.9"></label>
<label>Deliver <select name="deliver"><option value="show">show in browser</option><option value="download">download</option></select></label>
<button type="submit">Export</button></form></section>
<section><h2>Settings</h2><form method="post" action="/p/{id}/settings">{csrf}
<p><label>Criteria <input name="criteria" value="{}"></label>
<label>Likert max <input name="likert_max" value="{}" size="3"></label>
<label>Annotators per item <input name="overlap" value="{}" size="3"></label>
<label>Too fast below (s) <input name="min_seconds" value="{}" size="4"></label>
<button type="submit">Save</button></p></form></section>"#,
        progress_bar(full, n, "items with enough labels"),
        esc(&p.criteria.join(", ")),
        p.likert_max,
        p.overlap,
        p.min_seconds,
        max_mib = st.cfg.max_upload_bytes / (1024 * 1024),
    ))
}

async fn stats_html(st: &Shared, p: &Project) -> AppResult<String> {
    let items = st.db.items(p.id).await?;
    let labels = st.db.live_labels(p.id).await?;
    let users = st.db.users().await?;
    let s = project_stats(p, &items, &labels, &users);
    let name = |id: i64| {
        users
            .iter()
            .find(|u| u.id == id)
            .map(|u| esc(&u.username))
            .unwrap_or_else(|| id.to_string())
    };
    // Cohen's κ summarised per annotator (mean over their pairs, weighted by shared items).
    let mut kappa: HashMap<i64, (f64, f64)> = HashMap::new();
    for a in &s.agreement {
        for (x, y, n, k) in &a.cohen {
            if let Some(k) = k {
                for u in [x, y] {
                    let e = kappa.entry(*u).or_default();
                    *e = (e.0 + k * *n as f64, e.1 + *n as f64);
                }
            }
        }
    }
    let mean_kappa = |u: i64| kappa.get(&u).filter(|e| e.1 > 0.0).map(|e| e.0 / e.1);
    let mut out = String::new();
    // Annotators first, flagged ones at the top: that is what needs a decision.
    let mut annotators: Vec<_> = s.annotators.iter().collect();
    annotators.sort_by_key(|a| (a.flags.is_empty(), a.username.clone()));
    let flagged = annotators.iter().filter(|a| !a.flags.is_empty()).count();
    let model = match s.reliability_model {
        Some("crowd-bt") => "reliability = estimated P(picks the better response), Crowd-BT",
        Some(_) => {
            "reliability = estimated P(gives the most likely score), Dawid–Skene per criterion"
        }
        None => "no reliability model for free-text tasks",
    };
    out.push_str(&format!(
        "<h3>Annotators</h3><p>{flagged} of {} flagged · {model}</p><table><tr><th>Annotator</th><th>Flags</th><th>Labels</th><th>Reliability</th><th>Mean Cohen's κ</th><th>Left share</th><th>Longer share (disagreements)</th><th>Median s/item</th><th>Gold accuracy</th></tr>",
        annotators.len()
    ));
    for a in &annotators {
        let flags = if a.flags.is_empty() {
            r#"<span class="ok">none</span>"#.to_string()
        } else {
            a.flags
                .iter()
                .map(|f| format!(r#"<div class="flag">{}</div>"#, esc(f)))
                .collect()
        };
        out.push_str(&format!(
            "<tr><td>{}</td><td>{flags}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ({})</td><td>{}</td><td>{} ({} gold)</td></tr>",
            esc(&a.username),
            a.labels,
            fmt_opt(a.reliability, 2),
            fmt_opt(mean_kappa(a.user_id), 2),
            fmt_opt(a.left_share, 2),
            fmt_opt(a.longer_share, 2),
            a.length_disagreements,
            fmt_opt(a.median_seconds, 1),
            fmt_opt(a.gold_accuracy, 2),
            a.gold_answered
        ));
    }
    out.push_str("</table>");
    if s.agreement.is_empty() {
        out.push_str("<p>Free-text task: no agreement statistics.</p>");
    }
    for a in &s.agreement {
        out.push_str(&format!(
            "<h3>{}</h3><p>{} items with ≥ 2 labels · Fleiss' κ {} · Krippendorff's α nominal {}{}</p>",
            esc(&a.scope),
            a.units,
            fmt_opt(a.fleiss_kappa, 3),
            fmt_opt(a.alpha_nominal, 3),
            if p.kind == TaskKind::Rating {
                format!(" · ordinal {} · interval {}", fmt_opt(a.alpha_ordinal, 3), fmt_opt(a.alpha_interval, 3))
            } else {
                String::new()
            }
        ));
        if !a.cohen.is_empty() {
            out.push_str(&format!(
                "<details><summary>Cohen's κ for each of the {} pairs of annotators</summary><table><tr><th>Annotators</th><th>Shared items</th><th>Cohen's κ</th></tr>",
                a.cohen.len()
            ));
            for (x, y, n, k) in &a.cohen {
                out.push_str(&format!(
                    "<tr><td>{} · {}</td><td>{n}</td><td>{}</td></tr>",
                    name(*x),
                    name(*y),
                    fmt_opt(*k, 3)
                ));
            }
            out.push_str("</table></details>");
        }
    }
    out.push_str(
        r#"<p class="hint">“–” = not defined: κ needs chance agreement below 1, so it is undefined when both annotators gave the same answer on every shared item (e.g. all labels identical); a pair needs ≥ 2 shared items.</p>"#,
    );
    Ok(out)
}

pub async fn stats_fragment(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
) -> AppResult<Response> {
    ctx.admin()?;
    let p = st.db.project(id).await?;
    Ok(Html(stats_html(&st, &p).await?).into_response())
}

pub async fn stats_json(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
) -> AppResult<Response> {
    ctx.admin()?;
    let p = st.db.project(id).await?;
    let s = project_stats(
        &p,
        &st.db.items(id).await?,
        &st.db.live_labels(id).await?,
        &st.db.users().await?,
    );
    Ok(axum::Json(s).into_response())
}

/// Every item's external id and how many annotators have a live label on it, with the project's overlap: what a
/// program that pushed items (`rlhf iterate`) polls to know when they are labelled.
pub async fn items_json(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
) -> AppResult<Response> {
    ctx.admin()?;
    let p = st.db.project(id).await?;
    let items: Vec<Value> = st
        .db
        .items(id)
        .await?
        .iter()
        .map(|i| json!({"id": i.id, "external_id": i.external_id, "label_count": i.label_count}))
        .collect();
    Ok(axum::Json(json!({"project_id": id, "overlap": p.overlap, "items": items})).into_response())
}

pub async fn project_settings(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Form(f): Form<ProjectForm>,
) -> AppResult<Response> {
    let admin = ctx.admin()?;
    st.db
        .update_project_settings(
            admin.id,
            id,
            &parse_criteria(&f.criteria),
            num("likert_max", &f.likert_max)?,
            num("overlap", &f.overlap)?,
            num("min_seconds", &f.min_seconds)?,
        )
        .await?;
    Ok(see_other(&format!("/p/{id}")))
}

#[derive(Deserialize)]
pub struct MembersForm {
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    action: String,
}

pub async fn project_members(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Form(f): Form<MembersForm>,
) -> AppResult<Response> {
    let admin = ctx.admin()?;
    let add = match f.action.as_str() {
        "add" => true,
        "remove" => false,
        other => {
            return Err(invalid(format!("action must be add or remove, got {other:?}")).into())
        }
    };
    st.db
        .set_member(Some(admin.id), id, num("user_id", &f.user_id)?, add)
        .await?;
    Ok(see_other(&format!("/p/{id}")))
}

fn source_name(s: &str, default: &str) -> String {
    let s: String = s.chars().filter(|c| !c.is_control()).take(120).collect();
    if s.trim().is_empty() {
        default.into()
    } else {
        s
    }
}

/// (source name, text) of an upload: the file if one was chosen, else the pasted text.
fn upload_text(up: Upload, default_name: &str) -> Result<(String, String), Error> {
    match up.file {
        Some((name, bytes)) => {
            let src = source_name(&name, default_name);
            let text = decode_utf8(&src, bytes)?;
            Ok((src, text))
        }
        None => Ok((
            source_name(up.field("source"), default_name),
            up.field("jsonl").to_string(),
        )),
    }
}

pub async fn project_import(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    req: Request,
) -> AppResult<Response> {
    let admin = ctx.admin()?;
    let p = st.db.project(id).await?;
    let up = read_upload(&ctx, st.cfg.max_upload_bytes, req).await?;
    let gen_url = up.field("gen_url").trim().to_string();
    let generate = if gen_url.is_empty() {
        None
    } else {
        Some(Generate {
            url: gen_url,
            model: up.field("gen_model").trim().to_string(),
            n: num("gen_n", up.field("gen_n"))?,
            max_tokens: num("gen_max_tokens", up.field("gen_max_tokens"))?,
            temperature: num("gen_temperature", up.field("gen_temperature"))?,
            api_key: std::env::var("RLHF_FEEDBACK_API_KEY").ok(),
        })
    };
    let (src, text) = upload_text(up, "upload.jsonl")?;
    let mut rows = parse_jsonl(&src, &text)?;
    drop(text);
    let mut generated = 0;
    if let Some(g) = generate {
        generated = g.fill(&mut rows).await?;
    }
    let items = expand(&src, &rows, p.kind, &p.criteria, p.likert_max)?;
    let (inserted, skipped) = st.db.insert_items(Some(admin.id), id, &src, &items).await?;
    Ok(html(
        "Import finished",
        &ctx,
        format!(
            r#"<section><p>{} rows read from {}, {generated} generated; {inserted} items added, {skipped} already present.</p><p><a href="/p/{id}">Back to the project</a></p></section>"#,
            rows.len(),
            esc(&src)
        ),
    )
    .into_response())
}

pub async fn project_scores(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    req: Request,
) -> AppResult<Response> {
    let admin = ctx.admin()?;
    st.db.project(id).await?;
    let up = read_upload(&ctx, st.cfg.max_upload_bytes, req).await?;
    let (src, text) = upload_text(up, "scores.jsonl")?;
    let scores = parse_scores(&src, &text)?;
    let n = st
        .db
        .set_uncertainties(Some(admin.id), id, &src, &scores)
        .await?;
    Ok(html(
        "Scores imported",
        &ctx,
        format!(r#"<section><p>Uncertainty stored for {n} items.</p><p><a href="/p/{id}">Back to the project</a></p></section>"#),
    )
    .into_response())
}

pub async fn guidelines(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
) -> AppResult<Response> {
    let user = ctx.user()?;
    let p = st.db.project_for(user, id).await?;
    let text = if p.guidelines.trim().is_empty() {
        "<p>No guidelines yet.</p>".to_string()
    } else {
        markdownish(&p.guidelines)
    };
    let mut body = format!(
        r#"<section class="guidelines">{text}</section><p><a href="/p/{id}/task">Start labelling</a></p>"#
    );
    if user.role == Role::Admin {
        body.push_str(&format!(
            r#"<section><h2>Edit</h2><p class="hint"><code># heading</code>, <code>- bullet</code>, <code>**bold**</code>, <code>`code`</code>; blank line = new paragraph.</p>
<form method="post" action="/p/{id}/guidelines">{}<textarea name="text">{}</textarea><p><button type="submit">Save guidelines</button></p></form></section>"#,
            csrf_field(&ctx.csrf),
            esc(&p.guidelines)
        ));
    }
    Ok(html(&format!("Guidelines · {}", p.name), &ctx, body).into_response())
}

#[derive(Deserialize)]
pub struct GuidelinesForm {
    #[serde(default)]
    text: String,
}

pub async fn guidelines_save(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Form(f): Form<GuidelinesForm>,
) -> AppResult<Response> {
    let admin = ctx.admin()?;
    st.db.project(id).await?;
    let text = text_field("text", Some(&f.text), true)?;
    st.db.set_guidelines(admin.id, id, &text).await?;
    Ok(see_other(&format!("/p/{id}/guidelines")))
}

// ------------------------------------------------------------------ labelling

#[derive(Deserialize)]
pub struct TaskQuery {
    item: Option<i64>,
    /// Set by the undo redirect, to confirm the withdrawal.
    #[serde(default)]
    undone: bool,
}

pub async fn task(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Query(q): Query<TaskQuery>,
) -> AppResult<Response> {
    let user = ctx.user()?;
    let p = st.db.project_for(user, id).await?;
    let (done, open) = st.db.progress(&p, user.id).await?;
    let (full, n) = st.db.completion(&p).await?;
    let bar = queue_progress(done, open, full, n);
    let csrf = csrf_field(&ctx.csrf);
    let undo_form = format!(
        r#"<form method="post" action="/p/{id}/undo" id="undo-form" class="inline">{csrf}<input type="hidden" name="key" value="{}"><button type="submit"><kbd>u</kbd> Undo last</button></form>"#,
        random_token()
    );
    let task = match q.item {
        Some(i) => {
            let item = st.db.item(id, i).await?;
            Some((
                st.db
                    .open_item(
                        &item,
                        user.id,
                        p.kind == TaskKind::Pairwise,
                        st.cfg.lease_ms,
                    )
                    .await?,
                item,
            ))
        }
        None => st.db.open_task(&p, user.id, done, st.cfg.lease_ms).await?,
    };
    let Some((a, item)) = task else {
        return Ok(html(
            &format!("{} · done", p.name),
            &ctx,
            format!(r#"{bar}<section><p>Nothing left to label for you in this project. Thank you!</p><p>{undo_form} <a href="/">Projects</a></p></section>"#),
        )
        .into_response());
    };
    // Queue items never carry a live label of mine; only an explicit ?item= can.
    let previous = match q.item {
        Some(_) => st.db.live_label(item.id, user.id).await?,
        None => None,
    };
    let prev_note = if q.undone {
        r#"<p class="notice">Answer withdrawn. The item is back, with the sides as you saw them: answer it again.</p>"#
    } else if previous.is_some() {
        r#"<p class="hint">You already labelled this item; submitting records a new answer that replaces it.</p>"#
    } else {
        ""
    };
    let hidden = format!(
        r#"{csrf}<input type="hidden" name="assignment" value="{}"><input type="hidden" name="key" value="{}">"#,
        a.id,
        random_token()
    );
    let prompt = format!(
        r#"<h3>Prompt</h3><div class="prompt">{}</div>"#,
        esc(&item.prompt)
    );
    let response0 = item.responses.first().map(|r| esc(r)).unwrap_or_default();
    // A "change" page starts from the annotator's previous answer.
    let prev = previous.as_ref().map(|l| &l.value);
    let prev_text = match prev {
        Some(LabelValue::Correction { corrected, .. }) => Some(esc(corrected)),
        Some(LabelValue::Critique { text } | LabelValue::Demonstration { text }) => Some(esc(text)),
        _ => None,
    };
    let prev_choice = match prev {
        Some(v @ LabelValue::Pairwise { .. }) => format!(
            r#"<p class="hint">Your previous answer: <strong>{}</strong>.</p>"#,
            label_summary(v)
        ),
        _ => String::new(),
    };
    let form = match p.kind {
        TaskKind::Pairwise => {
            let (l, r) = (a.shown_order[0], a.shown_order[1]);
            format!(
                r#"<div class="pair"><div><h3>A (left)</h3><div class="response" id="resp-a">{}</div></div><div><h3>B (right)</h3><div class="response" id="resp-b">{}</div></div></div>
{prev_choice}<form method="post" action="/p/{id}/label" id="task-form" class="choices">{hidden}
<button type="submit" name="choice" value="A" data-key="1"><kbd>1</kbd> A is better</button>
<button type="submit" name="choice" value="B" data-key="2"><kbd>2</kbd> B is better</button>
<button type="submit" name="choice" value="tie" data-key="3"><kbd>3</kbd> Tie</button>
<button type="submit" name="choice" value="both_bad" data-key="4"><kbd>4</kbd> Both bad</button></form>"#,
                esc(&item.responses[l]),
                esc(&item.responses[r])
            )
        }
        TaskKind::Rating => {
            let mut crit = String::new();
            for c in &p.criteria {
                let before = match prev {
                    Some(LabelValue::Rating { scores }) => scores.get(c).copied(),
                    _ => None,
                };
                let radios: String = (1..=p.likert_max)
                    .map(|v| {
                        let checked = if before == Some(v) { " checked" } else { "" };
                        format!(r#"<label><input type="radio" name="score_{0}" value="{v}" required{checked}> {v}</label>"#, esc(c))
                    })
                    .collect();
                crit.push_str(&format!(
                    r#"<div class="criterion"><strong>{}</strong>: {radios}</div>"#,
                    esc(c)
                ));
            }
            format!(
                r#"<div class="single"><h3>Response</h3><div class="response">{response0}</div></div>
<form method="post" action="/p/{id}/label" id="task-form">{hidden}{crit}
<p class="hint">Digits rate the highlighted criterion (1 = worst, {} = best) and move on; <kbd>↑</kbd>/<kbd>↓</kbd> move between criteria; <kbd>Enter</kbd> submits.</p>
<p class="actions"><button type="submit">Submit <kbd>Enter</kbd></button></p></form>"#,
                p.likert_max
            )
        }
        TaskKind::Correction => format!(
            r#"<form method="post" action="/p/{id}/label" id="task-form">{hidden}
<h3>Response — edit it into a good answer</h3><textarea name="corrected" rows="12" autofocus>{}</textarea>
<p class="actions"><button type="submit">Submit <kbd>Ctrl</kbd>+<kbd>Enter</kbd></button></p></form>"#,
            prev_text.clone().unwrap_or(response0.clone())
        ),
        TaskKind::Critique => format!(
            r#"<div class="single"><h3>Response</h3><div class="response">{response0}</div></div>
<form method="post" action="/p/{id}/label" id="task-form">{hidden}
<h3>Critique</h3><textarea name="text" rows="8" required autofocus>{}</textarea>
<p class="actions"><button type="submit">Submit <kbd>Ctrl</kbd>+<kbd>Enter</kbd></button></p></form>"#,
            prev_text.clone().unwrap_or_default()
        ),
        TaskKind::Demonstration => {
            let refs: String = item
                .responses
                .iter()
                .enumerate()
                .map(|(i, r)| format!(r#"<details><summary>Reference {}</summary><div class="response">{}</div></details>"#, i + 1, esc(r)))
                .collect();
            format!(
                r#"{refs}<form method="post" action="/p/{id}/label" id="task-form">{hidden}
<h3>Write the ideal response</h3><textarea name="text" rows="12" required autofocus>{}</textarea>
<p class="actions"><button type="submit">Submit <kbd>Ctrl</kbd>+<kbd>Enter</kbd></button></p></form>"#,
                prev_text.unwrap_or_default()
            )
        }
    };
    let body = format!(
        r#"{bar}<section>{prev_note}{prompt}{form}<p class="hint">{undo_form} <a href="/p/{id}/guidelines">Guidelines</a> · item {}</p></section>"#,
        esc(&item.external_id)
    );
    Ok(html(&p.name, &ctx, body).into_response())
}

/// Builds the stored label value from a submitted task form.
fn label_value(
    p: &Project,
    item: &Item,
    a: &Assignment,
    f: &HashMap<String, String>,
) -> Result<LabelValue, Error> {
    Ok(match p.kind {
        TaskKind::Pairwise => {
            let choice = Choice::parse(f.get("choice").map(String::as_str).unwrap_or(""))?;
            if a.shown_order.len() != 2 {
                return Err(invalid("pairwise assignment without two responses"));
            }
            let preferred = match choice {
                Choice::A => Some(a.shown_order[0]),
                Choice::B => Some(a.shown_order[1]),
                Choice::Tie | Choice::BothBad => None,
            };
            LabelValue::Pairwise {
                choice,
                shown_order: a.shown_order.clone(),
                preferred,
            }
        }
        TaskKind::Rating => {
            let mut scores = std::collections::BTreeMap::new();
            for c in &p.criteria {
                let field = format!("score_{c}");
                let raw = f
                    .get(&field)
                    .ok_or_else(|| invalid(format!("rate every criterion: {c:?} is missing")))?;
                let v: i64 = num(&field, raw)?;
                if !(1..=p.likert_max).contains(&v) {
                    return Err(invalid(format!(
                        "field {field:?}: score must be 1..{}",
                        p.likert_max
                    )));
                }
                scores.insert(c.clone(), v);
            }
            LabelValue::Rating { scores }
        }
        TaskKind::Correction => {
            let corrected = text_field("corrected", f.get("corrected"), false)?;
            let original = item.responses.first().map(String::as_str).unwrap_or("");
            LabelValue::Correction {
                unified_diff: unified_diff(original, &corrected),
                word_diff: word_diff(original, &corrected),
                corrected,
            }
        }
        TaskKind::Critique => LabelValue::Critique {
            text: text_field("text", f.get("text"), false)?,
        },
        TaskKind::Demonstration => LabelValue::Demonstration {
            text: text_field("text", f.get("text"), false)?,
        },
    })
}

pub async fn label(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Form(f): Form<HashMap<String, String>>,
) -> AppResult<Response> {
    let user = ctx.user()?;
    let p = st.db.project_for(user, id).await?;
    let aid: i64 = num(
        "assignment",
        f.get("assignment").map(String::as_str).unwrap_or(""),
    )?;
    // The item must belong to this project (guards against cross-project posting).
    let (a, item) = st.db.assignment_item(aid, user.id, p.id).await?;
    let value = label_value(&p, &item, &a, &f)?;
    let key = f.get("key").map(String::as_str).unwrap_or("");
    let outcome = st
        .db
        .submit_label(p.id, item.id, user.id, Some(&a), &value, key)
        .await?;
    let mut r = see_other(&format!("/p/{id}/task"));
    if let Ok(v) = outcome.id().to_string().parse() {
        r.headers_mut().insert("x-label-id", v);
    }
    if matches!(outcome, Submitted::Duplicate(_)) {
        r.headers_mut()
            .insert("x-duplicate", header::HeaderValue::from_static("1"));
    }
    Ok(r)
}

#[derive(Deserialize)]
pub struct UndoForm {
    #[serde(default)]
    key: String,
}

pub async fn undo(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Form(f): Form<UndoForm>,
) -> AppResult<Response> {
    let user = ctx.user()?;
    let p = st.db.project_for(user, id).await?;
    // A repeated undo submission (same key) must not withdraw a second label: it is
    // acknowledged, whichever label is the last one now.
    if st.db.label_by_key(user.id, &f.key).await?.is_some() {
        return Ok(see_other(&format!("/p/{id}/task")));
    }
    let Some(last) = st.db.last_live_label(p.id, user.id).await? else {
        return Ok(see_other(&format!("/p/{id}/task")));
    };
    match st
        .db
        .submit_label(p.id, last.item_id, user.id, None, &LabelValue::Undo, &f.key)
        .await?
    {
        Submitted::New(_) => Ok(see_other(&format!(
            "/p/{id}/task?item={}&undone=true",
            last.item_id
        ))),
        Submitted::Duplicate(_) => Ok(see_other(&format!("/p/{id}/task"))),
    }
}

// ------------------------------------------------------------------ export

#[derive(Deserialize)]
pub struct ExportForm {
    #[serde(default)]
    format: String,
    #[serde(default)]
    scrub: Option<String>,
    #[serde(default)]
    reliability: Option<String>,
    #[serde(default)]
    min_confidence: String,
    #[serde(default)]
    deliver: String,
}

pub async fn export(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Form(f): Form<ExportForm>,
) -> AppResult<Response> {
    let admin = ctx.admin()?;
    let p = st.db.project(id).await?;
    let format = Format::parse(&f.format)?;
    let scrub = f.scrub.is_some_and(|s| !s.is_empty());
    let min_confidence = if f.min_confidence.trim().is_empty() {
        None
    } else {
        Some(num::<f64>("min_confidence", &f.min_confidence)?)
    };
    let opts = ExportOptions {
        scrub,
        by_reliability: f.reliability.is_some_and(|s| !s.is_empty()),
        min_confidence,
    };
    let rows = export_rows_with(
        &p,
        &st.db.items(id).await?,
        &st.db.live_labels(id).await?,
        format,
        &opts,
    )?;
    st.db
        .audit(
            Some(admin.id),
            "export",
            json!({"project_id": id, "format": format.as_str(), "scrub_pii": scrub, "by_reliability": opts.by_reliability, "min_confidence": min_confidence, "rows": rows.len()}),
        )
        .await?;
    let body = to_jsonl(&rows);
    let file = format!(
        "{}-{}.jsonl",
        p.name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect::<String>(),
        format.as_str()
    );
    let (ctype, disp) = if f.deliver == "download" {
        (
            "application/x-ndjson",
            format!("attachment; filename=\"{file}\""),
        )
    } else {
        (
            "text/plain; charset=utf-8",
            format!("inline; filename=\"{file}\""),
        )
    };
    Ok((
        [
            (header::CONTENT_TYPE, ctype.to_string()),
            (header::CONTENT_DISPOSITION, disp),
        ],
        body,
    )
        .into_response())
}

// ------------------------------------------------------------------ admin

pub async fn users(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
) -> AppResult<Response> {
    ctx.admin()?;
    let csrf = csrf_field(&ctx.csrf);
    let mut rows = String::new();
    for u in st.db.users().await? {
        let other = if u.role == Role::Admin {
            "annotator"
        } else {
            "admin"
        };
        rows.push_str(&format!(
            r#"<tr><td>{}</td><td>{}</td><td>{}</td><td>
<form method="post" action="/admin/users/{id}/role" class="inline">{csrf}<input type="hidden" name="role" value="{other}"><button type="submit">Make {other}</button></form>
<form method="post" action="/admin/users/{id}/invite" class="inline">{csrf}<button type="submit">New invite link</button></form></td></tr>"#,
            esc(&u.username),
            u.role.as_str(),
            if u.has_password { "active" } else { "invited" },
            id = u.id
        ));
    }
    Ok(html(
        "Users",
        &ctx,
        format!(
            r#"<section><table><tr><th>User</th><th>Role</th><th>Status</th><th></th></tr>{rows}</table></section>
<section><h2>Invite someone</h2><form method="post" action="/admin/users">{csrf}
<label>Username <input name="username" required></label>
<label>Role <select name="role"><option value="annotator">annotator</option><option value="admin">admin</option></select></label>
<button type="submit">Create invite link</button></form></section>"#
        ),
    )
    .into_response())
}

fn invite_page(st: &Shared, ctx: &Ctx, username: &str, token: &str) -> Response {
    let link = format!(
        "{}/invite/{}",
        st.cfg.public_url.trim_end_matches('/'),
        token
    );
    html(
        "Invite link",
        ctx,
        format!(
            r#"<section><p>Send this single-use link (valid 7 days) to <strong>{}</strong>; it is shown only once:</p>
<p><input class="invite-link" readonly size="90" value="{}"></p><p><a href="/admin/users">Back to users</a></p></section>"#,
            esc(username),
            esc(&link)
        ),
    )
    .into_response()
}

#[derive(Deserialize)]
pub struct NewUserForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    role: String,
}

pub async fn user_create(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Form(f): Form<NewUserForm>,
) -> AppResult<Response> {
    let admin = ctx.admin()?;
    let role = Role::parse(&f.role)?;
    let uid = st
        .db
        .create_user(Some(admin.id), &f.username, role, None)
        .await?;
    let token = st
        .db
        .create_invite(Some(admin.id), uid, INVITE_TTL_MS)
        .await?;
    Ok(invite_page(&st, &ctx, f.username.trim(), &token))
}

#[derive(Deserialize)]
pub struct RoleForm {
    #[serde(default)]
    role: String,
}

pub async fn user_role(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(uid): Path<i64>,
    Form(f): Form<RoleForm>,
) -> AppResult<Response> {
    let admin = ctx.admin()?;
    st.db.set_role(admin.id, uid, Role::parse(&f.role)?).await?;
    Ok(see_other("/admin/users"))
}

pub async fn user_invite(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(uid): Path<i64>,
) -> AppResult<Response> {
    let admin = ctx.admin()?;
    let u = st.db.user(uid).await?;
    let token = st
        .db
        .create_invite(Some(admin.id), uid, INVITE_TTL_MS)
        .await?;
    Ok(invite_page(&st, &ctx, &u.username, &token))
}

#[derive(Deserialize)]
pub struct AuditQuery {
    before: Option<i64>,
}

pub async fn audit(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Query(q): Query<AuditQuery>,
) -> AppResult<Response> {
    ctx.admin()?;
    let entries = st.db.audit_log(200, q.before.unwrap_or(i64::MAX)).await?;
    let mut rows = String::new();
    for e in &entries {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            e.id,
            fmt_time(e.at),
            e.username.as_deref().map(esc).unwrap_or_else(|| "–".into()),
            esc(&e.action),
            esc(&e.detail)
        ));
    }
    let more = match entries.last() {
        Some(last) if entries.len() == 200 => format!(
            r#"<p><a href="/admin/audit?before={}">Older entries</a></p>"#,
            last.id
        ),
        _ => String::new(),
    };
    Ok(html(
        "Audit log",
        &ctx,
        format!("<section><table><tr><th>#</th><th>When (UTC)</th><th>Who</th><th>Action</th><th>Details</th></tr>{rows}</table>{more}</section>"),
    )
    .into_response())
}
