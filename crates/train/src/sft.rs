//! Supervised fine-tuning (TRL `SFTTrainer` semantics): causal-LM cross-entropy on the loss tokens
//! (completion-only by default), normalised over ALL loss tokens of the accumulated batch, AdamW with a
//! warmup schedule, periodic logging / evaluation / atomic checkpoints, and bit-exact resume.
//! With LoRA (`cfg.train.lora`) only the adapters train; checkpoints hold the adapter (PEFT layout) and its
//! optimizer state, and the output dir gets the merged model plus the adapter in `adapter/`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rlhf_data::TokenizedSequence;
use rlhf_model::lora::Lora;
use rlhf_model::CausalLm;
use serde::Serialize;

use crate::checkpoint::{self, TrainerState};
use crate::config::SftConfig;
use crate::error::{io_err, Result, TrainError};
use crate::optim::AdamW;
use crate::trainer::{copy_tokenizer, Metrics, Session, StepInfo, StepOut, Trainer};

/// A right-padded micro-batch on the device, with the flat positions whose next token is a target.
pub struct SftBatch {
    input_ids: Tensor,
    /// Only for packed rows (positions restart per example); otherwise the model's default 0..t.
    position_ids: Option<Tensor>,
    /// Row-major indices `row * t + j` of the positions that predict a loss token.
    gather: Tensor,
    targets: Tensor,
    target_ids: Vec<u32>,
    /// Non-pad tokens (TRL's `num_tokens` counter).
    pub num_tokens: usize,
    pub num_loss_tokens: usize,
}

impl SftBatch {
    /// Collate (TRL's collator, see [`rlhf_data::collate`]) and move to `device`.
    pub fn new(rows: &[&TokenizedSequence], pad_id: u32, device: &Device) -> Result<Self> {
        if rows.is_empty() || rows.iter().all(|r| r.is_empty()) {
            return Err(candle_core::Error::Msg("empty SFT batch".into()).into());
        }
        let tb = rlhf_data::collate(rows, pad_id, None);
        let (b, t) = (tb.batch_size, tb.seq_len);
        let (gather, target_ids): (Vec<u32>, Vec<u32>) = (0..b * t)
            .filter(|&i| tb.loss_mask[i] != 0.0)
            .map(|i| (i as u32, tb.targets[i]))
            .unzip();
        let packed = rows.iter().any(|r| r.packed);
        Ok(Self {
            input_ids: Tensor::from_vec(tb.input_ids, (b, t), device)?,
            position_ids: if packed {
                Some(Tensor::from_vec(tb.position_ids, (b, t), device)?)
            } else {
                None
            },
            gather: Tensor::from_vec(gather, target_ids.len(), device)?,
            targets: Tensor::from_vec(target_ids.clone(), target_ids.len(), device)?,
            target_ids,
            num_tokens: tb.num_tokens,
            num_loss_tokens: tb.num_loss_tokens,
        })
    }
}

/// Summed negative log-likelihood of the batch's loss tokens (differentiable scalar) and how many of them
/// the model predicts correctly (argmax).
pub fn sft_nll(model: &CausalLm, batch: &SftBatch) -> Result<(Tensor, usize)> {
    // Only loss positions reach the LM head (and the last block's MLP): the vocab projection and softmax
    // are the largest ops, and completion-only SFT uses a fraction of the positions.
    let picked = model.hidden_states_at(
        &batch.input_ids,
        batch.position_ids.as_ref(),
        None,
        &batch.gather,
    )?;
    // The fused LM head + log-softmax: the [tokens, vocab] logits and their gradient never exist.
    let (logp, pred) = model.token_logprobs_and_argmax(&picked, &batch.targets)?;
    let nll = logp.sum_all()?.neg()?;
    let pred: Vec<u32> = pred.to_vec1()?;
    let correct = pred
        .iter()
        .zip(&batch.target_ids)
        .filter(|(p, t)| p == t)
        .count();
    Ok((nll, correct))
}

