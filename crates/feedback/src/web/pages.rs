//! Route handlers. Every page escapes user content via `esc`; every form carries the
//! CSRF token (checked in the middleware).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use serde::Deserialize;
use serde_json::json;

use super::html::{csrf_field, esc, fmt_opt, fmt_time, markdownish, page, progress_bar};
use super::{AppResult, Ctx, Shared, PRE_COOKIE, SESSION_COOKIE};
use crate::auth::{check_password_rules, hash_password_async, verify_password_async};
use crate::diff::{unified_diff, word_diff};
use crate::error::{invalid, Error};
use crate::export::{export_rows, to_jsonl, Format};
use crate::import::{expand, parse_jsonl, parse_scores, Generate};
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
    s.trim().parse().map_err(|_| invalid(format!("field {field:?}: expected a number, got {:?}", s.chars().take(40).collect::<String>())))
}

fn text_field(field: &str, s: Option<&String>, allow_empty: bool) -> Result<String, Error> {
    let s = s.map(String::as_str).unwrap_or("");
    if !allow_empty && s.trim().is_empty() {
        return Err(invalid(format!("field {field:?} must not be empty")));
    }
    if s.chars().count() > MAX_TEXT_CHARS {
        return Err(invalid(format!("field {field:?} is longer than {MAX_TEXT_CHARS} characters")));
    }
    // Browsers send CRLF from textareas; store the text as typed.
    Ok(s.replace("\r\n", "\n"))
}

pub async fn static_js() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("../../static/app.js"))
}

pub async fn static_css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("../../static/app.css"))
}

// ------------------------------------------------------------------ auth pages

