//! Every fused op against its plain candle composition (forward and backward) and against central
//! finite differences (in f64, through the plain composition), plus gradient coverage of every
//! parameter of every architecture.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use rlhf_model::{ops, Precision};

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
fn causal_attention_matches_reference_and_finite_differences() {
    // GQA (4 query heads on 2 key heads); t = 37 spans two query tiles and a partial one.
    for (b, nh, nkv, t) in [(2, 4, 2, 5), (1, 2, 1, 37)] {
        check(
            "causal_attention",
            &[
                randn(&[b, nh, t, 8], 6),
                randn(&[b, nkv, t, 8], 7),
                randn(&[b, nkv, t, 8], 8),
            ],
            3,
            &|a| ops::causal_attention(&a[0], &a[1], &a[2], 0.35),
            &|a| ops::causal_attention_ref(&a[0], &a[1], &a[2], 0.35),
        );
    }
    // Position 0 sees only itself, so its output is its own value row, whatever the later keys.
    let (q, k, v) = (
        randn(&[1, 1, 6, 4], 9),
        randn(&[1, 1, 6, 4], 10),
        randn(&[1, 1, 6, 4], 11),
    );
    let out = ops::causal_attention(&q, &k, &v, 1.0).unwrap();
    let first = out.get(0).unwrap().get(0).unwrap();
    let v0 = v.get(0).unwrap().get(0).unwrap().get(0).unwrap();
    assert!(max_abs(&(first - v0).unwrap()) < 1e-6);
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
        let grads = rlhf_model::backward(&loss).unwrap();
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
            &move |a| ops::linear_matmul(&a[0], &a[1], transposed, Precision::Fp32),
            &move |a| ops::linear_matmul_ref(&a[0], &a[1], transposed),
        );
    }
}

#[test]
fn lm_head_logprobs_matches_reference_and_finite_differences() {
    // vocab 600: two full chunks of 256 and a partial one; targets in each of them.
    let targets = Tensor::from_vec(
        (0..10u32).map(|i| (i * 263) % 600).collect::<Vec<_>>(),
        (2, 5),
        &Device::Cpu,
    )
    .unwrap();
    let lp = |a: &[Tensor]| Ok(ops::lm_head_logprobs(&a[0], &a[1], &a[2], Precision::Fp32)?.0);
    let lp_ref = |a: &[Tensor]| Ok(ops::lm_head_logprobs_ref(&a[0], &a[1], &a[2])?.0);
    let inputs = [randn(&[2, 5, 8], 16), randn(&[600, 8], 17), targets];
    check("lm_head_logprobs", &inputs, 2, &lp, &lp_ref);
    let (_, am) =
        ops::lm_head_logprobs(&inputs[0], &inputs[1], &inputs[2], Precision::Fp32).unwrap();
    let (_, am_ref) = ops::lm_head_logprobs_ref(&inputs[0], &inputs[1], &inputs[2]).unwrap();
    assert_eq!(
        am.to_vec2::<u32>().unwrap(),
        am_ref.to_vec2::<u32>().unwrap()
    );
    // Large enough for the parallel kernels (64 rows x 1000 ids x 80).
    let targets = Tensor::from_vec(
        (0..64u32).map(|i| (i * 131) % 1000).collect::<Vec<_>>(),
        64,
        &Device::Cpu,
    )
    .unwrap();
    check(
        "lm_head_logprobs (parallel)",
        &[
            randn(&[64, 80], 18),
            (randn(&[1000, 80], 19) * 0.3).unwrap(),
            targets,
        ],
        2,
        &lp,
        &lp_ref,
    );
    let bad = Tensor::new(&[3u32, 600], &Device::Cpu).unwrap();
    let err = ops::lm_head_logprobs(
        &randn(&[2, 8], 1),
        &randn(&[600, 8], 2),
        &bad,
        Precision::Fp32,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("out of range"), "{err}");
}

