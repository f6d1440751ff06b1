//! Advantage estimation and KL estimators of the online-RL trainers, as plain functions on `f32` slices
//! (rewards, values and log-probs are detached by the time they get here). Names follow the papers:
//! GAE (Schulman et al. 2016), GRPO's group-normalised advantage (Shao et al. 2024), RLOO's leave-one-out
//! baseline (Ahmadian et al. 2024), REINFORCE++'s batch-normalised advantage (Hu 2025), and Schulman's
//! k1/k2/k3 KL estimators. Each mirrors the corresponding TRL computation (fixtures in
//! `fixtures/reference/rl_functions.json`).

use serde::{Deserialize, Serialize};

/// Sample mean.
pub fn mean(x: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    x.iter().map(|&v| v as f64).sum::<f64>() as f32 / x.len() as f32
}

/// Unbiased sample standard deviation (`torch.std`): NaN for fewer than two values, as torch gives.
pub fn std_unbiased(x: &[f32]) -> f32 {
    if x.len() < 2 {
        return f32::NAN;
    }
    let m = mean(x) as f64;
    let ss: f64 = x.iter().map(|&v| (v as f64 - m).powi(2)).sum();
    (ss / (x.len() - 1) as f64).sqrt() as f32
}

/// How GRPO scales the group-centred rewards (TRL `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by the standard deviation of the group (the GRPO paper).
    Group,
    /// Divide by the standard deviation of the whole batch (Dr. GRPO's recommendation against difficulty bias).
    Batch,
    /// Centre only.
    None,
}

/// GRPO: `A_i = (r_i − mean(r_group)) / (std(r_group) + 1e-4)` for consecutive groups of `g` rewards
/// (scaled as `scale` says). Returns the advantages and, per group, whether its rewards all equal.
pub fn group_advantages(rewards: &[f32], g: usize, scale: ScaleRewards) -> (Vec<f32>, Vec<bool>) {
    assert!(
        g > 0 && rewards.len().is_multiple_of(g),
        "rewards must come in whole groups"
    );
    let batch_std = std_unbiased(rewards);
    let mut adv = Vec::with_capacity(rewards.len());
    let mut zero_std = Vec::with_capacity(rewards.len() / g);
    for group in rewards.chunks(g) {
        let m = mean(group);
        let s = std_unbiased(group);
        zero_std.push(group.iter().all(|&r| r == group[0]));
        for &r in group {
            adv.push(match scale {
                ScaleRewards::Group => (r - m) / (s + 1e-4),
                ScaleRewards::Batch => (r - m) / (batch_std + 1e-4),
                ScaleRewards::None => r - m,
            });
        }
    }
    (adv, zero_std)
}

/// RLOO: `A_i = r_i − (Σ_group r − r_i) / (g − 1)`, the mean reward of the other samples of the prompt.
pub fn leave_one_out_advantages(rewards: &[f32], g: usize) -> Vec<f32> {
    assert!(
        g > 1 && rewards.len().is_multiple_of(g),
        "RLOO needs whole groups of at least two"
    );
    rewards
        .chunks(g)
        .flat_map(|group| {
            let sum: f32 = group.iter().sum();
            group.iter().map(move |&r| r - (sum - r) / (g - 1) as f32)
        })
        .collect()
}

/// REINFORCE++ / advantage whitening over the batch: `(x − mean) / (std + 1e-8)`.
pub fn normalize(x: &[f32]) -> Vec<f32> {
    let m = mean(x);
    let s = std_unbiased(x);
    x.iter().map(|&v| (v - m) / (s + 1e-8)).collect()
}

/// Masked whitening as TRL's `masked_whiten` over all given values (biased variance with Bessel's
/// correction as `masked_var(unbiased=True)`); `shift_mean = false` adds the mean back.
pub fn whiten(x: &[f32], shift_mean: bool) -> Vec<f32> {
    let n = x.len() as f64;
    let m = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n;
    let var = if n > 1.0 { var * n / (n - 1.0) } else { var };
    let inv = 1.0 / (var + 1e-8).sqrt();
    x.iter()
        .map(|&v| {
            let w = (v as f64 - m) * inv;
            (if shift_mean { w } else { w + m }) as f32
        })
        .collect()
}

/// Which estimator of KL(π‖π_ref) per token (Schulman, "Approximating KL divergence").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `log π − log π_ref`: unbiased, high variance, can be negative.
    K1,
    /// `½ (log π − log π_ref)²`.
    K2,
    /// `exp(log π_ref − log π) − (log π_ref − log π) − 1`: unbiased, always ≥ 0.
    K3,
}