fn login_page(ctx: &Ctx, error: Option<&str>) -> Html<String> {
    let err = error.map(|e| format!(r#"<section class="error">{}</section>"#, esc(e))).unwrap_or_default();
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

pub async fn login(State(st): State<Shared>, Extension(ctx): Extension<Ctx>, Form(f): Form<LoginForm>) -> AppResult<Response> {
    let found = st.db.user_by_name(f.username.trim()).await?;
    let (user, hash) = match found {
        Some((u, Some(h))) => (Some(u), h),
        // Verify against a dummy hash so timing does not reveal which usernames exist.
        _ => (None, crate::auth::dummy_hash().to_string()),
    };
    let ok = verify_password_async(f.password, hash).await;
    let Some(user) = user.filter(|_| ok) else {
        st.db.audit(None, "login_failed", json!({"username": f.username.chars().take(64).collect::<String>()})).await?;
        let mut r = login_page(&ctx, Some("Invalid username or password.")).into_response();
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return Ok(r);
    };
    let (token, _csrf) = st.db.create_session(user.id, st.cfg.session_ttl_ms).await?;
    Ok(session_redirect(&ctx, &token, st.cfg.session_ttl_ms, "/"))
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

pub async fn logout(State(st): State<Shared>, Extension(ctx): Extension<Ctx>) -> AppResult<Response> {
    if let (Some(tok), Some(u)) = (&ctx.session_token, &ctx.user) {
        st.db.delete_session(tok, u.id).await?;
    }
    let mut r = see_other("/login");
    if let Ok(v) = ctx.cookie(SESSION_COOKIE, "", 0).parse() {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(r)
}

pub async fn invite_form(State(st): State<Shared>, Extension(ctx): Extension<Ctx>, Path(token): Path<String>) -> AppResult<Response> {
    let Some(user) = st.db.invite_user(&token).await? else {
        return Err(Error::NotFound("this invite link is invalid, expired or already used".into()).into());
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
    check_password_rules(&f.password)?;
    let hash = hash_password_async(f.password).await?;
    let Some(user) = st.db.redeem_invite(&token, &hash).await? else {
        return Err(Error::NotFound("this invite link is invalid, expired or already used".into()).into());
    };
    let (tok, _) = st.db.create_session(user.id, st.cfg.session_ttl_ms).await?;
    Ok(session_redirect(&ctx, &tok, st.cfg.session_ttl_ms, "/"))
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
            progress_bar(done, done + open, "your labels")
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
        format!("<table><tr><th>Project</th><th>Task</th><th>Progress</th><th></th></tr>{rows}</table>")
    };
    let mut body = format!("<section>{list}</section>");
    if user.role == Role::Admin {
        let kinds: String =
            TaskKind::ALL.iter().map(|k| format!(r#"<option value="{0}">{0}</option>"#, k.as_str())).collect();
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

pub async fn project_create(State(st): State<Shared>, Extension(ctx): Extension<Ctx>, Form(f): Form<ProjectForm>) -> AppResult<Response> {
    let admin = ctx.admin()?;
    let mut p = NewProject::new(f.name.trim(), TaskKind::parse(&f.kind)?);
    p.criteria = parse_criteria(&f.criteria);
    p.likert_max = num("likert_max", &f.likert_max)?;
    p.overlap = num("overlap", &f.overlap)?;
    p.min_seconds = num("min_seconds", &f.min_seconds)?;
    let id = st.db.create_project(Some(admin.id), &p).await?;
    Ok(see_other(&format!("/p/{id}")))
}

pub async fn project(State(st): State<Shared>, Extension(ctx): Extension<Ctx>, Path(id): Path<i64>) -> AppResult<Response> {
    let user = ctx.user()?;
    let p = st.db.project_for(user, id).await?;
    let (done, open) = st.db.progress(&p, user.id).await?;
    let mut body = format!(
        r#"<section><p>Task: <strong>{}</strong>{} · {} annotators per item · <a href="/p/{id}/guidelines">Guidelines</a></p>
{}<p><a href="/p/{id}/task"><button type="button">Start labelling</button></a></p></section>"#,
        p.kind.as_str(),
        if p.kind == TaskKind::Rating {
            format!(" (criteria: {}; scale 1–{})", esc(&p.criteria.join(", ")), p.likert_max)
        } else {
            String::new()
        },
        p.overlap,
        progress_bar(done, done + open, "your labels"),
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
        if s.len() < t.len() { format!("{s}…") } else { s }
    };
    match v {
        LabelValue::Pairwise { choice, .. } => match choice {
            Choice::A => "A (left) better".into(),
            Choice::B => "B (right) better".into(),
            Choice::Tie => "tie".into(),
            Choice::BothBad => "both bad".into(),
        },
        LabelValue::Rating { scores } => scores.iter().map(|(c, s)| format!("{c} {s}")).collect::<Vec<_>>().join(", "),
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
    let formats: String = Format::for_kind(p.kind).iter().map(|f| format!(r#"<option value="{0}">{0}</option>"#, f.as_str())).collect();
    let stats = stats_html(st, p).await?;
    Ok(format!(
        r#"<section><h2>Overview</h2><p>{n} items ({gold} gold), {labels} live labels.</p>{}</section>
<section><h2>Quality</h2><div id="live-stats" data-src="/p/{id}/stats">{stats}</div></section>
<section><h2>Annotators</h2>{member_list}
<form method="post" action="/p/{id}/members">{csrf}<select name="user_id">{options}</select><input type="hidden" name="action" value="add"> <button type="submit">Assign</button></form></section>
<section><h2>Import items</h2><form method="post" action="/p/{id}/import">{csrf}
<p class="hint">JSONL: <code>{{"prompt", "responses": [...]}}</code>, TRL <code>{{"prompt", "chosen", "rejected"}}</code> or <code>{{"prompt", "completion"}}</code>; optional <code>"id"</code> and <code>"gold"</code>.</p>
<p><input type="file" accept=".jsonl,.json,.txt" data-into="import-jsonl"> <input type="hidden" name="source" id="import-jsonl-name" value="upload.jsonl"></p>
<textarea name="jsonl" id="import-jsonl" placeholder='{{"prompt": "...", "responses": ["...", "..."]}}'></textarea>
<p>Rows without responses: generate with an OpenAI-compatible server (optional)
<input name="gen_url" placeholder="http://127.0.0.1:8000" size="28"> model <input name="gen_model" size="12">
n <input name="gen_n" value="2" size="2"> max tokens <input name="gen_max_tokens" value="256" size="4">
temperature <input name="gen_temperature" value="1.0" size="3"></p>
<p><button type="submit">Import</button></p></form></section>
<section><h2>Reward-model uncertainty</h2><form method="post" action="/p/{id}/scores">{csrf}
<p class="hint">JSONL <code>{{"item_id", "uncertainty"}}</code> (from <code>rlhf rm score</code>); queues then serve the most uncertain items first.</p>
<p><input type="file" accept=".jsonl" data-into="scores-jsonl"> <input type="hidden" name="source" id="scores-jsonl-name" value="scores.jsonl"></p>
<textarea name="jsonl" id="scores-jsonl"></textarea><p><button type="submit">Import scores</button></p></form></section>
<section><h2>Export</h2><form method="post" action="/p/{id}/export">{csrf}
<label>Format <select name="format">{formats}</select></label>
<label><input type="checkbox" name="scrub" value="1"> scrub e-mails and phone numbers</label>
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
        p.min_seconds
    ))
}

async fn stats_html(st: &Shared, p: &Project) -> AppResult<String> {
    let items = st.db.items(p.id).await?;
    let labels = st.db.live_labels(p.id).await?;
    let users = st.db.users().await?;
    let s = project_stats(p, &items, &labels, &users);
    let name = |id: i64| users.iter().find(|u| u.id == id).map(|u| esc(&u.username)).unwrap_or_else(|| id.to_string());
    let mut out = String::new();
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
            out.push_str("<table><tr><th>Annotators</th><th>Shared items</th><th>Cohen's κ</th></tr>");
            for (x, y, n, k) in &a.cohen {
                out.push_str(&format!("<tr><td>{} · {}</td><td>{n}</td><td>{}</td></tr>", name(*x), name(*y), fmt_opt(*k, 3)));
            }
            out.push_str("</table>");
        }
    }
    out.push_str("<h3>Annotators</h3><table><tr><th>Annotator</th><th>Labels</th><th>Left share</th><th>Median s/item</th><th>Gold accuracy</th><th>Flags</th></tr>");
    for a in &s.annotators {
        let flags = if a.flags.is_empty() {
            r#"<span class="ok">none</span>"#.to_string()
        } else {
            a.flags.iter().map(|f| format!(r#"<div class="flag">{}</div>"#, esc(f))).collect()
        };
        out.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ({} gold)</td><td>{flags}</td></tr>",
            esc(&a.username),
            a.labels,
            fmt_opt(a.left_share, 2),
            fmt_opt(a.median_seconds, 1),
            fmt_opt(a.gold_accuracy, 2),
            a.gold_answered
        ));
    }
    out.push_str("</table>");
    Ok(out)
}

pub async fn stats_fragment(State(st): State<Shared>, Extension(ctx): Extension<Ctx>, Path(id): Path<i64>) -> AppResult<Response> {
    ctx.admin()?;
    let p = st.db.project(id).await?;
    Ok(Html(stats_html(&st, &p).await?).into_response())
}

pub async fn stats_json(State(st): State<Shared>, Extension(ctx): Extension<Ctx>, Path(id): Path<i64>) -> AppResult<Response> {
    ctx.admin()?;
    let p = st.db.project(id).await?;
    let s = project_stats(&p, &st.db.items(id).await?, &st.db.live_labels(id).await?, &st.db.users().await?);
    Ok(axum::Json(s).into_response())
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
        other => return Err(invalid(format!("action must be add or remove, got {other:?}")).into()),
    };
    st.db.set_member(Some(admin.id), id, num("user_id", &f.user_id)?, add).await?;
    Ok(see_other(&format!("/p/{id}")))
}

#[derive(Deserialize)]
pub struct ImportForm {
    #[serde(default)]
    jsonl: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    gen_url: String,
    #[serde(default)]
    gen_model: String,
    #[serde(default)]
    gen_n: String,
    #[serde(default)]
    gen_max_tokens: String,
    #[serde(default)]
    gen_temperature: String,
}

fn source_name(s: &str, default: &str) -> String {
    let s: String = s.chars().filter(|c| !c.is_control()).take(120).collect();
    if s.trim().is_empty() {
        default.into()
    } else {
        s
    }
}

pub async fn project_import(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Form(f): Form<ImportForm>,
) -> AppResult<Response> {
    let admin = ctx.admin()?;
    let p = st.db.project(id).await?;
    let src = source_name(&f.source, "upload.jsonl");
    let mut rows = parse_jsonl(&src, &f.jsonl)?;
    let mut generated = 0;
    if !f.gen_url.trim().is_empty() {
        let g = Generate {
            url: f.gen_url.trim().to_string(),
            model: f.gen_model.trim().to_string(),
            n: num("gen_n", &f.gen_n)?,
            max_tokens: num("gen_max_tokens", &f.gen_max_tokens)?,
            temperature: num("gen_temperature", &f.gen_temperature)?,
            api_key: std::env::var("RLHF_FEEDBACK_API_KEY").ok(),
        };
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

#[derive(Deserialize)]
pub struct ScoresForm {
    #[serde(default)]
    jsonl: String,
    #[serde(default)]
    source: String,
}

pub async fn project_scores(
    State(st): State<Shared>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Form(f): Form<ScoresForm>,
) -> AppResult<Response> {
    let admin = ctx.admin()?;
    st.db.project(id).await?;
    let src = source_name(&f.source, "scores.jsonl");
    let scores = parse_scores(&src, &f.jsonl)?;
    let n = st.db.set_uncertainties(Some(admin.id), id, &src, &scores).await?;
    Ok(html(
        "Scores imported",
        &ctx,
        format!(r#"<section><p>Uncertainty stored for {n} items.</p><p><a href="/p/{id}">Back to the project</a></p></section>"#),
    )
    .into_response())
}

pub async fn guidelines(State(st): State<Shared>, Extension(ctx): Extension<Ctx>, Path(id): Path<i64>) -> AppResult<Response> {
    let user = ctx.user()?;
    let p = st.db.project_for(user, id).await?;
    let text = if p.guidelines.trim().is_empty() { "<p>No guidelines yet.</p>".to_string() } else { markdownish(&p.guidelines) };
    let mut body = format!(r#"<section class="guidelines">{text}</section><p><a href="/p/{id}/task">Start labelling</a></p>"#);
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
    let bar = progress_bar(done, done + open, "your labels");
    let csrf = csrf_field(&ctx.csrf);
    let undo_form = format!(
        r#"<form method="post" action="/p/{id}/undo" id="undo-form" class="inline">{csrf}<input type="hidden" name="key" value="{}"><button type="submit"><kbd>u</kbd> Undo last</button></form>"#,
        random_token()
    );
    let item = match q.item {
        Some(i) => Some(st.db.item(id, i).await?),
        None => st.db.next_item(&p, user.id, done).await?,
    };
    let Some(item) = item else {
        return Ok(html(
            &format!("{} · done", p.name),
            &ctx,
            format!(r#"{bar}<section><p>Nothing left to label for you in this project. Thank you!</p><p>{undo_form} <a href="/">Projects</a></p></section>"#),
        )
        .into_response());
    };
    let a = st.db.create_assignment(&item, user.id, p.kind == TaskKind::Pairwise).await?;
    // Queue items never carry a live label of mine; only an explicit ?item= can.
    let previous = match q.item {
        Some(_) => st.db.live_label(item.id, user.id).await?,
        None => None,
    };
    let prev_note = if previous.is_some() {
        r#"<p class="hint">You already labelled this item; submitting records a new answer that replaces it.</p>"#
    } else {
        ""
    };
    let hidden = format!(r#"{csrf}<input type="hidden" name="assignment" value="{}"><input type="hidden" name="key" value="{}">"#, a.id, random_token());
    let prompt = format!(r#"<h3>Prompt</h3><div class="prompt">{}</div>"#, esc(&item.prompt));
    let response0 = item.responses.first().map(|r| esc(r)).unwrap_or_default();
    let form = match p.kind {
        TaskKind::Pairwise => {
            let (l, r) = (a.shown_order[0], a.shown_order[1]);
            format!(
                r#"<div class="pair"><div><h3>A (left)</h3><div class="response" id="resp-a">{}</div></div><div><h3>B (right)</h3><div class="response" id="resp-b">{}</div></div></div>
<form method="post" action="/p/{id}/label" id="task-form" class="choices">{hidden}
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
                let radios: String = (1..=p.likert_max)
                    .map(|v| format!(r#"<label><input type="radio" name="score_{0}" value="{v}" required> {v}</label>"#, esc(c)))
                    .collect();
                crit.push_str(&format!(r#"<div class="criterion"><strong>{}</strong>: {radios}</div>"#, esc(c)));
            }
            format!(
                r#"<div class="single"><h3>Response</h3><div class="response">{response0}</div></div>
<form method="post" action="/p/{id}/label" id="task-form">{hidden}{crit}
<p class="hint">Digits rate the highlighted criterion (1 = worst, {} = best) and move on; <kbd>Enter</kbd> submits.</p>
<p class="actions"><button type="submit">Submit <kbd>Enter</kbd></button></p></form>"#,
                p.likert_max
            )
        }
        TaskKind::Correction => format!(
            r#"<form method="post" action="/p/{id}/label" id="task-form">{hidden}
<h3>Response — edit it into a good answer</h3><textarea name="corrected" rows="12">{response0}</textarea>
<p class="actions"><button type="submit">Submit <kbd>Ctrl</kbd>+<kbd>Enter</kbd></button></p></form>"#
        ),
        TaskKind::Critique => format!(
            r#"<div class="single"><h3>Response</h3><div class="response">{response0}</div></div>
<form method="post" action="/p/{id}/label" id="task-form">{hidden}
<h3>Critique</h3><textarea name="text" rows="8" required></textarea>
<p class="actions"><button type="submit">Submit <kbd>Ctrl</kbd>+<kbd>Enter</kbd></button></p></form>"#
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
<h3>Write the ideal response</h3><textarea name="text" rows="12" required></textarea>
<p class="actions"><button type="submit">Submit <kbd>Ctrl</kbd>+<kbd>Enter</kbd></button></p></form>"#
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
fn label_value(p: &Project, item: &Item, a: &Assignment, f: &HashMap<String, String>) -> Result<LabelValue, Error> {
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
            LabelValue::Pairwise { choice, shown_order: a.shown_order.clone(), preferred }
        }
        TaskKind::Rating => {
            let mut scores = std::collections::BTreeMap::new();
            for c in &p.criteria {
                let field = format!("score_{c}");
                let raw = f.get(&field).ok_or_else(|| invalid(format!("rate every criterion: {c:?} is missing")))?;
                let v: i64 = num(&field, raw)?;
                if !(1..=p.likert_max).contains(&v) {
                    return Err(invalid(format!("field {field:?}: score must be 1..{}", p.likert_max)));
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
        TaskKind::Critique => LabelValue::Critique { text: text_field("text", f.get("text"), false)? },
        TaskKind::Demonstration => LabelValue::Demonstration { text: text_field("text", f.get("text"), false)? },
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
    let aid: i64 = num("assignment", f.get("assignment").map(String::as_str).unwrap_or(""))?;
    // The item must belong to this project (guards against cross-project posting).
    let (a, item) = st.db.assignment_item(aid, user.id, p.id).await?;
    let value = label_value(&p, &item, &a, &f)?;
    let key = f.get("key").map(String::as_str).unwrap_or("");
    let outcome = st.db.submit_label(p.id, item.id, user.id, Some(&a), &value, key).await?;
    let mut r = see_other(&format!("/p/{id}/task"));
    if let Ok(v) = outcome.id().to_string().parse() {
        r.headers_mut().insert("x-label-id", v);
    }
    if matches!(outcome, Submitted::Duplicate(_)) {
        r.headers_mut().insert("x-duplicate", header::HeaderValue::from_static("1"));
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
    // A repeated undo submission (same key) must not withdraw a second label.
    let Some(last) = st.db.last_live_label(p.id, user.id).await? else {
        return Ok(see_other(&format!("/p/{id}/task")));
    };
    match st.db.submit_label(p.id, last.item_id, user.id, None, &LabelValue::Undo, &f.key).await? {
        Submitted::New(_) => Ok(see_other(&format!("/p/{id}/task?item={}", last.item_id))),
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
    let rows = export_rows(&p, &st.db.items(id).await?, &st.db.live_labels(id).await?, format, scrub)?;
    st.db
        .audit(Some(admin.id), "export", json!({"project_id": id, "format": format.as_str(), "scrub_pii": scrub, "rows": rows.len()}))
        .await?;
    let body = to_jsonl(&rows);
    let file = format!("{}-{}.jsonl", p.name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect::<String>(), format.as_str());
    let (ctype, disp) = if f.deliver == "download" {
        ("application/x-ndjson", format!("attachment; filename=\"{file}\""))
    } else {
        ("text/plain; charset=utf-8", format!("inline; filename=\"{file}\""))
    };
    Ok(([(header::CONTENT_TYPE, ctype.to_string()), (header::CONTENT_DISPOSITION, disp)], body).into_response())
}

// ------------------------------------------------------------------ admin

pub async fn users(State(st): State<Shared>, Extension(ctx): Extension<Ctx>) -> AppResult<Response> {
    ctx.admin()?;
    let csrf = csrf_field(&ctx.csrf);
    let mut rows = String::new();
    for u in st.db.users().await? {
        let other = if u.role == Role::Admin { "annotator" } else { "admin" };
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
    let link = format!("{}/invite/{}", st.cfg.public_url.trim_end_matches('/'), token);
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

pub async fn user_create(State(st): State<Shared>, Extension(ctx): Extension<Ctx>, Form(f): Form<NewUserForm>) -> AppResult<Response> {
    let admin = ctx.admin()?;
    let role = Role::parse(&f.role)?;
    let uid = st.db.create_user(Some(admin.id), &f.username, role, None).await?;
    let token = st.db.create_invite(Some(admin.id), uid, INVITE_TTL_MS).await?;
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

pub async fn user_invite(State(st): State<Shared>, Extension(ctx): Extension<Ctx>, Path(uid): Path<i64>) -> AppResult<Response> {
    let admin = ctx.admin()?;
    let u = st.db.user(uid).await?;
    let token = st.db.create_invite(Some(admin.id), uid, INVITE_TTL_MS).await?;
    Ok(invite_page(&st, &ctx, &u.username, &token))
}

#[derive(Deserialize)]
pub struct AuditQuery {
    before: Option<i64>,
}

pub async fn audit(State(st): State<Shared>, Extension(ctx): Extension<Ctx>, Query(q): Query<AuditQuery>) -> AppResult<Response> {
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
        Some(last) if entries.len() == 200 => format!(r#"<p><a href="/admin/audit?before={}">Older entries</a></p>"#, last.id),
        _ => String::new(),
    };
    Ok(html(
        "Audit log",
        &ctx,
        format!("<section><table><tr><th>#</th><th>When (UTC)</th><th>Who</th><th>Action</th><th>Details</th></tr>{rows}</table>{more}</section>"),
    )
    .into_response())
}