/// What one optimizer step did and where its time went.
#[derive(Debug, Clone, Serialize)]
pub struct StepStats {
    /// Optimizer steps completed after this one.
    pub step: u64,
    /// Mean token loss of the accumulated batch.
    pub loss: f64,
    /// Pre-clip global gradient norm.
    pub grad_norm: f64,
    /// Learning rate used by this step.
    pub learning_rate: f64,
    pub num_tokens: usize,
    pub num_loss_tokens: usize,
    /// Per-micro-batch token accuracies (TRL averages these).
    pub micro_batch_accuracies: Vec<f64>,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub step_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalStats {
    pub eval_loss: f64,
    pub eval_mean_token_accuracy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SftSummary {
    pub steps: u64,
    pub epoch: f64,
    /// Mean loss over all steps of this run (transformers' `train_loss`).
    pub train_loss: f64,
    /// Loss of the last step.
    pub final_loss: f64,
    pub eval: Option<EvalStats>,
    pub num_tokens: u64,
    pub train_runtime_s: f64,
    pub output_dir: PathBuf,
    pub metrics_file: PathBuf,
    /// Step the run resumed from (None for a fresh start).
    pub resumed_from_step: Option<u64>,
}

pub use crate::trainer::METRICS_FILE;

/// Subdirectory of output_dir that receives the trained LoRA adapter (PEFT layout).
pub use crate::lora::ADAPTER_DIR;
/// The model, data and optimizer of an SFT run: what the core loop ([`crate::trainer`]) drives.
struct Sft {
    cfg: SftConfig,
    model: CausalLm,
    /// The adapters being trained (the base model is then frozen).
    lora: Option<Lora>,
    optimizer: AdamW,
    train: Vec<TokenizedSequence>,
    eval: Vec<TokenizedSequence>,
    pad_id: u32,
    /// Directory whose tokenizer files are copied into saved models.
    tokenizer_dir: Option<PathBuf>,
    /// What the last step did, for [`SftTrainer::step`].
    last: Option<StepStats>,
}

/// The SFT trainer; drive it with [`SftTrainer::train`] or step by step (benchmarks, tests).
pub struct SftTrainer {
    sft: Sft,
    session: Session,
}

impl SftTrainer {
    /// Load the model, tokenizer and data named by `cfg`; resume from the newest checkpoint if asked.
    pub fn new(cfg: SftConfig) -> Result<Self> {
        crate::output_dir::prepare(
            &cfg.model,
            &cfg.train.output_dir,
            cfg.train.overwrite_output_dir,
            cfg.train.resume,
        )?;
        let device = Device::Cpu;
        let tokenizer = rlhf_data::tokenizer::Tokenizer::from_dir(&cfg.model)
            .map_err(|e| TrainError::Data(e.to_string()))?;
        let pad_id = tokenizer
            .pad_id()
            .map_err(|e| TrainError::Data(e.to_string()))?;
        let train = tokenize(&cfg, &tokenizer, &cfg.train_file)?;
        let eval = match &cfg.eval_file {
            Some(f) => tokenize(&cfg, &tokenizer, f)?,
            None => Vec::new(),
        };
        let resume_dir = if cfg.train.resume {
            Some(checkpoint::resume_dir(&cfg.train.output_dir)?)
        } else {
            None
        };
        // With LoRA a checkpoint holds only the adapter: the base comes from cfg.model.
        let model_dir = match (&resume_dir, &cfg.train.lora) {
            (Some(dir), None) => dir.as_path(),
            _ => cfg.model.as_path(),
        };
        let model =
            CausalLm::load(model_dir, &device).map_err(|e| TrainError::Model(e.to_string()))?;
        // Token ids past the embedding table would otherwise fail deep inside the forward pass.
        tokenizer
            .check_vocab(model.vocab_size(), model_dir.join("config.json"))
            .map_err(|e| TrainError::Data(e.to_string()))?;
        let tokenizer_dir = Some(cfg.model.clone());
        Self::build(cfg, model, train, eval, pad_id, tokenizer_dir, resume_dir)
    }

    /// A trainer over already tokenized data (benchmarks, tests). With `cfg.train.lora` this freezes `model` and
    /// attaches fresh adapters (initialised from `cfg.train.seed`).
    pub fn from_parts(
        cfg: SftConfig,
        model: CausalLm,
        train: Vec<TokenizedSequence>,
        eval: Vec<TokenizedSequence>,
        pad_id: u32,
    ) -> Result<Self> {
        Self::build(cfg, model, train, eval, pad_id, None, None)
    }

    /// The trainer, continuing checkpoint `resume` (whose full weights `model` holds; a LoRA run's adapter is
    /// read here) when given.
    fn build(
        cfg: SftConfig,
        mut model: CausalLm,
        train: Vec<TokenizedSequence>,
        eval: Vec<TokenizedSequence>,
        pad_id: u32,
        tokenizer_dir: Option<PathBuf>,
        resume: Option<PathBuf>,
    ) -> Result<Self> {
        if train.is_empty() {
            return Err(TrainError::Data(format!(
                "{}: no training examples",
                cfg.train_file.display()
            )));
        }
        cfg.train.configure(&mut model);
        let lora = crate::lora::attach_lora(&mut model, cfg.train.lora.as_ref(), cfg.train.seed)?;
        let params =
            crate::optim::sorted_params(lora.as_ref().map_or(model.varmap(), |l| l.varmap()));
        let optimizer = AdamW::new(params, cfg.train.adamw())?;
        if let (Some(dir), Some(l)) = (&resume, &lora) {
            let saved = dir.join(rlhf_model::lora::ADAPTER_WEIGHTS);
            crate::lora::restore_vars(
                &crate::optim::sorted_params(l.varmap()),
                &saved,
                crate::lora::PEFT_PREFIX,
            )?;
        }
        let settings = crate::trainer::LoopSettings::new(
            cfg.train.clone(),
            resume,
            cfg.batch_size * cfg.gradient_accumulation_steps,
            serde_json::to_value(&cfg).expect("config serialises"),
            checkpoint::RESUME_FREE_KEYS.to_vec(),
        );
        let mut sft = Sft {
            cfg,
            model,
            lora,
            optimizer,
            train,
            eval,
            pad_id,
            tokenizer_dir,
            last: None,
        };
        let session = Session::start(&mut sft, settings)?;
        Ok(Self { sft, session })
    }

    pub fn config(&self) -> &SftConfig {
        &self.sft.cfg
    }
    pub fn model(&self) -> &CausalLm {
        &self.sft.model
    }
    /// The adapters being trained (None without LoRA, and after [`SftTrainer::train`] merged them).
    pub fn lora(&self) -> Option<&Lora> {
        self.sft.lora.as_ref()
    }
    pub fn optimizer(&self) -> &AdamW {
        &self.sft.optimizer
    }
    pub fn state(&self) -> &TrainerState {
        self.session.state()
    }
    pub fn total_steps(&self) -> u64 {
        self.session.total_steps()
    }
    pub fn steps_per_epoch(&self) -> u64 {
        self.session.steps_per_epoch()
    }
    /// Fractional epoch as transformers logs it.
    pub fn epoch(&self) -> f64 {
        self.session.epoch()
    }

    /// One optimizer step on the next examples: forward/backward over the accumulated micro-batches, clip, AdamW.
    pub fn step(&mut self) -> Result<StepStats> {
        self.session.step(&mut self.sft)?;
        Ok(self.sft.last.take().expect("a step records its stats"))
    }

    /// Loss and token accuracy on the eval split (see [`Trainer::evaluate`] of the SFT trainer).
    pub fn evaluate(&mut self) -> Result<Option<EvalStats>> {
        Ok(self.sft.evaluate()?.map(|m| EvalStats {
            eval_loss: m["loss"],
            eval_mean_token_accuracy: m["mean_token_accuracy"],
        }))
    }

    /// Save what training changes into `dir`, with the tokenizer files: the model (HF layout), or with LoRA
    /// the adapter (PEFT layout, `adapter_config.json` + `adapter_model.safetensors`).
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        self.sft.save_model(dir)
    }

    /// Write `checkpoint-<step>` atomically (pruning to save_total_limit).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.session.save_checkpoint(&self.sft)
    }

