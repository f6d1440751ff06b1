//! Every format read from JSONL and Parquet, written back and re-read; every error path with its exact message.
//! Paths are relative to the crate root (cargo runs tests there), so messages show them as written here.

use rlhf_data::{
    jsonl, load_dataset, load_dataset_with, Dataset, Format, LoadOptions, Message, Preference,
    PromptCompletion, Rating, Record, Row, ScoreScale, Text,
};
use serde_json::json;

fn load(name: &str) -> Dataset {
    load_dataset(format!("tests/data/{name}")).unwrap_or_else(|e| panic!("{e}"))
}

fn load_err(name: &str) -> String {
    match load_dataset(format!("tests/data/{name}")) {
        Ok(d) => panic!("{name} loaded ({} rows) but should fail", d.len()),
        Err(e) => e.to_string(),
    }
}

fn msgs(pairs: &[(&str, &str)]) -> Text {
    Text::Messages(pairs.iter().map(|(r, c)| Message::new(*r, *c)).collect())
}

/// Writes the dataset to JSONL, reads it back and checks nothing changed.
fn assert_round_trip(d: &Dataset) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/out.jsonl");
    d.write_jsonl(&out).unwrap();
    let back = load_dataset(&out).unwrap();
    assert_eq!(back.format, d.format);
    assert_eq!(back.conversational, d.conversational);
    assert_eq!(back.rows.len(), d.rows.len());
    for (a, b) in d.rows.iter().zip(&back.rows) {
        assert_eq!(a.record, b.record);
        assert_eq!(a.extra, b.extra);
    }
}

#[test]
fn language_modeling() {
    let d = load("language_modeling.jsonl");
    assert_eq!(
        (d.format, d.conversational, d.len()),
        (Format::LanguageModeling, false, 2)
    );
    assert_eq!(
        d.rows[1].record,
        Record::LanguageModeling(rlhf_data::LanguageModeling {
            text: "Q: 17+25= 42".into()
        })
    );
    assert_round_trip(&d);
}

#[test]
fn conversational_keeps_message_extras() {
    let d = load("conversational.jsonl");
    assert_eq!((d.format, d.conversational), (Format::Conversational, true));
    let Record::Conversational(c) = &d.rows[1].record else {
        panic!()
    };
    assert_eq!(c.messages[0].role, "user");
    assert_eq!(c.messages[0].extra.get("name"), Some(&json!("ana")));
    assert_round_trip(&d);
}

#[test]
fn prompt_only_keeps_answer_column() {
    let d = load("prompt_only.jsonl");
    assert_eq!(d.format, Format::PromptOnly);
    assert_eq!(d.rows[0].extra.get("answer"), Some(&json!(42)));
    let prompts: Vec<_> = d.prompts().unwrap().into_iter().cloned().collect();
    assert_eq!(
        prompts,
        vec![Text::from("Q: 17+25="), Text::from("Q: 10+11=")]
    );
    assert_round_trip(&d);
}

#[test]
fn prompt_completion_plain_and_conversational() {
    let d = load("prompt_completion.jsonl");
    assert_eq!(
        (d.format, d.conversational),
        (Format::PromptCompletion, false)
    );
    assert_eq!(
        d.rows[0].record,
        Record::PromptCompletion(PromptCompletion {
            prompt: "Q: 17+25=".into(),
            completion: " 42".into()
        })
    );
    assert_round_trip(&d);
    let c = load("prompt_completion_conversational.jsonl");
    assert_eq!(
        (c.format, c.conversational),
        (Format::PromptCompletion, true)
    );
    assert_round_trip(&c);
}

