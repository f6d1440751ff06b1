//! Mixed kinds of feedback in a round. Besides pairwise comparisons of the candidates, a round may ask for a
//! budget of ratings, corrections, critiques (of single candidates) and demonstrations (per prompt), collected
//! from the sandbox's simulated annotators, and turns each kind into preference rows with the feedback
//! transforms (docs/feedback-kinds.md):
//!
//! - ratings → pairs of a prompt's rated candidates ordered by their mean score (equal means give no row);
//! - correction → corrected ≻ original;
//! - demonstration → demonstration ≻ each of the prompt's policy samples (the round's candidates);
//! - critique → the starting policy's revision conditioned on the critique ≻ original (`rlhf transform revise`).
//!
//! Every row names the label ids behind it (`training_rows.jsonl`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rlhf_feedback::model::LabelValue;
use rlhf_sandbox::annotators::{corrections, critiques, demonstrations, ratings, Panel, Session};
use rlhf_sandbox::world::{Gold, Prompt};
use rlhf_train::feedback_data::{revise, ReviseArgs, SampleArgs, REVISION_TEMPLATE};
use serde_json::{json, Value};

use crate::config::IterateArgs;
use crate::label::{Candidates, LabelInfo, Pair};
use crate::store::{now_ms, read_jsonl, LabelLog, LabelRecord};

/// A kind of feedback a round can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pairwise,
    Rating,
    Correction,
    Demonstration,
    Critique,
}

impl Kind {
    /// The kinds asked about single candidates or prompts (everything but pairwise).
    pub const SINGLE: [Kind; 4] = [
        Kind::Rating,
        Kind::Correction,
        Kind::Demonstration,
        Kind::Critique,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Pairwise => "pairwise",
            Kind::Rating => "rating",
            Kind::Correction => "correction",
            Kind::Demonstration => "demonstration",
            Kind::Critique => "critique",
        }
    }

    /// The setting holding the kind's per-round budget.
    pub fn budget_key(self) -> &'static str {
        match self {
            Kind::Pairwise => "pairwise_budget",
            Kind::Rating => "rating_budget",
            Kind::Correction => "correction_budget",
            Kind::Demonstration => "demonstration_budget",
            Kind::Critique => "critique_budget",
        }
    }

    /// Keeps the kinds' seeded draws (items and annotators) apart.
    fn salt(self) -> u64 {
        self as u64 * 0x9E37_79B9
    }
}

/// A seeded order of `0..n` for `kind` in round `round`.
fn order(n: usize, seed: u64, round: usize, kind: Kind) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(
        seed ^ ((round as u64) << 40) ^ kind.salt(),
    ));
    idx
}

/// The round's pairs to compare: all of them, or `budget` of them drawn (seeded), in their original order.
pub fn choose_pairs(all: Vec<Pair>, budget: Option<usize>, seed: u64, round: usize) -> Vec<Pair> {
    let Some(budget) = budget.filter(|&b| b < all.len()) else {
        return all;
    };
    let mut keep = order(all.len(), seed, round, Kind::Pairwise);
    keep.truncate(budget);
    keep.sort_unstable();
    keep.into_iter().map(|i| all[i].clone()).collect()
}

/// The (prompt index, candidate) items of a single-response kind, at most `budget`. Ratings take whole prompts
/// (every candidate of a prompt, in a seeded order of prompts) since only candidates of the same prompt make a
/// pair; corrections and critiques take candidates in a seeded order; demonstrations take prompts (candidate 0).
pub fn choose_items(
    kind: Kind,
    budget: usize,
    seed: u64,
    round: usize,
    cands: &[Candidates],
) -> Vec<(usize, usize)> {
    let k = cands.first().map_or(0, |c| c.candidates.len());
    let mut items: Vec<(usize, usize)> = match kind {
        Kind::Rating => order(cands.len(), seed, round, kind)
            .into_iter()
            .flat_map(|i| (0..k).map(move |c| (i, c)))
            .collect(),
        Kind::Demonstration => order(cands.len(), seed, round, kind)
            .into_iter()
            .map(|i| (i, 0))
            .collect(),
        _ => order(cands.len() * k, seed, round, kind)
            .into_iter()
            .map(|j| (j / k, j % k))
            .collect(),
    };
    items.truncate(budget);
    items
}

