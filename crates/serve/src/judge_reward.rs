//! The LLM judge as a reward source of the online-RL trainers:
//! `judge:URL[,model=ID][,api=chat][,rubric=FILE][,template=FILE][,pairwise=FILE]` (`template`: the rating
//! template, with `{rubric}`, `{prompt}` and `{response}`; `pairwise`: the pairwise template, for labellers that
//! compare, with `{rubric}`, `{prompt}`, `{response_a}`, `{response_b}`).
//!
//! Each completion is scored by [`Judge::rate`]: the expected rating in [1, 9] under the judge's distribution
//! over the digits (the default constitution-style rubric, or the rubric file). The API key, if the endpoint
//! needs one, comes from `RLHF_API_KEY`. The endpoint is first contacted when scoring, so an unreachable one
//! is retried like any failing source (`reward_retries`) and then stops the run with the URL named.

use anyhow::{bail, Context};
use rlhf_train::reward::{register_scheme, RewardSource, Sample, SpecContext};
use rlhf_train::TrainError;

use crate::judge::{Api, Judge, JudgeConfig};
use crate::Client;

/// The spec kind.
pub const SCHEME: &str = "judge";

/// Makes `judge:` specs available to every trainer in this process (the binary calls it at start-up).
pub fn register() {
    register_scheme(SCHEME, |arg, ctx| JudgeReward::parse(arg).map(|j| Box::new(j) as Box<dyn RewardSource>).map_err(|e| bad(ctx, e)));
}

fn bad(ctx: &SpecContext, e: anyhow::Error) -> TrainError {
    TrainError::Config { file: "command line".into(), key: "reward".into(), msg: format!("`{}`: {e:#}", ctx.spec) }
}

/// Where and how to ask the judge, as parsed from `URL[,key=value…]`.
#[derive(Debug, Clone)]
pub struct JudgeSpec {
    pub url: String,
    pub config: JudgeConfig,
}

fn read(path: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path.trim()).with_context(|| format!("cannot read {}", path.trim()))
}

impl JudgeSpec {
    pub fn parse(arg: &str) -> anyhow::Result<Self> {
        let mut parts = arg.split(',');
        let url = parts.next().unwrap_or_default().trim().to_string();
        if url.is_empty() {
            bail!("name the judge's endpoint, e.g. judge:http://127.0.0.1:8000");
        }
        let mut config = JudgeConfig::default();
        for opt in parts {
            let (k, v) = opt.split_once('=').with_context(|| format!("option `{opt}`: expected key=value (model, api, rubric, template, pairwise)"))?;
            match k.trim() {
                "model" => config.model = Some(v.trim().to_string()),
                "api" => {
                    config.api = match v.trim() {
                        "completions" => Api::Completions,
                        "chat" => Api::Chat,
                        other => bail!("api={other}: expected completions or chat"),
                    }
                }
                "rubric" => config.rubric = read(v)?,
                "template" => config.rating_template = read(v)?,
                "pairwise" => config.pairwise_template = read(v)?,
                other => bail!("unknown option `{other}` (model, api, rubric, template, pairwise)"),
            }
        }
        config.check()?;
        // Fails now on a malformed URL (e.g. https://, which this build cannot reach).
        Client::new(&url, None)?;
        Ok(Self { url, config })
    }

    /// Connects (asks the endpoint for its model unless `model=` was given).
    pub fn connect(&self) -> anyhow::Result<Judge> {
        let client = Client::new(&self.url, std::env::var("RLHF_API_KEY").ok().filter(|k| !k.is_empty()))?;
        Judge::new(client, self.config.clone()).with_context(|| format!("judge at {}", self.url))
    }
}

pub struct JudgeReward {
    name: String,
    spec: JudgeSpec,
    /// Connected on first use, so that connecting is retried with the scoring.
    judge: Option<Judge>,
}

impl JudgeReward {
    pub fn parse(arg: &str) -> anyhow::Result<Self> {
        Ok(Self { name: format!("{SCHEME}:{arg}"), spec: JudgeSpec::parse(arg)?, judge: None })
    }
}

impl RewardSource for JudgeReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&mut self, samples: &[Sample]) -> rlhf_train::Result<Vec<f64>> {
        let err = |e: anyhow::Error| TrainError::Reward { source_name: self.name.clone(), msg: format!("{e:#}") };
        if self.judge.is_none() {
            self.judge = Some(self.spec.connect().map_err(err)?);
        }
        let items: Vec<(String, String)> = samples.iter().map(|s| (s.prompt.to_string(), s.completion.to_string())).collect();
        self.judge.as_ref().expect("connected above").rate(&items).map_err(err)
    }
}
