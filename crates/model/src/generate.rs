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
//! `GenOutput::sampling_logprobs` are under the distribution sampled from as TRL's trainers define
//! it: `log_softmax(logits / T)` over the whole vocabulary (top-k/top-p do not renormalise it).
//!
//! [`Decoder`] is the step-level API (continuous batching): requests join between decode steps
//! and leave the batch — their KV-cache rows dropped — as soon as they finish, so late steps only
//! pay for the requests still running. [`generate`] is a batch run of it.
//!
//! The prefill and decode steps run on the engine ([`crate::engine`]) when the model's backend is
//! it and the engine runs its stack, with the same results as the candle graph up to f32 summation
//! order.

use crate::arch::Network;
use crate::{network_hidden, CausalLm, KvCache, Positions};
use candle_core::{bail, Result, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashMap;

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
    /// How many of the most likely tokens (with T = 1 log-probs) [`StepToken::top`] lists.
    pub top_logprobs: usize,
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
    /// `log p(token)` under `log_softmax(logits / T)` (T = 1 when greedy), one per token.
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

/// Indices of the `k` largest values, largest first (ties by lower index).
fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    if k == 0 {
        return vec![];
    }
    let by_value = |a: &usize, b: &usize| x[*b].total_cmp(&x[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..x.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_value);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_value);
    idx
}

/// Draws a token from `logits` (one row) under `s`; greedy draws no random number.
fn sample(logits: &[f32], s: &Sampling, rng: &mut StdRng) -> usize {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / s.temperature;
    let truncate = (s.top_k > 0 && s.top_k < logits.len()) || s.top_p < 1.0;
    // Candidates in a batch-independent order: all ids ascending, or by (logit desc, id asc).
    let cand: Vec<usize> = if truncate {
        let k = if s.top_k > 0 {
            s.top_k.min(logits.len())
        } else {
            logits.len()
        };
        top_k(logits, k)
    } else {
        (0..logits.len()).collect()
    };
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

/// Identifies a request of a [`Decoder`].
pub type SeqId = u64;

/// One token produced by [`Decoder::step`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepToken {
    pub id: SeqId,
    pub token: u32,
    /// As in [`GenOutput::logprobs`].
    pub logprob: f32,
    /// As in [`GenOutput::sampling_logprobs`].
    pub sampling_logprob: f32,
    /// The request's `top_logprobs` most likely tokens and their T = 1 log-probs, best first.
    pub top: Vec<(u32, f32)>,
    /// The request's whole output when this token ended it (it has then left the decoder).
    pub finished: Option<GenOutput>,
}

/// A request inside the decoder.
struct Seq {
    id: SeqId,
    req: GenRequest,
    rng: StdRng,
    out: GenOutput,
}

impl Seq {
    /// Positions still to be fed back through the model: the last sampled token never is.
    fn remaining_feeds(&self) -> usize {
        self.req.max_new_tokens - self.out.tokens.len()
    }

    /// Samples the next token from this row's logits and records it; true when the request is done.
    fn push(&mut self, row: &[f32], decode: Option<Decode>) -> (StepToken, bool) {
        let r = &self.req;
        let tok = sample(row, &r.sampling, &mut self.rng);
        let lse = log_sum_exp(row);
        let lp = row[tok] - lse;
        let slp = match r.sampling.temperature {
            t if t > 0.0 && t != 1.0 => {
                let scaled: Vec<f32> = row.iter().map(|&v| v / t).collect();
                scaled[tok] - log_sum_exp(&scaled)
            }
            _ => lp,
        };
        let top = top_k(row, r.top_logprobs)
            .into_iter()
            .map(|i| (i as u32, row[i] - lse))
            .collect();
        let o = &mut self.out;
        o.tokens.push(tok as u32);
        o.logprobs.push(lp);
        o.sampling_logprobs.push(slp);
        let mut done = true;
        if r.stop_ids.contains(&(tok as u32)) {
            o.finish_reason = FinishReason::Eos;
        } else if let (false, Some(dec)) = (r.stop_strings.is_empty(), decode) {
            let text = dec(&o.tokens);
            if r.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                o.finish_reason = FinishReason::StopString;
            } else {
                done = o.tokens.len() >= r.max_new_tokens;
            }
        } else {
            done = o.tokens.len() >= r.max_new_tokens;
        }
        let t = StepToken {
            id: self.id,
            token: tok as u32,
            logprob: lp,
            sampling_logprob: slp,
            top,
            finished: done.then(|| o.clone()),
        };
        (t, done)
    }
}

fn check_prompt(req: &GenRequest, vocab: usize) -> Result<()> {
    if req.prompt_ids.is_empty() {
        bail!("prompt_ids is empty")
    }
    if let Some(&t) = req.prompt_ids.iter().find(|&&t| t as usize >= vocab) {
        bail!("prompt token {t} is out of range for vocab size {vocab}")
    }
    Ok(())
}

