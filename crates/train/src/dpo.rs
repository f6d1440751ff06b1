//! `rlhf dpo`: offline preference optimisation of a causal LM with the DPO family of losses
//! ([`crate::pref_loss`]): `sigmoid` (DPO), `ipo`, `robust`, `hinge`, `kto` (unpaired), and the reference-free
//! `orpo`, `simpo`, `cpl`.
//!
//! Chosen and rejected sequences go through the policy in one concatenated forward (`[chosen; rejected]`,
//! TRL's layout). The reference is a frozen second model (default: a copy of the initial policy), or with LoRA
//! and no explicit reference the policy with its adapters switched off; its log-probs can be precomputed once
//! over the dataset (`precompute_ref_log_probs`), after which the reference model is dropped.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rlhf_data::{
    collate, collate_preference, Format, PreferenceExample, Record, TokenBatch, TokenizedSequence,
    Tokenizer, Truncation, IGNORE,
};
use rlhf_model::lora::Lora;
use rlhf_model::CausalLm;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{io_err, Result, TrainError};
use crate::lora::attach_lora;
use crate::optim::AdamW;
use crate::pref_config::{DpoOptions, PrefArgs, PrefConfig};
use crate::pref_data::{bench_pairs, data_err, row_err, tokenize_completion};
use crate::pref_loss::{self, KtoLogps, LossType, PairLogps};
use crate::pref_train::{
    bench_steps, eval_means, prepare_run, train_loop, Forward, Metrics, Objective, PrefSummary,
};
use crate::settings::Settings;
use crate::train_args::TrainDefaults;
use crate::trainer::copy_tokenizer;

/// Settings of `rlhf dpo`: the preference trainers' settings plus these (TOML keys and flags of the same names;
/// older files group them in a section `[dpo]`).
#[derive(Debug, Clone, Default, PartialEq, clap::Parser, Serialize, Deserialize)]
#[command(
    about = "Direct preference optimisation: sigmoid (DPO), ipo, robust, hinge, kto, orpo, simpo, cpl"
)]
pub struct DpoArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: PrefArgs,
    /// Preference loss [default: sigmoid]
    #[arg(long, value_enum)]
    pub loss_type: Option<LossType>,
    /// Frozen reference model directory [default: a copy of --model]
    #[arg(long)]
    pub reference_model: Option<PathBuf>,
    /// Compute reference log-probs once before training [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub precompute_ref_log_probs: Option<bool>,
    /// β temperature [default: 0.1]
    #[arg(long)]
    pub beta: Option<f64>,
    /// ε of robust / SimPO [default: 0]
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// SimPO target margin γ [default: 0.5]
    #[arg(long)]
    pub simpo_gamma: Option<f64>,
    /// ORPO λ [default: 0.1]
    #[arg(long)]
    pub orpo_lambda: Option<f64>,
    /// CPL temperature α [default: 0.1]
    #[arg(long)]
    pub cpl_alpha: Option<f64>,
    /// CPL conservative bias λ in (0, 1] [default: 0.5]
    #[arg(long)]
    pub cpl_lambda: Option<f64>,
    /// CPL behaviour-cloning weight [default: 0]
    #[arg(long)]
    pub cpl_bc_weight: Option<f64>,
    /// KTO weight of desirable examples [default: 1]
    #[arg(long)]
    pub desirable_weight: Option<f64>,
    /// KTO weight of undesirable examples [default: 1]
    #[arg(long)]
    pub undesirable_weight: Option<f64>,
}

impl Settings for DpoArgs {
    fn help_defaults() -> Vec<(&'static str, String)> {
        TrainDefaults::DPO.help()
    }
}

impl DpoArgs {
    /// File + flags (merged by [`crate::settings::load`]), validated for preference optimisation.
    pub fn resolve(&self) -> Result<PrefConfig> {
        let mut c = self.common.resolve(&TrainDefaults::DPO)?;
        let d = &mut c.dpo;
        if let Some(v) = self.loss_type {
            d.loss_type = v;
        }
        d.reference_model = self.reference_model.clone();
        if let Some(v) = self.precompute_ref_log_probs {
            d.precompute_ref_log_probs = v;
        }
        let p = &mut d.params;
        for (flag, field) in [
            (self.beta, &mut p.beta),
            (self.label_smoothing, &mut p.label_smoothing),
            (self.simpo_gamma, &mut p.simpo_gamma),
            (self.orpo_lambda, &mut p.orpo_lambda),
            (self.cpl_alpha, &mut p.cpl_alpha),
            (self.cpl_lambda, &mut p.cpl_lambda),
            (self.cpl_bc_weight, &mut p.cpl_bc_weight),
            (self.desirable_weight, &mut p.desirable_weight),
            (self.undesirable_weight, &mut p.undesirable_weight),
        ] {
            if let Some(v) = flag {
                *field = v;
            }
        }
        validate_dpo(&c.dpo, &|k, m| self.common.err(k, m))?;
        Ok(c)
    }
}

