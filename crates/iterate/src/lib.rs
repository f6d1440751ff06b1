//! `rlhf iterate`: N rounds of iterative RLHF. Each round k, under `runs/<name>/round-<k>/`:
//!
//! 1. **sample** — K candidates per prompt from the current policy (`prompts.jsonl`, `candidates.jsonl`);
//! 2. **label** — every candidate pair labelled by the configured source ([`config::LabelSource`]): a reward
//!    spec, an LLM judge, the sandbox's simulated annotators or a live feedback-app project (`labels.jsonl`, each
//!    label with its provenance; `label_info.json` about the labellers);
//! 3. **train** — DPO from the round's starting policy, which is also the reference, or a reward model retrained
//!    on every round's pairs then GRPO against it (`train.jsonl`, `training_rows.jsonl` mapping each training row
//!    to its label ids, `model/`);
//! 4. **eval** — the starting and the trained policy on held-out prompts (`eval_summary.json`, `metrics.json`);
//! 5. **card** — `MODEL_CARD.md` and `model_card.json`.
//!
//! `state.json` is replaced atomically after each phase; a rerun of the same command resumes after the last
//! completed phase, and labels already in `labels.jsonl` are never asked for again nor duplicated.

pub mod card;
pub mod config;
pub mod feedback;
pub mod label;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rlhf_data::Text;
use rlhf_eval::{evaluate, read_prompt_rows, EvalConfig, ModelSpec};
use rlhf_generate::Generator;
use rlhf_model::{FinishReason, GenRequest, Sampling};
use rlhf_sandbox::source::{gold_path, reward_source, write_prompts};
use rlhf_sandbox::world::{generate, Mix};
use rlhf_train::grpo::GrpoArgs;
use rlhf_train::pref_config::PrefConfig;
use rlhf_train::schedule::ScheduleKind;
use serde::Serialize;
use serde_json::{json, Map, Value};

pub use config::{IterateArgs, LabelSource, Trainer};
use label::{Candidate, Candidates};
use store::{read_jsonl, write_json, write_jsonl, LabelLog, LabelRecord, State, PHASES};

/// What a finished (or resumed and finished) run reports: one `metrics.json` per round.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub rounds: Vec<Value>,
    pub final_model: PathBuf,
}

pub const STATE_FILE: &str = "state.json";

/// Runs (or resumes) the rounds `args` describes.
pub fn run(args: &IterateArgs) -> Result<Summary> {
    args.validate()?;
    let dir = args.run_dir();
    let settings = serde_json::to_value(args)?;
    let state_path = dir.join(STATE_FILE);
    let resumed = store::load_state(&state_path, &settings, &config::RESUME_FREE_KEYS)?;
    let sandbox_eval = dir.join("eval_prompts.jsonl");
    let rewritten = [sandbox_eval.clone(), gold_path(&sandbox_eval)];
    if resumed.is_none() && dir.read_dir().is_ok_and(|d| d.flatten().any(|e| !rewritten.contains(&e.path()))) {
        bail!("{}: holds files but no {STATE_FILE}; choose another `name` or remove it", dir.display());
    }
    let source = args.label_source();
    let eval_prompts = match &args.eval_prompts {
        // The world is a function of the seed: rewritten identically on every start.
        _ if args.world_prompts() => {
            std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
            write_prompts(&sandbox_eval, &generate(args.sandbox_eval_prompts, &Mix::default(), args.seed ^ 0xE7A1, "eval-"))?;
            Some(sandbox_eval)
        }
        p => p.clone(),
    };
    check_sources(args, &source, eval_prompts.as_deref())?;
    // Written only once the sources are known to work, so a misspelt setting leaves nothing to resume.
    let mut state = match resumed {
        Some(s) => s,
        None => {
            let s = State { settings, round: 1, done: Vec::new() };
            write_json(&state_path, &s)?;
            s
        }
    };
    for k in state.round..=args.rounds {
        let rd = round_dir(&dir, k);
        std::fs::create_dir_all(&rd).with_context(|| format!("{}: cannot create", rd.display()))?;
        let start = if k == 1 { args.model().to_path_buf() } else { round_dir(&dir, k - 1).join("model") };
        let phase = |state: &mut State, name: &str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
            if !state.is_done(k, name) {
                f().with_context(|| format!("round {k}, phase {name}"))?;
                state.done.push(name.to_string());
                if name == PHASES[PHASES.len() - 1] {
                    state.round = k + 1;
                    state.done.clear();
                }
                write_json(&state_path, state)?;
            }
            Ok(())
        };
        phase(&mut state, "sample", &mut || sample(args, k, &start, &rd))?;
        phase(&mut state, "label", &mut || label(args, &source, k, &start, &rd))?;
        phase(&mut state, "train", &mut || train(args, &start, &rd))?;
        phase(&mut state, "eval", &mut || eval(args, k, &start, &rd, eval_prompts.as_deref()))?;
        phase(&mut state, "card", &mut || card::write(args, k, &start, &rd))?;
    }
    let rounds = (1..=args.rounds).map(|k| read_json(&round_dir(&dir, k).join("metrics.json"))).collect::<Result<Vec<_>>>()?;
    Ok(Summary { final_model: round_dir(&dir, args.rounds).join("model"), run_dir: dir, rounds })
}

