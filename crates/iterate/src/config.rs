//! Settings of `rlhf iterate`: one struct that is both the flags and the TOML keys (merged by
//! `rlhf_train::settings::load`: defaults ← `--config FILE` ← flags), and their validation. Errors name the file,
//! line and key.

use std::path::{Path, PathBuf};

use rlhf_train::settings::locate;
use rlhf_train::TrainError;
use serde::{Deserialize, Serialize};

use crate::kinds::Kind;

/// Where labels come from (the `labels` key).
#[derive(Debug, Clone, PartialEq)]
pub enum LabelSource {
    /// The sandbox's simulated annotators on the sandbox world's prompts (gold reward hidden from training).
    Sandbox,
    /// An LLM judge behind an OpenAI-compatible endpoint, pairwise, both orders averaged: the `judge:` spec's
    /// argument (`URL[,model=ID][,api=chat][,rubric=FILE]`).
    Judge(String),
    /// A live feedback-app project at this base URL (`feedback:URL`; project, user: `feedback_*` keys).
    Feedback(String),
    /// Any online-RL reward spec (`rm:DIR`, `exact:COL`, `regex:`, `cmd:`, …): pairs ordered by score.
    Reward(String),
}

impl LabelSource {
    pub fn parse(spec: &str) -> Self {
        match spec.split_once(':') {
            _ if spec == "sandbox" => LabelSource::Sandbox,
            Some(("judge", arg)) => LabelSource::Judge(arg.to_string()),
            Some(("feedback", url)) => LabelSource::Feedback(url.to_string()),
            _ => LabelSource::Reward(spec.to_string()),
        }
    }

    /// The kind recorded in every label's provenance.
    pub fn kind(&self) -> &'static str {
        match self {
            LabelSource::Sandbox => "sandbox",
            LabelSource::Judge(_) => "judge",
            LabelSource::Feedback(_) => "feedback",
            LabelSource::Reward(_) => "reward",
        }
    }
}

/// How a round trains the policy on its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Trainer {
    /// Online/iterative DPO on the round's decided pairs, reference = the round's starting policy.
    Dpo,
    /// Retrain a reward model on the decided pairs of every round so far, then GRPO against it on the round's
    /// prompts with a KL leash (`grpo_beta`) to the round's starting policy.
    #[value(name = "rm_grpo")]
    RmGrpo,
}

