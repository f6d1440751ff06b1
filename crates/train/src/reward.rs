//! Reward sources of the online-RL trainers: one trait, several kinds, and weighted sums of them.
//!
//! A source is named by a spec string `[WEIGHT*]KIND:ARG` (the `reward` key / `--reward` flag, repeatable):
//! - `rm:DIR[,DIR…]` — a reward model trained by `rlhf rm` (several dirs or heads: an ensemble, scored by its mean);
//! - `exact:COLUMN` — 1 if the completion's leading number equals the row's `COLUMN`, else 0;
//! - `regex:PATTERN` — 1 if the completion matches, else 0;
//! - `length:COEF` — `−COEF × completion tokens`;
//! - `eos:PENALTY` — `−PENALTY` for a completion that ended without EOS (TRL's `missing_eos_penalty`);
//! - `cmd:COMMAND` — an external program: JSONL rows (`prompt`, `completion`, the dataset columns) on its stdin,
//!   one score per line on its stdout, within `reward_timeout_s`.
//!
//! A source that errors, times out or returns a non-finite score is retried; then the run stops with an error
//! naming the source. There is never a silent zero.
//!
//! Crates above this one add kinds with [`register_scheme`] (e.g. `judge:URL`, an LLM judge served over HTTP,
//! lives in `rlhf-serve`, which this crate must not depend on); the binary registers them once at start-up, so
//! every trainer, `rlhf eval` and `rlhf iterate` accept them without extra plumbing.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use rlhf_data::Tokenizer;
use serde_json::{Map, Value};

use crate::ensemble::Ensemble;
use crate::error::{Result, TrainError};

/// One scored sample: what a reward source may look at.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    /// The prompt as the policy saw it (a conversation rendered with the chat template).
    pub prompt: &'a str,
    pub completion: &'a str,
    pub prompt_ids: &'a [u32],
    pub completion_ids: &'a [u32],
    /// The completion ended with an EOS token.
    pub eos: bool,
    /// The dataset row (e.g. an `answer` column for a verifier).
    pub row: &'a Map<String, Value>,
}

/// Something that scores completions. Implementations return one finite score per sample or an error.
pub trait RewardSource {
    /// Short name for metrics (`rewards/<name>`) and errors.
    fn name(&self) -> &str;
    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>>;
    /// The matrix-product precision of a model-based source (the trainer's `bf16`, as for the policy and its
    /// reference); sources without a model ignore it.
    fn set_precision(&mut self, _precision: rlhf_model::Precision) {}
}

fn reward_err(source: &str, msg: impl Into<String>) -> TrainError {
    TrainError::Reward {
        source_name: source.to_string(),
        msg: msg.into(),
    }
}

/// A reward model directory (or an ensemble of them). With the policy's tokenizer it reads the token ids
/// directly; with a different tokenizer it re-encodes the text, as TRL does.
pub struct RewardModel {
    name: String,
    ensemble: Ensemble,
    /// The reward model's tokenizer when it differs from the policy's.
    retokenize: Option<Tokenizer>,
    max_length: usize,
}

impl RewardModel {
    pub fn load(dirs: &[PathBuf], policy_tokenizer: &Tokenizer, max_length: usize) -> Result<Self> {
        let ensemble = Ensemble::load(dirs, &Device::Cpu)?;
        let tok = Tokenizer::from_dir(&dirs[0]).map_err(|e| TrainError::Data(e.to_string()))?;
        if let Some(v) = ensemble
            .vocab_sizes()
            .into_iter()
            .find(|&v| tok.vocab_size() > v)
        {
            return Err(TrainError::Model(format!(
                "{}: its tokenizer has {} tokens but the model's vocab_size is {v}, so some ids would index past the \
                 embedding; give the reward model the tokenizer it was trained with",
                dirs[0].display(),
                tok.vocab_size()
            )));
        }
        let same =
            tok.inner().to_string(false).ok() == policy_tokenizer.inner().to_string(false).ok();
        let name = format!(
            "rm:{}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        Ok(Self {
            name,
            ensemble,
            retokenize: (!same).then_some(tok),
            max_length,
        })
    }
}

