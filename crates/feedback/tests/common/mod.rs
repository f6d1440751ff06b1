//! Shared helpers for the integration tests: per-test databases on SQLite and (when
//! RLHF_TEST_POSTGRES_URL is set) PostgreSQL, and an in-process HTTP client with a
//! cookie jar that drives the router via `tower::ServiceExt::oneshot`.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use rlhf_feedback::model::{NewProject, Role, TaskKind};
use rlhf_feedback::web::{router, AppState, Config};
use rlhf_feedback::Db;
use tower::ServiceExt;

pub struct TestDb {
    pub name: &'static str,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    /// (server URL, database name) of a per-test Postgres database, dropped on drop.
    pg: Option<(String, String)>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((base, name)) = self.pg.take() else {
            return;
        };
        // Drop runs inside the test's runtime; use a separate thread and runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut c) = sqlx::PgConnection::connect(&base).await {
                    let _ = sqlx::Executor::execute(
                        &mut c,
                        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
                    )
                    .await;
                }
            })
        })
        .join();
    }
}

/// One fresh database per backend. Postgres databases are created per call so tests
/// can run in parallel, and dropped when the `TestDb` is dropped.
pub async fn databases() -> Vec<TestDb> {
    let mut out = vec![sqlite_db()];
    out.extend(postgres_db().await);
    out
}

pub fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fb.sqlite").display().to_string();
    TestDb {
        name: "sqlite",
        url: path,
        _dir: Some(dir),
        pg: None,
    }
}

/// Records that `suite` did not run because `reason`: a marker file `<target>/tmp/skipped/<suite>.txt`, which
/// `scripts/test.sh` lists after `cargo test` (whose own output hides a passing test's stderr). In CI (`CI`
/// set and not `false`) a skip is a failure: every suite must run there.
pub fn skip(suite: &str, reason: &str) {
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
        panic!("{suite} did not run in CI: {reason}");
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{suite}.txt")), format!("{reason}\n"));
    eprintln!("\n*** SKIP: {suite}: {reason} ***\n");
}

/// A fresh PostgreSQL database, or None (with a recorded SKIP, see [`skip`]) without RLHF_TEST_POSTGRES_URL.
pub async fn postgres_db() -> Option<TestDb> {
    match std::env::var("RLHF_TEST_POSTGRES_URL") {
        Ok(base) if !base.is_empty() => {
            let (url, name) = fresh_pg_database(&base).await;
            Some(TestDb {
                name: "postgres",
                url,
                _dir: None,
                pg: Some((base, name)),
            })
        }
        _ => {
            skip(
                "postgresql",
                "RLHF_TEST_POSTGRES_URL is not set, the feedback tests ran on SQLite only; \
                 run `eval \"$(bash .ci/feedback-setup.sh | tail -n 1)\"` to test PostgreSQL too",
            );
            None
        }
    }
}

