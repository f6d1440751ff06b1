//! A Hugging Face tokenizer directory (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`,
//! optional `chat_template.jinja`) loaded the way transformers 5 loads it, plus byte-level BPE training that
//! writes such a directory.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper};

use crate::chat_template::{ChatTemplate, Rendered};
use crate::error::{DataError, Result};
use crate::formats::Message;

/// Byte range `[start, end)` of the input text that a token covers.
pub type Offset = (usize, usize);

/// A tokenized conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTokens {
    pub ids: Vec<u32>,
    /// 1 on tokens inside `{% generation %}` blocks (all 0 for templates without them).
    pub assistant_mask: Vec<u8>,
    /// The rendered text.
    pub text: String,
}

/// A special token and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub content: String,
    pub id: u32,
}

/// The special-token names transformers passes to chat templates (when set).
const SPECIAL_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
];

/// Chat template of the bench and of `train_bpe` directories: `Role: content` lines, EOS after assistant turns,
/// `Assistant:` as generation prompt.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for message in messages %}{{ message['role'] | capitalize }}: \
{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}\
{% if add_generation_prompt %}Assistant:{% endif %}";

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `…/tokenizer.json`, for error messages.
    tokenizer_file: String,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    pub pad: Option<SpecialToken>,
    pub unk: Option<SpecialToken>,
    /// Whether `encode(text, true)` prepends BOS. Decided by tokenizer.json's post-processor: transformers 5
    /// ignores `add_bos_token` in tokenizer_config.json for fast tokenizers, and so do we.
    pub add_bos_token: bool,
    /// `add_bos_token` as written in tokenizer_config.json, if it is.
    pub config_add_bos_token: Option<bool>,
    /// None when the config has none or transformers' "unlimited" sentinel (1e30).
    pub model_max_length: Option<usize>,
    /// Variables passed to chat templates: special tokens by name (`bos_token`, ..., `additional_special_tokens`).
    pub template_vars: Map<String, Value>,
    /// Chat templates by name; a single template is named `default`.
    chat_templates: BTreeMap<String, ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("file", &self.tokenizer_file)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(path)
        .map_err(|e| DataError::in_file(path, format!("cannot read: {e}")))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(DataError::in_file(path, "expected a JSON object")),
        Err(e) => Err(DataError::in_file(path, format!("invalid JSON: {e}"))),
    }
}

/// A special token entry: `"</s>"`, `{"content": "</s>", ...}` or null.
fn token_content(path: &Path, key: &str, v: &Value) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(m) => match m.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(
                DataError::in_file(path, "expected a string or {\"content\": ...}").with_field(key),
            ),
        },
        _ => {
            Err(DataError::in_file(path, "expected a string or {\"content\": ...}").with_field(key))
        }
    }
}

