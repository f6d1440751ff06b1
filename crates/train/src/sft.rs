//! Supervised fine-tuning (TRL `SFTTrainer` semantics): causal-LM cross-entropy on the loss tokens
//! (completion-only by default), normalised over ALL loss tokens of the accumulated batch, AdamW with a
//! warmup schedule, periodic logging / evaluation / atomic checkpoints, and bit-exact resume.
//! With LoRA (`cfg.lora`) only the adapters train; checkpoints hold the adapter (PEFT layout) and its
//! optimizer state, and the output dir gets the merged model plus the adapter in `adapter/`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rlhf_data::{EpochSampler, TokenizedSequence};
use rlhf_model::lora::Lora;
use rlhf_model::CausalLm;
use serde::Serialize;

use crate::checkpoint::{self, TrainerState};
use crate::config::SftConfig;
use crate::error::{io_err, Result, TrainError};
use crate::metrics::{LogRecord, MetricsWriter, Progress};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::Schedule;

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
            position_ids: if packed { Some(Tensor::from_vec(tb.position_ids, (b, t), device)?) } else { None },
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
    let hidden = model.hidden_states(&batch.input_ids, batch.position_ids.as_ref())?;
    let (b, t, h) = hidden.dims3()?;
    // Only loss positions reach the LM head: the vocab projection and softmax are the largest ops, and
    // completion-only SFT uses a fraction of the positions.
    let picked = hidden.reshape((b * t, h))?.index_select(&batch.gather, 0)?;
    // The fused LM head + log-softmax: the [tokens, vocab] logits and their gradient never exist.
    let (logp, pred) = model.token_logprobs_and_argmax(&picked, &batch.targets)?;
    let nll = logp.sum_all()?.neg()?;
    let pred: Vec<u32> = pred.to_vec1()?;
    let correct = pred.iter().zip(&batch.target_ids).filter(|(p, t)| p == t).count();
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

pub const METRICS_FILE: &str = "metrics.jsonl";

/// Subdirectory of output_dir that receives the trained LoRA adapter (PEFT layout).
pub use crate::lora::ADAPTER_DIR;
/// Tokenizer files copied next to saved weights so an output directory is a complete HF model.
const TOKENIZER_FILES: [&str; 4] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// The SFT trainer; drive it with [`SftTrainer::train`] or step by step (benchmarks, tests).
pub struct SftTrainer {
    cfg: SftConfig,
    model: CausalLm,
    /// The adapters being trained (the base model is then frozen).
    lora: Option<Lora>,
    optimizer: AdamW,
    schedule: Schedule,
    train: Vec<TokenizedSequence>,
    eval: Vec<TokenizedSequence>,
    pad_id: u32,
    state: TrainerState,
    /// Example order; its (epoch, index) is `state.data`.
    sampler: EpochSampler,
    steps_per_epoch: u64,
    /// Directory whose tokenizer files are copied into saved models.
    tokenizer_dir: Option<PathBuf>,
    last_checkpoint: Option<PathBuf>,
    resumed_from: Option<u64>,
}

