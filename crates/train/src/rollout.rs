//! Rollouts of the online-RL trainers: prompts read and validated, completions sampled from the policy with
//! the log-probs of the distribution actually sampled from, and the batch layout in which the trainers
//! re-score those completions.
//!
//! Re-scoring works on right-padded `prompt ++ completion` rows; only the positions that predict a completion
//! token reach the LM head, and the result is one flat vector of per-token log-probs (row `i` owns
//! `offsets[i]..offsets[i + 1]`). Log-probs are those of `softmax(logits / T)`, TRL's convention, which is also
//! what generation reports as `sampling_logprobs`: at the first inner step the importance ratio is 1.

use std::path::Path;

use candle_core::{Device, Tensor};
use rlhf_data::{load_dataset, tokenize_prompts, Text, Tokenizer};
use rlhf_model::{
    attention_group, generate, CausalLm, FinishReason, GenRequest, Sampling, GROUP_MEMBER_BITS,
};
use serde_json::{Map, Value};

use crate::error::{Result, TrainError};

/// One training prompt: its text as the policy sees it, its tokens, and its dataset row (for verifiers).
#[derive(Debug, Clone)]
pub struct PromptRow {
    pub text: String,
    pub ids: Vec<u32>,
    pub row: Map<String, Value>,
}

/// Reads the prompts of `path` (any format with a `prompt` column; other columns are kept for reward
/// sources). Empty prompts and prompts over `max_prompt_length` tokens are errors naming the row.
pub fn load_prompts(
    path: &Path,
    tokenizer: &Tokenizer,
    chat_template: Option<&str>,
    max_prompt_length: usize,
) -> Result<Vec<PromptRow>> {
    let data_err = |e: rlhf_data::DataError| TrainError::Data(e.to_string());
    let dataset = load_dataset(path).map_err(data_err)?;
    // Refuse a megabyte prompt before tokenizing it (that alone would cost gigabytes).
    dataset
        .check_text_size(
            tokenizer,
            max_prompt_length,
            "max_prompt_length",
            &["prompt"],
        )
        .map_err(data_err)?;
    let ids = tokenize_prompts(&dataset, tokenizer, chat_template).map_err(data_err)?;
    let prompts = dataset.prompts().map_err(data_err)?;
    if dataset.rows.is_empty() {
        return Err(TrainError::Data(format!("{}: no prompts", path.display())));
    }
    let mut out = Vec::with_capacity(ids.len());
    for ((row, ids), prompt) in dataset.rows.iter().zip(ids).zip(prompts) {
        let text = match prompt {
            Text::Plain(s) => s.clone(),
            Text::Messages(m) => {
                tokenizer
                    .apply_chat_template(m, true)
                    .map_err(data_err)?
                    .text
            }
        };
        if text.trim().is_empty() || ids.is_empty() {
            return Err(data_err(dataset.row_error(
                row,
                Some("prompt"),
                "empty prompt: every row needs text to generate from",
            )));
        }
        if ids.len() > max_prompt_length {
            return Err(data_err(dataset.row_error(
                row,
                Some("prompt"),
                format!("{} tokens, over max_prompt_length = {max_prompt_length} (raise it or shorten the prompt)", ids.len()),
            )));
        }
        out.push(PromptRow {
            text,
            ids,
            row: row.to_json(),
        });
    }
    Ok(out)
}

/// One sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Index into the step's prompts.
    pub prompt: usize,
    pub completion_ids: Vec<u32>,
    pub completion: String,
    /// `log softmax(logits / T)` of each sampled token, from generation.
    pub sampling_logprobs: Vec<f32>,
    /// Ended with EOS (not cut off by `max_new_tokens`).
    pub eos: bool,
}