/// Step-level batched decoding with requests joining and leaving between steps (see the module
/// docs). Each request's output is the same whatever else runs beside it and whenever it joined.
pub struct Decoder<'m> {
    model: &'m CausalLm,
    net: Box<dyn Network>,
    /// One row per `active` request, in order; `None` while nothing runs.
    cache: Option<KvCache>,
    active: Vec<Seq>,
    pending: Vec<Seq>,
    next_id: SeqId,
}

impl<'m> Decoder<'m> {
    pub fn new(model: &'m CausalLm) -> Result<Self> {
        Ok(Self {
            model,
            net: model.inference_copy()?,
            cache: None,
            active: vec![],
            pending: vec![],
            next_id: 0,
        })
    }

    /// Queues a request; it is prefilled (and yields its first token) at the next [`Self::step`].
    pub fn add(&mut self, req: GenRequest) -> Result<SeqId> {
        check_prompt(&req, self.model.vocab_size())?;
        if req.max_new_tokens == 0 {
            bail!("max_new_tokens must be at least 1")
        }
        let id = self.next_id;
        self.next_id += 1;
        self.pending.push(Seq {
            id,
            rng: StdRng::seed_from_u64(req.seed),
            req,
            out: GenOutput {
                tokens: vec![],
                logprobs: vec![],
                sampling_logprobs: vec![],
                finish_reason: FinishReason::Length,
            },
        });
        Ok(id)
    }

    /// Drops a request (e.g. its client went away); false if it is not in the decoder.
    pub fn cancel(&mut self, id: SeqId) -> Result<bool> {
        if let Some(i) = self.pending.iter().position(|s| s.id == id) {
            self.pending.remove(i);
            return Ok(true);
        }
        let Some(i) = self.active.iter().position(|s| s.id == id) else {
            return Ok(false);
        };
        let keep: Vec<usize> = (0..self.active.len()).filter(|&j| j != i).collect();
        self.retain(&keep)?;
        Ok(true)
    }

