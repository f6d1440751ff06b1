//! One settings style for every trainer: a struct that is both the CLI flags (clap) and the TOML keys (serde),
//! merged as defaults ← `--config FILE` ← flags given on the command line. Unknown keys and ill-typed values are
//! errors naming the file, line and key. The sections `[lora]`, `[rm]` and `[dpo]` of older files are read as
//! the flat keys they stand for (`[lora] r` is `lora_r`, `[dpo] beta` is `beta`).

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::Parser;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Result, TrainError};

/// The name of the flag holding the TOML file; every settings struct has it as `config: Option<PathBuf>`.
const CONFIG_KEY: &str = "config";

/// Sections accepted as another spelling of flat keys: `[SECTION] key` is the key `PREFIX` + `key`.
const SECTIONS: &[(&str, &str)] = &[("lora", "lora_"), ("rm", ""), ("dpo", "")];

/// A settings struct `load` can fill.
pub trait Settings: Parser + Serialize + DeserializeOwned {
    /// `(key, default)` shown in `--help` for flags whose default is not a clap default (the shared keys,
    /// whose defaults are the trainer's: [`crate::train_args::TrainDefaults::help`]).
    fn help_defaults() -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// Why settings could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// A bad flag, or `--help`: for the CLI to print (`clap::Error::exit`).
    Cli(clap::Error),
    Settings(TrainError),
}

impl LoadError {
    /// The settings error (tests).
    pub fn settings(self) -> Option<TrainError> {
        match self {
            LoadError::Settings(e) => Some(e),
            LoadError::Cli(_) => None,
        }
    }
}

impl From<LoadError> for TrainError {
    /// A flag error as a settings error naming the command line (library callers that build flag lists).
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Settings(e) => e,
            LoadError::Cli(e) => TrainError::Config {
                file: "command line".into(),
                key: "-".into(),
                msg: e.to_string(),
            },
        }
    }
}

/// Parse `args` (without the program/subcommand name) into `C`.
pub fn load<C: Settings>(name: &str, args: &[OsString]) -> std::result::Result<C, LoadError> {
    let argv = std::iter::once(OsString::from(name)).chain(args.iter().cloned());
    // A repeated flag: the last one wins (scripts append overrides); repeatable keys such as `reward` accumulate.
    let mut command = C::command()
        .bin_name(name.to_string())
        .args_override_self(true);
    for (key, default) in C::help_defaults() {
        command = command.mut_arg(key, |a| {
            let help = a.get_help().map(ToString::to_string).unwrap_or_default();
            a.help(format!("{help} [default: {default}]"))
        });
    }
    let matches = command.try_get_matches_from(argv).map_err(LoadError::Cli)?;
    let flags = C::from_arg_matches(&matches).map_err(LoadError::Cli)?;
    let explicit: Vec<String> = matches
        .ids()
        .map(|id| id.as_str().to_string())
        .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
        .collect();
    merge(&flags, &explicit).map_err(LoadError::Settings)
}

/// A value read from the TOML file: the key as written (`beta` or `dpo.beta`) and where (`FILE:LINE`).
struct FileValue {
    value: Value,
    written: String,
    at: String,
}

/// `flags` (defaults and given flags) with the TOML file named by its `config` key laid over every key not in
/// `explicit`.
fn merge<C: Serialize + DeserializeOwned>(flags: &C, explicit: &[String]) -> Result<C> {
    let Value::Object(base) = serde_json::to_value(flags).expect("settings serialise") else {
        panic!("settings must be a struct")
    };
    // JSON has no NaN/inf: a float flag given as one serialises to null and would silently read as unset.
    if let Some(k) = explicit
        .iter()
        .find(|k| base.get(k.as_str()) == Some(&Value::Null))
    {
        return Err(TrainError::Config {
            file: "command line".into(),
            key: k.clone(),
            msg: "not a finite number".into(),
        });
    }
    let config = match base.get(CONFIG_KEY) {
        Some(Value::String(p)) => Some(p.clone()),
        _ => None,
    };
    let file = match &config {
        Some(path) => read_toml(Path::new(path), &base)?,
        None => Vec::new(),
    };
    let from_file: Vec<(String, FileValue)> = file
        .into_iter()
        .filter(|(k, _)| !explicit.contains(k))
        .collect();
    let mut merged = base.clone();
    for (k, v) in &from_file {
        merged.insert(k.clone(), v.value.clone());
    }
    serde_path_to_error::deserialize(Value::Object(merged)).map_err(|e| {
        // Serde does not track keys through flattened structs: find the file key that fails on its own.
        let bad = from_file.iter().find_map(|(k, v)| {
            let mut one = base.clone();
            one.insert(k.clone(), v.value.clone());
            serde_json::from_value::<C>(Value::Object(one))
                .err()
                .map(|e| (v, e.to_string()))
        });
        match bad {
            Some((v, msg)) => TrainError::Config {
                file: v.at.clone(),
                key: v.written.clone(),
                msg,
            },
            None => TrainError::Config {
                file: "command line".into(),
                key: e.path().to_string(),
                msg: e.inner().to_string(),
            },
        }
    })
}

