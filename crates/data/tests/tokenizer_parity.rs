//! Parity with transformers 5.23 / tokenizers 0.23 on the shared fixtures (`tools/make_fixtures.py`):
//! encode/decode of `fixtures/tokenizer`, and chat templates rendered and tokenized exactly as
//! `apply_chat_template` does, including `{% generation %}` assistant masks and `raise_exception` errors.

use std::path::PathBuf;

use rlhf_data::{train_bpe, BpeConfig, ChatTemplate, Message, Tokenizer};
use serde_json::{Map, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
}

fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("reference").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(fixtures().join("tokenizer")).unwrap()
}

#[test]
fn loads_special_tokens_and_config() {
    let t = tokenizer();
    let id = |s: &Option<rlhf_data::SpecialToken>| s.as_ref().map(|t| (t.content.clone(), t.id));
    assert_eq!(id(&t.pad), Some(("<pad>".into(), 0)));
    assert_eq!(id(&t.bos), Some(("<s>".into(), 1)));
    assert_eq!(id(&t.eos), Some(("</s>".into(), 2)));
    assert_eq!(id(&t.unk), Some(("<unk>".into(), 3)));
    assert!(t.add_bos_token);
    assert_eq!(t.config_add_bos_token, Some(true));
    assert_eq!(t.model_max_length, Some(128));
    assert_eq!(t.vocab_size(), 512);
    assert_eq!(t.chat_template_names(), vec!["default"]);
}

#[test]
fn encode_decode_match_transformers() {
    let t = tokenizer();
    let r = reference("tokenizer.json");
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 14);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        for (side, special) in [("with_special", true), ("without_special", false)] {
            let want = &case[side];
            let got = t.encode(text, special).unwrap();
            assert_eq!(got, ids(&want["ids"]), "{text:?} {side}");
            let tokens: Vec<String> = got
                .iter()
                .map(|&i| t.inner().id_to_token(i).unwrap())
                .collect();
            let want_tokens: Vec<String> = want["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect();
            assert_eq!(tokens, want_tokens, "{text:?} {side}");
            assert_eq!(
                t.decode(&got, false).unwrap(),
                want["decode"].as_str().unwrap(),
                "{text:?} {side}"
            );
            assert_eq!(
                t.decode(&got, true).unwrap(),
                want["decode_skip_special"].as_str().unwrap(),
                "{text:?}"
            );
        }
    }
    let pair = &r["pair"];
    let enc = t
        .inner()
        .encode(
            (
                pair["text"].as_str().unwrap(),
                pair["text_pair"].as_str().unwrap(),
            ),
            true,
        )
        .unwrap();
    assert_eq!(enc.get_ids(), ids(&pair["ids"]).as_slice());
    for case in r["decode_only"].as_array().unwrap() {
        let i = ids(&case["ids"]);
        assert_eq!(
            t.decode(&i, false).unwrap(),
            case["decode"].as_str().unwrap(),
            "{i:?}"
        );
        assert_eq!(
            t.decode(&i, true).unwrap(),
            case["decode_skip_special"].as_str().unwrap(),
            "{i:?}"
        );
    }
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

#[test]
fn chat_templates_match_apply_chat_template() {
    let t = tokenizer();
    let r = reference("chat_templates.json");
    let vars: Map<String, Value> = r["variables"].as_object().unwrap().clone();
    assert_eq!(
        &vars, &t.template_vars,
        "template variables of fixtures/tokenizer"
    );
    let templates = r["templates"].as_object().unwrap();
    let conversations = r["conversations"].as_object().unwrap();
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 108);
    let (mut rendered_ok, mut errors_ok, mut masks_ok) = (0, 0, 0);
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let conv = case["conversation"].as_str().unwrap();
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let label = format!("{name} × {conv} × add_generation_prompt={agp}");
        let template = ChatTemplate::new(templates[name].as_str().unwrap(), name).unwrap();
        let msgs = messages(&conversations[conv]);
        let result = t.tokenize_chat(&template, &msgs, agp);
        if let Some(err) = case.get("error") {
            let e = result.expect_err(&label);
            assert_eq!(
                e.to_string(),
                format!(
                    "{name}: chat template raised an exception: {}",
                    err["message"].as_str().unwrap()
                ),
                "{label}"
            );
            errors_ok += 1;
            continue;
        }
        let got = result.unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(got.text, case["rendered"].as_str().unwrap(), "{label}");
        assert_eq!(got.ids, ids(&case["ids"]), "{label}");
        rendered_ok += 1;
        if let Some(mask) = case.get("assistant_masks") {
            let want: Vec<u8> = mask
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(got.assistant_mask, want, "{label}");
            masks_ok += 1;
        }
    }
    assert_eq!((rendered_ok + errors_ok, errors_ok), (108, 6));
    assert!(masks_ok >= 12, "{masks_ok}");
}

