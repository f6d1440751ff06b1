//! The train phase: the round's labels become DPO rows (with the label ids behind each), then DPO from the round's
//! starting policy, or a reward model retrained on every round's rows followed by GRPO against it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use rlhf_train::grpo::GrpoArgs;
use rlhf_train::pref_config::PrefConfig;
use rlhf_train::schedule::ScheduleKind;
use rlhf_train::TrainDefaults;
use serde_json::{json, Value};

use crate::config::{IterateArgs, Trainer};
use crate::kinds::{self, Kind};
use crate::label::Candidates;
use crate::round_dir;
use crate::store::{read_jsonl, write_json, write_jsonl, LabelLog, LabelRecord};

/// One DPO row per decided pair of the pairwise labels. As in the feedback app's export, an item most of whose
/// labels are undecided (ties, both bad) is left out; otherwise its labels' P(a ≻ b) are averaged and an exact ½
/// is left out too.
pub fn decisions(cands: &[Candidates], labels: &[LabelRecord]) -> (Vec<Value>, Vec<Value>) {
    let mut by_item: BTreeMap<(usize, usize, usize), Vec<&LabelRecord>> = BTreeMap::new();
    for l in labels.iter().filter(|l| l.kind == Kind::Pairwise.name()) {
        by_item
            .entry((l.prompt_index, l.a, l.b))
            .or_default()
            .push(l);
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
        let app_ids: Vec<Value> = ls
            .iter()
            .filter_map(|l| l.detail.get("label_ids").cloned())
            .collect();
        rows.push(json!({"prompt": c.prompt(), "chosen": c.candidates[chosen].text, "rejected": c.candidates[rejected].text,
            "item": ls[0].item, "kind": "pairwise", "label_ids": label_ids}));
        provenance.push(json!({"row": rows.len() - 1, "kind": "pairwise", "item": ls[0].item, "label_ids": label_ids, "app_label_ids": app_ids,
            "p_chosen": p.max(1.0 - p), "labellers": ls.iter().map(|l| l.by.as_str()).collect::<Vec<_>>()}));
    }
    (rows, provenance)
}

/// The train phase of round `k`.
pub fn train(args: &IterateArgs, k: usize, start: &Path, rd: &Path) -> Result<()> {
    let cands: Vec<Candidates> = read_jsonl(&rd.join("candidates.jsonl"))?;
    let log = LabelLog::open(&rd.join("labels.jsonl"))?;
    let (mut rows, mut provenance) = decisions(&cands, &log.labels);
    let mut too_long = 0;
    for (row, mut prov) in kinds::rows(args, k, start, rd, &cands, &log.labels, &mut too_long)? {
        prov["row"] = json!(rows.len());
        rows.push(row);
        provenance.push(prov);
    }
    let (train_file, out) = (rd.join("train.jsonl"), rd.join("model"));
    write_jsonl(&train_file, &rows)?;
    write_jsonl(&rd.join("training_rows.jsonl"), &provenance)?;
    if rows.is_empty() {
        // Nothing decided: the policy carries over unchanged (the card says so).
        copy_model(start, &out)?;
        let summary = json!({"algorithm": "none", "steps": 0, "rows": 0, "critiques_too_long": too_long, "note": "no decided pair: the policy is the round's starting policy"});
        return write_json(
            &rd.join("train_summary.json"),
            &json!({"summary": summary, "config": Value::Null}),
        );
    }
    let (mut summary, config) = match args.trainer {
        Trainer::Dpo => {
            let cfg = dpo_config(args, start, &train_file, &out);
            let s = rlhf_train::dpo::run_dpo(&cfg)?;
            (
                json!({"algorithm": "dpo (reference = the round's starting policy)", "steps": s.steps, "rows": rows.len(),
                "final_loss": s.final_loss, "train_loss": s.train_loss, "final_metrics": s.final_metrics}),
                json!(cfg),
            )
        }
        Trainer::RmGrpo => rm_grpo(args, k, start, rd, rows.len())?,
    };
    summary["critiques_too_long"] = json!(too_long);
    write_json(
        &rd.join("train_summary.json"),
        &json!({"summary": summary, "config": config}),
    )
}