impl RewardSource for RewardModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>> {
        let mut rows = Vec::with_capacity(samples.len());
        for s in samples {
            let mut ids = match &self.retokenize {
                None => [s.prompt_ids, s.completion_ids].concat(),
                Some(t) => t
                    .encode(&format!("{}{}", s.prompt, s.completion), true)
                    .map_err(|e| reward_err(&self.name, e.to_string()))?,
            };
            // Keep the end: the score is read at the last token.
            if ids.len() > self.max_length {
                ids.drain(..ids.len() - self.max_length);
            }
            if ids.is_empty() {
                return Err(reward_err(
                    &self.name,
                    "a prompt + completion encodes to no tokens",
                ));
            }
            rows.push(ids);
        }
        let t = rows.iter().map(Vec::len).max().unwrap_or(1);
        let pad = self.ensemble.pad_token_id();
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        let flat: Vec<u32> = rows
            .iter()
            .flat_map(|r| {
                r.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, t - r.len()))
            })
            .collect();
        let ids = Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu)?;
        let scores = self.ensemble.scores(&ids, &lengths)?;
        let (mean, _std) = crate::ensemble::mean_std(&scores)?;
        Ok(mean.into_iter().map(f64::from).collect())
    }

    fn set_precision(&mut self, precision: rlhf_model::Precision) {
        self.ensemble.set_precision(precision);
    }
}

/// The leading number of a completion (`" 42 apples"` → 42), if any.
pub fn leading_number(text: &str) -> Option<f64> {
    let t = text.trim_start();
    let end = t
        .char_indices()
        .take_while(|&(i, c)| c.is_ascii_digit() || (c == '-' && i == 0) || c == '.')
        .map(|(i, c)| i + c.len_utf8())
        .last()?;
    t[..end].trim_end_matches('.').parse().ok()
}

/// `exact:COLUMN`: 1 when the leading number of the completion equals the row's column.
pub struct ExactAnswer {
    name: String,
    column: String,
}

impl RewardSource for ExactAnswer {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>> {
        samples
            .iter()
            .map(|s| {
                let want = match s.row.get(&self.column) {
                    Some(Value::Number(n)) => n.as_f64(),
                    Some(Value::String(v)) => leading_number(v),
                    _ => None,
                }
                .ok_or_else(|| {
                    reward_err(
                        &self.name,
                        format!(
                            "the prompt row has no numeric `{}` column: {}",
                            self.column,
                            Value::Object(s.row.clone())
                        ),
                    )
                })?;
                Ok(if leading_number(s.completion) == Some(want) {
                    1.0
                } else {
                    0.0
                })
            })
            .collect()
    }
}

/// `regex:PATTERN`: 1 when the completion matches.
pub struct RegexMatch {
    name: String,
    re: regex::Regex,
}

impl RewardSource for RegexMatch {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>> {
        Ok(samples
            .iter()
            .map(|s| {
                if self.re.is_match(s.completion) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect())
    }
}

/// `length:COEF`: a penalty proportional to the completion's token count.
pub struct LengthPenalty {
    name: String,
    coef: f64,
}

impl RewardSource for LengthPenalty {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>> {
        Ok(samples
            .iter()
            .map(|s| -self.coef * s.completion_ids.len() as f64)
            .collect())
    }
}

/// `eos:PENALTY`: penalises completions cut off before EOS.
pub struct MissingEos {
    name: String,
    penalty: f64,
}

impl RewardSource for MissingEos {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>> {
        Ok(samples
            .iter()
            .map(|s| if s.eos { 0.0 } else { -self.penalty })
            .collect())
    }
}

/// `cmd:COMMAND`: an external scorer run through `sh -c` once per batch.
pub struct External {
    name: String,
    command: String,
    timeout: Duration,
}

impl RewardSource for External {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>> {
        let err = |m: String| reward_err(&self.name, m);
        let mut input = String::new();
        for s in samples {
            let mut row = s.row.clone();
            row.insert("prompt".into(), Value::from(s.prompt));
            row.insert("completion".into(), Value::from(s.completion));
            input.push_str(&Value::Object(row).to_string());
            input.push('\n');
        }
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("cannot start: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped");
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .collect::<std::io::Result<Vec<String>>>()
        });
        let stderr = child.stderr.take().expect("piped");
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
            s
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(st) = child.try_wait().map_err(|e| err(e.to_string()))? {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err(format!(
                    "timed out after {:.0} s (raise reward_timeout_s)",
                    self.timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // A scorer that exits without reading all its input is reported by its exit status/output below.
        let _ = writer.join();
        let lines = reader
            .join()
            .expect("reader thread")
            .map_err(|e| err(e.to_string()))?;
        let stderr = err_reader.join().unwrap_or_default();
        if !status.success() {
            return Err(err(format!("exited with {status}: {}", stderr.trim())));
        }
        let lines: Vec<&String> = lines.iter().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != samples.len() {
            return Err(err(format!(
                "printed {} scores for {} rows (one number per line expected)",
                lines.len(),
                samples.len()
            )));
        }
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.trim().parse::<f64>().map_err(|_| {
                    err(format!(
                        "output line {}: `{}` is not a number",
                        i + 1,
                        l.trim()
                    ))
                })
            })
            .collect()
    }
}

/// What a registered kind's constructor is given besides its `ARG`.
pub struct SpecContext<'a> {
    /// The `[WEIGHT*]KIND:ARG` spec, for error messages.
    pub spec: &'a str,
    pub policy_tokenizer: &'a Tokenizer,
    pub max_length: usize,
    /// Time limit of one scoring call (`reward_timeout_s`).
    pub timeout: Duration,
}