    /// Requests running or waiting to join.
    pub fn len(&self) -> usize {
        self.active.len() + self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of the running batch (finished requests are not counted: they have left it).
    pub fn batch_rows(&self) -> usize {
        self.cache.as_ref().map_or(0, KvCache::rows)
    }

    /// Positions held per row of the running batch's KV cache.
    pub fn cache_len(&self) -> usize {
        self.cache.as_ref().map_or(0, KvCache::len)
    }

    /// One decode step of the running batch, then the prefill of the requests queued since the
    /// last step (which join the batch). Returns one token per request that ran.
    pub fn step(&mut self, decode: Option<Decode>) -> Result<Vec<StepToken>> {
        if let Some(i) = self
            .pending
            .iter()
            .position(|s| !s.req.stop_strings.is_empty() && decode.is_none())
        {
            let id = self.pending.remove(i).id;
            bail!("request {id}: stop_strings need a decode callback")
        }
        let mut tokens = Vec::with_capacity(self.len());
        if let Some(cache) = self.cache.as_mut() {
            let dev = self.model.device();
            let b = self.active.len();
            let last: Vec<u32> = self
                .active
                .iter()
                .map(|s| *s.out.tokens.last().expect("active rows have a token"))
                .collect();
            let pos: Vec<u32> = self
                .active
                .iter()
                .map(|s| (s.req.prompt_ids.len() + s.out.tokens.len() - 1) as u32)
                .collect();
            let input = Tensor::from_vec(last, (b, 1), dev)?;
            let positions = Tensor::from_vec(pos, (b, 1), dev)?;
            cache.begin_step(1)?;
            let pos = Positions::Ids(&positions);
            let h = network_hidden(&*self.net, self.model.backend(), &input, &pos, Some(cache));
            cache.end_step();
            let logits = self
                .net
                .lm_head()
                .forward(&h?)?
                .squeeze(1)?
                .to_vec2::<f32>()?;
            let mut keep = Vec::with_capacity(b);
            for (i, (s, row)) in self.active.iter_mut().zip(&logits).enumerate() {
                let (t, done) = s.push(row, decode);
                tokens.push(t);
                if !done {
                    keep.push(i);
                }
            }
            if keep.len() < b {
                self.retain(&keep)?;
            }
        }
        if !self.pending.is_empty() {
            self.prefill(decode, &mut tokens)?;
        }
        Ok(tokens)
    }

    /// Runs the queued prompts as one left-padded batch and merges their rows into the cache. Equal
    /// prompts (several samples of one prompt: GRPO, RLOO, best-of-n) run once and share their row.
    fn prefill(&mut self, decode: Option<Decode>, tokens: &mut Vec<StepToken>) -> Result<()> {
        let mut new = std::mem::take(&mut self.pending);
        let dev = self.model.device();
        let b = new.len();
        let mut first: HashMap<&[u32], usize> = HashMap::new();
        let (mut uniq, mut of) = (Vec::new(), Vec::with_capacity(b));
        for s in &new {
            let p = s.req.prompt_ids.as_slice();
            of.push(*first.entry(p).or_insert_with(|| {
                uniq.push(p);
                uniq.len() - 1
            }));
        }
        let u = uniq.len();
        let p = uniq.iter().map(|q| q.len()).max().unwrap_or(0);
        let pads: Vec<usize> = uniq.iter().map(|q| p - q.len()).collect();
        let mut ids = Vec::with_capacity(u * p);
        let mut pos = Vec::with_capacity(u * p);
        for (q, &pad) in uniq.iter().zip(&pads) {
            ids.extend(std::iter::repeat_n(0, pad).chain(q.iter().copied()));
            pos.extend((0..p).map(|j| j.saturating_sub(pad) as u32));
        }
        drop(first);
        // Alone, the prefill cache becomes the running one: reserve the decode positions now.
        let extra = match self.cache {
            None => new
                .iter()
                .map(|s| s.req.max_new_tokens - 1)
                .max()
                .unwrap_or(0),
            Some(_) => 0,
        };
        let mut cache = self.model.new_kv_cache(u, p + extra)?;
        cache.set_row_start(&pads)?;
        cache.begin_step(p)?;
        let input = Tensor::from_vec(ids, (u, p), dev)?;
        let positions = Tensor::from_vec(pos, (u, p), dev)?;
        let pos = Positions::Ids(&positions);
        let h = network_hidden(
            &*self.net,
            self.model.backend(),
            &input,
            &pos,
            Some(&mut cache),
        )?;
        cache.end_step();
        let logits = self
            .net
            .lm_head()
            .forward(&h.narrow(1, p - 1, 1)?)?
            .squeeze(1)?
            .to_vec2::<f32>()?;
        let mut keep = Vec::with_capacity(b);
        for (i, s) in new.iter_mut().enumerate() {
            let (t, done) = s.push(&logits[of[i]], decode);
            tokens.push(t);
            if !done {
                keep.push(i);
            }
        }
        // The prefill rows of the sequences that go on (a shared row repeated).
        let rows: Vec<usize> = keep.iter().map(|&i| of[i]).collect();
        let old_rows: Vec<usize> = (0..self.active.len()).collect();
        retain_indices(&mut new, &keep);
        self.active.extend(new);
        let need = self
            .active
            .iter()
            .map(Seq::remaining_feeds)
            .max()
            .unwrap_or(0);
        self.cache = match self.cache.take() {
            None if rows.len() == u && rows.iter().enumerate().all(|(i, &r)| i == r) => Some(cache),
            Some(old) if keep.is_empty() => Some(old),
            None if keep.is_empty() => None,
            None => Some(KvCache::regroup(&[(&cache, &rows)], need)?),
            Some(old) => Some(KvCache::regroup(
                &[(&old, &old_rows), (&cache, &rows)],
                need,
            )?),
        };
        Ok(())
    }

    /// Keeps only the active rows `keep` (ascending), shrinking the cache to what they need.
    fn retain(&mut self, keep: &[usize]) -> Result<()> {
        retain_indices(&mut self.active, keep);
        let need = self
            .active
            .iter()
            .map(Seq::remaining_feeds)
            .max()
            .unwrap_or(0);
        self.cache = match (self.cache.take(), keep.is_empty()) {
            (Some(c), false) => Some(KvCache::regroup(&[(&c, keep)], need)?),
            _ => None,
        };
        Ok(())
    }
}

fn retain_indices<T>(v: &mut Vec<T>, keep: &[usize]) {
    let mut i = 0;
    v.retain(|_| {
        i += 1;
        keep.contains(&(i - 1))
    });
}

/// Generates completions for a batch of requests (see the module docs). `decode` is needed only
/// for `stop_strings`.
pub fn generate(
    model: &CausalLm,
    requests: &[GenRequest],
    decode: Option<Decode>,
) -> Result<Vec<GenOutput>> {
    let empty = GenOutput {
        tokens: vec![],
        logprobs: vec![],
        sampling_logprobs: vec![],
        finish_reason: FinishReason::Length,
    };
    let mut outs = vec![empty; requests.len()];
    for (i, r) in requests.iter().enumerate() {
        check_prompt(r, model.vocab_size())
            .map_err(|e| candle_core::Error::msg(format!("generate: request {i}: {e}")))?;
        if !r.stop_strings.is_empty() && decode.is_none() {
            bail!("generate: request {i}: stop_strings need a decode callback")
        }
    }
    let mut dec = Decoder::new(model)?;
    // Decoder ids are given in order from 0, so they index `outs` through `slot`.
    let mut slot = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        if r.max_new_tokens > 0 {
            dec.add(r.clone())?;
            slot.push(i);
        }
    }
    while !dec.is_empty() {
        for t in dec.step(decode)? {
            if let Some(o) = t.finished {
                outs[slot[t.id as usize]] = o;
            }
        }
    }
    Ok(outs)
}
