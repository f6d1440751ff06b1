use rlhf_train::schedule::{Schedule, ScheduleKind, Warmup};

// Expected values from transformers' get_{cosine,linear}_schedule_with_warmup formulas evaluated in
// Python (float64): base lr 1e-3, 10 warmup steps, 100 total.
#[test]
fn cosine_with_warmup() {
    let s = Schedule::new(ScheduleKind::Cosine, 1e-3, Warmup::Steps(10), 100);
    let want = [
        (0, 0.0),
        (1, 0.0001),
        (5, 0.0005),
        (10, 0.001),
        (11, 0.0009996954135095479),
        (37, 0.0007938926261462366),
        (99, 3.0458649045211895e-07),
        (100, 0.0),
    ];
    for (step, lr) in want {
        assert_eq!(s.lr(step), lr, "step {step}");
    }
}

#[test]
fn linear_with_warmup() {
    let s = Schedule::new(ScheduleKind::Linear, 1e-3, Warmup::Steps(10), 100);
    let want = [
        (0, 0.0),
        (5, 0.0005),
        (10, 0.001),
        (11, 0.000988888888888889),
        (37, 0.0007),
        (99, 1.1111111111111112e-05),
        (100, 0.0),
        (120, 0.0),
    ];
    for (step, lr) in want {
        assert_eq!(s.lr(step), lr, "step {step}");
    }
}

#[test]
fn constant_with_and_without_warmup() {
    let s = Schedule::new(ScheduleKind::Constant, 2e-5, Warmup::Steps(0), 50);
    assert!((0..60).all(|i| s.lr(i) == 2e-5));
    let s = Schedule::new(ScheduleKind::Constant, 1e-3, Warmup::Steps(4), 50);
    assert_eq!(
        [s.lr(0), s.lr(2), s.lr(4), s.lr(49)],
        [0.0, 0.0005, 0.001, 0.001]
    );
}

#[test]
fn warmup_ratio_rounds_up() {
    // transformers: ceil(num_training_steps * warmup_ratio); 33 * 0.1 = 3.3000000000000003 → 4.
    assert_eq!(Warmup::Ratio(0.1).steps(33), 4);
    assert_eq!(Warmup::Ratio(0.05).steps(100), 5);
    let s = Schedule::new(ScheduleKind::Linear, 1.0, Warmup::Ratio(0.1), 33);
    assert_eq!(s.warmup_steps, 4);
    assert_eq!(s.lr(2), 0.5);
}

#[test]
fn schedule_names_parse() {
    assert_eq!(
        "cosine".parse::<ScheduleKind>().unwrap(),
        ScheduleKind::Cosine
    );
    assert!("cosine_restarts".parse::<ScheduleKind>().is_err());
}
