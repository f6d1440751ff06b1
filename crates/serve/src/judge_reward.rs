//! The LLM judge as a reward source of the online-RL trainers:
//! `judge:URL|DIR[,model=ID][,api=chat][,rubric=FILE][,template=FILE][,pairwise=FILE][,mode=critic][,critic_template=FILE][,max_tokens=N]`
//! (`URL`: an OpenAI-compatible endpoint; `DIR`: a model directory run in this process; `template`: the rating
//! template, with `{rubric}`, `{prompt}` and `{response}`; `pairwise`: the pairwise template, for labellers that
//! compare, with `{rubric}`, `{prompt}`, `{response_a}`, `{response_b}`; `mode=critic`: a critic trained on
//! critic-sft rows, whose critique ends in `Score: N`, with its input template `critic_template` and `max_tokens`
//! of critique).
//!
//! Each completion is scored by [`Judge::rate`]: the expected rating in [1, 9] under the judge's distribution
//! over the digits (the default constitution-style rubric, or the rubric file), or the critic's verdict. The API
//! key, if the endpoint needs one, comes from `RLHF_API_KEY`. The judge is first contacted (or loaded) when
//! scoring, so an unreachable one is retried like any failing source (`reward_retries`) and then stops the run
//! with the URL named.

use anyhow::{bail, Context};
use rlhf_train::reward::{register_scheme, RewardSource, Sample, SpecContext};
use rlhf_train::TrainError;

use crate::judge::{Api, Judge, JudgeConfig, Mode};
use crate::Client;

const OPTIONS: &str = "model, api, rubric, template, pairwise, mode, critic_template, max_tokens";

/// The spec kind.
pub const SCHEME: &str = "judge";

/// Makes `judge:` specs available to every trainer in this process (the binary calls it at start-up).
pub fn register() {
    register_scheme(SCHEME, |arg, ctx| {
        JudgeReward::parse(arg)
            .map(|j| Box::new(j) as Box<dyn RewardSource>)
            .map_err(|e| bad(ctx, e))
    });
}

fn bad(ctx: &SpecContext, e: anyhow::Error) -> TrainError {
    TrainError::Config {
        file: "command line".into(),
        key: "reward".into(),
        msg: format!("`{}`: {e:#}", ctx.spec),
    }
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
            bail!("name the judge's endpoint or model directory, e.g. judge:http://127.0.0.1:8000");
        }
        let mut config = JudgeConfig::default();
        for opt in parts {
            let (k, v) = opt
                .split_once('=')
                .with_context(|| format!("option `{opt}`: expected key=value ({OPTIONS})"))?;
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
                "mode" => {
                    config.mode = match v.trim() {
                        "verdict" => Mode::Verdict,
                        "critic" => Mode::Critic,
                        other => bail!("mode={other}: expected verdict or critic"),
                    }
                }
                "critic_template" => config.critic_template = read(v)?,
                "max_tokens" => {
                    let n: usize =
                        v.trim().parse().ok().filter(|&n| n > 0).with_context(|| {
                            format!("max_tokens={v}: expected a whole number > 0")
                        })?;
                    (config.max_tokens, config.critic_max_tokens) = (n, n);
                }
                other => bail!("unknown option `{other}` ({OPTIONS})"),
            }
        }
        config.check()?;
        if url.contains("://") {
            // Fails now on a malformed URL (e.g. https://, which this build cannot reach).
            Client::new(&url, None)?;
        } else if !std::path::Path::new(&url).join("config.json").is_file() {
            bail!("{url}: neither an http:// endpoint nor a model directory (no config.json)");
        }
        Ok(Self { url, config })
    }

    /// Connects (asks the endpoint for its model unless `model=` was given), or loads the model directory.
    pub fn connect(&self) -> anyhow::Result<Judge> {
        let key = std::env::var("RLHF_API_KEY").ok().filter(|k| !k.is_empty());
        Judge::open(&self.url, key, self.config.clone())
            .with_context(|| format!("judge at {}", self.url))
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
        Ok(Self {
            name: format!("{SCHEME}:{arg}"),
            spec: JudgeSpec::parse(arg)?,
            judge: None,
        })
    }
}

impl RewardSource for JudgeReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&mut self, samples: &[Sample]) -> rlhf_train::Result<Vec<f64>> {
        let err = |e: anyhow::Error| TrainError::Reward {
            source_name: self.name.clone(),
            msg: format!("{e:#}"),
        };
        if self.judge.is_none() {
            self.judge = Some(self.spec.connect().map_err(err)?);
        }
        let items: Vec<(String, String)> = samples
            .iter()
            .map(|s| (s.prompt.to_string(), s.completion.to_string()))
            .collect();
        self.judge
            .as_ref()
            .expect("connected above")
            .rate(&items)
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_a_url_or_a_model_directory_and_the_critic_mode() {
        let s = JudgeSpec::parse("http://127.0.0.1:1,mode=critic,max_tokens=12").unwrap();
        assert_eq!(
            (
                s.config.mode,
                s.config.critic_max_tokens,
                s.config.max_tokens
            ),
            (Mode::Critic, 12, 12)
        );
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/models/llama");
        assert_eq!(JudgeSpec::parse(dir).unwrap().config.mode, Mode::Verdict);
        let e = |arg: &str| format!("{:#}", JudgeSpec::parse(arg).unwrap_err());
        assert!(
            e("no/such/dir").contains("neither an http:// endpoint nor a model directory"),
            "{}",
            e("no/such/dir")
        );
        assert!(e("http://h:1,mode=judge").contains("expected verdict or critic"));
        assert!(e("http://h:1,max_tokens=0").contains("max_tokens=0"));
    }
}
