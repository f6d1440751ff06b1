//! Packing (against TRL's `pack_dataset`), padding-free labels, truncation, the resumable sampler, and
//! tokenization errors that name the row.

use std::path::PathBuf;

use rlhf_data::sft::pack;
use rlhf_data::{
    collate, collate_preference, load_dataset, tokenize_preferences, tokenize_sft, EpochSampler,
    Packing, PreferenceExample, SamplerState, SftConfig, TokenizedSequence, Tokenizer, Truncation,
    IGNORE,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(fixtures().join("tokenizer")).unwrap()
}

fn ids_of(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn packing_matches_trl_pack_dataset() {
    let text = std::fs::read_to_string("tests/data/packing_reference.json").unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    for case in r["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let seq_length = case["seq_length"].as_u64().unwrap() as usize;
        let strategy = match case["strategy"].as_str().unwrap() {
            "bfd" => Packing::Bfd,
            "wrapped" => Packing::Wrapped,
            s => panic!("{s}"),
        };
        // Same labels as the generator: every third token (by row + column) untrained.
        let rows: Vec<TokenizedSequence> = ids_of(&case["input_ids"])
            .into_iter()
            .enumerate()
            .map(|(i, ids)| {
                let labels = ids
                    .iter()
                    .enumerate()
                    .map(|(j, &t)| if (i + j) % 3 != 0 { t } else { IGNORE })
                    .collect();
                TokenizedSequence::new(ids.iter().map(|&t| t as u32).collect(), labels)
            })
            .collect();
        let packed = pack(rows, seq_length, strategy);
        let want_ids = ids_of(&case["packed_input_ids"]);
        let want_labels = ids_of(&case["packed_labels"]);
        assert_eq!(packed.len(), want_ids.len(), "{name}");
        for (k, row) in packed.iter().enumerate() {
            let ids: Vec<i64> = row.input_ids.iter().map(|&t| i64::from(t)).collect();
            assert_eq!(ids, want_ids[k], "{name} row {k}");
            assert_eq!(row.labels, want_labels[k], "{name} row {k}");
            if strategy == Packing::Bfd {
                let want: Vec<usize> = case["seq_lengths"][k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(row.seq_lengths, want, "{name} row {k}");
            }
        }
    }
}

#[test]
fn packed_rows_restart_positions_and_mask_example_starts() {
    let a = TokenizedSequence::new(vec![10, 11, 12], vec![10, 11, 12]);
    let b = TokenizedSequence::new(vec![20, 21], vec![IGNORE, 21]);
    let c = TokenizedSequence::new(vec![30, 31, 32, 33], vec![30, 31, 32, 33]);
    let packed = pack(vec![a, b, c], 5, Packing::Bfd);
    // Longest first: [c] then a fits only a new bin, b joins a.
    assert_eq!(
        packed
            .iter()
            .map(|r| r.seq_lengths.clone())
            .collect::<Vec<_>>(),
        vec![vec![4], vec![3, 2]]
    );
    let refs: Vec<_> = packed.iter().collect();
    let batch = collate(&refs, 0, Some(8));
    assert_eq!((batch.batch_size, batch.seq_len), (2, 8));
    assert_eq!(&batch.position_ids[8..16], &[0, 1, 2, 0, 1, 0, 0, 0]);
    assert_eq!(&batch.input_ids[8..16], &[10, 11, 12, 20, 21, 0, 0, 0]);
    // The first token of every packed example is untrained (TRL's padding-free collator).
    assert_eq!(
        &batch.labels[8..16],
        &[IGNORE, 11, 12, IGNORE, 21, IGNORE, IGNORE, IGNORE]
    );
    assert_eq!(
        &batch.loss_mask[8..16],
        &[1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(&batch.attention_mask[8..16], &[1, 1, 1, 1, 1, 0, 0, 0]);
    assert_eq!((batch.num_tokens, batch.num_loss_tokens), (9, 3 + 3));
    assert_eq!(batch.lengths(), vec![4, 5]);
}

#[test]
fn sft_truncation_and_packing_of_real_data() {
    let tok = tokenizer();
    let d = load_dataset("../../data/sft_train.jsonl").unwrap();
    let plain = tokenize_sft(&d, &tok, &SftConfig::default()).unwrap();
    assert_eq!((plain.rows.len(), plain.dropped), (2000, 0));
    // "<s>Q: a+b=" then " c</s>": only the completion is trained.
    for row in &plain.rows {
        assert_eq!(row.input_ids[0], 1);
        assert_eq!(*row.input_ids.last().unwrap(), 2);
        assert_eq!(row.labels.last(), Some(&2));
        assert!(row.num_trained() >= 2 && row.num_trained() < row.len());
    }
    let keep_end = SftConfig {
        max_length: Some(3),
        truncation: Truncation::KeepEnd,
        ..SftConfig::default()
    };
    let cut = tokenize_sft(&d, &tok, &keep_end).unwrap();
    assert!(cut.rows.iter().all(|r| r.len() == 3 && r.labels[2] == 2));
    let keep_start = SftConfig {
        max_length: Some(3),
        ..SftConfig::default()
    };
    let none_left = tokenize_sft(&d, &tok, &keep_start).unwrap();
    assert_eq!((none_left.rows.len(), none_left.dropped), (0, 2000));

    let packing = SftConfig {
        max_length: Some(64),
        packing: Some(Packing::Bfd),
        ..SftConfig::default()
    };
    let packed = tokenize_sft(&d, &tok, &packing).unwrap();
    let total: usize = plain.rows.iter().map(|r| r.len()).sum();
    assert_eq!(packed.rows.iter().map(|r| r.len()).sum::<usize>(), total);
    assert!(packed.rows.iter().all(|r| r.len() <= 64));
    assert!(packed.rows.len() < 2000 / 5);
    let no_max = SftConfig {
        max_length: None,
        packing: Some(Packing::Wrapped),
        ..SftConfig::default()
    };
    assert_eq!(
        tokenize_sft(&d, &tok, &no_max).unwrap_err().to_string(),
        "../../data/sft_train.jsonl: packing needs max_length (the length of the packed rows)"
    );
}

#[test]
fn preference_data_and_truncated_dpo_batch() {
    let tok = tokenizer();
    let d = load_dataset("../../data/pref_train.jsonl").unwrap();
    let pairs = tokenize_preferences(&d, &tok, None).unwrap();
    assert_eq!(pairs.len(), 2000);
    assert!(pairs
        .iter()
        .all(|p| p.prompt_ids[0] == 1 && p.chosen_ids.last() == Some(&2)));
    let first: Vec<&PreferenceExample> = pairs.iter().take(3).collect();
    let b = collate_preference(&first, 0, Some(8), Truncation::KeepStart);
    assert_eq!((b.num_pairs, b.tokens.batch_size), (3, 6));
    assert!(b.tokens.seq_len <= 8);
    // Rows 0..3 are prompt+chosen, 3..6 prompt+rejected.
    let t = b.tokens.seq_len;
    assert_eq!(
        b.tokens.input_ids[..t.min(first[0].chosen_sequence().len())],
        first[0].chosen_sequence()[..t]
    );
    assert_eq!(
        b.tokens.input_ids[3 * t..3 * t + t.min(first[0].rejected_sequence().len())],
        first[0].rejected_sequence()[..t]
    );
    assert!(first
        .iter()
        .all(|p| p.fits_dpo(Some(12), Truncation::KeepStart)));
    assert!(!first[0].fits_dpo(Some(first[0].prompt_ids.len()), Truncation::KeepStart));
    assert!(first[0].fits_dpo(Some(1), Truncation::KeepEnd));

    let margins = load_dataset("tests/data/preference.jsonl").unwrap();
    let with_margin = tokenize_preferences(&margins, &tok, None).unwrap();
    assert_eq!(with_margin[1].margin, Some(2.5));
    let both: Vec<_> = with_margin.iter().collect();
    assert_eq!(
        collate_preference(&both, 0, None, Truncation::KeepStart).margins,
        None
    );
    assert_eq!(
        collate_preference(&both[1..], 0, None, Truncation::KeepStart).margins,
        Some(vec![2.5])
    );
}

#[test]
fn conversational_and_correction_datasets_tokenize() {
    let tok = tokenizer();
    let conv = load_dataset("tests/data/implicit_preference.jsonl").unwrap();
    let p = &tokenize_preferences(&conv, &tok, None).unwrap()[0];
    assert_eq!(
        tok.decode(&p.prompt_ids, false).unwrap(),
        "User: 2+2?\nAssistant:"
    );
    assert_eq!(tok.decode(&p.chosen_ids, false).unwrap(), " 4</s>\n");
    assert_eq!(tok.decode(&p.rejected_ids, false).unwrap(), " 5</s>\n");

    let corr = load_dataset("tests/data/correction.jsonl").unwrap();
    let sft = tokenize_sft(&corr, &tok, &SftConfig::default()).unwrap();
    let trained: Vec<u32> = sft.rows[0]
        .labels
        .iter()
        .filter(|&&l| l != IGNORE)
        .map(|&l| l as u32)
        .collect();
    assert_eq!(tok.decode(&trained, false).unwrap(), " 42</s>");
    let pair = &tokenize_preferences(&corr, &tok, None).unwrap()[0];
    assert_eq!(tok.decode(&pair.chosen_ids, false).unwrap(), " 42</s>");
    assert_eq!(tok.decode(&pair.rejected_ids, false).unwrap(), " 43</s>");
}

#[test]
fn tokenization_errors_name_the_row() {
    let mut tok = tokenizer();
    let d = load_dataset("tests/data/conversational.jsonl").unwrap();
    let cfg = SftConfig {
        assistant_only_loss: true,
        ..SftConfig::default()
    };
    assert_eq!(
        tokenize_sft(&d, &tok, &cfg).unwrap_err().to_string(),
        format!(
            "tests/data/conversational.jsonl:1: {}: assistant_only_loss is set but the chat template marks no \
             assistant tokens in this row (it needs {{% generation %}}...{{% endgeneration %}} around assistant turns)",
            tok.file()
        )
    );
    tok.set_chat_template(
        "{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}x",
        "tpl.jinja",
    )
    .unwrap();
    assert_eq!(
        tokenize_sft(&d, &tok, &SftConfig::default())
            .unwrap_err()
            .to_string(),
        "tests/data/conversational.jsonl:1: tpl.jinja: chat template raised an exception: too long"
    );
    let prefs = load_dataset("tests/data/unpaired.jsonl").unwrap();
    assert_eq!(
        tokenize_sft(&prefs, &tok, &SftConfig::default()).unwrap_err().to_string(),
        "tests/data/unpaired.jsonl: SFT needs a dataset in format language_modeling | conversational | \
         prompt_completion | correction, but this one is unpaired"
    );
}

#[test]
fn sampler_is_deterministic_and_resumes_bit_identically() {
    let mut a = EpochSampler::new(10, 42, true);
    let run: Vec<Vec<usize>> = (0..9).map(|_| a.next_batch(4, false)).collect();
    // Epochs of 10 in batches of 4: 4, 4, 2 per epoch; every epoch is a permutation, and epochs differ.
    assert_eq!(
        run.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![4, 4, 2, 4, 4, 2, 4, 4, 2]
    );
    let epoch = |k: usize| {
        let mut e: Vec<usize> = run[3 * k..3 * k + 3].concat();
        let order = e.clone();
        e.sort();
        assert_eq!(e, (0..10).collect::<Vec<_>>());
        order
    };
    assert_ne!(epoch(0), epoch(1));
    assert_ne!(epoch(1), epoch(2));
    assert_ne!(epoch(0), (0..10).collect::<Vec<_>>());
    assert_eq!(
        a.state(),
        SamplerState {
            epoch: 2,
            index: 10
        }
    );

    // Resume from every point: the rest of the run is identical.
    let mut fresh = EpochSampler::new(10, 42, true);
    for k in 0..9 {
        let state = fresh.state();
        let json = serde_json::to_string(&state).unwrap();
        let mut resumed = EpochSampler::resume(10, 42, true, serde_json::from_str(&json).unwrap());
        let rest: Vec<Vec<usize>> = (k..9).map(|_| resumed.next_batch(4, false)).collect();
        assert_eq!(rest, run[k..].to_vec(), "resumed at batch {k}");
        fresh.next_batch(4, false);
    }
    // Another seed, another order; no shuffle, 0..len; drop_last skips the short tail.
    assert_ne!(
        EpochSampler::new(10, 43, true).next_batch(10, false),
        epoch(0)
    );
    let mut ordered = EpochSampler::new(5, 42, false);
    assert_eq!(
        (0..3)
            .map(|_| ordered.next_batch(2, true))
            .collect::<Vec<_>>(),
        vec![vec![0, 1], vec![2, 3], vec![0, 1]]
    );
    assert!(EpochSampler::new(0, 1, true)
        .next_batch(4, false)
        .is_empty());
}

#[test]
fn rl_prompts_tokenize_like_grpo() {
    let tok = tokenizer();
    let d = load_dataset("../../data/prompts.jsonl").unwrap();
    let prompts = rlhf_data::tokenize_prompts(&d, &tok, None).unwrap();
    assert_eq!(prompts.len(), 2000);
    assert_eq!(tok.decode(&prompts[0], false).unwrap(), "<s>Q: 60+62=");
    assert_eq!(d.rows[0].extra.get("answer"), Some(&serde_json::json!(122)));
    let conv = load_dataset("tests/data/prompt_completion_conversational.jsonl").unwrap();
    let p = rlhf_data::tokenize_prompts(&conv, &tok, None).unwrap();
    assert_eq!(
        tok.decode(&p[0], false).unwrap(),
        "User: Q: 17+25=\nAssistant:"
    );
    let lm = load_dataset("tests/data/language_modeling.jsonl").unwrap();
    assert_eq!(
        rlhf_data::tokenize_prompts(&lm, &tok, None).unwrap_err().to_string(),
        "tests/data/language_modeling.jsonl: online RL needs a \"prompt\" field, but a language_modeling dataset has none"
    );
}

#[test]
fn single_completions_tokenize_like_one_side_of_a_pair() {
    let tok = tokenizer();
    let d = load_dataset("tests/data/unpaired.jsonl").unwrap();
    for row in &d.rows {
        let rlhf_data::Record::Unpaired(u) = &row.record else {
            panic!()
        };
        let single = rlhf_data::tokenize_completion(&u.prompt, &u.completion, &tok, None).unwrap();
        let pair = rlhf_data::Preference {
            prompt: u.prompt.clone(),
            chosen: u.completion.clone(),
            rejected: u.completion.clone(),
            margin: None,
        };
        let p = rlhf_data::tokenize_pair(&pair, &tok, None).unwrap();
        assert_eq!(
            (&single.prompt_ids, &single.completion_ids),
            (&p.prompt_ids, &p.chosen_ids)
        );
        assert_eq!(single.completion_ids.last(), Some(&2));
    }
    let mixed = rlhf_data::tokenize_completion(
        &"Q".into(),
        &rlhf_data::Text::Messages(vec![rlhf_data::Message::new("assistant", "x")]),
        &tok,
        None,
    );
    assert_eq!(
        mixed.unwrap_err().to_string(),
        format!(
            "{}: prompt and completions must all be strings or all be message lists",
            tok.file()
        )
    );
}
