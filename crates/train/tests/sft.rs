//! SFT trainer behaviour on the addition data with the tiny fixture Llama.

mod common;

use rlhf_train::checkpoint::list_checkpoints;
use rlhf_train::metrics::read_metrics;
use rlhf_train::{SftTrainer, TrainError};

#[test]
fn loss_decreases_on_addition_data() {
    let out = tempfile::tempdir().unwrap();
    let mut cfg = common::addition_config(out.path());
    cfg.train.max_steps = Some(40);
    cfg.train.eval_steps = 20;
    let mut trainer = SftTrainer::new(cfg).unwrap();
    let summary = trainer.train().unwrap();
    assert_eq!(summary.steps, 40);

    let logs = read_metrics(&summary.metrics_file).unwrap();
    let losses: Vec<f64> = logs.iter().filter_map(|r| r.loss).collect();
    assert_eq!(losses.len(), 40);
    let (first, last) = (
        losses[..5].iter().sum::<f64>() / 5.0,
        losses[35..].iter().sum::<f64>() / 5.0,
    );
    assert!(
        last < 0.75 * first,
        "loss did not drop: first 5 steps {first:.3}, last 5 {last:.3}"
    );
    // TRL names on every train line; eval lines at steps 20 and 40.
    let line = logs.iter().find(|r| r.loss.is_some()).unwrap();
    assert!(
        line.grad_norm.is_some()
            && line.learning_rate == Some(1e-3)
            && line.mean_token_accuracy.is_some()
    );
    assert!(line.num_tokens.unwrap() > 0 && line.step_time_s.is_some());
    let evals: Vec<u64> = logs
        .iter()
        .filter(|r| r.eval_loss.is_some())
        .map(|r| r.step)
        .collect();
    assert_eq!(evals, [20, 40]);
    let eval = summary.eval.unwrap();
    assert!(eval.eval_loss < first && (0.0..=1.0).contains(&eval.eval_mean_token_accuracy));

    // The output directory is a complete model directory holding exactly the trained weights.
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.path().join(f).is_file(), "missing {f}");
    }
    assert_eq!(
        common::weights(&common::load(out.path())),
        common::weights(trainer.model())
    );
}

#[test]
fn gradient_accumulation_matches_full_batch() {
    let out = tempfile::tempdir().unwrap();
    let run = |batch: usize, accum: usize| {
        let mut cfg = common::addition_config(out.path());
        cfg.batch_size = batch;
        cfg.gradient_accumulation_steps = accum;
        cfg.train.max_steps = Some(3);
        let mut t = SftTrainer::new(cfg).unwrap();
        let stats: Vec<_> = (0..3).map(|_| t.step().unwrap()).collect();
        (stats, common::weights(t.model()))
    };
    let (full, w_full) = run(8, 1);
    let (acc, w_acc) = run(4, 2);
    let (acc8, w_acc8) = run(1, 8);
    for (other, w_other) in [(&acc, &w_acc), (&acc8, &w_acc8)] {
        for (a, b) in full.iter().zip(other.iter()) {
            assert_eq!(a.num_loss_tokens, b.num_loss_tokens);
            assert!(
                (a.loss - b.loss).abs() < 1e-5 * a.loss,
                "loss {} vs {}",
                a.loss,
                b.loss
            );
            assert!(
                (a.grad_norm - b.grad_norm).abs() < 1e-4 * a.grad_norm,
                "grad norm {} vs {}",
                a.grad_norm,
                b.grad_norm
            );
        }
        for (name, w) in &w_full {
            let max = w
                .iter()
                .zip(&w_other[name])
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(max < 1e-5, "{name}: weights differ by {max}");
        }
    }
}

#[test]
fn resumed_run_is_bit_identical() {
    let full_dir = tempfile::tempdir().unwrap();
    let killed_dir = tempfile::tempdir().unwrap();
    let config = |dir: &std::path::Path| {
        let mut cfg = common::addition_config(dir);
        cfg.batch_size = 4;
        cfg.gradient_accumulation_steps = 2;
        cfg.train.max_steps = Some(7);
        cfg.train.save_steps = 3;
        cfg.train.lr_scheduler_type = rlhf_train::schedule::ScheduleKind::Cosine;
        cfg.train.warmup_steps = 2;
        cfg.train.weight_decay = 0.01;
        cfg
    };
    let mut full = SftTrainer::new(config(full_dir.path())).unwrap();
    full.train().unwrap();

    // The interrupted run: it checkpointed at step 3 and logged steps 4..7, but its later checkpoint and
    // final model are lost (as if killed before they were written).
    SftTrainer::new(config(killed_dir.path()))
        .unwrap()
        .train()
        .unwrap();
    std::fs::remove_dir_all(killed_dir.path().join("checkpoint-6")).unwrap();
    std::fs::remove_file(killed_dir.path().join("model.safetensors")).unwrap();
    let mut cfg = config(killed_dir.path());
    cfg.train.resume = true;
    let mut resumed = SftTrainer::new(cfg).unwrap();
    assert_eq!(resumed.state().global_step, 3);
    let summary = resumed.train().unwrap();
    assert_eq!(summary.resumed_from_step, Some(3));

    let (a, b) = (
        common::weights(full.model()),
        common::weights(resumed.model()),
    );
    assert_eq!(a.len(), b.len());
    for (name, w) in &a {
        let same = w
            .iter()
            .zip(&b[name])
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{name} differs after resume");
    }
    // Optimizer moments too.
    for (name, _) in full.optimizer().params() {
        let (m1, v1, s1) = full.optimizer().state_of(name).unwrap();
        let (m2, v2, s2) = resumed.optimizer().state_of(name).unwrap();
        assert!(
            s1 == s2 && m1 == m2 && v1 == v2,
            "{name}: optimizer state differs"
        );
    }
    // Each step logged once, in order, with the same losses as the uninterrupted run.
    let l1 = read_metrics(&full_dir.path().join("metrics.jsonl")).unwrap();
    let l2 = read_metrics(&killed_dir.path().join("metrics.jsonl")).unwrap();
    let train_lines = |l: &[rlhf_train::metrics::LogRecord]| -> Vec<(u64, f64)> {
        l.iter()
            .filter_map(|r| r.loss.map(|x| (r.step, x)))
            .collect()
    };
    assert_eq!(train_lines(&l1), train_lines(&l2));
}