impl SftTrainer {
    /// Load the model, tokenizer and data named by `cfg`; resume from the newest checkpoint if asked.
    pub fn new(cfg: SftConfig) -> Result<Self> {
        crate::output_dir::prepare(&cfg.model, &cfg.output_dir, cfg.overwrite_output_dir, cfg.resume)?;
        let device = Device::Cpu;
        let tokenizer = rlhf_data::tokenizer::Tokenizer::from_dir(&cfg.model).map_err(|e| TrainError::Data(e.to_string()))?;
        let pad_id = tokenizer.pad_id().map_err(|e| TrainError::Data(e.to_string()))?;
        let train = tokenize(&cfg, &tokenizer, &cfg.train_file)?;
        let eval = match &cfg.eval_file {
            Some(f) => tokenize(&cfg, &tokenizer, f)?,
            None => Vec::new(),
        };
        let resume_dir = if cfg.resume { Some(checkpoint::resume_dir(&cfg.output_dir)?) } else { None };
        // With LoRA a checkpoint holds only the adapter: the base comes from cfg.model.
        let model_dir = match (&resume_dir, &cfg.lora) {
            (Some(dir), None) => dir.as_path(),
            _ => cfg.model.as_path(),
        };
        let model = CausalLm::load(model_dir, &device).map_err(|e| TrainError::Model(e.to_string()))?;
        // Token ids past the embedding table would otherwise fail deep inside the forward pass.
        tokenizer
            .check_vocab(model.vocab_size(), model_dir.join("config.json"))
            .map_err(|e| TrainError::Data(e.to_string()))?;
        let tokenizer_dir = Some(cfg.model.clone());
        let mut trainer = Self::from_parts(cfg, model, train, eval, pad_id)?;
        trainer.tokenizer_dir = tokenizer_dir;
        if let Some(dir) = resume_dir {
            if let Some(l) = &trainer.lora {
                let saved = dir.join(rlhf_model::lora::ADAPTER_WEIGHTS);
                crate::lora::restore_vars(&crate::optim::sorted_params(l.varmap()), &saved, crate::lora::PEFT_PREFIX)?;
            }
            trainer.resume_from(&dir)?;
        }
        Ok(trainer)
    }

    /// A trainer over already tokenized data (benchmarks, tests). With `cfg.lora` this freezes `model` and
    /// attaches fresh adapters (initialised from `cfg.seed`).
    pub fn from_parts(
        cfg: SftConfig,
        mut model: CausalLm,
        train: Vec<TokenizedSequence>,
        eval: Vec<TokenizedSequence>,
        pad_id: u32,
    ) -> Result<Self> {
        if train.is_empty() {
            return Err(TrainError::Data(format!("{}: no training examples", cfg.train_file.display())));
        }
        if cfg.bf16 {
            model.set_precision(rlhf_model::Precision::Bf16);
        }
        let lora = crate::lora::attach_lora(&mut model, cfg.lora.as_ref(), cfg.seed)?;
        let params = crate::optim::sorted_params(lora.as_ref().map_or(model.varmap(), |l| l.varmap()));
        let optimizer = AdamW::new(
            params,
            AdamWConfig {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
            },
        )?;
        let micro_batches = train.len().div_ceil(cfg.batch_size) as u64;
        let steps_per_epoch = micro_batches.div_ceil(cfg.gradient_accumulation_steps as u64);
        let total_steps = match cfg.max_steps {
            Some(s) => s,
            None => ((cfg.num_train_epochs * steps_per_epoch as f64).ceil() as u64).max(1),
        };
        let schedule = Schedule::new(cfg.lr_scheduler_type, cfg.learning_rate, cfg.warmup(), total_steps);
        let sampler = EpochSampler::new(train.len(), cfg.seed, true);
        let state = TrainerState::new(sampler.state(), cfg.seed);
        Ok(Self {
            cfg,
            model,
            lora,
            optimizer,
            schedule,
            train,
            eval,
            pad_id,
            state,
            sampler,
            steps_per_epoch,
            tokenizer_dir: None,
            last_checkpoint: None,
            resumed_from: None,
        })
    }