    /// The full loop: steps until `total_steps`, logging, evaluation, checkpoints, final model.
    pub fn train(&mut self) -> Result<SftSummary> {
        let r = self.session.run(&mut self.sft)?;
        let final_loss = r.final_metrics.get("loss").copied().unwrap_or(f64::NAN);
        Ok(SftSummary {
            steps: r.steps,
            epoch: r.epoch,
            train_loss: r.train_loss,
            final_loss,
            eval: r.eval.map(|m| EvalStats {
                eval_loss: m["loss"],
                eval_mean_token_accuracy: m["mean_token_accuracy"],
            }),
            num_tokens: r.num_tokens,
            train_runtime_s: r.train_runtime_s,
            output_dir: self.sft.cfg.train.output_dir.clone(),
            metrics_file: r.metrics_file,
            resumed_from_step: r.resumed_from_step,
        })
    }
}

impl Sft {
    fn save_model(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let model_err = |e: candle_core::Error| TrainError::Model(e.to_string());
        match &self.lora {
            Some(l) => l
                .save(dir, &self.cfg.model.display().to_string(), "CAUSAL_LM", &[])
                .map_err(model_err)?,
            None => self.model.save(dir).map_err(model_err)?,
        }
        match &self.tokenizer_dir {
            Some(src) => copy_tokenizer(src, dir),
            None => Ok(()),
        }
    }
}

