//! SFT examples tokenized exactly as TRL 1.16's `SFTTrainer._prepare_dataset` does:
//!
//! - `text`: EOS text appended unless present, `tokenizer(text)` (with special tokens), every token trained.
//! - `prompt`/`completion` strings: EOS appended to the completion, `tokenizer(prompt)` and
//!   `tokenizer(prompt + completion)`; the completion starts at their common prefix; with
//!   `completion_only_loss` (the default) the prompt is not trained.
//! - conversational `prompt`/`completion`: the prompt rendered with `add_generation_prompt=True`, the whole
//!   conversation without; same common-prefix rule; no EOS added (the template writes it).
//! - `messages`: the rendered conversation; every token trained, or with `assistant_only_loss` only the tokens
//!   inside the template's `{% generation %}` blocks.
//! - `correction` rows train on prompt → corrected completion.
//!
//! Then truncation to `max_length` (dropping examples left without trained tokens), or packing.

use crate::chat_template::ChatTemplate;
use crate::dataset::Dataset;
use crate::error::{DataError, Position, Result};
use crate::formats::{Message, PromptCompletion, Record, Text};
use crate::tokenizer::Tokenizer;

/// Label of tokens that are not trained (PyTorch's `ignore_index`, as in TRL's `labels`).
pub const IGNORE: i64 = -100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Keep the first `max_length` tokens (TRL's default `keep_start`).
    KeepStart,
    /// Keep the last `max_length` tokens.
    KeepEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// Best-fit-decreasing bins of whole examples (each cut to `max_length`); position ids restart per example.
    Bfd,
    /// Concatenate everything and cut into `max_length` rows, ignoring example boundaries.
    Wrapped,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SftConfig {
    /// TRL default 1024; None: no truncation (not allowed with packing).
    pub max_length: Option<usize>,
    pub truncation: Truncation,
    /// Train only on the completion of prompt/completion rows (TRL's default for that format).
    pub completion_only_loss: bool,
    /// Train only on `{% generation %}` tokens of conversational rows.
    pub assistant_only_loss: bool,
    pub packing: Option<Packing>,
    /// Named chat template of the tokenizer; None: its default.
    pub chat_template: Option<String>,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            max_length: Some(1024),
            truncation: Truncation::KeepStart,
            completion_only_loss: true,
            assistant_only_loss: false,
            packing: None,
            chat_template: None,
        }
    }
}

/// One training row: token ids and TRL-style labels (`IGNORE` = not trained, else the id itself).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedSequence {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Lengths of the examples packed into this row (one entry when not packed); they sum to the row length.
    pub seq_lengths: Vec<usize>,
    /// Made by BFD packing: the collator then also leaves the first token of each example untrained, as TRL's
    /// padding-free collator does, so no example is trained to predict the start of the next.
    pub packed: bool,
}

