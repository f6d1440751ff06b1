//! Batched autoregressive generation with a preallocated KV cache.
//!
//! Prompts of different lengths are left-padded to a common length; every row gets its own
//! positions (counted from its first real token) and a key mask hiding the padding, so a
//! request's output does not depend on the other requests of the batch. Each request samples
//! from its own RNG seeded with `seed`, drawing exactly one number per sampled token.
//!
//! `GenOutput::logprobs` are log-probabilities of the chosen tokens under the model's
//! unmodified distribution — `log_softmax(logits)` at temperature 1, before top-k/top-p — i.e.
//! what [`crate::token_logprobs`] gives when the sequence is re-scored with a full forward pass.

use crate::{CausalLm, Positions};
use candle_core::{bail, Result, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Sampling settings applied in the order of `transformers`: temperature, top-k, top-p.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// `<= 0` means greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
}

impl Sampling {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl Default for Sampling {
    /// Pure sampling from the model distribution (T = 1, no truncation).
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenRequest {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// Generation stops after any of these tokens (it is included in the output).
    pub stop_ids: Vec<u32>,
    /// Generation stops once the decoded completion contains one of these (the completing token
    /// is included). Needs the `decode` callback of [`generate`].
    pub stop_strings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A token of `stop_ids` was produced.
    Eos,
    /// The completion contains one of `stop_strings`.
    StopString,
    /// `max_new_tokens` were produced.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenOutput {
    /// New tokens only (no prompt).
    pub tokens: Vec<u32>,
    /// `log p(token)` under the unmodified (T = 1) model distribution, one per token.
    pub logprobs: Vec<f32>,
    /// `log p(token)` under the distribution sampled from as TRL defines it: `log_softmax(logits / T)` over the
    /// whole vocabulary (top-k/top-p do not renormalise it; greedy counts as T = 1). What RL trainers re-score.
    pub sampling_logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

fn log_sum_exp(x: &[f32]) -> f32 {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    m + x.iter().map(|&v| (v - m).exp()).sum::<f32>().ln()
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// `log_softmax(logits / T)[tok]`; T <= 0 (greedy) counts as 1.
fn sampling_logprob(logits: &[f32], tok: usize, temperature: f32) -> f32 {
    if temperature <= 0.0 || temperature == 1.0 {
        return logits[tok] - log_sum_exp(logits);
    }
    let scaled: Vec<f32> = logits.iter().map(|&x| x / temperature).collect();
    scaled[tok] - log_sum_exp(&scaled)
}

/// Draws a token from `logits` (one row) under `s`; greedy draws no random number.
fn sample(logits: &[f32], s: &Sampling, rng: &mut StdRng) -> usize {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / s.temperature;
    let truncate = (s.top_k > 0 && s.top_k < logits.len()) || s.top_p < 1.0;
    // Candidates in a batch-independent order: all ids ascending, or by (logit desc, id asc).
    let mut cand: Vec<usize> = (0..logits.len()).collect();
    if truncate {
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if s.top_k > 0 && s.top_k < cand.len() {
            cand.select_nth_unstable_by(s.top_k - 1, by_logit);
            cand.truncate(s.top_k);
        }
        cand.sort_unstable_by(by_logit);
    }
    let m = cand
        .iter()
        .map(|&i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max);
    let mut w: Vec<f64> = cand
        .iter()
        .map(|&i| (((logits[i] - m) * inv_t) as f64).exp())
        .collect();
    if s.top_p < 1.0 {
        let total: f64 = w.iter().sum();
        let (mut acc, mut keep) = (0.0, w.len());
        for (j, &p) in w.iter().enumerate() {
            acc += p / total;
            if acc >= s.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        w.truncate(keep);
    }
    let total: f64 = w.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (j, &p) in w.iter().enumerate() {
        if u < p {
            return cand[j];
        }
        u -= p;
    }
    cand[w.len() - 1] // rounding left u just past the last weight
}

/// Turns completion token ids into text (for `stop_strings`).
pub type Decode<'a> = &'a dyn Fn(&[u32]) -> String;

/// Generates completions for a batch of requests (see the module docs). `decode` is needed only
/// for `stop_strings`.
pub fn generate(
    model: &CausalLm,
    requests: &[GenRequest],
    decode: Option<Decode>,
) -> Result<Vec<GenOutput>> {
    let b = requests.len();
    if b == 0 {
        return Ok(vec![]);
    }
    let vocab = model.vocab_size();
    for (i, r) in requests.iter().enumerate() {
        if r.prompt_ids.is_empty() {
            bail!("generate: request {i}: prompt_ids is empty")
        }
        if let Some(&t) = r.prompt_ids.iter().find(|&&t| t as usize >= vocab) {
            bail!("generate: request {i}: prompt token {t} is out of range for vocab size {vocab}")
        }
        if !r.stop_strings.is_empty() && decode.is_none() {
            bail!("generate: request {i}: stop_strings need a decode callback")
        }
    }
    let max_new = requests.iter().map(|r| r.max_new_tokens).max().unwrap_or(0);
    let mut outs: Vec<GenOutput> = requests
        .iter()
        .map(|_| GenOutput {
            tokens: vec![],
            logprobs: vec![],
            sampling_logprobs: vec![],
            finish_reason: FinishReason::Length,
        })
        .collect();
    if max_new == 0 {
        return Ok(outs);
    }
    let dev = model.device().clone();
    let p = requests
        .iter()
        .map(|r| r.prompt_ids.len())
        .max()
        .unwrap_or(0);
    let pads: Vec<usize> = requests.iter().map(|r| p - r.prompt_ids.len()).collect();
    // The last sampled token is never fed back.
    let capacity = p + max_new - 1;
    let mut cache = model.new_kv_cache(b, capacity)?;
    cache.set_row_start(&pads)?;
    let net = model.inference_copy()?;

    let mut ids = Vec::with_capacity(b * p);
    let mut pos = Vec::with_capacity(b * p);
    for (r, &pad) in requests.iter().zip(&pads) {
        ids.extend(std::iter::repeat_n(0, pad).chain(r.prompt_ids.iter().copied()));
        pos.extend((0..p).map(|j| j.saturating_sub(pad) as u32));
    }
    let mut rngs: Vec<StdRng> = requests
        .iter()
        .map(|r| StdRng::seed_from_u64(r.seed))
        .collect();
    let mut done: Vec<bool> = requests.iter().map(|r| r.max_new_tokens == 0).collect();
    let mut step_len = p;
    let mut input = Tensor::from_vec(ids, (b, p), &dev)?;
    let mut positions = Tensor::from_vec(pos, (b, p), &dev)?;
    for step in 0..max_new {
        cache.begin_step(step_len)?;
        let h = net.hidden(&input, &Positions::Ids(&positions), Some(&mut cache))?;
        cache.end_step();
        let last = h.narrow(1, step_len - 1, 1)?;
        let logits = net.lm_head().forward(&last)?.squeeze(1)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(b);
        let mut next_pos = Vec::with_capacity(b);
        for (i, r) in requests.iter().enumerate() {
            let cur_pos = (r.prompt_ids.len() + outs[i].tokens.len()) as u32;
            if done[i] {
                next.push(*outs[i].tokens.last().unwrap_or(&0));
                next_pos.push(cur_pos.saturating_sub(1));
                continue;
            }
            let row = &logits[i];
            let tok = sample(row, &r.sampling, &mut rngs[i]);
            let o = &mut outs[i];
            o.tokens.push(tok as u32);
            o.logprobs.push(row[tok] - log_sum_exp(row));
            o.sampling_logprobs.push(sampling_logprob(row, tok, r.sampling.temperature));
            if r.stop_ids.contains(&(tok as u32)) {
                o.finish_reason = FinishReason::Eos;
                done[i] = true;
            } else if let (false, Some(dec)) = (r.stop_strings.is_empty(), decode) {
                let text = dec(&o.tokens);
                if r.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    o.finish_reason = FinishReason::StopString;
                    done[i] = true;
                }
            }
            if !done[i] && o.tokens.len() >= r.max_new_tokens {
                done[i] = true;
            }
            next.push(tok as u32);
            next_pos.push(cur_pos);
        }
        if done.iter().all(|&d| d) || step + 1 == max_new {
            break;
        }
        step_len = 1;
        input = Tensor::from_vec(next, (b, 1), &dev)?;
        positions = Tensor::from_vec(next_pos, (b, 1), &dev)?;
    }
    Ok(outs)
}
