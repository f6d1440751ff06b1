//! Queue order: overlap target, reward-model uncertainty first, least-labelled with a
//! per-annotator spread, gold items interleaved and shown to everyone; undo returns an
//! item to the queue. On SQLite and (when configured) PostgreSQL.

mod common;

use axum::http::StatusCode;
use common::*;
use rlhf_feedback::model::{Choice, LabelValue, NewItem, Project, TaskKind};
use rlhf_feedback::Db;
use serde_json::json;

fn items(n: usize, gold_every: Option<usize>) -> Vec<NewItem> {
    (0..n)
        .map(|i| NewItem {
            external_id: format!("i{i}"),
            prompt: format!("p{i}"),
            responses: vec!["a".into(), "b".into()],
            gold: gold_every.filter(|g| i % g == 0).map(|_| json!(0)),
        })
        .collect()
}

const LEASE_MS: i64 = 60_000;

async fn open(db: &Db, p: &Project, user: i64) -> Option<i64> {
    let (done, _) = db.progress(p, user).await.unwrap();
    db.open_task(p, user, done, LEASE_MS)
        .await
        .unwrap()
        .map(|(_, item)| item.id)
}

async fn label_next(db: &Db, p: &Project, user: i64, key: &str) -> Option<i64> {
    let (done, _) = db.progress(p, user).await.unwrap();
    let (a, item) = db.open_task(p, user, done, LEASE_MS).await.unwrap()?;
    let v = LabelValue::Pairwise {
        choice: Choice::A,
        shown_order: a.shown_order.clone(),
        preferred: Some(a.shown_order[0]),
    };
    db.submit_label(p.id, item.id, user, Some(&a), &v, key)
        .await
        .unwrap();
    Some(item.id)
}

#[tokio::test]
async fn overlap_uncertainty_spread_gold_and_undo() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let db = &s.db.db;
        let extra = [
            db.create_user(None, "ann3", rlhf_feedback::model::Role::Annotator, None)
                .await
                .unwrap(),
            db.create_user(None, "ann4", rlhf_feedback::model::Role::Annotator, None)
                .await
                .unwrap(),
        ];
        let users = [s.ann1, s.ann2, extra[0], extra[1]];

        // Overlap 2 over 5 items: 4 annotators give exactly 10 labels, 2 per item.
        let pid = project(&s.db, "overlap", TaskKind::Pairwise, 2, &users).await;
        db.insert_items(None, pid, "t", &items(5, None))
            .await
            .unwrap();
        let p = db.project(pid).await.unwrap();
        // Open tasks reserve their items: with overlap 2, two annotators share the
        // first item and the next two get the second.
        let mut firsts = vec![];
        for u in users {
            firsts.push(open(db, &p, u).await.unwrap());
        }
        assert_eq!(firsts[0], firsts[1]);
        assert_eq!(firsts[2], firsts[3]);
        assert_ne!(firsts[0], firsts[2]);
        let mut n = 0;
        for round in 0..5 {
            for u in users {
                if label_next(db, &p, u, &format!("o{round}-{u}"))
                    .await
                    .is_some()
                {
                    n += 1;
                }
            }
        }
        assert_eq!(n, 10);
        assert!(db
            .items(pid)
            .await
            .unwrap()
            .iter()
            .all(|i| i.label_count == 2));
        for u in users {
            assert!(open(db, &p, u).await.is_none());
        }
        // Undo frees a slot: the item comes back (to anyone, including the undoer).
        let last = db.last_live_label(pid, s.ann1).await.unwrap().unwrap();
        db.submit_label(pid, last.item_id, s.ann1, None, &LabelValue::Undo, "undo")
            .await
            .unwrap();
        assert_eq!(open(db, &p, s.ann1).await, Some(last.item_id));
        let (done, open) = db.progress(&p, s.ann1).await.unwrap();
        assert_eq!(open, 1);
        assert!(done >= 1);

        // Uncertainty: most uncertain scored item first, then unscored least-labelled.
        let pid = project(&s.db, "scored", TaskKind::Pairwise, 1, &users).await;
        db.insert_items(None, pid, "t", &items(4, None))
            .await
            .unwrap();
        db.set_uncertainties(
            None,
            pid,
            "s",
            &[("i2".into(), 0.9, 1), ("i3".into(), 0.5, 2)],
        )
        .await
        .unwrap();
        let p = db.project(pid).await.unwrap();
        let order: Vec<String> = {
            let mut v = vec![];
            for k in 0..4 {
                let id = label_next(db, &p, s.ann1, &format!("s{k}")).await.unwrap();
                v.push(db.item(pid, id).await.unwrap().external_id);
            }
            v
        };
        assert_eq!(&order[..2], &["i2", "i3"]);

        // Gold: every 10th item, and past the overlap target for everyone.
        let pid = project(&s.db, "gold", TaskKind::Pairwise, 1, &users).await;
        db.insert_items(None, pid, "t", &items(30, Some(15)))
            .await
            .unwrap(); // i0 and i15 are gold
        let p = db.project(pid).await.unwrap();
        let mut seq = vec![];
        while let Some(id) = label_next(db, &p, s.ann1, &format!("g{}", seq.len())).await {
            seq.push(db.item(pid, id).await.unwrap());
        }
        assert_eq!(seq.len(), 30);
        assert!(seq[9].gold.is_some(), "10th item is gold");
        // ann2 still gets both gold items although ann1 already met the overlap of 1.
        let mut golds = 0;
        while let Some(id) = label_next(db, &p, s.ann2, &format!("h{golds}")).await {
            assert!(db.item(pid, id).await.unwrap().gold.is_some());
            golds += 1;
        }
        assert_eq!(golds, 2);
    }
}