#[test]
fn default_template_of_the_tokenizer() {
    let t = tokenizer();
    let r = t
        .apply_chat_template(&[Message::new("user", "Q: 3+4=")], true)
        .unwrap();
    assert_eq!(r.text, "User: Q: 3+4=\nAssistant:");
}

#[test]
fn template_errors_name_their_file() {
    let e =
        ChatTemplate::new("{% for m in messages %}", "model/tokenizer_config.json").unwrap_err();
    assert!(
        e.to_string().starts_with(
            "model/tokenizer_config.json: chat template does not compile: syntax error: "
        ),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tokenizer");
    for f in ["tokenizer.json", "special_tokens_map.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let cfg = r#"{"eos_token": "</s>", "chat_template": [{"name": "default", "template": "{{ 1 +  }}"}]}"#;
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg).unwrap();
    let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    let cfg_path = dir
        .path()
        .join("tokenizer_config.json")
        .display()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "{cfg_path} (chat_template \"default\"): chat template does not compile"
        )),
        "{e}"
    );

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<eot>"}"#,
    )
    .unwrap();
    let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    let tok_path = dir.path().join("tokenizer.json").display().to_string();
    assert_eq!(
        e,
        format!("{cfg_path}: field \"eos_token\": special token \"<eot>\" is not in the vocabulary of {tok_path}")
    );
}

#[test]
fn named_templates_and_jinja_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("tokenizer/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let cfg = r#"{"eos_token": "</s>", "bos_token": {"content": "<s>", "special": true},
        "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"},
                          {"name": "tool_use", "template": "{{ tools is none }}|{{ documents is none }}"}]}"#;
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg).unwrap();
    let t = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.chat_template_names(), vec!["default", "tool_use"]);
    let m = [Message::new("user", "hi")];
    assert_eq!(t.apply_chat_template(&m, false).unwrap().text, "<s>hi");
    let tool = t
        .chat_template(Some("tool_use"))
        .unwrap()
        .render(&m, false, &t.template_vars)
        .unwrap();
    assert_eq!(tool.text, "True|True"); // Python prints booleans capitalised
    assert_eq!(
        t.chat_template(Some("rag")).unwrap_err().to_string(),
        format!(
            "{}: no chat template named \"rag\" (have: default, tool_use)",
            t.file()
        )
    );
    // chat_template.jinja takes precedence over tokenizer_config.json (transformers 5 saves it there).
    std::fs::write(dir.path().join("chat_template.jinja"), "{{ eos_token }}\n").unwrap();
    let t = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.apply_chat_template(&m, false).unwrap().text, "</s>");
}

#[test]
fn python_compatible_filters_and_functions() {
    let vars = Map::new();
    let render = |src: &str, msgs: &[Message]| {
        ChatTemplate::new(src, "t")
            .unwrap()
            .render(msgs, false, &vars)
    };
    let m = [Message::new("user", "  Héllo <b> & 'x'  ")];
    assert_eq!(
        render("{{ messages[0] | tojson }}", &m).unwrap().text,
        r#"{"role": "user", "content": "  Héllo <b> & 'x'  "}"#
    );
    assert_eq!(
        render("{{ messages[0] | tojson(indent=2) }}", &m)
            .unwrap()
            .text,
        "{\n  \"role\": \"user\",\n  \"content\": \"  Héllo <b> & 'x'  \"\n}"
    );
    assert_eq!(
        render("{{ {'b': [1, 2.5], 'a': none} | tojson(sort_keys=true, ensure_ascii=true) }}|{{ 'é' | tojson(ensure_ascii=true) }}", &m)
            .unwrap()
            .text,
        r#"{"a": null, "b": [1, 2.5]}|"\u00e9""#
    );
    assert_eq!(
        render(
            "{{ messages[0].content.strip().upper() }}|{{ messages[0].content.split()|length }}",
            &m
        )
        .unwrap()
        .text,
        "HÉLLO <B> & 'X'|4"
    );
    assert_eq!(
        render(
            "{% for k, v in messages[0].items() %}{{ k }}={{ v|trim }};{% endfor %}",
            &m
        )
        .unwrap()
        .text,
        "role=user;content=Héllo <b> & 'x';"
    );
    let year = render("{{ strftime_now('%Y') }}", &m).unwrap().text;
    assert!(year.len() == 4 && year.starts_with("20"), "{year}");
    assert_eq!(
        render(
            "{% if true %}{{ raise_exception('no ' ~ messages[0].role) }}{% endif %}",
            &m
        )
        .unwrap_err()
        .to_string(),
        "t: chat template raised an exception: no user"
    );
    // trim_blocks + lstrip_blocks, loop controls.
    let src = "  {% for m in messages %}\n{% if loop.index > 1 %}{% break %}{% endif %}[{{ m.role }}]\n  {% endfor %}\n";
    let two = [Message::new("user", "a"), Message::new("assistant", "b")];
    assert_eq!(render(src, &two).unwrap().text, "[user]\n");
}

