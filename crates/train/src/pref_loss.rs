//! The DPO family of preference losses on sequence log-probabilities, one small function per loss.
//!
//! Inputs are f32 tensors of shape `[B]` (one entry per pair or example): summed completion log-probs of the
//! policy (`*_logps`), of the frozen reference (`ref_*_logps`) and completion token counts (`*_len`, as f32).
//! Every function returns the per-sample loss `[B]`, differentiable wrt the policy log-probs; formulas follow
//! TRL 1.16 (`DPOTrainer`, `KTOTrainer`, experimental `ORPOTrainer`/`CPOTrainer`) so the numbers match it.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// Which preference objective `rlhf dpo` optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    /// DPO (Rafailov et al. 2023): −log σ(β·Δ), Δ = (π_c − ref_c) − (π_r − ref_r).
    Sigmoid,
    /// IPO (Azar et al. 2023, eq. 17) on per-token averaged log-ratios, as TRL: (Δ̄ − 1/(2β))².
    Ipo,
    /// Robust DPO (Chowdhury et al. 2024) for labels flipped with probability ε = `label_smoothing`.
    Robust,
    /// SLiC-style hinge: relu(1 − β·Δ).
    Hinge,
    /// KTO (Ethayarajh et al. 2024, eq. 7) on unpaired desirable/undesirable completions.
    Kto,
    /// ORPO (Hong et al. 2024): NLL on chosen − λ·log σ(log-odds ratio); no reference model.
    Orpo,
    /// SimPO (Meng et al. 2024): −log σ(β·(π̄_c − π̄_r) − γ) on length-normalised log-probs; no reference.
    Simpo,
    /// CPL (Hejna et al. 2024, "Contrastive Preference Learning"), conservative CPL(λ) with optional BC term.
    Cpl,
}

impl LossType {
    /// Whether the loss compares against a frozen reference model.
    pub fn needs_reference(self) -> bool {
        !matches!(self, LossType::Orpo | LossType::Simpo | LossType::Cpl)
    }

    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Ipo => "ipo",
            LossType::Robust => "robust",
            LossType::Hinge => "hinge",
            LossType::Kto => "kto",
            LossType::Orpo => "orpo",
            LossType::Simpo => "simpo",
            LossType::Cpl => "cpl",
        }
    }
}

/// Hyper-parameters of all losses (each loss reads the ones it needs). Unknown keys are rejected by the config
/// reader (this struct is flattened into the stored `dpo` settings).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LossParams {
    /// Temperature β (DPO/IPO τ, robust, hinge, KTO, SimPO β).
    pub beta: f64,
    /// ε of `robust` (and SimPO's conservative smoothing as in TRL's CPO), in [0, 0.5).
    pub label_smoothing: f64,
    /// SimPO target margin γ (TRL `simpo_gamma`).
    pub simpo_gamma: f64,
    /// ORPO λ weighting the odds-ratio term (TRL's ORPOConfig calls it `beta`).
    pub orpo_lambda: f64,
    /// CPL temperature α on the summed log-probs (the paper's α).
    pub cpl_alpha: f64,
    /// CPL conservative bias λ ∈ (0, 1] down-weighting the rejected segment (the paper's λ; 1 = unbiased).
    pub cpl_lambda: f64,
    /// Weight of CPL's behaviour-cloning regulariser (per-token NLL of chosen), the paper's CPL(BC) variant.
    pub cpl_bc_weight: f64,
    /// KTO weight of desirable examples (TRL `desirable_weight`).
    pub desirable_weight: f64,
    /// KTO weight of undesirable examples (TRL `undesirable_weight`).
    pub undesirable_weight: f64,
}

