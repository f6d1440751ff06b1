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

/// `max_n` SFT samples per held-out prompt, drawn once and scored by gold; each reward model then scores them
/// ([`Draws::proxy`]) and [`Draws::sweep`] forms best-of-n from the first n, so the points of a sweep (and the
/// sweeps of different reward models) share their samples and differ only in n and in the picker.
pub struct Draws<'a> {
    prompts: &'a [Prompt],
    ids: Vec<Vec<u32>>,
    draws: Vec<Vec<(String, GenOutput)>>,
    /// gold[i][j]: gold reward of sample j of prompt i.
    gold: Vec<Vec<f64>>,
    generator: Generator,
}

impl<'a> Draws<'a> {
    pub fn new(
        sft: &Path,
        prompts: &'a [Prompt],
        max_n: usize,
        temperature: f32,
        max_new_tokens: usize,
        seed: u64,
    ) -> Result<Self> {
        let generator = Generator::load(sft)?;
        let max_n = max_n.max(1);
        let (ids, draws) = sample_k(
            &generator,
            prompts,
            max_n,
            seed.wrapping_mul(6151),
            temperature,
            max_new_tokens,
            64,
        )?;
        let gold = draws
            .iter()
            .zip(prompts)
            .map(|(d, p)| d.iter().map(|(t, _)| gold_reward(&p.gold, t)).collect())
            .collect();
        Ok(Draws {
            prompts,
            ids,
            draws,
            gold,
            generator,
        })
    }

    /// proxy[i][j]: the reward model's score of sample j of prompt i.
    pub fn proxy(&self, reward_model: &Path) -> Result<Vec<Vec<f64>>> {
        let g = &self.generator;
        let max_len = g.model.config().max_position_embeddings();
        let mut rm = RewardModel::load(&[reward_model.to_path_buf()], &g.tokenizer, max_len)
            .with_context(|| format!("{}: cannot load the reward model", reward_model.display()))?;
        let empty = Map::new();
        let mut proxy = vec![Vec::new(); self.prompts.len()];
        for j in 0..self.draws.first().map_or(0, Vec::len) {
            let samples: Vec<Sample> = self
                .draws
                .iter()
                .zip(self.prompts.iter().zip(&self.ids))
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
            for (i, chunk) in samples.chunks(32).enumerate() {
                for (k, s) in rm.score(chunk)?.into_iter().enumerate() {
                    proxy[32 * i + k].push(s);
                }
            }
        }
        Ok(proxy)
    }

    /// Per prompt, the index of the sample the proxy likes best among the first `n` (the first on ties, so the
    /// choice is deterministic).
    fn picks(proxy: &[Vec<f64>], n: usize) -> Vec<usize> {
        proxy
            .iter()
            .map(|p| (1..n.min(p.len())).fold(0, |b, j| if p[j] > p[b] { j } else { b }))
            .collect()
    }

    /// Best-of-n for n = 1, 2, 4, … ≤ the samples drawn, picked by `proxy`.
    pub fn sweep(&self, proxy: &[Vec<f64>]) -> Vec<BestOfN> {
        let max_n = self.draws.first().map_or(0, Vec::len);
        let m = self.prompts.len().max(1) as f64;
        let mut points = Vec::new();
        let mut n = 1;
        while n <= max_n {
            let picks = Self::picks(proxy, n);
            let p_sum: f64 = picks.iter().zip(proxy).map(|(&b, p)| p[b]).sum();
            let g_sum: f64 = picks.iter().zip(&self.gold).map(|(&b, g)| g[b]).sum();
            points.push(BestOfN {
                n,
                kl: best_of_n_kl(n),
                proxy: p_sum / m,
                gold: g_sum / m,
            });
            n *= 2;
        }
        points
    }

    /// Gold rewards, one per prompt, of the samples `proxy` picks among all that were drawn.
    pub fn best_gold(&self, proxy: &[Vec<f64>]) -> Vec<f64> {
        let n = self.draws.first().map_or(0, Vec::len);
        Self::picks(proxy, n)
            .iter()
            .zip(&self.gold)
            .map(|(&b, g)| g[b])
            .collect()
    }
}

/// One prompt's samples: each completion's text and its generation output.
type Samples = Vec<(String, GenOutput)>;

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
) -> Result<(Vec<Vec<u32>>, Vec<Samples>)> {
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| g.encode_prompt(&rlhf_data::Text::Plain(p.text.clone())))
        .collect::<Result<_>>()?;
    let template = GenRequest {
        max_new_tokens,
        sampling: Sampling {
            temperature,
            ..Sampling::default()
        },
        ..Default::default()
    };
    let (n, k64) = (prompts.len() as u64, k as u64);
    let mut draws: Vec<Vec<(String, GenOutput)>> =
        (0..prompts.len()).map(|_| Vec::with_capacity(k)).collect();
    for j in 0..k64 {
        let seeds: Vec<u64> = (0..n)
            .map(|i| base_seed.wrapping_add(k64 * i + j))
            .collect();
        for (d, out) in draws
            .iter_mut()
            .zip(g.run(&ids, &seeds, &template, batch_size)?)
        {
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
