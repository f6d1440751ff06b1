//! Reward over-optimisation (Gao et al., 2022) measured with best-of-n sampling: for each held-out prompt draw
//! `n` SFT samples, keep the one the proxy reward model likes best, and score it with the proxy and with gold.
//! Against KL(best-of-n ‖ SFT) = log n − (n − 1)/n the proxy score keeps rising; where gold stops rising (or
//! turns down) the reward model is being over-optimised.

use std::path::Path;

use anyhow::{Context, Result};
use rlhf_generate::Generator;
use rlhf_model::{GenOutput, GenRequest, Sampling};
use rlhf_train::reward::{RewardModel, RewardSource, Sample};
use serde::Serialize;
use serde_json::Map;

use crate::gold::gold_reward;
use crate::world::Prompt;

/// One point of the sweep (means over the prompts).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BestOfN {
    pub n: usize,
    /// KL(best-of-n ‖ SFT) in nats per sequence, the analytic bound log n − (n − 1)/n.
    pub kl: f64,
    /// Mean proxy (reward-model) score of the selected samples.
    pub proxy: f64,
    /// Mean gold reward of the selected samples.
    pub gold: f64,
}

/// KL(best-of-n ‖ base) for a best-of-n policy (Stiennon et al. 2020; Gao et al. 2022).
pub fn best_of_n_kl(n: usize) -> f64 {
    let n = n.max(1) as f64;
    n.ln() - (n - 1.0) / n
}

/// The sweep over n = 1, 2, 4, … ≤ `max_n`: `max_n` samples per prompt at `temperature`, scored once; the
/// first n of them form best-of-n, so the points share samples and differ only in n.
pub fn sweep(
    sft: &Path,
    reward_model: &Path,
    prompts: &[Prompt],
    max_n: usize,
    temperature: f32,
    max_new_tokens: usize,
    seed: u64,
) -> Result<Vec<BestOfN>> {
    let g = Generator::load(sft)?;
    let (ids, draws) = sample_k(&g, prompts, max_n, seed.wrapping_mul(6151), temperature, max_new_tokens, 64)?;
    let max_len = g.model.config().max_position_embeddings();
    let mut rm = RewardModel::load(&[reward_model.to_path_buf()], &g.tokenizer, max_len)
        .with_context(|| format!("{}: cannot load the reward model", reward_model.display()))?;
    let empty = Map::new();
    // proxy[i][j], gold[i][j]: sample j of prompt i.
    let (mut proxy, mut gold) = (vec![Vec::new(); prompts.len()], vec![Vec::new(); prompts.len()]);
    for j in 0..max_n {
        let samples: Vec<Sample> = draws
            .iter()
            .zip(prompts.iter().zip(&ids))
            .map(|(d, (p, pid))| Sample {
                prompt: &p.text,
                completion: &d[j].0,
                prompt_ids: pid,
                completion_ids: &d[j].1.tokens,
                eos: d[j].1.finish_reason == rlhf_model::FinishReason::Eos,
                row: &empty,
            })
            .collect();
        // In batches: one padded batch of every prompt would hold all their activations at once.
        let mut scores = Vec::with_capacity(samples.len());
        for chunk in samples.chunks(32) {
            scores.extend(rm.score(chunk)?);
        }
        for (i, (d, s)) in draws.iter().zip(scores).enumerate() {
            proxy[i].push(s);
            gold[i].push(gold_reward(&prompts[i].gold, &d[j].0));
        }
    }
    let mut points = Vec::new();
    let mut n = 1;
    while n <= max_n {
        let (mut p_sum, mut g_sum) = (0.0, 0.0);
        for (p, g) in proxy.iter().zip(&gold) {
            // First best on ties, so the choice is deterministic.
            let best = (1..n).fold(0, |b, j| if p[j] > p[b] { j } else { b });
            p_sum += p[best];
            g_sum += g[best];
        }
        let m = prompts.len().max(1) as f64;
        points.push(BestOfN { n, kl: best_of_n_kl(n), proxy: p_sum / m, gold: g_sum / m });
        n *= 2;
    }
    Ok(points)
}

/// `k` samples per prompt at `temperature`; sample j of prompt i is seeded `base_seed + k·i + j`. Returns the
/// prompts' token ids and, per prompt, its `k` (text, output) pairs in draw order.
pub(crate) fn sample_k(
    g: &Generator,
    prompts: &[Prompt],
    k: usize,
    base_seed: u64,
    temperature: f32,
    max_new_tokens: usize,
    batch_size: usize,
) -> Result<(Vec<Vec<u32>>, Vec<Vec<(String, GenOutput)>>)> {
    let ids: Vec<Vec<u32>> =
        prompts.iter().map(|p| g.encode_prompt(&rlhf_data::Text::Plain(p.text.clone()))).collect::<Result<_>>()?;
    let template = GenRequest {
        max_new_tokens,
        sampling: Sampling { temperature, ..Sampling::default() },
        ..Default::default()
    };
    let (n, k64) = (prompts.len() as u64, k as u64);
    let mut draws: Vec<Vec<(String, GenOutput)>> = (0..prompts.len()).map(|_| Vec::with_capacity(k)).collect();
    for j in 0..k64 {
        let seeds: Vec<u64> = (0..n).map(|i| base_seed.wrapping_add(k64 * i + j)).collect();
        for (d, out) in draws.iter_mut().zip(g.run(&ids, &seeds, &template, batch_size)?) {
            d.push(out);
        }
    }
    Ok((ids, draws))
}

#[cfg(test)]
mod tests {
    use super::best_of_n_kl;

    #[test]
    fn best_of_n_kl_is_the_analytic_bound() {
        assert_eq!(best_of_n_kl(1), 0.0);
        assert!((best_of_n_kl(2) - (2f64.ln() - 0.5)).abs() < 1e-12);
        assert!((best_of_n_kl(16) - (16f64.ln() - 15.0 / 16.0)).abs() < 1e-12);
    }
}
