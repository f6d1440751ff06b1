//! Reward modelling (`rlhf rm`, TRL `RewardTrainer` semantics) and scoring (`rlhf rm score`).
//!
//! The reward model is a [`SeqCls`] (`score.weight` on the last non-pad token); pairs train it with
//! Bradley–Terry (optionally with margins and reward centering), `rating` rows with an MSE regression on the
//! score normalised to [0, 1], and `correction` rows as pairs (corrected ≻ original). `num_heads = k > 1`
//! trains an ensemble of k heads on one trunk (each head its own Bradley–Terry loss, averaged).
//! Settings: [`crate::pref_config`]; the loop: [`crate::pref_train`].

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use clap::Args;
use rlhf_data::{
    collate_preference, Format, LoadOptions, PreferenceExample, Record, ScoreScale, Tokenizer,
    Truncation,
};
use rlhf_model::lora::{Lora, LoraConfig};
use rlhf_model::seq_cls::SeqCls;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::ensemble::{mean_std, Ensemble};
use crate::error::{io_err, Result, TrainError};
use crate::lora::attach_lora;
use crate::optim::AdamW;
use crate::pref_config::{PrefArgs, PrefConfig, RmOptions};
use crate::pref_data::{data_err, pad_rows, row_err, tokenize_completion};
use crate::pref_train::{
    eval_means, prepare_run, train_loop, Forward, Metrics, Objective, PrefSummary,
};
use crate::settings::Settings;
use crate::train_args::TrainDefaults;
use crate::trainer::copy_tokenizer;

/// Settings of `rlhf rm`: the preference trainers' settings plus these (TOML keys and flags of the same names;
/// older files group them in a section `[rm]`).
#[derive(Debug, Clone, Default, PartialEq, clap::Parser, Serialize, Deserialize)]
#[command(
    about = "Train a reward model (Bradley–Terry, margins, ratings, ensembles); `rlhf rm score --help` and `rlhf rm select --help` for scoring and pair selection"
)]
pub struct RmArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: PrefArgs,
    /// Reward-centering coefficient η of η·mean((r_c + r_r)²) (off by default)
    #[arg(long)]
    pub center_rewards_coefficient: Option<f64>,
    /// Reward heads on one trunk; > 1 trains an ensemble [default: 1]
    #[arg(long)]
    pub num_heads: Option<usize>,
    /// Lowest score of rating rows that declare no scale
    #[arg(long)]
    pub score_min: Option<f64>,
    /// Highest score of rating rows that declare no scale
    #[arg(long)]
    pub score_max: Option<f64>,
}

impl Settings for RmArgs {
    fn help_defaults() -> Vec<(&'static str, String)> {
        TrainDefaults::RM.help()
    }
}

/// `rlhf rm score` flags: score prompt/completion rows with one reward model or an ensemble.
#[derive(Debug, Clone, Args)]
pub struct RmScoreArgs {
    /// Reward-model directory; repeat for an ensemble of models.
    #[arg(long = "model", required = true)]
    pub models: Vec<PathBuf>,
    /// JSONL/Parquet with `prompt` and `completion` (other columns, e.g. `item_id`, are copied through).
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSONL: each row plus `reward` (and `reward_std`, and `uncertainty` when it has an `item_id`).
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    #[arg(long)]
    pub chat_template: Option<String>,
}