#[test]
fn preference_margin_and_provenance_columns() {
    let d = load("preference.jsonl");
    assert_eq!(d.format, Format::Preference);
    let pairs = d.preference_pairs().unwrap();
    assert_eq!(pairs[0].margin, None);
    assert_eq!(pairs[1].margin, Some(2.5));
    assert_eq!(d.rows[0].extra.get("source"), Some(&json!("annotator-3")));
    assert_eq!(
        d.rows[0].extra.get("session"),
        Some(&json!({"id": 12, "tags": ["a", "b"]}))
    );
    // Record fields first (TRL order), extra columns after, in their original order.
    assert_eq!(
        jsonl::to_line(&d.rows[0]),
        r#"{"prompt":"Q: 17+25=","chosen":" 42","rejected":" 43","source":"annotator-3","session":{"id":12,"tags":["a","b"]}}"#
    );
    assert_eq!(
        jsonl::to_line(&d.rows[1]),
        r#"{"prompt":"Q: 10+11=","chosen":" 21","rejected":" 12","margin":2.5}"#
    );
    assert_round_trip(&d);
}

#[test]
fn implicit_preference_extracts_prompt_like_trl() {
    let d = load("implicit_preference.jsonl");
    assert_eq!(
        (d.format, d.conversational),
        (Format::ImplicitPreference, true)
    );
    let p = &d.preference_pairs().unwrap()[0];
    assert_eq!(p.prompt, msgs(&[("user", "2+2?")]));
    assert_eq!(p.chosen, msgs(&[("assistant", "4")]));
    assert_eq!(p.rejected, msgs(&[("assistant", "5")]));
    assert_round_trip(&d);

    // Strings: common prefix, with the space before the divergence moved to the completions.
    let t = load("implicit_preference_text.jsonl");
    let p = &t.preference_pairs().unwrap()[0];
    assert_eq!(
        (
            p.prompt.as_plain(),
            p.chosen.as_plain(),
            p.rejected.as_plain()
        ),
        (Some("The sky is"), Some(" blue."), Some(" green."))
    );
}

#[test]
fn implicit_preference_prefix_case_follows_trl_loop() {
    // One side is a prefix of the other: TRL's index stops at min_len - 1.
    let r = rlhf_data::ImplicitPreference {
        chosen: "abc".into(),
        rejected: "abcd".into(),
    };
    let p = r.to_explicit().unwrap();
    assert_eq!(
        (
            p.prompt.as_plain(),
            p.chosen.as_plain(),
            p.rejected.as_plain()
        ),
        (Some("ab"), Some("c"), Some("cd"))
    );
    let empty = rlhf_data::ImplicitPreference {
        chosen: "".into(),
        rejected: "x".into(),
    };
    assert_eq!(
        empty.to_explicit().unwrap_err(),
        "cannot extract a prompt: \"chosen\" or \"rejected\" is empty"
    );
}

#[test]
fn unpaired() {
    let d = load("unpaired.jsonl");
    assert_eq!(d.format, Format::Unpaired);
    let labels: Vec<bool> = d
        .records()
        .map(|r| matches!(r, Record::Unpaired(u) if u.label))
        .collect();
    assert_eq!(labels, vec![true, false]);
    assert_round_trip(&d);
}

#[test]
fn rating_scales() {
    let d = load("rating.jsonl");
    assert_eq!(d.format, Format::Rating);
    let Record::Rating(r) = &d.rows[1].record else {
        panic!()
    };
    assert_eq!(
        (r.score, r.scale),
        (1.5, Some(ScoreScale { min: 1.0, max: 5.0 }))
    );
    assert_eq!(
        jsonl::to_line(&d.rows[0]),
        r#"{"prompt":"Q: 1+1=","completion":" 2","score":5,"score_min":1,"score_max":5}"#
    );
    assert_round_trip(&d);

    assert_eq!(
        load_err("rating_no_scale.jsonl"),
        "tests/data/rating_no_scale.jsonl:1: field \"score\": no score scale declared: add \"score_min\"/\"score_max\" \
         to the row or set the dataset's score scale"
    );
    let opts = LoadOptions {
        score_scale: Some(ScoreScale { min: 0.0, max: 1.0 }),
    };
    assert_eq!(
        load_dataset_with("tests/data/rating_no_scale.jsonl", &opts)
            .unwrap()
            .len(),
        2
    );
    let narrow = LoadOptions {
        score_scale: Some(ScoreScale { min: 0.0, max: 0.5 }),
    };
    assert_eq!(
        load_dataset_with("tests/data/rating_no_scale.jsonl", &narrow).unwrap_err().to_string(),
        "tests/data/rating_no_scale.jsonl:1: field \"score\": score 0.9 is outside the scale [0, 0.5]"
    );
}