/// Settings of `rlhf iterate` (TOML key ⇔ flag of the same name with dashes).
#[derive(Debug, Clone, PartialEq, clap::Parser, Serialize, Deserialize)]
#[command(
    about = "Iterated RLHF: rounds of sample → label → DPO → evaluate, with provenance and resume"
)]
pub struct IterateArgs {
    /// TOML file with any of these settings; flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run name: everything is written under runs_dir/name.
    #[arg(long, default_value = "iterate")]
    pub name: String,
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// The initial policy (HF model directory); round k starts from round k−1's model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training prompts (JSONL, a string `prompt` per row; other columns reach reward sources), or `sandbox`:
    /// fresh prompts of the sandbox world each round, whose hidden gold reward then measures every label source's
    /// agreement and is the default evaluation reward (the default with labels = "sandbox").
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Held-out prompts for the evaluation after each round (sandbox: drawn from the world).
    #[arg(long)]
    pub eval_prompts: Option<PathBuf>,
    /// Label source: `sandbox`, `judge:URL[,model=ID]…`, `feedback:URL`, or a reward spec (`rm:DIR`,
    /// `exact:COLUMN`, `regex:PATTERN`, `cmd:COMMAND`, …).
    #[arg(long)]
    pub labels: Option<String>,
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Prompts sampled per round (a new window of the prompts file each round).
    #[arg(long, default_value_t = 8)]
    pub prompts_per_round: usize,
    /// Candidates K sampled per prompt; every pair of them is labelled.
    #[arg(long, default_value_t = 2)]
    pub candidates: usize,
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Sampling temperature of the candidates (> 0).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Pairwise comparisons per round (a seeded draw of the candidate pairs); default: every pair.
    #[arg(long)]
    pub pairwise_budget: Option<usize>,
    /// Candidates rated per round (whole prompts at a time; the panel's overlap of annotators each; sandbox).
    #[arg(long, default_value_t = 0)]
    pub rating_budget: usize,
    /// Candidates corrected per round (one annotator each; sandbox).
    #[arg(long, default_value_t = 0)]
    pub correction_budget: usize,
    /// Prompts demonstrated per round (one annotator each; sandbox).
    #[arg(long, default_value_t = 0)]
    pub demonstration_budget: usize,
    /// Candidates critiqued per round (one annotator each; sandbox); each critique is revised by the policy.
    #[arg(long, default_value_t = 0)]
    pub critique_budget: usize,
    /// Critiques containing this text ask for no revision (repeatable).
    #[arg(long, default_values_t = ["nothing to fix".to_string()])]
    pub critique_skip_containing: Vec<String>,
    /// Feedback app: the project receiving the items (a pairwise project).
    #[arg(long)]
    pub feedback_project: Option<i64>,
    /// Feedback app: the admin account that imports and exports (password in RLHF_FEEDBACK_PASSWORD).
    #[arg(long, default_value = "admin")]
    pub feedback_user: String,
    /// Feedback app: stop waiting for labels after this many seconds and train on what has arrived.
    #[arg(long, default_value_t = 3600.0)]
    pub feedback_deadline_s: f64,
    #[arg(long, default_value_t = 2.0)]
    pub feedback_poll_s: f64,
    /// Sandbox: held-out prompts drawn from the world for the evaluation.
    #[arg(long, default_value_t = 64)]
    pub sandbox_eval_prompts: usize,
    /// dpo or rm_grpo.
    #[arg(long, value_enum, default_value_t = Trainer::Dpo)]
    pub trainer: Trainer,
    /// DPO optimizer steps per round (reference = the round's starting policy).
    #[arg(long, default_value_t = 20)]
    pub dpo_steps: u64,
    /// rm_grpo: reward-model steps per round (retrained from `model` on every round's pairs so far).
    #[arg(long, default_value_t = 20)]
    pub rm_steps: u64,
    #[arg(long, default_value_t = 1e-4)]
    pub rm_learning_rate: f64,
    /// rm_grpo: GRPO steps per round (`batch_size` prompts per step, `candidates` samples each).
    #[arg(long, default_value_t = 10)]
    pub grpo_steps: u64,
    /// rm_grpo: KL coefficient β to the round's starting policy.
    #[arg(long, default_value_t = 0.05)]
    pub grpo_beta: f64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Learning rate of the policy (DPO or GRPO).
    #[arg(long, default_value_t = 1e-4)]
    pub learning_rate: f64,
    /// DPO β.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Longest prompt + completion in training (tokens).
    #[arg(long, default_value_t = 128)]
    pub max_length: usize,
    /// Evaluation reward (repeatable): `gold` (sandbox), `exact:COLUMN`, or any reward spec.
    /// Default: `gold` with the sandbox, else the label source when it is a reward spec.
    #[arg(long)]
    pub eval_reward: Vec<String>,
    /// Sampling temperature of the evaluation (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub eval_temperature: f32,
    /// Extra attempts for a failing reward source or judge call.
    #[arg(long, default_value_t = 2)]
    pub reward_retries: usize,
    /// Time limit of one `cmd:` reward call.
    #[arg(long, default_value_t = 60.0)]
    pub reward_timeout_s: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Keys that may change when a run is resumed (they change how long we wait, not what is computed).
pub const RESUME_FREE_KEYS: [&str; 4] = [
    "config",
    "feedback_deadline_s",
    "feedback_poll_s",
    "reward_timeout_s",
];

impl rlhf_train::settings::Settings for IterateArgs {}

impl IterateArgs {
    /// An invalid-setting error naming the file and line of `key` (or the command line).
    pub fn err(&self, key: &str, msg: impl Into<String>) -> TrainError {
        let file = match &self.config {
            Some(p) => format!("{} (or the command line)", locate(p, key)),
            None => "command line".to_string(),
        };
        TrainError::Config {
            file,
            key: key.into(),
            msg: msg.into(),
        }
    }

    pub fn run_dir(&self) -> PathBuf {
        self.runs_dir.join(&self.name)
    }

    pub fn label_source(&self) -> LabelSource {
        LabelSource::parse(self.labels.as_deref().unwrap_or_default())
    }

    /// Prompts are drawn from the sandbox world (which has a gold reward).
    pub fn world_prompts(&self) -> bool {
        match self.prompts.as_deref() {
            None => self.label_source() == LabelSource::Sandbox,
            Some(p) => p == Path::new("sandbox"),
        }
    }

    pub fn model(&self) -> &Path {
        self.model.as_deref().expect("validated")
    }

    /// The evaluation's reward specs.
    pub fn eval_rewards(&self) -> Vec<String> {
        if !self.eval_reward.is_empty() {
            return self.eval_reward.clone();
        }
        match self.label_source() {
            _ if self.world_prompts() => vec!["gold".into()],
            LabelSource::Reward(spec) => vec![spec],
            _ => Vec::new(),
        }
    }