/// Builds the label and evaluation sources once before any round, so that a misspelt spec fails at start-up
/// (naming its key), not after a round of sampling.
fn check_sources(args: &IterateArgs, source: &LabelSource, eval_prompts: Option<&Path>) -> Result<()> {
    let tok = rlhf_data::Tokenizer::from_dir(args.model()).with_context(|| format!("model {}", args.model().display()))?;
    match source {
        LabelSource::Reward(spec) => {
            let timeout = Duration::from_secs_f64(args.reward_timeout_s);
            rlhf_train::reward::parse_spec(spec, &tok, args.max_length, timeout).map_err(|e| args.err("labels", e.to_string()))?;
        }
        LabelSource::Judge(arg) => {
            rlhf_serve::judge_reward::JudgeSpec::parse(arg).map_err(|e| args.err("labels", format!("judge:{arg}: {e:#}")))?;
        }
        LabelSource::Sandbox | LabelSource::Feedback(_) => {}
    }
    if let Some(p) = eval_prompts {
        for spec in args.eval_rewards() {
            reward_source(&spec, p, args.model(), args.max_length).map_err(|e| args.err("eval_reward", format!("{spec}: {e:#}")))?;
        }
    }
    Ok(())
}

pub fn round_dir(run: &Path, k: usize) -> PathBuf {
    run.join(format!("round-{k}"))
}

pub fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?)
        .with_context(|| format!("{}: not JSON", path.display()))
}

/// The round's prompt rows: a fresh draw from the sandbox world, or the next window of the prompts file.
fn round_prompts(args: &IterateArgs, k: usize, rd: &Path) -> Result<Vec<Map<String, Value>>> {
    let n = args.prompts_per_round;
    let path = rd.join("prompts.jsonl");
    if args.world_prompts() {
        let world = generate(n, &Mix::default(), args.seed.wrapping_add(k as u64), &format!("r{k}-"));
        write_prompts(&path, &world)?;
        return Ok(world.iter().map(|p| p.public_row()).collect());
    }
    let all = read_prompt_rows(args.prompts.as_deref().expect("validated"))?;
    let first = (k - 1) * n % all.len();
    let rows: Vec<Map<String, Value>> = (0..n).map(|i| all[(first + i) % all.len()].clone()).collect();
    write_jsonl(&path, &rows)?;
    Ok(rows)
}

fn sample(args: &IterateArgs, k: usize, policy: &Path, rd: &Path) -> Result<()> {
    let rows = round_prompts(args, k, rd)?;
    let g = Generator::load(policy).with_context(|| format!("policy {}", policy.display()))?;
    let positions = g.model.config().max_position_embeddings();
    let kk = args.candidates;
    let mut ids = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let text = r.get("prompt").and_then(Value::as_str).unwrap_or_default();
        let p = g.encode_prompt(&Text::Plain(text.to_string()))?;
        if p.is_empty() || p.len() + args.max_new_tokens > positions {
            bail!("prompt {} ({text:?}) has {} tokens; with max_new_tokens {} it must fit the model's {positions} positions", i + 1, p.len(), args.max_new_tokens);
        }
        ids.push(p);
    }
    let prompts: Vec<Vec<u32>> = ids.iter().flat_map(|p| std::iter::repeat_n(p.clone(), kk)).collect();
    // A seed per (run seed, round, prompt, candidate): a resumed round samples exactly what the first try did.
    let seeds: Vec<u64> = (0..prompts.len() as u64).map(|j| args.seed.wrapping_mul(1_000_003).wrapping_add((k as u64) << 32).wrapping_add(j)).collect();
    let sampling = Sampling { temperature: args.temperature as f32, top_k: 0, top_p: args.top_p as f32 };
    let template = GenRequest { max_new_tokens: args.max_new_tokens, sampling, ..Default::default() };
    let out = g.run(&prompts, &seeds, &template, 32)?;
    let cands: Vec<Candidates> = rows
        .into_iter()
        .zip(ids)
        .enumerate()
        .map(|(i, (row, prompt_ids))| Candidates {
            prompt_index: i,
            row,
            prompt_ids,
            candidates: out[i * kk..(i + 1) * kk]
                .iter()
                .map(|(text, o)| Candidate { text: text.clone(), ids: o.tokens.clone(), eos: o.finish_reason == FinishReason::Eos })
                .collect(),
        })
        .collect();
    write_jsonl(&rd.join("candidates.jsonl"), &cands)
}

