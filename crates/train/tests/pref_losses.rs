//! Preference losses on given log-probs vs. TRL 1.16 (`fixtures/reference/pref_losses.json`), plus the
//! losses TRL has no trainer for (CPL) and the reward-model objectives, checked against their formulas.

use candle_core::{Device, Tensor, Var};
use rlhf_train::pref_loss::{self, LossParams, LossType, PairLogps};
use rlhf_train::rm_loss;
use serde_json::Value;

const TOL: f64 = 1e-5;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/reference/pref_losses.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("read pref_losses.json"))
        .expect("valid JSON")
}

fn vec(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn t(v: &[f32]) -> Tensor {
    Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap()
}

fn scalar(x: &Tensor) -> f64 {
    x.to_scalar::<f32>().unwrap() as f64
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= TOL * want.abs().max(1.0),
        "{what}: got {got}, TRL {want}"
    );
}

fn close_vec(got: &Tensor, want: &Value, what: &str) {
    let got: Vec<f32> = got.to_vec1().unwrap();
    let want = vec(want);
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        close(*g as f64, *w as f64, &format!("{what}[{i}]"));
    }
}

fn pairs(inputs: &Value) -> PairLogps {
    PairLogps {
        chosen: t(&vec(&inputs["policy_chosen_logps"])),
        rejected: t(&vec(&inputs["policy_rejected_logps"])),
        ref_chosen: Some(t(&vec(&inputs["ref_chosen_logps"]))),
        ref_rejected: Some(t(&vec(&inputs["ref_rejected_logps"]))),
        chosen_len: t(&vec(&inputs["chosen_lengths"])),
        rejected_len: t(&vec(&inputs["rejected_lengths"])),
    }
}

#[test]
fn dpo_family_matches_trl() {
    let f = fixture();
    let x = pairs(&f["inputs"]);
    for (key, ty) in [
        ("dpo_sigmoid", LossType::Sigmoid),
        ("dpo_ipo", LossType::Ipo),
        ("dpo_robust", LossType::Robust),
        ("dpo_hinge", LossType::Hinge),
    ] {
        let case = &f[key];
        let cfg = &case["config"];
        let params = LossParams {
            beta: cfg["beta"].as_f64().unwrap(),
            label_smoothing: cfg
                .get("label_smoothing")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
            ..Default::default()
        };
        let out = pref_loss::pair_loss(ty, &params, &x).unwrap();
        close(
            scalar(&out.loss),
            case["loss"].as_f64().unwrap(),
            &format!("{key} loss"),
        );
        close_vec(
            &out.chosen_rewards,
            &case["chosen_rewards"],
            &format!("{key} chosen_rewards"),
        );
        close_vec(
            &out.rejected_rewards,
            &case["rejected_rewards"],
            &format!("{key} rejected_rewards"),
        );
        let m = pref_loss::pair_metrics(&out, &x).unwrap();
        for (name, got) in m.named() {
            close(
                got,
                case["metrics"][name].as_f64().unwrap(),
                &format!("{key} {name}"),
            );
        }
    }
}

#[test]
fn orpo_matches_trl() {
    let f = fixture();
    let case = &f["orpo"];
    let (c, r) = (
        t(&vec(&case["inputs"]["policy_chosen_logps_avg"])),
        t(&vec(&case["inputs"]["policy_rejected_logps_avg"])),
    );
    let lambda = case["config"]["beta"].as_f64().unwrap();
    let (loss_or, log_odds) = pref_loss::orpo_odds_ratio_loss(&c, &r, lambda).unwrap();
    close_vec(&log_odds, &case["log_odds"], "orpo log_odds");
    // TRL's `or_losses` are λ·log σ(log_odds), i.e. minus our per-pair loss term.
    close_vec(
        &loss_or.neg().unwrap(),
        &case["or_losses"],
        "orpo or_losses",
    );
    let nll = case["inputs"]["nll_loss"].as_f64().unwrap();
    close(
        nll + scalar(&loss_or.mean_all().unwrap()),
        case["loss"].as_f64().unwrap(),
        "orpo loss",
    );

    // Through pair_loss: sums and lengths whose averages are the fixture's, NLL = −Σ logp / Σ len.
    let len = t(&[3.0, 2.0, 5.0, 1.0]);
    let x = PairLogps {
        chosen: (&c * &len).unwrap(),
        rejected: (&r * &len).unwrap(),
        ref_chosen: None,
        ref_rejected: None,
        chosen_len: len.clone(),
        rejected_len: len.clone(),
    };
    let params = LossParams {
        orpo_lambda: lambda,
        ..Default::default()
    };
    let out = pref_loss::pair_loss(LossType::Orpo, &params, &x).unwrap();
    let sum_c: f64 = vec(&case["inputs"]["policy_chosen_logps_avg"])
        .iter()
        .zip([3.0, 2.0, 5.0, 1.0])
        .map(|(a, l)| *a as f64 * l)
        .sum();
    let own_nll = -sum_c / 11.0;
    close(
        scalar(&out.loss),
        own_nll + scalar(&loss_or.mean_all().unwrap()),
        "orpo pair_loss",
    );
    close_vec(
        &out.chosen_rewards,
        &case["chosen_rewards"],
        "orpo chosen_rewards",
    );
    close_vec(
        &out.rejected_rewards,
        &case["rejected_rewards"],
        "orpo rejected_rewards",
    );
}