impl Trainer for Sft {
    fn num_examples(&self) -> usize {
        self.train.len()
    }

    /// Forward/backward over the micro-batches of `idx` (`batch_size` examples each), clip, AdamW. A step never
    /// spans two epochs: the last one of an epoch may have fewer micro-batches.
    fn train_step(&mut self, idx: &[usize], info: &StepInfo) -> Result<StepOut> {
        let t_step = Instant::now();
        let device = self.model.device().clone();
        let batches = idx
            .chunks(self.cfg.batch_size)
            .map(|chunk| {
                let ex: Vec<&TokenizedSequence> = chunk.iter().map(|&i| &self.train[i]).collect();
                SftBatch::new(&ex, self.pad_id, &device)
            })
            .collect::<Result<Vec<_>>>()?;
        // transformers' num_items_in_batch: the loss is a sum over the whole accumulated batch divided
        // by its loss-token count, so micro-batch boundaries do not change it.
        let total_loss_tokens: usize = batches.iter().map(|b| b.num_loss_tokens).sum();
        if let Some(l) = &self.lora {
            l.set_training(true);
        }
        let (mut forward_s, mut backward_s) = (0.0, 0.0);
        let mut loss = 0.0f64;
        let mut accuracies = Vec::with_capacity(batches.len());
        let mut opt = info.step_with(&mut self.optimizer);
        for batch in batches.iter().filter(|b| b.num_loss_tokens > 0) {
            let t0 = Instant::now();
            let (nll, correct) = sft_nll(&self.model, batch)?;
            let mb_loss = (nll / total_loss_tokens as f64)?;
            forward_s += t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            loss += opt.backward(&mb_loss)?;
            accuracies.push(correct as f64 / batch.num_loss_tokens as f64);
            backward_s += t1.elapsed().as_secs_f64();
        }
        let t2 = Instant::now();
        let grad_norm = opt.update()?;
        let optimizer_s = t2.elapsed().as_secs_f64();

        let num_tokens: usize = batches.iter().map(|b| b.num_tokens).sum();
        let out = StepOut {
            metrics: Metrics::from([
                ("loss".to_string(), loss),
                ("grad_norm".to_string(), grad_norm),
            ]),
            per_micro_batch: accuracies
                .iter()
                .map(|&a| ("mean_token_accuracy", a))
                .collect(),
            num_tokens: num_tokens as u64,
        };
        self.last = Some(StepStats {
            step: info.step,
            loss,
            grad_norm,
            learning_rate: info.lr,
            num_tokens,
            num_loss_tokens: total_loss_tokens,
            micro_batch_accuracies: accuracies,
            forward_s,
            backward_s,
            optimizer_s,
            step_s: t_step.elapsed().as_secs_f64(),
        });
        Ok(out)
    }