/// Loss = mean token log-prob of random targets through the seam the trainers use.
fn seam_loss(m: &rlhf_model::CausalLm, ids: &Tensor, targets: &Tensor) -> Tensor {
    let hidden = m.hidden_states(ids, None).unwrap();
    m.token_logprobs_from_hidden(&hidden, targets)
        .unwrap()
        .mean_all()
        .unwrap()
}

#[test]
fn fused_model_matches_reference_ops_on_every_architecture() {
    for (name, cfg) in common::all_configs() {
        let m = common::model(cfg, 4);
        // t = 40 spans two attention tiles.
        let ids = common::ids(2, 40, m.vocab_size(), 7);
        let targets = common::ids(2, 40, m.vocab_size(), 8);
        let fused = seam_loss(&m, &ids, &targets);
        let reference = ops::with_reference_ops(|| seam_loss(&m, &ids, &targets));
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            reference.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-5 * (1.0 + b.abs()),
            "{name}: loss {a} vs reference {b}"
        );
        let (gf, gr) = (
            rlhf_model::backward(&fused).unwrap(),
            reference.backward().unwrap(),
        );
        let vars = m.varmap().data().lock().unwrap();
        for (pname, v) in vars.iter() {
            let (x, y) = (gf.get(v).unwrap(), gr.get(v).unwrap());
            let err = max_abs(&(x - y).unwrap());
            assert!(
                err < 1e-5 * (1.0 + max_abs(y)),
                "{name}: gradient of `{pname}` differs from the reference by {err}"
            );
            assert!(max_abs(y) > 0.0, "{name}: `{pname}` got a zero gradient");
        }
        // The seam agrees with the full logits, argmax included.
        let hidden = m.hidden_states(&ids, None).unwrap();
        let (lp, am) = m.token_logprobs_and_argmax(&hidden, &targets).unwrap();
        let logits = m.logits(&hidden).unwrap();
        let full = ops::token_logprobs(&logits, &targets).unwrap();
        assert!(
            max_abs(&(lp - full).unwrap()) < 1e-5,
            "{name}: seam vs full logits"
        );
        assert_eq!(
            am.to_vec2::<u32>().unwrap(),
            logits
                .argmax(candle_core::D::Minus1)
                .unwrap()
                .to_vec2::<u32>()
                .unwrap(),
            "{name}: argmax"
        );
    }
}