/// Builds a source from its `ARG`.
pub type SchemeFactory = dyn Fn(&str, &SpecContext) -> Result<Box<dyn RewardSource>> + Send + Sync;

fn schemes() -> &'static RwLock<BTreeMap<String, Arc<SchemeFactory>>> {
    static SCHEMES: OnceLock<RwLock<BTreeMap<String, Arc<SchemeFactory>>>> = OnceLock::new();
    SCHEMES.get_or_init(Default::default)
}

const BUILTIN_KINDS: [&str; 6] = ["rm", "exact", "regex", "length", "eos", "cmd"];

/// Adds reward kind `kind` (`KIND:ARG` specs) for the whole process; registering a kind again replaces it.
/// A built-in kind cannot be replaced.
pub fn register_scheme(
    kind: &str,
    factory: impl Fn(&str, &SpecContext) -> Result<Box<dyn RewardSource>> + Send + Sync + 'static,
) {
    assert!(
        !BUILTIN_KINDS.contains(&kind),
        "reward kind `{kind}` is built in"
    );
    schemes()
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(kind.to_string(), Arc::new(factory));
}

/// Every kind a spec may name: the built-in ones, then the registered ones.
pub fn known_kinds() -> Vec<String> {
    let mut kinds: Vec<String> = BUILTIN_KINDS.iter().map(|k| k.to_string()).collect();
    kinds.extend(
        schemes()
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned(),
    );
    kinds
}

/// Parses one `[WEIGHT*]KIND:ARG` spec into (weight, source).
pub fn parse_spec(
    spec: &str,
    policy_tokenizer: &Tokenizer,
    max_length: usize,
    timeout: Duration,
) -> Result<(f64, Box<dyn RewardSource>)> {
    let bad = |msg: String| TrainError::Config {
        file: "command line".into(),
        key: "reward".into(),
        msg: format!("`{spec}`: {msg}"),
    };
    let (weight, rest) = match spec.split_once('*') {
        Some((w, r)) if w.trim().parse::<f64>().is_ok() && !w.contains(':') => {
            (w.trim().parse::<f64>().expect("checked"), r)
        }
        _ => (1.0, spec),
    };
    if !weight.is_finite() {
        return Err(bad("the weight must be a finite number".into()));
    }
    let (kind, arg) = rest.split_once(':').ok_or_else(|| {
        bad(format!(
            "expected KIND:ARG with KIND one of {}",
            known_kinds().join(", ")
        ))
    })?;
    let name = rest.to_string();
    let number = |what: &str| {
        arg.trim()
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| bad(format!("{what} must be a finite number")))
    };
    let source: Box<dyn RewardSource> = match kind.trim() {
        "rm" => {
            let dirs: Vec<PathBuf> = arg
                .split(',')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect();
            if dirs.is_empty() {
                return Err(bad("name a reward-model directory".into()));
            }
            Box::new(RewardModel::load(&dirs, policy_tokenizer, max_length)?)
        }
        "exact" if !arg.trim().is_empty() => Box::new(ExactAnswer {
            name,
            column: arg.trim().to_string(),
        }),
        "exact" => {
            return Err(bad(
                "name the dataset column holding the answer, e.g. exact:answer".into(),
            ))
        }
        "regex" => Box::new(RegexMatch {
            name,
            re: regex::Regex::new(arg).map_err(|e| bad(e.to_string()))?,
        }),
        "length" => Box::new(LengthPenalty {
            name,
            coef: number("the length coefficient")?,
        }),
        "eos" => Box::new(MissingEos {
            name,
            penalty: number("the missing-EOS penalty")?,
        }),
        "cmd" if !arg.trim().is_empty() => Box::new(External {
            name,
            command: arg.to_string(),
            timeout,
        }),
        "cmd" => return Err(bad("give the command to run".into())),
        other => {
            let factory = schemes()
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(other)
                .cloned();
            match factory {
                Some(f) => f(
                    arg,
                    &SpecContext {
                        spec,
                        policy_tokenizer,
                        max_length,
                        timeout,
                    },
                )?,
                None => {
                    return Err(bad(format!(
                        "unknown kind `{other}` ({})",
                        known_kinds().join(", ")
                    )))
                }
            }
        }
    };
    Ok((weight, source))
}