impl Default for LossParams {
    fn default() -> Self {
        Self {
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            orpo_lambda: 0.1,
            cpl_alpha: 0.1,
            cpl_lambda: 0.5,
            cpl_bc_weight: 0.0,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

impl LossParams {
    /// Range checks; `key` prefixes the key in the message (e.g. the config section).
    pub fn validate(&self, loss: LossType) -> std::result::Result<(), (String, String)> {
        let bad = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return bad("beta", "must be a positive number");
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return bad("label_smoothing", "must be in [0, 0.5)");
        }
        // NaN or inf here would only surface as "non-finite loss at step 1".
        for (k, v) in [
            ("simpo_gamma", self.simpo_gamma),
            ("orpo_lambda", self.orpo_lambda),
            ("cpl_alpha", self.cpl_alpha),
            ("cpl_lambda", self.cpl_lambda),
            ("cpl_bc_weight", self.cpl_bc_weight),
            ("desirable_weight", self.desirable_weight),
            ("undesirable_weight", self.undesirable_weight),
        ] {
            if !v.is_finite() {
                return Err((k.to_string(), format!("must be a finite number, got {v}")));
            }
        }
        match loss {
            LossType::Cpl if !(self.cpl_lambda > 0.0 && self.cpl_lambda <= 1.0) => {
                bad("cpl_lambda", "must be in (0, 1]")
            }
            LossType::Cpl if self.cpl_alpha.is_nan() || self.cpl_alpha <= 0.0 => {
                bad("cpl_alpha", "must be positive")
            }
            LossType::Kto if self.desirable_weight < 0.0 || self.undesirable_weight < 0.0 => {
                bad("desirable_weight", "KTO weights must be non-negative")
            }
            _ => Ok(()),
        }
    }
}

/// log σ(x) = −softplus(−x), softplus(y) = relu(y) + log(1 + e^−|y|): stable for any x. candle's relu and abs
/// both take the derivative 1 at 0, which gives softplus the exact slope 1 − ½ = σ(0) there.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let y = x.neg()?;
    let soft = y.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    (y.relu()? + soft)?.neg()
}

/// σ(x) = exp(log σ(x)).
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    log_sigmoid(x)?.exp()
}

/// log(1 − eᵡ) for x < 0 (log-prob of "not this sequence").
fn log1mexp(x: &Tensor) -> Result<Tensor> {
    x.exp()?.affine(-1.0, 1.0)?.log()
}

/// DPO: −log σ(β·Δ), `delta` = chosen log-ratio − rejected log-ratio.
pub fn sigmoid_loss(delta: &Tensor, beta: f64) -> Result<Tensor> {
    log_sigmoid(&(delta * beta)?)?.neg()
}

/// Hinge: relu(1 − β·Δ).
pub fn hinge_loss(delta: &Tensor, beta: f64) -> Result<Tensor> {
    delta.affine(-beta, 1.0)?.relu()
}

/// IPO: (Δ̄ − 1/(2β))², `avg_delta` built from per-token averaged log-ratios (see [`per_token`]).
pub fn ipo_loss(avg_delta: &Tensor, beta: f64) -> Result<Tensor> {
    avg_delta.affine(1.0, -1.0 / (2.0 * beta))?.sqr()
}

/// Robust DPO: (−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε); ε = 0 is plain DPO.
pub fn robust_loss(delta: &Tensor, beta: f64, eps: f64) -> Result<Tensor> {
    let z = (delta * beta)?;
    let clean = (log_sigmoid(&z)? * -(1.0 - eps))?;
    let flipped = (log_sigmoid(&z.neg()?)? * eps)?;
    ((clean + flipped)? / (1.0 - 2.0 * eps))?.contiguous()
}

/// SimPO: −(1−ε)·log σ(β·(π̄_c − π̄_r) − γ) − ε·log σ(−(…)), on per-token averaged log-probs.
pub fn simpo_loss(
    avg_chosen: &Tensor,
    avg_rejected: &Tensor,
    beta: f64,
    gamma: f64,
    eps: f64,
) -> Result<Tensor> {
    let z = (avg_chosen - avg_rejected)?.affine(beta, -gamma)?;
    let a = (log_sigmoid(&z)? * -(1.0 - eps))?;
    let b = (log_sigmoid(&z.neg()?)? * -eps)?;
    a + b
}

/// ORPO's odds-ratio term per pair: −λ·log σ(log odds(y_c) − log odds(y_r)) with odds(y) = p/(1−p) of the
/// per-token averaged log-probs (Hong et al. eqs. 4, 7). Returns `(loss_or [B], log_odds [B])`.
pub fn orpo_odds_ratio_loss(
    avg_chosen: &Tensor,
    avg_rejected: &Tensor,
    lambda: f64,
) -> Result<(Tensor, Tensor)> {
    let log_odds =
        ((avg_chosen - avg_rejected)? - (log1mexp(avg_chosen)? - log1mexp(avg_rejected)?)?)?;
    let loss = (log_sigmoid(&log_odds)? * -lambda)?;
    Ok((loss, log_odds))
}