#[test]
fn correction_converts_to_pair_and_demonstration() {
    let d = load("correction.jsonl");
    assert_eq!(d.format, Format::Correction);
    assert_eq!(d.rows[0].extra.get("annotator"), Some(&json!("bo")));
    let pair = &d.preference_pairs().unwrap()[0];
    assert_eq!(
        *pair,
        Preference {
            prompt: "Q: 17+25=".into(),
            chosen: " 42".into(),
            rejected: " 43".into(),
            margin: None
        }
    );
    let Record::Correction(c) = &d.rows[0].record else {
        panic!()
    };
    assert_eq!(
        c.to_demonstration(),
        PromptCompletion {
            prompt: "Q: 17+25=".into(),
            completion: " 42".into()
        }
    );
    assert_round_trip(&d);
}

#[test]
fn blank_lines_at_end_crlf_and_no_final_newline() {
    assert_eq!(load("trailing_blank_lines.jsonl").len(), 2);
    let d = load("crlf_no_final_newline.jsonl");
    assert_eq!(d.len(), 2);
    assert_eq!(d.rows[1].position, Some(rlhf_data::Position::Line(2)));
}

#[test]
fn parquet_preference_with_null_margin_and_extra_columns() {
    let d = load("preference.parquet");
    assert_eq!((d.format, d.len()), (Format::Preference, 2));
    let pairs = d.preference_pairs().unwrap();
    assert_eq!(
        pairs[0],
        Preference {
            prompt: "Q: 17+25=".into(),
            chosen: " 42".into(),
            rejected: " 43".into(),
            margin: Some(1.5)
        }
    );
    assert_eq!(pairs[1].margin, None);
    assert_eq!(d.rows[0].extra.get("id"), Some(&json!(7)));
    assert_eq!(d.rows[1].extra.get("reviewed"), Some(&json!(false)));
    assert_eq!(d.rows[1].position, Some(rlhf_data::Position::Row(2)));
    assert_round_trip(&d);
}

#[test]
fn parquet_message_columns() {
    let d = load("conversational_preference.parquet");
    assert_eq!((d.format, d.conversational), (Format::Preference, true));
    let p = &d.preference_pairs().unwrap()[0];
    assert_eq!(p.prompt, msgs(&[("system", "Be brief."), ("user", "2+2?")]));
    assert_eq!(p.chosen, msgs(&[("assistant", "4")]));

    let m = load("messages.parquet");
    let Record::Conversational(c) = &m.rows[1].record else {
        panic!()
    };
    assert_eq!(c.messages[0].content, "Ünïcödé ✓");
}

#[test]
fn parquet_bool_int_double_columns() {
    let u = load("unpaired.parquet");
    assert_eq!(
        u.rows
            .iter()
            .map(|r| matches!(&r.record, Record::Unpaired(x) if x.label))
            .collect::<Vec<_>>(),
        [true, false]
    );
    let r = load("rating.parquet");
    let Record::Rating(x) = &r.rows[0].record else {
        panic!()
    };
    assert_eq!(
        (x.score, x.scale),
        (5.0, Some(ScoreScale { min: 1.0, max: 5.0 }))
    );
}

#[test]
fn parquet_errors_name_row_and_column() {
    assert_eq!(
        load_err("bad_column.parquet"),
        "tests/data/bad_column.parquet: row 2: column \"chosen\": missing (a preference row needs \"prompt\", \
         \"chosen\", \"rejected\")"
    );
    assert_eq!(
        load_err("bad_type.parquet"),
        "tests/data/bad_type.parquet: row 1: column \"chosen\": expected a string or a list of {role, content} \
         messages, got a number"
    );
    let e = load_err("not_parquet.parquet");
    assert!(
        e.starts_with("tests/data/not_parquet.parquet: not a readable Parquet file: "),
        "{e}"
    );
}