async fn fresh_pg_database(base: &str) -> (String, String) {
    use sqlx::Connection;
    let name = format!("rlhf_fb_{}", &rlhf_feedback::store::random_token()[..16]);
    let mut conn = sqlx::PgConnection::connect(base)
        .await
        .expect("connect to RLHF_TEST_POSTGRES_URL");
    // Concurrent CREATE DATABASE can briefly fail while template1 is in use; retry.
    for attempt in 0.. {
        match sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str()).await {
            Ok(_) => break,
            Err(e) if attempt < 20 => {
                eprintln!("CREATE DATABASE {name} failed ({e}); retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("create test database: {e}"),
        }
    }
    let (head, _) = base
        .rsplit_once('/')
        .expect("postgres URL with a database name");
    let tail = base.rsplit_once('/').map(|(_, t)| t).unwrap_or("");
    let query = tail
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    (format!("{head}/{name}{query}"), name)
}

pub struct Seeded {
    pub db: Arc<AppState>,
    pub admin: i64,
    pub ann1: i64,
    pub ann2: i64,
}

pub const PASSWORD: &str = "password-123";

/// Database with an admin and two annotators (all with PASSWORD).
pub async fn seed(url: &str) -> Seeded {
    seed_with(url, Config::default()).await
}

pub async fn seed_with(url: &str, cfg: Config) -> Seeded {
    let db = Db::connect(url).await.expect("connect");
    let h = rlhf_feedback::auth::hash_password(PASSWORD).unwrap();
    let admin = db
        .create_user(None, "admin", Role::Admin, Some(&h))
        .await
        .unwrap();
    let ann1 = db
        .create_user(None, "ann1", Role::Annotator, Some(&h))
        .await
        .unwrap();
    let ann2 = db
        .create_user(None, "ann2", Role::Annotator, Some(&h))
        .await
        .unwrap();
    Seeded {
        db: Arc::new(AppState::new(db, cfg)),
        admin,
        ann1,
        ann2,
    }
}

pub async fn project(
    st: &AppState,
    name: &str,
    kind: TaskKind,
    overlap: i64,
    members: &[i64],
) -> i64 {
    let mut p = NewProject::new(name, kind);
    p.overlap = overlap;
    p.criteria = vec!["helpful".into(), "harmless".into()];
    let id = st.db.create_project(None, &p).await.unwrap();
    for m in members {
        st.db.set_member(None, id, *m, true).await.unwrap();
    }
    id
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn csrf(&self) -> String {
        find(&self.body, r#"name="csrf" value=""#)
            .unwrap_or_else(|| panic!("no csrf field in {}", self.body))
    }
    pub fn field(&self, name: &str) -> String {
        find(&self.body, &format!(r#"name="{name}" value=""#))
            .unwrap_or_else(|| panic!("no {name} field in {}", self.body))
    }
}

fn find(body: &str, prefix: &str) -> Option<String> {
    let start = body.find(prefix)? + prefix.len();
    Some(body[start..].split('"').next()?.to_string())
}

/// A browser-like client: keeps cookies, does not follow redirects.
pub struct Client {
    pub app: Router,
    pub cookies: BTreeMap<String, String>,
}

impl Client {
    pub fn new(st: &Arc<AppState>) -> Client {
        Client {
            app: router(st.clone()),
            cookies: BTreeMap::new(),
        }
    }

    async fn send(&mut self, req: Request<Body>) -> Resp {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        for v in resp.headers().get_all(header::SET_COOKIE) {
            let v = v.to_str().unwrap();
            let (kv, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = kv.split_once('=').unwrap();
            if attrs.contains("Max-Age=0") || val.is_empty() {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_string(), val.to_string());
            }
        }
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub async fn get(&mut self, path: &str) -> Resp {
        let req = Request::get(path)
            .header(header::COOKIE, self.cookie_header())
            .body(Body::empty())
            .unwrap();
        self.send(req).await
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Resp {
        let body = serde_urlencoded::to_string(form).unwrap();
        let req = Request::post(path)
            .header(header::COOKIE, self.cookie_header())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .unwrap();
        self.send(req).await
    }

    /// A multipart/form-data POST, fields in the given order, then an optional file
    /// field `file` (name, contents).
    pub async fn post_multipart(
        &mut self,
        path: &str,
        fields: &[(&str, &str)],
        file: Option<(&str, &[u8])>,
    ) -> Resp {
        const B: &str = "----rlhf-test-boundary";
        let mut body = Vec::new();
        for (k, v) in fields {
            body.extend_from_slice(
                format!("--{B}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                    .as_bytes(),
            );
        }
        if let Some((name, data)) = file {
            body.extend_from_slice(
                format!("--{B}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{B}--\r\n").as_bytes());
        let req = Request::post(path)
            .header(header::COOKIE, self.cookie_header())
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={B}"),
            )
            .body(Body::from(body))
            .unwrap();
        self.send(req).await
    }

    /// Logs in through the form (GET for the CSRF cookie, then POST).
    pub async fn login(&mut self, user: &str) -> String {
        let page = self.get("/login").await;
        assert_eq!(page.status, StatusCode::OK);
        let r = self
            .post(
                "/login",
                &[
                    ("csrf", &page.csrf()),
                    ("username", user),
                    ("password", PASSWORD),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "login failed: {}", r.body);
        assert!(self.cookies.contains_key("rlhf_session"));
        self.csrf().await
    }

    /// The session's CSRF token, read from the projects page.
    pub async fn csrf(&mut self) -> String {
        let home = self.get("/").await;
        assert_eq!(home.status, StatusCode::OK, "{}", home.body);
        home.csrf()
    }

    /// Fetches the next task page and submits `extra` for it; returns the POST response.
    pub async fn label(&mut self, project: i64, extra: &[(&str, &str)]) -> Resp {
        let t = self.get(&format!("/p/{project}/task")).await;
        assert_eq!(t.status, StatusCode::OK, "{}", t.body);
        let (csrf, a, key) = (t.csrf(), t.field("assignment"), t.field("key"));
        let mut form = vec![
            ("csrf", csrf.as_str()),
            ("assignment", a.as_str()),
            ("key", key.as_str()),
        ];
        form.extend_from_slice(extra);
        self.post(&format!("/p/{project}/label"), &form).await
    }
}