fn validate_dpo(d: &DpoOptions, err: &dyn Fn(&str, String) -> TrainError) -> Result<()> {
    d.params
        .validate(d.loss_type)
        .map_err(|(k, m)| err(&k, m))?;
    if let Some(r) = &d.reference_model {
        if !d.loss_type.needs_reference() {
            return Err(err(
                "reference_model",
                format!("loss `{}` uses no reference model", d.loss_type.name()),
            ));
        }
        if !r.join("config.json").is_file() {
            return Err(err(
                "reference_model",
                format!(
                    "{} has no config.json (missing reference model)",
                    r.display()
                ),
            ));
        }
    }
    if d.precompute_ref_log_probs && d.loss_type == LossType::Kto {
        return Err(err(
            "precompute_ref_log_probs",
            "not supported with `kto` (its KL pairs change with the batch)".into(),
        ));
    }
    Ok(())
}

/// One unpaired (KTO) example.
#[derive(Debug, Clone, PartialEq)]
pub struct UnpairedExample {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    /// true = desirable.
    pub label: bool,
}

/// Tokenized DPO data.
#[derive(Debug, Clone)]
pub enum DpoData {
    Pairs(Vec<PreferenceExample>),
    Unpaired(Vec<UnpairedExample>),
}

impl DpoData {
    pub fn len(&self) -> usize {
        match self {
            DpoData::Pairs(p) => p.len(),
            DpoData::Unpaired(u) => u.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Loads and tokenizes DPO data: pairs (preference, implicit preference, correction), or for `kto` also
/// `unpaired` rows; pairs given to `kto` become one desirable and one undesirable example each.
pub fn load_dpo_data(path: &Path, tokenizer: &Tokenizer, cfg: &PrefConfig) -> Result<DpoData> {
    let ds = rlhf_data::load_dataset(path).map_err(data_err)?;
    ds.check_text_size(tokenizer, cfg.max_length, "max_length", &[])
        .map_err(data_err)?;
    let kto = cfg.dpo.loss_type == LossType::Kto;
    let data = match ds.format {
        Format::Preference | Format::ImplicitPreference | Format::Correction => {
            let pairs = rlhf_data::tokenize_preferences(&ds, tokenizer, cfg.chat_template.as_deref()).map_err(data_err)?;
            let pairs: Vec<PreferenceExample> = pairs.into_iter().filter(|p| p.prompt_ids.len() < cfg.max_length).collect();
            if kto {
                DpoData::Unpaired(
                    pairs
                        .into_iter()
                        .flat_map(|p| {
                            [(p.chosen_ids, true), (p.rejected_ids, false)].map(|(c, label)| UnpairedExample {
                                prompt_ids: p.prompt_ids.clone(),
                                completion_ids: c,
                                label,
                            })
                        })
                        .collect(),
                )
            } else {
                DpoData::Pairs(pairs)
            }
        }
        Format::Unpaired if kto => {
            let template =
                if ds.conversational { Some(tokenizer.chat_template(cfg.chat_template.as_deref()).map_err(data_err)?) } else { None };
            let mut out = Vec::with_capacity(ds.len());
            for row in &ds.rows {
                let Record::Unpaired(u) = &row.record else { unreachable!("dataset rows share one format") };
                let (p, c) = tokenize_completion(&u.prompt, &u.completion, tokenizer, template).map_err(|e| row_err(&ds, row, e))?;
                if p.len() < cfg.max_length {
                    out.push(UnpairedExample { prompt_ids: p, completion_ids: c, label: u.label });
                }
            }
            DpoData::Unpaired(out)
        }
        other => {
            return Err(TrainError::Data(format!(
                "{}: loss `{}` trains on preference, implicit_preference or correction data{}, not {other}",
                path.display(),
                cfg.dpo.loss_type.name(),
                if kto { " (or unpaired)" } else { "" }
            )))
        }
    };
    if data.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no example has a prompt shorter than max_length {}",
            path.display(),
            cfg.max_length
        )));
    }
    Ok(data)
}

