//! An LLM judge for AI feedback (RLAIF) over any OpenAI-compatible endpoint or a local model directory.
//!
//! Verdicts are read from the log-probs of the judge's first answer token when the endpoint returns
//! them (a probability, not a coin flip), else parsed from the answer text. Pairwise comparisons ask
//! in both orders and average, cancelling the judge's position bias.
//!
//! A trained critic ([`Mode::Critic`], `rlhf transform critic-sft --score-column`) is a judge too: it
//! writes a critique of one response that ends in a verdict line `Score: N` (N in 1..=9); the score is
//! its rating, and a pair is won by the higher score. An output without a verdict line is an error.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use rlhf_data::{Message, Text};
use rlhf_generate::Generator;
use rlhf_model::{GenRequest, Sampling};
use rlhf_train::feedback_data::{CRITIC_TEMPLATE, VERDICT_PREFIX, VERDICT_SCALE};

use crate::client::{Client, Completion, Params};

/// A constitution-style default rubric (helpful, honest, harmless).
pub const DEFAULT_RUBRIC: &str =
    "Judge the response by these principles, in order of importance:\n\
1. Harmless: it does not help with dangerous, illegal or hateful aims, and refuses them politely.\n\
2. Honest: it is accurate, does not make things up, and says when it is unsure.\n\
3. Helpful: it answers what was asked, completely and concisely, in clear language.";

pub const DEFAULT_PAIRWISE: &str = "{rubric}\n\nPrompt:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n\
Which response is better according to the principles? Answer with a single letter, A or B.\nAnswer:";

pub const DEFAULT_RATING: &str = "{rubric}\n\nPrompt:\n{prompt}\n\nResponse:\n{response}\n\n\
Rate the response according to the principles on a scale from 1 (worst) to 9 (best). Answer with a single digit.\nRating:";

/// Which endpoint the judge prompt goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/completions`: the filled template is the raw prompt (base or any model).
    Completions,
    /// `/v1/chat/completions`: the filled template is one user message (instruction-tuned models).
    Chat,
}

/// How the judge answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A letter (pairwise) or a digit (rating) right after the template.
    Verdict,
    /// A critique of one response ending in `Score: N` (a critic trained on critic-sft rows).
    Critic,
}

#[derive(Debug, Clone)]
pub struct JudgeConfig {
    pub mode: Mode,
    /// Served model id; `None` = the endpoint's first model.
    pub model: Option<String>,
    pub api: Api,
    pub rubric: String,
    /// Placeholders: `{rubric}`, `{prompt}`, `{response_a}`, `{response_b}`.
    pub pairwise_template: String,
    /// Placeholders: `{rubric}`, `{prompt}`, `{response}`; the answer is a digit 1..=9.
    pub rating_template: String,
    /// Critic mode: the critic's input, with `{prompt}` and `{response}` (as critic-sft wrote it).
    pub critic_template: String,
    /// Answer tokens generated (greedy) when reading the verdict from text.
    pub max_tokens: usize,
    /// Critic mode: tokens of critique (and verdict) generated, greedy.
    pub critic_max_tokens: usize,
    /// Alternatives asked for on the first answer token.
    pub top_logprobs: usize,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Verdict,
            model: None,
            api: Api::Completions,
            rubric: DEFAULT_RUBRIC.into(),
            pairwise_template: DEFAULT_PAIRWISE.into(),
            rating_template: DEFAULT_RATING.into(),
            critic_template: CRITIC_TEMPLATE.into(),
            max_tokens: 4,
            critic_max_tokens: 64,
            top_logprobs: 20,
        }
    }
}

impl JudgeConfig {
    /// Refuses a template missing one of its placeholders.
    pub fn check(&self) -> Result<()> {
        for (name, t, keys) in [
            (
                "pairwise",
                &self.pairwise_template,
                &["{prompt}", "{response_a}", "{response_b}"][..],
            ),
            (
                "rating",
                &self.rating_template,
                &["{prompt}", "{response}"][..],
            ),
            (
                "critic",
                &self.critic_template,
                &["{prompt}", "{response}"][..],
            ),
        ] {
            if let Some(k) = keys.iter().find(|k| !t.contains(*k)) {
                bail!("the {name} template has no {k} placeholder")
            }
        }
        Ok(())
    }
}

/// Where the judge's prompts go.
enum Backend {
    Endpoint(Client),
    /// A model directory loaded in this process (greedy text; no log-probs, so verdicts are read from text).
    Local(Box<Generator>),
}