fn label(args: &IterateArgs, source: &LabelSource, k: usize, policy: &Path, rd: &Path) -> Result<()> {
    let cands: Vec<Candidates> = read_jsonl(&rd.join("candidates.jsonl"))?;
    let mut log = LabelLog::open(&rd.join("labels.jsonl"))?;
    let info = match source {
        LabelSource::Reward(spec) => {
            let tok = rlhf_data::Tokenizer::from_dir(policy)?;
            label::by_reward(spec, &tok, args.max_length, args.reward_timeout_s, args.reward_retries, k, &cands, &mut log)?
        }
        LabelSource::Judge(arg) => label::by_judge(arg, k, &cands, &mut log, args.reward_retries)?,
        LabelSource::Sandbox => label::by_sandbox(&gold_path(&rd.join("prompts.jsonl")), args.seed, k, &cands, &mut log)?,
        LabelSource::Feedback(url) => feedback::by_feedback(
            &feedback::FeedbackTarget {
                url,
                project: args.feedback_project.expect("validated"),
                user: &args.feedback_user,
                run: &args.name,
                deadline: Duration::from_secs_f64(args.feedback_deadline_s),
                poll: Duration::from_secs_f64(args.feedback_poll_s),
            },
            k,
            &cands,
            &mut log,
        )?,
    };
    let mut info = info;
    if args.world_prompts() {
        info["agreement_with_gold"] = label::gold_agreement(&gold_path(&rd.join("prompts.jsonl")), &cands, &log.labels)?;
    }
    write_json(&rd.join("label_info.json"), &info)
}

/// One DPO row per decided pair. As in the feedback app's export, an item most of whose labels are undecided (ties,
/// both bad) is left out; otherwise its labels' P(a ≻ b) are averaged and an exact ½ is left out too.
pub fn decisions(cands: &[Candidates], labels: &[LabelRecord]) -> (Vec<Value>, Vec<Value>) {
    let mut by_item: BTreeMap<(usize, usize, usize), Vec<&LabelRecord>> = BTreeMap::new();
    for l in labels {
        by_item.entry((l.prompt_index, l.a, l.b)).or_default().push(l);
    }
    let (mut rows, mut provenance) = (Vec::new(), Vec::new());
    for ((i, a, b), ls) in by_item {
        let undecided = ls.iter().filter(|l| l.p_a == 0.5).count();
        let p = ls.iter().map(|l| l.p_a).sum::<f64>() / ls.len() as f64;
        if 2 * undecided > ls.len() || (p - 0.5).abs() < 1e-12 {
            continue;
        }
        let (chosen, rejected) = if p > 0.5 { (a, b) } else { (b, a) };
        let c = &cands[i];
        let label_ids: Vec<&str> = ls.iter().map(|l| l.id.as_str()).collect();
        let app_ids: Vec<Value> = ls.iter().filter_map(|l| l.detail.get("label_ids").cloned()).collect();
        rows.push(json!({"prompt": c.prompt(), "chosen": c.candidates[chosen].text, "rejected": c.candidates[rejected].text,
            "item": ls[0].item, "label_ids": label_ids}));
        provenance.push(json!({"row": rows.len() - 1, "item": ls[0].item, "label_ids": label_ids, "app_label_ids": app_ids,
            "p_chosen": p.max(1.0 - p), "labellers": ls.iter().map(|l| l.by.as_str()).collect::<Vec<_>>()}));
    }
    (rows, provenance)
}