/// The item id of a single-response label.
pub fn item_id(round: usize, kind: Kind, (prompt, candidate): (usize, usize)) -> String {
    match kind {
        Kind::Demonstration => format!("r{round}-p{prompt}-demonstration"),
        _ => format!("r{round}-p{prompt}-c{candidate}-{}", kind.name()),
    }
}

/// The sandbox's annotators answer `items` of `kind` (ratings by the panel's overlap, the other kinds by one
/// annotator each, as the app assigns them); their answers follow the hidden gold reward of `gold_file`.
pub fn by_sandbox(
    kind: Kind,
    items: &[(usize, usize)],
    gold_file: &Path,
    seed: u64,
    round: usize,
    cands: &[Candidates],
    log: &mut LabelLog,
) -> Result<LabelInfo> {
    let golds: Vec<Gold> = read_jsonl(gold_file)?;
    let prompts: Vec<Prompt> = cands
        .iter()
        .zip(golds)
        .map(|(c, gold)| Prompt {
            text: c.prompt().to_string(),
            gold,
        })
        .collect();
    let shown: Vec<(&Prompt, String)> = items
        .iter()
        .map(|&(i, c)| (&prompts[i], cands[i].candidates[c].text.clone()))
        .collect();
    let panel = Panel::default_mix(seed.wrapping_add(round as u64) ^ kind.salt());
    let session: Session = match kind {
        Kind::Rating => ratings(&panel, &shown),
        Kind::Correction => corrections(&panel, &shown),
        Kind::Critique => critiques(&panel, &shown),
        Kind::Demonstration => {
            demonstrations(&panel, &shown.iter().map(|(p, _)| *p).collect::<Vec<_>>())
        }
        Kind::Pairwise => unreachable!("pairwise labels come from label::by_sandbox"),
    };
    let mut labels = Vec::with_capacity(session.labels.len());
    for l in &session.labels {
        let (i, c) = items[(l.item_id - 1) as usize];
        let by = format!(
            "sandbox:{}",
            panel.annotators[(l.user_id - 1) as usize].name
        );
        let answer = match &l.value {
            LabelValue::Rating { scores } => {
                json!({"score": scores.get("overall"), "scale": [1, session.project.likert_max]})
            }
            LabelValue::Correction { corrected, .. } => json!({"corrected": corrected}),
            LabelValue::Critique { text } | LabelValue::Demonstration { text } => {
                json!({"text": text})
            }
            other => anyhow::bail!(
                "the sandbox answered a {} item with a {} label",
                kind.name(),
                other.kind()
            ),
        };
        let item = item_id(round, kind, (i, c));
        let mut detail = json!({"duration_ms": l.duration_ms, "session_label_id": l.id});
        detail
            .as_object_mut()
            .expect("an object")
            .extend(answer.as_object().expect("an object").clone());
        labels.push(LabelRecord {
            id: format!("{item}:{by}"),
            round,
            source: "sandbox".into(),
            kind: kind.name().into(),
            by,
            item,
            prompt_index: i,
            a: c,
            b: c,
            p_a: 0.5,
            detail,
            at_ms: now_ms(),
        });
    }
    log.append(labels)?;
    Ok(json!({"items": items.len(), "answered": session.labels.len()}))
}

/// A preference row of a derived kind and its provenance line.
fn row(
    kind: Kind,
    item: String,
    prompt: &str,
    chosen: &str,
    rejected: &str,
    label_ids: Vec<&str>,
) -> (Value, Value) {
    (
        json!({"prompt": prompt, "chosen": chosen, "rejected": rejected, "item": item, "kind": kind.name(), "label_ids": label_ids}),
        json!({"kind": kind.name(), "item": item, "label_ids": label_ids}),
    )
}

fn same(a: &str, b: &str) -> bool {
    a.trim() == b.trim()
}