/// A weighted sum of sources with retries: what the trainers call.
pub struct Rewards {
    sources: Vec<(f64, Box<dyn RewardSource>)>,
    retries: usize,
}

/// Scores of one batch: the weighted total per sample and each source's raw scores.
#[derive(Debug)]
pub struct Scored {
    pub total: Vec<f64>,
    pub per_source: Vec<(String, Vec<f64>)>,
}

impl Rewards {
    pub fn new(sources: Vec<(f64, Box<dyn RewardSource>)>, retries: usize) -> Result<Self> {
        if sources.is_empty() {
            return Err(TrainError::Config {
                file: "command line".into(),
                key: "reward".into(),
                msg: "no reward source: pass --reward KIND:ARG (e.g. exact:answer or rm:runs/rm)"
                    .into(),
            });
        }
        Ok(Self { sources, retries })
    }

    /// Builds the sources of `specs`.
    pub fn from_specs(
        specs: &[String],
        policy_tokenizer: &Tokenizer,
        max_length: usize,
        timeout_s: f64,
        retries: usize,
    ) -> Result<Self> {
        let timeout = Duration::from_secs_f64(timeout_s.max(0.001));
        let sources = specs
            .iter()
            .map(|s| parse_spec(s, policy_tokenizer, max_length, timeout))
            .collect::<Result<Vec<_>>>()?;
        Self::new(sources, retries)
    }

    /// Every source's matrix-product precision ([`RewardSource::set_precision`]).
    pub fn set_precision(&mut self, precision: rlhf_model::Precision) {
        for (_, s) in &mut self.sources {
            s.set_precision(precision);
        }
    }