fn train(args: &IterateArgs, start: &Path, rd: &Path) -> Result<()> {
    let cands: Vec<Candidates> = read_jsonl(&rd.join("candidates.jsonl"))?;
    let log = LabelLog::open(&rd.join("labels.jsonl"))?;
    let (rows, provenance) = decisions(&cands, &log.labels);
    let (train_file, out) = (rd.join("train.jsonl"), rd.join("model"));
    write_jsonl(&train_file, &rows)?;
    write_jsonl(&rd.join("training_rows.jsonl"), &provenance)?;
    if rows.is_empty() {
        // Nothing decided: the policy carries over unchanged (the card says so).
        copy_model(start, &out)?;
        let summary = json!({"algorithm": "none", "steps": 0, "rows": 0, "note": "no decided pair: the policy is the round's starting policy"});
        return write_json(&rd.join("train_summary.json"), &json!({"summary": summary, "config": Value::Null}));
    }
    let (summary, config) = match args.trainer {
        Trainer::Dpo => {
            let cfg = dpo_config(args, start, &train_file, &out);
            let s = rlhf_train::dpo::run_dpo(&cfg)?;
            (json!({"algorithm": "dpo (reference = the round's starting policy)", "steps": s.steps, "rows": rows.len(),
                "final_loss": s.final_loss, "train_loss": s.train_loss, "final_metrics": s.final_metrics}), json!(cfg))
        }
        Trainer::RmGrpo => rm_grpo(args, start, rd, rows.len())?,
    };
    write_json(&rd.join("train_summary.json"), &json!({"summary": summary, "config": config}))
}

/// A reward model retrained from `model` on the decided pairs of rounds 1..=k, then GRPO against it from the
/// round's starting policy (the KL reference) on the round's prompts.
fn rm_grpo(args: &IterateArgs, start: &Path, rd: &Path, rows: usize) -> Result<(Value, Value)> {
    let run = args.run_dir();
    let k: usize = rd.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("round-")).and_then(|n| n.parse().ok()).expect("round dir");
    let mut all = Vec::new();
    for j in 1..=k {
        all.extend(read_jsonl::<Value>(&round_dir(&run, j).join("train.jsonl"))?);
    }
    let rm_train = rd.join("rm_train.jsonl");
    write_jsonl(&rm_train, &all)?;
    let mut rc = dpo_config(args, args.model(), &rm_train, &rd.join("rm"));
    rc.learning_rate = Some(args.rm_learning_rate);
    rc.max_steps = Some(args.rm_steps);
    let r = rlhf_train::rm::run_rm(&rc)?;
    let out = rd.join("model");
    let flags: Vec<std::ffi::OsString> = [
        "--model", &start.display().to_string(), "--prompts", &rd.join("prompts.jsonl").display().to_string(),
        "--output-dir", &out.display().to_string(), "--reward", &format!("rm:{}", rd.join("rm").display()),
        "--max-steps", &args.grpo_steps.to_string(), "--prompts-per-step", &args.batch_size.to_string(),
        "--num-generations", &args.candidates.to_string(), "--beta", &args.grpo_beta.to_string(),
        "--learning-rate", &args.learning_rate.to_string(), "--lr-scheduler-type", "constant",
        "--max-new-tokens", &args.max_new_tokens.to_string(), "--temperature", &args.temperature.to_string(),
        "--max-prompt-length", &(args.max_length - args.max_new_tokens).to_string(), "--seed", &args.seed.to_string(),
        // A run killed while training redoes the phase from the start.
        "--overwrite-output-dir",
    ]
    .iter()
    .map(Into::into)
    .collect();
    let g = rlhf_train::settings::load::<GrpoArgs>("grpo", &flags).map_err(|e| match e {
        rlhf_train::settings::LoadError::Cli(e) => anyhow::anyhow!("{e}"),
        rlhf_train::settings::LoadError::Settings(e) => e.into(),
    })?;
    let s = rlhf_train::grpo::run_grpo(&g)?;
    let summary = json!({"algorithm": "reward model (retrained on every round's pairs) then GRPO, KL to the round's starting policy",
        "rows": rows, "rm": {"pairs": all.len(), "steps": r.steps, "final_loss": r.final_loss, "final_metrics": r.final_metrics},
        "steps": s.steps, "final_metrics": s.final_metrics});
    Ok((summary, json!({"rm": rc, "grpo": g})))
}

/// The round's DPO settings: reference = the starting policy (DPO's default when no reference is named).
pub fn dpo_config(args: &IterateArgs, start: &Path, train_file: &Path, out: &Path) -> PrefConfig {
    let mut c = PrefConfig {
        model: Some(start.into()),
        train_file: Some(train_file.into()),
        output_dir: Some(out.into()),
        max_length: args.max_length,
        batch_size: args.batch_size,
        learning_rate: Some(args.learning_rate),
        lr_scheduler_type: ScheduleKind::Constant,
        max_steps: Some(args.dpo_steps),
        logging_steps: 1,
        save_steps: 0,
        seed: args.seed,
        // A run killed while training redoes the phase from the start.
        overwrite_output_dir: true,
        ..PrefConfig::default()
    };
    c.dpo.params.beta = args.beta;
    c
}

