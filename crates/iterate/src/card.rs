//! The model card of a round (`MODEL_CARD.md` for people, `model_card.json` for programs): where the data came
//! from, how many labels of each kind by whom, the annotators' agreement and bias flags (the feedback app's
//! quality statistics), the judge and its rubric, the training configuration, rewards and KL, and the label ids
//! behind every training row (`training_rows.jsonl`), so the model traces back to who labelled what and when.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};

use crate::config::IterateArgs;
use crate::read_json;
use crate::store::{read_jsonl, write_atomic, write_json, LabelLog};

pub fn write(args: &IterateArgs, k: usize, start: &Path, rd: &Path) -> Result<()> {
    let log = LabelLog::open(&rd.join("labels.jsonl"))?;
    let info = read_json(&rd.join("label_info.json"))?;
    let train = read_json(&rd.join("train_summary.json"))?;
    let metrics = read_json(&rd.join("metrics.json"))?;
    let rows: Vec<Value> = read_jsonl(&rd.join("training_rows.jsonl"))?;

    let mut per_labeller: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
    let (mut by_kind, mut rows_by_kind) = (
        BTreeMap::<&str, usize>::new(),
        BTreeMap::<String, usize>::new(),
    );
    for l in &log.labels {
        *by_kind.entry(&l.kind).or_default() += 1;
    }
    for r in &rows {
        *rows_by_kind
            .entry(r["kind"].as_str().unwrap_or("pairwise").to_string())
            .or_default() += 1;
    }
    for l in log.labels.iter().filter(|l| l.kind == "pairwise") {
        let e = per_labeller.entry(&l.by).or_default();
        e[if l.p_a > 0.5 {
            0
        } else if l.p_a < 0.5 {
            1
        } else {
            2
        }] += 1;
    }
    let (first, last) = (
        log.labels.iter().map(|l| l.at_ms).min(),
        log.labels.iter().map(|l| l.at_ms).max(),
    );
    let card = json!({
        "round": k,
        "model": rd.join("model"),
        "start_policy": start,
        "data_sources": {
            "prompts": if args.world_prompts() { json!("sandbox world (seeded)") } else { json!(args.prompts) },
            "round_prompts": rd.join("prompts.jsonl"),
            "candidates": rd.join("candidates.jsonl"),
            "candidates_per_prompt": args.candidates,
            "label_source": args.labels,
        },
        "labels": {
            "file": rd.join("labels.jsonl"),
            "total": log.labels.len(),
            "by_kind": by_kind,
            "per_labeller": per_labeller.iter().map(|(k, v)| (k.to_string(), json!({"prefers_a": v[0], "prefers_b": v[1], "undecided": v[2]}))).collect::<serde_json::Map<_, _>>(),
            "first_at_ms": first, "last_at_ms": last,
        },
        "labellers": info,
        "training": {"algorithm": train["summary"]["algorithm"], "rows": rows.len(), "rows_by_kind": rows_by_kind, "rows_file": rd.join("training_rows.jsonl"),
            "summary": train["summary"], "config": train["config"]},
        "evaluation": metrics["eval"],
    });
    write_json(&rd.join("model_card.json"), &card)?;
    write_atomic(&rd.join("MODEL_CARD.md"), markdown(&card, &rows).as_bytes())
}

