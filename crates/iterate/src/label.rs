//! Labelling a round's candidate pairs: by a reward spec (pairs ordered by score), by an LLM judge (pairwise, both
//! orders averaged) or by the sandbox's simulated annotators. Every label is appended to the round's
//! [`LabelLog`] as soon as it exists, so a killed run loses none and a resumed one asks again only for the rest.
//! (The feedback-app source is in [`crate::feedback`].)

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rlhf_sandbox::annotators::{pairwise, Panel};
use rlhf_sandbox::gold::gold_reward;
use rlhf_sandbox::world::{Gold, Prompt};
use rlhf_serve::judge::Mode;
use rlhf_serve::judge_reward::JudgeSpec;
use rlhf_train::reward::{Rewards, Sample};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::store::{now_ms, LabelLog, LabelRecord};

/// One sampled completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub text: String,
    pub ids: Vec<u32>,
    /// Ended with an EOS token.
    pub eos: bool,
}

/// A prompt of the round with its K candidates (a line of `candidates.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidates {
    pub prompt_index: usize,
    /// The prompt row as read (its `prompt` and any columns reward sources read).
    pub row: Map<String, Value>,
    pub prompt_ids: Vec<u32>,
    pub candidates: Vec<Candidate>,
}

impl Candidates {
    pub fn prompt(&self) -> &str {
        self.row
            .get("prompt")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// A pair to label: candidates `a` < `b` of prompt `prompt_index`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub id: String,
    pub prompt_index: usize,
    pub a: usize,
    pub b: usize,
}

/// Every pair of every prompt's candidates, in order.
pub fn pairs(round: usize, cands: &[Candidates]) -> Vec<Pair> {
    let mut out = Vec::new();
    for c in cands {
        for a in 0..c.candidates.len() {
            for b in a + 1..c.candidates.len() {
                out.push(Pair {
                    id: format!("r{round}-p{}-{a}-{b}", c.prompt_index),
                    prompt_index: c.prompt_index,
                    a,
                    b,
                });
            }
        }
    }
    out
}

/// A label of `pair` by `by`.
pub fn record(
    round: usize,
    source: &str,
    by: &str,
    pair: &Pair,
    p_a: f64,
    detail: Value,
) -> LabelRecord {
    LabelRecord {
        id: format!("{}:{by}", pair.id),
        round,
        source: source.into(),
        kind: "pairwise".into(),
        by: by.into(),
        item: pair.id.clone(),
        prompt_index: pair.prompt_index,
        a: pair.a,
        b: pair.b,
        p_a,
        detail,
        at_ms: now_ms(),
    }
}

/// What the model card reports about the labellers beyond the labels themselves.
pub type LabelInfo = Value;

/// Scores each prompt's candidates with `rewards` (built from `spec`; one call per prompt) and labels the pairs
/// `all` by score.
pub fn by_reward(
    spec: &str,
    rewards: &mut Rewards,
    round: usize,
    cands: &[Candidates],
    all: &[Pair],
    log: &mut LabelLog,
) -> Result<LabelInfo> {
    for c in cands {
        let todo: Vec<&Pair> = all
            .iter()
            .filter(|p| p.prompt_index == c.prompt_index && !log.has(&format!("{}:{spec}", p.id)))
            .collect();
        if todo.is_empty() {
            continue;
        }
        let samples: Vec<Sample> = c
            .candidates
            .iter()
            .map(|k| Sample {
                prompt: c.prompt(),
                completion: &k.text,
                prompt_ids: &c.prompt_ids,
                completion_ids: &k.ids,
                eos: k.eos,
                row: &c.row,
            })
            .collect();
        let scores = rewards.score(&samples)?.total;
        let labels = todo
            .iter()
            .map(|p| {
                let (sa, sb) = (scores[p.a], scores[p.b]);
                let p_a = if sa > sb {
                    1.0
                } else if sa < sb {
                    0.0
                } else {
                    0.5
                };
                record(round, "reward", spec, p, p_a, json!({"scores": [sa, sb]}))
            })
            .collect();
        log.append(labels)?;
    }
    Ok(json!({"reward": spec}))
}

/// Asks the judge about every pair of `all` not yet labelled (both presentation orders, averaged).
pub fn by_judge(
    arg: &str,
    round: usize,
    cands: &[Candidates],
    all: &[Pair],
    log: &mut LabelLog,
    retries: usize,
) -> Result<LabelInfo> {
    let spec = JudgeSpec::parse(arg).with_context(|| format!("labels = \"judge:{arg}\""))?;
    let judge = retry(retries, || spec.connect())?;
    let by = format!("judge:{}#{}", spec.url, judge.model());
    for p in all {
        if log.has(&format!("{}:{by}", p.id)) {
            continue;
        }
        let c = &cands[p.prompt_index];
        let prob = retry(retries, || {
            judge.compare(c.prompt(), &c.candidates[p.a].text, &c.candidates[p.b].text)
        })
        .with_context(|| format!("judge {}", spec.url))?;
        let detail = match judge.mode() {
            Mode::Verdict => json!({"probability_a": prob, "orders": 2}),
            Mode::Critic => json!({"probability_a": prob, "critic": true}),
        };
        log.append(vec![record(round, "judge", &by, p, prob, detail)])?;
    }
    Ok(
        json!({"judge": {"endpoint": spec.url, "model": judge.model(), "api": format!("{:?}", spec.config.api).to_lowercase(),
        "mode": format!("{:?}", spec.config.mode).to_lowercase(), "critic_template": spec.config.critic_template,
        "rubric": spec.config.rubric, "pairwise_template": spec.config.pairwise_template, "undecided_verdicts": judge.undecided()}}),
    )
}

/// `f`, tried `1 + retries` times with a short pause between attempts.
fn retry<T>(retries: usize, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 0;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if attempt >= retries => {
                return Err(e.context(format!("after {} attempts", attempt + 1)))
            }
            Err(_) => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(200 * attempt as u64));
            }
        }
    }
}