/// A reward model retrained from `model` on the decided pairs of rounds 1..=k, then GRPO against it from the
/// round's starting policy (the KL reference) on the round's prompts.
fn rm_grpo(
    args: &IterateArgs,
    k: usize,
    start: &Path,
    rd: &Path,
    rows: usize,
) -> Result<(Value, Value)> {
    let run = args.run_dir();
    let mut all = Vec::new();
    for j in 1..=k {
        all.extend(read_jsonl::<Value>(
            &round_dir(&run, j).join("train.jsonl"),
        )?);
    }
    let rm_train = rd.join("rm_train.jsonl");
    write_jsonl(&rm_train, &all)?;
    let mut rc = dpo_config(args, args.model(), &rm_train, &rd.join("rm"));
    rc.train.learning_rate = args.rm_learning_rate;
    rc.train.max_steps = Some(args.rm_steps);
    let r = rlhf_train::rm::run_rm(&rc)?;
    let out = rd.join("model");
    let flags: Vec<std::ffi::OsString> = [
        "--model",
        &start.display().to_string(),
        "--prompts",
        &rd.join("prompts.jsonl").display().to_string(),
        "--output-dir",
        &out.display().to_string(),
        "--reward",
        &format!("rm:{}", rd.join("rm").display()),
        "--max-steps",
        &args.grpo_steps.to_string(),
        "--prompts-per-step",
        &args.batch_size.to_string(),
        "--num-generations",
        &args.candidates.to_string(),
        "--beta",
        &args.grpo_beta.to_string(),
        "--learning-rate",
        &args.learning_rate.to_string(),
        "--lr-scheduler-type",
        "constant",
        "--max-new-tokens",
        &args.max_new_tokens.to_string(),
        "--temperature",
        &args.temperature.to_string(),
        "--max-prompt-length",
        &(args.max_length - args.max_new_tokens).to_string(),
        "--seed",
        &args.seed.to_string(),
        // A run killed while training redoes the phase from the start.
        "--overwrite-output-dir",
    ]
    .iter()
    .map(Into::into)
    .collect();
    let g = rlhf_train::settings::load::<GrpoArgs>("grpo", &flags)
        .map_err(rlhf_train::TrainError::from)?;
    let s = rlhf_train::grpo::run_grpo(&g)?;
    let summary = json!({"algorithm": "reward model (retrained on every round's pairs) then GRPO, KL to the round's starting policy",
        "rows": rows, "rm": {"pairs": all.len(), "steps": r.steps, "final_loss": r.final_loss, "final_metrics": r.final_metrics},
        "steps": s.steps, "final_metrics": s.final_metrics});
    Ok((summary, json!({"rm": rc, "grpo": g})))
}

/// The round's DPO settings: reference = the starting policy (DPO's default when no reference is named).
pub fn dpo_config(args: &IterateArgs, start: &Path, train_file: &Path, out: &Path) -> PrefConfig {
    let mut c = PrefConfig {
        max_length: args.max_length,
        batch_size: args.batch_size,
        ..PrefConfig::new(
            start.into(),
            train_file.into(),
            out.into(),
            &TrainDefaults::DPO,
        )
    };
    let t = &mut c.train;
    t.learning_rate = args.learning_rate;
    t.lr_scheduler_type = ScheduleKind::Constant;
    t.max_steps = Some(args.dpo_steps);
    t.logging_steps = 1;
    t.save_steps = 0;
    t.seed = args.seed;
    // A run killed while training redoes the phase from the start.
    t.overwrite_output_dir = true;
    c.dpo.params.beta = args.beta;
    c
}

fn copy_model(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("{}: cannot create", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("{}: cannot read", from.display()))? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))
                .with_context(|| format!("{}: cannot copy", e.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::label::Candidate;
    use serde_json::Map;

    fn label(item: (usize, usize, usize), by: &str, p_a: f64) -> LabelRecord {
        LabelRecord {
            id: format!("r1-p{}-{}-{}:{by}", item.0, item.1, item.2),
            round: 1,
            source: "sandbox".into(),
            kind: "pairwise".into(),
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
        let texts = |t: &[&str]| {
            t.iter()
                .map(|s| Candidate {
                    text: s.to_string(),
                    ids: vec![],
                    eos: true,
                })
                .collect()
        };
        let mut row = Map::new();
        row.insert("prompt".into(), json!("Q"));
        let cands = vec![Candidates {
            prompt_index: 0,
            row,
            prompt_ids: vec![1],
            candidates: texts(&["x", "y", "z"]),
        }];
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
        assert_eq!(
            (rows[0]["chosen"].as_str(), rows[0]["rejected"].as_str()),
            (Some("y"), Some("x"))
        );
        assert_eq!(
            (rows[1]["chosen"].as_str(), rows[1]["rejected"].as_str()),
            (Some("y"), Some("z"))
        );
        assert_eq!(
            prov[0]["label_ids"],
            json!(["r1-p0-0-1:u1", "r1-p0-0-1:u2", "r1-p0-0-1:u3"])
        );
        assert!((prov[0]["p_chosen"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(prov[1]["app_label_ids"], json!([[7]]));
    }
}