    /// Loss and token accuracy on the eval split, as transformers/TRL report them: the mean over eval
    /// batches (weighted by batch size) of each batch's mean token loss, and the mean of per-batch accuracies.
    fn evaluate(&mut self) -> Result<Option<Metrics>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        // No adapter dropout while evaluating; `train_step` turns it back on.
        if let Some(l) = &self.lora {
            l.set_training(false);
        }
        let (mut loss_sum, mut acc_sum, mut rows, mut batches) = (0.0, 0.0, 0usize, 0usize);
        for chunk in self.eval.chunks(self.cfg.batch_size) {
            let ex: Vec<&TokenizedSequence> = chunk.iter().collect();
            let batch = SftBatch::new(&ex, self.pad_id, self.model.device())?;
            if batch.num_loss_tokens == 0 {
                continue;
            }
            let (nll, correct) = sft_nll(&self.model, &batch)?;
            let mean = nll.detach().to_scalar::<f32>()? as f64 / batch.num_loss_tokens as f64;
            loss_sum += mean * chunk.len() as f64;
            rows += chunk.len();
            acc_sum += correct as f64 / batch.num_loss_tokens as f64;
            batches += 1;
        }
        if batches == 0 {
            return Ok(None);
        }
        Ok(Some(Metrics::from([
            ("loss".to_string(), loss_sum / rows as f64),
            ("mean_token_accuracy".to_string(), acc_sum / batches as f64),
        ])))
    }

    fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.save_model(dir)
    }

    /// The model in `out`; with LoRA the adapter in `out/adapter` and the merged model (a complete HF dir) in
    /// `out`. Merging consumes the adapters, so afterwards the trainer holds the merged model.
    fn save_final(&mut self, out: &Path) -> Result<()> {
        if let Some(l) = self.lora.take() {
            crate::lora::save_and_merge(
                l,
                &mut self.model,
                out,
                &self.cfg.model,
                "CAUSAL_LM",
                &[],
            )?;
        }
        self.save_model(out)
    }

    fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }
}

/// Train with `cfg` (the CLI entry point).
pub fn run_sft(cfg: &SftConfig) -> Result<SftSummary> {
    SftTrainer::new(cfg.clone())?.train()
}

/// Tokenize a dataset file as TRL's SFTTrainer does (see [`rlhf_data::tokenize_sft`]): truncation to
/// max_length or best-fit-decreasing packing, completion-only labels for prompt/completion rows.
fn tokenize(
    cfg: &SftConfig,
    tokenizer: &rlhf_data::Tokenizer,
    path: &Path,
) -> Result<Vec<TokenizedSequence>> {
    let data_err = |e: rlhf_data::DataError| TrainError::Data(e.to_string());
    let dataset = rlhf_data::load_dataset(path).map_err(data_err)?;
    dataset
        .check_text_size(tokenizer, cfg.max_length, "max_length", &[])
        .map_err(data_err)?;
    let data_cfg = rlhf_data::SftConfig {
        max_length: Some(cfg.max_length),
        completion_only_loss: cfg.completion_only_loss,
        packing: cfg.packing.then_some(rlhf_data::Packing::Bfd),
        ..Default::default()
    };
    let rows = rlhf_data::tokenize_sft(&dataset, tokenizer, &data_cfg)
        .map_err(data_err)?
        .rows;
    if rows.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no example has a token to train on",
            path.display()
        )));
    }
    Ok(rows)
}
