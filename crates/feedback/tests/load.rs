//! Bounded loopback load test against the real `rlhf-feedback serve` binary:
//! 50 concurrent annotators make 10,000 submissions on an overlap-3 project of 5,000
//! items; then a second load during which the server is `kill -9`ed and restarted.
//! Every acknowledged submission must be stored exactly once (clients retry with the
//! same idempotency key until acked), and at most 1 % of the labels may go beyond the
//! overlap target (leases keep concurrent annotators apart). Prints labels/s, request
//! latency p50/p99, overshoot, losses and duplicates.

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rlhf_feedback::model::{NewItem, Role, TaskKind};
use rlhf_feedback::Db;
use sqlx::Row;

const ANNOTATORS: usize = 50;
const PHASE1_TOTAL: usize = 10_000;
const PHASE2_PER_ANNOTATOR: usize = 30;
const OVERLAP: i64 = 3;
const ITEMS: usize = 5_000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server process; killed on drop so a failing test leaves nothing running.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Server {
    /// `kill -9` (std's kill sends SIGKILL) and reap.
    fn kill9(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

fn start_server(db: &str, port: u16) -> Server {
    Server(
        Command::new(env!("CARGO_BIN_EXE_rlhf-feedback"))
            .args(["serve", "--db", db, "--addr", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start rlhf-feedback serve"),
    )
}

async fn wait_healthy(http: &reqwest::Client, base: &str) {
    let t0 = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "server did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn field(body: &str, name: &str) -> Option<String> {
    let pre = format!(r#"name="{name}" value=""#);
    let i = body.find(&pre)? + pre.len();
    Some(body[i..].split('"').next()?.to_string())
}

fn cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let kv = v.split(';').next()?;
            let (k, val) = kv.split_once('=')?;
            (k == name && !val.is_empty()).then(|| val.to_string())
        })
}

/// What every simulated annotator of one load run shares.
#[derive(Clone)]
struct Load {
    http: reqwest::Client,
    base: String,
    pid: i64,
    tag: &'static str,
    acked: Arc<std::sync::Mutex<Vec<String>>>,
    ack_count: Arc<AtomicUsize>,
    /// Milliseconds per successful request: (task page GETs, label POSTs).
    latency: Arc<std::sync::Mutex<(Vec<f64>, Vec<f64>)>>,
}

/// One annotator: logs in, then fetches tasks and submits labels. Network errors (the
/// server being killed) are retried: GETs simply again, POSTs with the same key.
async fn annotator(load: Load, user: String, submissions: usize) {
    let Load {
        http,
        base,
        pid,
        tag,
        acked,
        ack_count,
        latency,
    } = load;
    let retry = || tokio::time::sleep(Duration::from_millis(50));
    let session = loop {
        let Ok(r) = http.get(format!("{base}/login")).send().await else {
            retry().await;
            continue;
        };
        let pre = cookie(&r, "rlhf_pre").unwrap();
        let csrf = field(&r.text().await.unwrap(), "csrf").unwrap();
        let Ok(r) = http
            .post(format!("{base}/login"))
            .header("cookie", format!("rlhf_pre={pre}"))
            .form(&[
                ("csrf", csrf.as_str()),
                ("username", user.as_str()),
                ("password", PASSWORD),
            ])
            .send()
            .await
        else {
            retry().await;
            continue;
        };
        // Many log-ins at once fill the password-hash queue: 429, come back shortly.
        if r.status() == 429 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert_eq!(r.status(), 303, "login {user}");
        break cookie(&r, "rlhf_session").unwrap();
    };
    let ck = format!("rlhf_session={session}");
    let mut n = 0;
    while n < submissions {
        let t = Instant::now();
        let Ok(r) = http
            .get(format!("{base}/p/{pid}/task"))
            .header("cookie", &ck)
            .send()
            .await
        else {
            retry().await;
            continue;
        };
        if r.status() != 200 {
            retry().await;
            continue;
        }
        let Ok(body) = r.text().await else {
            retry().await;
            continue;
        };
        latency
            .lock()
            .unwrap()
            .0
            .push(t.elapsed().as_secs_f64() * 1000.0);
        let (Some(csrf), Some(a)) = (field(&body, "csrf"), field(&body, "assignment")) else {
            panic!("{user}: no task left after {n} submissions:\n{body}");
        };
        let key = format!("{tag}-{user}-{n}");
        let choice = ["A", "B", "tie", "both_bad"][n % 4];
        loop {
            let t = Instant::now();
            let sent = http
                .post(format!("{base}/p/{pid}/label"))
                .header("cookie", &ck)
                .form(&[
                    ("csrf", csrf.as_str()),
                    ("assignment", a.as_str()),
                    ("key", key.as_str()),
                    ("choice", choice),
                ])
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == 303 => {
                    latency
                        .lock()
                        .unwrap()
                        .1
                        .push(t.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
                Ok(r) => panic!(
                    "{user}: label rejected: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ),
                Err(_) => retry().await,
            }
        }
        acked.lock().unwrap().push(key);
        ack_count.fetch_add(1, Ordering::SeqCst);
        n += 1;
    }
}

/// (acknowledged keys, GET latencies ms, POST latencies ms)
async fn run_load(
    http: &reqwest::Client,
    base: &str,
    pid: i64,
    per_annotator: usize,
    tag: &'static str,
    ack_count: Arc<AtomicUsize>,
) -> (Vec<String>, Vec<f64>, Vec<f64>) {
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let latency = Arc::new(std::sync::Mutex::new((Vec::new(), Vec::new())));
    let load = Load {
        http: http.clone(),
        base: base.to_string(),
        pid,
        tag,
        acked: acked.clone(),
        ack_count,
        latency: latency.clone(),
    };
    let tasks: Vec<_> = (0..ANNOTATORS)
        .map(|i| tokio::spawn(annotator(load.clone(), format!("a{i}"), per_annotator)))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let v = acked.lock().unwrap().clone();
    let (g, p) = latency.lock().unwrap().clone();
    (v, g, p)
}

fn percentile(xs: &mut [f64], q: f64) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[((xs.len() - 1) as f64 * q).round() as usize]
}

async fn keys_in_db(url: &str, prefix: &str) -> Vec<(String, i64)> {
    let db = Db::connect(url).await.unwrap();
    sqlx::query("SELECT idempotency_key, COUNT(*) AS n FROM labels WHERE idempotency_key LIKE $1 GROUP BY idempotency_key")
        .bind(format!("{prefix}-%"))
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
        .collect()
}

/// (lost, duplicated): acknowledged keys not stored, keys stored more than once.
fn check_exactly_once(acked: &[String], stored: &[(String, i64)]) -> (usize, usize) {
    let stored_keys: HashSet<&str> = stored.iter().map(|(k, _)| k.as_str()).collect();
    let dup = stored.iter().filter(|(_, n)| *n != 1).count();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|k| !stored_keys.contains(k.as_str()))
        .collect();
    assert_eq!(dup, 0, "a key was stored twice");
    assert!(
        missing.is_empty(),
        "{} acknowledged submissions lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    (missing.len(), dup)
}

// One test per backend so the two run concurrently (SQLite is bound by its single
// writer, PostgreSQL by round trips; together they finish sooner).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_fifty_annotators_ten_thousand_submissions_and_crash_restart() {
    load_and_crash(sqlite_db()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_fifty_annotators_ten_thousand_submissions_and_crash_restart() {
    if let Some(tdb) = postgres_db().await {
        load_and_crash(tdb).await;
    }
}

async fn load_and_crash(tdb: TestDb) {
    {
        let t0 = Instant::now();
        // Setup through the library: annotators, a pairwise project and enough items.
        let pid = {
            let db = Db::connect(&tdb.url).await.unwrap();
            let hash = rlhf_feedback::auth::hash_password(PASSWORD).unwrap();
            let mut p = rlhf_feedback::model::NewProject::new("load", TaskKind::Pairwise);
            p.overlap = OVERLAP;
            let pid = db.create_project(None, &p).await.unwrap();
            for i in 0..ANNOTATORS {
                let uid = db
                    .create_user(None, &format!("a{i}"), Role::Annotator, Some(&hash))
                    .await
                    .unwrap();
                db.set_member(None, pid, uid, true).await.unwrap();
            }
            let items: Vec<NewItem> = (0..ITEMS)
                .map(|i| NewItem {
                    external_id: format!("it{i}"),
                    prompt: format!("prompt {i}"),
                    responses: vec![format!("a{i}"), format!("b{i}")],
                    gold: None,
                })
                .collect();
            db.insert_items(None, pid, "load", &items).await.unwrap();
            db.pool.close().await;
            pid
        };
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut server = start_server(&tdb.url, port);
        wait_healthy(&http, &base).await;

        // Phase 1: 10,000 submissions.
        let t1 = Instant::now();
        let count1 = Arc::new(AtomicUsize::new(0));
        let (acked1, mut get_ms, mut post_ms) =
            run_load(&http, &base, pid, PHASE1_TOTAL / ANNOTATORS, "p1", count1).await;
        let secs = t1.elapsed().as_secs_f64();
        assert_eq!(acked1.len(), PHASE1_TOTAL);
        let stored1 = keys_in_db(&tdb.url, "p1").await;
        assert_eq!(stored1.len(), PHASE1_TOTAL);
        let (lost1, dup1) = check_exactly_once(&acked1, &stored1);
        eprintln!(
            "[{}] phase 1: {} labels in {secs:.1}s = {:.0} labels/s; GET /task p50 {:.1} ms p99 {:.1} ms; POST /label p50 {:.1} ms p99 {:.1} ms; lost {lost1}, duplicated {dup1}",
            tdb.name,
            acked1.len(),
            acked1.len() as f64 / secs,
            percentile(&mut get_ms, 0.5),
            percentile(&mut get_ms, 0.99),
            percentile(&mut post_ms, 0.5),
            percentile(&mut post_ms, 0.99)
        );

        // Phase 2: kill -9 the server once a third of the load is acknowledged, restart.
        let count2 = Arc::new(AtomicUsize::new(0));
        let load = {
            let (http, base, c) = (http.clone(), base.clone(), count2.clone());
            tokio::spawn(async move {
                run_load(&http, &base, pid, PHASE2_PER_ANNOTATOR, "p2", c)
                    .await
                    .0
            })
        };
        let target = ANNOTATORS * PHASE2_PER_ANNOTATOR / 3;
        while count2.load(Ordering::SeqCst) < target {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.kill9();
        let at_kill = count2.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        server = start_server(&tdb.url, port);
        let acked2 = load.await.unwrap();
        eprintln!(
            "[{}] phase 2: killed after {at_kill} acks, {} acknowledged in total",
            tdb.name,
            acked2.len()
        );
        assert_eq!(acked2.len(), ANNOTATORS * PHASE2_PER_ANNOTATOR);
        let stored2 = keys_in_db(&tdb.url, "p2").await;
        let (lost2, dup2) = check_exactly_once(&acked2, &stored2);
        assert_eq!(
            stored2.len(),
            acked2.len(),
            "every stored submission was eventually acknowledged"
        );
        server.kill9();
        // Overlap: labels beyond the target (items with more than k live labels).
        let db = Db::connect(&tdb.url).await.unwrap();
        let p = db.project(pid).await.unwrap();
        let (_, _, _, live) = db.project_counts(&p).await.unwrap();
        assert_eq!(live as usize, PHASE1_TOTAL + acked2.len());
        let r = sqlx::query(
            "SELECT CAST(COALESCE(SUM(label_count - $2), 0) AS BIGINT), COUNT(*), MAX(label_count) FROM items WHERE project_id = $1 AND label_count > $2",
        )
        .bind(pid)
        .bind(OVERLAP)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let (beyond, items_over, max_labels): (i64, i64, Option<i64>) =
            (r.get(0), r.get(1), r.get(2));
        let unlabelled: i64 =
            sqlx::query("SELECT COUNT(*) FROM items WHERE project_id = $1 AND label_count = 0")
                .bind(pid)
                .fetch_one(&db.pool)
                .await
                .unwrap()
                .get(0);
        let overshoot = beyond as f64 / live as f64;
        eprintln!(
            "[{}] overshoot {:.2}% ({beyond} labels beyond overlap {OVERLAP} on {items_over} items, max {} labels on one item); {unlabelled} of {ITEMS} items unlabelled; phase 2 lost {lost2}, duplicated {dup2}",
            tdb.name,
            100.0 * overshoot,
            max_labels.unwrap_or(OVERLAP)
        );
        assert!(
            overshoot <= 0.01,
            "overshoot {:.2}% > 1%",
            100.0 * overshoot
        );
        eprintln!(
            "[{}] load test total {:.1}s",
            tdb.name,
            t0.elapsed().as_secs_f64()
        );
    }
}
