//! Security tests: XSS escaping, SQL injection strings, cross-project access, CSRF and
//! session expiry, on SQLite and (when configured) PostgreSQL.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::*;
use rlhf_feedback::model::TaskKind;
use tower::ServiceExt;

const XSS: &[&str] = &[
    "<script>alert('xss')</script>",
    "\"><img src=x onerror=alert(1)>",
    "<svg/onload=alert(2)>",
    "javascript:alert(3)//'\"",
];

#[tokio::test]
async fn user_content_is_escaped_everywhere() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let mut admin = Client::new(&s.db);
        let csrf = admin.login("admin").await;
        let evil = XSS.join(" ");
        let r = admin
            .post(
                "/projects",
                &[
                    ("csrf", &csrf),
                    ("name", &evil),
                    ("kind", "pairwise"),
                    ("criteria", XSS[0]),
                    ("likert_max", "5"),
                    ("overlap", "1"),
                    ("min_seconds", "1"),
                ],
            )
            .await;
        let pid: i64 = r.location().trim_start_matches("/p/").parse().unwrap();
        let row = serde_json::json!({"id": evil, "prompt": evil, "responses": [evil, format!("{evil} second")]}).to_string();
        let r = admin
            .post(
                &format!("/p/{pid}/import"),
                &[("csrf", &csrf), ("jsonl", &row), ("source", &evil)],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        admin
            .post(
                &format!("/p/{pid}/guidelines"),
                &[
                    ("csrf", &csrf),
                    ("text", &format!("# {evil}\n- {evil}\n{evil}")),
                ],
            )
            .await;
        admin
            .post(
                "/admin/users",
                &[
                    ("csrf", &csrf),
                    ("username", "<b>mallory</b>"),
                    ("role", "annotator"),
                ],
            )
            .await;
        admin
            .post(
                &format!("/p/{pid}/members"),
                &[
                    ("csrf", &csrf),
                    ("user_id", &s.ann1.to_string()),
                    ("action", "add"),
                ],
            )
            .await;

        let mut ann = Client::new(&s.db);
        ann.login("ann1").await;
        let pages = [
            r.body.clone(),
            admin.get("/").await.body,
            admin.get(&format!("/p/{pid}")).await.body,
            admin.get(&format!("/p/{pid}/guidelines")).await.body,
            admin.get("/admin/users").await.body,
            admin.get("/admin/audit").await.body,
            ann.get(&format!("/p/{pid}/task")).await.body,
            ann.get("/").await.body,
        ];
        for (i, body) in pages.iter().enumerate() {
            for p in XSS {
                assert!(!body.contains(p), "page {i} contains raw {p:?}:\n{body}");
            }
            assert!(!body.contains("<b>mallory</b>"), "page {i}");
            assert!(
                !body.contains("<img src=x") && !body.contains("<svg"),
                "page {i}"
            );
        }
        assert!(
            pages[6].contains("&lt;script&gt;alert(&#39;xss&#39;)&lt;/script&gt;"),
            "{}",
            pages[6]
        );
        assert!(pages[4].contains("&lt;b&gt;mallory&lt;/b&gt;"));
        // Error pages escape too (the message echoes the bad input).
        let r = admin
            .post(
                &format!("/p/{pid}/import"),
                &[
                    ("csrf", &csrf),
                    ("jsonl", "{\"prompt\": 1}"),
                    ("source", "<script>x</script>"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(
            !r.body.contains("<script>x</script>")
                && r.body.contains("&lt;script&gt;x&lt;/script&gt;:1"),
            "{}",
            r.body
        );
        // And a CSP forbids inline script as defence in depth.
        let h = admin.get("/").await.headers;
        assert!(h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));
    }
}

const SQLI: &[&str] = &[
    "'; DROP TABLE labels; --",
    "\" OR \"1\"=\"1",
    "1 OR 1=1",
    "Robert'); DROP TABLE users;--",
    "' UNION SELECT password_hash FROM users --",
    "$1 $2 ?1 :name @x",
];

#[tokio::test]
async fn sql_injection_strings_are_data() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let mut admin = Client::new(&s.db);
        let csrf = admin.login("admin").await;
        // Login fields.
        for inj in SQLI {
            let mut c = Client::new(&s.db);
            let page = c.get("/login").await;
            let r = c
                .post(
                    "/login",
                    &[("csrf", &page.csrf()), ("username", inj), ("password", inj)],
                )
                .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
            let r = c
                .post(
                    "/login",
                    &[
                        ("csrf", &page.csrf()),
                        ("username", "admin"),
                        ("password", inj),
                    ],
                )
                .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        }
        for (i, inj) in SQLI.iter().enumerate() {
            // Project name / criteria / numbers.
            let name = format!("{inj} {i}");
            let r = admin
                .post(
                    "/projects",
                    &[
                        ("csrf", &csrf),
                        ("name", &name),
                        ("kind", "critique"),
                        ("criteria", inj),
                        ("likert_max", "5"),
                        ("overlap", "1"),
                        ("min_seconds", "1"),
                    ],
                )
                .await;
            assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
            let pid: i64 = r.location().trim_start_matches("/p/").parse().unwrap();
            assert_eq!(s.db.db.project(pid).await.unwrap().name, name);
            for (field, value) in [("kind", *inj), ("likert_max", *inj), ("overlap", *inj)] {
                let mut form = vec![
                    ("csrf", csrf.as_str()),
                    ("name", "n"),
                    ("kind", "rating"),
                    ("criteria", "a"),
                    ("likert_max", "5"),
                    ("overlap", "1"),
                    ("min_seconds", "1"),
                ];
                form.retain(|(k, _)| *k != field);
                form.push((field, value));
                assert_eq!(
                    admin.post("/projects", &form).await.status,
                    StatusCode::BAD_REQUEST,
                    "{field}"
                );
            }
            // Import: id, prompt, responses; guidelines; scores; members; roles; users.
            let row = serde_json::json!({"id": inj, "prompt": inj, "responses": [inj]}).to_string();
            assert_eq!(
                admin
                    .post(
                        &format!("/p/{pid}/import"),
                        &[("csrf", &csrf), ("jsonl", &row), ("source", inj)]
                    )
                    .await
                    .status,
                StatusCode::OK
            );
            let items = s.db.db.items(pid).await.unwrap();
            assert_eq!(
                (items[0].external_id.as_str(), items[0].prompt.as_str()),
                (*inj, *inj)
            );
            assert_eq!(
                admin
                    .post(
                        &format!("/p/{pid}/guidelines"),
                        &[("csrf", &csrf), ("text", inj)]
                    )
                    .await
                    .status,
                StatusCode::SEE_OTHER
            );
            assert_eq!(s.db.db.project(pid).await.unwrap().guidelines, *inj);
            let scores = serde_json::json!({"item_id": inj, "uncertainty": 0.5}).to_string();
            assert_eq!(
                admin
                    .post(
                        &format!("/p/{pid}/scores"),
                        &[("csrf", &csrf), ("jsonl", &scores)]
                    )
                    .await
                    .status,
                StatusCode::OK
            );
            assert_eq!(
                admin
                    .post(
                        &format!("/p/{pid}/members"),
                        &[("csrf", &csrf), ("user_id", inj), ("action", "add")]
                    )
                    .await
                    .status,
                StatusCode::BAD_REQUEST
            );
            assert_eq!(
                admin
                    .post(
                        &format!("/p/{pid}/members"),
                        &[
                            ("csrf", &csrf),
                            ("user_id", &s.ann1.to_string()),
                            ("action", inj)
                        ]
                    )
                    .await
                    .status,
                StatusCode::BAD_REQUEST
            );
            assert_eq!(
                admin
                    .post(
                        &format!("/p/{pid}/members"),
                        &[
                            ("csrf", &csrf),
                            ("user_id", &s.ann1.to_string()),
                            ("action", "add")
                        ]
                    )
                    .await
                    .status,
                StatusCode::SEE_OTHER
            );
            assert_eq!(
                admin
                    .post(
                        &format!("/admin/users/{}/role", s.ann2),
                        &[("csrf", &csrf), ("role", inj)]
                    )
                    .await
                    .status,
                StatusCode::BAD_REQUEST
            );
            let uname = format!("u{i}{inj}");
            assert_eq!(
                admin
                    .post(
                        "/admin/users",
                        &[("csrf", &csrf), ("username", &uname), ("role", "annotator")]
                    )
                    .await
                    .status,
                StatusCode::OK
            );
            assert!(s.db.db.user_by_name(&uname).await.unwrap().is_some());
            assert_eq!(
                admin
                    .post(
                        &format!("/p/{pid}/export"),
                        &[("csrf", &csrf), ("format", inj)]
                    )
                    .await
                    .status,
                StatusCode::BAD_REQUEST
            );
            // Label text fields, the idempotency key and the assignment id.
            let mut ann = Client::new(&s.db);
            ann.login("ann1").await;
            let t = ann.get(&format!("/p/{pid}/task")).await;
            let (c, a) = (t.csrf(), t.field("assignment"));
            assert_eq!(
                ann.post(
                    &format!("/p/{pid}/label"),
                    &[
                        ("csrf", &c),
                        ("assignment", inj),
                        ("key", inj),
                        ("text", inj)
                    ]
                )
                .await
                .status,
                StatusCode::BAD_REQUEST
            );
            let r = ann
                .post(
                    &format!("/p/{pid}/label"),
                    &[
                        ("csrf", &c),
                        ("assignment", &a),
                        ("key", inj),
                        ("text", inj),
                    ],
                )
                .await;
            assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
            let labels = s.db.db.live_labels(pid).await.unwrap();
            assert_eq!(labels.len(), 1);
            assert_eq!(
                labels[0].value,
                rlhf_feedback::model::LabelValue::Critique {
                    text: inj.to_string()
                }
            );
            // Query-string parameters.
            assert_eq!(
                ann.get(&format!("/p/{pid}/task?item=1%20OR%201=1"))
                    .await
                    .status,
                StatusCode::BAD_REQUEST
            );
            assert_eq!(
                admin.get("/admin/audit?before=0%20OR%201=1").await.status,
                StatusCode::BAD_REQUEST
            );
        }
        // Every table still exists and holds the expected rows.
        assert_eq!(s.db.db.users().await.unwrap().len(), 3 + SQLI.len());
        let n: i64 = sqlx::Row::get(
            &sqlx::query("SELECT COUNT(*) FROM labels")
                .fetch_one(&s.db.db.pool)
                .await
                .unwrap(),
            0,
        );
        assert_eq!(n, SQLI.len() as i64);
    }
}