#[test]
fn resume_across_an_epoch_boundary() {
    // 20 examples, batch 8 → 3 steps per epoch (8, 8, 4): the resumed run must restart the next epoch's order.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("small.jsonl");
    let text = std::fs::read_to_string(common::root().join("data/sft_train.jsonl")).unwrap();
    std::fs::write(&data, text.lines().take(20).collect::<Vec<_>>().join("\n")).unwrap();
    let config = |out: &std::path::Path| {
        let mut cfg = common::addition_config(out);
        cfg.train_file = data.clone();
        cfg.eval_file = None;
        cfg.train.max_steps = Some(8);
        cfg.train.save_steps = 4;
        cfg
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let mut full = SftTrainer::new(config(&a)).unwrap();
    assert_eq!(full.steps_per_epoch(), 3);
    full.train().unwrap();
    {
        let mut t = SftTrainer::new(config(&b)).unwrap();
        for _ in 0..4 {
            t.step().unwrap();
        }
        t.save_checkpoint().unwrap();
        assert_eq!((t.state().data.epoch, t.state().data.index), (1, 8));
    }
    let mut cfg = config(&b);
    cfg.train.resume = true;
    let mut resumed = SftTrainer::new(cfg).unwrap();
    resumed.train().unwrap();
    assert_eq!(
        common::weights(full.model()),
        common::weights(resumed.model())
    );
    assert!((full.epoch() - 8.0 / 3.0).abs() < 1e-12);
}

#[test]
fn checkpoints_are_atomic_models_and_rotate() {
    let out = tempfile::tempdir().unwrap();
    let mut cfg = common::addition_config(out.path());
    cfg.train.max_steps = Some(4);
    cfg.train.save_steps = 1;
    cfg.train.save_total_limit = Some(2);
    cfg.eval_file = None;
    SftTrainer::new(cfg).unwrap().train().unwrap();
    let kept: Vec<u64> = list_checkpoints(out.path())
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, [3, 4]);
    let names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".tmp")),
        "temporary directories left: {names:?}"
    );
    let ckpt = out.path().join("checkpoint-4");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
        "training_config.json",
    ] {
        assert!(ckpt.join(f).is_file(), "checkpoint lacks {f}");
    }
    // The last checkpoint holds the final weights and loads as a model.
    assert_eq!(
        common::weights(&common::load(&ckpt)),
        common::weights(&common::load(out.path()))
    );
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    let mut cfg = common::addition_config(out.path());
    // Adam moves every weight by ~lr: after one step at 1e30 the activations overflow.
    cfg.train.learning_rate = 1e30;
    cfg.train.max_steps = Some(5);
    cfg.train.save_steps = 1;
    cfg.eval_file = None;
    let err = SftTrainer::new(cfg).unwrap().train().unwrap_err();
    let TrainError::NonFinite {
        step,
        last_checkpoint,
        ..
    } = &err
    else {
        panic!("unexpected error {err}")
    };
    let msg = err.to_string();
    assert!(
        msg.contains("non-finite") && msg.contains(&format!("step {step}")),
        "{msg}"
    );
    let good = last_checkpoint
        .clone()
        .expect("a checkpoint was saved before divergence");
    assert_eq!(good, out.path().join(format!("checkpoint-{}", step - 1)));
    assert!(good.join("trainer_state.json").is_file());
    // Nothing was saved for the failed step, and no final model was written.
    assert!(!out.path().join(format!("checkpoint-{step}")).exists());
    assert!(!out.path().join("model.safetensors").exists());
}

#[test]
fn resume_refuses_a_changed_batch_configuration() {
    let out = tempfile::tempdir().unwrap();
    let mut cfg = common::addition_config(out.path());
    cfg.train.max_steps = Some(2);
    cfg.train.save_steps = 2;
    cfg.eval_file = None;
    SftTrainer::new(cfg.clone()).unwrap().train().unwrap();
    cfg.train.resume = true;
    cfg.batch_size = 4;
    let err = SftTrainer::new(cfg)
        .err()
        .expect("changed batch size must be refused")
        .to_string();
    assert!(
        err.contains("training_config.json") && err.contains("batch_size"),
        "{err}"
    );
}

#[test]
fn packing_trains_on_packed_rows() {
    let out = tempfile::tempdir().unwrap();
    let mut cfg = common::addition_config(out.path());
    cfg.packing = true;
    cfg.train.max_steps = Some(3);
    let mut t = SftTrainer::new(cfg).unwrap();
    // ~10-token examples in rows of 64: 2000 examples fit in a few hundred rows.
    assert!(
        t.steps_per_epoch() < 2000 / 8 / 3,
        "rows were not packed: {} steps per epoch",
        t.steps_per_epoch()
    );
    let s = t.step().unwrap();
    assert!(s.loss.is_finite() && s.num_tokens > 8 * 40, "{s:?}");
    let summary = t.train().unwrap();
    assert!(summary.eval.unwrap().eval_loss.is_finite());
}
