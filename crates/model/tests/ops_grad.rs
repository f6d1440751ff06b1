//! Every fused op against its plain candle composition (forward and backward) and against central
//! finite differences (in f64, through the plain composition), plus gradient coverage of every
//! parameter of every architecture.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use rlhf_model::ops;

type OpFn = dyn Fn(&[Tensor]) -> Result<Tensor>;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic pseudo-normal values without a global RNG.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let mut acc = 0f32;
            for _ in 0..4 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                acc += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            (acc - 2.0) * 1.7
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// `inputs[..n_diff]` are differentiated; the rest (targets, cos/sin) are constants.
fn check(name: &str, inputs: &[Tensor], n_diff: usize, fused: &OpFn, reference: &OpFn) {
    let vars: Vec<Var> = inputs[..n_diff]
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let args: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().clone())
        .chain(inputs[n_diff..].iter().cloned())
        .collect();
    let yf = fused(&args).unwrap();
    let yr = reference(&args).unwrap();
    assert_eq!(yf.dims(), yr.dims(), "{name}: shapes");
    let fwd_err = max_abs(&(&yf - &yr).unwrap());
    assert!(
        fwd_err < 1e-5 * (1.0 + max_abs(&yr)),
        "{name}: forward differs by {fwd_err}"
    );

    // Loss = Σ y ⊙ r with fixed random r, so every output element matters.
    let r = randn(yf.dims(), 99);
    let gf = (&yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let a = gf
            .get(v)
            .unwrap_or_else(|| panic!("{name}: input {i} got no gradient (fused)"));
        let b = gr.get(v).unwrap();
        let scale = 1.0 + max_abs(b);
        let err = max_abs(&(a - b).unwrap());
        assert!(
            err < 1e-4 * scale,
            "{name}: grad of input {i} differs from reference by {err}"
        );
        assert!(max_abs(a) > 0.0, "{name}: grad of input {i} is all zero");

        // Central differences in f64 at a few coordinates.
        let base: Vec<f64> = inputs[i]
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let analytic: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let r64 = r.to_dtype(DType::F64).unwrap();
        let eval = |x: &[f64]| -> f64 {
            let mut args: Vec<Tensor> = inputs
                .iter()
                .map(|t| {
                    if t.dtype() == DType::F32 {
                        t.to_dtype(DType::F64).unwrap()
                    } else {
                        t.clone()
                    }
                })
                .collect();
            args[i] = Tensor::from_vec(x.to_vec(), inputs[i].dims(), &Device::Cpu).unwrap();
            (reference(&args).unwrap() * &r64)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let eps = 1e-5;
        for k in (0..base.len()).step_by((base.len() / 7).max(1)) {
            let mut xp = base.clone();
            xp[k] += eps;
            let mut xm = base.clone();
            xm[k] -= eps;
            let fd = (eval(&xp) - eval(&xm)) / (2.0 * eps);
            let an = analytic[k] as f64;
            assert!(
                (fd - an).abs() < 1e-3 * (1.0 + fd.abs()),
                "{name}: input {i}[{k}]: finite difference {fd} vs analytic {an}"
            );
        }
    }
}

#[test]
fn rms_norm_matches_reference_and_finite_differences() {
    check(
        "rms_norm",
        &[
            randn(&[3, 5, 8], 1),
            randn(&[8], 2).affine(0.3, 1.0).unwrap(),
        ],
        2,
        &|a| ops::rms_norm(&a[0], &a[1], 1e-5),
        &|a| ops::rms_norm_ref(&a[0], &a[1], 1e-5),
    );
}

#[test]
fn layer_norm_matches_reference_and_finite_differences() {
    check(
        "layer_norm",
        &[
            randn(&[4, 6, 8], 3),
            randn(&[8], 4).affine(0.3, 1.0).unwrap(),
            randn(&[8], 5),
        ],
        3,
        &|a| ops::layer_norm(&a[0], &a[1], &a[2], 1e-5),
        &|a| ops::layer_norm_ref(&a[0], &a[1], &a[2], 1e-5),
    );
}

