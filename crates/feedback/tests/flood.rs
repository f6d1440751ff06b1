//! Login flood: 64 concurrent clients each load the log-in page and post three wrong
//! passwords at a server on loopback. Every password check is a 19 MiB argon2 hash;
//! unbounded, 16 such clients grew the server from 12 MB to 1.8 GB for good. With the
//! bounded hash pool the process stays within a fixed bound and the excess is told 429.
//! Its own test binary, so the process's RSS is this server's (plus the clients').

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rlhf_feedback::throttle::Policy;
use rlhf_feedback::web::{serve_on, Config};
use rlhf_feedback::Db;

const CLIENTS: usize = 64;
/// Growth allowed over the pre-flood RSS: the working memory of the 2 hashing threads
/// (2 × 19 MiB, already in use after the warm-up) plus the clients' buffers. Measured:
/// about 5 MiB; with a fresh 19 MiB allocation per hash it was about 290 MiB.
const MAX_GROWTH_MIB: u64 = 64;

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn field(body: &str, name: &str) -> String {
    let pre = format!(r#"name="{name}" value=""#);
    let i = body.find(&pre).unwrap() + pre.len();
    body[i..].split('"').next().unwrap().to_string()
}

async fn attempt(http: &reqwest::Client, base: &str, user: &str, passwords: &[&str]) -> Vec<u16> {
    let r = http.get(format!("{base}/login")).send().await.unwrap();
    let pre = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            v.strip_prefix("rlhf_pre=")
                .map(|v| v.split(';').next().unwrap().to_string())
        })
        .unwrap();
    let csrf = field(&r.text().await.unwrap(), "csrf");
    let mut out = vec![];
    for p in passwords {
        let r = http
            .post(format!("{base}/login"))
            .header("cookie", format!("rlhf_pre={pre}"))
            .form(&[("csrf", csrf.as_str()), ("username", user), ("password", p)])
            .send()
            .await
            .unwrap();
        out.push(r.status().as_u16());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_flood_keeps_memory_flat() {
    if !std::path::Path::new("/proc/self/status").exists() {
        skip(
            "login-flood",
            "no /proc/self/status; the login-flood memory test needs Linux",
        );
        return;
    }
    let tdb = sqlite_db();
    let s = seed(&tdb.url).await;
    drop(s);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    // All clients share 127.0.0.1: switch the per-address throttle off so every guess
    // reaches the hash pool (the worst case for memory).
    let open = Policy {
        free_failures: u32::MAX,
        ..Policy::ADDRESS
    };
    let cfg = Config {
        address_throttle: open,
        ..Config::default()
    };
    let server = tokio::spawn(serve_on(
        listener,
        Db::connect(&tdb.url).await.unwrap(),
        cfg,
    ));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // Warm up: one real log-in (one hash, the dummy hash, connections).
    assert_eq!(attempt(&http, &base, "admin", &[PASSWORD]).await, vec![303]);
    assert_eq!(
        attempt(&http, &base, "nobody", &["wrong-one"]).await,
        vec![401]
    );
    let before = rss_kib();

    let peak = Arc::new(AtomicU64::new(before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (http, base) = (http.clone(), base.clone());
            // Distinct accounts (3 failures each) so the account throttle stays out of
            // the way and every 429 comes from the hash queue. Unknown users cost a
            // real hash too (timing must not reveal which accounts exist).
            let user = format!("ghost{i}");
            tokio::spawn(async move {
                attempt(&http, &base, &user, &["wrong-1", "wrong-2", "wrong-3"]).await
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for c in clients {
        for st in c.await.unwrap() {
            *statuses.entry(st).or_insert(0usize) += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let after = rss_kib();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "login flood ({CLIENTS} clients × 3 wrong passwords): RSS {:.1} MiB before, peak {:.1} MiB, {:.1} MiB after; statuses {statuses:?}",
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        after as f64 / 1024.0
    );
    assert!(
        peak.saturating_sub(before) < MAX_GROWTH_MIB * 1024,
        "RSS grew by {} MiB",
        (peak - before) / 1024
    );
    assert!(
        statuses.get(&429).copied().unwrap_or(0) > 0,
        "the hash queue never filled: {statuses:?}"
    );
    // The server still serves real log-ins.
    assert_eq!(attempt(&http, &base, "admin", &[PASSWORD]).await, vec![303]);
    server.abort();
}