#[tokio::test]
async fn cross_project_access_is_denied() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let st = &s.db;
        let mine = project(st, "mine", TaskKind::Pairwise, 2, &[s.ann1, s.ann2]).await;
        let theirs = project(st, "theirs", TaskKind::Pairwise, 2, &[s.ann2]).await;
        for p in [mine, theirs] {
            let items = vec![rlhf_feedback::model::NewItem {
                external_id: format!("i{p}"),
                prompt: format!("secret prompt {p}"),
                responses: vec!["a".into(), "b".into()],
                gold: None,
            }];
            st.db.insert_items(None, p, "t", &items).await.unwrap();
        }
        let mut a1 = Client::new(st);
        let csrf = a1.login("ann1").await;
        let home = a1.get("/").await.body;
        assert!(home.contains("mine") && !home.contains("theirs"));
        for path in [
            format!("/p/{theirs}"),
            format!("/p/{theirs}/task"),
            format!("/p/{theirs}/guidelines"),
            "/p/9999/task".to_string(),
        ] {
            let r = a1.get(&path).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
            assert!(!r.body.contains("secret prompt"), "{path}");
        }
        // An item of another project can't be pulled into mine via ?item=.
        let their_item = st.db.items(theirs).await.unwrap()[0].id;
        assert_eq!(
            a1.get(&format!("/p/{mine}/task?item={their_item}"))
                .await
                .status,
            StatusCode::NOT_FOUND
        );
        // My own assignment posted to the other project: not a member → 403.
        let t = a1.get(&format!("/p/{mine}/task")).await;
        let a = t.field("assignment");
        let r = a1
            .post(
                &format!("/p/{theirs}/label"),
                &[
                    ("csrf", &csrf),
                    ("assignment", &a),
                    ("key", "k1"),
                    ("choice", "A"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(
            a1.post(
                &format!("/p/{theirs}/undo"),
                &[("csrf", &csrf), ("key", "k2")]
            )
            .await
            .status,
            StatusCode::FORBIDDEN
        );
        // Someone else's assignment (ann2's, on the other project) posted to mine → 404.
        let mut a2 = Client::new(st);
        a2.login("ann2").await;
        let t2 = a2.get(&format!("/p/{theirs}/task")).await;
        let a_other = t2.field("assignment");
        let r = a1
            .post(
                &format!("/p/{mine}/label"),
                &[
                    ("csrf", &csrf),
                    ("assignment", &a_other),
                    ("key", "k3"),
                    ("choice", "A"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        // ann2's own assignment from "theirs" posted to "mine" by ann2 → 404 (item not in project).
        let c2 = a2.csrf().await;
        let r = a2
            .post(
                &format!("/p/{mine}/label"),
                &[
                    ("csrf", &c2),
                    ("assignment", &a_other),
                    ("key", "k4"),
                    ("choice", "A"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(st.db.live_labels(mine).await.unwrap().is_empty());
        assert!(st.db.live_labels(theirs).await.unwrap().is_empty());
        // Removing a member revokes access immediately.
        st.db.set_member(None, mine, s.ann1, false).await.unwrap();
        assert_eq!(
            a1.get(&format!("/p/{mine}/task")).await.status,
            StatusCode::FORBIDDEN
        );
    }
}

#[tokio::test]
async fn csrf_is_required_on_every_post() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let pid = project(&s.db, "p", TaskKind::Pairwise, 1, &[s.ann1]).await;
        let mut admin = Client::new(&s.db);
        let csrf = admin.login("admin").await;
        let mut other = Client::new(&s.db);
        let other_csrf = other.login("ann1").await;
        let posts = [
            "/logout".to_string(),
            "/projects".into(),
            "/admin/users".into(),
            format!("/admin/users/{}/role", s.ann1),
            format!("/admin/users/{}/invite", s.ann1),
            format!("/p/{pid}/settings"),
            format!("/p/{pid}/members"),
            format!("/p/{pid}/import"),
            format!("/p/{pid}/scores"),
            format!("/p/{pid}/guidelines"),
            format!("/p/{pid}/label"),
            format!("/p/{pid}/undo"),
            format!("/p/{pid}/export"),
        ];
        for path in &posts {
            for bad in [None, Some("0000"), Some(other_csrf.as_str()), Some("")] {
                let mut form = vec![
                    ("username", "x"),
                    ("role", "admin"),
                    ("format", "preference"),
                ];
                if let Some(b) = bad {
                    form.push(("csrf", b));
                }
                let r = admin.post(path, &form).await;
                assert_eq!(r.status, StatusCode::FORBIDDEN, "{path} with {bad:?}");
            }
        }
        // The session survived all of that and the token works.
        assert_eq!(
            admin
                .post(
                    &format!("/p/{pid}/guidelines"),
                    &[("csrf", &csrf), ("text", "ok")]
                )
                .await
                .status,
            StatusCode::SEE_OTHER
        );
        // A token in a non-form body (e.g. JSON) is not accepted either.
        let req = Request::post(format!("/p/{pid}/guidelines"))
            .header(
                header::COOKIE,
                format!("rlhf_session={}", admin.cookies["rlhf_session"]),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(format!(
                "{{\"csrf\": \"{csrf}\", \"text\": \"x\"}}"
            )))
            .unwrap();
        assert_eq!(
            admin.app.clone().oneshot(req).await.unwrap().status(),
            StatusCode::FORBIDDEN
        );
        // Login and invite forms use the pre-login cookie: a POST without it is refused.
        let mut fresh = Client::new(&s.db);
        let r = fresh
            .post(
                "/login",
                &[
                    ("csrf", "anything"),
                    ("username", "admin"),
                    ("password", PASSWORD),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let page = fresh.get("/login").await;
        let r = fresh
            .post(
                "/login",
                &[
                    ("csrf", "wrong"),
                    ("username", "admin"),
                    ("password", PASSWORD),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r = fresh
            .post(
                "/login",
                &[
                    ("csrf", &page.csrf()),
                    ("username", "admin"),
                    ("password", PASSWORD),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
    }
}

#[tokio::test]
async fn sessions_expire_and_cookies_are_locked_down() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let mut c = Client::new(&s.db);
        let page = c.get("/login").await;
        let r = c
            .post(
                "/login",
                &[
                    ("csrf", &page.csrf()),
                    ("username", "ann1"),
                    ("password", PASSWORD),
                ],
            )
            .await;
        let set = r
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .find(|v| v.starts_with("rlhf_session="))
            .unwrap();
        assert!(
            set.contains("HttpOnly")
                && set.contains("SameSite=Strict")
                && set.contains("Max-Age=43200"),
            "{set}"
        );
        assert!(!set.contains("Secure"), "plain http: no Secure flag");
        let csrf = c.csrf().await;
        // Expire it server-side: the cookie no longer works.
        let token = c.cookies["rlhf_session"].clone();
        s.db.db
            .set_session_expiry(&token, rlhf_feedback::db::now_ms() - 1)
            .await
            .unwrap();
        let r = c.get("/").await;
        assert_eq!((r.status, r.location()), (StatusCode::SEE_OTHER, "/login"));
        let r = c.post("/logout", &[("csrf", &csrf)]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        // Behind an https proxy the cookie gets Secure.
        let req = Request::get("/login")
            .header("x-forwarded-proto", "https")
            .body(Body::empty())
            .unwrap();
        let resp = c.app.clone().oneshot(req).await.unwrap();
        let pre = resp
            .headers()
            .get(header::SET_COOKIE)
            .unwrap()
            .to_str()
            .unwrap();
        assert!(
            pre.contains("; Secure") && pre.contains("HttpOnly") && pre.contains("SameSite=Strict"),
            "{pre}"
        );
    }
}

fn invite_path(body: &str) -> String {
    let link = body
        .split("value=\"")
        .find(|p| p.starts_with("http"))
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    link.trim_start_matches("http://127.0.0.1:8080").to_string()
}

/// Only the newest invite link of a user works; it works once.
#[tokio::test]
async fn a_new_invite_revokes_older_links() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let mut admin = Client::new(&s.db);
        let csrf = admin.login("admin").await;
        let first = invite_path(
            &admin
                .post(
                    "/admin/users",
                    &[
                        ("csrf", &csrf),
                        ("username", "carol"),
                        ("role", "annotator"),
                    ],
                )
                .await
                .body,
        );
        let carol = s.db.db.user_by_name("carol").await.unwrap().unwrap().0.id;
        let second = invite_path(
            &admin
                .post(&format!("/admin/users/{carol}/invite"), &[("csrf", &csrf)])
                .await
                .body,
        );
        let mut c = Client::new(&s.db);
        assert_eq!(
            c.get(&first).await.status,
            StatusCode::NOT_FOUND,
            "older link revoked by the newer one"
        );
        let page = c.get(&second).await;
        assert_eq!(page.status, StatusCode::OK);
        // The revoked link can't be posted to either (account takeover path of the report).
        let r = c
            .post(
                &first,
                &[
                    ("csrf", &page.csrf()),
                    ("password", "takeover-123"),
                    ("password2", "takeover-123"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = c
            .post(
                &second,
                &[
                    ("csrf", &page.csrf()),
                    ("password", "carol-pass-1"),
                    ("password2", "carol-pass-1"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        let mut d = Client::new(&s.db);
        let p = d.get("/login").await;
        assert_eq!(
            d.get(&second).await.status,
            StatusCode::NOT_FOUND,
            "single use"
        );
        assert_eq!(
            d.post(
                "/login",
                &[
                    ("csrf", &p.csrf()),
                    ("username", "carol"),
                    ("password", "takeover-123")
                ]
            )
            .await
            .status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            d.post(
                "/login",
                &[
                    ("csrf", &p.csrf()),
                    ("username", "carol"),
                    ("password", "carol-pass-1")
                ]
            )
            .await
            .status,
            StatusCode::SEE_OTHER
        );
    }
}

/// A reset (invite redeemed) ends every session of the user; a password change ends
/// all but the one that made it.
#[tokio::test]
async fn password_reset_and_change_end_other_sessions() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let mut admin = Client::new(&s.db);
        let csrf = admin.login("admin").await;
        let mut old_device = Client::new(&s.db);
        old_device.login("ann1").await;
        let reset = invite_path(
            &admin
                .post(
                    &format!("/admin/users/{}/invite", s.ann1),
                    &[("csrf", &csrf)],
                )
                .await
                .body,
        );
        let mut b = Client::new(&s.db);
        let page = b.get(&reset).await;
        let r = b
            .post(
                &reset,
                &[
                    ("csrf", &page.csrf()),
                    ("password", "brand-new-1"),
                    ("password2", "brand-new-1"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert_eq!(
            old_device.get("/").await.location(),
            "/login",
            "session from before the reset still alive"
        );
        assert_eq!(b.get("/").await.status, StatusCode::OK);

        // Change password on b while c is logged in too: c is logged out, b stays.
        let mut c = Client::new(&s.db);
        let p = c.get("/login").await;
        assert_eq!(
            c.post(
                "/login",
                &[
                    ("csrf", &p.csrf()),
                    ("username", "ann1"),
                    ("password", "brand-new-1")
                ]
            )
            .await
            .status,
            StatusCode::SEE_OTHER
        );
        let bc = b.csrf().await;
        let wrong = b
            .post(
                "/account/password",
                &[
                    ("csrf", &bc),
                    ("current", "nope-nope"),
                    ("password", "x-new-pass-2"),
                    ("password2", "x-new-pass-2"),
                ],
            )
            .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
        assert_eq!(c.get("/").await.status, StatusCode::OK);
        let ok = b
            .post(
                "/account/password",
                &[
                    ("csrf", &bc),
                    ("current", "brand-new-1"),
                    ("password", "x-new-pass-2"),
                    ("password2", "x-new-pass-2"),
                ],
            )
            .await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
        assert_eq!(c.get("/").await.location(), "/login");
        assert_eq!(b.get("/").await.status, StatusCode::OK);
        assert_eq!(
            admin.get("/").await.status,
            StatusCode::OK,
            "other users keep their sessions"
        );
    }
}

/// 50 wrong passwords, then the right one: refused while the account is locked (it
/// used to log in), audited once per burst, and accepted after the lockout ends.
#[tokio::test]
async fn brute_force_is_throttled_and_audited_once_per_burst() {
    use rlhf_feedback::throttle::Policy;
    for tdb in databases().await {
        let short = Policy {
            free_failures: 5,
            base_delay_ms: 1000,
            max_delay_ms: 2000,
            window_ms: 60_000,
        };
        let cfg = rlhf_feedback::web::Config {
            account_throttle: short,
            ..Default::default()
        };
        let s = seed_with(&tdb.url, cfg).await;
        let mut c = Client::new(&s.db);
        let page = c.get("/login").await;
        let csrf = page.csrf();
        let mut statuses = std::collections::BTreeMap::new();
        for i in 0..50 {
            let r = c
                .post(
                    "/login",
                    &[
                        ("csrf", &csrf),
                        ("username", "ann1"),
                        ("password", &format!("guess-{i}")),
                    ],
                )
                .await;
            *statuses.entry(r.status.as_u16()).or_insert(0) += 1;
        }
        assert!(
            statuses[&401] <= 8,
            "{statuses:?}: guesses kept being checked"
        );
        assert!(statuses[&429] >= 42, "{statuses:?}");
        let r = c
            .post(
                "/login",
                &[
                    ("csrf", &csrf),
                    ("username", "ann1"),
                    ("password", PASSWORD),
                ],
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::TOO_MANY_REQUESTS,
            "the right password logged in during the lockout"
        );
        assert!(
            r.body.contains("Too many failed log-ins") && r.headers.contains_key("retry-after"),
            "{}",
            r.body
        );
        // Another account is not affected.
        let mut other = Client::new(&s.db);
        other.login("ann2").await;
        let audit = s.db.db.audit_log(1000, i64::MAX).await.unwrap();
        let about_ann1: Vec<&str> = audit
            .iter()
            .filter(|e| e.action.starts_with("login") && e.detail.contains("\"ann1\""))
            .map(|e| e.action.as_str())
            .collect();
        assert_eq!(
            about_ann1,
            vec!["login_throttled", "login_failed"],
            "newest first"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        let r = c
            .post(
                "/login",
                &[
                    ("csrf", &csrf),
                    ("username", "ann1"),
                    ("password", PASSWORD),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    }
}

/// Bodies are refused by size before they are read: 16 KiB before login, 2 MiB for
/// users' forms; only admins' multipart uploads may be large (streamed, own limit).
#[tokio::test]
async fn body_limits_apply_before_reading() {
    use futures_util_free::pending_after;
    for tdb in databases().await {
        let cfg = rlhf_feedback::web::Config {
            max_upload_bytes: 1024 * 1024,
            ..Default::default()
        };
        let s = seed_with(&tdb.url, cfg).await;
        let pid = project(&s.db, "p", TaskKind::Pairwise, 1, &[s.ann1]).await;
        // A cookie-less 60 MB POST that announces its size is refused without reading:
        // the body stream never ends, yet the answer comes at once.
        let anon = Client::new(&s.db);
        let req = Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::CONTENT_LENGTH, (60 * 1024 * 1024).to_string())
            .body(Body::from_stream(pending_after(b"csrf=x&".to_vec())))
            .unwrap();
        let resp = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            anon.app.clone().oneshot(req),
        )
        .await
        .expect("answered without reading");
        assert_eq!(resp.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Without a length header the read stops at the limit.
        let big = format!("csrf=x&username={}", "a".repeat(100_000));
        let req = Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(big))
            .unwrap();
        assert_eq!(
            anon.app.clone().oneshot(req).await.unwrap().status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        // Logged in: 2 MiB.
        let mut ann = Client::new(&s.db);
        let c = ann.login("ann1").await;
        let r = ann
            .post(
                &format!("/p/{pid}/label"),
                &[("csrf", &c), ("text", &"x".repeat(3 * 1024 * 1024))],
            )
            .await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(r.body.contains("2048 KiB"), "{}", r.body);
        // Multipart is for admin uploads only.
        let r = ann
            .post_multipart(
                &format!("/p/{pid}/import"),
                &[("csrf", &c)],
                Some(("a.jsonl", b"{}")),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let mut admin = Client::new(&s.db);
        let ac = admin.login("admin").await;
        // CSRF must be the first field of an upload.
        let r = admin
            .post_multipart(
                &format!("/p/{pid}/import"),
                &[("source", "x"), ("csrf", &ac)],
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r = admin
            .post_multipart(
                &format!("/p/{pid}/import"),
                &[("csrf", "forged")],
                Some(("a.jsonl", b"{}")),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        // Past the upload limit: a page-level error naming the limit.
        let row = |i: usize| {
            format!("{{\"id\": \"r{i}\", \"prompt\": \"question {i} {}\", \"responses\": [\"yes\", \"no\"]}}\n", "padding ".repeat(40))
        };
        let big: String = (0..4000).map(row).collect();
        assert!(big.len() > 1024 * 1024);
        let r = admin
            .post_multipart(
                &format!("/p/{pid}/import"),
                &[("csrf", &ac)],
                Some(("big.jsonl", big.as_bytes())),
            )
            .await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            r.body.contains("the limit is 1.0 MiB") && r.body.contains("<html"),
            "{}",
            r.body
        );
        assert!(s.db.db.items(pid).await.unwrap().is_empty());
        // Under the limit the file is imported, named by its file name.
        let ok: String = (0..2000).map(row).collect();
        let r = admin
            .post_multipart(
                &format!("/p/{pid}/import"),
                &[("csrf", &ac), ("jsonl", "")],
                Some(("half.jsonl", ok.as_bytes())),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert!(
            r.body.contains("2000 rows read from half.jsonl")
                && r.body.contains("2000 items added"),
            "{}",
            r.body
        );
    }
}

/// A body stream that yields `first` and then never ends.
mod futures_util_free {
    pub fn pending_after(
        first: Vec<u8>,
    ) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send {
        struct S(Option<Vec<u8>>);
        impl futures_core::Stream for S {
            type Item = Result<Vec<u8>, std::io::Error>;
            fn poll_next(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Self::Item>> {
                match self.0.take() {
                    Some(b) => std::task::Poll::Ready(Some(Ok(b))),
                    None => std::task::Poll::Pending,
                }
            }
        }
        S(Some(first))
    }
}
