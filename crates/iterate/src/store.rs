//! What survives a kill: `state.json` (the settings and the phases completed, replaced atomically after each
//! phase), atomically written phase outputs, and `labels.jsonl`, appended one label per line and read back
//! deduplicated by label id (a torn last line from a kill is dropped and cut off).

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The phases of a round, in order.
pub const PHASES: [&str; 5] = ["sample", "label", "train", "eval", "card"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The run's settings; a resumed run must match them (but for waiting times).
    pub settings: Value,
    /// The round in progress (1-based); `rounds + 1` when finished.
    pub round: usize,
    /// Phases of `round` completed.
    pub done: Vec<String>,
}

impl State {
    pub fn is_done(&self, round: usize, phase: &str) -> bool {
        round < self.round || (round == self.round && self.done.iter().any(|p| p == phase))
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so `path` is either old or complete.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let mut f =
        fs::File::create(&tmp).with_context(|| format!("{}: cannot write", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("{}: cannot replace", path.display()))
}

pub fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())
}

pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut s = String::new();
    for r in rows {
        s.push_str(&serde_json::to_string(r)?);
        s.push('\n');
    }
    write_atomic(path, s.as_bytes())
}

pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text =
        fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: unreadable row", path.display(), i + 1))
        })
        .collect()
}

/// One label with its provenance: who gave it (`by`), through which source, on which item, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRecord {
    /// Unique and stable: `<item>:<by>` (a re-run labels the same item by the same labeller under the same id).
    pub id: String,
    pub round: usize,
    /// `sandbox`, `judge`, `feedback` or `reward`.
    pub source: String,
    /// The kind of feedback ([`crate::kinds::Kind`]): `pairwise` (the default of older logs), `rating`,
    /// `correction`, `demonstration` or `critique`.
    #[serde(default = "pairwise")]
    pub kind: String,
    /// The labeller: annotator name, judge endpoint + model, reward spec, or the feedback app's annotator ids.
    pub by: String,
    /// The pair `r<round>-p<prompt>-<a>-<b>`, or for the other kinds `r<round>-p<prompt>-c<candidate>-<kind>`
    /// (`r<round>-p<prompt>-demonstration`).
    pub item: String,
    pub prompt_index: usize,
    /// The candidates compared; for a rating, correction or critique `a` = `b` = the candidate labelled (a
    /// demonstration: 0).
    pub a: usize,
    pub b: usize,
    /// Pairwise: P(candidate a ≻ candidate b): 1, 0 or ½ (tie) for a vote, the judge's probability, or by
    /// score. Other kinds: ½ (no preference; their answer is in `detail`).
    pub p_a: f64,
    /// Source-specific details: scores, choice, the app's item and label ids; the answer of the other kinds
    /// (`score`, `corrected`, `text`).
    pub detail: Value,
    /// Unix milliseconds when the label was obtained.
    pub at_ms: u64,
}

fn pairwise() -> String {
    "pairwise".into()
}

/// `labels.jsonl` of a round: read deduplicated, appended durably.
pub struct LabelLog {
    path: PathBuf,
    pub labels: Vec<LabelRecord>,
    ids: HashSet<String>,
}