impl TokenizedSequence {
    pub fn new(input_ids: Vec<u32>, labels: Vec<i64>) -> Self {
        let n = input_ids.len();
        TokenizedSequence {
            input_ids,
            labels,
            seq_lengths: vec![n],
            packed: false,
        }
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of trained tokens.
    pub fn num_trained(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// The SFT rows of a dataset, and how many examples truncation left without trained tokens (dropped, as TRL does).
#[derive(Debug, Clone, PartialEq)]
pub struct SftData {
    pub rows: Vec<TokenizedSequence>,
    pub dropped: usize,
}

/// Number of leading ids two sequences share (TRL's `common_prefix_length`).
pub fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// `text + eos` unless it already ends with it (TRL's `add_eos`).
pub(crate) fn with_eos(text: &str, eos: &str) -> String {
    if text.ends_with(eos) {
        text.to_string()
    } else {
        format!("{text}{eos}")
    }
}

fn labels_where(ids: &[u32], keep: impl Fn(usize) -> bool) -> Vec<i64> {
    ids.iter()
        .enumerate()
        .map(|(i, &id)| if keep(i) { i64::from(id) } else { IGNORE })
        .collect()
}

/// Tokenizes every row of an SFT dataset (`language_modeling`, `conversational`, `prompt_completion` or
/// `correction`), then truncates or packs. Errors name the row.
pub fn tokenize_sft(
    dataset: &Dataset,
    tokenizer: &Tokenizer,
    config: &SftConfig,
) -> Result<SftData> {
    use crate::formats::Format;
    dataset.require(
        &[
            Format::LanguageModeling,
            Format::Conversational,
            Format::PromptCompletion,
            Format::Correction,
        ],
        "SFT",
    )?;
    let template = if dataset.conversational {
        Some(tokenizer.chat_template(config.chat_template.as_deref())?)
    } else {
        None
    };
    let mut rows = Vec::with_capacity(dataset.len());
    for row in &dataset.rows {
        let seq = tokenize_sft_record(&row.record, tokenizer, template, config)
            .map_err(|e| relocate(e, &dataset.source, row.position))?;
        rows.push(seq);
    }
    match config.packing {
        Some(strategy) => {
            let max_length = config.max_length.ok_or_else(|| {
                DataError::new(
                    &dataset.source,
                    "packing needs max_length (the length of the packed rows)",
                )
            })?;
            Ok(SftData {
                rows: pack(rows, max_length, strategy),
                dropped: 0,
            })
        }
        None => {
            let before = rows.len();
            if let Some(max_length) = config.max_length {
                for r in &mut rows {
                    truncate(r, max_length, config.truncation);
                }
                rows.retain(|r| r.num_trained() > 0);
            }
            Ok(SftData {
                dropped: before - rows.len(),
                rows,
            })
        }
    }
}

/// Errors of one record get the dataset's file and the row's position (tokenizer errors keep their own file
/// in the message).
fn relocate(e: DataError, source: &str, position: Option<Position>) -> DataError {
    if e.file == source {
        return e;
    }
    let mut out = DataError::new(source, format!("{}: {}", e.file, e.message));
    out.position = position;
    out.field = e.field;
    out
}

/// One SFT record. `template` is required for conversational records.
pub fn tokenize_sft_record(
    record: &Record,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    config: &SftConfig,
) -> Result<TokenizedSequence> {
    match record {
        Record::LanguageModeling(r) => {
            let ids = tokenizer.encode(&with_eos(&r.text, tokenizer.eos_token()?), true)?;
            let labels = labels_where(&ids, |_| true);
            Ok(TokenizedSequence::new(ids, labels))
        }
        Record::Conversational(r) => {
            let chat =
                tokenizer.tokenize_chat(need_template(template, tokenizer)?, &r.messages, false)?;
            check_assistant_mask(&chat.assistant_mask, tokenizer, config)?;
            let mask = &chat.assistant_mask;
            let labels = labels_where(&chat.ids, |i| !config.assistant_only_loss || mask[i] == 1);
            Ok(TokenizedSequence::new(chat.ids, labels))
        }
        Record::PromptCompletion(pc) => prompt_completion(pc, tokenizer, template, config),
        Record::Correction(c) => {
            prompt_completion(&c.to_demonstration(), tokenizer, template, config)
        }
        other => Err(DataError::new(
            tokenizer.file(),
            format!("SFT cannot train on a {} record", other.format()),
        )),
    }
}

pub(crate) fn need_template<'t>(
    template: Option<&'t ChatTemplate>,
    tokenizer: &Tokenizer,
) -> Result<&'t ChatTemplate> {
    template.ok_or_else(|| {
        DataError::new(
            tokenizer.file(),
            "conversational data needs a chat template",
        )
    })
}

/// TRL refuses `assistant_only_loss` rows whose template marks no assistant token.
fn check_assistant_mask(mask: &[u8], tokenizer: &Tokenizer, config: &SftConfig) -> Result<()> {
    if config.assistant_only_loss && !mask.contains(&1) {
        return Err(DataError::new(
            tokenizer.file(),
            "assistant_only_loss is set but the chat template marks no assistant tokens in this row \
             (it needs {% generation %}...{% endgeneration %} around assistant turns)",
        ));
    }
    Ok(())
}

fn prompt_completion(
    pc: &PromptCompletion,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    config: &SftConfig,
) -> Result<TokenizedSequence> {
    let (prompt_ids, ids, assistant_mask) = match (&pc.prompt, &pc.completion) {
        (Text::Plain(p), Text::Plain(c)) => {
            let completion = with_eos(c, tokenizer.eos_token()?);
            (
                tokenizer.encode(p, true)?,
                tokenizer.encode(&format!("{p}{completion}"), true)?,
                None,
            )
        }
        (Text::Messages(p), Text::Messages(c)) => {
            let template = need_template(template, tokenizer)?;
            let prompt = tokenizer.tokenize_chat(template, p, true)?;
            let all: Vec<Message> = p.iter().chain(c).cloned().collect();
            let full = tokenizer.tokenize_chat(template, &all, false)?;
            check_assistant_mask(&full.assistant_mask, tokenizer, config)?;
            (
                prompt.ids,
                full.ids,
                config.assistant_only_loss.then_some(full.assistant_mask),
            )
        }
        _ => {
            return Err(DataError::new(
                tokenizer.file(),
                "prompt and completion must both be strings or both be message lists",
            ))
        }
    };
    let prompt_len = common_prefix_length(&prompt_ids, &ids);
    let labels = labels_where(&ids, |i| {
        (!config.completion_only_loss || i >= prompt_len)
            && assistant_mask.as_ref().is_none_or(|m| m[i] == 1)
    });
    Ok(TokenizedSequence::new(ids, labels))
}

pub(crate) fn truncate(seq: &mut TokenizedSequence, max_length: usize, mode: Truncation) {
    let n = seq.input_ids.len();
    if n <= max_length {
        return;
    }
    match mode {
        Truncation::KeepStart => {
            seq.input_ids.truncate(max_length);
            seq.labels.truncate(max_length);
        }
        Truncation::KeepEnd => {
            seq.input_ids.drain(..n - max_length);
            seq.labels.drain(..n - max_length);
        }
    }
    seq.seq_lengths = vec![max_length];
}

/// `datasets.map(batched=True)` hands TRL's packer 1000 examples at a time; bins never mix batches.
const PACKING_BATCH: usize = 1000;

/// TRL's `pack_dataset`. BFD: per batch of 1000, drop empty examples, cut each to `max_length`, sort by length
/// (descending, stable) and put each into the fullest bin it fits (best fit; among equal bins the oldest),
/// else a new bin. Wrapped: concatenate and cut.
pub fn pack(
    rows: Vec<TokenizedSequence>,
    max_length: usize,
    strategy: Packing,
) -> Vec<TokenizedSequence> {
    match strategy {
        Packing::Wrapped => {
            let ids: Vec<u32> = rows
                .iter()
                .flat_map(|r| r.input_ids.iter().copied())
                .collect();
            let labels: Vec<i64> = rows.iter().flat_map(|r| r.labels.iter().copied()).collect();
            ids.chunks(max_length)
                .zip(labels.chunks(max_length))
                .map(|(i, l)| TokenizedSequence::new(i.to_vec(), l.to_vec()))
                .collect()
        }
        Packing::Bfd => {
            let mut out = Vec::new();
            let mut rows = rows.into_iter().peekable();
            while rows.peek().is_some() {
                let batch: Vec<TokenizedSequence> = rows.by_ref().take(PACKING_BATCH).collect();
                out.extend(pack_bfd_batch(batch, max_length));
            }
            out
        }
    }
}

fn pack_bfd_batch(batch: Vec<TokenizedSequence>, max_length: usize) -> Vec<TokenizedSequence> {
    use std::collections::{BTreeMap, VecDeque};
    let mut seqs: Vec<TokenizedSequence> = batch
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(|mut s| {
            truncate(&mut s, max_length, Truncation::KeepStart);
            s
        })
        .collect();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by(|&a, &b| seqs[b].len().cmp(&seqs[a].len()));
    // bins[i] = example indices; free space → bins with exactly that much room, oldest first.
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut by_space: BTreeMap<usize, VecDeque<usize>> = BTreeMap::new();
    for idx in order {
        let len = seqs[idx].len();
        let fit = by_space
            .range(len..max_length)
            .next()
            .map(|(&space, _)| space);
        let (bin, space) = match fit {
            Some(space) => {
                let queue = by_space.get_mut(&space).expect("key just found");
                let bin = queue.pop_front().expect("queues are never left empty");
                if queue.is_empty() {
                    by_space.remove(&space);
                }
                (bin, space)
            }
            None => {
                bins.push(Vec::new());
                (bins.len() - 1, max_length)
            }
        };
        bins[bin].push(idx);
        if space > len {
            by_space.entry(space - len).or_default().push_back(bin);
        }
    }
    bins.into_iter()
        .map(|members| {
            let mut row = TokenizedSequence {
                input_ids: vec![],
                labels: vec![],
                seq_lengths: vec![],
                packed: true,
            };
            for idx in members {
                let s = std::mem::take(&mut seqs[idx]);
                row.seq_lengths.push(s.input_ids.len());
                row.input_ids.extend(s.input_ids);
                row.labels.extend(s.labels);
            }
            row
        })
        .collect()
}

impl Default for TokenizedSequence {
    fn default() -> Self {
        TokenizedSequence::new(Vec::new(), Vec::new())
    }
}
