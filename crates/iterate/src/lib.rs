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
pub mod kinds;
pub mod label;
pub mod store;
pub mod train;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rlhf_data::Text;
use rlhf_eval::{evaluate, read_prompt_rows, EvalConfig, ModelSpec};
use rlhf_generate::Generator;
use rlhf_model::{FinishReason, GenRequest, Sampling};
use rlhf_sandbox::source::{gold_path, reward_source, write_prompts};
use rlhf_sandbox::world::{generate, Mix};
use serde::Serialize;
use serde_json::{json, Map, Value};

pub use config::{IterateArgs, LabelSource, Trainer};
use label::{Candidate, Candidates};
use store::{read_jsonl, write_json, write_jsonl, LabelLog, State, PHASES};

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
    if resumed.is_none()
        && dir
            .read_dir()
            .is_ok_and(|d| d.flatten().any(|e| !rewritten.contains(&e.path())))
    {
        bail!(
            "{}: holds files but no {STATE_FILE}; choose another `name` or remove it",
            dir.display()
        );
    }
    let source = args.label_source();
    let eval_prompts = match &args.eval_prompts {
        // The world is a function of the seed: rewritten identically on every start.
        _ if args.world_prompts() => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("{}: cannot create", dir.display()))?;
            write_prompts(
                &sandbox_eval,
                &generate(
                    args.sandbox_eval_prompts,
                    &Mix::default(),
                    args.seed ^ 0xE7A1,
                    "eval-",
                ),
            )?;
            Some(sandbox_eval)
        }
        p => p.clone(),
    };
    check_sources(args, &source, eval_prompts.as_deref())?;
    // Written only once the sources are known to work, so a misspelt setting leaves nothing to resume.
    let mut state = match resumed {
        Some(s) => s,
        None => {
            let s = State {
                settings,
                round: 1,
                done: Vec::new(),
            };
            write_json(&state_path, &s)?;
            s
        }
    };
    for k in state.round..=args.rounds {
        let rd = round_dir(&dir, k);
        std::fs::create_dir_all(&rd).with_context(|| format!("{}: cannot create", rd.display()))?;
        let start = if k == 1 {
            args.model().to_path_buf()
        } else {
            round_dir(&dir, k - 1).join("model")
        };
        let phase =
            |state: &mut State, name: &str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
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
        phase(&mut state, "label", &mut || {
            label(args, &source, k, &start, &rd)
        })?;
        phase(&mut state, "train", &mut || {
            train::train(args, k, &start, &rd)
        })?;
        phase(&mut state, "eval", &mut || {
            eval(args, k, &start, &rd, eval_prompts.as_deref())
        })?;
        phase(&mut state, "card", &mut || {
            card::write(args, k, &start, &rd)
        })?;
    }
    let rounds = (1..=args.rounds)
        .map(|k| read_json(&round_dir(&dir, k).join("metrics.json")))
        .collect::<Result<Vec<_>>>()?;
    Ok(Summary {
        final_model: round_dir(&dir, args.rounds).join("model"),
        run_dir: dir,
        rounds,
    })
}

/// Builds the label and evaluation sources once before any round, so that a misspelt spec fails at start-up
/// (naming its key), not after a round of sampling.
fn check_sources(
    args: &IterateArgs,
    source: &LabelSource,
    eval_prompts: Option<&Path>,
) -> Result<()> {
    let tok = rlhf_data::Tokenizer::from_dir(args.model())
        .with_context(|| format!("model {}", args.model().display()))?;
    match source {
        LabelSource::Reward(spec) => {
            let timeout = Duration::from_secs_f64(args.reward_timeout_s);
            rlhf_train::reward::parse_spec(spec, &tok, args.max_length, timeout).map_err(|e| {
                match e {
                    rlhf_train::TrainError::Config { msg, .. } => args.err("labels", msg),
                    other => args.err("labels", other.to_string()),
                }
            })?;
        }
        LabelSource::Judge(arg) => {
            rlhf_serve::judge_reward::JudgeSpec::parse(arg)
                .map_err(|e| args.err("labels", format!("judge:{arg}: {e:#}")))?;
        }
        LabelSource::Sandbox | LabelSource::Feedback(_) => {}
    }
    if let Some(p) = eval_prompts {
        for spec in args.eval_rewards() {
            reward_source(&spec, p, args.model(), args.max_length)
                .map_err(|e| args.err("eval_reward", format!("{spec}: {e:#}")))?;
        }
    }
    Ok(())
}

pub fn round_dir(run: &Path, k: usize) -> PathBuf {
    run.join(format!("round-{k}"))
}

pub fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(
        &std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?,
    )
    .with_context(|| format!("{}: not JSON", path.display()))
}