    pub fn config(&self) -> &SftConfig {
        &self.cfg
    }
    pub fn model(&self) -> &CausalLm {
        &self.model
    }
    /// The adapters being trained (None without LoRA, and after [`SftTrainer::train`] merged them).
    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }
    pub fn state(&self) -> &TrainerState {
        &self.state
    }
    pub fn total_steps(&self) -> u64 {
        self.schedule.total_steps
    }
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }
    /// Fractional epoch as transformers logs it.
    pub fn epoch(&self) -> f64 {
        self.state.global_step as f64 / self.steps_per_epoch as f64
    }

    /// The micro-batches (as example indices) of the next optimizer step. A step never spans two epochs
    /// (the last step of an epoch may have fewer micro-batches), so the data position is (epoch, index).
    fn next_micro_batches(&mut self) -> Vec<Vec<usize>> {
        let idx = self.sampler.next_batch(self.cfg.batch_size * self.cfg.gradient_accumulation_steps, false);
        self.state.data = self.sampler.state();
        idx.chunks(self.cfg.batch_size).map(|c| c.to_vec()).collect()
    }

    /// One optimizer step: forward/backward over the accumulated micro-batches, clip, AdamW.
    pub fn step(&mut self) -> Result<StepStats> {
        let t_step = Instant::now();
        let device = self.model.device().clone();
        let micro = self.next_micro_batches();
        let batches = micro
            .iter()
            .map(|idx| {
                let ex: Vec<&TokenizedSequence> = idx.iter().map(|&i| &self.train[i]).collect();
                SftBatch::new(&ex, self.pad_id, &device)
            })
            .collect::<Result<Vec<_>>>()?;
        // transformers' num_items_in_batch: the loss is a sum over the whole accumulated batch divided
        // by its loss-token count, so micro-batch boundaries do not change it.
        let total_loss_tokens: usize = batches.iter().map(|b| b.num_loss_tokens).sum();
        let step = self.state.global_step + 1;
        if let Some(l) = &self.lora {
            l.set_training(true);
        }
        let (mut forward_s, mut backward_s) = (0.0, 0.0);
        let mut loss = 0.0f64;
        let mut accuracies = Vec::with_capacity(batches.len());
        let mut grads = None;
        for batch in batches.iter().filter(|b| b.num_loss_tokens > 0) {
            let t0 = Instant::now();
            let (nll, correct) = sft_nll(&self.model, batch)?;
            let mb_loss = (nll / total_loss_tokens as f64)?;
            let mb_value = mb_loss.to_scalar::<f32>()? as f64;
            forward_s += t0.elapsed().as_secs_f64();
            if !mb_value.is_finite() {
                return Err(self.non_finite(step, "loss", mb_value));
            }
            loss += mb_value;
            accuracies.push(correct as f64 / batch.num_loss_tokens as f64);
            let t1 = Instant::now();
            let store = mb_loss.backward()?;
            match &mut grads {
                None => grads = Some(self.optimizer.collect_grads(&store)?),
                Some(acc) => self.optimizer.accumulate_grads(acc, &store)?,
            }
            backward_s += t1.elapsed().as_secs_f64();
        }
        let grads = grads.ok_or_else(|| TrainError::Data("an optimizer step without any loss token".into()))?;
        let t2 = Instant::now();
        let lr = self.schedule.lr(self.state.global_step);
        let grad_norm = grads.global_norm()?;
        if !grad_norm.is_finite() {
            return Err(self.non_finite(step, "gradient norm", grad_norm));
        }
        self.optimizer.step_with_norm(&grads, lr, self.cfg.max_grad_norm(), grad_norm)?;
        let optimizer_s = t2.elapsed().as_secs_f64();

        let num_tokens: usize = batches.iter().map(|b| b.num_tokens).sum();
        self.state.global_step = step;
        self.state.num_tokens += num_tokens as u64;
        Ok(StepStats {
            step,
            loss,
            grad_norm,
            learning_rate: lr,
            num_tokens,
            num_loss_tokens: total_loss_tokens,
            micro_batch_accuracies: accuracies,
            forward_s,
            backward_s,
            optimizer_s,
            step_s: t_step.elapsed().as_secs_f64(),
        })
    }

    fn non_finite(&self, step: u64, what: &'static str, value: f64) -> TrainError {
        TrainError::NonFinite { step, what, value, last_checkpoint: self.last_checkpoint.clone() }
    }

    /// Loss and token accuracy on the eval split, as transformers/TRL report them: the mean over eval
    /// batches (weighted by batch size) of each batch's mean token loss, and the mean of per-batch accuracies.
    pub fn evaluate(&self) -> Result<Option<EvalStats>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        // No adapter dropout while evaluating; `step` turns it back on.
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
        Ok(Some(EvalStats { eval_loss: loss_sum / rows as f64, eval_mean_token_accuracy: acc_sum / batches as f64 }))
    }

    /// Save what training changes into `dir`, with the tokenizer files: the model (HF layout), or with LoRA
    /// the adapter (PEFT layout, `adapter_config.json` + `adapter_model.safetensors`).
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let model_err = |e: candle_core::Error| TrainError::Model(e.to_string());
        match &self.lora {
            Some(l) => l.save(dir, &self.cfg.model.display().to_string(), "CAUSAL_LM", &[]).map_err(model_err)?,
            None => self.model.save(dir).map_err(model_err)?,
        }
        if let Some(src) = &self.tokenizer_dir {
            for name in TOKENIZER_FILES {
                let from = src.join(name);
                if from.is_file() && src != dir {
                    std::fs::copy(&from, dir.join(name)).map_err(io_err(&from))?;
                }
            }
        }
        Ok(())
    }

    /// Write `checkpoint-<step>` atomically (pruning to save_total_limit).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.state.lora_dropout = self.lora.as_ref().map(Lora::dropout_state).unwrap_or_default();
        let config = serde_json::to_value(&self.cfg).expect("config serialises");
        let dir = checkpoint::save_checkpoint(
            &self.cfg.output_dir,
            |d| self.save_model(d),
            &self.optimizer,
            &self.state,
            &config,
            self.cfg.save_total_limit,
        )?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// Continue from a checkpoint directory whose weights are already loaded into the model.
    fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let saved = checkpoint::load_checkpoint_config(dir)?;
        let current = serde_json::to_value(&self.cfg).expect("config serialises");
        checkpoint::check_resume_config(dir, &saved, &current, checkpoint::RESUME_FREE_KEYS)?;
        let state = checkpoint::load_checkpoint(dir, &mut self.optimizer)?;
        if state.data.index > self.train.len() {
            return Err(TrainError::Checkpoint {
                path: dir.join(checkpoint::STATE_FILE),
                msg: format!("data index {} beyond the {} training examples", state.data.index, self.train.len()),
            });
        }
        self.sampler = EpochSampler::resume(self.train.len(), state.shuffle_seed, true, state.data);
        if let Some(l) = &self.lora {
            // Checkpoints from before seeded dropout hold no dropout state; those runs were not reproducible.
            if !state.lora_dropout.is_empty() {
                l.set_dropout_state(&state.lora_dropout).map_err(|e| TrainError::Checkpoint {
                    path: dir.join(checkpoint::STATE_FILE),
                    msg: e.to_string(),
                })?;
            }
        }
        self.resumed_from = Some(state.global_step);
        self.state = state;
        self.last_checkpoint = Some(dir.to_path_buf());
        Ok(())
    }

    /// The full loop: steps until `total_steps`, logging, evaluation, checkpoints, final model.
    pub fn train(&mut self) -> Result<SftSummary> {
        let t_run = Instant::now();
        let metrics_path = self.cfg.output_dir.join(METRICS_FILE);
        let mut metrics = match self.resumed_from {
            Some(step) => MetricsWriter::open_resumed(&metrics_path, step)?,
            None => MetricsWriter::open(&metrics_path, false)?,
        };
        let progress = Progress::new(self.total_steps(), self.state.global_step);
        let mut window = LogWindow::default();
        let (mut loss_sum, mut steps_run, mut final_loss) = (0.0, 0u64, f64::NAN);
        let mut eval = None;
        while self.state.global_step < self.total_steps() {
            let stats = self.step()?;
            let step = stats.step;
            loss_sum += stats.loss;
            steps_run += 1;
            final_loss = stats.loss;
            window.add(&stats);
            progress.update(step, Some(stats.loss));
            if step % self.cfg.logging_steps == 0 || step == self.total_steps() {
                metrics.write(&window.record(step, self.epoch(), self.schedule.lr(step), self.state.num_tokens))?;
                window = LogWindow::default();
            }
            let eval_due = self.cfg.eval_steps > 0 && step % self.cfg.eval_steps == 0;
            if eval_due || step == self.total_steps() {
                eval = self.evaluate()?;
                if let Some(e) = &eval {
                    metrics.write(&LogRecord {
                        step,
                        epoch: self.epoch(),
                        eval_loss: Some(e.eval_loss),
                        eval_mean_token_accuracy: Some(e.eval_mean_token_accuracy),
                        ..Default::default()
                    })?;
                }
            }
            if self.cfg.save_steps > 0 && step % self.cfg.save_steps == 0 {
                self.save_checkpoint()?;
            }
        }
        progress.finish();
        self.save_final()?;
        Ok(SftSummary {
            steps: self.state.global_step,
            epoch: self.epoch(),
            train_loss: if steps_run > 0 { loss_sum / steps_run as f64 } else { f64::NAN },
            final_loss,
            eval,
            num_tokens: self.state.num_tokens,
            train_runtime_s: t_run.elapsed().as_secs_f64(),
            output_dir: self.cfg.output_dir.clone(),
            metrics_file: metrics_path,
            resumed_from_step: self.resumed_from,
        })
    }
}

