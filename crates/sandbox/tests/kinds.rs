//! `rlhf sandbox feedback-kinds --quick`: every kind trains a reward model at every budget, with the
//! exporter's own rows.

use rlhf_sandbox::kinds::{run, Kind, KindsConfig};

#[test]
fn every_kind_is_measured_at_every_budget() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = KindsConfig::quick();
    let s = run(&cfg, dir.path()).unwrap();
    assert_eq!(
        s.measurements.len(),
        cfg.seeds.len() * cfg.kinds.len() * cfg.label_budgets.len()
    );
    for m in &s.measurements {
        assert!((0.0..=1.0).contains(&m.accuracy), "{m:?}");
        assert!(m.training_rows > 0 && m.training_rows <= m.labels, "{m:?}");
        match m.kind {
            // Every rating is a row; ties give no preference row; perfect replies get no correction.
            Kind::Rating => assert_eq!(m.training_rows, m.labels),
            Kind::Pairwise | Kind::Correction => assert!(m.training_rows < m.labels, "{m:?}"),
        }
    }
    assert_eq!(s.mean.len(), 3);
    assert!(s.mean.values().all(|v| v.len() == cfg.label_budgets.len()));
    assert_eq!(s.findings.len(), cfg.label_budgets.len());
    let md = std::fs::read_to_string(dir.path().join("feedback_kinds.md")).unwrap();
    assert!(
        md.starts_with("| labels | correction | pairwise | rating |"),
        "{md}"
    );
    assert!(
        dir.path().join("feedback_kinds.json").is_file()
            && dir.path().join("feedback_kinds.html").is_file()
    );
}