    /// The per-round budget of a single-response kind.
    pub fn budget(&self, kind: Kind) -> usize {
        match kind {
            Kind::Pairwise => self.pairwise_budget.unwrap_or(usize::MAX),
            Kind::Rating => self.rating_budget,
            Kind::Correction => self.correction_budget,
            Kind::Demonstration => self.demonstration_budget,
            Kind::Critique => self.critique_budget,
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let need = |key: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(self.err(
                    key,
                    format!(
                        "required (set it in the config file or pass --{})",
                        key.replace('_', "-")
                    ),
                ))
            }
        };
        need("model", self.model.is_some())?;
        need(
            "labels",
            self.labels.as_deref().is_some_and(|l| !l.trim().is_empty()),
        )?;
        let source = self.label_source();
        need("prompts", self.world_prompts() || self.prompts.is_some())?;
        if source == LabelSource::Sandbox && !self.world_prompts() {
            return Err(self.err("prompts", "the sandbox's annotators label the sandbox world's prompts: leave prompts unset or set it to \"sandbox\""));
        }
        if let LabelSource::Feedback(url) = &source {
            need("feedback_project", self.feedback_project.is_some())?;
            if !url.starts_with("http://") {
                return Err(self.err(
                    "labels",
                    format!(
                        "feedback:{url}: expected feedback:http://HOST:PORT (no TLS in this build)"
                    ),
                ));
            }
        }
        if let Some(kind) = Kind::SINGLE.into_iter().find(|&k| self.budget(k) > 0) {
            if source != LabelSource::Sandbox {
                return Err(self.err(kind.budget_key(), format!("{} labels come from the sandbox's annotators only (labels = \"sandbox\"); set it to 0", kind.name())));
            }
        }
        if [Kind::Pairwise]
            .into_iter()
            .chain(Kind::SINGLE)
            .all(|k| self.budget(k) == 0)
        {
            return Err(self.err(
                "pairwise_budget",
                "every kind's budget is 0: a round would ask for no label",
            ));
        }
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            return Err(self.err(
                "name",
                format!("{:?} must be a plain directory name", self.name),
            ));
        }
        for (key, v) in [
            ("rounds", self.rounds),
            ("prompts_per_round", self.prompts_per_round),
            ("max_new_tokens", self.max_new_tokens),
            ("batch_size", self.batch_size),
            ("max_length", self.max_length),
            ("sandbox_eval_prompts", self.sandbox_eval_prompts),
            ("dpo_steps", self.dpo_steps as usize),
            ("rm_steps", self.rm_steps as usize),
            ("grpo_steps", self.grpo_steps as usize),
        ] {
            if v == 0 {
                return Err(self.err(key, "must be at least 1"));
            }
        }
        if self.candidates < 2 {
            return Err(self.err(
                "candidates",
                format!(
                    "must be at least 2 (pairs are labelled), got {}",
                    self.candidates
                ),
            ));
        }
        for (key, v) in [
            ("temperature", self.temperature),
            ("learning_rate", self.learning_rate),
            ("rm_learning_rate", self.rm_learning_rate),
            ("beta", self.beta),
            ("feedback_poll_s", self.feedback_poll_s),
            ("reward_timeout_s", self.reward_timeout_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(self.err(key, format!("must be a finite number > 0, got {v}")));
            }
        }
        if !(self.grpo_beta.is_finite() && self.grpo_beta >= 0.0) {
            return Err(self.err("grpo_beta", "must be a finite number >= 0"));
        }
        if self.max_new_tokens >= self.max_length {
            return Err(self.err(
                "max_new_tokens",
                format!("must be below max_length ({})", self.max_length),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(self.err("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        if !self.world_prompts() {
            match (self.eval_prompts.is_some(), self.eval_rewards().is_empty()) {
                (false, false) if !self.eval_reward.is_empty() => return Err(self.err("eval_prompts", "required with eval_reward (held-out prompts to evaluate on)")),
                (true, true) => return Err(self.err("eval_reward", "required with eval_prompts when labels is a judge or a feedback app (e.g. exact:answer or rm:DIR)")),
                _ => {}
            }
        }
        if !(self.feedback_deadline_s.is_finite() && self.feedback_deadline_s >= 0.0) {
            return Err(self.err("feedback_deadline_s", "must be a finite number >= 0"));
        }
        Ok(())
    }
}