#[test]
fn simpo_matches_trl() {
    let f = fixture();
    let case = &f["simpo"];
    let cfg = &case["config"];
    let params = LossParams {
        beta: cfg["beta"].as_f64().unwrap(),
        simpo_gamma: cfg["simpo_gamma"].as_f64().unwrap(),
        label_smoothing: cfg["label_smoothing"].as_f64().unwrap(),
        ..Default::default()
    };
    let (c, r) = (
        vec(&case["inputs"]["policy_chosen_logps_avg"]),
        vec(&case["inputs"]["policy_rejected_logps_avg"]),
    );
    let per = pref_loss::simpo_loss(
        &t(&c),
        &t(&r),
        params.beta,
        params.simpo_gamma,
        params.label_smoothing,
    )
    .unwrap();
    close_vec(&per, &case["losses"], "simpo losses");
    // Via pair_loss on sums with lengths 2: the per-token averages are the fixture's.
    let two = t(&[2.0; 4]);
    let x = PairLogps {
        chosen: (t(&c) * 2.0).unwrap(),
        rejected: (t(&r) * 2.0).unwrap(),
        ref_chosen: None,
        ref_rejected: None,
        chosen_len: two.clone(),
        rejected_len: two,
    };
    let out = pref_loss::pair_loss(LossType::Simpo, &params, &x).unwrap();
    close(
        scalar(&out.loss),
        case["loss"].as_f64().unwrap(),
        "simpo loss",
    );
    close_vec(
        &out.chosen_rewards,
        &case["chosen_rewards"],
        "simpo chosen_rewards",
    );
    close_vec(
        &out.rejected_rewards,
        &case["rejected_rewards"],
        "simpo rejected_rewards",
    );
}