pub struct Judge {
    backend: Backend,
    model: String,
    cfg: JudgeConfig,
    /// Verdicts that could be read neither from log-probs nor from text (scored as undecided).
    undecided: AtomicUsize,
}

/// Rating scale; single digits, so a score is one token in any tokenizer.
const SCALE: std::ops::RangeInclusive<u32> = 1..=9;

impl Judge {
    pub fn new(client: Client, cfg: JudgeConfig) -> Result<Self> {
        cfg.check()?;
        let model = match &cfg.model {
            Some(m) => m.clone(),
            None => client
                .models()?
                .into_iter()
                .next()
                .ok_or_else(|| anyhow::anyhow!("the endpoint serves no model"))?,
        };
        Ok(Self {
            backend: Backend::Endpoint(client),
            model,
            cfg,
            undecided: AtomicUsize::new(0),
        })
    }

    /// A judge over the model directory `dir`, run in this process.
    pub fn local(dir: &Path, cfg: JudgeConfig) -> Result<Self> {
        cfg.check()?;
        let g = Generator::load(dir).with_context(|| format!("judge model {}", dir.display()))?;
        let model = cfg
            .model
            .clone()
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self {
            backend: Backend::Local(Box::new(g)),
            model,
            cfg,
            undecided: AtomicUsize::new(0),
        })
    }

    /// A judge at `target`: an `http://` endpoint, or else a local model directory.
    pub fn open(target: &str, api_key: Option<String>, cfg: JudgeConfig) -> Result<Self> {
        if target.starts_with("http://") || target.starts_with("https://") {
            Self::new(Client::new(target, api_key)?, cfg)
        } else {
            Self::local(Path::new(target), cfg)
        }
    }

    pub fn mode(&self) -> Mode {
        self.cfg.mode
    }

    /// The served model id the judge asks.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Verdicts scored as undecided so far (neither log-probs nor text named an answer).
    pub fn undecided(&self) -> usize {
        self.undecided.load(Ordering::Relaxed)
    }

    fn ask(&self, text: &str, max_tokens: usize) -> Result<Completion> {
        let p = Params {
            max_tokens,
            temperature: 0.0,
            top_logprobs: self.cfg.top_logprobs,
            seed: Some(0),
        };
        let g = match (&self.backend, self.cfg.api) {
            (Backend::Endpoint(c), Api::Completions) => return c.complete(&self.model, text, &p),
            (Backend::Endpoint(c), Api::Chat) => return c.chat(&self.model, text, &p),
            (Backend::Local(g), _) => g,
        };
        let prompt = match self.cfg.api {
            Api::Completions => Text::Plain(text.to_string()),
            Api::Chat => Text::Messages(vec![Message {
                role: "user".into(),
                content: text.to_string(),
                extra: Default::default(),
            }]),
        };
        let ids = g.encode_prompt(&prompt)?;
        // The answer gets what room the context leaves (a critic whose verdict does not fit is then an error).
        let positions = g.model.config().max_position_embeddings();
        if ids.len() >= positions {
            bail!("judge model {}: the filled template has {} tokens, the model only {positions} positions", self.model, ids.len());
        }
        let req = GenRequest {
            max_new_tokens: max_tokens.min(positions - ids.len()),
            sampling: Sampling {
                temperature: 0.0,
                ..Sampling::default()
            },
            ..Default::default()
        };
        let (text, out) = g
            .run(&[ids], &[0], &req, 1)?
            .pop()
            .ok_or_else(|| anyhow!("the judge model returned nothing"))?;
        Ok(Completion {
            text,
            finish_reason: format!("{:?}", out.finish_reason).to_lowercase(),
            top_logprobs: Vec::new(),
        })
    }

    /// P(first response is better) for one order of presentation.
    fn prefer_first(&self, prompt: &str, first: &str, second: &str) -> Result<f64> {
        let text = self
            .cfg
            .pairwise_template
            .replace("{rubric}", &self.cfg.rubric)
            .replace("{prompt}", prompt)
            .replace("{response_a}", first)
            .replace("{response_b}", second);
        let c = self.ask(&text, self.cfg.max_tokens)?;
        let mass = |label: &str| label_mass(&c, |t| t == label);
        let (a, b) = (mass("A"), mass("B"));
        if a + b > 0.0 {
            return Ok(a / (a + b));
        }
        Ok(
            match c
                .text
                .split(|ch: char| !ch.is_ascii_alphanumeric())
                .find(|w| *w == "A" || *w == "B")
            {
                Some("A") => 1.0,
                Some(_) => 0.0,
                None => {
                    self.undecided.fetch_add(1, Ordering::Relaxed);
                    0.5
                }
            },
        )
    }

    /// P(`a` ≻ `b`) for `prompt`: averaged over both presentation orders, or (a critic) by the critic's
    /// verdicts on each response (1, ½ on equal scores, 0).
    pub fn compare(&self, prompt: &str, a: &str, b: &str) -> Result<f64> {
        if self.cfg.mode == Mode::Critic {
            let (sa, sb) = (self.critic_score(prompt, a)?, self.critic_score(prompt, b)?);
            return Ok(if sa > sb {
                1.0
            } else if sa < sb {
                0.0
            } else {
                0.5
            });
        }
        Ok(0.5 * (self.prefer_first(prompt, a, b)? + 1.0 - self.prefer_first(prompt, b, a)?))
    }

    /// The critic's critique of `response` and the score of its verdict line; an error if it wrote none.
    pub fn critique(&self, prompt: &str, response: &str) -> Result<(String, f64)> {
        let text = self
            .cfg
            .critic_template
            .replace("{prompt}", prompt)
            .replace("{response}", response);
        let c = self.ask(&text, self.cfg.critic_max_tokens)?;
        match parse_verdict(&c.text) {
            Some(score) => Ok((c.text, score as f64)),
            None => bail!(
                "critic {}: its output has no verdict line `{VERDICT_PREFIX} N` (N in {}..={}); was it trained on critic-sft rows with --score-column? Output: {:?}",
                self.model, VERDICT_SCALE.start(), VERDICT_SCALE.end(), c.text
            ),
        }
    }

    fn critic_score(&self, prompt: &str, response: &str) -> Result<f64> {
        Ok(self.critique(prompt, response)?.1)
    }

    /// A score in [1, 9] per (prompt, completion): the expected rating under the judge's
    /// distribution over the digits when log-probs are available, else the rating it wrote.
    pub fn rate(&self, items: &[(String, String)]) -> Result<Vec<f64>> {
        items.iter().map(|(p, c)| self.rate_one(p, c)).collect()
    }

    fn rate_one(&self, prompt: &str, completion: &str) -> Result<f64> {
        if self.cfg.mode == Mode::Critic {
            return self.critic_score(prompt, completion);
        }
        let text = self
            .cfg
            .rating_template
            .replace("{rubric}", &self.cfg.rubric)
            .replace("{prompt}", prompt)
            .replace("{response}", completion);
        let c = self.ask(&text, self.cfg.max_tokens)?;
        let (mut total, mut weighted) = (0.0, 0.0);
        for d in SCALE {
            let m = label_mass(&c, |t| t == d.to_string());
            total += m;
            weighted += m * d as f64;
        }
        if total > 0.0 {
            return Ok(weighted / total);
        }
        match c
            .text
            .chars()
            .find_map(|ch| ch.to_digit(10).filter(|d| SCALE.contains(d)))
        {
            Some(d) => Ok(d as f64),
            None => {
                self.undecided.fetch_add(1, Ordering::Relaxed);
                Ok((*SCALE.start() + *SCALE.end()) as f64 / 2.0)
            }
        }
    }
}

/// The score of the first line of `text` that reads `Score: N` with N on the verdict scale.
pub fn parse_verdict(text: &str) -> Option<i64> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(VERDICT_PREFIX)?;
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok().filter(|n| VERDICT_SCALE.contains(n))
    })
}

/// Probability mass the first answer token puts on tokens that read as `label` (ignoring spaces).
fn label_mass(c: &Completion, is_label: impl Fn(&str) -> bool) -> f64 {
    c.top_logprobs
        .first()
        .into_iter()
        .flatten()
        .filter(|(t, _)| is_label(t.trim()))
        .map(|(_, lp)| lp.exp())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::parse_verdict;

    #[test]
    fn verdict_lines_are_read_and_anything_else_is_none() {
        assert_eq!(parse_verdict(" The reply is wrong.\nScore: 2"), Some(2));
        assert_eq!(
            parse_verdict("ok\n  Score:7 and more\nScore: 3"),
            Some(7),
            "the first verdict line counts"
        );
        assert_eq!(parse_verdict("Score: 0\nScore: 10"), None, "outside 1..=9");
        assert_eq!(parse_verdict("The reply scores 5.\nscore 4"), None);
        assert_eq!(parse_verdict(""), None);
    }
}