#[test]
fn jsonl_error_messages() {
    let cases = [
        ("bad_json.jsonl", "tests/data/bad_json.jsonl:3: invalid JSON: expected value at line 1 column 31"),
        (
            "wrong_type.jsonl",
            "tests/data/wrong_type.jsonl:2: field \"chosen\": expected a string or a list of {role, content} \
             messages, got a number",
        ),
        (
            "missing_field.jsonl",
            "tests/data/missing_field.jsonl:2: field \"rejected\": missing (a preference row needs \"prompt\", \
             \"chosen\", \"rejected\")",
        ),
        ("empty.jsonl", "tests/data/empty.jsonl: empty dataset (no rows)"),
        ("only_blank_lines.jsonl", "tests/data/only_blank_lines.jsonl: empty dataset (no rows)"),
        (
            "unknown_format.jsonl",
            "tests/data/unknown_format.jsonl:1: unknown dataset format: keys [\"question\", \"answer\"] match none \
             of text | messages | prompt | prompt+completion | prompt+chosen+rejected | chosen+rejected | \
             prompt+completion+label | prompt+completion+score | prompt+completion+corrected",
        ),
        (
            "mixed_formats.jsonl",
            "tests/data/mixed_formats.jsonl:2: mixed formats: this row is preference but line 1 is prompt_completion",
        ),
        (
            "mixed_conversational.jsonl",
            "tests/data/mixed_conversational.jsonl:2: mixed formats: this row is prompt_completion (conversational) \
             but line 1 is prompt_completion",
        ),
        (
            "mixed_text_kinds.jsonl",
            "tests/data/mixed_text_kinds.jsonl:1: field \"completion\": expected a list of messages like field \
             \"prompt\" (all text fields of a row must agree), got a string",
        ),
        (
            "score_out_of_scale.jsonl",
            "tests/data/score_out_of_scale.jsonl:2: field \"score\": score 7 is outside the scale [1, 5]",
        ),
        (
            "blank_line_inside.jsonl",
            "tests/data/blank_line_inside.jsonl:2: blank line inside the file (blank lines are only allowed at the end)",
        ),
        ("invalid_utf8.jsonl", "tests/data/invalid_utf8.jsonl:2: invalid UTF-8 at byte 33 of the line"),
        (
            "array_with_bad_element.json",
            "tests/data/array_with_bad_element.json: element 2: field \"completion\": expected a string or a list of \
             {role, content} messages, got null",
        ),
        ("array_not_json.json", "tests/data/array_not_json.json: invalid JSON: EOF while parsing a value at line 3 column 0"),
        ("not_an_object.jsonl", "tests/data/not_an_object.jsonl:1: expected a JSON object, got a list"),
        ("message_missing_role.jsonl", "tests/data/message_missing_role.jsonl:1: field \"messages[1].role\": missing"),
        (
            "bad_label.jsonl",
            "tests/data/bad_label.jsonl:1: field \"label\": expected a boolean (true/false), got a string",
        ),
        ("bad_margin.jsonl", "tests/data/bad_margin.jsonl:1: field \"margin\": expected a number, got a string"),
        (
            "prompts.csv",
            "tests/data/prompts.csv: unsupported file extension \"csv\": expected .jsonl, .json or .parquet",
        ),
    ];
    for (file, expected) in cases {
        assert_eq!(load_err(file), expected, "{file}");
    }
    let e = load_err("does_not_exist.jsonl");
    assert!(
        e.starts_with("tests/data/does_not_exist.jsonl: cannot read: "),
        "{e}"
    );
}

#[test]
fn error_fields_are_structured() {
    let e = load_dataset("tests/data/wrong_type.jsonl").unwrap_err();
    assert_eq!(
        (e.file.as_str(), e.line(), e.field.as_deref()),
        ("tests/data/wrong_type.jsonl", Some(2), Some("chosen"))
    );
}

