//! `rlhf transform …` on the sandbox's simulated critiques and demonstrations with the fixture tiny Llama as
//! the policy: rows written with their provenance, accepted by the trainers' loaders unchanged, and bad input
//! reported with file:line: field.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rlhf_data::{load_dataset, Format, SftConfig, Tokenizer};
use rlhf_feedback::export::Format as Export;
use rlhf_sandbox::annotators::{critiques, demonstrations, Panel};
use rlhf_sandbox::source::write_rows;
use rlhf_sandbox::world::{generate, Mix, Prompt};
use rlhf_train::feedback_data::{
    critic_sft, demo_pairs, revise, CriticArgs, DemoPairsArgs, ReviseArgs, SampleArgs,
    CRITIC_TEMPLATE, REVISION_TEMPLATE,
};
use rlhf_train::pref_config::PrefConfig;
use rlhf_train::rm::{load_rm_data, RmData};
use serde_json::Value;

fn policy() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models/llama"
    ))
}

fn sample_args() -> SampleArgs {
    SampleArgs {
        model: policy(),
        max_new_tokens: 8,
        temperature: 1.0,
        seed: 5,
        batch_size: 4,
    }
}

fn prompts() -> Vec<Prompt> {
    generate(16, &Mix::default(), 3, "t-")
}

/// The panel's critiques of noisy replies, as `rlhf feedback export --format critique` writes them.
fn critique_file(dir: &Path) -> PathBuf {
    let ps = prompts();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let rows: Vec<(&Prompt, String)> = ps.iter().map(|p| (p, p.noisy(&mut rng))).collect();
    let export = critiques(&Panel::default_mix(0), &rows)
        .export(Export::Critique)
        .unwrap();
    let path = dir.join("critiques.jsonl");
    write_rows(&path, &export).unwrap();
    path
}

fn read(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The reward-model trainer's own loader accepts the pairs (and DPO reads the same format).
fn rm_loads(path: &Path) -> usize {
    let tok = Tokenizer::from_dir(policy()).unwrap();
    let cfg = PrefConfig {
        max_length: 256,
        ..PrefConfig::new(
            policy(),
            path.into(),
            "unused".into(),
            &rlhf_train::TrainDefaults::RM,
        )
    };
    match load_rm_data(path, &tok, &cfg).unwrap() {
        RmData::Pairs(p) => p.len(),
        RmData::Ratings(_) => panic!("pairs expected"),
    }
}

#[test]
fn critiques_become_revision_pairs_and_critic_sft_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let input = critique_file(tmp.path());
    let critiques_in = read(&input);
    let good = critiques_in
        .iter()
        .filter(|r| r["critique"].as_str().unwrap().contains("nothing to fix"))
        .count();
    assert!(
        good < critiques_in.len(),
        "some replies have problems to fix"
    );

    let out = tmp.path().join("pairs.jsonl");
    let args = ReviseArgs {
        sample: sample_args(),
        critiques: input.clone(),
        out: out.clone(),
        template: REVISION_TEMPLATE.into(),
        skip_containing: vec!["nothing to fix".into()],
    };
    let s = revise(&args).unwrap();
    assert_eq!(s.input_rows, critiques_in.len());
    let pairs = read(&out);
    assert_eq!(pairs.len(), s.output_rows);
    assert!(s.output_rows > 0 && s.skipped >= good);
    for p in &pairs {
        let src = critiques_in
            .iter()
            .find(|c| c["label_ids"] == p["label_ids"])
            .expect("provenance kept");
        assert_eq!(p["prompt"], src["prompt"]);
        assert_eq!(
            p["rejected"], src["completion"],
            "the original is the rejected side"
        );
        assert_ne!(
            p["chosen"].as_str().unwrap().trim(),
            p["rejected"].as_str().unwrap().trim()
        );
        assert!(!p["critique"].as_str().unwrap().contains("nothing to fix"));
        assert_eq!(p["source"], "critique-revision");
    }
    let ds = load_dataset(&out).unwrap();
    assert_eq!(ds.format, Format::Preference);
    assert_eq!(rm_loads(&out), pairs.len());
    // Seeded sampling: the same command writes the same file.
    let again = tmp.path().join("again.jsonl");
    revise(&ReviseArgs {
        out: again.clone(),
        ..args
    })
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());

    let critic = tmp.path().join("critic.jsonl");
    let s = critic_sft(&CriticArgs {
        score_column: None,
        critiques: input,
        out: critic.clone(),
        template: CRITIC_TEMPLATE.into(),
    })
    .unwrap();
    assert_eq!(
        (s.input_rows, s.output_rows),
        (critiques_in.len(), critiques_in.len())
    );
    for (row, src) in read(&critic).iter().zip(&critiques_in) {
        let prompt = format!(
            "{}\nResponse:{}\nCritique:",
            src["prompt"].as_str().unwrap(),
            src["completion"].as_str().unwrap()
        );
        assert_eq!(row["prompt"], prompt.as_str());
        assert_eq!(
            row["completion"].as_str().unwrap(),
            format!(" {}", src["critique"].as_str().unwrap())
        );
        assert!(row.get("critique").is_none() && row["item_id"] == src["item_id"]);
    }
    let ds = load_dataset(&critic).unwrap();
    assert_eq!(ds.format, Format::PromptCompletion);
    let sft = rlhf_data::tokenize_sft(
        &ds,
        &Tokenizer::from_dir(policy()).unwrap(),
        &SftConfig::default(),
    )
    .unwrap();
    assert_eq!(sft.rows.len(), critiques_in.len());
}

