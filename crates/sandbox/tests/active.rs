//! `rlhf sandbox active-learning --quick`: both curves exist, accuracies are in [0, 1] and move with the
//! budget, and the same configuration gives the same JSON.

use rlhf_sandbox::active::{run, ActiveConfig};
use rlhf_train::select::Strategy;

#[test]
fn quick_curves_are_measured_and_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ActiveConfig::quick();
    let s = run(&cfg, &dir.path().join("a")).unwrap();
    assert_eq!(s.curves.len(), cfg.seeds.len() * cfg.strategies.len());
    for strategy in [Strategy::Random, Strategy::Disagreement] {
        let c = s
            .curves
            .iter()
            .find(|c| c.strategy == strategy)
            .expect("a curve per strategy");
        assert_eq!(c.points.len(), cfg.rounds + 1);
        let budgets: Vec<usize> = c.points.iter().map(|p| p.pairs).collect();
        assert_eq!(
            budgets,
            vec![16, 32, 48],
            "the same label budget per round for every strategy"
        );
        assert!(c
            .points
            .iter()
            .all(|p| (0.0..=1.0).contains(&p.accuracy) && p.labels == 3 * p.pairs));
        assert!(c
            .points
            .iter()
            .all(|p| p.training_pairs <= p.pairs && p.training_pairs > 0));
    }
    // Round 0 is the shared random seed set: the same accuracy for both arms; later rounds differ by budget.
    let acc = |st: Strategy| -> Vec<f64> {
        s.curves
            .iter()
            .find(|c| c.strategy == st)
            .unwrap()
            .points
            .iter()
            .map(|p| p.accuracy)
            .collect()
    };
    assert_eq!(acc(Strategy::Random)[0], acc(Strategy::Disagreement)[0]);
    assert!(
        acc(Strategy::Random).windows(2).any(|w| w[0] != w[1]),
        "accuracy moves with the budget"
    );
    assert!(
        acc(Strategy::Disagreement).windows(2).any(|w| w[0] != w[1]),
        "accuracy moves with the budget"
    );
    assert!(!s.findings.is_empty() && s.findings[0].starts_with("disagreement "));

    let json = std::fs::read(dir.path().join("a/active_learning.json")).unwrap();
    let md = std::fs::read_to_string(dir.path().join("a/active_learning.md")).unwrap();
    assert!(md.contains("| 48 | 144 |"), "{md}");
    assert!(
        std::fs::read_to_string(dir.path().join("a/active_learning.html"))
            .unwrap()
            .contains("<svg")
    );
    run(&cfg, &dir.path().join("b")).unwrap();
    assert_eq!(
        json,
        std::fs::read(dir.path().join("b/active_learning.json")).unwrap(),
        "same seed, same JSON"
    );
}

#[test]
fn a_pool_too_small_for_the_budget_is_refused() {
    let cfg = ActiveConfig {
        pool_prompts: 40,
        ..ActiveConfig::quick()
    };
    let dir = tempfile::tempdir().unwrap();
    let e = run(&cfg, dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("pool_prompts (40) must hold initial_pairs + rounds × pairs_per_round (48)"),
        "{e}"
    );
}

#[test]
fn sign_test_matches_the_binomial_tails() {
    use rlhf_sandbox::active::sign_test;
    assert_eq!(sign_test(5, 5), 1.0);
    assert_eq!(sign_test(0, 0), 1.0);
    // 2 · P(X ≤ 1 | n = 10) = 2 · 11 / 1024; 2 · P(X ≤ 5 | n = 20) = 2 · 21700 / 2^20.
    assert!((sign_test(9, 1) - 22.0 / 1024.0).abs() < 1e-12);
    assert!((sign_test(5, 15) - 2.0 * 21700.0 / 1048576.0).abs() < 1e-12);
    assert_eq!(sign_test(1, 9), sign_test(9, 1));
}
