//! Data helpers the preference trainers share: prompt + completion tokenization, row errors, padding, and
//! the arithmetic pairs of the benchmarks.

use candle_core::{Device, Tensor};
use rlhf_data::{tokenize_pair, Dataset, Preference, PreferenceExample, Row, Text, Tokenizer};

use crate::error::{Result, TrainError};

pub(crate) fn data_err(e: rlhf_data::DataError) -> TrainError {
    TrainError::Data(e.to_string())
}

/// Prompt and completion tokenized as the chosen side of a pair (TRL's prompt+completion tokenization).
pub(crate) fn tokenize_completion(
    prompt: &Text,
    completion: &Text,
    tokenizer: &Tokenizer,
    template: Option<&rlhf_data::ChatTemplate>,
) -> rlhf_data::Result<(Vec<u32>, Vec<u32>)> {
    let p = Preference {
        prompt: prompt.clone(),
        chosen: completion.clone(),
        rejected: completion.clone(),
        margin: None,
    };
    let ex = tokenize_pair(&p, tokenizer, template)?;
    Ok((ex.prompt_ids, ex.chosen_ids))
}

/// An error about one row (file:line: field ...).
pub(crate) fn row_err(ds: &Dataset, row: &Row, e: rlhf_data::DataError) -> TrainError {
    data_err(ds.row_error(row, e.field.as_deref(), e.message))
}

/// Right-pads token rows into a u32 `[b, t]` tensor; returns it with the row lengths.
pub(crate) fn pad_rows(rows: &[&[u32]], pad: u32, device: &Device) -> Result<(Tensor, Vec<usize>)> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![pad; rows.len() * t];
    for (i, r) in rows.iter().enumerate() {
        ids[i * t..i * t + r.len()].copy_from_slice(r);
    }
    Ok((
        Tensor::from_vec(ids, (rows.len(), t), device)?,
        rows.iter().map(|r| r.len()).collect(),
    ))
}

/// Arithmetic preference pairs like the TRL baseline's (`"Q: 17+25="` → `" 42"` vs. a wrong sum), tokenized.
pub fn bench_pairs(tokenizer: &Tokenizer, n: usize, seed: u64) -> Result<Vec<PreferenceExample>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (a, b) = (rng.gen_range(10..100), rng.gen_range(10..100));
            let wrong = a
                + b
                + if rng.gen_bool(0.5) {
                    rng.gen_range(1..11)
                } else {
                    -rng.gen_range(1..11)
                };
            let pair = Preference {
                prompt: Text::Plain(format!("Q: {a}+{b}=")),
                chosen: Text::Plain(format!(" {}", a + b)),
                rejected: Text::Plain(format!(" {wrong}")),
                margin: None,
            };
            tokenize_pair(&pair, tokenizer, None).map_err(data_err)
        })
        .collect()
}
