//! Reward-model ensembles: k heads on one trunk (one model with `num_labels = k`) or k separate models.
//! Per sample they give the mean reward and the disagreement (standard deviation over members), the
//! uncertainty signal used to pick what to label next.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rlhf_model::seq_cls::{SeqCls, REWARD_LABEL};

use crate::error::{Result, TrainError};

/// Refuses a directory that is not a sequence-classification model: loading a causal LM would put a
/// fresh random head on it, and its "rewards" would be noise.
fn check_reward_model(dir: &Path) -> Result<()> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::Io {
        path: path.clone(),
        source: e,
    })?;
    let raw: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Model(format!("{}: {e}", path.display())))?;
    let arch = raw
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str());
    if !arch.is_some_and(|a| a.ends_with("ForSequenceClassification")) {
        return Err(TrainError::Model(format!(
            "{}: field \"architectures\": {} is not a reward model (*ForSequenceClassification); train one with `rlhf rm`",
            path.display(),
            arch.map_or("missing".to_string(), |a| format!("\"{a}\""))
        )));
    }
    // k outputs are k reward heads only when `rlhf rm --num-heads k` wrote them (labels `reward_0`, …); any
    // other multi-label model is a classifier whose label scores are not rewards.
    let labels: Vec<&str> = match raw.get("id2label").and_then(|l| l.as_object()) {
        Some(m) => m.values().map(|v| v.as_str().unwrap_or("")).collect(),
        None => Vec::new(),
    };
    let num_labels = raw
        .get("num_labels")
        .and_then(|n| n.as_u64())
        .unwrap_or(labels.len().max(1) as u64);
    if num_labels > 1
        && !(labels.len() as u64 == num_labels
            && labels.iter().all(|l| l.starts_with(REWARD_LABEL)))
    {
        return Err(TrainError::Model(format!(
            "{}: field \"num_labels\": {num_labels} labels ({}) make a classifier, not a reward model (num_labels 1) \
             nor an ensemble of `rlhf rm --num-heads` (labels {REWARD_LABEL}0, {REWARD_LABEL}1, …)",
            path.display(),
            if labels.is_empty() { "no id2label".to_string() } else { labels.join(", ") }
        )));
    }
    Ok(())
}

pub enum Ensemble {
    /// One model; each of its `num_labels` outputs is a member (1 = a plain reward model).
    Heads(Box<SeqCls>),
    /// Several single-head reward models sharing a tokenizer.
    Models(Vec<SeqCls>),
}

impl Ensemble {
    /// One directory: its heads; several: one member each (each must have a single head).
    pub fn load(dirs: &[PathBuf], device: &Device) -> Result<Self> {
        let load = |d: &PathBuf| {
            if !d.join("config.json").is_file() {
                return Err(TrainError::Config {
                    file: "command line".into(),
                    key: "model".into(),
                    msg: format!("{} has no config.json", d.display()),
                });
            }
            check_reward_model(d)?;
            SeqCls::load(d, 1, None, 0, device).map_err(|e| TrainError::Model(e.to_string()))
        };
        match dirs {
            [] => Err(TrainError::Config {
                file: "command line".into(),
                key: "model".into(),
                msg: "no reward model given".into(),
            }),
            [one] => Ok(Ensemble::Heads(Box::new(load(one)?))),
            many => {
                let models = many.iter().map(load).collect::<Result<Vec<_>>>()?;
                if let Some((d, m)) = many.iter().zip(&models).find(|(_, m)| m.num_labels() != 1) {
                    return Err(TrainError::Model(format!(
                        "{}: has {} heads; an ensemble of models needs single-head members",
                        d.display(),
                        m.num_labels()
                    )));
                }
                Ok(Ensemble::Models(models))
            }
        }
    }

    /// Every member's matrix-product precision (the trainer's `bf16`).
    pub fn set_precision(&mut self, precision: rlhf_model::Precision) {
        match self {
            Ensemble::Heads(m) => m.lm.set_precision(precision),
            Ensemble::Models(v) => v.iter_mut().for_each(|m| m.lm.set_precision(precision)),
        }
    }

    pub fn size(&self) -> usize {
        match self {
            Ensemble::Heads(m) => m.num_labels(),
            Ensemble::Models(v) => v.len(),
        }
    }

    /// The vocabulary size of each member model (one entry for a multi-head model).
    pub fn vocab_sizes(&self) -> Vec<usize> {
        match self {
            Ensemble::Heads(m) => vec![m.lm.vocab_size()],
            Ensemble::Models(v) => v.iter().map(|m| m.lm.vocab_size()).collect(),
        }
    }

    pub fn pad_token_id(&self) -> u32 {
        match self {
            Ensemble::Heads(m) => m.pad_token_id(),
            Ensemble::Models(v) => v[0].pad_token_id(),
        }
    }

    /// Member rewards `[b, k]` of right-padded `input_ids` `[b, t]`.
    pub fn scores(&self, input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        Ok(match self {
            Ensemble::Heads(m) => m.forward(input_ids, lengths)?.detach(),
            Ensemble::Models(v) => {
                let cols = v
                    .iter()
                    .map(|m| m.forward(input_ids, lengths))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&cols, 1)?.detach()
            }
        })
    }
}

/// Per row of `[b, k]` scores: the mean and the sample standard deviation over the k members (0 when k = 1).
pub fn mean_std(scores: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    let rows: Vec<Vec<f32>> = scores.to_vec2()?;
    Ok(rows
        .iter()
        .map(|r| {
            let k = r.len() as f64;
            let mean = r.iter().map(|&x| x as f64).sum::<f64>() / k;
            let var = if r.len() > 1 {
                r.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (k - 1.0)
            } else {
                0.0
            };
            (mean as f32, var.sqrt() as f32)
        })
        .unzip())
}