impl SftTrainer {
    /// The final output: the model in output_dir; with LoRA the adapter in `output_dir/adapter` and the
    /// merged model (a complete HF dir) in output_dir. Merging consumes the adapters, so afterwards the
    /// trainer holds the merged model.
    fn save_final(&mut self) -> Result<()> {
        let out = self.cfg.output_dir.clone();
        if let Some(l) = self.lora.take() {
            crate::lora::save_and_merge(l, &mut self.model, &out, &self.cfg.model, "CAUSAL_LM", &[])?;
        }
        self.save_model(&out)
    }
}

/// Train with `cfg` (the CLI entry point).
pub fn run_sft(cfg: &SftConfig) -> Result<SftSummary> {
    SftTrainer::new(cfg.clone())?.train()
}

/// Tokenize a dataset file as TRL's SFTTrainer does (see [`rlhf_data::tokenize_sft`]): truncation to
/// max_length or best-fit-decreasing packing, completion-only labels for prompt/completion rows.
fn tokenize(cfg: &SftConfig, tokenizer: &rlhf_data::Tokenizer, path: &Path) -> Result<Vec<TokenizedSequence>> {
    let data_err = |e: rlhf_data::DataError| TrainError::Data(e.to_string());
    let dataset = rlhf_data::load_dataset(path).map_err(data_err)?;
    dataset.check_text_size(tokenizer, cfg.max_length, "max_length", &[]).map_err(data_err)?;
    let data_cfg = rlhf_data::SftConfig {
        max_length: Some(cfg.max_length),
        completion_only_loss: cfg.completion_only_loss,
        packing: cfg.packing.then_some(rlhf_data::Packing::Bfd),
        ..Default::default()
    };
    let rows = rlhf_data::tokenize_sft(&dataset, tokenizer, &data_cfg).map_err(data_err)?.rows;
    if rows.is_empty() {
        return Err(TrainError::Data(format!("{}: no example has a token to train on", path.display())));
    }
    Ok(rows)
}

