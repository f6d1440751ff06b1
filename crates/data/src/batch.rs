//! Right-padded batches as plain vectors (row-major `[batch_size, seq_len]`), so this crate needs no tensor
//! library: the trainers turn them into tensors. Also the seedable, resumable epoch sampler.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::preference::PreferenceExample;
use crate::sft::{TokenizedSequence, Truncation, IGNORE};

/// A right-padded batch. All vectors are `[batch_size * seq_len]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// Padded with the pad id.
    pub input_ids: Vec<u32>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u8>,
    /// Position of each token within its example (restarting in packed rows); 0 on padding.
    pub position_ids: Vec<u32>,
    /// TRL's labels (unshifted): the token id where trained, `IGNORE` (-100) elsewhere and on padding.
    pub labels: Vec<i64>,
    /// Next-token targets: `targets[r, t] = input_ids[r, t + 1]` (pad id in the last column).
    pub targets: Vec<u32>,
    /// 1.0 where `targets[r, t]` is trained, i.e. `labels[r, t + 1] != -100`.
    pub loss_mask: Vec<f32>,
    /// Lengths of the examples in each row (one per row unless packed).
    pub seq_lengths: Vec<Vec<usize>>,
    /// Non-pad tokens (TRL's token counter).
    pub num_tokens: usize,
    /// Trained target positions (`loss_mask` sum): the denominator of a mean token loss.
    pub num_loss_tokens: usize,
}

impl TokenBatch {
    /// Unpadded length of each row.
    pub fn lengths(&self) -> Vec<usize> {
        self.seq_lengths.iter().map(|l| l.iter().sum()).collect()
    }
}

/// Pads `rows` to the longest (rounded up to `pad_to_multiple_of`) like TRL's `DataCollatorForLanguageModeling`.
/// Packed rows additionally get `IGNORE` at the first token of every example (TRL's padding-free collator).
pub fn collate(
    rows: &[&TokenizedSequence],
    pad_id: u32,
    pad_to_multiple_of: Option<usize>,
) -> TokenBatch {
    let b = rows.len();
    let mut t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    if let Some(m) = pad_to_multiple_of.filter(|&m| m > 0) {
        t = t.div_ceil(m) * m;
    }
    let mut batch = TokenBatch {
        batch_size: b,
        seq_len: t,
        input_ids: vec![pad_id; b * t],
        attention_mask: vec![0; b * t],
        position_ids: vec![0; b * t],
        labels: vec![IGNORE; b * t],
        targets: vec![pad_id; b * t],
        loss_mask: vec![0.0; b * t],
        seq_lengths: Vec::with_capacity(b),
        num_tokens: 0,
        num_loss_tokens: 0,
    };
    for (r, row) in rows.iter().enumerate() {
        let base = r * t;
        let n = row.len();
        batch.input_ids[base..base + n].copy_from_slice(&row.input_ids);
        batch.labels[base..base + n].copy_from_slice(&row.labels);
        batch.attention_mask[base..base + n].fill(1);
        let mut start = 0;
        for &len in &row.seq_lengths {
            for (p, pos) in batch.position_ids[base + start..base + start + len]
                .iter_mut()
                .enumerate()
            {
                *pos = p as u32;
            }
            if row.packed && len > 0 {
                batch.labels[base + start] = IGNORE;
            }
            start += len;
        }
        for j in 0..t.saturating_sub(1) {
            batch.targets[base + j] = batch.input_ids[base + j + 1];
            if batch.labels[base + j + 1] != IGNORE {
                batch.loss_mask[base + j] = 1.0;
                batch.num_loss_tokens += 1;
            }
        }
        batch.num_tokens += n;
        batch.seq_lengths.push(row.seq_lengths.clone());
    }
    batch
}

