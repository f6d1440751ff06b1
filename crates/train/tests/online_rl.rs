//! Online RL on the fixture tiny Llama: rollout log-probs equal the trainer's re-score (ratio 1), GRPO / RLOO /
//! PPO raise their reward, resume is bit-identical, and bad input fails clearly without losing checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_data::Tokenizer;
use rlhf_model::{CausalLm, Sampling};
use rlhf_train::grpo::{run_grpo, GrpoArgs};
use rlhf_train::ppo::{run_ppo, PpoArgs};
use rlhf_train::rloo::{run_rloo, RlooArgs};
use rlhf_train::rollout::{self, SampleSpec, SeqBatch};
use rlhf_train::settings::load;
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models"
    ))
    .join(name)
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let mut f = std::fs::File::create(path).unwrap();
    for r in rows {
        writeln!(f, "{r}").unwrap();
    }
}

fn addition_prompts(path: &Path, n: usize) {
    let rows: Vec<Value> = (0..n)
        .map(|i| {
            let (a, b) = (10 + (i * 7) % 90, 10 + (i * 13) % 90);
            json!({"prompt": format!("Q: {a}+{b}="), "answer": a + b})
        })
        .collect();
    write_jsonl(path, &rows);
}

fn args(s: &[&str]) -> Vec<std::ffi::OsString> {
    s.iter().map(Into::into).collect()
}

fn grpo_args(dir: &Path, extra: &[&str]) -> GrpoArgs {
    addition_prompts(&dir.join("prompts.jsonl"), 32);
    let model = fixture("llama");
    let mut a = vec![
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        dir.join("prompts.jsonl").to_str().unwrap(),
        "--output-dir",
        dir.join("out").to_str().unwrap(),
        "--max-new-tokens",
        "6",
        "--prompts-per-step",
        "4",
        "--num-generations",
        "4",
        "--learning-rate",
        "1e-3",
        "--lr-scheduler-type",
        "constant",
        "--max-steps",
        "4",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    a.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    load::<GrpoArgs>("grpo", &args(&a)).unwrap()
}

/// The importance ratio of the first inner step is exactly what generation reported: re-scoring the sampled
/// completions under softmax(logits / T) reproduces `sampling_logprobs` within 1e-5, with truncation on and off.
#[test]
fn rollout_logprobs_equal_the_trainer_rescore() {
    let model = CausalLm::load(&fixture("llama"), &Device::Cpu).unwrap();
    let tok = Tokenizer::from_dir(fixture("llama")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    addition_prompts(&tmp.path().join("p.jsonl"), 6);
    let prompts = rollout::load_prompts(&tmp.path().join("p.jsonl"), &tok, None, 64).unwrap();
    let refs: Vec<_> = prompts.iter().collect();
    for (t, k, p) in [
        (1.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.3, 20, 1.0),
        (0.9, 0, 0.8),
        (0.8, 10, 0.9),
    ] {
        let spec = SampleSpec {
            sampling: Sampling {
                temperature: t,
                top_k: k,
                top_p: p,
            },
            max_new_tokens: 10,
            batch_size: 5,
        };
        let rollouts = rollout::sample(&model, &tok, &refs, 3, &spec, 7, 1).unwrap();
        assert_eq!(rollouts.len(), 18);
        let pairs: Vec<(&[u32], &[u32])> = rollouts
            .iter()
            .map(|r| {
                (
                    prompts[r.prompt].ids.as_slice(),
                    r.completion_ids.as_slice(),
                )
            })
            .collect();
        let old: Vec<f32> = rollouts
            .iter()
            .flat_map(|r| r.sampling_logprobs.clone())
            .collect();
        // One row per rollout, and one row per prompt with its 3 completions behind it (GRPO's).
        assert!(model.attends_by_group());
        for seqs in [
            SeqBatch::new(&pairs, 0, &Device::Cpu).unwrap(),
            SeqBatch::grouped(&pairs, 0, &Device::Cpu).unwrap(),
        ] {
            let (lp, _) = rollout::token_logprobs(&model, &seqs, t as f64, false).unwrap();
            let lp: Vec<f32> = lp.to_vec1().unwrap();
            assert_eq!(lp.len(), old.len());
            let worst = lp
                .iter()
                .zip(&old)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-5,
                "T={t} top_k={k} top_p={p} grouped={}: max |log ratio| = {worst}",
                seqs.grouping.is_some()
            );
        }
    }
}

fn final_reward(metrics: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get(key)?.as_f64())
        .collect()
}