/// The sandbox's annotators (the default panel, seeded per round) on the pairs `all`; their choices follow the
/// hidden gold reward of `gold_file` (written next to the round's prompts).
pub fn by_sandbox(
    gold_file: &Path,
    seed: u64,
    round: usize,
    cands: &[Candidates],
    all: &[Pair],
    log: &mut LabelLog,
) -> Result<LabelInfo> {
    let golds: Vec<Gold> = crate::store::read_jsonl(gold_file)?;
    let prompts: Vec<Prompt> = cands
        .iter()
        .zip(golds)
        .map(|(c, gold)| Prompt {
            text: c.prompt().to_string(),
            gold,
        })
        .collect();
    let shown: Vec<(&Prompt, String, String)> = all
        .iter()
        .map(|p| {
            (
                &prompts[p.prompt_index],
                cands[p.prompt_index].candidates[p.a].text.clone(),
                cands[p.prompt_index].candidates[p.b].text.clone(),
            )
        })
        .collect();
    let panel = Panel::default_mix(seed.wrapping_add(round as u64));
    let session = pairwise(&panel, &shown);
    let mut labels = Vec::with_capacity(session.labels.len());
    for l in &session.labels {
        let p = &all[(l.item_id - 1) as usize];
        let name = &panel.annotators[(l.user_id - 1) as usize].name;
        let rlhf_feedback::model::LabelValue::Pairwise {
            choice, preferred, ..
        } = &l.value
        else {
            continue;
        };
        let p_a = match preferred {
            Some(0) => 1.0,
            Some(_) => 0.0,
            None => 0.5,
        };
        labels.push(record(
            round,
            "sandbox",
            &format!("sandbox:{name}"),
            p,
            p_a,
            json!({"choice": choice, "duration_ms": l.duration_ms, "session_label_id": l.id}),
        ));
    }
    log.append(labels)?;
    let annotators: Vec<Value> = panel
        .annotators
        .iter()
        .map(|a| json!({"name": a.name, "bias": a.bias.describe(), "temperature": a.temperature}))
        .collect();
    Ok(json!({"panel": annotators, "overlap": panel.overlap, "stats": session.stats()}))
}

/// How often decisive labels (P(a ≻ b) ≠ ½) agree with the hidden gold reward, on pairs whose gold rewards differ:
/// overall and per labeller.
pub fn gold_agreement(
    gold_file: &Path,
    cands: &[Candidates],
    labels: &[LabelRecord],
) -> Result<Value> {
    let golds: Vec<Gold> = crate::store::read_jsonl(gold_file)?;
    let mut per: std::collections::BTreeMap<&str, [usize; 2]> = Default::default();
    for l in labels
        .iter()
        .filter(|l| l.kind == "pairwise" && l.p_a != 0.5)
    {
        let (c, g) = (&cands[l.prompt_index], &golds[l.prompt_index]);
        let (ga, gb) = (
            gold_reward(g, &c.candidates[l.a].text),
            gold_reward(g, &c.candidates[l.b].text),
        );
        if ga != gb {
            let e = per.entry(&l.by).or_default();
            e[0] += usize::from((l.p_a > 0.5) == (ga > gb));
            e[1] += 1;
        }
    }
    let (agree, compared) = per.values().fold((0, 0), |(a, n), v| (a + v[0], n + v[1]));
    let rate = |a: usize, n: usize| {
        if n == 0 {
            Value::Null
        } else {
            json!(a as f64 / n as f64)
        }
    };
    Ok(
        json!({"agree": agree, "compared": compared, "rate": rate(agree, compared),
        "by_labeller": per.iter().map(|(k, v)| (k.to_string(), json!({"agree": v[0], "compared": v[1], "rate": rate(v[0], v[1])}))).collect::<Map<_, _>>()}),
    )
}