#[test]
fn demonstrations_beat_policy_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let ps = prompts();
    let refs: Vec<&Prompt> = ps.iter().collect();
    let input = tmp.path().join("demos.jsonl");
    write_rows(
        &input,
        &demonstrations(&Panel::default_mix(0), &refs)
            .export(Export::Demonstration)
            .unwrap(),
    )
    .unwrap();
    let out = tmp.path().join("pairs.jsonl");
    let s = demo_pairs(&DemoPairsArgs {
        sample: sample_args(),
        demonstrations: input,
        out: out.clone(),
    })
    .unwrap();
    assert_eq!(s.input_rows, ps.len());
    let pairs = read(&out);
    assert_eq!(pairs.len(), s.output_rows);
    assert!(!pairs.is_empty());
    for p in &pairs {
        let prompt = ps
            .iter()
            .find(|x| x.text == p["prompt"].as_str().unwrap())
            .unwrap();
        assert_eq!(p["chosen"].as_str().unwrap(), prompt.ideal());
        assert_eq!(p["source"], "demonstration-vs-policy");
        assert!(p["label_ids"].is_array());
    }
    assert_eq!(rm_loads(&out), pairs.len());
}

#[test]
fn bad_rows_name_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    let out = tmp.path().join("out.jsonl");
    let critic = |path: &Path| {
        critic_sft(&CriticArgs {
            score_column: None,
            critiques: path.into(),
            out: out.clone(),
            template: CRITIC_TEMPLATE.into(),
        })
    };

    std::fs::write(&bad, "{\"prompt\": \"a\", \"completion\": \" b\", \"critique\": \"c\"}\n{\"prompt\": \"a\", \"completion\": \" b\"}\n").unwrap();
    let e = critic(&bad).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "{}:2: field \"critique\": missing or not a string",
            bad.display()
        )),
        "{e}"
    );

    std::fs::write(&bad, "{\"prompt\": \"a\", \"completion\": \" b\", \"critique\": \"c\"}\n{\"prompt\": \"a\", \"completion\": \" b\", \"critique\": 3}\n").unwrap();
    let e = critic(&bad).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{}:2: field \"critique\"", bad.display())),
        "{e}"
    );

    std::fs::write(&bad, "{\"prompt\": \"a\", \"completion\": \" b\", \"critique\": \"c\"}\n{\"prompt\": \"a\", \"completion\": \" b\", \"critique\": \"c\"}\n{not json\n").unwrap();
    let e = critic(&bad).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{}:3", bad.display())) && e.contains("invalid JSON"),
        "{e}"
    );

    // A preference file is not a demonstration export.
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"chosen\": \" b\", \"rejected\": \" c\"}\n",
    )
    .unwrap();
    let e = demo_pairs(&DemoPairsArgs {
        sample: sample_args(),
        demonstrations: bad.clone(),
        out: out.clone(),
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("expected prompt/completion rows"), "{e}");
    assert!(!out.exists(), "nothing is written on bad input");
}