/// Text safe inside a Markdown table cell (labeller names may be shell commands with pipes).
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn markdown(c: &Value, rows: &[Value]) -> String {
    let mut s = String::new();
    let v = |x: &Value| match x {
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        Value::Number(n) => n.as_f64().map_or(n.to_string(), |f| {
            if f.fract() == 0.0 {
                format!("{f}")
            } else {
                format!("{f:.4}")
            }
        }),
        other => other.to_string(),
    };
    let _ = writeln!(s, "# Model card: round {}\n", c["round"]);
    let _ = writeln!(
        s,
        "Model `{}`, trained from `{}`.\n",
        v(&c["model"]),
        v(&c["start_policy"])
    );
    let _ = writeln!(s, "## Data\n");
    let d = &c["data_sources"];
    let _ = writeln!(
        s,
        "- prompts: {} (this round: `{}`)",
        v(&d["prompts"]),
        v(&d["round_prompts"])
    );
    let _ = writeln!(
        s,
        "- candidates: {} per prompt from the starting policy (`{}`)",
        v(&d["candidates_per_prompt"]),
        v(&d["candidates"])
    );
    let _ = writeln!(s, "- label source: `{}`\n", v(&d["label_source"]));
    let l = &c["labels"];
    let _ = writeln!(
        s,
        "## Labels\n\n{} labels in `{}`.\n",
        v(&l["total"]),
        v(&l["file"])
    );
    let rows_by_kind = &c["training"]["rows_by_kind"];
    let _ = writeln!(s, "| kind | labels | training rows |\n| --- | --- | --- |");
    for (kind, n) in l["by_kind"].as_object().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {kind} | {} | {} |",
            v(n),
            v(rows_by_kind.get(kind).unwrap_or(&json!(0)))
        );
    }
    let _ = writeln!(s, "\nPairwise labels per labeller:\n\n| labeller | prefers A | prefers B | undecided |\n| --- | --- | --- | --- |");
    for (who, n) in l["per_labeller"].as_object().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            cell(who),
            v(&n["prefers_a"]),
            v(&n["prefers_b"]),
            v(&n["undecided"])
        );
    }
    let info = &c["labellers"];
    if let Some(g) = info.get("agreement_with_gold") {
        let _ = writeln!(s, "\nAgreement with the sandbox's hidden gold reward: {} of {} decisive labels on pairs gold separates ({}).",
            v(&g["agree"]), v(&g["compared"]), v(&g["rate"]));
        for (who, a) in g["by_labeller"].as_object().into_iter().flatten() {
            let _ = writeln!(s, "- {who}: {} of {}", v(&a["agree"]), v(&a["compared"]));
        }
    }
    if let Some(stats) = info.get("stats") {
        let _ = writeln!(
            s,
            "\n### Annotators (agreement and flags from the feedback app's quality statistics)\n"
        );
        let _ = writeln!(s, "| annotator | labels | left share | gold accuracy | reliability | flags |\n| --- | --- | --- | --- | --- | --- |");
        for a in stats["annotators"].as_array().into_iter().flatten() {
            let flags: Vec<String> = a["flags"].as_array().into_iter().flatten().map(v).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                v(&a["username"]),
                v(&a["labels"]),
                v(&a["left_share"]),
                v(&a["gold_accuracy"]),
                v(&a["reliability"]),
                if flags.is_empty() {
                    "none".into()
                } else {
                    flags.join("; ")
                }
            );
        }
        for ag in stats["agreement"].as_array().into_iter().flatten() {
            let _ = writeln!(s, "\nAgreement: `{ag}`");
        }
    }
    if let Some(j) = info.get("judge").filter(|j| j["mode"] == "critic") {
        let _ = writeln!(s, "\n### Judge\n\nA trained critic, `{}` at {} ({} API): it critiques each response on its own and ends with a verdict \
            line `Score: N`; the higher score wins a pair. Its input:\n\n```text\n{}\n```", v(&j["model"]), v(&j["endpoint"]), v(&j["api"]), v(&j["critic_template"]));
    } else if let Some(j) = info.get("judge") {
        let _ = writeln!(s, "\n### Judge\n\n`{}` at {} ({} API), both presentation orders averaged; {} undecided verdicts. Rubric:\n",
            v(&j["model"]), v(&j["endpoint"]), v(&j["api"]), v(&j["undecided_verdicts"]));
        for line in j["rubric"].as_str().unwrap_or_default().lines() {
            let _ = writeln!(s, "> {line}");
        }
    }
    if let Some(f) = info.get("feedback") {
        let _ = writeln!(s, "\n### Feedback app\n\nProject {} at {}: {} items pushed, overlap {}, {} short of overlap (deadline passed: {}).",
            v(&f["project"]), v(&f["url"]), v(&f["items_pushed"]), v(&f["overlap"]), v(&f["items_short_of_overlap"]), v(&f["deadline_passed"]));
    }
    if let Some(r) = info.get("reward") {
        let _ = writeln!(s, "\n### Reward\n\nPairs ordered by `{}`.", v(r));
    }
    let t = &c["training"];
    let _ = writeln!(
        s,
        "\n## Training\n\n{}: {} rows (`{}`), {} steps.",
        v(&t["algorithm"]),
        v(&t["rows"]),
        v(&t["rows_file"]),
        v(&t["summary"]["steps"])
    );
    let _ = writeln!(
        s,
        "\nResult:\n\n```json\n{}\n```",
        serde_json::to_string_pretty(&t["summary"]).unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "\nConfiguration:\n\n```json\n{}\n```",
        serde_json::to_string_pretty(&t["config"]).unwrap_or_default()
    );
    let _ = writeln!(s, "\n## Evaluation\n");
    let e = &c["evaluation"];
    if e.is_null() {
        let _ = writeln!(
            s,
            "Not evaluated (no held-out prompts or evaluation reward configured)."
        );
    } else {
        let _ = writeln!(
            s,
            "{} held-out prompts. KL(trained ‖ start) per sequence: {}.\n",
            v(&e["prompts"]),
            v(&e["trained"]["kl_to_start"]["mean"])
        );
        let _ = writeln!(
            s,
            "| reward | start | trained | 95 % CI (trained) |\n| --- | --- | --- | --- |"
        );
        for (src, r) in e["trained"]["rewards"].as_object().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {src} | {} | {} | [{}, {}] |",
                v(&e["start"]["rewards"][src]["mean"]),
                v(&r["mean"]),
                v(&r["ci_low"]),
                v(&r["ci_high"])
            );
        }
    }
    let _ = writeln!(s, "\n## Provenance of the training rows\n\n| row | kind | item | label ids |\n| --- | --- | --- | --- |");
    for r in rows {
        let ids: Vec<String> = r["label_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .map(v)
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            v(&r["row"]),
            v(&r["kind"]),
            v(&r["item"]),
            cell(&ids.join(", "))
        );
    }
    s
}