/// A batch of preference pairs: `tokens` has `2 * num_pairs` rows, all chosen sequences first, then all rejected
/// (TRL's layout); labels are the completion tokens only.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceBatch {
    pub num_pairs: usize,
    pub tokens: TokenBatch,
    /// Per pair, when every pair has one (reward modelling with margins).
    pub margins: Option<Vec<f32>>,
}

/// TRL's `DataCollatorForPreference`: prompt+chosen and prompt+rejected rows, each cut to `max_length`
/// (keep_start or keep_end), right-padded. Used for reward models too (their pairs are filtered to fit first,
/// see [`PreferenceExample::fits_reward`]).
pub fn collate_preference(
    pairs: &[&PreferenceExample],
    pad_id: u32,
    max_length: Option<usize>,
    truncation: Truncation,
) -> PreferenceBatch {
    let row = |completion: &[u32], prompt: &[u32]| {
        let ids = [prompt, completion].concat();
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if i < prompt.len() {
                    IGNORE
                } else {
                    i64::from(id)
                }
            })
            .collect();
        let mut seq = TokenizedSequence::new(ids, labels);
        if let Some(m) = max_length {
            crate::sft::truncate(&mut seq, m, truncation);
        }
        seq
    };
    let mut rows: Vec<TokenizedSequence> = pairs
        .iter()
        .map(|p| row(&p.chosen_ids, &p.prompt_ids))
        .collect();
    rows.extend(pairs.iter().map(|p| row(&p.rejected_ids, &p.prompt_ids)));
    let refs: Vec<&TokenizedSequence> = rows.iter().collect();
    let margins = pairs
        .iter()
        .map(|p| p.margin.map(|m| m as f32))
        .collect::<Option<Vec<f32>>>();
    PreferenceBatch {
        num_pairs: pairs.len(),
        tokens: collate(&refs, pad_id, None),
        margins,
    }
}

/// Where a sampler stands: saved in checkpoints so a resumed run sees exactly the same batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    /// Position inside the epoch's order.
    pub index: usize,
}

/// Visits `0..len` epoch after epoch, each epoch in its own order: a permutation drawn from ChaCha8 seeded with
/// `seed` on stream `epoch` (so epoch k's order depends only on seed and k, and resuming needs just the
/// state), or `0..len` in order without shuffling.
#[derive(Debug, Clone)]
pub struct EpochSampler {
    len: usize,
    seed: u64,
    shuffle: bool,
    state: SamplerState,
    order: Vec<usize>,
}

impl EpochSampler {
    pub fn new(len: usize, seed: u64, shuffle: bool) -> Self {
        Self::resume(len, seed, shuffle, SamplerState { epoch: 0, index: 0 })
    }

    /// Continues from a saved state. The index is clamped to the epoch length.
    pub fn resume(len: usize, seed: u64, shuffle: bool, state: SamplerState) -> Self {
        let mut s = EpochSampler {
            len,
            seed,
            shuffle,
            state,
            order: Vec::new(),
        };
        s.state.index = s.state.index.min(len);
        s.order = s.order_for(state.epoch);
        s
    }

    fn order_for(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(epoch);
            order.shuffle(&mut rng);
        }
        order
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// Up to `batch_size` indices; a batch never spans two epochs, so the last one of an epoch may be short
    /// (dropped instead when `drop_last`). Empty only when `len` is 0 (or smaller than the batch with `drop_last`).
    pub fn next_batch(&mut self, batch_size: usize, drop_last: bool) -> Vec<usize> {
        if self.len == 0 || batch_size == 0 || (drop_last && batch_size > self.len) {
            return Vec::new();
        }
        let left = self.len - self.state.index;
        if left == 0 || (drop_last && left < batch_size) {
            self.state = SamplerState {
                epoch: self.state.epoch + 1,
                index: 0,
            };
            self.order = self.order_for(self.state.epoch);
        }
        let start = self.state.index;
        let end = (start + batch_size).min(self.len);
        self.state.index = end;
        self.order[start..end].to_vec()
    }
}