/// Summed completion log-probs per row of `tb` (`[rows]`, differentiable) and the completion token counts.
/// Only positions that predict a completion token reach the LM head.
pub fn completion_logps(model: &CausalLm, tb: &TokenBatch) -> Result<(Tensor, Vec<f32>)> {
    let device = model.device();
    let (r, t) = (tb.batch_size, tb.seq_len);
    let ids = Tensor::from_vec(tb.input_ids.clone(), (r, t), device)?;
    let (mut gather, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
    let mut lens = vec![0f32; r];
    for i in 0..r * t {
        if tb.loss_mask[i] > 0.0 {
            gather.push(i as u32);
            targets.push(tb.targets[i]);
            owner.push(i / t);
            lens[i / t] += 1.0;
        }
    }
    let n = gather.len();
    let picked = model.hidden_states_at(&ids, None, None, &Tensor::from_vec(gather, n, device)?)?;
    let lp = model.token_logprobs_from_hidden(&picked, &Tensor::from_vec(targets, n, device)?)?;
    // Row sums as a product with the [rows, n] membership matrix (differentiable, one gemm).
    let mut member = vec![0f32; r * n];
    for (j, &row) in owner.iter().enumerate() {
        member[row * n + j] = 1.0;
    }
    let sums = Tensor::from_vec(member, (r, n), device)?
        .matmul(&lp.unsqueeze(1)?)?
        .squeeze(1)?;
    Ok((sums, lens))
}

/// The rows of a KTO batch: each example, then each prompt with the previous example's completion (TRL's KL
/// sequences), as one right-padded batch.
fn kto_batch(ex: &[&UnpairedExample], pad: u32, max_length: usize) -> TokenBatch {
    let n = ex.len();
    let row = |p: &[u32], c: &[u32]| {
        let mut ids = [p, c].concat();
        let mut labels: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| if i < p.len() { IGNORE } else { i64::from(id) })
            .collect();
        ids.truncate(max_length);
        labels.truncate(max_length);
        TokenizedSequence::new(ids, labels)
    };
    let mut rows: Vec<TokenizedSequence> = ex
        .iter()
        .map(|e| row(&e.prompt_ids, &e.completion_ids))
        .collect();
    rows.extend((0..n).map(|i| row(&ex[i].prompt_ids, &ex[(i + n - 1) % n].completion_ids)));
    collate(&rows.iter().collect::<Vec<_>>(), pad, None)
}

/// Reference log-probs per pair: (chosen, rejected).
type RefLogps = Vec<(f32, f32)>;

/// Where reference log-probs come from.
enum Reference {
    /// Reference-free loss, or everything precomputed.
    None,
    Model(Box<CausalLm>),
    /// The policy with its LoRA adapters switched off (the frozen base).
    BaseOfAdapters,
}

/// The DPO trainer (drive it with [`train_loop`] or call [`Objective::forward`] directly).
pub struct DpoTrainer {
    policy: CausalLm,
    lora: Option<Lora>,
    reference: Reference,
    /// Precomputed reference log-probs of the train and eval examples.
    precomputed: Option<(RefLogps, Option<RefLogps>)>,
    optimizer: AdamW,
    train: DpoData,
    eval: Option<DpoData>,
    opts: DpoOptions,
    pad: u32,
    batch_size: usize,
    max_length: usize,
    source_dir: Option<PathBuf>,
}

impl DpoTrainer {
    /// Loads the policy, reference, tokenizer and data of a validated `cfg`; with `cfg.resume` the policy
    /// weights of the newest checkpoint in `output_dir`.
    pub fn new(cfg: &PrefConfig) -> Result<Self> {
        let checkpoint = cfg
            .train
            .resume
            .then(|| crate::checkpoint::resume_dir(&cfg.train.output_dir))
            .transpose()?;
        Self::load(cfg, checkpoint.as_deref())
    }