/// Preference rows (with provenance) from the round's rating, correction, demonstration and critique labels.
/// Critiques are revised by `policy` (seeded), through `rd/critiques.jsonl` and `rd/revisions.jsonl`; those whose
/// revision request would not fit the policy's context are counted in `too_long`.
pub fn rows(
    args: &IterateArgs,
    round: usize,
    policy: &Path,
    rd: &Path,
    cands: &[Candidates],
    labels: &[LabelRecord],
    too_long: &mut usize,
) -> Result<Vec<(Value, Value)>> {
    let of = |kind: Kind| labels.iter().filter(move |l| l.kind == kind.name());
    let text = |l: &LabelRecord, key: &str| {
        l.detail[key]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("label {}: no {key:?} in its detail", l.id))
    };
    let mut out = Vec::new();

    // Ratings: the mean score of each rated candidate, then every pair of a prompt's candidates by mean.
    let mut rated: BTreeMap<usize, BTreeMap<usize, Vec<&LabelRecord>>> = BTreeMap::new();
    for l in of(Kind::Rating) {
        rated
            .entry(l.prompt_index)
            .or_default()
            .entry(l.a)
            .or_default()
            .push(l);
    }
    for (i, by_cand) in &rated {
        let mean = |ls: &[&LabelRecord]| {
            ls.iter()
                .map(|l| l.detail["score"].as_f64().unwrap_or(0.0))
                .sum::<f64>()
                / ls.len() as f64
        };
        let scored: Vec<(usize, f64, &Vec<&LabelRecord>)> =
            by_cand.iter().map(|(c, ls)| (*c, mean(ls), ls)).collect();
        for (x, &(a, ma, la)) in scored.iter().enumerate() {
            for &(b, mb, lb) in &scored[x + 1..] {
                let (ta, tb) = (&cands[*i].candidates[a].text, &cands[*i].candidates[b].text);
                if ma == mb || same(ta, tb) {
                    continue;
                }
                let (chosen, rejected) = if ma > mb { (ta, tb) } else { (tb, ta) };
                let ids = la.iter().chain(lb.iter()).map(|l| l.id.as_str()).collect();
                out.push(row(
                    Kind::Rating,
                    format!("r{round}-p{i}-{a}-{b}-ratings"),
                    cands[*i].prompt(),
                    chosen,
                    rejected,
                    ids,
                ));
            }
        }
    }
    for l in of(Kind::Correction) {
        let (c, corrected) = (&cands[l.prompt_index], text(l, "corrected")?);
        if !same(&corrected, &c.candidates[l.a].text) {
            out.push(row(
                Kind::Correction,
                l.item.clone(),
                c.prompt(),
                &corrected,
                &c.candidates[l.a].text,
                vec![l.id.as_str()],
            ));
        }
    }
    for l in of(Kind::Demonstration) {
        let (c, demo) = (&cands[l.prompt_index], text(l, "text")?);
        for (j, sample) in c
            .candidates
            .iter()
            .enumerate()
            .filter(|(_, s)| !same(&s.text, &demo))
        {
            out.push(row(
                Kind::Demonstration,
                format!("{}-{j}", l.item),
                c.prompt(),
                &demo,
                &sample.text,
                vec![l.id.as_str()],
            ));
        }
    }
    let mut crits: Vec<&LabelRecord> = of(Kind::Critique).collect();
    if !crits.is_empty() {
        // A revision request longer than the policy's context could not be answered: such critiques ask for
        // none (counted in the train summary) instead of stopping the round.
        let tok = rlhf_data::Tokenizer::from_dir(policy)?;
        let positions = rlhf_model::ModelConfig::from_file(&policy.join("config.json"))?
            .max_position_embeddings();
        let request = |l: &LabelRecord| -> Result<String> {
            let c = &cands[l.prompt_index];
            Ok(REVISION_TEMPLATE
                .replace("{prompt}", c.prompt())
                .replace("{response}", &c.candidates[l.a].text)
                .replace("{critique}", &text(l, "text")?))
        };
        let mut kept = Vec::with_capacity(crits.len());
        for l in crits {
            if tok.encode(&request(l)?, true)?.len() + args.max_new_tokens <= positions {
                kept.push(l);
            } else {
                *too_long += 1;
            }
        }
        crits = kept;
    }
    if !crits.is_empty() {
        let input = rd.join("critiques.jsonl");
        let lines = crits
            .iter()
            .map(|l| {
                let c = &cands[l.prompt_index];
                Ok(json!({"prompt": c.prompt(), "completion": c.candidates[l.a].text, "critique": text(l, "text")?, "item": l.item, "label_ids": [l.id]}))
            })
            .collect::<Result<Vec<Value>>>()?;
        crate::store::write_jsonl(&input, &lines)?;
        let out_file = rd.join("revisions.jsonl");
        let sample = SampleArgs {
            model: policy.to_path_buf(),
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature as f32,
            seed: args.seed.wrapping_mul(1_000_003).wrapping_add(round as u64),
            batch_size: 32,
        };
        revise(&ReviseArgs {
            sample,
            critiques: input,
            out: out_file.clone(),
            template: REVISION_TEMPLATE.into(),
            skip_containing: args.critique_skip_containing.clone(),
        })?;
        for r in read_jsonl::<Value>(&out_file)? {
            let ids: Vec<&str> = r["label_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let s = |k: &str| r[k].as_str().unwrap_or_default();
            out.push(row(
                Kind::Critique,
                s("item").to_string(),
                s("prompt"),
                s("chosen"),
                s("rejected"),
                ids,
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::label::{pairs, Candidate};
    use serde_json::Map;

    fn cands(n: usize, k: usize) -> Vec<Candidates> {
        (0..n)
            .map(|i| {
                let mut row = Map::new();
                row.insert("prompt".into(), json!(format!("Q{i}")));
                let candidates = (0..k)
                    .map(|c| Candidate {
                        text: format!("a{i}-{c}"),
                        ids: vec![],
                        eos: true,
                    })
                    .collect();
                Candidates {
                    prompt_index: i,
                    row,
                    prompt_ids: vec![1],
                    candidates,
                }
            })
            .collect()
    }

    #[test]
    fn budgets_pick_seeded_items_of_each_kind() {
        let c = cands(5, 3);
        let all = pairs(1, &c);
        assert_eq!(choose_pairs(all.clone(), None, 0, 1), all);
        let some = choose_pairs(all.clone(), Some(4), 0, 1);
        assert_eq!(some.len(), 4);
        assert!(
            some.windows(2)
                .all(|w| all.iter().position(|p| p == &w[0]) < all.iter().position(|p| p == &w[1])),
            "kept in order"
        );
        assert_eq!(some, choose_pairs(all.clone(), Some(4), 0, 1), "seeded");
        assert_ne!(
            some,
            choose_pairs(all, Some(4), 0, 2),
            "another round draws others"
        );
        // Ratings: whole prompts first (3 candidates each), so 7 = two prompts and one candidate of a third.
        let r = choose_items(Kind::Rating, 7, 0, 1, &c);
        assert_eq!(r.len(), 7);
        assert!(
            r[..3].iter().all(|&(i, _)| i == r[0].0) && r[3..6].iter().all(|&(i, _)| i == r[3].0)
        );
        assert_eq!(
            r[..3].iter().map(|&(_, c)| c).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        let d = choose_items(Kind::Demonstration, 9, 0, 1, &c);
        assert_eq!(d.len(), 5, "one demonstration per prompt at most");
        let x = choose_items(Kind::Correction, 15, 0, 1, &c);
        let mut sorted = x.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..5)
                .flat_map(|i| (0..3).map(move |j| (i, j)))
                .collect::<Vec<_>>(),
            "every candidate once"
        );
        assert_eq!(item_id(2, Kind::Critique, (3, 1)), "r2-p3-c1-critique");
        assert_eq!(
            item_id(2, Kind::Demonstration, (3, 0)),
            "r2-p3-demonstration"
        );
    }
}