impl LabelLog {
    /// Opens (or creates) the log. A last line without its newline is what a kill left mid-write: it is cut off.
    pub fn open(path: &Path) -> Result<Self> {
        let mut text = fs::read_to_string(path)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(String::new())
                } else {
                    Err(e)
                }
            })
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if !text.is_empty() && !text.ends_with('\n') {
            let keep = text.rfind('\n').map_or(0, |i| i + 1);
            text.truncate(keep);
            write_atomic(path, text.as_bytes())?;
        }
        let mut log = Self {
            path: path.to_path_buf(),
            labels: Vec::new(),
            ids: HashSet::new(),
        };
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let l: LabelRecord = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a label record", path.display(), i + 1))?;
            if log.ids.insert(l.id.clone()) {
                log.labels.push(l);
            }
        }
        Ok(log)
    }

    pub fn has(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Appends the labels not yet present (by id) and syncs them to disk; returns how many were new.
    pub fn append(&mut self, labels: Vec<LabelRecord>) -> Result<usize> {
        let mut seen = HashSet::new();
        let fresh: Vec<LabelRecord> = labels
            .into_iter()
            .filter(|l| !self.ids.contains(&l.id) && seen.insert(l.id.clone()))
            .collect();
        if fresh.is_empty() {
            return Ok(0);
        }
        let mut text = String::new();
        for l in &fresh {
            text.push_str(&serde_json::to_string(l)?);
            text.push('\n');
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("{}: cannot append", self.path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_data())
            .with_context(|| format!("{}: cannot append", self.path.display()))?;
        let n = fresh.len();
        for l in fresh {
            self.ids.insert(l.id.clone());
            self.labels.push(l);
        }
        Ok(n)
    }
}

/// Loads `state.json` of a run, checking the settings match (but for `free` keys); None for a new run.
pub fn load_state(path: &Path, settings: &Value, free: &[&str]) -> Result<Option<State>> {
    if !path.exists() {
        return Ok(None);
    }
    let s: State = serde_json::from_str(
        &fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?,
    )
    .with_context(|| format!("{}: not a state file of rlhf iterate", path.display()))?;
    let (Value::Object(old), Value::Object(new)) = (&s.settings, settings) else {
        bail!("{}: settings are not an object", path.display())
    };
    let differ: Vec<String> = old
        .keys()
        .chain(new.keys())
        .filter(|k| !free.contains(&k.as_str()) && old.get(*k) != new.get(*k))
        .map(|k| {
            format!(
                "{k} (was {}, now {})",
                old.get(k).unwrap_or(&Value::Null),
                new.get(k).unwrap_or(&Value::Null)
            )
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !differ.is_empty() {
        bail!(
            "{}: this run was started with other settings; resuming needs the same ones (or a new `name`): {}",
            path.display(),
            differ.join("; ")
        );
    }
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn label(id: &str) -> LabelRecord {
        LabelRecord {
            id: id.into(),
            round: 1,
            source: "reward".into(),
            kind: "pairwise".into(),
            by: "x".into(),
            item: "i".into(),
            prompt_index: 0,
            a: 0,
            b: 1,
            p_a: 1.0,
            detail: Value::Null,
            at_ms: 1,
        }
    }

    #[test]
    fn labels_dedupe_by_id_and_a_torn_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("labels.jsonl");
        let mut log = LabelLog::open(&p).unwrap();
        assert_eq!(
            log.append(vec![label("a"), label("b"), label("a")])
                .unwrap(),
            2
        );
        assert_eq!(log.append(vec![label("b"), label("c")]).unwrap(), 1);
        // A kill in the middle of a write.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"id\": \"d\", \"rou").unwrap();
        let log = LabelLog::open(&p).unwrap();
        assert_eq!(
            log.labels.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert!(fs::read_to_string(&p).unwrap().ends_with("}\n"));
    }

    #[test]
    fn a_resumed_run_must_have_the_same_settings() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        assert!(load_state(&p, &json!({}), &[]).unwrap().is_none());
        write_json(
            &p,
            &State {
                settings: json!({"rounds": 2, "feedback_poll_s": 1.0}),
                round: 1,
                done: vec!["sample".into()],
            },
        )
        .unwrap();
        let s = load_state(
            &p,
            &json!({"rounds": 2, "feedback_poll_s": 5.0}),
            &["feedback_poll_s"],
        )
        .unwrap()
        .unwrap();
        assert!(s.is_done(1, "sample") && !s.is_done(1, "label") && !s.is_done(2, "sample"));
        let e = load_state(&p, &json!({"rounds": 3, "feedback_poll_s": 1.0}), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rounds (was 2, now 3)"), "{e}");
    }
}
