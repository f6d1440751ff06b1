//! The axum web app: routing, sessions, CSRF and error pages. Handlers live in `pages`.

pub mod html;
mod pages;
mod upload;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::auth::HashPool;
use crate::db::Db;
use crate::error::Error;
use crate::model::{Role, User};
use crate::store::random_token;
use crate::throttle::{Policy, Throttle};

pub const SESSION_COOKIE: &str = "rlhf_session";
/// CSRF token for forms shown before login (login, invite): double-submit cookie.
pub const PRE_COOKIE: &str = "rlhf_pre";
/// Largest form body before login (log-in and invite forms).
const MAX_ANON_FORM_BYTES: usize = 16 * 1024;
/// Largest form body of a logged-in user: text answers and guidelines (100,000
/// characters, URL-encoded). Only admin uploads (multipart) may be larger.
const MAX_FORM_BYTES: usize = 2 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub session_ttl_ms: i64,
    /// Mark cookies Secure (set when the public URL is https; also done per request
    /// behind a proxy that sends `X-Forwarded-Proto: https`).
    pub secure_cookies: bool,
    /// Base URL used in invite links.
    pub public_url: String,
    /// Password hashes run at once, and how many more may wait (past that: 429).
    pub hash_workers: usize,
    pub hash_queue: usize,
    /// Failed-login throttling per account and per client address.
    pub account_throttle: Policy,
    pub address_throttle: Policy,
    /// Largest admin upload (item import, scores), read as a multipart stream.
    pub max_upload_bytes: usize,
    /// How long an opened task stays reserved for its annotator.
    pub lease_ms: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            session_ttl_ms: 12 * 3600 * 1000,
            secure_cookies: false,
            public_url: "http://127.0.0.1:8080".into(),
            hash_workers: 2,
            hash_queue: 32,
            account_throttle: Policy::ACCOUNT,
            address_throttle: Policy::ADDRESS,
            max_upload_bytes: 64 * 1024 * 1024,
            lease_ms: 10 * 60 * 1000,
        }
    }
}

pub struct AppState {
    pub db: Db,
    pub cfg: Config,
    pub hashes: HashPool,
    pub accounts: Throttle,
    pub addresses: Throttle,
}

impl AppState {
    pub fn new(db: Db, cfg: Config) -> AppState {
        AppState {
            hashes: HashPool::new(cfg.hash_workers, cfg.hash_queue),
            accounts: Throttle::new(cfg.account_throttle),
            addresses: Throttle::new(cfg.address_throttle),
            db,
            cfg,
        }
    }
}

pub type Shared = Arc<AppState>;

/// Who is asking, resolved once per request by the middleware.
#[derive(Clone)]
pub struct Ctx {
    pub user: Option<User>,
    /// The token forms must carry: the session's, or the pre-login cookie's.
    pub csrf: String,
    pub session_token: Option<String>,
    pub secure: bool,
    /// The client's address (the TCP peer), when served over a socket.
    pub addr: Option<IpAddr>,
}

impl Ctx {
    pub fn user(&self) -> Result<&User, AppError> {
        self.user.as_ref().ok_or(AppError::LoginRequired)
    }
    pub fn admin(&self) -> Result<&User, AppError> {
        let u = self.user()?;
        if u.role != Role::Admin {
            return Err(AppError::App(Error::Forbidden("admins only".into())));
        }
        Ok(u)
    }
    pub fn cookie(&self, name: &str, value: &str, max_age_s: i64) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}")
    }
}

pub enum AppError {
    LoginRequired,
    Csrf,
    App(Error),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::App(e)
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::App(e.into())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            AppError::LoginRequired => return Redirect::to("/login").into_response(),
            AppError::Csrf => (
                StatusCode::FORBIDDEN,
                "Missing or invalid CSRF token. Reload the page and try again.".to_string(),
            ),
            AppError::App(Error::Invalid(m)) => (StatusCode::BAD_REQUEST, m),
            AppError::App(e @ Error::NotFound(_)) => (StatusCode::NOT_FOUND, e.to_string()),
            AppError::App(e @ Error::Forbidden(_)) => (StatusCode::FORBIDDEN, e.to_string()),
            AppError::App(e @ Error::Conflict(_)) => (StatusCode::CONFLICT, e.to_string()),
            AppError::App(Error::TooLarge(m)) => (StatusCode::PAYLOAD_TOO_LARGE, m),
            AppError::App(Error::TooMany { msg, retry_after_s }) => {
                let mut r = error_page(StatusCode::TOO_MANY_REQUESTS, &msg);
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
                return r;
            }
            AppError::App(Error::Other(e)) => {
                tracing::error!("internal error: {e:#}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal error; see the server log.".to_string(),
                )
            }
        };
        error_page(status, &msg)
    }
}

fn error_page(status: StatusCode, msg: &str) -> Response {
    let body = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Error</title><link rel="stylesheet" href="/static/app.css"></head>
<body><main><section class="error"><h1>{}</h1><p>{}</p><p><a href="/">Back to projects</a></p></section></main></body></html>"#,
        status.as_u16(),
        html::esc(msg)
    );
    (status, Html(body)).into_response()
}

pub type AppResult<T> = Result<T, AppError>;

fn cookie_value(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_string())
        })
}

