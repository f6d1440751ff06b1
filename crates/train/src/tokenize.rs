//! Dataset → [`SftExample`]s, following TRL's SFT preprocessing for non-conversational data: prompt and
//! prompt+completion are tokenized with special tokens, EOS is appended to the completion (or the text),
//! sequences are cut to `max_length` (keep start), and rows left without loss tokens are dropped.

use std::path::Path;

use rlhf_data::{Record, Tokenizer};

use crate::config::SftConfig;
use crate::error::{Result, TrainError};
use crate::sft::SftExample;

pub fn sft_examples(cfg: &SftConfig, tokenizer: &Tokenizer, path: &Path) -> Result<Vec<SftExample>> {
    let data_err = |e: rlhf_data::DataError| TrainError::Data(e.to_string());
    let dataset = rlhf_data::load_dataset(path).map_err(data_err)?;
    let eos = tokenizer.eos_token().map_err(data_err)?.to_string();
    let mut out = Vec::with_capacity(dataset.rows.len());
    for row in &dataset.rows {
        let (prompt, full) = match &row.record {
            Record::PromptCompletion(r) => match (r.prompt.as_plain(), r.completion.as_plain()) {
                (Some(p), Some(c)) => (Some(p.to_string()), format!("{p}{c}")),
                _ => return Err(TrainError::Data(dataset.row_error(row, Some("prompt"), "conversational SFT data is not supported yet").to_string())),
            },
            Record::LanguageModeling(r) => (None, r.text.clone()),
            other => {
                return Err(TrainError::Data(
                    dataset
                        .row_error(row, None, format!("SFT needs prompt/completion or text rows, got {}", other.format()))
                        .to_string(),
                ))
            }
        };
        let full = if full.ends_with(&eos) { full } else { full + &eos };
        let mut ids = tokenizer.encode(&full, true).map_err(data_err)?;
        let prompt_len = match (&prompt, cfg.completion_only_loss) {
            (Some(p), true) => tokenizer.encode(p, true).map_err(data_err)?.len(),
            _ => 0,
        };
        let mut loss_mask: Vec<bool> = (0..ids.len()).map(|i| i >= prompt_len).collect();
        ids.truncate(cfg.max_length);
        loss_mask.truncate(cfg.max_length);
        let ex = SftExample { input_ids: ids, loss_mask, position_ids: None };
        if ex.num_loss_tokens() > 0 {
            out.push(ex);
        }
    }
    Ok(out)
}
