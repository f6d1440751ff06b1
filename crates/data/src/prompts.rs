//! Prompts for online RL (GRPO/RLOO/PPO), tokenized as TRL 1.16's `GRPOTrainer._tokenize_prompts`: plain
//! prompts with `tokenizer(prompt)` (special tokens added), conversations rendered with the generation prompt.

use crate::chat_template::ChatTemplate;
use crate::dataset::Dataset;
use crate::error::Result;
use crate::formats::Text;
use crate::sft::need_template;
use crate::tokenizer::Tokenizer;

/// One prompt. `template` is required for conversational prompts.
pub fn tokenize_prompt(
    prompt: &Text,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<Vec<u32>> {
    match prompt {
        Text::Plain(p) => tokenizer.encode(p, true),
        Text::Messages(m) => Ok(tokenizer
            .tokenize_chat(need_template(template, tokenizer)?, m, true)?
            .ids),
    }
}

/// The prompt of every row (any format with a `prompt` field), with the tokenizer's chat template
/// (`template_name`, or its default) for conversational data. Errors name the row.
pub fn tokenize_prompts(
    dataset: &Dataset,
    tokenizer: &Tokenizer,
    template_name: Option<&str>,
) -> Result<Vec<Vec<u32>>> {
    let prompts = dataset.prompts()?;
    let template = if dataset.conversational {
        Some(tokenizer.chat_template(template_name)?)
    } else {
        None
    };
    prompts
        .into_iter()
        .zip(&dataset.rows)
        .map(|(p, row)| {
            tokenize_prompt(p, tokenizer, template).map_err(|e| {
                dataset.row_error(
                    row,
                    e.field.as_deref(),
                    format!("{}: {}", e.file, e.message),
                )
            })
        })
        .collect()
}
