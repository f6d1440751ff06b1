//! One reward-model step and one DPO step on the fixture tiny Llama vs. TRL 1.16
//! (`fixtures/reference/rm_step.json`, `dpo_step.json`): tokenization, rewards / log-probs, loss, per-parameter
//! and total gradient norms, and the loss after one AdamW step (lr 1e-3, no weight decay, no clipping).

use std::path::PathBuf;

use candle_core::Device;
use rlhf_data::{tokenize_pair, Preference, PreferenceExample, Text, Tokenizer};
use rlhf_model::seq_cls::SeqCls;
use rlhf_model::CausalLm;
use rlhf_train::dpo::{DpoData, DpoTrainer};
use rlhf_train::pref_config::PrefConfig;
use rlhf_train::pref_train::Objective;
use rlhf_train::rm::{RmData, RmTrainer};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn fixture(name: &str) -> Value {
    let p = root().join("fixtures/reference").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn rel_close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol * want.abs().max(1e-3),
        "{what}: got {got}, TRL {want}"
    );
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The fixture pairs tokenized by rlhf-data (checked against TRL's tokenization where given).
fn pairs(f: &Value, tok: &Tokenizer) -> Vec<PreferenceExample> {
    f["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = |k: &str| Text::Plain(p[k].as_str().unwrap().to_string());
            let pref = Preference {
                prompt: s("prompt"),
                chosen: s("chosen"),
                rejected: s("rejected"),
                margin: None,
            };
            tokenize_pair(&pref, tok, None).unwrap()
        })
        .collect()
}

/// Checks every parameter's gradient norm (1e-3 relative) and the total (1e-4 relative) of a loss.
fn check_grads(obj: &mut dyn Objective, loss: &candle_core::Tensor, f: &Value) {
    let store = rlhf_model::backward(loss).unwrap();
    let grads = obj.optimizer().collect_grads(&store).unwrap();
    let names: Vec<String> = obj
        .optimizer()
        .params()
        .map(|(n, _)| n.to_string())
        .collect();
    let want = f["grad_norms"].as_object().unwrap();
    for (name, g) in names.iter().zip(grads.as_slice()) {
        let norm = g
            .as_ref()
            .map(|g| {
                g.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt() as f64
            })
            .unwrap_or(0.0);
        match want.get(name) {
            Some(w) => rel_close(
                norm,
                w.as_f64().unwrap(),
                1e-3,
                &format!("grad norm {name}"),
            ),
            None => assert_eq!(
                norm, 0.0,
                "{name} is not a TRL parameter but got a gradient"
            ),
        }
    }
    rel_close(
        grads.global_norm().unwrap(),
        f["total_grad_norm"].as_f64().unwrap(),
        1e-4,
        "total grad norm",
    );
    obj.optimizer_mut().step(&grads, 1e-3, None).unwrap();
}

#[test]
fn reward_model_step_matches_trl() {
    let f = fixture("rm_step.json");
    let dir = root().join("fixtures/models/llama-rm");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let pairs = pairs(&f, &tok);
    for (p, t) in pairs.iter().zip(f["tokenized"].as_array().unwrap()) {
        assert_eq!(p.chosen_sequence(), ids(&t["chosen_ids"]));
        assert_eq!(p.rejected_sequence(), ids(&t["rejected_ids"]));
    }
    let model = SeqCls::load(&dir, 1, None, 0, &Device::Cpu).unwrap();
    let cfg = PrefConfig {
        batch_size: 4,
        ..PrefConfig::new(
            dir.clone(),
            dir.join("unused"),
            dir.join("unused"),
            &rlhf_train::TrainDefaults::DPO,
        )
    };
    let mut t = RmTrainer::from_parts(model, RmData::Pairs(pairs.clone()), None, &cfg).unwrap();
    let refs: Vec<&PreferenceExample> = pairs.iter().collect();
    let (c, r, _, _) = t.pair_rewards(&refs).unwrap();
    let (c, r): (Vec<f32>, Vec<f32>) = (
        c.flatten_all().unwrap().to_vec1().unwrap(),
        r.flatten_all().unwrap().to_vec1().unwrap(),
    );
    for i in 0..4 {
        rel_close(
            c[i] as f64,
            f["rewards_chosen"][i].as_f64().unwrap(),
            1e-4,
            "reward chosen",
        );
        rel_close(
            r[i] as f64,
            f["rewards_rejected"][i].as_f64().unwrap(),
            1e-4,
            "reward rejected",
        );
    }
    let out = t.forward(&[0, 1, 2, 3]).unwrap();
    rel_close(
        out.loss.to_scalar::<f32>().unwrap() as f64,
        f["loss_before"].as_f64().unwrap(),
        1e-4,
        "loss before",
    );
    check_grads(&mut t, &out.loss, &f);
    let after = t
        .forward(&[0, 1, 2, 3])
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap() as f64;
    rel_close(
        after,
        f["loss_after"].as_f64().unwrap(),
        1e-4,
        "loss after one AdamW step",
    );
}

#[test]
fn dpo_step_matches_trl() {
    let f = fixture("dpo_step.json");
    let dir = root().join("fixtures/models/llama");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let pairs = pairs(&f, &tok);
    for (p, t) in pairs.iter().zip(f["tokenized"].as_array().unwrap()) {
        assert_eq!(p.prompt_ids, ids(&t["prompt_ids"]));
        assert_eq!(p.chosen_ids, ids(&t["chosen_ids"]));
        assert_eq!(p.rejected_ids, ids(&t["rejected_ids"]));
    }
    let policy = CausalLm::load(&dir, &Device::Cpu).unwrap();
    let cfg = PrefConfig {
        batch_size: 4,
        ..PrefConfig::new(
            dir.clone(),
            dir.join("unused"),
            dir.join("unused"),
            &rlhf_train::TrainDefaults::DPO,
        )
    };
    let mut t = DpoTrainer::from_parts(policy, None, DpoData::Pairs(pairs), None, 0, &cfg).unwrap();
    let out = t.forward(&[0, 1, 2, 3]).unwrap();
    rel_close(
        out.metrics["logps/chosen"],
        mean(&f["initial_chosen_logps"]),
        1e-4,
        "logps/chosen",
    );
    rel_close(
        out.metrics["logps/rejected"],
        mean(&f["initial_rejected_logps"]),
        1e-4,
        "logps/rejected",
    );
    rel_close(
        out.loss.to_scalar::<f32>().unwrap() as f64,
        f["loss_before"].as_f64().unwrap(),
        1e-4,
        "loss before",
    );
    check_grads(&mut t, &out.loss, &f);
    let after = t.forward(&[0, 1, 2, 3]).unwrap();
    rel_close(
        after.loss.to_scalar::<f32>().unwrap() as f64,
        f["loss_after"].as_f64().unwrap(),
        1e-4,
        "loss after one AdamW step",
    );
    assert!(
        after.metrics["rewards/margins"] > 0.0,
        "one step on these pairs widens the margin"
    );
}

fn mean(v: &Value) -> f64 {
    let a = v.as_array().unwrap();
    a.iter().map(|x| x.as_f64().unwrap()).sum::<f64>() / a.len() as f64
}