impl Tokenizer {
    /// Loads a model or tokenizer directory. Only tokenizer.json is required.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Tokenizer> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        let tokenizer_file = tok_path.display().to_string();
        if !tok_path.exists() {
            return Err(DataError::new(
                &tokenizer_file,
                "not found (a tokenizer directory needs tokenizer.json)",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| DataError::new(&tokenizer_file, format!("cannot load tokenizer: {e}")))?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or_default();
        let map_path = dir.join("special_tokens_map.json");
        let special_map = read_json(&map_path)?.unwrap_or_default();

        // tokenizer_config.json wins; special_tokens_map.json fills the gaps (as in transformers).
        let mut template_vars = Map::new();
        for name in SPECIAL_NAMES {
            let from_config = config
                .get(name)
                .map(|v| token_content(&config_path, name, v))
                .transpose()?
                .flatten();
            let content = match from_config {
                Some(c) => Some(c),
                None => special_map
                    .get(name)
                    .map(|v| token_content(&map_path, name, v))
                    .transpose()?
                    .flatten(),
            };
            if let Some(c) = content {
                template_vars.insert(name.to_string(), Value::String(c));
            }
        }
        for list_key in ["additional_special_tokens", "extra_special_tokens"] {
            if let Some(Value::Array(items)) =
                config.get(list_key).or_else(|| special_map.get(list_key))
            {
                let tokens = items
                    .iter()
                    .map(|v| token_content(&config_path, list_key, v).map(|c| c.map(Value::String)))
                    .collect::<Result<Vec<_>>>()?;
                template_vars.insert(
                    "additional_special_tokens".into(),
                    Value::Array(tokens.into_iter().flatten().collect()),
                );
            }
        }
        let lookup = |name: &str| -> Result<Option<SpecialToken>> {
            let Some(Value::String(content)) = template_vars.get(name) else {
                return Ok(None);
            };
            let id = inner.token_to_id(content).ok_or_else(|| {
                DataError::in_file(
                    &config_path,
                    format!(
                        "special token {content:?} is not in the vocabulary of {tokenizer_file}"
                    ),
                )
                .with_field(name)
            })?;
            Ok(Some(SpecialToken {
                content: content.clone(),
                id,
            }))
        };
        let (bos, eos, pad, unk) = (
            lookup("bos_token")?,
            lookup("eos_token")?,
            lookup("pad_token")?,
            lookup("unk_token")?,
        );

        let model_max_length = match config.get("model_max_length") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => n.as_u64().filter(|&v| v < 1 << 53).map(|v| v as usize),
            Some(_) => {
                return Err(DataError::in_file(&config_path, "expected a number")
                    .with_field("model_max_length"))
            }
        };
        let config_add_bos_token = match config.get("add_bos_token") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                return Err(DataError::in_file(&config_path, "expected true or false")
                    .with_field("add_bos_token"))
            }
        };

        let chat_templates = load_chat_templates(dir, &config_path, &config)?;
        let mut tok = Tokenizer {
            inner,
            tokenizer_file,
            bos,
            eos,
            pad,
            unk,
            add_bos_token: false,
            config_add_bos_token,
            model_max_length,
            template_vars,
            chat_templates,
        };
        tok.add_bos_token = match &tok.bos {
            Some(bos) => tok.encode("a", true)?.first() == Some(&bos.id),
            None => false,
        };
        Ok(tok)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Path of tokenizer.json (for error messages).
    pub fn file(&self) -> &str {
        &self.tokenizer_file
    }

    fn err(&self, message: String) -> DataError {
        DataError::new(&self.tokenizer_file, message)
    }

    /// `tokenizer(text, add_special_tokens=...)["input_ids"]`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text, add_special_tokens)?.0)
    }

    /// Ids and the byte range of `text` each token covers.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<Offset>)> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| {
            self.err(format!(
                "cannot encode {:?}: {e}",
                truncate_for_message(text)
            ))
        })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// `tokenizer.decode(ids, skip_special_tokens=...)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(format!("cannot decode {ids:?}: {e}")))
    }

    /// `len(tokenizer)`: ids in use, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner
            .get_vocab(true)
            .values()
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0)
    }

    /// Bytes of the longest token (vocabulary string or added token): `n` tokens never cover more than
    /// `n × this` bytes of text, so a longer text certainly has more than `n` tokens.
    pub fn max_token_bytes(&self) -> usize {
        self.inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// The id of `token` (a vocabulary string or an added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Errors when the tokenizer can produce ids the model has no embedding for. `model_config` names the file
    /// the model's vocab size came from.
    pub fn check_vocab(
        &self,
        model_vocab_size: usize,
        model_config: impl AsRef<Path>,
    ) -> Result<()> {
        let n = self.vocab_size();
        if n > model_vocab_size {
            return Err(self.err(format!(
                "tokenizer has {n} tokens (ids 0..{}) but the model's vocab_size in {} is {model_vocab_size}",
                n - 1,
                model_config.as_ref().display()
            )));
        }
        Ok(())
    }

    pub fn eos_id(&self) -> Result<u32> {
        self.eos
            .as_ref()
            .map(|t| t.id)
            .ok_or_else(|| self.err("the tokenizer has no eos_token".into()))
    }

    /// The pad id; tokenizers without a pad token pad with EOS (as TRL does).
    pub fn pad_id(&self) -> Result<u32> {
        match (&self.pad, &self.eos) {
            (Some(p), _) | (None, Some(p)) => Ok(p.id),
            (None, None) => {
                Err(self.err("the tokenizer has neither pad_token nor eos_token".into()))
            }
        }
    }

    pub fn eos_token(&self) -> Result<&str> {
        self.eos
            .as_ref()
            .map(|t| t.content.as_str())
            .ok_or_else(|| self.err("the tokenizer has no eos_token".into()))
    }

    /// Names of the chat templates (a single template is `default`).
    pub fn chat_template_names(&self) -> Vec<&str> {
        self.chat_templates.keys().map(String::as_str).collect()
    }

    /// The named chat template, or the default one.
    pub fn chat_template(&self, name: Option<&str>) -> Result<&ChatTemplate> {
        let name = name.unwrap_or("default");
        self.chat_templates.get(name).ok_or_else(|| {
            let msg = if self.chat_templates.is_empty() {
                "the tokenizer has no chat template (tokenizer_config.json \"chat_template\" or chat_template.jinja)"
                    .to_string()
            } else {
                format!("no chat template named {name:?} (have: {})", self.chat_template_names().join(", "))
            };
            self.err(msg)
        })
    }

    /// `apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=True)`: the rendered text
    /// tokenized without added special tokens, and 1 for every token from the one holding the first byte of a
    /// `{% generation %}` span to the one holding its last byte (transformers stops at the first span whose
    /// start falls on no token, and runs to the end when the end does, or is token 0).
    pub fn tokenize_chat(
        &self,
        template: &ChatTemplate,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<ChatTokens> {
        let rendered = template.render(messages, add_generation_prompt, &self.template_vars)?;
        let (ids, offsets) = self.encode_with_offsets(&rendered.text, false)?;
        let token_at = |byte: usize| offsets.iter().position(|&(s, e)| s <= byte && byte < e);
        let mut assistant_mask = vec![0u8; ids.len()];
        for span in rendered.generation_spans.iter().filter(|s| !s.is_empty()) {
            let Some(start) = token_at(span.start) else {
                break;
            };
            let last_char = rendered.text[..span.end]
                .chars()
                .next_back()
                .map_or(1, char::len_utf8);
            let end = match token_at(span.end - last_char) {
                Some(t) if t > 0 => t + 1,
                _ => ids.len(),
            };
            for m in &mut assistant_mask[start..end.max(start)] {
                *m = 1;
            }
        }
        Ok(ChatTokens {
            ids,
            assistant_mask,
            text: rendered.text,
        })
    }

    /// Replaces the default chat template (e.g. from a `--chat-template` file); `origin` names it in errors.
    pub fn set_chat_template(&mut self, source: &str, origin: impl Into<String>) -> Result<()> {
        self.chat_templates
            .insert("default".into(), ChatTemplate::new(source, origin)?);
        Ok(())
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` with the default template.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Rendered> {
        self.chat_template(None)?
            .render(messages, add_generation_prompt, &self.template_vars)
    }
}

fn truncate_for_message(text: &str) -> String {
    match text.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// transformers 5 order: `chat_template.jinja` (+ `additional_chat_templates/*.jinja`) if present, else
/// `chat_template` in tokenizer_config.json (a string, or a list of `{name, template}`).
fn load_chat_templates(
    dir: &Path,
    config_path: &Path,
    config: &Map<String, Value>,
) -> Result<BTreeMap<String, ChatTemplate>> {
    let mut out = BTreeMap::new();
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let src = fs::read_to_string(&jinja)
            .map_err(|e| DataError::in_file(&jinja, format!("cannot read: {e}")))?;
        out.insert(
            "default".to_string(),
            ChatTemplate::new(&src, jinja.display().to_string())?,
        );
        let extra_dir = dir.join("additional_chat_templates");
        if let Ok(entries) = fs::read_dir(&extra_dir) {
            let mut paths: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for p in paths
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
            {
                let name = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                let src = fs::read_to_string(&p)
                    .map_err(|e| DataError::in_file(&p, format!("cannot read: {e}")))?;
                out.insert(name, ChatTemplate::new(&src, p.display().to_string())?);
            }
        }
        return Ok(out);
    }
    let origin = config_path.display().to_string();
    match config.get("chat_template") {
        None | Some(Value::Null) => {}
        Some(Value::String(src)) => {
            out.insert("default".to_string(), ChatTemplate::new(src, origin)?);
        }
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let (Some(Value::String(name)), Some(Value::String(src))) =
                    (item.get("name"), item.get("template"))
                else {
                    return Err(DataError::new(
                        &origin,
                        "expected {\"name\": string, \"template\": string}",
                    )
                    .with_field(format!("chat_template[{i}]")));
                };
                out.insert(
                    name.clone(),
                    ChatTemplate::new(src, format!("{origin} (chat_template {name:?})"))?,
                );
            }
        }
        Some(_) => {
            return Err(
                DataError::new(&origin, "expected a string or a list of {name, template}")
                    .with_field("chat_template"),
            )
        }
    }
    Ok(out)
}

/// What `train_bpe` builds. `Default` gives the TRL baseline's conventions.
#[derive(Debug, Clone, PartialEq)]
pub struct BpeConfig {
    pub vocab_size: usize,
    /// Special tokens get ids 0..=3 in this order: pad, bos, eos, unk.
    pub pad_token: String,
    pub bos_token: String,
    pub eos_token: String,
    pub unk_token: String,
    /// Prepend BOS when encoding with special tokens (a `<s> $A` post-processor). The baseline has none.
    pub add_bos: bool,
    /// Split numbers into single digits before BPE (as Llama 3 and Qwen2 do), so no token spans two digits:
    /// arithmetic then sees each digit, which small models need to generalise addition.
    pub split_digits: bool,
    pub model_max_length: usize,
    pub chat_template: String,
}

impl Default for BpeConfig {
    fn default() -> Self {
        BpeConfig {
            vocab_size: 512,
            pad_token: "<pad>".into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
            unk_token: "<unk>".into(),
            add_bos: false,
            split_digits: false,
            model_max_length: 256,
            chat_template: DEFAULT_CHAT_TEMPLATE.into(),
        }
    }
}

/// Trains a byte-level BPE (GPT-2 pre-tokenization without prefix space, all 256 bytes in the alphabet, so there
/// are no unknown tokens) on text files, and writes `tokenizer.json`, `tokenizer_config.json` and
/// `special_tokens_map.json` to `out_dir`, loadable by transformers' `AutoTokenizer`.
pub fn train_bpe(
    corpus_files: &[PathBuf],
    config: &BpeConfig,
    out_dir: impl AsRef<Path>,
) -> Result<Tokenizer> {
    let out_dir = out_dir.as_ref();
    let label = out_dir.join("tokenizer.json").display().to_string();
    let fail = |m: String| DataError::new(&label, m);
    for f in corpus_files {
        if !f.is_file() {
            return Err(DataError::in_file(f, "corpus file not found"));
        }
    }
    let specials = [
        &config.pad_token,
        &config.bos_token,
        &config.eos_token,
        &config.unk_token,
    ];
    // Larger than any byte-level BPE vocabulary in use (the largest hold a few hundred thousand tokens);
    // beyond it the trainer's tables alone exhaust memory before anything is learned.
    const MAX_VOCAB: usize = 1 << 20;
    if config.vocab_size > MAX_VOCAB {
        return Err(fail(format!(
            "vocab_size {} is too large: at most {MAX_VOCAB} tokens",
            config.vocab_size
        )));
    }
    if config.vocab_size < 256 + specials.len() {
        return Err(fail(format!(
            "vocab_size {} is too small: a byte-level BPE needs 256 byte tokens + {} special tokens",
            config.vocab_size,
            specials.len()
        )));
    }
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(config.vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .special_tokens(
                specials
                    .iter()
                    .map(|s| AddedToken::from(s.as_str(), true))
                    .collect(),
            )
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::default().add_prefix_space(false));
    tok.with_pre_tokenizer(Some(if config.split_digits {
        PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level,
        ]))
    } else {
        byte_level
    }));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    let files: Vec<String> = corpus_files
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    tok.train_from_files(&mut trainer, files)
        .map_err(|e| fail(format!("BPE training failed: {e}")))?;
    if config.add_bos {
        let bos = &config.bos_token;
        let bos_id = tok
            .token_to_id(bos)
            .expect("special tokens are in the trained vocabulary");
        let processor = TemplateProcessing::builder()
            .try_single(format!("{bos} $A"))
            .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
            .map_err(|e| fail(format!("bad post-processor template: {e}")))?
            .special_tokens(vec![(bos.clone(), bos_id)])
            .build()
            .map_err(|e| fail(format!("bad post-processor: {e}")))?;
        tok.with_post_processor(Some(PostProcessorWrapper::Template(processor)));
    }
    fs::create_dir_all(out_dir)
        .map_err(|e| DataError::in_file(out_dir, format!("cannot create: {e}")))?;
    tok.save(out_dir.join("tokenizer.json"), true)
        .map_err(|e| fail(format!("cannot write: {e}")))?;

    let tokens = serde_json::json!({
        "bos_token": config.bos_token,
        "eos_token": config.eos_token,
        "pad_token": config.pad_token,
        "unk_token": config.unk_token,
    });
    let mut tokenizer_config = tokens.as_object().expect("object literal").clone();
    tokenizer_config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    tokenizer_config.insert("model_max_length".into(), config.model_max_length.into());
    tokenizer_config.insert("padding_side".into(), "right".into());
    tokenizer_config.insert("add_bos_token".into(), config.add_bos.into());
    tokenizer_config.insert("add_eos_token".into(), false.into());
    tokenizer_config.insert("chat_template".into(), config.chat_template.clone().into());
    for (name, value) in [
        ("tokenizer_config.json", Value::Object(tokenizer_config)),
        ("special_tokens_map.json", tokens),
    ] {
        let path = out_dir.join(name);
        let text = serde_json::to_string_pretty(&value).expect("JSON values serialize");
        fs::write(&path, text + "\n")
            .map_err(|e| DataError::in_file(&path, format!("cannot write: {e}")))?;
    }
    Tokenizer::from_dir(out_dir)
}