    /// [`DpoTrainer::new`] with the policy weights of `checkpoint` when given (the model, or with LoRA the
    /// adapters over the base). The reference stays the initial model.
    fn load(cfg: &PrefConfig, checkpoint: Option<&Path>) -> Result<Self> {
        let (model_dir, train_file) = (cfg.model.clone(), &cfg.train_file);
        let device = Device::Cpu;
        let tokenizer = Tokenizer::from_dir(&model_dir).map_err(data_err)?;
        let pad = tokenizer.pad_id().map_err(data_err)?;
        let model_err = |e: candle_core::Error| TrainError::Model(e.to_string());
        let policy_dir = match (checkpoint, &cfg.train.lora) {
            (Some(dir), None) => dir,
            _ => model_dir.as_path(),
        };
        let policy = CausalLm::load(policy_dir, &device).map_err(model_err)?;
        // Token ids past the embedding table would otherwise fail deep inside the forward pass.
        tokenizer
            .check_vocab(policy.vocab_size(), model_dir.join("config.json"))
            .map_err(data_err)?;
        let reference_dir = match (&cfg.dpo.reference_model, policy_dir == model_dir.as_path()) {
            (Some(dir), _) => Some(dir.as_path()),
            // Resumed full fine-tuning: the default reference is the initial model, not the checkpoint.
            (None, false) if cfg.dpo.loss_type.needs_reference() => Some(model_dir.as_path()),
            (None, _) => None,
        };
        let reference = reference_dir
            .map(|dir| CausalLm::load(dir, &device).map_err(model_err))
            .transpose()?;
        let train = load_dpo_data(train_file, &tokenizer, cfg)?;
        let eval = cfg
            .eval_file
            .as_deref()
            .map(|f| load_dpo_data(f, &tokenizer, cfg))
            .transpose()?;
        let mut t = Self::from_parts(policy, reference, train, eval, pad, cfg)?;
        t.source_dir = Some(model_dir);
        if let (Some(dir), Some(l)) = (checkpoint, &t.lora) {
            let saved = dir.join(rlhf_model::lora::ADAPTER_WEIGHTS);
            crate::lora::restore_vars(
                &crate::optim::sorted_params(l.varmap()),
                &saved,
                crate::lora::PEFT_PREFIX,
            )?;
        }
        Ok(t)
    }

    /// A trainer over loaded models and tokenized data. `reference` None: a frozen copy of the initial policy
    /// (or the adapter-free base under LoRA) when the loss needs one.
    pub fn from_parts(
        mut policy: CausalLm,
        reference: Option<CausalLm>,
        train: DpoData,
        eval: Option<DpoData>,
        pad: u32,
        cfg: &PrefConfig,
    ) -> Result<Self> {
        let opts = cfg.dpo.clone();
        if matches!(train, DpoData::Unpaired(_)) != (opts.loss_type == LossType::Kto) {
            return Err(TrainError::Data(format!(
                "loss `{}` does not match the data (unpaired data is for kto)",
                opts.loss_type.name()
            )));
        }
        let model_err = |e: candle_core::Error| TrainError::Model(e.to_string());
        // The reference computes in the policy's precision (TRL autocasts both).
        cfg.train.configure(&mut policy);
        let reference = match (opts.loss_type.needs_reference(), reference, &cfg.train.lora) {
            (false, _, _) => Reference::None,
            (true, Some(mut r), _) => {
                r.set_precision(policy.precision());
                r.set_backend(policy.backend());
                r.set_trainable(false).map_err(model_err)?;
                Reference::Model(Box::new(r))
            }
            (true, None, Some(_)) => Reference::BaseOfAdapters,
            (true, None, None) => {
                let mut r = policy.duplicate().map_err(model_err)?;
                r.set_trainable(false).map_err(model_err)?;
                Reference::Model(Box::new(r))
            }
        };
        let lora = attach_lora(&mut policy, cfg.train.lora.as_ref(), cfg.train.seed)?;
        let params = match &lora {
            Some(l) => crate::optim::sorted_params(l.varmap()),
            None => crate::optim::sorted_params(policy.varmap()),
        };
        let optimizer = AdamW::new(params, cfg.train.adamw())?;
        let mut t = Self {
            policy,
            lora,
            reference,
            precomputed: None,
            optimizer,
            train,
            eval,
            opts,
            pad,
            batch_size: cfg.batch_size,
            max_length: cfg.max_length,
            source_dir: None,
        };
        if t.opts.precompute_ref_log_probs && !matches!(t.reference, Reference::None) {
            let train = t.precompute(&t.train)?;
            let eval = t.eval.as_ref().map(|e| t.precompute(e)).transpose()?;
            t.precomputed = Some((train, eval));
            // A separate reference model is no longer needed.
            if let Reference::Model(_) = t.reference {
                t.reference = Reference::None;
            }
        }
        Ok(t)
    }

