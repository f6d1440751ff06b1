//! HTTP-level tests for every route, on SQLite and (when configured) PostgreSQL.

mod common;

use axum::http::StatusCode;
use common::*;
use rlhf_feedback::model::TaskKind;
use serde_json::Value;

fn jsonl(body: &str) -> Vec<Value> {
    body.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn pairwise_flow_every_route() {
    for tdb in databases().await {
        eprintln!("backend: {}", tdb.name);
        let s = seed(&tdb.url).await;
        if tdb.name == "sqlite" {
            // Every pooled connection runs the after-connect pragmas (WAL, NORMAL sync, busy timeout).
            let pool = &s.db.db.pool;
            let one = |sql: &'static str| async move {
                sqlx::Row::get::<String, _>(&sqlx::query(sql).fetch_one(pool).await.unwrap(), 0)
            };
            assert_eq!(
                one("SELECT CAST(journal_mode AS TEXT) FROM pragma_journal_mode").await,
                "wal"
            );
            assert_eq!(
                one("SELECT CAST(synchronous AS TEXT) FROM pragma_synchronous").await,
                "1"
            );
            assert_eq!(
                one("SELECT CAST(timeout AS TEXT) FROM pragma_busy_timeout").await,
                "10000"
            );
        }
        let mut admin = Client::new(&s.db);

        // Static assets and health need no login.
        assert_eq!(admin.get("/healthz").await.body, "ok");
        assert!(admin.get("/static/app.js").await.body.contains("keydown"));
        assert!(admin.get("/static/app.css").await.body.contains("body"));
        // Not logged in: pages redirect to the login form.
        let r = admin.get("/").await;
        assert_eq!((r.status, r.location()), (StatusCode::SEE_OTHER, "/login"));

        let csrf = admin.login("admin").await;
        // GET /login while logged in goes home.
        assert_eq!(admin.get("/login").await.location(), "/");

        // POST /projects
        let r = admin
            .post(
                "/projects",
                &[
                    ("csrf", &csrf),
                    ("name", "cmp"),
                    ("kind", "pairwise"),
                    ("criteria", "helpful"),
                    ("likert_max", "5"),
                    ("overlap", "2"),
                    ("min_seconds", "0"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        let pid: i64 = r.location().trim_start_matches("/p/").parse().unwrap();

        // POST /p/{id}/import: 3 pairwise items (one gold) from two formats.
        let data = "{\"id\": \"q1\", \"prompt\": \"2+2?\", \"responses\": [\"4\", \"5\"], \"gold\": 0}\n\
                    {\"id\": \"q2\", \"prompt\": \"Capital of France?\", \"chosen\": \"Paris\", \"rejected\": \"Lyon\"}\n\
                    {\"id\": \"q3\", \"prompt\": \"Say hi\", \"responses\": [\"hi\", \"hello\"]}\n";
        let r = admin
            .post(
                &format!("/p/{pid}/import"),
                &[
                    ("csrf", &csrf),
                    ("jsonl", data),
                    ("source", "items.jsonl"),
                    ("gen_url", ""),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert!(
            r.body.contains("3 items added, 0 already present"),
            "{}",
            r.body
        );
        // Re-import is idempotent.
        let r = admin
            .post(
                &format!("/p/{pid}/import"),
                &[("csrf", &csrf), ("jsonl", data)],
            )
            .await;
        assert!(
            r.body.contains("0 items added, 3 already present"),
            "{}",
            r.body
        );
        // Bad input: clear error naming file, line and field.
        let r = admin
            .post(
                &format!("/p/{pid}/import"),
                &[
                    ("csrf", &csrf),
                    (
                        "jsonl",
                        "{\"prompt\": \"x\", \"responses\": [\"only one\"]}",
                    ),
                    ("source", "bad.jsonl"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(
            r.body.contains("bad.jsonl:1: field &quot;responses&quot;"),
            "{}",
            r.body
        );

        // POST /p/{id}/members, /settings, /scores; GET+POST /guidelines
        for u in [s.ann1, s.ann2] {
            let r = admin
                .post(
                    &format!("/p/{pid}/members"),
                    &[
                        ("csrf", &csrf),
                        ("user_id", &u.to_string()),
                        ("action", "add"),
                    ],
                )
                .await;
            assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        }
        let r = admin
            .post(
                &format!("/p/{pid}/settings"),
                &[
                    ("csrf", &csrf),
                    ("criteria", "helpful"),
                    ("likert_max", "5"),
                    ("overlap", "2"),
                    ("min_seconds", "0"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        let r = admin
            .post(
                &format!("/p/{pid}/settings"),
                &[
                    ("csrf", &csrf),
                    ("criteria", "helpful"),
                    ("likert_max", "5"),
                    ("overlap", "0"),
                    ("min_seconds", "0"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = admin
            .post(
                &format!("/p/{pid}/guidelines"),
                &[
                    ("csrf", &csrf),
                    ("text", "# Rules\n- prefer **correct** answers"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        let g = admin.get(&format!("/p/{pid}/guidelines")).await;
        assert!(
            g.body.contains("<h3>Rules</h3>") && g.body.contains("<strong>correct</strong>"),
            "{}",
            g.body
        );
        // Uncertainty: q3 first for everyone.
        let r = admin.post(&format!("/p/{pid}/scores"), &[("csrf", &csrf), ("jsonl", "{\"item_id\": \"q3\", \"uncertainty\": 0.9}\n{\"item_id\": \"q2\", \"uncertainty\": 0.1}")]).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let r = admin
            .post(
                &format!("/p/{pid}/scores"),
                &[
                    ("csrf", &csrf),
                    ("jsonl", "{\"item_id\": \"nope\", \"uncertainty\": 0.9}"),
                    ("source", "s.jsonl"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(
            r.body
                .contains("s.jsonl:1: field &quot;item_id&quot;: no item"),
            "{}",
            r.body
        );

        // GET /p/{id} (admin view)
        let r = admin.get(&format!("/p/{pid}")).await;
        assert!(
            r.body.contains("Import items") && r.body.contains("3 items (1 gold)"),
            "{}",
            r.body
        );

        // Annotators label via GET /p/{id}/task + POST /p/{id}/label.
        let mut a1 = Client::new(&s.db);
        a1.login("ann1").await;
        let t = a1.get(&format!("/p/{pid}/task")).await;
        assert!(
            t.body.contains("Say hi"),
            "uncertain item first: {}",
            t.body
        );
        let mut a2 = Client::new(&s.db);
        a2.login("ann2").await;
        for c in [&mut a1, &mut a2] {
            for _ in 0..3 {
                let r = c.label(pid, &[("choice", "A")]).await;
                assert_eq!(
                    (r.status, r.location()),
                    (StatusCode::SEE_OTHER, format!("/p/{pid}/task").as_str()),
                    "{}",
                    r.body
                );
            }
            let done = c.get(&format!("/p/{pid}/task")).await;
            assert!(done.body.contains("Nothing left to label"), "{}", done.body);
            assert!(
                done.body.contains("Your labels: 3 done, 0 left for you"),
                "{}",
                done.body
            );
        }
        // Changed mind: undo the last label (POST /p/{id}/undo) and answer again.
        let csrf1 = a1.csrf().await;
        let r = a1
            .post(
                &format!("/p/{pid}/undo"),
                &[("csrf", &csrf1), ("key", "undo-1")],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        let back = r.location().to_string();
        assert!(back.starts_with(&format!("/p/{pid}/task?item=")), "{back}");
        // Replaying the same undo (same key) does not withdraw another label.
        let r = a1
            .post(
                &format!("/p/{pid}/undo"),
                &[("csrf", &csrf1), ("key", "undo-1")],
            )
            .await;
        assert_eq!(r.location(), format!("/p/{pid}/task"));
        let t = a1.get(&back).await;
        let (a, k) = (t.field("assignment"), t.field("key"));
        let r = a1
            .post(
                &format!("/p/{pid}/label"),
                &[
                    ("csrf", &csrf1),
                    ("assignment", &a),
                    ("key", &k),
                    ("choice", "tie"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        // Same idempotency key again: acknowledged, not duplicated.
        let r = a1
            .post(
                &format!("/p/{pid}/label"),
                &[
                    ("csrf", &csrf1),
                    ("assignment", &a),
                    ("key", &k),
                    ("choice", "tie"),
                ],
            )
            .await;
        assert_eq!(
            r.headers.get("x-duplicate").map(|v| v.to_str().unwrap()),
            Some("1")
        );
        let labels = s.db.db.live_labels(pid).await.unwrap();
        assert_eq!(labels.len(), 6);
        // The project page lists my recent answers with links to change them.
        let page = a1.get(&format!("/p/{pid}")).await.body;
        assert!(
            page.contains("Your recent labels")
                && page.contains("<td>tie</td>")
                && page.contains(&format!("/p/{pid}/task?item=")),
            "{page}"
        );
        let history = s.db.db.label_history(pid, s.ann1).await.unwrap();
        assert_eq!(
            history.len(),
            5,
            "3 labels + undo + new label; nothing updated in place"
        );
        assert_eq!(history[4].supersedes, Some(history[3].id));
        assert_eq!(history[3].supersedes, Some(history[2].id));

        // Stats (GET /p/{id}/stats, /stats.json) for admins only.
        let st = admin.get(&format!("/p/{pid}/stats.json")).await;
        let v: Value = serde_json::from_str(&st.body).unwrap();
        assert_eq!(v["annotators"].as_array().unwrap().len(), 2);
        assert_eq!(v["agreement"][0]["units"], 3);
        let frag = admin.get(&format!("/p/{pid}/stats")).await;
        assert!(frag.body.contains("Fleiss"), "{}", frag.body);
        assert_eq!(
            a1.get(&format!("/p/{pid}/stats.json")).await.status,
            StatusCode::FORBIDDEN
        );

        // POST /p/{id}/export (preference and KTO).
        let r = admin
            .post(
                &format!("/p/{pid}/export"),
                &[
                    ("csrf", &csrf),
                    ("format", "preference"),
                    ("deliver", "show"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let rows = jsonl(&r.body);
        for row in &rows {
            for f in [
                "prompt",
                "chosen",
                "rejected",
                "margin",
                "annotator_ids",
                "label_ids",
                "project",
            ] {
                assert!(row.get(f).is_some(), "missing {f} in {row}");
            }
            assert_eq!(row["project"], "cmp");
        }
        let r = admin
            .post(
                &format!("/p/{pid}/export"),
                &[("csrf", &csrf), ("format", "kto"), ("deliver", "download")],
            )
            .await;
        assert!(r
            .headers
            .get("content-disposition")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("attachment"));
        assert!(jsonl(&r.body).iter().all(|row| row["label"].is_boolean()));
        let r = admin
            .post(
                &format!("/p/{pid}/export"),
                &[("csrf", &csrf), ("format", "rating")],
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);

        // Admin pages: users, invites, roles, audit log.
        let r = admin.get("/admin/users").await;
        assert!(r.body.contains("ann1"));
        let r = admin
            .post(
                "/admin/users",
                &[
                    ("csrf", &csrf),
                    ("username", "newbie"),
                    ("role", "annotator"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let link = r
            .body
            .split("value=\"")
            .find(|p| p.starts_with("http"))
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_string();
        let path = link.trim_start_matches("http://127.0.0.1:8080").to_string();
        let mut newbie = Client::new(&s.db);
        let f = newbie.get(&path).await;
        assert_eq!(f.status, StatusCode::OK);
        let r = newbie
            .post(
                &path,
                &[
                    ("csrf", &f.csrf()),
                    ("password", "a-new-password"),
                    ("password2", "a-new-password"),
                ],
            )
            .await;
        assert_eq!((r.status, r.location()), (StatusCode::SEE_OTHER, "/"));
        assert_eq!(newbie.get("/").await.status, StatusCode::OK);
        // Single use.
        let mut other = Client::new(&s.db);
        assert_eq!(other.get(&path).await.status, StatusCode::NOT_FOUND);
        let newbie_id = s.db.db.user_by_name("newbie").await.unwrap().unwrap().0.id;
        let r = admin
            .post(
                &format!("/admin/users/{newbie_id}/role"),
                &[("csrf", &csrf), ("role", "admin")],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        assert_eq!(
            s.db.db.user(newbie_id).await.unwrap().role,
            rlhf_feedback::model::Role::Admin
        );
        let r = admin
            .post(
                &format!("/admin/users/{newbie_id}/invite"),
                &[("csrf", &csrf)],
            )
            .await;
        assert!(r.body.contains("/invite/"));
        // Annotators can't reach admin routes.
        let c1 = a1.csrf().await;
        assert_eq!(a1.get("/admin/users").await.status, StatusCode::FORBIDDEN);
        assert_eq!(
            a1.post(
                "/admin/users",
                &[("csrf", &c1), ("username", "x"), ("role", "admin")]
            )
            .await
            .status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            a1.post(
                &format!("/p/{pid}/export"),
                &[("csrf", &c1), ("format", "preference")]
            )
            .await
            .status,
            StatusCode::FORBIDDEN
        );

        let r = admin.get("/admin/audit").await;
        for action in [
            "login",
            "project_create",
            "import",
            "label",
            "undo",
            "export",
            "role_change",
            "invite",
            "invite_redeemed",
            "member_add",
        ] {
            assert!(
                r.body.contains(&format!("<td>{action}</td>")),
                "audit lacks {action}"
            );
        }

        // POST /logout ends the session server-side.
        let session = admin.cookies["rlhf_session"].clone();
        let r = admin.post("/logout", &[("csrf", &csrf)]).await;
        assert_eq!((r.status, r.location()), (StatusCode::SEE_OTHER, "/login"));
        assert!(s.db.db.session(&session).await.unwrap().is_none());
        assert!(admin.get("/admin/audit").await.status == StatusCode::SEE_OTHER);
    }
}

#[tokio::test]
async fn every_task_kind_labels_and_exports() {
    for tdb in databases().await {
        eprintln!("backend: {}", tdb.name);
        let s = seed(&tdb.url).await;
        let st = &s.db;
        let mut admin = Client::new(st);
        let csrf = admin.login("admin").await;
        let mut ann = Client::new(st);
        ann.login("ann1").await;
        let data = "{\"prompt\": \"Name a colour\", \"responses\": [\"Blue is a colour.\"], \"id\": \"c1\"}\n";

        let rating = project(st, "rate", TaskKind::Rating, 1, &[s.ann1]).await;
        admin
            .post(
                &format!("/p/{rating}/import"),
                &[("csrf", &csrf), ("jsonl", data)],
            )
            .await;
        let t = ann.get(&format!("/p/{rating}/task")).await;
        assert!(
            t.body.contains(r#"name="score_helpful" value="5""#),
            "{}",
            t.body
        );
        // Missing criterion → 400, out-of-range → 400.
        let r = ann.label(rating, &[("score_helpful", "4")]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = ann
            .label(rating, &[("score_helpful", "9"), ("score_harmless", "5")])
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = ann
            .label(rating, &[("score_helpful", "4"), ("score_harmless", "5")])
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        let e = admin
            .post(
                &format!("/p/{rating}/export"),
                &[("csrf", &csrf), ("format", "rating")],
            )
            .await;
        let rows = jsonl(&e.body);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["completion"], "Blue is a colour.");
        assert_eq!(rows[0]["score"], 4.5);

        let corr = project(st, "fix", TaskKind::Correction, 1, &[s.ann1]).await;
        admin
            .post(
                &format!("/p/{corr}/import"),
                &[("csrf", &csrf), ("jsonl", data)],
            )
            .await;
        let t = ann.get(&format!("/p/{corr}/task")).await;
        assert!(
            t.body.contains(">Blue is a colour.</textarea>"),
            "{}",
            t.body
        );
        let r = ann
            .label(corr, &[("corrected", "Blue is a colour.\r\nSo is red.")])
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        let labels = st.db.live_labels(corr).await.unwrap();
        match &labels[0].value {
            rlhf_feedback::model::LabelValue::Correction {
                corrected,
                unified_diff,
                word_diff,
            } => {
                assert_eq!(corrected, "Blue is a colour.\nSo is red.");
                assert!(unified_diff.contains("+So is red."), "{unified_diff}");
                assert!(word_diff.contains("{+"), "{word_diff}");
            }
            other => panic!("{other:?}"),
        }
        let rows = jsonl(
            &admin
                .post(
                    &format!("/p/{corr}/export"),
                    &[("csrf", &csrf), ("format", "correction")],
                )
                .await
                .body,
        );
        assert_eq!(rows[0]["corrected"], "Blue is a colour.\nSo is red.");
        assert_eq!(rows[0]["completion"], "Blue is a colour.");

        let crit = project(st, "crit", TaskKind::Critique, 1, &[s.ann1]).await;
        admin
            .post(
                &format!("/p/{crit}/import"),
                &[("csrf", &csrf), ("jsonl", data)],
            )
            .await;
        assert_eq!(
            ann.label(crit, &[("text", "  ")]).await.status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ann.label(crit, &[("text", "Too short.")]).await.status,
            StatusCode::SEE_OTHER
        );
        let rows = jsonl(
            &admin
                .post(
                    &format!("/p/{crit}/export"),
                    &[("csrf", &csrf), ("format", "critique")],
                )
                .await
                .body,
        );
        assert_eq!(rows[0]["critique"], "Too short.");

        let demo = project(st, "demo", TaskKind::Demonstration, 1, &[s.ann1]).await;
        admin
            .post(
                &format!("/p/{demo}/import"),
                &[
                    ("csrf", &csrf),
                    ("jsonl", "{\"prompt\": \"Write a haiku\"}"),
                ],
            )
            .await;
        assert_eq!(
            ann.label(demo, &[("text", "An old silent pond")])
                .await
                .status,
            StatusCode::SEE_OTHER
        );
        let rows = jsonl(
            &admin
                .post(
                    &format!("/p/{demo}/export"),
                    &[("csrf", &csrf), ("format", "demonstration"), ("scrub", "1")],
                )
                .await
                .body,
        );
        assert_eq!(rows[0]["prompt"], "Write a haiku");
        assert_eq!(rows[0]["completion"], "An old silent pond");
        assert_eq!(rows[0]["annotator_ids"], serde_json::json!([s.ann1]));
    }
}

/// Candidates generated by an OpenAI-compatible `/v1/completions` server (a tiny fake
/// one on loopback that echoes the prompt).
#[tokio::test]
async fn import_generates_candidates_from_openai_compatible_endpoint() {
    use axum::routing::post;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let seen2 = seen.clone();
    let fake = axum::Router::new().route(
        "/v1/completions",
        post(move |axum::Json(req): axum::Json<Value>| {
            let seen = seen2.clone();
            async move {
                let n = req["n"].as_u64().unwrap_or(1);
                let prompt = req["prompt"].as_str().unwrap_or("").to_string();
                seen.lock().unwrap().push(req);
                let choices: Vec<Value> = (0..n).map(|i| serde_json::json!({"index": i, "text": format!("answer {i} to {prompt}")})).collect();
                axum::Json(serde_json::json!({"object": "text_completion", "choices": choices}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, fake).await.unwrap() });

    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let pid = project(&s.db, "gen", TaskKind::Pairwise, 1, &[]).await;
        let mut admin = Client::new(&s.db);
        let csrf = admin.login("admin").await;
        let r = admin
            .post(
                &format!("/p/{pid}/import"),
                &[("csrf", &csrf), ("jsonl", "{\"prompt\": \"why?\"}\n{\"prompt\": \"how?\", \"responses\": [\"x\", \"y\"]}"), ("gen_url", &url), ("gen_model", "tiny"), ("gen_n", "3"), ("gen_max_tokens", "16"), ("gen_temperature", "0.7")],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        // 3 candidates → 3 pairs, plus the row that had responses.
        assert!(r.body.contains("1 generated; 4 items added"), "{}", r.body);
        let items = s.db.db.items(pid).await.unwrap();
        assert_eq!(
            items[0].responses,
            vec!["answer 0 to why?", "answer 1 to why?"]
        );
        // Endpoint errors surface as a clear 400.
        let r = admin
            .post(
                &format!("/p/{pid}/import"),
                &[
                    ("csrf", &csrf),
                    ("jsonl", "{\"prompt\": \"q\"}"),
                    ("gen_url", &format!("{url}/nope")),
                    ("gen_model", "m"),
                    ("gen_n", "2"),
                    ("gen_max_tokens", "4"),
                    ("gen_temperature", "1"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        assert!(r.body.contains("HTTP 404"), "{}", r.body);
    }
    let reqs = seen.lock().unwrap();
    assert_eq!(reqs[0]["model"], "tiny");
    assert_eq!(reqs[0]["max_tokens"], 16);
    assert_eq!(reqs[0]["prompt"], "why?");
}

/// Pages are never cached; an idempotency key reused for another item is an error
/// (it used to answer 303 and drop the new answer).
#[tokio::test]
async fn no_store_and_key_reuse_across_items() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let pid = project(&s.db, "keys", TaskKind::Pairwise, 1, &[s.ann1]).await;
        let items: Vec<_> = (0..3)
            .map(|i| rlhf_feedback::model::NewItem {
                external_id: format!("k{i}"),
                prompt: format!("p{i}"),
                responses: vec!["a".into(), "b".into()],
                gold: None,
            })
            .collect();
        s.db.db.insert_items(None, pid, "t", &items).await.unwrap();
        let mut c = Client::new(&s.db);
        let csrf = c.login("ann1").await;
        for path in [
            "/".to_string(),
            format!("/p/{pid}"),
            format!("/p/{pid}/task"),
            "/login".into(),
        ] {
            let r = c.get(&path).await;
            assert_eq!(
                r.headers.get("cache-control").map(|v| v.to_str().unwrap()),
                Some("no-store"),
                "{path}"
            );
        }
        assert!(c
            .get("/static/app.js")
            .await
            .headers
            .get("cache-control")
            .is_none());
        let t = c.get(&format!("/p/{pid}/task")).await;
        let a1 = t.field("assignment");
        let r = c
            .post(
                &format!("/p/{pid}/label"),
                &[
                    ("csrf", &csrf),
                    ("assignment", &a1),
                    ("key", "same-key"),
                    ("choice", "A"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        let t = c.get(&format!("/p/{pid}/task")).await;
        let a2 = t.field("assignment");
        assert_ne!(a1, a2);
        let r = c
            .post(
                &format!("/p/{pid}/label"),
                &[
                    ("csrf", &csrf),
                    ("assignment", &a2),
                    ("key", "same-key"),
                    ("choice", "B"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
        assert!(r.body.contains("not stored"), "{}", r.body);
        // A true retry (same item, same key) is still acknowledged as a duplicate.
        let r = c
            .post(
                &format!("/p/{pid}/label"),
                &[
                    ("csrf", &csrf),
                    ("assignment", &a1),
                    ("key", "same-key"),
                    ("choice", "A"),
                ],
            )
            .await;
        assert_eq!(
            (
                r.status,
                r.headers.get("x-duplicate").map(|v| v.to_str().unwrap())
            ),
            (StatusCode::SEE_OTHER, Some("1"))
        );
        assert_eq!(s.db.db.live_labels(pid).await.unwrap().len(), 1);
    }
}

async fn export(c: &mut Client, pid: i64, csrf: &str, extra: &[(&str, &str)]) -> Vec<Value> {
    let mut form = vec![("csrf", csrf), ("format", "preference")];
    form.extend_from_slice(extra);
    let r = c.post(&format!("/p/{pid}/export"), &form).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    jsonl(&r.body)
}

/// Reliability on the stats page and in exports. ann1 and ann2 are always right;
/// sloppy1 is wrong on a quarter of its items, sloppy2 on a sixth. Items 30–39 are judged
/// by ann1 and sloppy1 only, who disagree on 30–34: majority vote ties there (no row);
/// the reliability model sides with ann1.
#[tokio::test]
async fn reliability_on_stats_and_export() {
    use rlhf_feedback::model::{Choice, LabelValue, NewItem, Role};
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let db = &s.db.db;
        let h = rlhf_feedback::auth::hash_password(PASSWORD).unwrap();
        let sloppy1 = db
            .create_user(None, "sloppy1", Role::Annotator, Some(&h))
            .await
            .unwrap();
        let sloppy2 = db
            .create_user(None, "sloppy2", Role::Annotator, Some(&h))
            .await
            .unwrap();
        let pid = project(
            &s.db,
            "rel",
            TaskKind::Pairwise,
            4,
            &[s.ann1, s.ann2, sloppy1, sloppy2],
        )
        .await;
        let items: Vec<NewItem> = (0..40)
            .map(|i| NewItem {
                external_id: format!("r{i}"),
                prompt: format!("q{i}"),
                responses: vec![format!("good {i}"), format!("bad {i}")],
                gold: None,
            })
            .collect();
        db.insert_items(None, pid, "t", &items).await.unwrap();
        for it in db.items(pid).await.unwrap() {
            let n: usize = it.external_id[1..].parse().unwrap();
            let judges: Vec<(i64, bool)> = if n < 30 {
                vec![
                    (s.ann1, true),
                    (s.ann2, true),
                    (sloppy1, n >= 5),
                    (sloppy2, !(5..10).contains(&n)),
                ]
            } else {
                vec![(s.ann1, true), (sloppy1, n >= 35)]
            };
            for (u, right) in judges {
                let preferred = if right { 0 } else { 1 };
                let a = db.open_item(&it, u, false, 60_000).await.unwrap();
                let v = LabelValue::Pairwise {
                    choice: if preferred == 0 { Choice::A } else { Choice::B },
                    shown_order: vec![0, 1],
                    preferred: Some(preferred),
                };
                db.submit_label(pid, it.id, u, Some(&a), &v, &format!("k{}-{u}", it.id))
                    .await
                    .unwrap();
            }
        }
        let mut admin = Client::new(&s.db);
        let csrf = admin.login("admin").await;
        let st: Value =
            serde_json::from_str(&admin.get(&format!("/p/{pid}/stats.json")).await.body).unwrap();
        assert_eq!(st["reliability_model"], "crowd-bt");
        let rel = |name: &str| {
            st["annotators"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["username"] == name)
                .unwrap()["reliability"]
                .as_f64()
                .unwrap()
        };
        assert!(rel("ann1") > 0.9 && rel("ann2") > 0.9, "{st}");
        assert!(
            rel("ann1") > rel("sloppy2") && rel("sloppy2") > rel("sloppy1"),
            "{st}"
        );
        assert!(rel("sloppy1") < 0.85 && rel("sloppy1") > 0.6, "{st}");
        let page = admin.get(&format!("/p/{pid}/stats")).await.body;
        assert!(
            page.contains("<th>Reliability</th>") && page.contains("Crowd-BT"),
            "{page}"
        );
        // Annotators (flags first) come before the agreement numbers; the 6-pair Cohen
        // table is folded away and "–" is explained.
        assert!(
            page.find("<h3>Annotators</h3>").unwrap() < page.find("Fleiss").unwrap(),
            "{page}"
        );
        assert!(
            page.contains(
                "<details><summary>Cohen's κ for each of the 6 pairs of annotators</summary>"
            ),
            "{page}"
        );
        assert!(page.contains("“–” = not defined"), "{page}");

        let by_votes = export(&mut admin, pid, &csrf, &[]).await;
        assert_eq!(by_votes.len(), 35, "1–1 ties give no row by vote count");
        let by_rel = export(&mut admin, pid, &csrf, &[("reliability", "1")]).await;
        assert_eq!(by_rel.len(), 40);
        assert!(
            by_rel
                .iter()
                .all(|r| r["chosen"].as_str().unwrap().starts_with("good")),
            "{by_rel:?}"
        );
        let tied = by_rel.iter().find(|r| r["external_id"] == "r32").unwrap();
        let unanimous = by_rel.iter().find(|r| r["external_id"] == "r20").unwrap();
        let (ct, cu) = (
            tied["confidence"].as_f64().unwrap(),
            unanimous["confidence"].as_f64().unwrap(),
        );
        assert!(ct > 0.5 && ct < cu && cu > 0.99, "{ct} {cu}");
        assert!((tied["margin"].as_f64().unwrap() - (2.0 * ct - 1.0)).abs() < 1e-9);
        // Filter: only the confident items.
        let min = (ct + cu) / 2.0;
        let kept = export(
            &mut admin,
            pid,
            &csrf,
            &[("min_confidence", &format!("{min:.6}"))],
        )
        .await;
        let ids: Vec<&str> = kept
            .iter()
            .map(|r| r["external_id"].as_str().unwrap())
            .collect();
        assert!(kept
            .iter()
            .all(|r| r["confidence"].as_f64().unwrap() >= min - 1e-6));
        assert!(
            ids.contains(&"r20") && !(30..35).any(|i| ids.contains(&format!("r{i}").as_str())),
            "{ids:?}"
        );
        let bad = admin
            .post(
                &format!("/p/{pid}/export"),
                &[
                    ("csrf", &csrf),
                    ("format", "preference"),
                    ("min_confidence", "1.5"),
                ],
            )
            .await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    }
}

/// "change" pages start from the previous answer; text tasks focus their text box; the
/// progress shows the annotator's queue and the project's completion separately.
#[tokio::test]
async fn change_pages_prefill_and_progress_is_split() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let st = &s.db;
        let mut ann = Client::new(st);
        ann.login("ann1").await;
        let rating = project(st, "rate", TaskKind::Rating, 3, &[s.ann1]).await;
        let t = ann.get(&format!("/p/{rating}/task")).await;
        assert!(
            t.body
                .contains("Nothing to label for you in this project right now."),
            "{}",
            t.body
        );
        assert!(!t.body.contains("(100%)"), "{}", t.body);
        let rows: String = (0..10)
            .map(|i| {
                format!(
                    "{{\"id\": \"c{i}\", \"prompt\": \"p{i}\", \"completion\": \"answer {i}\"}}\n"
                )
            })
            .collect();
        let items = rlhf_feedback::import::expand(
            "x",
            &rlhf_feedback::import::parse_jsonl("x", &rows).unwrap(),
            TaskKind::Rating,
            &["helpful".into(), "harmless".into()],
            5,
        )
        .unwrap();
        st.db.insert_items(None, rating, "x", &items).await.unwrap();
        for (h, k) in [("4", "2"), ("5", "1")] {
            assert_eq!(
                ann.label(rating, &[("score_helpful", h), ("score_harmless", k)])
                    .await
                    .status,
                StatusCode::SEE_OTHER
            );
        }
        let t = ann.get(&format!("/p/{rating}/task")).await;
        assert!(
            t.body.contains("Your labels: 2 done, 8 left for you"),
            "{}",
            t.body
        );
        assert!(
            t.body.contains("Project: items fully labelled 0 / 10 (0%)"),
            "{}",
            t.body
        );
        let first = st.db.label_history(rating, s.ann1).await.unwrap()[0].item_id;
        let change = ann.get(&format!("/p/{rating}/task?item={first}")).await;
        assert!(
            change
                .body
                .contains(r#"name="score_helpful" value="4" required checked"#),
            "{}",
            change.body
        );
        assert!(
            change
                .body
                .contains(r#"name="score_harmless" value="2" required checked"#),
            "{}",
            change.body
        );
        assert_eq!(change.body.matches(" checked").count(), 2);

        let crit = project(st, "crit", TaskKind::Critique, 1, &[s.ann1]).await;
        st.db
            .insert_items(None, crit, "x", &items[..2])
            .await
            .unwrap();
        let t = ann.get(&format!("/p/{crit}/task")).await;
        assert!(
            t.body
                .contains(r#"<textarea name="text" rows="8" required autofocus></textarea>"#),
            "{}",
            t.body
        );
        assert_eq!(
            ann.label(crit, &[("text", "Too <terse>.")]).await.status,
            StatusCode::SEE_OTHER
        );
        let item = st.db.label_history(crit, s.ann1).await.unwrap()[0].item_id;
        let change = ann.get(&format!("/p/{crit}/task?item={item}")).await;
        assert!(
            change.body.contains(">Too &lt;terse&gt;.</textarea>"),
            "{}",
            change.body
        );
    }
}