/// `FILE:LINE` of the `key = …` line of a TOML file (`FILE` alone when it is not found), for errors. A dotted
/// key `section.key` is looked up inside `[section]`.
pub fn locate(path: &Path, key: &str) -> String {
    let line = line_of(&std::fs::read_to_string(path).unwrap_or_default(), key)
        .map(|n| format!(":{n}"))
        .unwrap_or_default();
    format!("{}{line}", path.display())
}

/// The line number of `key = …` in TOML `text` (`section.key`: inside `[section]`).
fn line_of(text: &str, key: &str) -> Option<usize> {
    let (section, key) = match key.split_once('.') {
        Some((s, k)) => (Some(s), k),
        None => (None, key),
    };
    let mut current: Option<&str> = None;
    for (i, l) in text.lines().enumerate() {
        let l = l.trim_start();
        if let Some(header) = l.strip_prefix('[') {
            current = header.split(']').next().map(str::trim);
        } else if current == section
            && l.strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with('='))
        {
            return Some(i + 1);
        }
    }
    None
}

/// An invalid-setting error naming where the value came from: the config file at the key's line when the file
/// sets it (a flag may have overridden it), else the command line.
pub fn setting_err(config: Option<&Path>, key: &str, msg: impl Into<String>) -> TrainError {
    let in_file = config.and_then(|p| {
        let text = std::fs::read_to_string(p).ok()?;
        // The key as written: flat, or inside one of the sections that stand for it.
        let spellings = std::iter::once(key.to_string()).chain(
            SECTIONS
                .iter()
                .filter_map(|(s, prefix)| key.strip_prefix(prefix).map(|k| format!("{s}.{k}"))),
        );
        spellings
            .into_iter()
            .find_map(|k| line_of(&text, &k))
            .map(|n| format!("{}:{n} (or the command line)", p.display()))
    });
    TrainError::Config {
        file: in_file.unwrap_or_else(|| "command line".into()),
        key: key.into(),
        msg: msg.into(),
    }
}

/// The TOML file's values by flat key (sections resolved), checking every key is known.
fn read_toml(path: &Path, known: &Map<String, Value>) -> Result<Vec<(String, FileValue)>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| TrainError::Config {
            file: file.clone(),
            key: "-".into(),
            msg: e.to_string(),
        })?;
    let unknown = |written: &str| {
        let mut keys: Vec<&str> = known
            .keys()
            .map(String::as_str)
            .filter(|k| *k != CONFIG_KEY)
            .collect();
        keys.sort_unstable();
        TrainError::Config {
            file: locate(path, written),
            key: written.into(),
            msg: format!("unknown key (known: {})", keys.join(", ")),
        }
    };
    let mut entries = Vec::new();
    for (key, value) in table {
        let section = SECTIONS.iter().find(|(s, _)| *s == key);
        match (section, value) {
            (Some((name, prefix)), toml::Value::Table(inner)) if !known.contains_key(&key) => {
                for (k, v) in inner {
                    entries.push((format!("{prefix}{k}"), format!("{name}.{k}"), v));
                }
            }
            (_, v) => entries.push((key.clone(), key, v)),
        }
    }
    let mut out = Vec::new();
    for (flat, written, value) in entries {
        if flat == CONFIG_KEY || !known.contains_key(&flat) {
            return Err(unknown(&written));
        }
        let at = locate(path, &written);
        if let toml::Value::Float(f) = value {
            // JSON has no NaN/inf: such a value would silently read as unset.
            if !f.is_finite() {
                return Err(TrainError::Config {
                    file: at,
                    key: written,
                    msg: format!("{f} is not a finite number"),
                });
            }
        }
        let value = serde_json::to_value(value).expect("TOML values are JSON values");
        out.push((flat, FileValue { value, written, at }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::path::PathBuf;

    #[derive(Debug, Parser, Serialize, Deserialize, PartialEq)]
    struct S {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 0.5)]
        beta: f64,
        #[arg(long, default_value_t = 4)]
        steps: u64,
        #[arg(long)]
        reward: Vec<String>,
    }

    impl Settings for S {}

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn defaults_then_file_then_explicit_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "beta = 0.1\nsteps = 7\nreward = [\"exact:answer\"]\n").unwrap();
        let s: S = load(
            "x",
            &args(&["--config", f.to_str().unwrap(), "--steps", "4"]),
        )
        .unwrap();
        // `--steps 4` equals the default but was given: it wins over the file.
        assert_eq!(
            (s.beta, s.steps, s.reward.clone()),
            (0.1, 4, vec!["exact:answer".to_string()])
        );
        let s: S = load("x", &args(&[])).unwrap();
        assert_eq!((s.beta, s.steps), (0.5, 4));
    }

    #[test]
    fn unknown_and_ill_typed_keys_name_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "beta = 0.1\nbeat = 3\n").unwrap();
        let e = load::<S>("x", &args(&["--config", f.to_str().unwrap()]))
            .unwrap_err()
            .settings()
            .unwrap()
            .to_string();
        assert!(
            e.contains("c.toml:2") && e.contains("\"beat\"") && e.contains("unknown key"),
            "{e}"
        );
        std::fs::write(&f, "steps = \"many\"\n").unwrap();
        let e = load::<S>("x", &args(&["--config", f.to_str().unwrap()]))
            .unwrap_err()
            .settings()
            .unwrap()
            .to_string();
        assert!(e.contains("c.toml:1") && e.contains("\"steps\""), "{e}");
    }
}