#[test]
fn wrong_dataset_for_purpose() {
    let d = load("prompt_completion.jsonl");
    assert_eq!(
        d.preference_pairs().unwrap_err().to_string(),
        "tests/data/prompt_completion.jsonl: preference training needs a dataset in format preference | \
         implicit_preference | correction, but this one is prompt_completion"
    );
    assert_eq!(
        load("language_modeling.jsonl").prompts().unwrap_err().to_string(),
        "tests/data/language_modeling.jsonl: online RL needs a \"prompt\" field, but a language_modeling dataset has none"
    );
}

#[test]
fn in_memory_rows_written_like_the_feedback_app() {
    let rows = vec![Row::new(Record::Rating(Rating {
        prompt: msgs(&[("user", "Hi")]),
        completion: msgs(&[("assistant", "Hello")]),
        score: 4.0,
        scale: Some(ScoreScale { min: 1.0, max: 5.0 }),
    }))
    .with_extra("annotator", json!("cy"))];
    let d = Dataset::from_rows("<feedback>", rows).unwrap();
    assert_eq!(
        jsonl::to_line(&d.rows[0]),
        r#"{"prompt":[{"role":"user","content":"Hi"}],"completion":[{"role":"assistant","content":"Hello"}],"score":4,"score_min":1,"score_max":5,"annotator":"cy"}"#
    );
    assert_round_trip(&d);
    assert_eq!(
        Dataset::from_rows("<feedback>", vec![])
            .unwrap_err()
            .to_string(),
        "<feedback>: empty dataset (no rows)"
    );
}

#[test]
fn quick_start_data() {
    let sft = load_dataset("../../data/sft_train.jsonl").unwrap();
    assert_eq!((sft.format, sft.len()), (Format::PromptCompletion, 2000));
    assert_eq!(
        load_dataset("../../data/sft_eval.jsonl").unwrap().len(),
        200
    );
    let pref = load_dataset("../../data/pref_train.jsonl").unwrap();
    assert_eq!((pref.format, pref.len()), (Format::Preference, 2000));
    for p in pref.preference_pairs().unwrap() {
        let prompt = p.prompt.as_plain().unwrap();
        let (a, b) = prompt
            .strip_prefix("Q: ")
            .unwrap()
            .strip_suffix('=')
            .unwrap()
            .split_once('+')
            .unwrap();
        let sum: u32 = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
        assert_eq!(p.chosen.as_plain().unwrap(), format!(" {sum}"));
        assert_ne!(p.rejected, p.chosen);
    }
    assert_eq!(
        load_dataset("../../data/pref_eval.jsonl").unwrap().len(),
        200
    );
    let prompts = load_dataset("../../data/prompts.jsonl").unwrap();
    assert_eq!((prompts.format, prompts.len()), (Format::PromptOnly, 2000));
    assert!(prompts
        .rows
        .iter()
        .all(|r| r.extra.get("answer").is_some_and(|a| a.is_u64())));
}

#[test]
fn json_array_files_and_in_memory_jsonl() {
    let d = load("array.json");
    assert_eq!((d.format, d.len()), (Format::PromptCompletion, 2));
    assert_eq!(d.rows[1].position, Some(rlhf_data::Position::Element(2)));
    // A .json file that is not an array is read as JSON Lines.
    assert_eq!(load("lines.json").len(), 2);
    let bytes = std::fs::read("tests/data/prompt_completion.jsonl").unwrap();
    let m = Dataset::parse_jsonl("upload.jsonl", &bytes, &LoadOptions::default()).unwrap();
    assert_eq!(
        m.records().collect::<Vec<_>>(),
        load("prompt_completion.jsonl")
            .records()
            .collect::<Vec<_>>()
    );
    assert_eq!(
        Dataset::parse_jsonl("upload.jsonl", b"{\"text\": 1}\n", &LoadOptions::default())
            .unwrap_err()
            .to_string(),
        "upload.jsonl:1: field \"text\": expected a string, got a number"
    );
}