fn copy_model(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("{}: cannot create", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("{}: cannot read", from.display()))? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).with_context(|| format!("{}: cannot copy", e.path().display()))?;
        }
    }
    Ok(())
}

fn eval(args: &IterateArgs, k: usize, start: &Path, rd: &Path, prompts: Option<&Path>) -> Result<()> {
    let log = LabelLog::open(&rd.join("labels.jsonl"))?;
    let train = read_json(&rd.join("train_summary.json"))?;
    let specs = args.eval_rewards();
    let mut metrics = json!({"round": k, "start_policy": start, "model": rd.join("model"), "labels": log.labels.len(),
        "training_rows": train["summary"]["rows"], "train": train["summary"], "eval": Value::Null});
    if let (Some(prompts), false) = (prompts, specs.is_empty()) {
        let rows = read_prompt_rows(prompts)?;
        let rewards = specs.iter().map(|s| reward_source(s, prompts, start, args.max_length)).collect::<Result<Vec<_>>>()?;
        let models = [ModelSpec { name: "start".into(), dir: start.into() }, ModelSpec { name: "trained".into(), dir: rd.join("model") }];
        let cfg = EvalConfig { max_new_tokens: args.max_new_tokens, temperature: args.eval_temperature, seed: args.seed, examples: 3, ..EvalConfig::default() };
        let s = evaluate(&models, Some(start), &rows, &rewards, &cfg)?;
        write_json(&rd.join("eval_summary.json"), &s)?;
        let per_model = |name: &str| {
            let m = s.model(name).expect("evaluated");
            json!({"rewards": m.rewards.iter().map(|r| (r.source.clone(), json!(r.reward))).collect::<Map<_, _>>(),
                "kl_to_start": m.kl_to_reference, "length_tokens": m.length_tokens.mean})
        };
        metrics["eval"] = json!({"prompts": rows.len(), "start": per_model("start"), "trained": per_model("trained"),
            "win_rates": s.win_rates.iter().filter(|w| w.model == "trained").map(|w| json!({"source": w.source, "win_rate": w.win_rate, "n": w.n})).collect::<Vec<_>>()});
    }
    write_json(&rd.join("metrics.json"), &metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(item: (usize, usize, usize), by: &str, p_a: f64) -> LabelRecord {
        LabelRecord {
            id: format!("r1-p{}-{}-{}:{by}", item.0, item.1, item.2),
            round: 1,
            source: "sandbox".into(),
            by: by.into(),
            item: format!("r1-p{}-{}-{}", item.0, item.1, item.2),
            prompt_index: item.0,
            a: item.1,
            b: item.2,
            p_a,
            detail: json!({"label_ids": [7]}),
            at_ms: 0,
        }
    }

    #[test]
    fn decisions_follow_the_mean_and_drop_undecided_majorities() {
        let texts = |t: &[&str]| t.iter().map(|s| Candidate { text: s.to_string(), ids: vec![], eos: true }).collect();
        let mut row = Map::new();
        row.insert("prompt".into(), json!("Q"));
        let cands = vec![Candidates { prompt_index: 0, row, prompt_ids: vec![1], candidates: texts(&["x", "y", "z"]) }];
        let labels = vec![
            // (0,1): 2 of 3 prefer b.
            label((0, 0, 1), "u1", 0.0),
            label((0, 0, 1), "u2", 0.0),
            label((0, 0, 1), "u3", 1.0),
            // (0,2): two ties and one vote: mostly undecided, left out.
            label((0, 0, 2), "u1", 0.5),
            label((0, 0, 2), "u2", 0.5),
            label((0, 0, 2), "u3", 1.0),
            // (1,2): a judge's probability.
            label((0, 1, 2), "judge", 0.7),
        ];
        let (rows, prov) = decisions(&cands, &labels);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0]["chosen"].as_str(), rows[0]["rejected"].as_str()), (Some("y"), Some("x")));
        assert_eq!((rows[1]["chosen"].as_str(), rows[1]["rejected"].as_str()), (Some("y"), Some("z")));
        assert_eq!(prov[0]["label_ids"], json!(["r1-p0-0-1:u1", "r1-p0-0-1:u2", "r1-p0-0-1:u3"]));
        assert!((prov[0]["p_chosen"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(prov[1]["app_label_ids"], json!([[7]]));
    }
}
