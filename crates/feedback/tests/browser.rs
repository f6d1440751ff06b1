//! Real headless Chromium driven through chromedriver (raw WebDriver HTTP): log in,
//! label items of every task kind with the keyboard and forms, export, check the
//! export. With RLHF_FEEDBACK_SCREENSHOTS=<dir> it also saves a PNG of every page
//! (that is how docs/feedback/screenshots/ is made).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use rlhf_feedback::model::{NewItem, TaskKind};
use rlhf_feedback::web::{serve_on, Config};
use rlhf_feedback::Db;
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(bin))
        .find(|p| p.is_file())
}

struct Driver {
    http: reqwest::Client,
    base: String,
    child: Child,
    shots: Option<PathBuf>,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    /// Ends the WebDriver session first (which quits Chromium; killing chromedriver alone
    /// would orphan the browser when a test fails), then chromedriver. Plain blocking
    /// HTTP because Drop cannot await.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        if let Some((host, path)) = self
            .base
            .strip_prefix("http://")
            .and_then(|r| r.split_once('/'))
        {
            if let Ok(mut s) = std::net::TcpStream::connect(host) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let req = format!("DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                if s.write_all(req.as_bytes()).is_ok() {
                    let _ = s.read_to_end(&mut Vec::new());
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start(chromium: &Path, chromedriver: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let t0 = Instant::now();
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium.display().to_string(),
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1280,1000",
                     format!("--user-data-dir={}", profile.path().display())]
        }}}});
        let v: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("new session failed: {v}"))
            .to_string();
        let shots = std::env::var_os("RLHF_FEEDBACK_SCREENSHOTS").map(PathBuf::from);
        Driver {
            http,
            base: format!("{base}/session/{session}"),
            child,
            shots,
            _profile: profile,
        }
    }

    async fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        if v["value"].get("error").is_some() {
            panic!("webdriver {method} {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({ "url": url })).await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("find {css}: {v}"))
            .to_string()
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd("POST", &format!("/element/{e}/click"), json!({}))
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd("POST", &format!("/element/{e}/clear"), json!({}))
            .await;
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    /// Presses keys on the page (through the keyboard shortcut handler).
    async fn keys(&self, keys: &[&str]) {
        let mut actions = vec![];
        for k in keys {
            actions.push(json!({"type": "keyDown", "value": k}));
            actions.push(json!({"type": "keyUp", "value": k}));
        }
        self.cmd(
            "POST",
            "/actions",
            json!({"actions": [{"type": "key", "id": "kb", "actions": actions}]}),
        )
        .await;
    }

    async fn source(&self) -> String {
        self.cmd("GET", "/source", json!({}))
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    async fn text(&self) -> String {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": "return document.body.innerText", "args": []}),
        )
        .await
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    async fn url(&self) -> String {
        self.cmd("GET", "/url", json!({}))
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits until the page source satisfies `pred` (navigation after a submit).
    async fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.source().await;
            if pred(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "timed out waiting for {what}; page:\n{s}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn assignment(&self) -> String {
        let s = self.source().await;
        let pre = r#"name="assignment" value=""#;
        s.find(pre)
            .map(|i| s[i + pre.len()..].split('"').next().unwrap().to_string())
            .unwrap_or_default()
    }

    /// Waits until a new task (different assignment) or the done page is shown.
    async fn wait_next(&self, old: &str) {
        let old = format!(r#"name="assignment" value="{old}""#);
        self.wait_for("the next task", |s| {
            (s.contains("name=\"assignment\"") && !s.contains(&old)) || s.contains("Nothing left")
        })
        .await;
    }

    async fn shot(&self, name: &str) {
        let Some(dir) = &self.shots else { return };
        // Grow the window to the page so long pages are captured whole.
        let h = self
            .cmd(
                "POST",
                "/execute/sync",
                json!({"script": "return document.documentElement.scrollHeight", "args": []}),
            )
            .await;
        let height = h.as_i64().unwrap_or(1000).clamp(700, 4000) + 120;
        self.cmd(
            "POST",
            "/window/rect",
            json!({"width": 1280, "height": height}),
        )
        .await;
        let b64 = self.cmd("GET", "/screenshot", json!({})).await;
        self.cmd(
            "POST",
            "/window/rect",
            json!({"width": 1280, "height": 1000}),
        )
        .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn login(&self, site: &str, user: &str) {
        self.goto(&format!("{site}/login")).await;
        self.type_into("input[name=username]", user).await;
        self.type_into("input[name=password]", PASSWORD).await;
        self.click("form[action='/login'] button").await;
        self.wait_for("the projects page", |s| s.contains("<h1>Projects</h1>"))
            .await;
    }

    async fn logout(&self) {
        self.click("nav form[action='/logout'] button").await;
        self.wait_for("the login page", |s| s.contains("<h1>Log in</h1>"))
            .await;
    }

    /// Exports through the project page form and returns the parsed rows.
    async fn export(&self, site: &str, pid: i64, format: &str, shot: Option<&str>) -> Vec<Value> {
        self.goto(&format!("{site}/p/{pid}")).await;
        let sel = self
            .find("form[action$='/export'] select[name=format]")
            .await;
        self.cmd("POST", "/execute/sync", json!({"script": "arguments[0].value = arguments[1]", "args": [{ELEMENT: sel}, format]})).await;
        self.click("form[action$='/export'] button").await;
        let t0 = Instant::now();
        while !self.url().await.ends_with("/export") {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "export did not load"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(name) = shot {
            self.shot(name).await;
        }
        self.text()
            .await
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_labels_every_kind_and_exports() {
    let (Some(chromium), Some(chromedriver)) = (
        which("chromium").or_else(|| which("chromium-browser")),
        which("chromedriver"),
    ) else {
        skip("browser", "chromium and/or chromedriver not installed; install them with `bash .ci/feedback-setup.sh`");
        return;
    };
    for tdb in databases().await {
        eprintln!("backend: {}", tdb.name);
        let s = seed(&tdb.url).await;
        let st = &s.db;
        // Projects other than pairwise are prepared through the library; the pairwise one
        // is created, filled and staffed through the admin UI below.
        let mut pids = vec![];
        for (name, kind) in [
            ("Ratings", TaskKind::Rating),
            ("Corrections", TaskKind::Correction),
            ("Critiques", TaskKind::Critique),
            ("Demonstrations", TaskKind::Demonstration),
        ] {
            let pid = project(st, name, kind, 1, &[s.ann1]).await;
            let items: Vec<NewItem> = (0..2)
                .map(|i| NewItem {
                    external_id: format!("{name}{i}"),
                    prompt: format!("Explain item {i} of {name} <b>safely</b>"),
                    responses: vec![format!("Draft answer {i} with a typo teh end.")],
                    gold: None,
                })
                .collect();
            st.db
                .insert_items(None, pid, "browser", &items)
                .await
                .unwrap();
            st.db.set_guidelines(s.admin, pid, "# How to judge\n- Prefer **correct** answers\n- Then concise ones\n\nAsk in `#feedback` when unsure.").await.unwrap();
            pids.push(pid);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let site = format!("http://{}", listener.local_addr().unwrap());
        let db2 = Db::connect(&tdb.url).await.unwrap();
        let server = tokio::spawn(serve_on(
            listener,
            db2,
            Config {
                public_url: site.clone(),
                ..Config::default()
            },
        ));

        let d = Driver::start(&chromium, &chromedriver).await;
        d.goto(&format!("{site}/login")).await;
        d.shot("login").await;

        // Admin: create the pairwise project, import items, assign ann1.
        d.login(&site, "admin").await;
        d.type_into(
            "form[action='/projects'] input[name=name]",
            "Helpfulness comparisons",
        )
        .await;
        d.click("form[action='/projects'] button").await;
        d.wait_for("the project page", |s| s.contains("Import items"))
            .await;
        let pid: i64 = d.url().await.rsplit('/').next().unwrap().parse().unwrap();
        let jsonl = (0..4)
            .map(|i| json!({"id": format!("cmp{i}"), "prompt": format!("Question {i}: what is {i} + {i}?"), "responses": [format!("It is {}.", 2 * i), format!("Probably {}.", 2 * i + 1)], "gold": if i == 0 { json!(0) } else { Value::Null }}).to_string())
            .collect::<Vec<_>>()
            .join("\n");
        d.type_into("textarea#import-jsonl", &jsonl).await;
        d.click("form[action$='/import'] button").await;
        d.wait_for("import result", |s| s.contains("4 items added"))
            .await;
        d.goto(&format!("{site}/p/{pid}")).await;
        let sel = d.find("form[action$='/members'] select").await;
        d.cmd("POST", "/execute/sync", json!({"script": "arguments[0].value = arguments[1]", "args": [{ELEMENT: sel}, s.ann1.to_string()]})).await;
        d.click("form[action$='/members'] button").await;
        d.wait_for("member list", |s| s.contains("ann1 <form"))
            .await;
        d.goto(&format!("{site}/p/{pid}/guidelines")).await;
        d.type_into("textarea[name=text]", "# Comparing answers\n- Pick the **correct** answer\n- Use `3` for a tie, `4` if both are bad").await;
        d.click("form[action$='/guidelines'] button").await;
        d.wait_for("guidelines", |s| s.contains("<h3>Comparing answers</h3>"))
            .await;
        d.shot("guidelines").await;
        d.goto(&format!("{site}/admin/users")).await;
        d.shot("users").await;
        d.logout().await;

        // Annotator: pairwise with the keyboard (1, 2, 3, then undo and 4, then 1).
        d.login(&site, "ann1").await;
        d.shot("projects-annotator").await;
        d.goto(&format!("{site}/p/{pid}/task")).await;
        d.wait_for("a pairwise task", |s| s.contains("A is better"))
            .await;
        d.shot("task-pairwise").await;
        for key in ["1", "2", "3"] {
            let a = d.assignment().await;
            d.keys(&[key]).await;
            d.wait_next(&a).await;
        }
        let a = d.assignment().await;
        d.keys(&["u"]).await;
        d.wait_next(&a).await;
        assert!(
            d.url().await.contains("?item="),
            "undo returns to the withdrawn item"
        );
        assert!(d
            .source()
            .await
            .contains("Your labels: 2 done, 2 left for you"));
        for key in ["4", "1"] {
            let a = d.assignment().await;
            d.keys(&[key]).await;
            d.wait_next(&a).await;
        }
        d.wait_for("pairwise done", |s| {
            s.contains("Nothing left") && s.contains("Your labels: 4 done, 0 left for you")
        })
        .await;
        d.shot("task-done").await;
        // `u` also works on the done page; the item returns with its sides as seen.
        d.keys(&["u"]).await;
        d.wait_for("undo from the done page", |s| {
            s.contains("Answer withdrawn")
        })
        .await;
        let a = d.assignment().await;
        d.keys(&["1"]).await;
        d.wait_next(&a).await;
        d.wait_for("pairwise done again", |s| {
            s.contains("Nothing left") && s.contains("Your labels: 4 done, 0 left for you")
        })
        .await;

        // Rating: digits rate criterion after criterion, Enter submits.
        let rating = pids[0];
        d.goto(&format!("{site}/p/{rating}/task")).await;
        d.wait_for("a rating task", |s| s.contains("score_helpful"))
            .await;
        d.shot("task-rating").await;
        // The highlighted criterion moves with the digits and with the arrow keys.
        assert!(d.source().await.contains(r#"class="criterion current""#));
        for keys in [
            &["4", "5", "Enter"][..],
            &["2", "Up", "2", "3", "Enter"][..],
        ] {
            let a = d.assignment().await;
            let special = |k: &'static str| match k {
                "Enter" => "\u{E007}",
                "Up" => "\u{E013}",
                k => k,
            };
            d.keys(&keys.iter().copied().map(special).collect::<Vec<_>>())
                .await;
            d.wait_next(&a).await;
        }
        // Correction, critique, demonstration: type and submit.
        for (pid, field, shot, texts) in [
            (
                pids[1],
                "textarea[name=corrected]",
                "task-correction",
                ["Draft answer 0 with a typo the end.", "A rewritten answer."],
            ),
            (
                pids[2],
                "textarea[name=text]",
                "task-critique",
                ["Has a typo.", "Too vague."],
            ),
            (
                pids[3],
                "textarea[name=text]",
                "task-demonstration",
                ["The ideal answer 0.", "The ideal answer 1."],
            ),
        ] {
            d.goto(&format!("{site}/p/{pid}/task")).await;
            d.wait_for("a text task", |s| s.contains("id=\"task-form\""))
                .await;
            d.shot(shot).await;
            for t in texts {
                let a = d.assignment().await;
                d.type_into(field, t).await;
                d.click("#task-form button[type=submit]").await;
                d.wait_next(&a).await;
            }
        }
        d.logout().await;

        // Admin: project page with live stats, audit log, exports.
        d.login(&site, "admin").await;
        d.shot("projects-admin").await;
        d.goto(&format!("{site}/p/{pid}")).await;
        d.wait_for("stats", |s| s.contains("Fleiss")).await;
        d.shot("project-admin").await;
        let pref = d.export(&site, pid, "preference", Some("export")).await;
        // 4 items, one tie → 3 preference rows, each from ann1's single vote.
        assert_eq!(pref.len(), 3, "{pref:?}");
        for r in &pref {
            assert_eq!(r["annotator_ids"], json!([s.ann1]));
            assert_eq!(r["margin"], json!(1.0));
            assert_eq!(r["project"], "Helpfulness comparisons");
        }
        let rates = d.export(&site, rating, "rating", None).await;
        let mut scores: Vec<f64> = rates.iter().map(|r| r["score"].as_f64().unwrap()).collect();
        scores.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(scores, vec![2.5, 4.5]);
        let corr = d.export(&site, pids[1], "correction", None).await;
        assert!(corr
            .iter()
            .any(|r| r["corrected"] == "Draft answer 0 with a typo the end."
                && r["completion"] == "Draft answer 0 with a typo teh end."));
        let crit = d.export(&site, pids[2], "critique", None).await;
        assert_eq!(crit.len(), 2);
        let demo = d.export(&site, pids[3], "demonstration", None).await;
        let mut comps: Vec<&str> = demo
            .iter()
            .map(|r| r["completion"].as_str().unwrap())
            .collect();
        comps.sort();
        assert_eq!(comps, vec!["The ideal answer 0.", "The ideal answer 1."]);
        d.goto(&format!("{site}/admin/audit")).await;
        let audit = d.text().await;
        for action in [
            "login",
            "logout",
            "label",
            "undo",
            "export",
            "import",
            "member_add",
            "guidelines_edit",
        ] {
            assert!(
                audit.contains(&format!("\t{action}\t")),
                "audit lacks {action}:\n{audit}"
            );
        }
        d.shot("audit").await;
        server.abort();
    }
}