impl RmArgs {
    /// File + flags (merged by [`crate::settings::load`]), validated for reward modelling.
    pub fn resolve(&self) -> Result<PrefConfig> {
        let mut c = self.common.resolve(&TrainDefaults::RM)?;
        let d = RmOptions::default();
        c.rm = RmOptions {
            center_rewards_coefficient: self.center_rewards_coefficient,
            num_heads: self.num_heads.unwrap_or(d.num_heads),
            score_min: self.score_min,
            score_max: self.score_max,
        };
        let err = |k: &str, m: String| self.common.err(k, m);
        if let Some(eta) = c.rm.center_rewards_coefficient {
            if eta < 0.0 {
                return Err(err(
                    "center_rewards_coefficient",
                    format!("{eta} is not a finite number >= 0"),
                ));
            }
        }
        if c.rm.num_heads == 0 {
            return Err(err("num_heads", "must be at least 1".into()));
        }
        if let (Some(lo), Some(hi)) = (c.rm.score_min, c.rm.score_max) {
            if lo >= hi {
                return Err(err(
                    "score_max",
                    format!("must be greater than score_min ({lo})"),
                ));
            }
        }
        if c.rm.score_min.is_some() != c.rm.score_max.is_some() {
            return Err(err(
                "score_min",
                "set both score_min and score_max, or neither".into(),
            ));
        }
        Ok(c)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------------------

/// Reward-model training data: pairs (preference, implicit preference, correction) or ratings.
#[derive(Debug, Clone)]
pub enum RmData {
    Pairs(Vec<PreferenceExample>),
    /// Full sequence (prompt + completion) and the score normalised to [0, 1].
    Ratings(Vec<(Vec<u32>, f32)>),
}

impl RmData {
    pub fn len(&self) -> usize {
        match self {
            RmData::Pairs(p) => p.len(),
            RmData::Ratings(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// error when nothing is left.
pub fn load_rm_data(path: &Path, tokenizer: &Tokenizer, cfg: &PrefConfig) -> Result<RmData> {
    let scale = match (cfg.rm.score_min, cfg.rm.score_max) {
        (Some(min), Some(max)) => Some(ScoreScale { min, max }),
        _ => None,
    };
    let ds = rlhf_data::load_dataset_with(path, &LoadOptions { score_scale: scale })
        .map_err(data_err)?;
    ds.check_text_size(tokenizer, cfg.max_length, "max_length", &[])
        .map_err(data_err)?;
    let source = path.display().to_string();
    let data = match ds.format {
        Format::Preference | Format::ImplicitPreference | Format::Correction => {
            let pairs = rlhf_data::tokenize_preferences(&ds, tokenizer, cfg.chat_template.as_deref()).map_err(data_err)?;
            RmData::Pairs(pairs.into_iter().filter(|p| p.fits_reward(Some(cfg.max_length))).collect())
        }
        Format::Rating => {
            let template = if ds.conversational { Some(tokenizer.chat_template(cfg.chat_template.as_deref()).map_err(data_err)?) } else { None };
            let mut rows = Vec::with_capacity(ds.len());
            for row in &ds.rows {
                let Record::Rating(r) = &row.record else { unreachable!("dataset rows share one format") };
                let s = r.scale.or(scale).ok_or_else(|| {
                    data_err(ds.row_error(row, Some("score"), "no score scale: add score_min/score_max to the row or set rm.score_min/score_max"))
                })?;
                let (p, c) = tokenize_completion(&r.prompt, &r.completion, tokenizer, template).map_err(|e| row_err(&ds, row, e))?;
                let mut ids = [p, c].concat();
                ids.truncate(cfg.max_length);
                rows.push((ids, crate::rm_loss::normalise_score(r.score, s.min, s.max) as f32));
            }
            RmData::Ratings(rows)
        }
        other => {
            return Err(TrainError::Data(format!(
                "{source}: a reward model trains on preference, implicit_preference, correction or rating data, not {other}"
            )))
        }
    };
    if data.is_empty() {
        return Err(TrainError::Data(format!(
            "{source}: no example fits max_length {}",
            cfg.max_length
        )));
    }
    Ok(data)
}

// ---------------------------------------------------------------------------------------------------------
// Reward-model trainer
// ---------------------------------------------------------------------------------------------------------

fn vars(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    varmap
        .data()
        .lock()
        .expect("VarMap lock poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Reward-model trainer (drive with [`train_loop`], or call [`Objective::forward`] directly in tests).
pub struct RmTrainer {
    model: SeqCls,
    lora: Option<Lora>,
    optimizer: AdamW,
    train: RmData,
    eval: Option<RmData>,
    batch_size: usize,
    max_length: usize,
    center: Option<f64>,
    /// Where the model came from: its tokenizer files are copied into saves; PEFT's `base_model_name_or_path`.
    source_dir: Option<PathBuf>,
}

impl RmTrainer {
    /// Loads the model (a reward-model dir, or a causal LM with a new head), tokenizer and data of `cfg`;
    /// with `cfg.resume` the weights of the newest checkpoint in `output_dir`.
    pub fn new(cfg: &PrefConfig) -> Result<Self> {
        let checkpoint = cfg
            .train
            .resume
            .then(|| crate::checkpoint::resume_dir(&cfg.train.output_dir))
            .transpose()?;
        Self::load(cfg, checkpoint.as_deref())
    }

    /// [`RmTrainer::new`] with the weights of `checkpoint` when given (the trunk and head, or with LoRA the
    /// adapters and head over the base model).
    fn load(cfg: &PrefConfig, checkpoint: Option<&Path>) -> Result<Self> {
        let (model_dir, train_file) = (cfg.model.clone(), &cfg.train_file);
        let tokenizer = Tokenizer::from_dir(&model_dir).map_err(data_err)?;
        let pad = tokenizer.pad_id().ok();
        let weights_dir = match (checkpoint, &cfg.train.lora) {
            (Some(dir), None) => dir,
            _ => model_dir.as_path(),
        };
        let model = SeqCls::load(
            weights_dir,
            cfg.rm.num_heads,
            pad,
            cfg.train.seed,
            &Device::Cpu,
        )
        .map_err(|e| TrainError::Model(e.to_string()))?;
        // Token ids past the embedding table would otherwise fail deep inside the forward pass.
        tokenizer
            .check_vocab(model.lm.vocab_size(), model_dir.join("config.json"))
            .map_err(data_err)?;
        let train = load_rm_data(train_file, &tokenizer, cfg)?;
        let eval = cfg
            .eval_file
            .as_deref()
            .map(|f| load_rm_data(f, &tokenizer, cfg))
            .transpose()?;
        let mut t = Self::from_parts(model, train, eval, cfg)?;
        t.source_dir = Some(model_dir);
        if let (Some(dir), Some(l)) = (checkpoint, &t.lora) {
            let saved = dir.join(rlhf_model::lora::ADAPTER_WEIGHTS);
            crate::lora::restore_vars(
                &[vars(l.varmap()), vars(t.model.head())].concat(),
                &saved,
                crate::lora::PEFT_PREFIX,
            )?;
        }
        Ok(t)
    }

    /// A trainer over a loaded model and tokenized data (tests, benchmarks).
    pub fn from_parts(
        mut model: SeqCls,
        train: RmData,
        eval: Option<RmData>,
        cfg: &PrefConfig,
    ) -> Result<Self> {
        cfg.train.configure(&mut model.lm);
        let lora = attach_lora(&mut model.lm, cfg.train.lora.as_ref(), cfg.train.seed)?;
        let params = match &lora {
            // The head is new for the task, so it trains with the adapters (PEFT's modules_to_save).
            Some(l) => [vars(l.varmap()), vars(model.head())].concat(),
            None => model.trainable_vars(),
        };
        let optimizer = AdamW::new(params, cfg.train.adamw())?;
        Ok(Self {
            model,
            lora,
            optimizer,
            train,
            eval,
            batch_size: cfg.batch_size,
            max_length: cfg.max_length,
            center: cfg.rm.center_rewards_coefficient,
            source_dir: None,
        })
    }

    pub fn model(&self) -> &SeqCls {
        &self.model
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// Rewards `[B, k]` of the chosen and of the rejected sequences, in one forward over `2B` rows.
    pub fn pair_rewards(
        &self,
        pairs: &[&PreferenceExample],
    ) -> Result<(Tensor, Tensor, Option<Tensor>, usize)> {
        let b = pairs.len();
        let batch = collate_preference(
            pairs,
            self.model.pad_token_id(),
            Some(self.max_length),
            Truncation::KeepStart,
        );
        let tb = &batch.tokens;
        let ids = Tensor::from_vec(
            tb.input_ids.clone(),
            (tb.batch_size, tb.seq_len),
            &Device::Cpu,
        )?;
        let r = self.model.forward(&ids, &tb.lengths())?;
        let margin = match &batch.margins {
            Some(m) => Some(
                Tensor::from_vec(m.clone(), (b, 1), &Device::Cpu)?
                    .broadcast_as((b, self.model.num_labels()))?
                    .contiguous()?,
            ),
            None => None,
        };
        Ok((
            r.narrow(0, 0, b)?,
            r.narrow(0, b, b)?,
            margin,
            tb.num_tokens,
        ))
    }

    fn data_forward(&self, data: &RmData, idx: &[usize]) -> Result<Forward> {
        match data {
            RmData::Pairs(p) => {
                let pairs: Vec<&PreferenceExample> = idx.iter().map(|&i| &p[i]).collect();
                let (c, r, m, num_tokens) = self.pair_rewards(&pairs)?;
                let loss = crate::rm_loss::pair_loss(&c, &r, m.as_ref(), self.center)?;
                // Accuracy and margin of the ensemble mean (the single reward when k = 1).
                let (cm, rm) = (
                    c.detach().mean(1)?.to_vec1::<f32>()?,
                    r.detach().mean(1)?.to_vec1::<f32>()?,
                );
                let (acc, margin) = crate::rm_loss::pair_metrics(&cm, &rm);
                let metrics = Metrics::from([
                    ("accuracy".to_string(), acc),
                    ("margin".to_string(), margin),
                ]);
                Ok(Forward {
                    loss,
                    metrics,
                    num_tokens,
                })
            }
            RmData::Ratings(rows) => {
                let seqs: Vec<&[u32]> = idx.iter().map(|&i| rows[i].0.as_slice()).collect();
                let (ids, lengths) = pad_rows(&seqs, self.model.pad_token_id(), &Device::Cpu)?;
                let k = self.model.num_labels();
                let target: Vec<f32> = idx.iter().map(|&i| rows[i].1).collect();
                let target = Tensor::from_vec(target, (idx.len(), 1), &Device::Cpu)?
                    .broadcast_as((idx.len(), k))?
                    .contiguous()?;
                let r = self.model.forward(&ids, &lengths)?;
                let loss = crate::rm_loss::rating_mse(&r, &target)?;
                Ok(Forward {
                    loss,
                    metrics: Metrics::new(),
                    num_tokens: lengths.iter().sum(),
                })
            }
        }
    }
}

impl Objective for RmTrainer {
    fn num_examples(&self) -> usize {
        self.train.len()
    }

    fn forward(&mut self, idx: &[usize]) -> Result<Forward> {
        if let Some(l) = &self.lora {
            l.set_training(true);
        }
        self.data_forward(&self.train, idx)
    }

    /// Loss, accuracy and margin over the whole eval set (per-pair means; batches only bound memory).
    fn evaluate(&mut self) -> Result<Option<Metrics>> {
        let Some(eval) = &self.eval else {
            return Ok(None);
        };
        if let Some(l) = &self.lora {
            l.set_training(false);
        }
        eval_means(eval.len(), self.batch_size, |chunk| {
            self.data_forward(eval, chunk)
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

    /// A `*ForSequenceClassification` directory, or with LoRA a PEFT `SEQ_CLS` adapter (head as `score`).
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
                l.save(
                    dir,
                    &base,
                    "SEQ_CLS",
                    &[("score", self.model.score_weight())],
                )
                .map_err(model_err)?
            }
            None => self.model.save(dir).map_err(model_err)?,
        }
        match &self.source_dir {
            Some(src) => copy_tokenizer(src, dir),
            None => Ok(()),
        }
    }

    fn save_final(&mut self, dir: &Path) -> Result<()> {
        if let Some(l) = self.lora.take() {
            let base = self.source_dir.clone().unwrap_or_default();
            let score = self.model.score_weight().clone();
            crate::lora::save_and_merge(
                l,
                &mut self.model.lm,
                dir,
                &base,
                "SEQ_CLS",
                &[("score", &score)],
            )?;
        }
        self.save(dir)
    }
}

/// `rlhf rm`: trains a reward model as configured; the model is written to `output_dir`.
pub fn run_rm(cfg: &PrefConfig) -> Result<PrefSummary> {
    let checkpoint = prepare_run(cfg)?;
    let mut t = RmTrainer::load(cfg, checkpoint.as_deref())?;
    train_loop(&mut t, cfg)
}

fn write_line(file: &mut File, path: &Path, v: &Map<String, Value>) -> Result<()> {
    let line = serde_json::to_string(v).expect("plain data serialises");
    writeln!(file, "{line}")
        .and_then(|_| file.flush())
        .map_err(io_err(path))
}

/// `rlhf rm score`: rewards for prompt/completion rows. Writes each input row plus `reward` (ensemble mean),
/// with an ensemble also `reward_std`, and for rows with an `item_id` also `uncertainty` (= the std, what the
/// feedback app imports). Returns the number of rows scored.
pub fn run_rm_score(args: &RmScoreArgs) -> Result<usize> {
    let device = Device::Cpu;
    let ensemble = Ensemble::load(&args.models, &device)?;
    let tokenizer = Tokenizer::from_dir(&args.models[0]).map_err(data_err)?;
    // Token ids past any member's embedding table would otherwise fail deep inside the forward pass.
    for (dir, vocab) in args.models.iter().zip(ensemble.vocab_sizes()) {
        tokenizer
            .check_vocab(vocab, dir.join("config.json"))
            .map_err(data_err)?;
    }
    let ds = rlhf_data::load_dataset(&args.input).map_err(data_err)?;
    ds.check_text_size(&tokenizer, args.max_length, "--max-length", &[])
        .map_err(data_err)?;
    let template = if ds.conversational {
        Some(
            tokenizer
                .chat_template(args.chat_template.as_deref())
                .map_err(data_err)?,
        )
    } else {
        None
    };
    let mut seqs = Vec::with_capacity(ds.len());
    for row in &ds.rows {
        let (prompt, completion) = match &row.record {
            Record::PromptCompletion(r) => (&r.prompt, &r.completion),
            Record::Unpaired(r) => (&r.prompt, &r.completion),
            Record::Rating(r) => (&r.prompt, &r.completion),
            other => {
                return Err(data_err(ds.row_error(
                    row,
                    None,
                    format!(
                        "rows to score need \"prompt\" and \"completion\" fields; this row is {}",
                        other.format()
                    ),
                )))
            }
        };
        let (p, c) = tokenize_completion(prompt, completion, &tokenizer, template)
            .map_err(|e| row_err(&ds, row, e))?;
        let ids = [p, c].concat();
        // Truncating would score the prompt and a cut completion (or none of it) without saying so.
        if ids.len() > args.max_length {
            return Err(data_err(ds.row_error(
                row,
                Some("completion"),
                format!("prompt + completion is {} tokens, longer than --max-length {}; raise --max-length", ids.len(), args.max_length),
            )));
        }
        seqs.push(ids);
    }
    let mut out = File::create(&args.output).map_err(io_err(&args.output))?;
    for (rows, seq_chunk) in ds
        .rows
        .chunks(args.batch_size.max(1))
        .zip(seqs.chunks(args.batch_size.max(1)))
    {
        let refs: Vec<&[u32]> = seq_chunk.iter().map(|s| s.as_slice()).collect();
        let (ids, lengths) = pad_rows(&refs, ensemble.pad_token_id(), &device)?;
        let (mean, std) = mean_std(&ensemble.scores(&ids, &lengths)?)?;
        for (i, row) in rows.iter().enumerate() {
            let mut obj = row.to_json();
            obj.insert("reward".into(), json!(mean[i]));
            if ensemble.size() > 1 {
                obj.insert("reward_std".into(), json!(std[i]));
                if obj.contains_key("item_id") {
                    obj.insert("uncertainty".into(), json!(std[i]));
                }
            }
            write_line(&mut out, &args.output, &obj)?;
        }
    }
    Ok(ds.len())
}

/// Reward-model benchmark at the TRL baseline's shape (tiny Llama + a fresh head, 8 pairs/step, lr 1e-3):
/// median s/step, tokens/s (chosen + rejected), peak RSS. `tokenizer_dir`: e.g. `fixtures/tokenizer`; `lora`:
/// train adapters (and the head) instead of the whole trunk.
pub fn bench_rm(
    tokenizer_dir: &Path,
    steps: usize,
    lora: Option<&LoraConfig>,
    backend: rlhf_model::Backend,
    precision: rlhf_model::Precision,
) -> Result<Value> {
    rlhf_model::tune_allocator();
    let tokenizer = Tokenizer::from_dir(tokenizer_dir).map_err(data_err)?;
    let model_err = |e: candle_core::Error| TrainError::Model(e.to_string());
    let config = rlhf_model::bench::tiny_llama_config();
    let lm = rlhf_model::CausalLm::init_random(config, 1234, &Device::Cpu).map_err(model_err)?;
    let model = SeqCls::from_causal_lm(lm, 1, Some(0), 1234).map_err(model_err)?;
    let pairs = crate::pref_data::bench_pairs(&tokenizer, 8 * (steps + 5), 1234)?;
    let mut cfg = PrefConfig {
        batch_size: 8,
        max_length: 64,
        ..PrefConfig::new(
            PathBuf::new(),
            PathBuf::new(),
            PathBuf::new(),
            &TrainDefaults::RM,
        )
    };
    cfg.train.lora = lora.cloned();
    cfg.train.backend = backend;
    cfg.train.bf16 = precision == rlhf_model::Precision::Bf16;
    let mut t = RmTrainer::from_parts(model, RmData::Pairs(pairs), None, &cfg)?;
    let mut v = crate::pref_train::bench_steps(&mut t, steps, 5, 1e-3)?;
    v["trainer"] = json!("rm");
    v["lora"] = json!(lora);
    v["backend"] = json!(backend);
    v["precision"] = json!(precision.name());
    Ok(v)
}