/// SplitMix64: decorrelated per-sample seeds from (run seed, step, sample), so sampling needs no RNG state in
/// checkpoints and a resumed run draws exactly what the uninterrupted one would have.
pub fn sample_seed(seed: u64, step: u64, index: u64) -> u64 {
    let mut z =
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How to sample: the settings shared by every rollout of a run.
#[derive(Debug, Clone)]
pub struct SampleSpec {
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// Completions generated in one batch.
    pub batch_size: usize,
}

/// Samples `g` completions for each of `prompts` (consecutive per prompt), seeded by (`seed`, `step`).
pub fn sample(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[&PromptRow],
    g: usize,
    spec: &SampleSpec,
    seed: u64,
    step: u64,
) -> Result<Vec<Rollout>> {
    let eos = model.eos_token_ids();
    let mut requests = Vec::with_capacity(prompts.len() * g);
    for p in prompts {
        for _ in 0..g {
            let i = requests.len() as u64;
            requests.push(GenRequest {
                prompt_ids: p.ids.clone(),
                max_new_tokens: spec.max_new_tokens,
                sampling: spec.sampling.clone(),
                seed: sample_seed(seed, step, i),
                stop_ids: eos.clone(),
                ..Default::default()
            });
        }
    }
    let mut out = Vec::with_capacity(requests.len());
    for chunk in requests.chunks(spec.batch_size.max(1)) {
        for o in generate(model, chunk, None)? {
            let completion = tokenizer
                .decode(&o.tokens, true)
                .map_err(|e| TrainError::Data(e.to_string()))?;
            out.push(Rollout {
                prompt: out.len() / g,
                eos: o.finish_reason == FinishReason::Eos,
                completion_ids: o.tokens,
                completion,
                sampling_logprobs: o.sampling_logprobs,
            });
        }
    }
    Ok(out)
}

/// Right-padded `prompt ++ completion` rows and where their completion tokens are. A row's last token is left
/// out of `input_ids`: no position predicts from it, and under the causal mask it changes no other position's
/// output, so feeding it would only cost a forward and backward pass per row.
#[derive(Debug, Clone)]
pub struct SeqBatch {
    /// Rollouts (sequences), each owning a span of the flat tokens.
    pub rows: usize,
    pub seq_len: usize,
    /// `[input rows, seq_len]` u32 token ids: `prompt ++ completion` without its last token, right-padded, one
    /// row per rollout; or, [`SeqBatch::grouped`], rows packing prompts with their completions behind them.
    pub input_ids: Tensor,
    /// The positions and attention groups of a [`SeqBatch::grouped`] batch.
    pub grouping: Option<Grouping>,
    /// Flat positions (`row * seq_len + t` of `input_ids`) whose output predicts a completion token, rollout by
    /// rollout.
    pub positions: Tensor,
    /// The predicted completion tokens, aligned with `positions`.
    pub targets: Tensor,
    /// Rollout `i` owns flat tokens `offsets[i]..offsets[i + 1]`.
    pub offsets: Vec<usize>,
}

/// How [`SeqBatch::grouped`] rows pack prompts and their completions: each token's position and attention group
/// ([`CausalLm::hidden_states_grouped`]).
#[derive(Debug, Clone)]
pub struct Grouping {
    /// `[input rows, seq_len]` u32 positions: each prompt's, then each completion's continuing from it.
    pub position_ids: Tensor,
    /// `[input rows × seq_len]`: `attention_group(k, 0)` for the k-th prompt of the row, `attention_group(k, g)`
    /// for the g-th completion behind it, `u32::MAX` for padding.
    pub groups: Vec<u32>,
}

/// The group of padding in a [`Grouping`]: no real token's.
const PAD_GROUP: u32 = u32::MAX;

/// Rollout `i` of `rows`: an error unless its prompt and completion have tokens.
fn check_row(i: usize, (p, c): (&[u32], &[u32])) -> Result<()> {
    if p.is_empty() || c.is_empty() {
        return Err(TrainError::Data(format!(
            "rollout {i}: empty prompt or completion"
        )));
    }
    Ok(())
}

impl SeqBatch {
    /// `rows` are (prompt ids, completion ids); every completion must have at least one token.
    pub fn new(rows: &[(&[u32], &[u32])], pad: u32, device: &Device) -> Result<Self> {
        let seq_len = rows
            .iter()
            .map(|(p, c)| (p.len() + c.len()).saturating_sub(1))
            .max()
            .unwrap_or(0);
        let (mut ids, mut positions, mut targets, mut offsets) =
            (Vec::new(), Vec::new(), Vec::new(), vec![0]);
        for (i, &(p, c)) in rows.iter().enumerate() {
            check_row(i, (p, c))?;
            let fed = p.len() + c.len() - 1;
            ids.extend(p.iter().chain(c.iter()).take(fed).copied());
            ids.extend(std::iter::repeat_n(pad, seq_len - fed));
            for (j, &tok) in c.iter().enumerate() {
                positions.push((i * seq_len + p.len() - 1 + j) as u32);
                targets.push(tok);
            }
            offsets.push(targets.len());
        }
        let n = targets.len();
        Ok(Self {
            rows: rows.len(),
            seq_len,
            input_ids: Tensor::from_vec(ids, (rows.len(), seq_len), device)?,
            grouping: None,
            positions: Tensor::from_vec(positions, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
            offsets,
        })
    }

    /// As [`SeqBatch::new`], in fewer and fuller input rows: consecutive rollouts of the same prompt form a unit,
    /// the prompt once with each completion (without its last token) behind it in its own attention group, so
    /// that the prompt's tokens run once for all its completions (GRPO and RLOO sample several per prompt); and
    /// units are packed first-fit, longest first, into rows as long as the longest unit, so that short rollouts
    /// share a row instead of running padding. The model must attend by group ([`CausalLm::attends_by_group`]);
    /// every rollout's log-probs are those of its own `prompt ++ completion` row.
    pub fn grouped(rows: &[(&[u32], &[u32])], pad: u32, device: &Device) -> Result<Self> {
        // Per unit: ids, positions, members (0: the prompt; g: its g-th completion); per completion token:
        // (unit, index in the unit it is predicted from).
        let mut units: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> = Vec::new();
        let (mut from, mut targets, mut offsets) = (Vec::new(), Vec::new(), vec![0]);
        let (mut prev_prompt, mut member): (Option<&[u32]>, u32) = (None, 0);
        for (i, &(p, c)) in rows.iter().enumerate() {
            check_row(i, (p, c))?;
            if prev_prompt != Some(p) {
                units.push((p.to_vec(), (0..p.len() as u32).collect(), vec![0; p.len()]));
                (prev_prompt, member) = (Some(p), 0);
            }
            // Counted per completion, also for one-token completions that add no input token.
            member += 1;
            if member >= 1 << GROUP_MEMBER_BITS {
                return Err(TrainError::Data(format!(
                    "rollout {i}: more than {} completions of one prompt in a batch",
                    (1 << GROUP_MEMBER_BITS) - 1
                )));
            }
            let u = units.len() - 1;
            let (ids, pos, members) = &mut units[u];
            let mut prev = p.len() - 1;
            for (j, &tok) in c.iter().enumerate() {
                from.push((u, prev));
                targets.push(tok);
                if j + 1 < c.len() {
                    ids.push(tok);
                    pos.push((p.len() + j) as u32);
                    members.push(member);
                    prev = ids.len() - 1;
                }
            }
            offsets.push(targets.len());
        }
        let seq_len = units.iter().map(|(ids, ..)| ids.len()).max().unwrap_or(0);
        // Each unit's (input row, offset in it, unit number in it); rows as (tokens used, units).
        let mut order: Vec<usize> = (0..units.len()).collect();
        order.sort_by_key(|&u| std::cmp::Reverse(units[u].0.len()));
        let (mut place, mut fill) = (vec![(0, 0, 0); units.len()], Vec::<(usize, u32)>::new());
        for u in order {
            let len = units[u].0.len();
            let r = match fill.iter().position(|&(used, _)| used + len <= seq_len) {
                Some(r) => r,
                None => {
                    fill.push((0, 0));
                    fill.len() - 1
                }
            };
            place[u] = (r, fill[r].0, fill[r].1);
            fill[r] = (fill[r].0 + len, fill[r].1 + 1);
        }
        let input_rows = fill.len();
        let mut ids = vec![pad; input_rows * seq_len];
        let mut pos = vec![0; input_rows * seq_len];
        let mut groups = vec![PAD_GROUP; input_rows * seq_len];
        for ((i, p, m), &(r, off, k)) in units.iter().zip(&place) {
            let at = r * seq_len + off;
            ids[at..at + i.len()].copy_from_slice(i);
            pos[at..at + p.len()].copy_from_slice(p);
            for (g, &m) in groups[at..at + m.len()].iter_mut().zip(m) {
                *g = attention_group(k, m);
            }
        }
        let positions: Vec<u32> = from
            .iter()
            .map(|&(u, t)| {
                let (r, off, _) = place[u];
                (r * seq_len + off + t) as u32
            })
            .collect();
        let n = targets.len();
        Ok(Self {
            rows: rows.len(),
            seq_len,
            input_ids: Tensor::from_vec(ids, (input_rows, seq_len), device)?,
            grouping: Some(Grouping {
                position_ids: Tensor::from_vec(pos, (input_rows, seq_len), device)?,
                groups,
            }),
            positions: Tensor::from_vec(positions, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
            offsets,
        })
    }

    pub fn num_tokens(&self) -> usize {
        *self.offsets.last().unwrap_or(&0)
    }

    /// Row lengths (completion tokens).
    pub fn lengths(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// The row owning each flat token.
    pub fn owners(&self) -> Vec<usize> {
        self.offsets
            .windows(2)
            .enumerate()
            .flat_map(|(i, w)| std::iter::repeat_n(i, w[1] - w[0]))
            .collect()
    }

    /// Spreads one value per row over that row's tokens.
    pub fn per_token(&self, per_row: &[f32]) -> Vec<f32> {
        self.owners().into_iter().map(|i| per_row[i]).collect()
    }

    /// `[rows, tokens]` 0/1 membership matrix: `M · x` sums a per-token vector per row.
    pub fn membership(&self) -> Result<Tensor> {
        let n = self.num_tokens();
        let mut m = vec![0f32; self.rows * n];
        for (j, i) in self.owners().into_iter().enumerate() {
            m[i * n + j] = 1.0;
        }
        Ok(Tensor::from_vec(m, (self.rows, n), self.targets.device())?)
    }
}

/// The hidden states feeding the LM head at the completion positions, `[tokens, hidden]`.
pub fn completion_hidden(model: &CausalLm, batch: &SeqBatch) -> Result<Tensor> {
    let g = batch.grouping.as_ref();
    Ok(model.hidden_states_at(
        &batch.input_ids,
        g.map(|g| &g.position_ids),
        g.map(|g| &g.groups[..]),
        &batch.positions,
    )?)
}

/// Per-token log-probs of the completions under `softmax(logits / T)` (differentiable, `[tokens]`), and, when
/// `with_entropy`, the entropy of that distribution at each position (detached).
pub fn token_logprobs(
    model: &CausalLm,
    batch: &SeqBatch,
    temperature: f64,
    with_entropy: bool,
) -> Result<(Tensor, Option<Vec<f32>>)> {
    let hidden = completion_hidden(model, batch)?;
    let scaled = temperature > 0.0 && temperature != 1.0;
    if !with_entropy {
        // The fused LM head + log-softmax never materialises [tokens, vocab]; the supported heads have no bias,
        // so logits / T = W·(h / T).
        let h = if scaled {
            (hidden / temperature)?
        } else {
            hidden
        };
        return Ok((model.token_logprobs_from_hidden(&h, &batch.targets)?, None));
    }
    let logits = model.logits(&hidden)?;
    let logits = if scaled {
        (logits / temperature)?
    } else {
        logits
    };
    let logp = rlhf_model::token_logprobs(&logits, &batch.targets)?;
    let lsm = candle_nn::ops::log_softmax(&logits.detach(), 1)?;
    let ent = (lsm.exp()? * &lsm)?.sum(1)?.neg()?;
    Ok((logp, Some(ent.to_vec1::<f32>()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_rows_hold_each_prompt_once_and_every_completion_in_its_own_group() {
        let (a, b, c): (&[u32], &[u32], &[u32]) = (&[10, 11, 12], &[20, 21], &[30, 31]);
        // A one-token completion adds no input token but still takes a group of its own; the short units of
        // b and c share the second row.
        let rows: [(&[u32], &[u32]); 5] = [
            (a, &[1]),
            (a, &[2, 3, 4]),
            (a, &[5, 6]),
            (b, &[7, 8]),
            (c, &[9]),
        ];
        let s = SeqBatch::grouped(&rows, 0, &Device::Cpu).unwrap();
        assert_eq!((s.rows, s.seq_len), (5, 6));
        let ids: Vec<Vec<u32>> = s.input_ids.to_vec2().unwrap();
        assert_eq!(ids, [vec![10, 11, 12, 2, 3, 5], vec![20, 21, 7, 30, 31, 0]]);
        let g = s.grouping.as_ref().unwrap();
        let c0 = attention_group(1, 0);
        assert_eq!(g.groups, [0, 0, 0, 2, 2, 3, 0, 0, 1, c0, c0, PAD_GROUP]);
        let pos: Vec<Vec<u32>> = g.position_ids.to_vec2().unwrap();
        assert_eq!(pos, [vec![0, 1, 2, 3, 4, 3], vec![0, 1, 2, 0, 1, 0]]);
        // Each completion token is predicted from the prompt's last token, then from its own previous one.
        let at: Vec<u32> = s.positions.to_vec1().unwrap();
        assert_eq!(at, [2, 2, 3, 4, 2, 5, 7, 8, 10]);
        let targets: Vec<u32> = s.targets.to_vec1().unwrap();
        assert_eq!(targets, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(s.offsets, [0, 1, 4, 6, 8, 9]);
        let empty: [(&[u32], &[u32]); 1] = [(a, &[])];
        assert!(SeqBatch::grouped(&empty, 0, &Device::Cpu).is_err());
    }
}
