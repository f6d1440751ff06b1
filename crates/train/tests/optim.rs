use candle_core::{Device, Tensor, Var};
use rlhf_train::optim::{AdamW, AdamWConfig};

fn var(data: &[f32]) -> Var {
    Var::from_tensor(&Tensor::new(data, &Device::Cpu).unwrap()).unwrap()
}

/// Backward of sum(p * c) gives gradient c for p.
fn grads_for(opt: &AdamW, pairs: &[(&Var, &[f32])]) -> rlhf_train::optim::Grads {
    let mut loss = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu).unwrap();
    for (v, c) in pairs {
        let c = Tensor::new(*c, &Device::Cpu).unwrap();
        loss = (loss + (v.as_tensor() * c).unwrap().sum_all().unwrap()).unwrap();
    }
    opt.collect_grads(&loss.backward().unwrap()).unwrap()
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor().to_vec1().unwrap()
}

#[test]
fn adamw_matches_hand_computed_two_steps() {
    let w = var(&[1.0, -2.0, 0.5]);
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg).unwrap();
    // Reference (f64, PyTorch AdamW): p *= 1-lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
    // p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps), lr 0.1, betas (0.9, 0.999), eps 1e-8.
    // A zero gradient leaves m = v = 0, so only weight decay moves the third element in step 1.
    let expected = [
        [0.899000002, -1.898000001, 0.4995],
        [0.8177969063826517, -1.8533171424282264, 0.5734141770961723],
    ];
    for (g, want) in [[0.5f32, -1.0, 0.0], [0.1, 0.3, -0.2]].iter().zip(expected) {
        let grads = grads_for(&opt, &[(&w, g)]);
        opt.step(&grads, 0.1, None).unwrap();
        for (got, want) in values(&w).iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-6, "got {got}, want {want}");
        }
    }
    assert_eq!(opt.step_count(), 2);
}

#[test]
fn norm_and_bias_parameters_are_not_decayed() {
    let norm = var(&[1.0]);
    let weight = var(&[1.0]);
    let cfg = AdamWConfig {
        weight_decay: 0.5,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(
        vec![
            ("model.norm.weight".into(), norm.clone()),
            ("lm_head.weight".into(), weight.clone()),
        ],
        cfg,
    )
    .unwrap();
    // Zero gradients: any change comes from weight decay alone.
    let grads = grads_for(&opt, &[(&norm, &[0.0]), (&weight, &[0.0])]);
    opt.step(&grads, 0.1, None).unwrap();
    assert_eq!(values(&norm), [1.0]);
    assert_eq!(values(&weight), [0.95]);
}

#[test]
fn clipping_returns_pre_clip_norm_and_scales_gradients() {
    let a = var(&[0.0, 0.0]);
    let b = var(&[0.0]);
    let mut opt = AdamW::new(
        vec![("b".into(), b.clone()), ("a".into(), a.clone())],
        AdamWConfig::default(),
    )
    .unwrap();
    // Global norm over both tensors: sqrt(3² + 4² + 12²) = 13.
    let grads = grads_for(&opt, &[(&a, &[3.0, 4.0]), (&b, &[12.0])]);
    assert_eq!(grads.global_norm().unwrap(), 13.0);
    let norm = opt.step(&grads, 1e-3, Some(1.0)).unwrap();
    assert_eq!(norm, 13.0);
    // m after one step = (1-β1) · g · coef with coef = 1/(13+1e-6).
    let coef = 1.0f32 / (13.0 + 1e-6);
    let (m, v, step) = opt.state_of("a").unwrap();
    assert_eq!(step, 1);
    assert!((m[0] - 0.1 * 3.0 * coef).abs() < 1e-7 && (m[1] - 0.1 * 4.0 * coef).abs() < 1e-7);
    assert!((v[1] - 0.001 * (4.0 * coef) * (4.0 * coef)).abs() < 1e-9);

    // Below the threshold the gradient is untouched.
    let grads = grads_for(&opt, &[(&a, &[0.3, 0.4]), (&b, &[0.0])]);
    let norm = opt.step(&grads, 1e-3, Some(1.0)).unwrap();
    assert!((norm - 0.5).abs() < 1e-7);
    let (m, _, _) = opt.state_of("a").unwrap();
    let want = 0.9 * 0.1 * 3.0 * coef + 0.1 * 0.3;
    assert!((m[0] - want).abs() < 1e-7, "{} vs {want}", m[0]);
}

#[test]
fn accumulated_gradients_add_up() {
    let w = var(&[1.0, 2.0]);
    let opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
    let mut acc = grads_for(&opt, &[(&w, &[1.0, -1.0])]);
    let loss = (w.as_tensor() * Tensor::new(&[0.5f32, 0.25], &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    opt.accumulate_grads(&mut acc, &loss.backward().unwrap())
        .unwrap();
    let g: Vec<f32> = acc.as_slice()[0].as_ref().unwrap().to_vec1().unwrap();
    assert_eq!(g, [1.5, -0.75]);
}

#[test]
fn state_round_trips_through_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    let w = var(&[1.0, -2.0, 0.5]);
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
    let grads = grads_for(&opt, &[(&w, &[0.5, -1.0, 0.25])]);
    opt.step(&grads, 0.1, None).unwrap();
    opt.save_state(&path).unwrap();

    let w2 = var(&values(&w));
    let mut opt2 = AdamW::new(vec![("w".into(), w2.clone())], AdamWConfig::default()).unwrap();
    opt2.load_state(&path).unwrap();
    assert_eq!(opt.state_of("w"), opt2.state_of("w"));
    // Both continue identically.
    for (o, v) in [(&mut opt, &w), (&mut opt2, &w2)] {
        let g = grads_for(o, &[(v, &[0.1, 0.2, 0.3])]);
        o.step(&g, 0.1, None).unwrap();
    }
    assert_eq!(values(&w), values(&w2));

    // A parameter set that does not match is an error naming the file.
    let other = var(&[0.0]);
    let mut opt3 = AdamW::new(vec![("other".into(), other)], AdamWConfig::default()).unwrap();
    let err = opt3.load_state(&path).unwrap_err().to_string();
    assert!(
        err.contains("opt.safetensors") && err.contains("no state for parameter other"),
        "{err}"
    );
}
