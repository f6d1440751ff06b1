//! One SFT step against transformers/TRL (fixtures/reference/sft_step.json, made by tools/make_fixtures.py).

mod common;

use std::collections::HashMap;

use rlhf_data::TokenizedSequence;
use rlhf_train::schedule::ScheduleKind;
use rlhf_train::sft::{sft_nll, SftBatch};
use rlhf_train::{SftConfig, SftTrainer};
use serde_json::Value;

fn reference() -> Value {
    let text =
        std::fs::read_to_string(common::root().join("fixtures/reference/sft_step.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The fixture batch as unpadded rows (labels ≠ IGNORE are the loss tokens).
fn examples(r: &Value) -> Vec<TokenizedSequence> {
    let b = &r["batch"];
    let rows = |k: &str| -> Vec<Vec<i64>> { serde_json::from_value(b[k].clone()).unwrap() };
    let (ids, labels, mask) = (rows("input_ids"), rows("labels"), rows("attention_mask"));
    ids.iter()
        .zip(&labels)
        .zip(&mask)
        .map(|((ids, labels), mask)| {
            let n = mask.iter().filter(|&&m| m == 1).count();
            TokenizedSequence::new(
                ids[..n].iter().map(|&i| i as u32).collect(),
                labels[..n].to_vec(),
            )
        })
        .collect()
}

fn trainer(r: &Value, weight_decay: f64, max_grad_norm: f64) -> SftTrainer {
    let dir = common::model_dir();
    let mut cfg = SftConfig::with_defaults(dir.clone(), dir.join("unused"), dir.join("unused"));
    cfg.batch_size = 4;
    cfg.train.learning_rate = 1e-3;
    cfg.train.lr_scheduler_type = ScheduleKind::Constant;
    cfg.train.weight_decay = weight_decay;
    cfg.train.max_grad_norm = max_grad_norm;
    cfg.train.max_steps = Some(1);
    SftTrainer::from_parts(cfg, common::load(&dir), examples(r), Vec::new(), 0).unwrap()
}

fn mean_loss(t: &SftTrainer, ex: &[TokenizedSequence]) -> f64 {
    let refs: Vec<&TokenizedSequence> = ex.iter().collect();
    let batch = SftBatch::new(&refs, 0, t.model().device()).unwrap();
    let (nll, _) = sft_nll(t.model(), &batch).unwrap();
    nll.to_scalar::<f32>().unwrap() as f64 / batch.num_loss_tokens as f64
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn loss_and_gradients_match_transformers() {
    let r = reference();
    let ex = examples(&r);
    let t = trainer(&r, 0.0, 0.0);
    let refs: Vec<&TokenizedSequence> = ex.iter().collect();
    let batch = SftBatch::new(&refs, 0, t.model().device()).unwrap();
    assert_eq!(
        batch.num_loss_tokens as u64,
        r["num_loss_tokens"].as_u64().unwrap()
    );
    let (nll, _) = sft_nll(t.model(), &batch).unwrap();
    let loss_sum = nll.to_scalar::<f32>().unwrap() as f64;
    assert!(
        rel(loss_sum, r["loss_sum"].as_f64().unwrap()) < 1e-5,
        "loss_sum {loss_sum}"
    );

    let loss = (nll / batch.num_loss_tokens as f64).unwrap();
    let grads = t
        .optimizer()
        .collect_grads(&rlhf_model::backward(&loss).unwrap())
        .unwrap();
    let want: HashMap<String, f64> =
        serde_json::from_value(r["no_weight_decay"]["grad_norms"].clone()).unwrap();
    let names: Vec<&str> = t.optimizer().params().map(|(n, _)| n).collect();
    assert_eq!(names.len(), want.len());
    for (name, g) in names.iter().zip(grads.as_slice()) {
        let g = g.as_ref().unwrap();
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt() as f64;
        assert!(
            rel(norm, want[*name]) < 1e-4,
            "{name}: {norm} vs {}",
            want[*name]
        );
    }
    let total = grads.global_norm().unwrap();
    let want_total = r["no_weight_decay"]["total_grad_norm"].as_f64().unwrap();
    assert!(
        rel(total, want_total) < 1e-4,
        "grad norm {total} vs {want_total}"
    );
}

#[test]
fn one_adamw_step_matches_transformers() {
    let r = reference();
    let ex = examples(&r);
    for (case, wd, clip) in [
        ("no_weight_decay", 0.0, 0.0),
        ("weight_decay_0.01", 0.01, 0.0),
        ("clipped_max_grad_norm_1.0", 0.0, 1.0),
    ] {
        let mut t = trainer(&r, wd, clip);
        let stats = t.step().unwrap();
        assert!(
            rel(stats.loss, 6.407433986663818) < 1e-5,
            "{case}: loss {}",
            stats.loss
        );
        assert!(
            rel(stats.grad_norm, 9.128808811698198) < 1e-4,
            "{case}: grad norm {}",
            stats.grad_norm
        );
        let after = mean_loss(&t, &ex);
        let want = r[case]["loss_after"].as_f64().unwrap();
        assert!(
            rel(after, want) < 1e-4,
            "{case}: loss after {after} vs {want}"
        );
        if let Some(samples) = r[case]["param_samples_after"].as_array() {
            let w = common::weights(t.model());
            for s in samples {
                let name = s["param"].as_str().unwrap();
                let dims = t
                    .optimizer()
                    .params()
                    .find(|(n, _)| *n == name)
                    .unwrap()
                    .1
                    .as_tensor()
                    .dims()
                    .to_vec();
                let cols = if dims.len() == 2 { dims[1] } else { 0 };
                let start = s["row"].as_u64().map_or(0, |row| row as usize * cols);
                let first: Vec<f64> = serde_json::from_value(s["first_6"].clone()).unwrap();
                for (i, want) in first.iter().enumerate() {
                    let got = w[name][start + i] as f64;
                    assert!(
                        (got - want).abs() < 1e-6,
                        "{case}: {name}[{}] {got} vs {want}",
                        start + i
                    );
                }
            }
        }
    }
}