    pub fn score(&mut self, samples: &[Sample]) -> Result<Scored> {
        let mut total = vec![0.0; samples.len()];
        let mut per_source = Vec::with_capacity(self.sources.len());
        for (w, source) in &mut self.sources {
            let mut last_err = None;
            let mut got = None;
            for _ in 0..=self.retries {
                match source.score(samples) {
                    Ok(v) if v.len() != samples.len() => {
                        last_err = Some(reward_err(
                            source.name(),
                            format!("returned {} scores for {} samples", v.len(), samples.len()),
                        ))
                    }
                    Ok(v) => match v.iter().position(|x| !x.is_finite()) {
                        Some(i) => {
                            last_err = Some(reward_err(
                                source.name(),
                                format!("non-finite score {} for sample {i}", v[i]),
                            ))
                        }
                        None => {
                            got = Some(v);
                            break;
                        }
                    },
                    Err(e) => last_err = Some(e),
                }
            }
            let Some(v) = got else {
                let e = last_err.expect("an attempt was made");
                return Err(match e {
                    TrainError::Reward { source_name, msg } => TrainError::Reward {
                        source_name,
                        msg: format!("{msg} (after {} attempts)", self.retries + 1),
                    },
                    other => reward_err(
                        source.name(),
                        format!("{other} (after {} attempts)", self.retries + 1),
                    ),
                });
            };
            for (t, x) in total.iter_mut().zip(&v) {
                *t += *w * x;
            }
            per_source.push((source.name().to_string(), v));
        }
        Ok(Scored { total, per_source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(completion: &'a str, row: &'a Map<String, Value>) -> Sample<'a> {
        Sample {
            prompt: "Q: 1+1=",
            completion,
            prompt_ids: &[],
            completion_ids: &[5, 6, 7],
            eos: false,
            row,
        }
    }

    #[test]
    fn leading_numbers() {
        assert_eq!(leading_number(" 42"), Some(42.0));
        assert_eq!(leading_number(" 42 apples"), Some(42.0));
        assert_eq!(leading_number("-3."), Some(-3.0));
        assert_eq!(leading_number("2.5kg"), Some(2.5));
        assert_eq!(leading_number(" x42"), None);
    }

    #[test]
    fn exact_answer_and_errors() {
        let mut row = Map::new();
        row.insert("answer".into(), Value::from(2));
        let mut s = ExactAnswer {
            name: "exact:answer".into(),
            column: "answer".into(),
        };
        assert_eq!(
            s.score(&[sample(" 2</s>", &row), sample(" 3", &row)])
                .unwrap(),
            vec![1.0, 0.0]
        );
        let empty = Map::new();
        let e = s.score(&[sample(" 2", &empty)]).unwrap_err().to_string();
        assert!(e.contains("no numeric `answer` column"), "{e}");
    }

    #[test]
    fn weighted_sum_retries_and_never_silently_zeroes() {
        /// NaN for the first `nan_calls` calls, then 1.
        struct Flaky {
            calls: usize,
            nan_calls: usize,
        }
        impl RewardSource for Flaky {
            fn name(&self) -> &str {
                "flaky"
            }
            fn score(&mut self, s: &[Sample]) -> Result<Vec<f64>> {
                self.calls += 1;
                Ok(vec![
                    if self.calls <= self.nan_calls {
                        f64::NAN
                    } else {
                        1.0
                    };
                    s.len()
                ])
            }
        }
        let row = Map::new();
        let mut r = Rewards::new(
            vec![
                (
                    2.0,
                    Box::new(Flaky {
                        calls: 0,
                        nan_calls: 1,
                    }),
                ),
                (
                    1.0,
                    Box::new(LengthPenalty {
                        name: "len".into(),
                        coef: 0.5,
                    }),
                ),
            ],
            1,
        )
        .unwrap();
        let out = r.score(&[sample("a", &row)]).unwrap();
        assert_eq!(out.total, vec![2.0 - 1.5]);
        let mut r = Rewards::new(
            vec![(
                1.0,
                Box::new(Flaky {
                    calls: 0,
                    nan_calls: usize::MAX,
                }),
            )],
            2,
        )
        .unwrap();
        let e = r.score(&[sample("a", &row)]).unwrap_err().to_string();
        assert!(
            e.contains("flaky") && e.contains("non-finite") && e.contains("3 attempts"),
            "{e}"
        );
    }

    #[test]
    fn registered_kinds_parse_with_their_argument_and_weight() {
        let tok = Tokenizer::from_dir(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/models/llama"
        )))
        .unwrap();
        let t = Duration::from_secs(1);
        let e = parse_spec("const7:2.5", &tok, 64, t)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("unknown kind `const7`") && e.contains("cmd"),
            "{e}"
        );
        register_scheme("const7", |arg, ctx| {
            let v: f64 = arg
                .parse()
                .map_err(|_| reward_err(ctx.spec, "ARG must be a number"))?;
            Ok(Box::new(LengthPenalty {
                name: format!("const7:{arg}"),
                coef: -v,
            }))
        });
        assert!(known_kinds().contains(&"const7".to_string()));
        let (w, mut s) = parse_spec("3*const7:2.5", &tok, 64, t).unwrap();
        let row = Map::new();
        assert_eq!((w, s.name().to_string()), (3.0, "const7:2.5".to_string()));
        // LengthPenalty with coef −2.5 on 3 completion tokens.
        assert_eq!(s.score(&[sample("a", &row)]).unwrap(), vec![7.5]);
        let e = parse_spec("const7:x", &tok, 64, t)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("const7:x") && e.contains("ARG must be a number"),
            "{e}"
        );
    }

    #[test]
    fn external_command_scores_times_out_and_fails_clearly() {
        let row = Map::new();
        let mut ok = External {
            name: "cmd".into(),
            command: "while read l; do echo 0.5; done".into(),
            timeout: Duration::from_secs(20),
        };
        assert_eq!(
            ok.score(&[sample("a", &row), sample("b", &row)]).unwrap(),
            vec![0.5, 0.5]
        );
        let mut slow = External {
            name: "cmd".into(),
            command: "sleep 5".into(),
            timeout: Duration::from_millis(200),
        };
        assert!(slow
            .score(&[sample("a", &row)])
            .unwrap_err()
            .to_string()
            .contains("timed out"));
        let mut bad = External {
            name: "cmd".into(),
            command: "cat >/dev/null; echo oops".into(),
            timeout: Duration::from_secs(20),
        };
        assert!(bad
            .score(&[sample("a", &row)])
            .unwrap_err()
            .to_string()
            .contains("not a number"));
        let mut failing = External {
            name: "cmd".into(),
            command: "cat >/dev/null; echo boom >&2; exit 3".into(),
            timeout: Duration::from_secs(20),
        };
        let e = failing.score(&[sample("a", &row)]).unwrap_err().to_string();
        assert!(e.contains("boom"), "{e}");
    }
}