#[test]
fn kto_matches_trl() {
    let f = fixture();
    let case = &f["kto"];
    let i = &case["inputs"];
    let cfg = &case["config"];
    let params = LossParams {
        beta: cfg["beta"].as_f64().unwrap(),
        desirable_weight: cfg["desirable_weight"].as_f64().unwrap(),
        undesirable_weight: cfg["undesirable_weight"].as_f64().unwrap(),
        ..Default::default()
    };
    let x = pref_loss::KtoLogps {
        policy: t(&vec(&i["policy_logps"])),
        reference: t(&vec(&i["ref_logps"])),
        labels: i["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_bool().unwrap())
            .collect(),
        policy_kl: t(&vec(&i["policy_KL_logps"])),
        ref_kl: t(&vec(&i["ref_KL_logps"])),
    };
    let (loss, kl, m) = pref_loss::kto(&params, &x).unwrap();
    close(kl, case["kl"].as_f64().unwrap(), "kto kl");
    close(scalar(&loss), case["loss"].as_f64().unwrap(), "kto loss");
    for (name, got) in m.named() {
        if let Some(want) = case["metrics"].get(name) {
            close(got, want.as_f64().unwrap(), &format!("kto {name}"));
        }
    }
}

/// Gradient of a scalar function of one `[n]` variable, by autodiff.
fn grad(x: &[f32], f: impl Fn(&Tensor) -> Tensor) -> Vec<f32> {
    let v = Var::new(x, &Device::Cpu).unwrap();
    let y = f(v.as_tensor());
    y.backward()
        .unwrap()
        .get(v.as_tensor())
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn log_sigmoid_is_stable_and_has_exact_gradient() {
    let xs = [-200.0f32, -3.0, 0.0, 2.5, 200.0];
    let y: Vec<f32> = pref_loss::log_sigmoid(&t(&xs)).unwrap().to_vec1().unwrap();
    for (x, y) in xs.iter().zip(&y) {
        let want = -((-*x as f64).exp().ln_1p());
        let want = if x.abs() > 50.0 {
            x.min(0.0) as f64
        } else {
            want
        };
        assert!(
            (*y as f64 - want).abs() < 1e-5,
            "log σ({x}) = {y}, want {want}"
        );
    }
    // d/dx log σ(x) = σ(−x); at 0 it is 0.5 (a composition of min/abs gets 1.0 there).
    let g = grad(&xs, |x| {
        pref_loss::log_sigmoid(x).unwrap().sum_all().unwrap()
    });
    for (x, g) in xs.iter().zip(&g) {
        let want = 1.0 / (1.0 + (*x as f64).exp());
        assert!(
            (*g as f64 - want).abs() < 1e-6,
            "grad at {x}: {g}, want {want}"
        );
    }
}

#[test]
fn cpl_follows_the_paper() {
    // CPL(λ): −log σ(α·Σlogπ(a⁺) − λ·α·Σlogπ(a⁻)); λ = 1 is the unbiased contrastive loss.
    let (c, r) = ([-4.0f32, -10.0], [-6.0f32, -3.0]);
    let (alpha, lambda) = (0.1, 0.5);
    let got: Vec<f32> = pref_loss::cpl_loss(&t(&c), &t(&r), alpha, lambda)
        .unwrap()
        .to_vec1()
        .unwrap();
    for i in 0..2 {
        let z = alpha * c[i] as f64 - lambda * alpha * r[i] as f64;
        let want = (1.0 + (-z).exp()).ln();
        close(got[i] as f64, want, "cpl");
    }
    // λ < 1 makes the rejected segment's probability count less: lowering it helps less than raising chosen.
    let g = grad(&r, |x| {
        pref_loss::cpl_loss(&t(&c), x, alpha, lambda)
            .unwrap()
            .sum_all()
            .unwrap()
    });
    let gc = grad(&c, |x| {
        pref_loss::cpl_loss(x, &t(&r), alpha, lambda)
            .unwrap()
            .sum_all()
            .unwrap()
    });
    for i in 0..2 {
        assert!(gc[i] < 0.0 && g[i] > 0.0, "chosen pushed up, rejected down");
        close(
            (g[i] / -gc[i]) as f64,
            lambda,
            "rejected/chosen gradient ratio = λ",
        );
    }
    // The BC variant adds the chosen per-token NLL.
    let x = PairLogps {
        chosen: t(&c),
        rejected: t(&r),
        ref_chosen: None,
        ref_rejected: None,
        chosen_len: t(&[2.0, 4.0]),
        rejected_len: t(&[2.0, 4.0]),
    };
    let p = LossParams {
        cpl_alpha: alpha,
        cpl_lambda: lambda,
        cpl_bc_weight: 0.5,
        ..Default::default()
    };
    let out = pref_loss::pair_loss(LossType::Cpl, &p, &x).unwrap();
    let want = (got[0] as f64 + got[1] as f64) / 2.0 + 0.5 * (14.0 / 6.0);
    close(scalar(&out.loss), want, "cpl + bc");
}

#[test]
fn reference_based_losses_require_reference() {
    let x = PairLogps {
        chosen: t(&[-1.0]),
        rejected: t(&[-2.0]),
        ref_chosen: None,
        ref_rejected: None,
        chosen_len: t(&[1.0]),
        rejected_len: t(&[1.0]),
    };
    let err = pref_loss::pair_loss(LossType::Sigmoid, &LossParams::default(), &x)
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs reference log-probs"), "{err}");
    assert!(LossType::Sigmoid.needs_reference() && !LossType::Simpo.needs_reference());
}

#[test]
fn reward_model_objectives() {
    let (c, r, m) = ([1.0f32, -0.5, 2.0], [0.0f32, 0.5, 2.5], [0.5f32, 0.0, 1.0]);
    let bt: Vec<f32> = rm_loss::bradley_terry(&t(&c), &t(&r))
        .unwrap()
        .to_vec1()
        .unwrap();
    let btm: Vec<f32> = rm_loss::bradley_terry_margin(&t(&c), &t(&r), &t(&m))
        .unwrap()
        .to_vec1()
        .unwrap();
    for i in 0..3 {
        let d = (c[i] - r[i]) as f64;
        close(bt[i] as f64, (1.0 + (-d).exp()).ln(), "bradley-terry");
        close(
            btm[i] as f64,
            (1.0 + (-(d - m[i] as f64)).exp()).ln(),
            "bradley-terry margin",
        );
    }
    let center = scalar(&rm_loss::centering(&t(&c), &t(&r), 0.01).unwrap());
    close(center, 0.01 * (1.0 + 0.0 + 20.25) / 3.0, "centering");
    let total = scalar(&rm_loss::pair_loss(&t(&c), &t(&r), Some(&t(&m)), Some(0.01)).unwrap());
    close(
        total,
        btm.iter().map(|&x| x as f64).sum::<f64>() / 3.0 + center,
        "rm pair_loss",
    );
    let mse = scalar(
        &rm_loss::rating_mse(
            &t(&[0.5, 1.0]),
            &t(&[rm_loss::normalise_score(4.0, 1.0, 5.0) as f32, 1.0]),
        )
        .unwrap(),
    );
    close(mse, (0.5f64 - 0.75).powi(2) / 2.0, "rating mse");
    let (acc, margin) = rm_loss::pair_metrics(&c, &r);
    close(acc, 1.0 / 3.0, "accuracy");
    close(margin, (1.0 - 1.0 - 0.5) / 3.0, "margin");
}
