//! Online RL against TRL (`fixtures/reference/rl.json`, made by `tools/fixture_rl.py`): the advantage, KL and
//! whitening formulas, one GRPO loss + gradient through TRL 1.16's `_compute_loss` for four loss variants, and
//! one PPO mini-batch step as TRL 1.12 computes it (policy + value loss, total gradient norm).

use std::path::PathBuf;

use candle_core::Device;
use rlhf_model::seq_cls::SeqCls;
use rlhf_model::CausalLm;
use rlhf_train::advantage::{
    gae, group_advantages, kl_estimate, leave_one_out_advantages, whiten, KlEstimator, ScaleRewards,
};
use rlhf_train::grpo::{Grpo, GrpoArgs};
use rlhf_train::online::{Algorithm, Batch, Policy, Step};
use rlhf_train::optim::{AdamW, AdamWConfig};
use rlhf_train::ppo::{token_values, Ppo, PpoArgs};
use rlhf_train::rollout::{self, Rollout, SeqBatch};
use rlhf_train::settings::load;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn reference() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/reference/rl.json")).unwrap(),
    )
    .unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tol,
        "{what}: max abs error {worst} > {tol}\n got {got:?}\nwant {want:?}"
    );
}

#[test]
fn advantage_kl_and_whitening_formulas_match_trl() {
    let r = &reference()["rl_functions"];
    let rewards: Vec<Vec<f32>> = r["rewards"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let values: Vec<Vec<f32>> = r["values"].as_array().unwrap().iter().map(floats).collect();
    for case in r["gae"].as_array().unwrap() {
        let (gamma, lam) = (
            case["gamma"].as_f64().unwrap() as f32,
            case["lam"].as_f64().unwrap() as f32,
        );
        let (mut adv, mut ret) = (vec![], vec![]);
        for (rw, v) in rewards.iter().zip(&values) {
            let (a, b) = gae(rw, v, gamma, lam);
            adv.extend(a);
            ret.extend(b);
        }
        assert_close("gae advantages", &adv, &floats(&case["advantages"]), 1e-5);
        assert_close("gae returns", &ret, &floats(&case["returns"]), 1e-5);
    }
    let flat_values = floats(&r["values"]);
    assert_close(
        "masked_whiten",
        &whiten(&flat_values, true),
        &floats(&r["whiten"]),
        1e-5,
    );
    assert_close(
        "masked_whiten(shift_mean=False)",
        &whiten(&flat_values, false),
        &floats(&r["whiten_keep_mean"]),
        1e-5,
    );
    let (lp, rp) = (floats(&r["logp"]), floats(&r["ref_logp"]));
    let k1: Vec<f32> = lp
        .iter()
        .zip(&rp)
        .map(|(&a, &b)| kl_estimate(a, b, KlEstimator::K1))
        .collect();
    let k3: Vec<f32> = lp
        .iter()
        .zip(&rp)
        .map(|(&a, &b)| kl_estimate(a, b, KlEstimator::K3))
        .collect();
    assert_close("k1", &k1, &floats(&r["kl_k1"]), 1e-6);
    assert_close("k3", &k3, &floats(&r["kl_k3"]), 1e-6);
    let scores = floats(&r["scores"]);
    for (scale, key) in [
        (ScaleRewards::Group, "grpo_group"),
        (ScaleRewards::Batch, "grpo_batch"),
        (ScaleRewards::None, "grpo_none"),
    ] {
        assert_close(
            key,
            &group_advantages(&scores, 4, scale).0,
            &floats(&r[key]),
            1e-5,
        );
    }
    assert_close(
        "rloo",
        &leave_one_out_advantages(&scores, 4),
        &floats(&r["rloo"]),
        1e-6,
    );
}

fn flags(extra: &[String]) -> Vec<std::ffi::OsString> {
    let model = root().join("fixtures/models/llama");
    let mut v: Vec<String> = [
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        "unused",
        "--output-dir",
        "unused",
        "--reward",
        "regex:x",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend_from_slice(extra);
    v.into_iter().map(Into::into).collect()
}

/// The trainers' batch of the given completions (`g` per prompt); `grouped`: each prompt once with its
/// completions behind it, short units sharing rows ([`SeqBatch::grouped`], what the trainers run when the
/// model attends by group).
#[allow(clippy::too_many_arguments)]
fn batch(
    prompts: &[Vec<u32>],
    completions: &[Vec<u32>],
    g: usize,
    old: Vec<f32>,
    rewards: Vec<f32>,
    temperature: f64,
    grouped: bool,
) -> Batch {
    let prompt_ids: Vec<Vec<u32>> = (0..completions.len())
        .map(|i| prompts[i / g].clone())
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = prompt_ids
        .iter()
        .zip(completions)
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    let seqs = if grouped {
        SeqBatch::grouped(&pairs, 0, &Device::Cpu).unwrap()
    } else {
        SeqBatch::new(&pairs, 0, &Device::Cpu).unwrap()
    };
    let rollouts = completions
        .iter()
        .enumerate()
        .map(|(i, c)| Rollout {
            prompt: i / g,
            completion_ids: c.clone(),
            completion: String::new(),
            sampling_logprobs: vec![],
            eos: false,
        })
        .collect();
    Batch {
        rollouts,
        prompt_ids,
        seqs,
        old_logprobs: old,
        rewards,
        generations: g,
        temperature,
    }
}

fn total_norm(optimizer: &AdamW, loss: &candle_core::Tensor) -> f64 {
    optimizer
        .collect_grads(&rlhf_model::backward(loss).unwrap())
        .unwrap()
        .global_norm()
        .unwrap()
}

/// Given the same completions and rewards, the GRPO loss and its gradient norm equal TRL's.
#[test]
fn grpo_step_matches_trl() {
    let r = &reference()["grpo_step"];
    let (prompts, completions) = (ids(&r["prompts"]), ids(&r["completions"]));
    let t = r["temperature"].as_f64().unwrap();
    let rewards = floats(&r["rewards"]);
    let qwen = root().join("fixtures/models/qwen2");
    for case in r["cases"].as_array().unwrap() {
        let loss_type = case["loss_type"].as_str().unwrap();
        let beta = case["beta"].as_f64().unwrap();
        let mut extra: Vec<String> = vec![
            "--num-generations".into(),
            "4".into(),
            "--max-new-tokens".into(),
            "6".into(),
            "--temperature".into(),
            t.to_string(),
            "--loss-type".into(),
            loss_type.into(),
            "--beta".into(),
            beta.to_string(),
            "--importance-sampling-level".into(),
            case["importance_sampling_level"].as_str().unwrap().into(),
            "--reference-model".into(),
            qwen.display().to_string(),
        ];
        if let Some(e) = case["epsilon_high"].as_f64() {
            extra.extend(["--epsilon-high".into(), e.to_string()]);
        }
        let args = load::<GrpoArgs>("grpo", &flags(&extra)).unwrap();
        let policy = Policy::load(&args.online, beta != 0.0, None).unwrap();
        assert!(policy.groups_prompts(), "the engine attends by group");
        let grpo = Grpo::new(args.clone()).unwrap();
        // One row per completion, and one row per prompt holding its 4 completions: both at parity.
        for grouped in [false, true] {
            let loss_type = &format!("{loss_type} (grouped: {grouped})");
            let b = batch(
                &prompts,
                &completions,
                4,
                floats(&case["per_token_logps"]),
                rewards.clone(),
                t,
                grouped,
            );
            let (adv, keep, _) = grpo.advantages(&b);
            assert_close(
                &format!("{loss_type}: advantages"),
                &adv,
                &floats(&case["advantages"]),
                1e-5,
            );
            let ref_logp = (beta != 0.0).then(|| policy.reference_logprobs(&b.seqs, t).unwrap());
            if let Some(rl) = &ref_logp {
                assert_close(
                    "reference log-probs",
                    rl,
                    &floats(&r["ref_per_token_logps"]),
                    1e-5,
                );
            }
            let (loss, _) = grpo
                .loss(&policy, &b, &adv, &keep, ref_logp.as_deref(), false)
                .unwrap();
            let got = loss.to_scalar::<f32>().unwrap() as f64;
            let want = case["loss"].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-4,
                "{loss_type}: loss {got} vs TRL {want}"
            );
            let optimizer = AdamW::new(policy.params(), AdamWConfig::default()).unwrap();
            let norm = total_norm(&optimizer, &loss);
            let want = case["total_grad_norm"].as_f64().unwrap();
            assert!(
                (norm - want).abs() <= 1e-4 * want.max(1.0),
                "{loss_type}: grad norm {norm} vs TRL {want}"
            );
        }
    }
}

/// One PPO mini-batch on fixed completions and scores: policy loss, value loss and the gradient norm over
/// policy + value model equal TRL 1.12's.
#[test]
fn ppo_step_matches_trl() {
    let r = &reference()["ppo_step"];
    let (prompts, completions) = (ids(&r["prompts"]), ids(&r["completions"]));
    let t = r["temperature"].as_f64().unwrap();
    let extra: Vec<String> = vec![
        "--temperature".into(),
        t.to_string(),
        "--kl-coef".into(),
        r["kl_coef"].to_string(),
        "--gamma".into(),
        r["gamma"].to_string(),
        "--lam".into(),
        r["lam"].to_string(),
        "--cliprange".into(),
        r["cliprange"].to_string(),
        "--cliprange-value".into(),
        r["cliprange_value"].to_string(),
        "--vf-coef".into(),
        r["vf_coef"].to_string(),
        "--num-ppo-epochs".into(),
        "1".into(),
        "--num-mini-batches".into(),
        "1".into(),
        "--max-grad-norm".into(),
        "0".into(),
        "--reference-model".into(),
        root().join("fixtures/models/qwen2").display().to_string(),
        "--value-model".into(),
        root()
            .join("fixtures/models/llama-rm")
            .display()
            .to_string(),
    ];
    let args = load::<PpoArgs>("ppo", &flags(&extra)).unwrap();
    // One row per rollout, and each rollout a unit of SeqBatch::grouped: both at parity.
    for grouped in [false, true] {
        let policy = Policy::load(&args.online, true, None).unwrap();
        let mut ppo = Ppo::new(args.clone(), &policy, None).unwrap();
        assert!(
            policy.groups_prompts() && ppo.runs_grouped(),
            "the engine attends by group"
        );
        let b = batch(
            &prompts,
            &completions,
            1,
            floats(&r["old_logprobs"]),
            floats(&r["scores"]),
            t,
            grouped,
        );
        assert_close(
            &format!("reference log-probs (grouped: {grouped})"),
            &policy.reference_logprobs(&b.seqs, t).unwrap(),
            &floats(&r["ref_logprobs"]),
            1e-5,
        );
        let mut params = policy.params();
        params.extend(ppo.extra_params());
        let mut optimizer = AdamW::new(params, AdamWConfig::default()).unwrap();
        let none = None;
        let mut step = Step::new(&mut optimizer, 1e-12, None, 1, &none);
        let m = ppo.learn(&policy, &mut step, &b).unwrap();
        for (key, want) in [
            ("loss/policy_avg", "pg_loss"),
            ("loss/value_avg", "vf_loss"),
            ("loss", "loss"),
        ] {
            let want = r[want].as_f64().unwrap();
            assert!(
                (m[key] - want).abs() <= 1e-4,
                "{key} (grouped: {grouped}): {} vs TRL {want}",
                m[key]
            );
        }
        let want = r["total_grad_norm"].as_f64().unwrap();
        assert!(
            (step.grad_norms[0] - want).abs() <= 1e-4 * want.max(1.0),
            "grad norm (grouped: {grouped}) {} vs TRL {want}",
            step.grad_norms[0]
        );
    }
}

/// Short rollouts packed into shared input rows score as if alone: the policy's log-probs and the value
/// model's values.
#[test]
fn packed_rollouts_score_as_if_alone() {
    let r = &reference()["ppo_step"];
    let (prompts, completions) = (ids(&r["prompts"]), ids(&r["completions"]));
    // Every other rollout cut to 3 prompt tokens and 1 completion token: those two units share a row.
    let cut = |i: usize, v: &Vec<u32>, n: usize| {
        v[..if i.is_multiple_of(2) { n } else { v.len() }].to_vec()
    };
    let prompts: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| cut(i, p, 3))
        .collect();
    let short: Vec<Vec<u32>> = completions
        .iter()
        .enumerate()
        .map(|(i, c)| cut(i, c, 1))
        .collect();
    let layouts = [false, true].map(|g| batch(&prompts, &short, 1, vec![], vec![], 1.0, g).seqs);
    let rows = layouts[1].input_ids.dim(0).unwrap();
    assert!(
        rows < short.len(),
        "{rows} input rows for {} rollouts",
        short.len()
    );
    let policy = CausalLm::load(&root().join("fixtures/models/llama"), &Device::Cpu).unwrap();
    let value = SeqCls::load(
        &root().join("fixtures/models/llama-rm"),
        1,
        Some(0),
        0,
        &Device::Cpu,
    )
    .unwrap();
    let [one, packed] = layouts.map(|s| {
        let lp: Vec<f32> = rollout::token_logprobs(&policy, &s, 1.0, false)
            .unwrap()
            .0
            .to_vec1()
            .unwrap();
        let v: Vec<f32> = token_values(&value, &s).unwrap().to_vec1().unwrap();
        (lp, v)
    });
    assert_close("packed log-probs", &packed.0, &one.0, 1e-5);
    assert_close("packed values", &packed.1, &one.1, 1e-5);
}
