//! A live feedback app on 127.0.0.1 with simulated annotators who label through its pages (shared with the CLI's
//! iterate tests, which include this file by path).
#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rlhf_iterate::feedback::App;

/// The feedback app on a fresh SQLite database with an admin and three annotators, and one pairwise project
/// with overlap 2 they are members of. Returns (URL, project id, runtime).
pub fn feedback_app(dir: &Path) -> (String, i64, tokio::runtime::Runtime) {
    use rlhf_feedback::model::{NewProject, Role, TaskKind};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db_path = dir.join("fb.sqlite").display().to_string();
    let (db, project) = rt.block_on(async {
        let db = rlhf_feedback::Db::connect(&db_path).await.unwrap();
        let h = rlhf_feedback::auth::hash_password(PASSWORD).unwrap();
        db.create_user(None, "admin", Role::Admin, Some(&h))
            .await
            .unwrap();
        let mut p = NewProject::new("iterate", TaskKind::Pairwise);
        p.overlap = 2;
        p.min_seconds = 0.0;
        let project = db.create_project(None, &p).await.unwrap();
        for name in ANNOTATORS {
            let id = db
                .create_user(None, name, Role::Annotator, Some(&h))
                .await
                .unwrap();
            db.set_member(None, project, id, true).await.unwrap();
        }
        (db, project)
    });
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(rlhf_feedback::web::serve_on(
        listener,
        db,
        rlhf_feedback::web::Config::default(),
    ));
    (url, project, rt)
}

pub const PASSWORD: &str = "password-123";
pub const ANNOTATORS: [&str; 3] = ["ann1", "ann2", "ann3"];

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

fn between<'a>(html: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let i = html.find(start)? + start.len();
    Some(&html[i..i + html[i..].find(end)?])
}

/// A simulated annotator working through the app's task pages until `stop`: prefers the shorter response
/// (ties: "tie"). Returns how many labels it submitted.
pub fn annotate(url: String, project: i64, name: &'static str, stop: Arc<AtomicBool>) -> usize {
    let mut app = App::login(&url, name, PASSWORD).unwrap();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let page = app.get(&format!("/p/{project}/task")).unwrap();
        let (Some(a), Some(b)) = (
            between(&page, r#"id="resp-a">"#, "</div>"),
            between(&page, r#"id="resp-b">"#, "</div>"),
        ) else {
            std::thread::sleep(Duration::from_millis(30));
            continue;
        };
        let (la, lb) = (unescape(a).chars().count(), unescape(b).chars().count());
        let choice = if la < lb {
            "A"
        } else if lb < la {
            "B"
        } else {
            "tie"
        };
        let field = |f: &str| {
            between(&page, &format!(r#"name="{f}" value=""#), "\"")
                .unwrap()
                .to_string()
        };
        let (assignment, key) = (field("assignment"), field("key"));
        app.post(
            &format!("/p/{project}/label"),
            &[
                ("assignment", &assignment),
                ("key", &key),
                ("choice", choice),
            ],
        )
        .unwrap();
        n += 1;
    }
    n
}

/// The three annotators, each on its own thread until `stop` is set; join them for their label counts.
pub fn start_annotators(
    url: &str,
    project: i64,
) -> (Arc<AtomicBool>, Vec<std::thread::JoinHandle<usize>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let workers = ANNOTATORS
        .iter()
        .map(|name| {
            let (url, stop) = (url.to_string(), stop.clone());
            std::thread::spawn(move || annotate(url, project, name, stop))
        })
        .collect();
    (stop, workers)
}