#[test]
fn trained_bpe_directory_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let mut text = String::new();
    for a in 0..60 {
        for b in 0..30 {
            text.push_str(&format!(
                "Q: {a}+{b}= {}\nUser: Q: {a}+{b}=\nAssistant: {}</s>\n",
                a + b,
                a + b
            ));
        }
    }
    std::fs::write(&corpus, text).unwrap();
    let out = dir.path().join("tok");
    let config = BpeConfig {
        vocab_size: 300,
        add_bos: true,
        ..BpeConfig::default()
    };
    let t = train_bpe(std::slice::from_ref(&corpus), &config, &out).unwrap();
    assert_eq!(t.vocab_size(), 300);
    assert_eq!(
        (
            t.pad_id().unwrap(),
            t.bos.as_ref().unwrap().id,
            t.eos_id().unwrap(),
            t.unk.as_ref().unwrap().id
        ),
        (0, 1, 2, 3)
    );
    assert!(t.add_bos_token);
    let ids = t.encode("Q: 17+25= 42</s>", true).unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (1, 2));
    assert_eq!(t.decode(&ids, true).unwrap(), "Q: 17+25= 42");
    // Every byte is in the alphabet: nothing is unknown.
    let unusual = "ünï ✓ 😀";
    assert_eq!(
        t.decode(&t.encode(unusual, false).unwrap(), false).unwrap(),
        unusual
    );
    assert_eq!(
        t.apply_chat_template(
            &[
                Message::new("user", "Q: 1+1="),
                Message::new("assistant", " 2")
            ],
            true
        )
        .unwrap()
        .text,
        "User: Q: 1+1=\nAssistant:  2</s>\nAssistant:"
    );
    assert_eq!(
        t.check_vocab(256, "model/config.json").unwrap_err().to_string(),
        format!("{}: tokenizer has 300 tokens (ids 0..299) but the model's vocab_size in model/config.json is 256", t.file())
    );
    t.check_vocab(300, "model/config.json").unwrap();

    let no_bos = train_bpe(
        &[corpus],
        &BpeConfig {
            vocab_size: 280,
            ..BpeConfig::default()
        },
        dir.path().join("b"),
    )
    .unwrap();
    assert!(!no_bos.add_bos_token);
    assert_eq!(no_bos.encode("Q", true).unwrap().len(), 1);
    // Split digits: every number becomes one token per digit, whatever merges the corpus would allow.
    let numbers = dir.path().join("numbers.txt");
    std::fs::write(&numbers, "Q: 60+62= 122\n".repeat(50)).unwrap();
    let cfg = |split_digits| BpeConfig {
        vocab_size: 280,
        split_digits,
        ..BpeConfig::default()
    };
    let merged = train_bpe(
        std::slice::from_ref(&numbers),
        &cfg(false),
        dir.path().join("d"),
    )
    .unwrap();
    assert!(
        merged.encode(" 122", false).unwrap().len() < 4,
        "without splitting, digits merge"
    );
    let split = train_bpe(&[numbers], &cfg(true), dir.path().join("e")).unwrap();
    let ids = split.encode(" 122", false).unwrap();
    let pieces: Vec<String> = ids
        .iter()
        .map(|&i| split.decode(&[i], false).unwrap())
        .collect();
    assert_eq!(pieces, [" ", "1", "2", "2"]);
    assert_eq!(
        split
            .decode(&split.encode("Q: 60+62= 122", false).unwrap(), false)
            .unwrap(),
        "Q: 60+62= 122"
    );
    let small = BpeConfig {
        vocab_size: 100,
        ..BpeConfig::default()
    };
    let e = train_bpe(
        &[dir.path().join("missing.txt")],
        &small,
        dir.path().join("c"),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: corpus file not found",
            dir.path().join("missing.txt").display()
        )
    );
}