    pub fn policy(&self) -> &CausalLm {
        &self.policy
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    fn precompute(&self, data: &DpoData) -> Result<Vec<(f32, f32)>> {
        let DpoData::Pairs(pairs) = data else {
            unreachable!("validated: kto cannot precompute")
        };
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(self.batch_size) {
            let refs: Vec<&PreferenceExample> = chunk.iter().collect();
            let tb = collate_preference(
                &refs,
                self.pad,
                Some(self.max_length),
                Truncation::KeepStart,
            )
            .tokens;
            let lp: Vec<f32> = self
                .reference_logps(&tb)?
                .expect("reference present")
                .to_vec1()?;
            let b = chunk.len();
            out.extend((0..b).map(|i| (lp[i], lp[b + i])));
        }
        Ok(out)
    }

    /// Reference log-probs of the rows of `tb` (no gradient), None for reference-free losses.
    fn reference_logps(&self, tb: &TokenBatch) -> Result<Option<Tensor>> {
        Ok(match &self.reference {
            Reference::None => None,
            Reference::Model(m) => Some(completion_logps(m, tb)?.0.detach()),
            Reference::BaseOfAdapters => {
                let l = self.lora.as_ref().expect("adapters present");
                l.set_enabled(false);
                let lp = completion_logps(&self.policy, tb);
                l.set_enabled(true);
                Some(lp?.0.detach())
            }
        })
    }

    fn data_forward(
        &self,
        data: &DpoData,
        precomputed: Option<&Vec<(f32, f32)>>,
        idx: &[usize],
    ) -> Result<Forward> {
        let device = self.policy.device().clone();
        let p = &self.opts.params;
        match data {
            DpoData::Pairs(all) => {
                let b = idx.len();
                let pairs: Vec<&PreferenceExample> = idx.iter().map(|&i| &all[i]).collect();
                let tb = collate_preference(
                    &pairs,
                    self.pad,
                    Some(self.max_length),
                    Truncation::KeepStart,
                )
                .tokens;
                let (lp, lens) = completion_logps(&self.policy, &tb)?;
                let ref_lp = match precomputed {
                    Some(pre) => {
                        let v: Vec<f32> = idx
                            .iter()
                            .map(|&i| pre[i].0)
                            .chain(idx.iter().map(|&i| pre[i].1))
                            .collect();
                        Some(Tensor::from_vec(v, 2 * b, &device)?)
                    }
                    None => self.reference_logps(&tb)?,
                };
                let len = Tensor::from_vec(lens, 2 * b, &device)?;
                let x = PairLogps {
                    chosen: lp.narrow(0, 0, b)?,
                    rejected: lp.narrow(0, b, b)?,
                    ref_chosen: ref_lp.as_ref().map(|r| r.narrow(0, 0, b)).transpose()?,
                    ref_rejected: ref_lp.as_ref().map(|r| r.narrow(0, b, b)).transpose()?,
                    chosen_len: len.narrow(0, 0, b)?,
                    rejected_len: len.narrow(0, b, b)?,
                };
                let out = pref_loss::pair_loss(self.opts.loss_type, p, &x)?;
                let m = pref_loss::pair_metrics(&out, &x)?;
                let metrics = m.named().iter().map(|(k, v)| (k.to_string(), *v)).collect();
                Ok(Forward {
                    loss: out.loss,
                    metrics,
                    num_tokens: tb.num_tokens,
                })
            }
            DpoData::Unpaired(all) => {
                let n = idx.len();
                let ex: Vec<&UnpairedExample> = idx.iter().map(|&i| &all[i]).collect();
                let tb = kto_batch(&ex, self.pad, self.max_length);
                let (lp, _) = completion_logps(&self.policy, &tb)?;
                let rl = self.reference_logps(&tb)?.expect("kto has a reference");
                let x = KtoLogps {
                    policy: lp.narrow(0, 0, n)?,
                    reference: rl.narrow(0, 0, n)?,
                    labels: ex.iter().map(|e| e.label).collect(),
                    policy_kl: lp.narrow(0, n, n)?,
                    ref_kl: rl.narrow(0, n, n)?,
                };
                let (loss, kl, m) = pref_loss::kto(p, &x)?;
                let mut metrics: Metrics = m
                    .named()
                    .iter()
                    .filter(|(k, _)| *k != "rewards/accuracies")
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect();
                metrics.insert("kl".into(), kl);
                // The KL rows are extra compute, not training tokens.
                let num_tokens = tb.lengths()[..n].iter().sum();
                Ok(Forward {
                    loss,
                    metrics,
                    num_tokens,
                })
            }
        }
    }
}

impl Objective for DpoTrainer {
    fn num_examples(&self) -> usize {
        self.train.len()
    }

