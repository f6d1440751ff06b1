//! Preference pairs (and single completions) tokenized as TRL 1.16's `DPOTrainer` (and, identically for the full sequences,
//! `RewardTrainer`) does: EOS text appended to plain chosen/rejected unless present; `tokenizer(prompt)`,
//! `tokenizer(prompt + chosen)`, `tokenizer(prompt + rejected)` (with special tokens), or for conversations the
//! prompt rendered with the generation prompt and prompt+chosen / prompt+rejected rendered without. The prompt
//! is cut to the shortest common prefix with both full sequences, so `prompt_ids + chosen_ids` is exactly the
//! tokenized prompt+chosen (what the reward model scores).

use crate::chat_template::ChatTemplate;
use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::formats::{Message, Preference, Text};
use crate::sft::{common_prefix_length, need_template, with_eos, Truncation};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceExample {
    pub prompt_ids: Vec<u32>,
    /// Completion tokens (EOS included).
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    /// The row's `margin` (reward modelling).
    pub margin: Option<f64>,
}

impl PreferenceExample {
    pub fn chosen_sequence(&self) -> Vec<u32> {
        [self.prompt_ids.as_slice(), &self.chosen_ids].concat()
    }

    pub fn rejected_sequence(&self) -> Vec<u32> {
        [self.prompt_ids.as_slice(), &self.rejected_ids].concat()
    }

    /// DPOTrainer keeps a pair unless `keep_start` truncation would leave no completion token.
    pub fn fits_dpo(&self, max_length: Option<usize>, truncation: Truncation) -> bool {
        match (max_length, truncation) {
            (Some(m), Truncation::KeepStart) => self.prompt_ids.len() < m,
            _ => true,
        }
    }

    /// RewardTrainer drops pairs whose chosen or rejected sequence is longer than `max_length`.
    pub fn fits_reward(&self, max_length: Option<usize>) -> bool {
        max_length.is_none_or(|m| {
            self.prompt_ids.len() + self.chosen_ids.len() <= m
                && self.prompt_ids.len() + self.rejected_ids.len() <= m
        })
    }
}

/// A prompt and one completion tokenized by the same rules (TRL's `KTOTrainer`; also how ratings and
/// unpaired rows are scored): `prompt_ids + completion_ids` is the tokenized prompt+completion.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionExample {
    pub prompt_ids: Vec<u32>,
    /// Completion tokens (EOS included).
    pub completion_ids: Vec<u32>,
}

/// The tokenized prompt and the tokenized prompt+completion for each completion (EOS text appended to plain
/// completions unless present; conversations rendered with/without the generation prompt).
fn encode_prompt_and_full(
    prompt: &Text,
    completions: &[&Text],
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
    let mixed = || {
        DataError::new(
            tokenizer.file(),
            "prompt and completions must all be strings or all be message lists",
        )
    };
    match prompt {
        Text::Plain(p) => {
            let eos = tokenizer.eos_token()?;
            let full = completions
                .iter()
                .map(|c| match c {
                    Text::Plain(c) => tokenizer.encode(&format!("{p}{}", with_eos(c, eos)), true),
                    Text::Messages(_) => Err(mixed()),
                })
                .collect::<Result<_>>()?;
            Ok((tokenizer.encode(p, true)?, full))
        }
        Text::Messages(p) => {
            let template = need_template(template, tokenizer)?;
            let full = completions
                .iter()
                .map(|c| match c {
                    Text::Messages(c) => {
                        let all: Vec<Message> = p.iter().chain(c).cloned().collect();
                        Ok(tokenizer.tokenize_chat(template, &all, false)?.ids)
                    }
                    Text::Plain(_) => Err(mixed()),
                })
                .collect::<Result<_>>()?;
            Ok((tokenizer.tokenize_chat(template, p, true)?.ids, full))
        }
    }
}

/// Tokenizes a prompt and one completion. `template` is required for conversations.
pub fn tokenize_completion(
    prompt: &Text,
    completion: &Text,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<CompletionExample> {
    let (prompt_ids, mut full) =
        encode_prompt_and_full(prompt, &[completion], tokenizer, template)?;
    let full = full.pop().expect("one completion in, one out");
    let prompt_len = common_prefix_length(&prompt_ids, &full);
    Ok(CompletionExample {
        prompt_ids: full[..prompt_len].to_vec(),
        completion_ids: full[prompt_len..].to_vec(),
    })
}

/// Tokenizes one pair. `template` is required for conversational pairs.
pub fn tokenize_pair(
    pair: &Preference,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<PreferenceExample> {
    let (prompt_ids, full) = encode_prompt_and_full(
        &pair.prompt,
        &[&pair.chosen, &pair.rejected],
        tokenizer,
        template,
    )?;
    let (chosen, rejected) = (&full[0], &full[1]);
    let prompt_len =
        common_prefix_length(&prompt_ids, chosen).min(common_prefix_length(&prompt_ids, rejected));
    Ok(PreferenceExample {
        prompt_ids: chosen[..prompt_len].to_vec(),
        chosen_ids: chosen[prompt_len..].to_vec(),
        rejected_ids: rejected[prompt_len..].to_vec(),
        margin: pair.margin,
    })
}

/// Tokenizes every pair of a preference dataset (`preference`, `implicit_preference` or `correction`), with the
/// tokenizer's chat template (`template_name`, or its default) for conversational data. Errors name the row.
pub fn tokenize_preferences(
    dataset: &Dataset,
    tokenizer: &Tokenizer,
    template_name: Option<&str>,
) -> Result<Vec<PreferenceExample>> {
    let pairs = dataset.preference_pairs()?;
    let template = if dataset.conversational {
        Some(tokenizer.chat_template(template_name)?)
    } else {
        None
    };
    pairs
        .iter()
        .zip(&dataset.rows)
        .map(|(pair, row)| {
            tokenize_pair(pair, tokenizer, template).map_err(|e| {
                dataset.row_error(
                    row,
                    e.field.as_deref(),
                    format!("{}: {}", e.file, e.message),
                )
            })
        })
        .collect()
}