/// Token-level NLL of the chosen completions over the whole batch, −Σ logp / Σ tokens (what ORPO adds, like
/// TRL's cross-entropy over all chosen tokens, and CPL's BC regulariser).
pub fn chosen_nll(chosen_logps: &Tensor, chosen_len: &Tensor) -> Result<Tensor> {
    (chosen_logps.sum_all()?.neg()? / chosen_len.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?
        .contiguous()
}

/// CPL(λ) (Hejna et al. 2024, eq. 5 with the conservative bias of §3.3): the regret-preference likelihood
/// −log σ(α·Σ log π(a⁺) − λ·α·Σ log π(a⁻)), on summed (undiscounted, γ = 1) log-probs of the segments.
pub fn cpl_loss(
    chosen_logps: &Tensor,
    rejected_logps: &Tensor,
    alpha: f64,
    lambda: f64,
) -> Result<Tensor> {
    let z = ((chosen_logps * alpha)? - (rejected_logps * (alpha * lambda))?)?;
    log_sigmoid(&z)?.neg()
}

/// KTO (eq. 7): desirable `w_d·(1 − σ(β(r_c − z₀)))`, undesirable `w_u·(1 − σ(β(z₀ − r_u)))`, where r are
/// policy/reference log-ratios and z₀ the detached KL estimate, clamped at 0. Returns the desirable losses
/// followed by the undesirable ones (TRL's order; its mean is the loss).
pub fn kto_loss(
    desirable_logratios: &Tensor,
    undesirable_logratios: &Tensor,
    kl: f64,
    params: &LossParams,
) -> Result<Tensor> {
    let beta = params.beta;
    let d = sigmoid(&desirable_logratios.affine(-beta, beta * kl)?)?;
    let u = sigmoid(&undesirable_logratios.affine(beta, -beta * kl)?)?;
    Tensor::cat(
        &[
            (d * params.desirable_weight)?,
            (u * params.undesirable_weight)?,
        ],
        0,
    )
}

/// KTO's reference point z₀: mean log-ratio of the mismatched (prompt, other completion) pairs, clamped at 0.
pub fn kto_kl(kl_logps: &Tensor, ref_kl_logps: &Tensor) -> Result<f64> {
    let kl = (kl_logps - ref_kl_logps)?.mean_all()?.to_scalar::<f32>()? as f64;
    Ok(kl.max(0.0))
}

/// Per-token average: `logps / max(len, 1)` (IPO, SimPO, ORPO length normalisation).
pub fn per_token(logps: &Tensor, len: &Tensor) -> Result<Tensor> {
    logps / len.clamp(1f32, f32::MAX)?
}

/// Log-probs of one batch of pairs for a paired loss.
#[derive(Debug, Clone)]
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
    /// Reference log-probs; required for reference-based losses.
    pub ref_chosen: Option<Tensor>,
    pub ref_rejected: Option<Tensor>,
    /// Completion token counts (f32).
    pub chosen_len: Tensor,
    pub rejected_len: Tensor,
}