/// Constant-time comparison so the token can't be guessed byte by byte from timing.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Resolves the session, enforces the CSRF token on every POST (403 otherwise) and
/// hands pre-login visitors a CSRF cookie.
async fn session_and_csrf(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let secure = st.cfg.secure_cookies
        || req
            .headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            == Some("https");
    let session_token = cookie_value(&req, SESSION_COOKIE);
    let mut user = None;
    let mut csrf = None;
    if let Some(tok) = &session_token {
        match st.db.session(tok).await {
            Ok(Some((u, c))) => {
                user = Some(u);
                csrf = Some(c);
            }
            Ok(None) => {}
            Err(e) => return AppError::App(e).into_response(),
        }
    }
    let pre = cookie_value(&req, PRE_COOKIE);
    let mut new_pre = None;
    let csrf = match (csrf, &pre) {
        (Some(c), _) => c,
        (None, Some(p)) => p.clone(),
        (None, None) => {
            let t = random_token();
            new_pre = Some(t.clone());
            t
        }
    };
    let addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let ctx = Ctx {
        user,
        csrf: csrf.clone(),
        session_token: session_token.clone(),
        secure,
        addr,
    };
    let (mut parts, body) = req.into_parts();
    let body = if parts.method == Method::POST {
        let ctype = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if ctype.starts_with("multipart/form-data") {
            // Only admin uploads are multipart; their handler streams the body under its
            // own limit and checks the CSRF field (the first one) before reading on.
            let admin = ctx.user.as_ref().is_some_and(|u| u.role == Role::Admin);
            if !(admin && upload::is_upload_route(parts.uri.path())) {
                return AppError::Csrf.into_response();
            }
            if let Some(n) = declared.filter(|&n| n > st.cfg.max_upload_bytes as u64) {
                return AppError::App(upload::too_large(n, st.cfg.max_upload_bytes))
                    .into_response();
            }
            body
        } else {
            // Small limits apply before anything is read: a body is never buffered
            // beyond what its route accepts, logged in or not.
            let limit = if ctx.user.is_some() {
                MAX_FORM_BYTES
            } else {
                MAX_ANON_FORM_BYTES
            };
            let too_large = || {
                AppError::App(Error::TooLarge(format!(
                    "This form is larger than the server accepts ({} KiB). Large imports are uploaded as files.",
                    limit / 1024
                )))
                .into_response()
            };
            if declared.is_some_and(|n| n > limit as u64) {
                return too_large();
            }
            let bytes: Bytes = match axum::body::to_bytes(body, limit).await {
                Ok(b) => b,
                Err(_) => return too_large(),
            };
            let sent = ctype
                .starts_with("application/x-www-form-urlencoded")
                .then(|| form_urlencoded_value(&bytes, "csrf"))
                .flatten();
            // A POST with no session and no pre-login cookie has nothing to match: reject.
            let expected_ok = ctx.user.is_some() || pre.is_some();
            if !(expected_ok && sent.is_some_and(|s| same(&s, &csrf))) {
                return AppError::Csrf.into_response();
            }
            Body::from(bytes)
        }
    } else {
        body
    };
    let path = parts.uri.path().to_string();
    parts.extensions.insert(ctx.clone());
    let mut resp = next.run(Request::from_parts(parts, body)).await;
    if let Some(t) = new_pre {
        if let Ok(v) = HeaderValue::from_str(&ctx.cookie(PRE_COOKIE, &t, 24 * 3600)) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    let h = resp.headers_mut();
    if !path.starts_with("/static/") {
        // Pages carry sessions' CSRF tokens and annotators' answers: never cache them.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    );
    resp
}

/// Constant-time CSRF check (used by the multipart reader).
pub(crate) fn csrf_ok(ctx: &Ctx, sent: &str) -> bool {
    same(sent, &ctx.csrf)
}

fn form_urlencoded_value(body: &[u8], key: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(pages::home))
        .route("/healthz", get(|| async { "ok" }))
        .route("/static/app.js", get(pages::static_js))
        .route("/static/app.css", get(pages::static_css))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route(
            "/account/password",
            get(pages::password_form).post(pages::password_change),
        )
        .route(
            "/invite/{token}",
            get(pages::invite_form).post(pages::invite_accept),
        )
        .route("/admin/users", get(pages::users).post(pages::user_create))
        .route("/admin/users/{id}/role", post(pages::user_role))
        .route("/admin/users/{id}/invite", post(pages::user_invite))
        .route("/admin/audit", get(pages::audit))
        .route("/projects", post(pages::project_create))
        .route("/p/{id}", get(pages::project))
        .route("/p/{id}/settings", post(pages::project_settings))
        .route("/p/{id}/members", post(pages::project_members))
        // Uploads enforce their own (larger, admin-only) limit while streaming.
        .route(
            "/p/{id}/import",
            post(pages::project_import).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/p/{id}/scores",
            post(pages::project_scores).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/p/{id}/guidelines",
            get(pages::guidelines).post(pages::guidelines_save),
        )
        .route("/p/{id}/task", get(pages::task))
        .route("/p/{id}/label", post(pages::label))
        .route("/p/{id}/undo", post(pages::undo))
        .route("/p/{id}/stats", get(pages::stats_fragment))
        .route("/p/{id}/stats.json", get(pages::stats_json))
        .route("/p/{id}/items.json", get(pages::items_json))
        .route("/p/{id}/export", post(pages::export))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            session_and_csrf,
        ))
        .with_state(state)
}

/// Serves until ctrl-c / SIGTERM.
pub async fn serve(db: Db, cfg: Config, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    serve_on(listener, db, cfg).await
}

pub async fn serve_on(
    listener: tokio::net::TcpListener,
    db: Db,
    cfg: Config,
) -> anyhow::Result<()> {
    let app = router(Arc::new(AppState::new(db, cfg)));
    tracing::info!("listening on http://{}", listener.local_addr()?);
    // The peer address feeds the per-address login throttle.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
    })
    .await?;
    Ok(())
}
