//! One settings style for a trainer: a struct that is both the CLI flags (clap, with defaults) and the TOML
//! keys (serde), merged as defaults ← `--config FILE` ← flags given on the command line. Unknown keys and
//! ill-typed values are errors naming the file, line and key.

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

/// Parse `args` (without the program/subcommand name) into `C`.
pub fn load<C>(name: &str, args: &[OsString]) -> std::result::Result<C, LoadError>
where
    C: Parser + Serialize + DeserializeOwned,
{
    let argv = std::iter::once(OsString::from(name)).chain(args.iter().cloned());
    // A repeated flag: the last one wins (scripts append overrides); repeatable keys such as `reward` accumulate.
    let matches = C::command().bin_name(name.to_string()).args_override_self(true).try_get_matches_from(argv).map_err(LoadError::Cli)?;
    let flags = C::from_arg_matches(&matches).map_err(LoadError::Cli)?;
    let explicit: Vec<String> = matches
        .ids()
        .map(|id| id.as_str().to_string())
        .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
        .collect();
    merge(&flags, &explicit).map_err(LoadError::Settings)
}

/// `flags` (defaults and given flags) with the TOML file named by its `config` key laid over every key not in
/// `explicit`.
pub fn merge<C: Serialize + DeserializeOwned>(flags: &C, explicit: &[String]) -> Result<C> {
    let Value::Object(mut merged) = serde_json::to_value(flags).expect("settings serialise") else {
        panic!("settings must be a struct")
    };
    let config = match merged.get(CONFIG_KEY) {
        Some(Value::String(p)) => Some(p.clone()),
        _ => None,
    };
    let mut origin = Map::new();
    if let Some(path) = &config {
        let table = read_toml(Path::new(path), &merged)?;
        for (k, v) in table {
            if !explicit.contains(&k) {
                origin.insert(k.clone(), Value::Bool(true));
                merged.insert(k, v);
            }
        }
    }
    serde_path_to_error::deserialize(Value::Object(merged)).map_err(|e| {
        let key = e.path().to_string();
        let file = match (&config, origin.contains_key(&key)) {
            (Some(p), true) => locate(Path::new(p), &key),
            _ => "command line".to_string(),
        };
        TrainError::Config { file, key, msg: e.inner().to_string() }
    })
}

/// `FILE:LINE` of the top-level `key = …` line of a TOML file (`FILE` alone when it is not found), for errors.
pub fn locate(path: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let line = text
        .lines()
        .position(|l| l.trim_start().strip_prefix(key).is_some_and(|r| r.trim_start().starts_with('=')))
        .map(|i| format!(":{}", i + 1))
        .unwrap_or_default();
    format!("{}{line}", path.display())
}

/// The TOML file as JSON values, checking every key is known.
fn read_toml(path: &Path, known: &Map<String, Value>) -> Result<Map<String, Value>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| TrainError::Config { file: file.clone(), key: "-".into(), msg: e.to_string() })?;
    let mut out = Map::new();
    for (key, value) in table {
        if key == CONFIG_KEY || !known.contains_key(&key) {
            let mut keys: Vec<&str> = known.keys().map(String::as_str).filter(|k| *k != CONFIG_KEY).collect();
            keys.sort_unstable();
            return Err(TrainError::Config { file: locate(path, &key), key, msg: format!("unknown key (known: {})", keys.join(", ")) });
        }
        out.insert(key, serde_json::to_value(value).expect("TOML values are JSON values"));
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

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn defaults_then_file_then_explicit_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "beta = 0.1\nsteps = 7\nreward = [\"exact:answer\"]\n").unwrap();
        let s: S = load("x", &args(&["--config", f.to_str().unwrap(), "--steps", "4"])).unwrap();
        // `--steps 4` equals the default but was given: it wins over the file.
        assert_eq!((s.beta, s.steps, s.reward.clone()), (0.1, 4, vec!["exact:answer".to_string()]));
        let s: S = load("x", &args(&[])).unwrap();
        assert_eq!((s.beta, s.steps), (0.5, 4));
    }

    #[test]
    fn unknown_and_ill_typed_keys_name_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "beta = 0.1\nbeat = 3\n").unwrap();
        let e = load::<S>("x", &args(&["--config", f.to_str().unwrap()])).unwrap_err().settings().unwrap().to_string();
        assert!(e.contains("c.toml:2") && e.contains("\"beat\"") && e.contains("unknown key"), "{e}");
        std::fs::write(&f, "steps = \"many\"\n").unwrap();
        let e = load::<S>("x", &args(&["--config", f.to_str().unwrap()])).unwrap_err().settings().unwrap().to_string();
        assert!(e.contains("c.toml:1") && e.contains("\"steps\""), "{e}");
    }
}