/// A paired loss and the implicit rewards TRL logs for it.
#[derive(Debug, Clone)]
pub struct PairLoss {
    /// Scalar loss to minimise.
    pub loss: Tensor,
    /// Detached implicit rewards `[B]`: β·log-ratio (DPO family), β·logp (SimPO/ORPO, as TRL's CPO/ORPO), α·logp (CPL).
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// Computes a paired loss (every type except `kto`, which needs unpaired inputs: see [`kto_loss`]).
pub fn pair_loss(loss_type: LossType, p: &LossParams, x: &PairLogps) -> Result<PairLoss> {
    let refs = || match (&x.ref_chosen, &x.ref_rejected) {
        (Some(c), Some(r)) => Ok(((&x.chosen - c)?, (&x.rejected - r)?)),
        _ => candle_core::bail!("loss `{}` needs reference log-probs", loss_type.name()),
    };
    let beta = p.beta;
    let (per_sample, rc, rr) = match loss_type {
        LossType::Sigmoid | LossType::Hinge | LossType::Robust | LossType::Ipo => {
            let (lc, lr) = refs()?;
            let l = match loss_type {
                LossType::Sigmoid => sigmoid_loss(&(&lc - &lr)?, beta)?,
                LossType::Hinge => hinge_loss(&(&lc - &lr)?, beta)?,
                LossType::Robust => robust_loss(&(&lc - &lr)?, beta, p.label_smoothing)?,
                _ => ipo_loss(
                    &(per_token(&lc, &x.chosen_len)? - per_token(&lr, &x.rejected_len)?)?,
                    beta,
                )?,
            };
            (l, (lc * beta)?, (lr * beta)?)
        }
        LossType::Simpo => {
            let (ac, ar) = (
                per_token(&x.chosen, &x.chosen_len)?,
                per_token(&x.rejected, &x.rejected_len)?,
            );
            let l = simpo_loss(&ac, &ar, beta, p.simpo_gamma, p.label_smoothing)?;
            (l, (ac * beta)?, (ar * beta)?)
        }
        LossType::Orpo => {
            let (ac, ar) = (
                per_token(&x.chosen, &x.chosen_len)?,
                per_token(&x.rejected, &x.rejected_len)?,
            );
            let (l, _) = orpo_odds_ratio_loss(&ac, &ar, p.orpo_lambda)?;
            let l = l.broadcast_add(&chosen_nll(&x.chosen, &x.chosen_len)?)?;
            (l, (ac * p.orpo_lambda)?, (ar * p.orpo_lambda)?)
        }
        LossType::Cpl => {
            let mut l = cpl_loss(&x.chosen, &x.rejected, p.cpl_alpha, p.cpl_lambda)?;
            if p.cpl_bc_weight != 0.0 {
                l = l.broadcast_add(&(chosen_nll(&x.chosen, &x.chosen_len)? * p.cpl_bc_weight)?)?;
            }
            (l, (&x.chosen * p.cpl_alpha)?, (&x.rejected * p.cpl_alpha)?)
        }
        LossType::Kto => candle_core::bail!("loss `kto` works on unpaired examples: use kto_loss"),
    };
    Ok(PairLoss {
        loss: per_sample.mean_all()?,
        chosen_rewards: rc.detach(),
        rejected_rewards: rr.detach(),
    })
}

/// What TRL logs for a batch of pairs (`rewards/*`, `logps/*`), as batch means.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PairMetrics {
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    /// Fraction of pairs with chosen reward > rejected reward.
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

impl PairMetrics {
    /// Under TRL's metric names.
    pub fn named(&self) -> [(&'static str, f64); 6] {
        [
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ]
    }
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
}

/// The TRL metrics of a paired loss on `x`.
pub fn pair_metrics(out: &PairLoss, x: &PairLogps) -> Result<PairMetrics> {
    let rc: Vec<f32> = out.chosen_rewards.to_vec1()?;
    let rr: Vec<f32> = out.rejected_rewards.to_vec1()?;
    let acc = rc.iter().zip(&rr).filter(|(c, r)| c > r).count() as f64 / rc.len().max(1) as f64;
    let margins: Vec<f32> = rc.iter().zip(&rr).map(|(c, r)| c - r).collect();
    Ok(PairMetrics {
        rewards_chosen: mean(&rc),
        rewards_rejected: mean(&rr),
        rewards_accuracies: acc,
        rewards_margins: mean(&margins),
        logps_chosen: mean(&x.chosen.detach().to_vec1()?),
        logps_rejected: mean(&x.rejected.detach().to_vec1()?),
    })
}

/// Log-probs of a KTO batch: `N` unpaired completions with labels, plus the mismatched KL sequences.
#[derive(Debug, Clone)]
pub struct KtoLogps {
    pub policy: Tensor,
    pub reference: Tensor,
    /// true = desirable.
    pub labels: Vec<bool>,
    /// Policy / reference log-probs of the KL sequences (prompt i with another row's completion).
    pub policy_kl: Tensor,
    pub ref_kl: Tensor,
}

/// KTO loss (mean over all examples, TRL's reduction), the KL estimate z₀ and the metrics TRL logs
/// (`rewards/accuracies` is left 0: TRL logs none for KTO).
pub fn kto(p: &LossParams, x: &KtoLogps) -> Result<(Tensor, f64, PairMetrics)> {
    let kl = kto_kl(&x.policy_kl.detach(), &x.ref_kl)?;
    let pick = |want: bool| -> Result<Tensor> {
        let idx: Vec<u32> = x
            .labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l == want)
            .map(|(i, _)| i as u32)
            .collect();
        let n = idx.len();
        Tensor::from_vec(idx, n, x.policy.device())
    };
    let (di, ui) = (pick(true)?, pick(false)?);
    let ratios = (&x.policy - &x.reference)?;
    let (dr, ur) = (ratios.index_select(&di, 0)?, ratios.index_select(&ui, 0)?);
    let loss = kto_loss(&dr, &ur, kl, p)?.mean_all()?;
    let rc: Vec<f32> = (dr.detach() * p.beta)?.to_vec1()?;
    let rr: Vec<f32> = (ur.detach() * p.beta)?.to_vec1()?;
    let metrics = PairMetrics {
        rewards_chosen: mean(&rc),
        rewards_rejected: mean(&rr),
        rewards_accuracies: 0.0,
        rewards_margins: mean(&rc) - mean(&rr),
        logps_chosen: mean(&x.policy.detach().index_select(&di, 0)?.to_vec1()?),
        logps_rejected: mean(&x.policy.detach().index_select(&ui, 0)?.to_vec1()?),
    };
    Ok((loss, kl, metrics))
}
