//! `*ForSequenceClassification` models (reward models): a causal-LM trunk plus a bias-free linear head
//! `score.weight` `[num_labels, hidden]` read at the last non-pad token of each row.
//!
//! Saved in the `transformers` layout (`architectures`: the architecture's
//! [`crate::ArchInfo::sequence_classification`], e.g. `["LlamaForSequenceClassification"]`; `num_labels`,
//! `id2label`, `pad_token_id`, the trunk tensors and `score.weight`, no `lm_head`), so
//! `AutoModelForSequenceClassification.from_pretrained` loads it. An ensemble of k reward heads on one trunk
//! is the same model with `num_labels = k`.

use crate::lora::{read_safetensors, write_safetensors};
use crate::{io, CausalLm, ModelConfig};
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::SeedableRng;
use serde_json::{json, Value};
use std::path::Path;

pub const HEAD: &str = "score.weight";
/// Label prefix of the heads of a reward ensemble (`reward_0`, …), which tells them apart from a classifier's
/// labels; a single reward head keeps transformers' `LABEL_0`.
pub const REWARD_LABEL: &str = "reward_";

/// A sequence classifier / reward model.
// Not Debug: candle_nn::VarMap is not.
pub struct SeqCls {
    /// The trunk. When loaded from a classification checkpoint (no `lm_head`) its config is marked tied, so
    /// the unused LM head costs nothing; [`SeqCls::save`] writes the original config back.
    pub lm: CausalLm,
    /// Holds `score.weight`.
    head: VarMap,
    score: Tensor,
    /// config.json as it will be saved (classification fields set).
    raw_config: Value,
    pad_token_id: u32,
}

fn is_classifier(raw: &Value) -> bool {
    raw.get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .is_some_and(|a| a.ends_with("ForSequenceClassification"))
}

impl SeqCls {
    /// Loads a `*ForSequenceClassification` directory, or a causal LM directory with a fresh head of
    /// `num_labels` outputs (normal(0, initializer_range) from `seed`, as `transformers`). `pad_token_id`
    /// overrides the config's (needed when the config has none).
    pub fn load(
        dir: &Path,
        num_labels: usize,
        pad_token_id: Option<u32>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let cfg_path = dir.join(io::CONFIG);
        let raw = io::read_json(&cfg_path)?;
        if !is_classifier(&raw) {
            let lm = CausalLm::load(dir, device)?;
            return Self::from_causal_lm(lm, num_labels, pad_token_id, seed);
        }
        let weights = dir.join(io::WEIGHTS);
        let mut tensors = read_safetensors(&weights, device)?;
        let score = match tensors.remove(HEAD) {
            Some(s) => s,
            None => bail!(
                "{}: missing tensor `{HEAD}` (the classification head)",
                weights.display()
            ),
        };
        // The trunk has no lm_head: build it as tied so CausalLm needs none.
        let mut trunk_raw = raw.clone();
        trunk_raw["tie_word_embeddings"] = Value::Bool(true);
        let config = ModelConfig::from_json(trunk_raw, &cfg_path.display().to_string())?;
        let lm = CausalLm::from_tensors(
            config,
            tensors,
            None,
            device,
            &weights.display().to_string(),
        )?;
        if score.rank() != 2 || score.dims()[1] != lm.hidden_size() {
            bail!(
                "{}: tensor `{HEAD}` has shape {:?}, expected [num_labels, {}]",
                weights.display(),
                score.dims(),
                lm.hidden_size()
            )
        }
        Self::assemble(
            lm,
            score,
            raw,
            pad_token_id,
            &cfg_path.display().to_string(),
        )
    }

    /// Puts a fresh head on a causal LM (its `lm_head`, if separate, is kept but unused and not saved).
    pub fn from_causal_lm(
        lm: CausalLm,
        num_labels: usize,
        pad_token_id: Option<u32>,
        seed: u64,
    ) -> Result<Self> {
        if num_labels == 0 {
            bail!("num_labels must be at least 1")
        }
        let raw = lm.config().raw.clone();
        let std = raw
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let h = lm.hidden_size();
        let data: Vec<f32> = (0..num_labels * h)
            .map(|_| (crate::normal(&mut rng) * std) as f32)
            .collect();
        let score = Tensor::from_vec(data, (num_labels, h), lm.device())?;
        Self::assemble(lm, score, raw, pad_token_id, "config.json")
    }

