//! Queue order: overlap target, reward-model uncertainty first, least-labelled with a
//! per-annotator spread, gold items interleaved and shown to everyone; undo returns an
//! item to the queue. On SQLite and (when configured) PostgreSQL.

mod common;

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

async fn label_next(db: &Db, p: &Project, user: i64, key: &str) -> Option<i64> {
    let (done, _) = db.progress(p, user).await.unwrap();
    let item = db.next_item(p, user, done).await.unwrap()?;
    let a = db.create_assignment(&item, user, true).await.unwrap();
    let v = LabelValue::Pairwise { choice: Choice::A, shown_order: a.shown_order.clone(), preferred: Some(a.shown_order[0]) };
    db.submit_label(p.id, item.id, user, Some(&a), &v, key).await.unwrap();
    Some(item.id)
}

#[tokio::test]
async fn overlap_uncertainty_spread_gold_and_undo() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let db = &s.db.db;
        let extra = [
            db.create_user(None, "ann3", rlhf_feedback::model::Role::Annotator, None).await.unwrap(),
            db.create_user(None, "ann4", rlhf_feedback::model::Role::Annotator, None).await.unwrap(),
        ];
        let users = [s.ann1, s.ann2, extra[0], extra[1]];

        // Overlap 2 over 5 items: 4 annotators give exactly 10 labels, 2 per item.
        let pid = project(&s.db, "overlap", TaskKind::Pairwise, 2, &users).await;
        db.insert_items(None, pid, "t", &items(5, None)).await.unwrap();
        let p = db.project(pid).await.unwrap();
        // Different annotators start on different items (round-robin spread).
        let firsts: std::collections::HashSet<i64> = {
            let mut f = std::collections::HashSet::new();
            for u in users {
                f.insert(db.next_item(&p, u, 0).await.unwrap().unwrap().id);
            }
            f
        };
        assert!(firsts.len() >= 2, "all annotators got the same first item");
        let mut n = 0;
        for round in 0..5 {
            for u in users {
                if label_next(db, &p, u, &format!("o{round}-{u}")).await.is_some() {
                    n += 1;
                }
            }
        }
        assert_eq!(n, 10);
        assert!(db.items(pid).await.unwrap().iter().all(|i| i.label_count == 2));
        for u in users {
            assert!(db.next_item(&p, u, 0).await.unwrap().is_none());
        }
        // Undo frees a slot: the item comes back (to anyone, including the undoer).
        let last = db.last_live_label(pid, s.ann1).await.unwrap().unwrap();
        db.submit_label(pid, last.item_id, s.ann1, None, &LabelValue::Undo, "undo").await.unwrap();
        assert_eq!(db.next_item(&p, s.ann1, 0).await.unwrap().map(|i| i.id), Some(last.item_id));
        let (done, open) = db.progress(&p, s.ann1).await.unwrap();
        assert_eq!(open, 1);
        assert!(done >= 1);

        // Uncertainty: most uncertain scored item first, then unscored least-labelled.
        let pid = project(&s.db, "scored", TaskKind::Pairwise, 1, &users).await;
        db.insert_items(None, pid, "t", &items(4, None)).await.unwrap();
        db.set_uncertainties(None, pid, "s", &[("i2".into(), 0.9, 1), ("i3".into(), 0.5, 2)]).await.unwrap();
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
        db.insert_items(None, pid, "t", &items(30, Some(15))).await.unwrap(); // i0 and i15 are gold
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