/// The round's prompt rows: a fresh draw from the sandbox world, or the next window of the prompts file.
fn round_prompts(args: &IterateArgs, k: usize, rd: &Path) -> Result<Vec<Map<String, Value>>> {
    let n = args.prompts_per_round;
    let path = rd.join("prompts.jsonl");
    if args.world_prompts() {
        let world = generate(
            n,
            &Mix::default(),
            args.seed.wrapping_add(k as u64),
            &format!("r{k}-"),
        );
        write_prompts(&path, &world)?;
        return Ok(world.iter().map(|p| p.public_row()).collect());
    }
    let all = read_prompt_rows(args.prompts.as_deref().expect("validated"))?;
    let first = (k - 1) * n % all.len();
    let rows: Vec<Map<String, Value>> = (0..n)
        .map(|i| all[(first + i) % all.len()].clone())
        .collect();
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
    let prompts: Vec<Vec<u32>> = ids
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), kk))
        .collect();
    // A seed per (run seed, round, prompt, candidate): a resumed round samples exactly what the first try did.
    let seeds: Vec<u64> = (0..prompts.len() as u64)
        .map(|j| {
            args.seed
                .wrapping_mul(1_000_003)
                .wrapping_add((k as u64) << 32)
                .wrapping_add(j)
        })
        .collect();
    let sampling = Sampling {
        temperature: args.temperature as f32,
        top_k: 0,
        top_p: args.top_p as f32,
    };
    let template = GenRequest {
        max_new_tokens: args.max_new_tokens,
        sampling,
        ..Default::default()
    };
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
                .map(|(text, o)| Candidate {
                    text: text.clone(),
                    ids: o.tokens.clone(),
                    eos: o.finish_reason == FinishReason::Eos,
                })
                .collect(),
        })
        .collect();
    write_jsonl(&rd.join("candidates.jsonl"), &cands)
}

fn label(
    args: &IterateArgs,
    source: &LabelSource,
    k: usize,
    policy: &Path,
    rd: &Path,
) -> Result<()> {
    let cands: Vec<Candidates> = read_jsonl(&rd.join("candidates.jsonl"))?;
    let mut log = LabelLog::open(&rd.join("labels.jsonl"))?;
    let gold = gold_path(&rd.join("prompts.jsonl"));
    let pairs = kinds::choose_pairs(label::pairs(k, &cands), args.pairwise_budget, args.seed, k);
    let info = match source {
        _ if pairs.is_empty() => json!({}),
        LabelSource::Reward(spec) => {
            let tok = rlhf_data::Tokenizer::from_dir(policy)?;
            let mut rewards = rlhf_train::reward::Rewards::from_specs(
                std::slice::from_ref(spec),
                &tok,
                args.max_length,
                args.reward_timeout_s,
                args.reward_retries,
            )?;
            label::by_reward(spec, &mut rewards, k, &cands, &pairs, &mut log)?
        }
        LabelSource::Judge(arg) => {
            label::by_judge(arg, k, &cands, &pairs, &mut log, args.reward_retries)?
        }
        LabelSource::Sandbox => label::by_sandbox(&gold, args.seed, k, &cands, &pairs, &mut log)?,
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
            &pairs,
            &mut log,
        )?,
    };
    let mut info = info;
    let mut asked = Map::new();
    asked.insert("pairwise".into(), json!({"items": pairs.len()}));
    for kind in kinds::Kind::SINGLE
        .into_iter()
        .filter(|&kind| args.budget(kind) > 0)
    {
        let items = kinds::choose_items(kind, args.budget(kind), args.seed, k, &cands);
        asked.insert(
            kind.name().into(),
            kinds::by_sandbox(kind, &items, &gold, args.seed, k, &cands, &mut log)?,
        );
    }
    info["kinds"] = Value::Object(asked);
    if args.world_prompts() {
        info["agreement_with_gold"] =
            label::gold_agreement(&gold_path(&rd.join("prompts.jsonl")), &cands, &log.labels)?;
    }
    write_json(&rd.join("label_info.json"), &info)
}

fn eval(
    args: &IterateArgs,
    k: usize,
    start: &Path,
    rd: &Path,
    prompts: Option<&Path>,
) -> Result<()> {
    let log = LabelLog::open(&rd.join("labels.jsonl"))?;
    let train = read_json(&rd.join("train_summary.json"))?;
    let specs = args.eval_rewards();
    let mut metrics = json!({"round": k, "start_policy": start, "model": rd.join("model"), "labels": log.labels.len(),
        "training_rows": train["summary"]["rows"], "train": train["summary"], "eval": Value::Null});
    if let (Some(prompts), false) = (prompts, specs.is_empty()) {
        let rows = read_prompt_rows(prompts)?;
        let rewards = specs
            .iter()
            .map(|s| reward_source(s, prompts, start, args.max_length))
            .collect::<Result<Vec<_>>>()?;
        let models = [
            ModelSpec {
                name: "start".into(),
                dir: start.into(),
            },
            ModelSpec {
                name: "trained".into(),
                dir: rd.join("model"),
            },
        ];
        let cfg = EvalConfig {
            max_new_tokens: args.max_new_tokens,
            temperature: args.eval_temperature,
            seed: args.seed,
            examples: 3,
            ..EvalConfig::default()
        };
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