    fn assemble(
        lm: CausalLm,
        score: Tensor,
        mut raw: Value,
        pad: Option<u32>,
        file: &str,
    ) -> Result<Self> {
        let pad_token_id = match pad.or(lm.config().pad_token_id()) {
            Some(p) => p,
            None => bail!(
                "{file}: field \"pad_token_id\": missing; a reward model needs a pad token id"
            ),
        };
        let k = score.dims()[0];
        let obj = match raw.as_object_mut() {
            Some(o) => o,
            None => bail!("{file}: expected a JSON object"),
        };
        obj.insert(
            "architectures".into(),
            json!([lm.config().arch_info().sequence_classification]),
        );
        obj.insert("num_labels".into(), json!(k));
        let label = |i: usize| {
            if k == 1 {
                "LABEL_0".to_string()
            } else {
                format!("{REWARD_LABEL}{i}")
            }
        };
        obj.insert(
            "id2label".into(),
            (0..k).map(|i| (i.to_string(), json!(label(i)))).collect(),
        );
        obj.insert(
            "label2id".into(),
            (0..k).map(|i| (label(i), json!(i))).collect(),
        );
        obj.insert("pad_token_id".into(), json!(pad_token_id));
        let head = VarMap::new();
        let var = Var::from_tensor(&score.to_dtype(DType::F32)?)?;
        let score = var.as_tensor().clone();
        head.data()
            .lock()
            .expect("VarMap lock poisoned")
            .insert(HEAD.into(), var);
        Ok(Self {
            lm,
            head,
            score,
            raw_config: raw,
            pad_token_id,
        })
    }

    pub fn num_labels(&self) -> usize {
        self.score.dims()[0]
    }

    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }

    /// The head's `score.weight` variable.
    pub fn head(&self) -> &VarMap {
        &self.head
    }

    pub fn score_weight(&self) -> &Tensor {
        &self.score
    }

    /// Every trainable parameter of a full fine-tune: trunk (without the unused `lm_head`) and head.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self
            .lm
            .varmap()
            .data()
            .lock()
            .expect("VarMap lock poisoned")
            .iter()
            .filter(|(k, _)| k.as_str() != "lm_head.weight")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.extend(
            self.head
                .data()
                .lock()
                .expect("VarMap lock poisoned")
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Scores `[b, num_labels]` of right-padded u32 `input_ids` `[b, t]`, read at position `lengths[i] − 1`.
    pub fn forward(&self, input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if lengths.len() != b || lengths.iter().any(|&l| l == 0 || l > t) {
            bail!("forward: lengths {lengths:?} do not fit a batch of {b} rows × {t} tokens")
        }
        let idx: Vec<u32> = lengths
            .iter()
            .enumerate()
            .map(|(i, &l)| (i * t + l - 1) as u32)
            .collect();
        let idx = Tensor::from_vec(idx, b, input_ids.device())?;
        let last = self.lm.hidden_states_at(input_ids, None, None, &idx)?;
        self.score_hidden(&last)
    }

    /// Scores at every position `[b, t, num_labels]` (what a PPO value head reads).
    pub fn token_scores(&self, input_ids: &Tensor) -> Result<Tensor> {
        let hidden = self.lm.hidden_states(input_ids, None)?;
        let (b, t, h) = hidden.dims3()?;
        self.score_hidden(&hidden.reshape((b * t, h))?)?
            .reshape((b, t, self.num_labels()))
    }

    /// The score head alone: scores `[n, num_labels]` of final hidden states `[n, hidden]`.
    pub fn score_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        hidden.matmul(&self.score.t()?)
    }

    /// Writes `config.json` and `model.safetensors` in the `*ForSequenceClassification` layout.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| {
            candle_core::Error::Msg(format!("{}: cannot create directory: {e}", dir.display()))
        })?;
        let mut named: Vec<(String, Tensor)> = self
            .lm
            .varmap()
            .data()
            .lock()
            .expect("VarMap lock poisoned")
            .iter()
            .filter(|(k, _)| k.as_str() != "lm_head.weight")
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        named.push((HEAD.into(), self.score.clone()));
        write_safetensors(&dir.join(io::WEIGHTS), &named)?;
        let mut cfg = self.raw_config.clone();
        cfg["dtype"] = json!("float32");
        let text = serde_json::to_string_pretty(&cfg).map_err(candle_core::Error::wrap)?;
        io::write_atomic(&dir.join(io::CONFIG), text.as_bytes())
    }
}
