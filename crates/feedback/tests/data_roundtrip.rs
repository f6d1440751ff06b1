//! Exports are read back with rlhf-data's dataset reader (the trainers' entry point),
//! so field names and types match what training expects.

mod common;

use common::*;
use rlhf_data::Format as DataFormat;
use rlhf_feedback::export::{export_rows, to_jsonl, Format};
use rlhf_feedback::model::{Choice, LabelValue, NewItem, TaskKind};

#[tokio::test]
async fn exports_load_with_rlhf_data() {
    for tdb in databases().await {
        let s = seed(&tdb.url).await;
        let db = &s.db.db;
        let dir = tempfile::tempdir().unwrap();
        let item = |i: usize, n: usize| NewItem {
            external_id: format!("x{i}"),
            prompt: format!("Prompt {i}, mail me at eve@example.org"),
            responses: (0..n).map(|j| format!("response {i}.{j}")).collect(),
            gold: None,
        };
        let cases: Vec<(TaskKind, Format, DataFormat, Vec<LabelValue>)> = vec![
            (
                TaskKind::Pairwise,
                Format::Preference,
                DataFormat::Preference,
                vec![
                    LabelValue::Pairwise {
                        choice: Choice::A,
                        shown_order: vec![1, 0],
                        preferred: Some(1),
                    },
                    LabelValue::Pairwise {
                        choice: Choice::B,
                        shown_order: vec![0, 1],
                        preferred: Some(1),
                    },
                ],
            ),
            (
                TaskKind::Pairwise,
                Format::Kto,
                DataFormat::Unpaired,
                vec![
                    LabelValue::Pairwise {
                        choice: Choice::A,
                        shown_order: vec![0, 1],
                        preferred: Some(0),
                    },
                    LabelValue::Pairwise {
                        choice: Choice::A,
                        shown_order: vec![0, 1],
                        preferred: Some(0),
                    },
                ],
            ),
            (
                TaskKind::Rating,
                Format::Rating,
                DataFormat::Rating,
                vec![
                    LabelValue::Rating {
                        scores: [("helpful".to_string(), 4), ("harmless".to_string(), 5)].into(),
                    },
                    LabelValue::Rating {
                        scores: [("helpful".to_string(), 2), ("harmless".to_string(), 5)].into(),
                    },
                ],
            ),
            (
                TaskKind::Correction,
                Format::Correction,
                DataFormat::Correction,
                vec![LabelValue::Correction {
                    corrected: "better".into(),
                    unified_diff: "-a\n+b\n".into(),
                    word_diff: "[-a-]{+b+}".into(),
                }],
            ),
            (
                TaskKind::Critique,
                Format::Critique,
                DataFormat::PromptCompletion,
                vec![LabelValue::Critique {
                    text: "vague".into(),
                }],
            ),
            (
                TaskKind::Demonstration,
                Format::Demonstration,
                DataFormat::PromptCompletion,
                vec![LabelValue::Demonstration {
                    text: "ideal".into(),
                }],
            ),
        ];
        for (n, (kind, format, want, values)) in cases.into_iter().enumerate() {
            let pid = project(&s.db, &format!("p{n}"), kind, 3, &[]).await;
            let responses = if kind == TaskKind::Pairwise { 2 } else { 1 };
            db.insert_items(None, pid, "t", &[item(0, responses), item(1, responses)])
                .await
                .unwrap();
            for it in db.items(pid).await.unwrap() {
                for (u, v) in [s.ann1, s.ann2].iter().zip(&values) {
                    let a = db.open_item(&it, *u, false, 60_000).await.unwrap();
                    db.submit_label(
                        pid,
                        it.id,
                        *u,
                        Some(&a),
                        v,
                        &format!("k{pid}-{}-{u}", it.id),
                    )
                    .await
                    .unwrap();
                }
            }
            let p = db.project(pid).await.unwrap();
            let rows = export_rows(
                &p,
                &db.items(pid).await.unwrap(),
                &db.live_labels(pid).await.unwrap(),
                format,
                true,
            )
            .unwrap();
            let path = dir.path().join(format!("{}-{n}.jsonl", format.as_str()));
            std::fs::write(&path, to_jsonl(&rows)).unwrap();
            let ds = rlhf_data::load_dataset(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", format.as_str()));
            assert_eq!(ds.format, want, "{}", format.as_str());
            assert!(!ds.conversational);
            assert_eq!(ds.len(), rows.len());
            assert!(ds.len() >= 2, "{}: {} rows", format.as_str(), ds.len());
            for row in &ds.rows {
                let json = rlhf_data::jsonl::to_line(row);
                // Provenance survives as extra columns; PII was scrubbed.
                assert!(
                    json.contains("\"annotator_ids\"")
                        && json.contains("\"label_ids\"")
                        && json.contains(&format!("\"project\":\"p{n}\"")),
                    "{json}"
                );
                assert!(
                    json.contains("[EMAIL]") && !json.contains("eve@example.org"),
                    "{json}"
                );
            }
            if want == DataFormat::Preference {
                let pairs = ds.preference_pairs().unwrap();
                assert_eq!(pairs[0].margin, Some(1.0));
            }
        }
    }
}
