//! The bench the sandbox's label experiments share ([`crate::active`], [`crate::kinds`]): for one seed, a
//! pool of candidate pairs (two "web-like" world replies per prompt, of varying quality), held-out pairs whose
//! gold rewards differ, and small reward-model ensembles trained from random initialisation on whatever rows
//! the labels became ([`rlhf_train::rm::run_rm`]), scored against gold.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rlhf_data::tokenizer::{train_bpe, BpeConfig};
use rlhf_data::{Text, Tokenizer};
use rlhf_model::{CausalLm, ModelConfig};
use rlhf_train::ensemble::Ensemble;
use rlhf_train::pref_config::PrefConfig;
use rlhf_train::schedule::ScheduleKind;
use rlhf_train::select::{score_pairs, PairScore};
use rlhf_train::TrainDefaults;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::gold::gold_reward;
use crate::pipeline::Shape;
use crate::source::write_rows;
use crate::world::{generate, Mix, Prompt};

/// The reward models of an experiment: shape, ensemble size and training budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmSetup {
    /// Each member: a Llama trunk trained from random initialisation (own seed), plus a reward head.
    pub shape: Shape,
    /// BPE vocabulary of the tokenizer trained on the pool's texts.
    pub vocab_size: usize,
    /// Reward models per ensemble.
    pub members: usize,
    /// Passes over the training rows (at least `min_steps` optimizer steps).
    pub epochs: f64,
    pub min_steps: u64,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub max_length: usize,
}

impl RmSetup {
    pub fn standard() -> Self {
        RmSetup {
            shape: Shape {
                hidden_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                intermediate_size: 176,
            },
            vocab_size: 384,
            members: 3,
            epochs: 4.0,
            min_steps: 30,
            batch_size: 16,
            learning_rate: 2e-3,
            max_length: 96,
        }
    }

    /// Tiny members for tests.
    pub fn quick() -> Self {
        RmSetup {
            shape: Shape {
                hidden_size: 32,
                num_hidden_layers: 1,
                num_attention_heads: 2,
                intermediate_size: 64,
            },
            vocab_size: 320,
            members: 2,
            epochs: 2.0,
            min_steps: 8,
            ..Self::standard()
        }
    }
}

/// A candidate pair: prompt and two replies; the gold order stays hidden from training and selection.
pub struct Pair {
    pub prompt: Prompt,
    pub a: String,
    pub b: String,
}

impl Pair {
    pub fn gold_diff(&self) -> f64 {
        gold_reward(&self.prompt.gold, &self.a) - gold_reward(&self.prompt.gold, &self.b)
    }
}

/// Pairs of two "web-like" replies (right a third of the time, otherwise a typical failure of the kind).
fn pairs_for(prompts: Vec<Prompt>, rng: &mut StdRng) -> Vec<Pair> {
    prompts
        .into_iter()
        .map(|p| {
            let (a, b) = (p.noisy(rng), p.noisy(rng));
            Pair { prompt: p, a, b }
        })
        .collect()
}

/// One seed's pool, held-out pairs and member initialisations, in `dir`.
pub struct Lab {
    pub setup: RmSetup,
    pub seed: u64,
    pub pool: Vec<Pair>,
    /// Held-out pairs (texts not in the pool, except the kinds whose few texts recur) with differing gold.
    pub eval: Vec<Pair>,
    members: Vec<PathBuf>,
    pool_ids: Vec<(Vec<u32>, Vec<u32>)>,
    eval_ids: Vec<(Vec<u32>, Vec<u32>)>,
    dir: PathBuf,
}

