//! Reward-model objectives on scalar rewards `[B]` (f32), one small function each, as TRL's `RewardTrainer`.

use crate::pref_loss::log_sigmoid;
use candle_core::{Result, Tensor};

/// Bradley–Terry: −log σ(r_c − r_r) per pair.
pub fn bradley_terry(chosen: &Tensor, rejected: &Tensor) -> Result<Tensor> {
    log_sigmoid(&(chosen - rejected)?)?.neg()
}

/// Bradley–Terry with a required margin m per pair (TRL's `margin` column): −log σ(r_c − r_r − m).
pub fn bradley_terry_margin(chosen: &Tensor, rejected: &Tensor, margin: &Tensor) -> Result<Tensor> {
    log_sigmoid(&((chosen - rejected)? - margin)?)?.neg()
}

/// Reward centering (Eisenstein et al. 2023; TRL `center_rewards_coefficient` η): η·mean((r_c + r_r)²),
/// which pins the otherwise shift-invariant rewards near zero.
pub fn centering(chosen: &Tensor, rejected: &Tensor, eta: f64) -> Result<Tensor> {
    ((chosen + rejected)?.sqr()?.mean_all()? * eta)?.contiguous()
}

/// Rating regression: MSE between the reward and the score mapped from `[min, max]` onto `[0, 1]`.
/// `scores_01` are already normalised (see [`normalise_score`]).
pub fn rating_mse(rewards: &Tensor, scores_01: &Tensor) -> Result<Tensor> {
    (rewards - scores_01)?.sqr()?.mean_all()
}

/// Maps a score on its declared scale `[min, max]` (min < max, checked when the data is read) onto [0, 1].
pub fn normalise_score(score: f64, min: f64, max: f64) -> f64 {
    (score - min) / (max - min)
}

/// Pairwise metrics TRL's RewardTrainer logs: `accuracy` (r_c > r_r) and `margin` (mean r_c − r_r).
pub fn pair_metrics(chosen: &[f32], rejected: &[f32]) -> (f64, f64) {
    let n = chosen.len().max(1) as f64;
    let acc = chosen.iter().zip(rejected).filter(|(c, r)| c > r).count() as f64 / n;
    let margin = chosen
        .iter()
        .zip(rejected)
        .map(|(c, r)| (c - r) as f64)
        .sum::<f64>()
        / n;
    (acc, margin)
}

/// The RM loss of one batch of pairs: mean Bradley–Terry (with margins when given) plus optional centering.
pub fn pair_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_coef: Option<f64>,
) -> Result<Tensor> {
    let per_pair = match margin {
        Some(m) => bradley_terry_margin(chosen, rejected, m)?,
        None => bradley_terry(chosen, rejected)?,
    };
    let mut loss = per_pair.mean_all()?;
    if let Some(eta) = center_coef.filter(|e| *e != 0.0) {
        loss = (loss + centering(chosen, rejected, eta)?)?;
    }
    Ok(loss)
}