/// The per-token KL estimate from the log-probs of the sampled token under π and π_ref.
pub fn kl_estimate(logp: f32, ref_logp: f32, k: KlEstimator) -> f32 {
    let log_ratio = ref_logp - logp;
    match k {
        KlEstimator::K1 => -log_ratio,
        KlEstimator::K2 => 0.5 * log_ratio * log_ratio,
        KlEstimator::K3 => log_ratio.exp() - log_ratio - 1.0,
    }
}

/// Generalised advantage estimation over one sequence: `δ_t = r_t + γ V_{t+1} − V_t` (with `V_T = 0`),
/// `A_t = Σ_l (γλ)^l δ_{t+l}`; returns `(advantages, returns = A + V)`.
pub fn gae(rewards: &[f32], values: &[f32], gamma: f32, lambda: f32) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(rewards.len(), values.len());
    let t_len = rewards.len();
    let mut adv = vec![0f32; t_len];
    let mut last = 0f32;
    for t in (0..t_len).rev() {
        let next_value = if t + 1 < t_len { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        last = delta + gamma * lambda * last;
        adv[t] = last;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// The adaptive KL controller of Ziegler et al. (2019): β is multiplied by `1 + clip(KL/target − 1, ±0.2)·n/horizon`
/// after each batch of `n` samples, steering the measured KL toward `target`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveKl {
    pub beta: f64,
    pub target: f64,
    pub horizon: f64,
}

impl AdaptiveKl {
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        let error = (current_kl / self.target - 1.0).clamp(-0.2, 0.2);
        self.beta *= 1.0 + error * n_steps as f64 / self.horizon;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_advantages_centre_and_scale() {
        let (a, z) = group_advantages(
            &[1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5],
            4,
            ScaleRewards::Group,
        );
        let s = std_unbiased(&[1.0, 0.0, 1.0, 0.0]);
        assert!((a[0] - 0.5 / (s + 1e-4)).abs() < 1e-6);
        assert!((a[1] + 0.5 / (s + 1e-4)).abs() < 1e-6);
        assert_eq!(&a[4..], &[0.0; 4]);
        assert_eq!(z, vec![false, true]);
        let (n, _) = group_advantages(&[1.0, 0.0, 3.0, 3.0], 2, ScaleRewards::None);
        assert_eq!(n, vec![0.5, -0.5, 0.0, 0.0]);
    }

    #[test]
    fn leave_one_out_uses_the_other_samples() {
        let a = leave_one_out_advantages(&[1.0, 2.0, 6.0], 3);
        assert_eq!(a, vec![1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5]);
    }

    #[test]
    fn gae_with_lambda_one_is_the_discounted_return_minus_value() {
        let r = [0.0, 0.0, 1.0];
        let v = [0.2, 0.4, 0.6];
        let (a, ret) = gae(&r, &v, 1.0, 1.0);
        for t in 0..3 {
            assert!((ret[t] - 1.0).abs() < 1e-6, "return at {t}: {}", ret[t]);
            assert!((a[t] - (1.0 - v[t])).abs() < 1e-6);
        }
        let (a0, _) = gae(&r, &v, 0.9, 0.0);
        // λ = 0: one-step TD errors.
        assert!((a0[0] - (0.9 * 0.4 - 0.2)).abs() < 1e-6);
        assert!((a0[2] - (1.0 - 0.6)).abs() < 1e-6);
    }

    #[test]
    fn kl_estimators_agree_at_zero_and_k3_is_non_negative() {
        for k in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            assert_eq!(kl_estimate(-1.3, -1.3, k), 0.0);
        }
        assert!(kl_estimate(-0.1, -3.0, KlEstimator::K3) > 0.0);
        assert!(kl_estimate(-3.0, -0.1, KlEstimator::K3) > 0.0);
        assert!((kl_estimate(-0.5, -1.0, KlEstimator::K1) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn adaptive_kl_moves_beta_toward_the_target() {
        let mut c = AdaptiveKl {
            beta: 0.1,
            target: 6.0,
            horizon: 10000.0,
        };
        c.update(12.0, 256);
        assert!((c.beta - 0.1 * (1.0 + 0.2 * 256.0 / 10000.0)).abs() < 1e-12);
        c.update(0.0, 256);
        assert!(c.beta < 0.1 * (1.0 + 0.2 * 256.0 / 10000.0));
    }
}