/// An opened task reserves its item until the lease ends; nobody else gets it meanwhile
/// (this is what keeps concurrent annotators from overshooting the overlap).
#[tokio::test]
async fn leases_reserve_items_until_they_expire() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let db = &s.db.db;
        let pid = project(&s.db, "lease", TaskKind::Pairwise, 1, &[s.ann1, s.ann2]).await;
        db.insert_items(None, pid, "t", &items(1, None))
            .await
            .unwrap();
        let p = db.project(pid).await.unwrap();
        let (a1, item) = db.open_task(&p, s.ann1, 0, 300).await.unwrap().unwrap();
        assert!(
            db.open_task(&p, s.ann2, 0, 300).await.unwrap().is_none(),
            "reserved for ann1"
        );
        // ann1 asking again gets the same assignment back (no new row).
        let (again, _) = db.open_task(&p, s.ann1, 0, 300).await.unwrap().unwrap();
        assert_eq!(again.id, a1.id);
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        let (a2, item2) = db
            .open_task(&p, s.ann2, 0, 60_000)
            .await
            .unwrap()
            .expect("lease expired: free again");
        assert_eq!(item2.id, item.id);
        // Submitting ends the lease: the label counts instead, and the item is full.
        let v = LabelValue::Pairwise {
            choice: Choice::A,
            shown_order: a2.shown_order.clone(),
            preferred: Some(a2.shown_order[0]),
        };
        db.submit_label(pid, item.id, s.ann2, Some(&a2), &v, "k")
            .await
            .unwrap();
        assert!(db.open_task(&p, s.ann1, 0, 60_000).await.unwrap().is_none());
        let n: i64 = sqlx::Row::get(
            &sqlx::query(
                "SELECT COUNT(*) FROM assignments WHERE lease_until IS NOT NULL AND user_id = $1",
            )
            .bind(s.ann2)
            .fetch_one(&db.pool)
            .await
            .unwrap(),
            0,
        );
        assert_eq!(n, 0);
    }
}

/// Reloading the task page shows the same task and writes no new assignment row; after
/// an undo the pairwise item comes back with the sides as the annotator saw them.
#[tokio::test]
async fn task_page_reuses_the_open_assignment_and_undo_keeps_sides() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let db = &s.db.db;
        let pid = project(&s.db, "reuse", TaskKind::Pairwise, 1, &[s.ann1]).await;
        db.insert_items(None, pid, "t", &items(40, None))
            .await
            .unwrap();
        let mut c = Client::new(&s.db);
        c.login("ann1").await;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let t = c.get(&format!("/p/{pid}/task")).await;
            assert_eq!(t.status, StatusCode::OK);
            seen.insert(t.field("assignment"));
        }
        assert_eq!(seen.len(), 1, "20 GETs, one assignment");
        let count = || async {
            sqlx::Row::get::<i64, _>(
                &sqlx::query("SELECT COUNT(*) FROM assignments")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap(),
                0,
            )
        };
        assert_eq!(count().await, 1);
        // Label 30 items (pressing A), undo each time and check the sides come back as seen.
        for round in 0..30 {
            let t = c.get(&format!("/p/{pid}/task")).await;
            let (csrf, a) = (t.csrf(), t.field("assignment"));
            let left = t
                .body
                .split(r#"id="resp-a">"#)
                .nth(1)
                .unwrap()
                .split('<')
                .next()
                .unwrap()
                .to_string();
            let r = c
                .post(
                    &format!("/p/{pid}/label"),
                    &[
                        ("csrf", &csrf),
                        ("assignment", &a),
                        ("key", &format!("k{round}")),
                        ("choice", "A"),
                    ],
                )
                .await;
            assert_eq!(r.status, StatusCode::SEE_OTHER);
            let r = c
                .post(
                    &format!("/p/{pid}/undo"),
                    &[("csrf", &csrf), ("key", &format!("u{round}"))],
                )
                .await;
            let back = c.get(r.location()).await;
            assert!(back.body.contains("Answer withdrawn"), "{}", back.body);
            let left_again = back
                .body
                .split(r#"id="resp-a">"#)
                .nth(1)
                .unwrap()
                .split('<')
                .next()
                .unwrap()
                .to_string();
            assert_eq!(left, left_again, "round {round}: sides swapped after undo");
            let (a2, k2) = (back.field("assignment"), back.field("key"));
            let r = c
                .post(
                    &format!("/p/{pid}/label"),
                    &[
                        ("csrf", &csrf),
                        ("assignment", &a2),
                        ("key", &k2),
                        ("choice", "B"),
                    ],
                )
                .await;
            assert_eq!(r.status, StatusCode::SEE_OTHER);
        }
    }
}