impl Lab {
    pub fn new(
        setup: &RmSetup,
        mix: &Mix,
        pool_prompts: usize,
        eval_prompts: usize,
        seed: u64,
        dir: &Path,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut rng = StdRng::seed_from_u64(seed ^ 0xAC71);
        let eval_prompts = generate(eval_prompts, mix, seed ^ 0xE7A1, "eval-");
        let held_out: HashSet<&str> = eval_prompts.iter().map(|p| p.text.as_str()).collect();
        let pool_prompts: Vec<Prompt> = generate(pool_prompts * 2, mix, seed ^ 0xA0, "pool-")
            .into_iter()
            .filter(|p| p.gold.kind.recurs() || !held_out.contains(p.text.as_str()))
            .take(pool_prompts)
            .collect();
        let pool = pairs_for(pool_prompts, &mut rng);
        let eval: Vec<Pair> = pairs_for(eval_prompts, &mut rng)
            .into_iter()
            .filter(|p| p.gold_diff() != 0.0)
            .collect();
        anyhow::ensure!(
            !eval.is_empty(),
            "no held-out pair differs in gold: raise eval_prompts"
        );
        let members = init_members(setup, seed, &pool, dir)?;
        let tokenizer = Tokenizer::from_dir(&members[0])?;
        let encode = |pairs: &[Pair]| -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
            pairs
                .iter()
                .map(|p| {
                    let enc = |r: &str| -> Result<Vec<u32>> {
                        let e = rlhf_data::tokenize_completion(
                            &Text::Plain(p.prompt.text.clone()),
                            &Text::Plain(r.into()),
                            &tokenizer,
                            None,
                        )?;
                        Ok([e.prompt_ids, e.completion_ids].concat())
                    };
                    Ok((enc(&p.a)?, enc(&p.b)?))
                })
                .collect()
        };
        let (pool_ids, eval_ids) = (encode(&pool)?, encode(&eval)?);
        Ok(Lab {
            setup: setup.clone(),
            seed,
            pool,
            eval,
            members,
            pool_ids,
            eval_ids,
            dir: dir.to_path_buf(),
        })
    }

    /// Trains the ensemble on `rows` (preference, correction or rating rows: whatever `rlhf rm` reads), each
    /// member on its own bootstrap sample drawn with `salt`: members disagree where the labels leave the
    /// order open. Returns the held-out accuracy against gold and the scores of every pool pair.
    pub fn train_and_score(&self, rows: &[Value], salt: u64) -> Result<(f64, Vec<PairScore>)> {
        anyhow::ensure!(!rows.is_empty(), "no training row: raise the label budget");
        let s = &self.setup;
        let work = self.dir.join(format!("work-{salt}"));
        std::fs::create_dir_all(&work)?;
        let steps =
            ((s.epochs * rows.len() as f64 / s.batch_size as f64).ceil() as u64).max(s.min_steps);
        let mut trained = Vec::with_capacity(self.members.len());
        for (j, init) in self.members.iter().enumerate() {
            let mut rng = StdRng::seed_from_u64(self.seed ^ (salt << 8) ^ j as u64);
            let sample: Vec<Value> = (0..rows.len())
                .map(|_| rows[rng.gen_range(0..rows.len())].clone())
                .collect();
            let train_file = work.join(format!("train-{j}.jsonl"));
            write_rows(&train_file, &sample)?;
            let out = work.join(format!("member-{j}"));
            let mut c = PrefConfig {
                max_length: s.max_length,
                batch_size: s.batch_size,
                ..PrefConfig::new(init.clone(), train_file, out.clone(), &TrainDefaults::RM)
            };
            let t = &mut c.train;
            t.learning_rate = s.learning_rate;
            t.lr_scheduler_type = ScheduleKind::Cosine;
            t.max_steps = Some(steps);
            t.logging_steps = steps;
            t.save_steps = 0;
            t.seed = self.seed * 1000 + j as u64;
            rlhf_train::rm::run_rm(&c)?;
            trained.push(out);
        }
        let ensemble = Ensemble::load(&trained, &Device::Cpu)?;
        let hits: f64 = score_pairs(&ensemble, &self.eval_ids, 64)?
            .iter()
            .zip(&self.eval)
            .map(|(s, p)| {
                if s.reward_diff == 0.0 {
                    0.5
                } else {
                    f64::from(u8::from((s.reward_diff > 0.0) == (p.gold_diff() > 0.0)))
                }
            })
            .sum();
        let pool_scores = score_pairs(&ensemble, &self.pool_ids, 64)?;
        std::fs::remove_dir_all(&work)?;
        Ok((hits / self.eval.len() as f64, pool_scores))
    }

    /// Removes the member initialisations and the tokenizer.
    pub fn finish(self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("{}: cannot remove", self.dir.display()))
    }
}

/// Random-initialised member models (different trunk seeds) sharing a tokenizer trained on the pool's texts.
fn init_members(s: &RmSetup, seed: u64, pool: &[Pair], dir: &Path) -> Result<Vec<PathBuf>> {
    let tok_dir = dir.join("tokenizer");
    std::fs::create_dir_all(&tok_dir)?;
    let corpus = dir.join("corpus.txt");
    let text: String = pool
        .iter()
        .flat_map(|p| {
            [
                format!("{}{}\n", p.prompt.text, p.a),
                format!("{}{}\n", p.prompt.text, p.b),
            ]
        })
        .collect();
    std::fs::write(&corpus, text).with_context(|| format!("{}: cannot write", corpus.display()))?;
    let tok = train_bpe(
        &[corpus],
        &BpeConfig {
            vocab_size: s.vocab_size,
            ..Default::default()
        },
        &tok_dir,
    )?;
    let sh = s.shape;
    let raw = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": tok.vocab_size(),
        "hidden_size": sh.hidden_size, "intermediate_size": sh.intermediate_size, "num_hidden_layers": sh.num_hidden_layers,
        "num_attention_heads": sh.num_attention_heads, "num_key_value_heads": sh.num_attention_heads,
        "max_position_embeddings": s.max_length, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "bos_token_id": tok.bos.as_ref().map(|t| t.id), "eos_token_id": tok.eos.as_ref().map(|t| t.id),
        "pad_token_id": tok.pad.as_ref().map(|t| t.id),
    });
    let mut tok_files: Vec<PathBuf> = std::fs::read_dir(&tok_dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    tok_files.sort();
    (0..s.members)
        .map(|j| {
            let m = dir.join(format!("init-{j}"));
            let config = ModelConfig::from_json(raw.clone(), "sandbox reward-model member")?;
            CausalLm::init_random(config, seed * 1000 + j as u64, &Device::Cpu)?.save(&m)?;
            for f in &tok_files {
                std::fs::copy(f, m.join(f.file_name().context("a file name")?))?;
            }
            Ok(m)
        })
        .collect()
}

/// An experiment's output directory, emptied of an earlier run.
pub(crate) fn fresh_dir(out: &Path) -> Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out)
            .with_context(|| format!("{}: cannot clear the earlier run", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))
}

/// An experiment's `<stem>.json`, `.md` and `.html` in `out`.
pub(crate) fn write_reports(
    out: &Path,
    stem: &str,
    json: &str,
    markdown: &str,
    html: &str,
) -> Result<()> {
    for (ext, text) in [("json", json), ("md", markdown), ("html", html)] {
        let p = out.join(format!("{stem}.{ext}"));
        std::fs::write(&p, text).with_context(|| format!("{}: cannot write", p.display()))?;
    }
    Ok(())
}