/// Metrics accumulated between two log lines, reduced as transformers/TRL do: mean loss over steps,
/// mean of micro-batch accuracies, the last grad norm.
#[derive(Default)]
struct LogWindow {
    loss_sum: f64,
    steps: u64,
    accuracies: Vec<f64>,
    grad_norm: f64,
    step_time_s: f64,
}

impl LogWindow {
    fn add(&mut self, s: &StepStats) {
        self.loss_sum += s.loss;
        self.steps += 1;
        self.accuracies.extend(&s.micro_batch_accuracies);
        self.grad_norm = s.grad_norm;
        self.step_time_s += s.step_s;
    }

    /// `learning_rate` is the rate after the scheduler advanced, which is what transformers logs.
    fn record(&self, step: u64, epoch: f64, learning_rate: f64, num_tokens: u64) -> LogRecord {
        let n = self.steps.max(1) as f64;
        LogRecord {
            step,
            epoch,
            loss: Some(self.loss_sum / n),
            grad_norm: Some(self.grad_norm),
            learning_rate: Some(learning_rate),
            num_tokens: Some(num_tokens),
            mean_token_accuracy: Some(self.accuracies.iter().sum::<f64>() / self.accuracies.len().max(1) as f64),
            step_time_s: Some(self.step_time_s / n),
            ..Default::default()
        }
    }
}