fn bf(v: f32) -> f64 {
    half::bf16::from_f32(v).to_f64()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// A bf16 linear layer's forward and both gradients are the f32-accumulated products of the
/// bf16-rounded operands (to f32 summation error, 1e-5 of Σ|terms|), and stay within bf16's
/// rounding of the f32 results: each operand is off by ≤ 2⁻⁹ relative, so each product by
/// ≤ ~2⁻⁸ and any sum by ≤ 2⁻⁸·Σ|terms|; 2⁻⁷ leaves a factor 2.
#[test]
fn linear_matmul_bf16_products_and_gradients() {
    let (m, k, n) = (15, 37, 6);
    for transposed in [true, false] {
        let x = Var::from_tensor(&randn(&[3, 5, k], 21)).unwrap();
        let w_shape = if transposed { [n, k] } else { [k, n] };
        let w = Var::from_tensor(&randn(&w_shape, 22)).unwrap();
        let r = randn(&[3, 5, n], 23);
        let run = |p| {
            let y = ops::linear_matmul(x.as_tensor(), w.as_tensor(), transposed, p).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            [flat(&y), flat(g.get(&x).unwrap()), flat(g.get(&w).unwrap())]
        };
        let (b16, f32s) = (run(Precision::Bf16), run(Precision::Fp32));
        let (xs, ws, rs) = (flat(x.as_tensor()), flat(w.as_tensor()), flat(&r));
        let widx = |o: usize, i: usize| if transposed { o * k + i } else { i * n + o };
        // (output, index, terms of the sum) for y, then dL/dx, then dL/dW (in W's layout).
        let mut cases: Vec<Case> = vec![];
        for i in 0..m {
            for o in 0..n {
                cases.push((
                    0,
                    i * n + o,
                    (0..k).map(|kk| (xs[i * k + kk], ws[widx(o, kk)])).collect(),
                ));
            }
            for kk in 0..k {
                cases.push((
                    1,
                    i * k + kk,
                    (0..n).map(|o| (rs[i * n + o], ws[widx(o, kk)])).collect(),
                ));
            }
        }
        for o in 0..n {
            for kk in 0..k {
                cases.push((
                    2,
                    widx(o, kk),
                    (0..m).map(|i| (rs[i * n + o], xs[i * k + kk])).collect(),
                ));
            }
        }
        let mut max_rel_vs_f32 = 0f64;
        for (out, idx, terms) in cases {
            let want: f64 = terms.iter().map(|&(a, b)| bf(a) * bf(b)).sum();
            let scale: f64 = terms
                .iter()
                .map(|&(a, b)| (a as f64 * b as f64).abs())
                .sum();
            let (got, f) = (b16[out][idx] as f64, f32s[out][idx] as f64);
            assert!(
                (got - want).abs() <= 1e-5 * scale,
                "t={transposed} out {out}[{idx}]: {got} vs {want}"
            );
            assert!(
                (got - f).abs() <= 2f64.powi(-7) * scale,
                "t={transposed} out {out}[{idx}]: bf16 {got} vs f32 {f}"
            );
            max_rel_vs_f32 = max_rel_vs_f32.max((got - f).abs() / scale);
        }
        // The bf16 path really rounds (an f32 product would agree with f32 to ~1e-7).
        assert!(
            max_rel_vs_f32 > 1e-4,
            "bf16 results equal the f32 ones ({max_rel_vs_f32})"
        );
    }
}

/// The chunked LM head at bf16: log-probs are those of the f32 head applied to bf16-rounded
/// hidden states and weights (the products are exact in f32 up to summation order); gradients
/// (whose products also take the rounded softmax gradient) are within bf16's ~3 significant digits
/// of the f32 head's.
#[test]
fn lm_head_logprobs_bf16() {
    let targets = Tensor::from_vec(
        (0..64u32).map(|i| (i * 131) % 1000).collect::<Vec<_>>(),
        64,
        &Device::Cpu,
    )
    .unwrap();
    let h = Var::from_tensor(&randn(&[64, 80], 18)).unwrap();
    let w = Var::from_tensor(&(randn(&[1000, 80], 19) * 0.3).unwrap()).unwrap();
    let round = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (lp16, am16) =
        ops::lm_head_logprobs(h.as_tensor(), w.as_tensor(), &targets, Precision::Bf16).unwrap();
    let (lp_r, am_r) =
        ops::lm_head_logprobs_ref(&round(h.as_tensor()), &round(w.as_tensor()), &targets).unwrap();
    let err = max_abs(&(&lp16 - &lp_r).unwrap());
    assert!(
        err < 1e-4 * (1.0 + max_abs(&lp_r)),
        "bf16 log-probs differ from f32 on rounded inputs by {err}"
    );
    assert_eq!(
        am16.to_vec1::<u32>().unwrap(),
        am_r.to_vec1::<u32>().unwrap()
    );
    let (lp32, _) =
        ops::lm_head_logprobs(h.as_tensor(), w.as_tensor(), &targets, Precision::Fp32).unwrap();
    assert!(
        max_abs(&(&lp16 - &lp32).unwrap()) > 1e-4,
        "bf16 log-probs equal the f32 ones"
    );
    let g16 = lp16.sum_all().unwrap().backward().unwrap();
    let g32 = lp32.sum_all().unwrap().backward().unwrap();
    for (name, v) in [("hidden", &h), ("weight", &w)] {
        let (a, b) = (g16.get(v).unwrap(), g32.get(v).unwrap());
        let err = max_abs(&(a - b).unwrap());
        assert!(
            err < 1e-2 * max_abs(b),
            "grad of {name}: bf16 vs f32 differ by {err} (max {})",
            max_abs(b)
        );
    }
}

/// (output, index, terms of the sum) of one checked value.
type Case = (usize, usize, Vec<(f32, f32)>);