#[test]
fn causal_softmax_matches_reference_and_finite_differences() {
    // 2 query heads per key head (GQA layout: rows = 2 * tq), 2 cached positions before the step.
    check(
        "causal_softmax",
        &[randn(&[2, 3, 8, 6], 6)],
        1,
        &|a| ops::causal_softmax(&a[0], 0.7, 4, 2),
        &|a| ops::causal_softmax_ref(&a[0], 0.7, 4, 2),
    );
    // Plain training shape: tq = tk, offset 0 (masked entries must be exactly 0).
    let s = randn(&[1, 2, 5, 5], 7);
    let v: Vec<Vec<f32>> = ops::causal_softmax(&s, 1.0, 5, 0)
        .unwrap()
        .get(0)
        .unwrap()
        .get(1)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (i, row) in v.iter().enumerate() {
        assert!(
            row[i + 1..].iter().all(|&x| x == 0.0),
            "row {i} sees the future: {row:?}"
        );
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}

fn rope_tables(rows: usize, t: usize, half: usize) -> (Tensor, Tensor) {
    let angles = randn(&[rows, t, half], 8);
    (angles.cos().unwrap(), angles.sin().unwrap())
}

#[test]
fn rope_matches_reference_and_finite_differences() {
    for rows in [1, 2] {
        let (c, s) = rope_tables(rows, 5, 4);
        check(
            "rope",
            &[randn(&[2, 5, 3, 8], 9), c, s],
            1,
            &|a| ops::rope(&a[0], &a[1], &a[2]),
            &|a| ops::rope_ref(&a[0], &a[1], &a[2]),
        );
    }
}

#[test]
fn silu_mul_matches_reference_and_finite_differences() {
    check(
        "silu_mul",
        &[randn(&[3, 7, 10], 10), randn(&[3, 7, 10], 11)],
        2,
        &|a| ops::silu_mul(&a[0], &a[1]),
        &|a| ops::silu_mul_ref(&a[0], &a[1]),
    );
}

#[test]
fn token_logprobs_matches_reference_and_finite_differences() {
    let targets = Tensor::from_vec(
        (0..10u32).map(|i| (i * 7) % 11).collect::<Vec<_>>(),
        (2, 5),
        &Device::Cpu,
    )
    .unwrap();
    check(
        "token_logprobs",
        &[(randn(&[2, 5, 11], 12) * 2.0).unwrap(), targets],
        1,
        &|a| ops::token_logprobs(&a[0], &a[1]),
        &|a| ops::token_logprobs_ref(&a[0], &a[1]),
    );
    // Large enough for the parallel kernels.
    let targets = Tensor::from_vec(
        (0..64u32).map(|i| (i * 131) % 1000).collect::<Vec<_>>(),
        (4, 16),
        &Device::Cpu,
    )
    .unwrap();
    let logits = (randn(&[4, 16, 1000], 13) * 3.0).unwrap();
    let a = ops::token_logprobs(&logits, &targets).unwrap();
    let b = ops::token_logprobs_ref(&logits, &targets).unwrap();
    assert!(max_abs(&(a - b).unwrap()) < 1e-5);
    let bad = Tensor::new(&[[3u32, 11]], &Device::Cpu).unwrap();
    let err = ops::token_logprobs(&randn(&[1, 2, 11], 1), &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("out of range"), "{err}");
}

#[test]
fn every_parameter_of_every_architecture_gets_a_gradient() {
    for (name, cfg) in common::all_configs() {
        let m = common::model(cfg, 3);
        let ids = common::ids(3, 10, m.vocab_size(), 5);
        let targets = common::ids(3, 10, m.vocab_size(), 6);
        let loss = ops::token_logprobs(&m.forward(&ids).unwrap(), &targets)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap();
        let grads = loss.backward().unwrap();
        let vars = m.varmap().data().lock().unwrap();
        assert!(!vars.is_empty());
        for (pname, v) in vars.iter() {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("{name}: `{pname}` got no gradient"));
            assert!(
                max_abs(g) > 0.0,
                "{name}: gradient of `{pname}` is all zero"
            );
        }
    }
}

#[test]
fn linear_matmul_matches_reference_and_finite_differences() {
    for transposed in [true, false] {
        let w = if transposed {
            randn(&[6, 5], 14)
        } else {
            randn(&[5, 6], 14)
        };
        check(
            "linear_matmul",
            &[randn(&[2, 3, 5], 15), w],
            2,
            &move |a| ops::linear_matmul(&a[0], &a[1], transposed),
            &move |a| ops::linear_matmul_ref(&a[0], &a[1], transposed),
        );
    }
}