/// GRPO learns an easy verifiable target on the random tiny model: completions starting with " 1".
#[test]
fn grpo_raises_a_verifiable_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let a = grpo_args(
        tmp.path(),
        &[
            "--reward",
            "regex:^ ?1",
            "--max-steps",
            "30",
            "--learning-rate",
            "3e-3",
            "--max-new-tokens",
            "3",
        ],
    );
    let s = run_grpo(&a).unwrap();
    let r = final_reward(&s.metrics_file, "reward");
    assert_eq!(r.len(), 30);
    let first: f64 = r[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = r[25..].iter().sum::<f64>() / 5.0;
    assert!(last > first + 0.3, "reward {first:.3} → {last:.3}: {r:?}");
    assert!(tmp.path().join("out/model.safetensors").is_file());
}

#[test]
fn grpo_variants_run_and_report_trl_metrics() {
    for extra in [
        &["--loss-type", "grpo", "--beta", "0.04"][..],
        &[
            "--loss-type",
            "dr_grpo",
            "--importance-sampling-level",
            "sequence",
            "--num-iterations",
            "2",
        ],
        &[
            "--loss-type",
            "bnpo",
            "--scale-rewards",
            "batch",
            "--epsilon-high",
            "0.28",
            "--skip-zero-std-groups",
        ],
        &["--lora-r", "4", "--beta", "0.1"],
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut e = vec![
            "--reward",
            "regex:1",
            "--reward",
            "0.01*length:1",
            "--max-steps",
            "2",
        ];
        e.extend_from_slice(extra);
        let s = run_grpo(&grpo_args(tmp.path(), &e)).unwrap();
        for k in [
            "reward",
            "reward_std",
            "completions/mean_length",
            "frac_reward_zero_std",
            "timing/generation_s",
        ] {
            assert!(
                s.final_metrics.contains_key(k),
                "{extra:?}: no {k} in {:?}",
                s.final_metrics
            );
        }
        if extra.contains(&"--beta") {
            assert!(s.final_metrics["kl"].is_finite(), "{extra:?}");
        }
        assert_eq!(s.steps, 2);
    }
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let m = CausalLm::load(dir, &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = m
        .varmap()
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Killed after step 2 and resumed, a run ends with the same weights as an uninterrupted one: GRPO with a KL
/// term, RLOO, and PPO with the adaptive KL controller (whose β the checkpoint must carry).
#[test]
fn grpo_rloo_and_ppo_resume_bit_identically() {
    for algo in ["grpo", "rloo", "ppo"] {
        let full = tempfile::tempdir().unwrap();
        let part = tempfile::tempdir().unwrap();
        let run = |dir: &Path, steps: &str, resume: bool| {
            let mut e = vec!["--max-steps", steps, "--save-steps", "2"];
            if resume {
                e.push("--resume");
            }
            match algo {
                "grpo" => {
                    e.extend(["--reward", "regex:1", "--beta", "0.05"]);
                    run_grpo(&grpo_args(dir, &e)).map(|s| s.steps)
                }
                "rloo" => {
                    addition_prompts(&dir.join("prompts.jsonl"), 32);
                    let (model, prompts, out) =
                        (fixture("llama"), dir.join("prompts.jsonl"), dir.join("out"));
                    let mut a = vec![
                        "--model",
                        model.to_str().unwrap(),
                        "--prompts",
                        prompts.to_str().unwrap(),
                        "--output-dir",
                        out.to_str().unwrap(),
                        "--reward",
                        "regex:1",
                        "--max-new-tokens",
                        "6",
                        "--prompts-per-step",
                        "4",
                        "--num-generations",
                        "4",
                        "--learning-rate",
                        "1e-3",
                        "--lr-scheduler-type",
                        "constant",
                    ];
                    a.extend(e);
                    run_rloo(&load::<RlooArgs>("rloo", &args(&a)).unwrap()).map(|s| s.steps)
                }
                _ => {
                    e.extend(["--target-kl", "0.5", "--kl-horizon", "20"]);
                    run_ppo(&ppo_args(dir, &e)).map(|s| s.steps)
                }
            }
        };
        run(full.path(), "4", false).unwrap();
        run(part.path(), "2", false).unwrap();
        assert!(part.path().join("out/checkpoint-2").is_dir());
        // A second start without --resume refuses to touch the run.
        let e = run(part.path(), "4", false).unwrap_err().to_string();
        assert!(e.contains("--resume"), "{e}");
        assert_eq!(run(part.path(), "4", true).unwrap(), 4);
        assert_eq!(
            weights(&full.path().join("out")),
            weights(&part.path().join("out")),
            "{algo}"
        );
        let lines = |d: &Path| {
            std::fs::read_to_string(d.join("out/metrics.jsonl"))
                .unwrap()
                .lines()
                .count()
        };
        assert_eq!(
            lines(full.path()),
            lines(part.path()),
            "{algo}: metrics lines"
        );
    }
}

fn ppo_args(dir: &Path, extra: &[&str]) -> PpoArgs {
    addition_prompts(&dir.join("prompts.jsonl"), 32);
    let model = fixture("llama");
    let rm = format!("rm:{}", fixture("llama-rm").display());
    let mut a = vec![
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        dir.join("prompts.jsonl").to_str().unwrap(),
        "--output-dir",
        dir.join("out").to_str().unwrap(),
        "--reward",
        rm.as_str(),
        "--max-new-tokens",
        "6",
        "--prompts-per-step",
        "8",
        "--learning-rate",
        "1e-3",
        "--lr-scheduler-type",
        "constant",
        "--max-steps",
        "4",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    a.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    load::<PpoArgs>("ppo", &args(&a)).unwrap()
}

/// PPO against the fixture reward model raises its score while the KL to the reference stays bounded. 60 steps:
/// over seeds 42, 7 and 8 the last 10 steps' mean score is 0.49–0.86 above the first 10's (after 40 steps some
/// seeds are still within 0.15).
#[test]
fn ppo_raises_the_reward_model_score_with_bounded_kl() {
    let tmp = tempfile::tempdir().unwrap();
    let s = run_ppo(&ppo_args(
        tmp.path(),
        &[
            "--max-steps",
            "60",
            "--prompts-per-step",
            "16",
            "--learning-rate",
            "2e-3",
            "--num-mini-batches",
            "2",
            "--target-kl",
            "4",
            "--kl-horizon",
            "200",
        ],
    ))
    .unwrap();
    let scores = final_reward(&s.metrics_file, "objective/scores");
    let kl = final_reward(&s.metrics_file, "objective/kl");
    assert_eq!(scores.len(), 60);
    let first: f64 = scores[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = scores[50..].iter().sum::<f64>() / 10.0;
    assert!(
        last > first + 0.15,
        "RM score {first:.4} → {last:.4}: {scores:?}"
    );
    assert!(kl.iter().all(|k| k.is_finite() && *k < 20.0), "KL {kl:?}");
    for k in [
        "policy/clipfrac_avg",
        "val/clipfrac_avg",
        "loss/value_avg",
        "objective/rlhf_reward",
        "objective/entropy",
        "kl_coef",
    ] {
        assert!(s.final_metrics.contains_key(k), "no {k}");
    }
}

#[test]
fn rloo_raises_a_verifiable_reward() {
    let tmp = tempfile::tempdir().unwrap();
    addition_prompts(&tmp.path().join("prompts.jsonl"), 32);
    let model = fixture("llama");
    let a = load::<RlooArgs>(
        "rloo",
        &args(&[
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            tmp.path().join("prompts.jsonl").to_str().unwrap(),
            "--output-dir",
            tmp.path().join("out").to_str().unwrap(),
            "--reward",
            "regex:^ ?1",
            "--max-new-tokens",
            "3",
            "--prompts-per-step",
            "4",
            "--num-generations",
            "4",
            "--learning-rate",
            "3e-3",
            "--lr-scheduler-type",
            "constant",
            "--max-steps",
            "60",
        ]),
    )
    .unwrap();
    let s = run_rloo(&a).unwrap();
    let r = final_reward(&s.metrics_file, "reward");
    let first: f64 = r[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = r[50..].iter().sum::<f64>() / 10.0;
    assert!(last > first + 0.3, "reward {first:.3} → {last:.3}: {r:?}");
    assert!(s.final_metrics["kl"].is_finite());
}

#[test]
fn bad_input_fails_clearly_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // G < 2.
    let e = run_grpo(&grpo_args(
        tmp.path(),
        &["--reward", "regex:1", "--num-generations", "1"],
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("num_generations") && e.contains("at least 2"),
        "{e}"
    );
    // No reward source.
    let e = run_grpo(&grpo_args(tmp.path(), &[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("reward"), "{e}");
    // Unknown reward kind.
    let e = run_grpo(&grpo_args(tmp.path(), &["--reward", "magic:1"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown kind `magic`"), "{e}");
    // Empty prompt, named by file and line.
    write_jsonl(
        &tmp.path().join("empty.jsonl"),
        &[json!({"prompt": "Q: 1+1="}), json!({"prompt": ""})],
    );
    let mut a = grpo_args(tmp.path(), &["--reward", "regex:1"]);
    a.online.prompts = Some(tmp.path().join("empty.jsonl"));
    let e = run_grpo(&a).unwrap_err().to_string();
    assert!(
        e.contains("empty.jsonl:2") && e.contains("empty prompt"),
        "{e}"
    );
    // Prompt over the limit.
    let mut a = grpo_args(
        tmp.path(),
        &["--reward", "regex:1", "--max-prompt-length", "3"],
    );
    a.online.train.output_dir = Some(tmp.path().join("out2"));
    let e = run_grpo(&a).unwrap_err().to_string();
    assert!(
        e.contains("prompts.jsonl:1") && e.contains("max_prompt_length"),
        "{e}"
    );
    assert!(
        !tmp.path().join("out2").exists(),
        "a refused run created its output dir"
    );
    // A megabyte prompt is refused by its size, before it is tokenized.
    write_jsonl(
        &tmp.path().join("huge.jsonl"),
        &[json!({"prompt": "Q: 1+1=".repeat(150_000)})],
    );
    let mut a = grpo_args(tmp.path(), &["--reward", "regex:1"]);
    a.online.prompts = Some(tmp.path().join("huge.jsonl"));
    let e = run_grpo(&a).unwrap_err().to_string();
    assert!(
        e.contains("huge.jsonl:1")
            && e.contains("bytes of text cannot fit")
            && e.contains("max_prompt_length"),
        "{e}"
    );
    // Output dir = model dir.
    let mut a = grpo_args(tmp.path(), &["--reward", "regex:1"]);
    a.online.train.output_dir = Some(fixture("llama"));
    let e = run_grpo(&a).unwrap_err().to_string();
    assert!(e.contains("model directory"), "{e}");

    // A reward command that starts failing after the first checkpoint: clear error, checkpoint intact.
    let flag = tmp.path().join("fail");
    let cmd = format!(
        "cmd:if [ -e {} ]; then echo broken >&2; exit 1; fi; while read l; do echo 1; done",
        flag.display()
    );
    let out = tmp.path().join("out3");
    let mut a = grpo_args(
        tmp.path(),
        &[
            "--reward",
            cmd.as_str(),
            "--save-steps",
            "1",
            "--max-steps",
            "3",
            "--reward-retries",
            "1",
        ],
    );
    a.online.train.output_dir = Some(out.clone());
    a.online.train.max_steps = Some(1);
    run_grpo(&a).unwrap();
    std::fs::write(&flag, "").unwrap();
    a.online.train.max_steps = Some(3);
    a.online.train.resume = Some(true);
    let e = run_grpo(&a).unwrap_err().to_string();
    assert!(e.contains("broken") && e.contains("2 attempts"), "{e}");
    assert!(out.join("checkpoint-1/trainer_state.json").is_file());
    // Resuming with another learning rate is refused, naming the key.
    std::fs::remove_file(&flag).unwrap();
    a.online.train.learning_rate = Some(5e-3);
    let e = run_grpo(&a).unwrap_err().to_string();
    assert!(e.contains("learning_rate"), "{e}");
}

#[test]
fn settings_come_from_toml_and_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("grpo.toml");
    std::fs::write(&f, "model = \"m\"\nbeta = 0.2\nloss_type = \"dr_grpo\"\nreward = [\"exact:answer\"]\nlora_r = 4\n").unwrap();
    let a = load::<GrpoArgs>(
        "grpo",
        &args(&["--config", f.to_str().unwrap(), "--beta", "0.0"]),
    )
    .unwrap();
    assert_eq!(a.beta, 0.0);
    assert_eq!(a.loss_type, rlhf_train::grpo::GrpoLoss::DrGrpo);
    assert_eq!(a.online.reward, vec!["exact:answer".to_string()]);
    assert_eq!(a.online.train.lora.lora_r, Some(4));
    assert_eq!(a.online.model, Some(PathBuf::from("m")));
    std::fs::write(&f, "lose_type = \"grpo\"\n").unwrap();
    let e = load::<GrpoArgs>("grpo", &args(&["--config", f.to_str().unwrap()]))
        .unwrap_err()
        .settings()
        .unwrap()
        .to_string();
    assert!(e.contains("grpo.toml:1") && e.contains("lose_type"), "{e}");
}

/// Two losses backpropagated side by side (PPO's policy and value): a non-finite one stops the step before any
/// gradient is kept, naming the step; finite ones give each parameter its own loss's gradient.
#[test]
fn side_by_side_backward_keeps_each_gradient_and_refuses_nan() {
    use candle_core::{Tensor, Var};
    use rlhf_train::online::Step;
    use rlhf_train::optim::{AdamW, AdamWConfig};
    let (p, q) = (
        Var::new(&[1f32, 2.0], &Device::Cpu).unwrap(),
        Var::new(&[3f32], &Device::Cpu).unwrap(),
    );
    let params = vec![("p".to_string(), p.clone()), ("q".to_string(), q.clone())];
    let mut opt = AdamW::new(params, AdamWConfig::default()).unwrap();
    let none = None;
    let a = (p.as_tensor() * 2.0).unwrap().sum_all().unwrap();
    let nan = (q.as_tensor() * f64::NAN).unwrap().sum_all().unwrap();
    let mut step = Step::new(&mut opt, 0.1, None, 7, &none);
    let e = step.backward_apart(&a, &nan).unwrap_err().to_string();
    assert!(e.contains("step 7") && e.contains("loss"), "{e}");
    assert!(
        step.update().is_err(),
        "a refused loss left gradients behind"
    );
    let b = q.as_tensor().sqr().unwrap().sum_all().unwrap();
    let v = step.backward_apart(&a, &b).unwrap();
    assert_eq!(v, 6.0 + 9.0);
    step.update().unwrap();
    // One AdamW step moves every parameter by lr against its gradient's sign (2, 2 for p; 6 for q).
    let moved: Vec<f32> = Tensor::cat(&[p.as_tensor(), q.as_tensor()], 0)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (got, want) in moved.iter().zip([1.0 - 0.1, 2.0 - 0.1, 3.0 - 0.1]) {
        assert!((got - want).abs() < 1e-3, "{moved:?}");
    }
}
