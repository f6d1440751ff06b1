//! A live feedback-app project as the label source: the round's candidate pairs are imported as items over the
//! app's HTTP interface (as an admin, through its forms and CSRF tokens), the app is polled until every item has
//! its overlap of labels or the deadline passes, and the decided pairs are pulled with the app's own preference
//! export (majority vote, with `item_id`, `label_ids` and `annotator_ids`; PII scrubbed on the way out). Importing is idempotent (items carry
//! ids), so a resumed run pushes again without duplicating anything.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::label::{record, Candidates, LabelInfo, Pair};
use crate::store::LabelLog;

/// A logged-in session with the app (an admin's, for importing and exporting).
pub struct App {
    base: String,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
    cookies: BTreeMap<String, String>,
    csrf: String,
}

fn csrf_in(html: &str) -> Option<String> {
    let prefix = r#"name="csrf" value=""#;
    let start = html.find(prefix)? + prefix.len();
    Some(html[start..].split('"').next()?.to_string())
}

impl App {
    /// Logs in as `user`.
    pub fn login(base: &str, user: &str, password: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut app = Self {
            base: base.trim_end_matches('/').to_string(),
            http,
            rt,
            cookies: BTreeMap::new(),
            csrf: String::new(),
        };
        let (_, page) = app.send(reqwest::Method::GET, "/login", None)?;
        let csrf = csrf_in(&page).ok_or_else(|| {
            anyhow!(
                "{}/login: no login form (is this the feedback app?)",
                app.base
            )
        })?;
        let (status, _) = app.send(
            reqwest::Method::POST,
            "/login",
            Some(&[("csrf", &csrf), ("username", user), ("password", password)]),
        )?;
        if status != 303 || !app.cookies.contains_key("rlhf_session") {
            bail!("{}: cannot log in as {user:?} (HTTP {status}); check feedback_user and RLHF_FEEDBACK_PASSWORD", app.base);
        }
        let (_, home) = app.send(reqwest::Method::GET, "/", None)?;
        app.csrf = csrf_in(&home)
            .ok_or_else(|| anyhow!("{}: no CSRF token on the home page", app.base))?;
        Ok(app)
    }

    /// One request with the session's cookies; returns (status, body).
    fn send(
        &mut self,
        method: reqwest::Method,
        path: &str,
        form: Option<&[(&str, &str)]>,
    ) -> Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        let cookie = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut req = self.http.request(method, &url).header("cookie", cookie);
        if let Some(f) = form {
            let body: String = f
                .iter()
                .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
                .collect::<Vec<_>>()
                .join("&");
            req = req
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body);
        }
        let (status, set, text) = self.rt.block_on(async {
            let resp = req
                .send()
                .await
                .with_context(|| format!("{url}: request failed"))?;
            let set: Vec<String> = resp
                .headers()
                .get_all("set-cookie")
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_string))
                .collect();
            let status = resp.status().as_u16();
            let text = resp
                .text()
                .await
                .with_context(|| format!("{url}: cannot read the response"))?;
            anyhow::Ok((status, set, text))
        })?;
        for c in set {
            let kv = c.split(';').next().unwrap_or_default();
            if let Some((k, v)) = kv.split_once('=') {
                self.cookies.insert(k.trim().to_string(), v.to_string());
            }
        }
        if status >= 400 {
            let msg: String = text.chars().take(300).collect();
            bail!("{url}: HTTP {status}: {msg}");
        }
        Ok((status, text))
    }

    /// GET `path`; the body.
    pub fn get(&mut self, path: &str) -> Result<String> {
        Ok(self.send(reqwest::Method::GET, path, None)?.1)
    }

    /// POSTs a form with the session's CSRF token; the body.
    pub fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Result<String> {
        let csrf = self.csrf.clone();
        let mut form = vec![("csrf", csrf.as_str())];
        form.extend_from_slice(fields);
        Ok(self.send(reqwest::Method::POST, path, Some(&form))?.1)
    }

    fn get_json(&mut self, path: &str) -> Result<Value> {
        let text = self.get(path)?;
        serde_json::from_str(&text).with_context(|| format!("{}{path}: not JSON", self.base))
    }

    /// Imports items (JSONL rows with `id`, `prompt`, `responses`) into `project`.
    pub fn import(&mut self, project: i64, source: &str, jsonl: &str) -> Result<()> {
        self.post(
            &format!("/p/{project}/import"),
            &[("source", source), ("jsonl", jsonl)],
        )
        .map(drop)
    }

    /// The project's overlap and, per external id, how many annotators have labelled the item.
    pub fn label_counts(&mut self, project: i64) -> Result<(i64, HashMap<String, i64>)> {
        let v = self.get_json(&format!("/p/{project}/items.json"))?;
        let overlap = v["overlap"]
            .as_i64()
            .ok_or_else(|| anyhow!("items.json without overlap: {v}"))?;
        let counts = v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| {
                Some((
                    i["external_id"].as_str()?.to_string(),
                    i["label_count"].as_i64()?,
                ))
            })
            .collect();
        Ok((overlap, counts))
    }

    /// The app's preference export of `project` (decided pairs with their provenance), PII scrubbed.
    pub fn export_preferences(&mut self, project: i64) -> Result<Vec<Value>> {
        let text = self.post(
            &format!("/p/{project}/export"),
            &[("format", "preference"), ("scrub", "1")],
        )?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).context("export row is not JSON"))
            .collect()
    }

    /// The app's quality statistics of `project` (agreement, per-annotator flags).
    pub fn stats(&mut self, project: i64) -> Result<Value> {
        self.get_json(&format!("/p/{project}/stats.json"))
    }
}

fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Where and how long to wait.
pub struct FeedbackTarget<'a> {
    pub url: &'a str,
    pub project: i64,
    pub user: &'a str,
    /// Prefix of the items' external ids (the run name), so runs sharing a project never collide.
    pub run: &'a str,
    pub deadline: Duration,
    pub poll: Duration,
}

/// Pushes the round's pairs `all`, waits for their labels and appends the app's decisions to the log.
pub fn by_feedback(
    t: &FeedbackTarget,
    round: usize,
    cands: &[Candidates],
    all: &[Pair],
    log: &mut LabelLog,
) -> Result<LabelInfo> {
    let password = std::env::var("RLHF_FEEDBACK_PASSWORD").map_err(|_| {
        anyhow!(
            "set RLHF_FEEDBACK_PASSWORD to the password of feedback user {:?}",
            t.user
        )
    })?;
    let mut app = App::login(t.url, t.user, &password)?;
    let external = |id: &str| format!("{}/{id}", t.run);
    let mut jsonl = String::new();
    for p in all {
        let c = &cands[p.prompt_index];
        let row = json!({"id": external(&p.id), "prompt": c.prompt(), "responses": [c.candidates[p.a].text, c.candidates[p.b].text]});
        jsonl.push_str(&row.to_string());
        jsonl.push('\n');
    }
    app.import(t.project, &format!("{}-round-{round}.jsonl", t.run), &jsonl)?;
    let started = Instant::now();
    let (overlap, waiting, timed_out) = loop {
        let (overlap, counts) = app.label_counts(t.project)?;
        let waiting = all
            .iter()
            .filter(|p| counts.get(&external(&p.id)).copied().unwrap_or(0) < overlap)
            .count();
        if waiting == 0 {
            break (overlap, 0, false);
        }
        if started.elapsed() >= t.deadline {
            break (overlap, waiting, true);
        }
        std::thread::sleep(t.poll);
    };
    let by = format!("feedback:{}#project-{}", t.url, t.project);
    let by_external: HashMap<String, &Pair> = all.iter().map(|p| (external(&p.id), p)).collect();
    let mut labels = Vec::new();
    for row in app.export_preferences(t.project)? {
        let Some(p) = row["external_id"].as_str().and_then(|e| by_external.get(e)) else {
            continue;
        };
        // The item's responses are [a, b]: the vote counts per response index say which won (the texts may
        // have been scrubbed on the way out).
        let (va, vb) = (
            row["votes"]["0"].as_u64().unwrap_or(0),
            row["votes"]["1"].as_u64().unwrap_or(0),
        );
        let p_a = match va.cmp(&vb) {
            std::cmp::Ordering::Greater => 1.0,
            std::cmp::Ordering::Less => 0.0,
            std::cmp::Ordering::Equal => continue,
        };
        let detail = json!({"item_id": row["item_id"], "label_ids": row["label_ids"], "annotator_ids": row["annotator_ids"],
            "votes": row["votes"], "margin": row["margin"], "project": row["project"]});
        labels.push(record(round, "feedback", &by, p, p_a, detail));
    }
    log.append(labels)?;
    Ok(
        json!({"feedback": {"url": t.url, "project": t.project, "overlap": overlap, "items_pushed": all.len(),
        "items_short_of_overlap": waiting, "deadline_passed": timed_out, "waited_s": started.elapsed().as_secs_f64()},
        "stats": app.stats(t.project)?}),
    )
}
