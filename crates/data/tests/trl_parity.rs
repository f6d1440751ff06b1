//! Tokenized datasets and collated batches identical to TRL 1.16's (`fixtures/reference/*.json`, recorded from
//! the real `SFTTrainer`, `DPOTrainer` and `RewardTrainer` on `fixtures/tokenizer`).

use std::path::PathBuf;

use rlhf_data::{
    collate, collate_preference, tokenize_preferences, tokenize_sft, Dataset, LoadOptions,
    Position, SftConfig, Tokenizer, Truncation, IGNORE,
};
use serde_json::{Map, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference").join(name)).unwrap())
        .unwrap()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(fixtures().join("tokenizer")).unwrap()
}

fn ints<T: TryFrom<i64>>(v: &Value) -> Vec<T>
where
    T::Error: std::fmt::Debug,
{
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| T::try_from(x.as_i64().unwrap()).unwrap())
        .collect()
}

/// A 2-D JSON array flattened row-major.
fn flat<T: TryFrom<i64>>(v: &Value) -> Vec<T>
where
    T::Error: std::fmt::Debug,
{
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|row| ints::<T>(row))
        .collect()
}

fn dataset(rows: &Value) -> Dataset {
    let objects: Vec<(Position, Map<String, Value>)> = rows
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, r)| (Position::Line(i + 1), r.as_object().unwrap().clone()))
        .collect();
    Dataset::from_objects("<reference>", objects, &LoadOptions::default()).unwrap()
}

#[test]
fn sft_tokenization_matches_trl() {
    let r = reference("sft_tokenize.json");
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg = &case["sft_config"];
        assert_eq!(cfg["packing"], Value::Bool(false));
        assert_eq!(cfg["truncation_mode"], "keep_start");
        let config = SftConfig {
            max_length: cfg["max_length"].as_u64().map(|m| m as usize),
            truncation: Truncation::KeepStart,
            completion_only_loss: cfg["completion_only_loss"].as_bool().unwrap_or(true),
            assistant_only_loss: cfg["assistant_only_loss"].as_bool().unwrap(),
            packing: None,
            chat_template: None,
        };
        let mut tok = tokenizer();
        tok.set_chat_template(case["chat_template"].as_str().unwrap(), name)
            .unwrap();
        let data = tokenize_sft(&dataset(&case["input"]), &tok, &config)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = case["dataset"].as_array().unwrap();
        assert_eq!(data.rows.len(), want.len(), "{name}");
        assert_eq!(
            data.dropped,
            case["input"].as_array().unwrap().len() - want.len(),
            "{name}"
        );
        for (i, (got, want)) in data.rows.iter().zip(want).enumerate() {
            assert_eq!(
                got.input_ids,
                ints::<u32>(&want["input_ids"]),
                "{name}[{i}] input_ids"
            );
            assert_eq!(
                got.labels,
                ints::<i64>(&want["labels"]),
                "{name}[{i}] labels"
            );
        }
        let refs: Vec<_> = data.rows.iter().collect();
        let batch = collate(&refs, tok.pad_id().unwrap(), None);
        let c = &case["collated"];
        assert_eq!(
            batch.input_ids,
            flat::<u32>(&c["input_ids"]),
            "{name} collated input_ids"
        );
        assert_eq!(
            batch.labels,
            flat::<i64>(&c["labels"]),
            "{name} collated labels"
        );
        assert_eq!(
            batch.attention_mask,
            flat::<u8>(&c["attention_mask"]),
            "{name} collated attention_mask"
        );
    }
}

#[test]
fn sft_step_batch_and_loss_token_count() {
    let r = reference("sft_step.json");
    let tok = tokenizer();
    let data = tokenize_sft(&dataset(&r["examples"]), &tok, &SftConfig::default()).unwrap();
    let refs: Vec<_> = data.rows.iter().collect();
    let b = collate(&refs, tok.pad_id().unwrap(), None);
    assert_eq!((b.batch_size, b.seq_len), (4, 19));
    assert_eq!(b.input_ids, flat::<u32>(&r["batch"]["input_ids"]));
    assert_eq!(b.labels, flat::<i64>(&r["batch"]["labels"]));
    assert_eq!(b.attention_mask, flat::<u8>(&r["batch"]["attention_mask"]));
    assert_eq!(
        b.num_loss_tokens,
        r["num_loss_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(
        b.num_tokens,
        b.attention_mask.iter().map(|&m| m as usize).sum::<usize>()
    );
    // Shifted view: targets[t] = input_ids[t + 1], trained where labels[t + 1] != -100.
    for row in 0..4 {
        for t in 0..18 {
            let i = row * 19 + t;
            assert_eq!(b.targets[i], b.input_ids[i + 1]);
            assert_eq!(b.loss_mask[i] == 1.0, b.labels[i + 1] != IGNORE);
        }
        assert_eq!(b.loss_mask[row * 19 + 18], 0.0);
    }
}

#[test]
fn dpo_tokenization_and_batch_match_trl() {
    let r = reference("dpo_step.json");
    let tok = tokenizer();
    let pairs = tokenize_preferences(&dataset(&r["pairs"]), &tok, None).unwrap();
    for (got, want) in pairs.iter().zip(r["tokenized"].as_array().unwrap()) {
        assert_eq!(got.prompt_ids, ints::<u32>(&want["prompt_ids"]));
        assert_eq!(got.chosen_ids, ints::<u32>(&want["chosen_ids"]));
        assert_eq!(got.rejected_ids, ints::<u32>(&want["rejected_ids"]));
    }
    let refs: Vec<_> = pairs.iter().collect();
    let b = collate_preference(&refs, tok.pad_id().unwrap(), None, Truncation::KeepStart);
    assert_eq!(
        (b.num_pairs, b.tokens.batch_size, b.tokens.seq_len),
        (4, 8, 19)
    );
    assert_eq!(b.tokens.input_ids, flat::<u32>(&r["batch"]["input_ids"]));
    assert_eq!(
        b.tokens.attention_mask,
        flat::<u8>(&r["batch"]["attention_mask"])
    );
    let completion: Vec<u8> = b
        .tokens
        .labels
        .iter()
        .map(|&l| u8::from(l != IGNORE))
        .collect();
    assert_eq!(completion, flat::<u8>(&r["batch"]["completion_mask"]));
    assert_eq!(b.margins, None);
}

#[test]
fn reward_tokenization_and_batch_match_trl() {
    let r = reference("rm_step.json");
    let tok = tokenizer();
    let pairs = tokenize_preferences(&dataset(&r["pairs"]), &tok, None).unwrap();
    for (got, want) in pairs.iter().zip(r["tokenized"].as_array().unwrap()) {
        assert_eq!(got.chosen_sequence(), ints::<u32>(&want["chosen_ids"]));
        assert_eq!(got.rejected_sequence(), ints::<u32>(&want["rejected_ids"]));
        assert!(got.fits_reward(Some(19)) && !got.fits_reward(Some(5)));
    }
    let refs: Vec<_> = pairs.iter().collect();
    let b = collate_preference(&refs, tok.pad_id().unwrap(), None, Truncation::KeepStart);
    assert_eq!(b.tokens.input_ids, flat::<u32>(&r["batch"]["input_ids"]));
    assert_eq!(
        b.tokens.attention_mask,
        flat::<u8>(&r["batch"]["attention_mask"])
    );
}