    fn forward(&mut self, idx: &[usize]) -> Result<Forward> {
        if let Some(l) = &self.lora {
            l.set_training(true);
        }
        self.data_forward(&self.train, self.precomputed.as_ref().map(|p| &p.0), idx)
    }

    /// Loss and metrics over the whole eval set (per-example means).
    fn evaluate(&mut self) -> Result<Option<Metrics>> {
        let Some(eval) = &self.eval else {
            return Ok(None);
        };
        if let Some(l) = &self.lora {
            l.set_training(false);
        }
        let pre = self.precomputed.as_ref().and_then(|p| p.1.as_ref());
        eval_means(eval.len(), self.batch_size, |chunk| {
            self.data_forward(eval, pre, chunk)
        })
        .map(Some)
    }

    fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// The policy in the HF layout, or with LoRA a PEFT `CAUSAL_LM` adapter directory.
    fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let model_err = |e: candle_core::Error| TrainError::Model(e.to_string());
        match &self.lora {
            Some(l) => {
                let base = self
                    .source_dir
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                l.save(dir, &base, "CAUSAL_LM", &[]).map_err(model_err)?
            }
            None => self.policy.save(dir).map_err(model_err)?,
        }
        match &self.source_dir {
            Some(src) => copy_tokenizer(src, dir),
            None => Ok(()),
        }
    }

    fn save_final(&mut self, dir: &Path) -> Result<()> {
        if let Some(l) = self.lora.take() {
            let base = self.source_dir.clone().unwrap_or_default();
            crate::lora::save_and_merge(l, &mut self.policy, dir, &base, "CAUSAL_LM", &[])?;
        }
        self.save(dir)
    }
}

/// `rlhf dpo`: trains the policy as configured; the model (or adapter) is written to `output_dir`.
pub fn run_dpo(cfg: &PrefConfig) -> Result<PrefSummary> {
    let checkpoint = prepare_run(cfg)?;
    let mut t = DpoTrainer::load(cfg, checkpoint.as_deref())?;
    train_loop(&mut t, cfg)
}

/// DPO benchmark at the TRL baseline's shape: sigmoid loss, β 0.1, 8 pairs/step, a reference forward every
/// step, lr 1e-4. `tokenizer_dir`: the byte-level tokenizer (e.g. `fixtures/tokenizer`). With `lora` the policy
/// trains adapters and the reference is its adapter-free base (no second model).
pub fn bench_dpo(
    tokenizer_dir: &Path,
    steps: usize,
    lora: Option<&rlhf_model::lora::LoraConfig>,
    backend: rlhf_model::Backend,
    precision: rlhf_model::Precision,
) -> Result<Value> {
    rlhf_model::tune_allocator();
    let tokenizer = Tokenizer::from_dir(tokenizer_dir).map_err(data_err)?;
    let config = rlhf_model::bench::tiny_llama_config();
    let policy = CausalLm::init_random(config, 1234, &Device::Cpu)
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let pairs = bench_pairs(&tokenizer, 8 * (steps + 5), 1234)?;
    let mut cfg = PrefConfig {
        batch_size: 8,
        max_length: 64,
        ..PrefConfig::new(
            PathBuf::new(),
            PathBuf::new(),
            PathBuf::new(),
            &TrainDefaults::DPO,
        )
    };
    cfg.train.lora = lora.cloned();
    cfg.train.backend = backend;
    cfg.train.bf16 = precision == rlhf_model::Precision::Bf16;
    let mut t = DpoTrainer::from_parts(policy, None, DpoData::Pairs(pairs), None, 0, &cfg)?;
    let mut v = bench_steps(&mut t, steps, 5, 1e-4)?;
    v["trainer"] = json!("dpo");
    v["lora"] = json!(lora);
    v["backend"] = json!(backend);
    v["precision"] = json!(precision.name());
    Ok(v)
}
