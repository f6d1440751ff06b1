//! Domain types shared by the store, the web UI, import and export.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{invalid, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Annotator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Annotator => "annotator",
        }
    }
    pub fn parse(s: &str) -> Result<Role> {
        match s {
            "admin" => Ok(Role::Admin),
            "annotator" => Ok(Role::Annotator),
            _ => Err(invalid(format!(
                "role must be admin or annotator, got {s:?}"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Pairwise,
    Rating,
    Correction,
    Critique,
    Demonstration,
}

impl TaskKind {
    pub const ALL: [TaskKind; 5] = [
        TaskKind::Pairwise,
        TaskKind::Rating,
        TaskKind::Correction,
        TaskKind::Critique,
        TaskKind::Demonstration,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Pairwise => "pairwise",
            TaskKind::Rating => "rating",
            TaskKind::Correction => "correction",
            TaskKind::Critique => "critique",
            TaskKind::Demonstration => "demonstration",
        }
    }
    pub fn parse(s: &str) -> Result<TaskKind> {
        TaskKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| invalid(format!("task kind must be one of pairwise, rating, correction, critique, demonstration; got {s:?}")))
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub role: Role,
    pub has_password: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Project {
    pub id: i64,
    pub name: String,
    pub kind: TaskKind,
    pub criteria: Vec<String>,
    pub likert_max: i64,
    pub overlap: i64,
    /// Median seconds per item below which an annotator is flagged as too fast.
    pub min_seconds: f64,
    pub guidelines: String,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewProject {
    pub name: String,
    pub kind: TaskKind,
    pub criteria: Vec<String>,
    pub likert_max: i64,
    pub overlap: i64,
    pub min_seconds: f64,
    pub guidelines: String,
}

impl NewProject {
    pub fn new(name: &str, kind: TaskKind) -> NewProject {
        NewProject {
            name: name.to_string(),
            kind,
            criteria: vec!["helpful".into(), "truthful".into(), "harmless".into()],
            likert_max: 5,
            overlap: 3,
            min_seconds: 3.0,
            guidelines: String::new(),
        }
    }
    pub fn validate(&self) -> Result<()> {
        validate_settings(
            &self.name,
            &self.criteria,
            self.likert_max,
            self.overlap,
            self.min_seconds,
        )
    }
}

pub fn validate_settings(
    name: &str,
    criteria: &[String],
    likert_max: i64,
    overlap: i64,
    min_seconds: f64,
) -> Result<()> {
    if name.trim().is_empty() || name.len() > 200 {
        return Err(invalid("project name must be 1–200 characters"));
    }
    if criteria.is_empty() || criteria.iter().any(|c| c.trim().is_empty() || c.len() > 60) {
        return Err(invalid(
            "criteria must be a non-empty comma-separated list of names (≤ 60 characters each)",
        ));
    }
    if !(2..=10).contains(&likert_max) {
        return Err(invalid(format!(
            "likert scale maximum must be between 2 and 10, got {likert_max}"
        )));
    }
    if !(1..=50).contains(&overlap) {
        return Err(invalid(format!(
            "overlap (annotators per item) must be between 1 and 50, got {overlap}"
        )));
    }
    if !(0.0..=3600.0).contains(&min_seconds) {
        return Err(invalid(format!(
            "minimum seconds per item must be between 0 and 3600, got {min_seconds}"
        )));
    }
    Ok(())
}

/// Parses "helpful, truthful ,harmless" into names.
pub fn parse_criteria(s: &str) -> Vec<String> {
    s.split(',')
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

#[derive(Debug, Clone)]
pub struct Item {
    pub id: i64,
    pub project_id: i64,
    pub external_id: String,
    pub prompt: String,
    pub responses: Vec<String>,
    pub gold: Option<Value>,
    pub uncertainty: Option<f64>,
    pub label_count: i64,
}

#[derive(Debug, Clone)]
pub struct NewItem {
    pub external_id: String,
    pub prompt: String,
    pub responses: Vec<String>,
    pub gold: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct Assignment {
    pub id: i64,
    pub item_id: i64,
    pub user_id: i64,
    /// Response indices in the order shown, left to right.
    pub shown_order: Vec<usize>,
    pub served_at: i64,
}

/// The pairwise answer as the annotator saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Choice {
    /// Left response is better.
    A,
    /// Right response is better.
    B,
    #[serde(rename = "tie")]
    Tie,
    #[serde(rename = "both_bad")]
    BothBad,
}

impl Choice {
    pub fn parse(s: &str) -> Result<Choice> {
        match s {
            "A" | "a" | "1" => Ok(Choice::A),
            "B" | "b" | "2" => Ok(Choice::B),
            "tie" | "3" => Ok(Choice::Tie),
            "both_bad" | "4" => Ok(Choice::BothBad),
            _ => Err(invalid(format!(
                "choice must be A, B, tie or both_bad, got {s:?}"
            ))),
        }
    }
}

/// What an annotator submitted, per task kind. Stored as JSON in `labels.value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum LabelValue {
    Pairwise {
        choice: Choice,
        /// Response indices left to right, as shown.
        shown_order: Vec<usize>,
        /// Index of the preferred response; None for tie / both bad.
        preferred: Option<usize>,
    },
    Rating {
        scores: std::collections::BTreeMap<String, i64>,
    },
    Correction {
        corrected: String,
        unified_diff: String,
        word_diff: String,
    },
    Critique {
        text: String,
    },
    Demonstration {
        text: String,
    },
    /// Withdraws the annotator's previous label on the item.
    Undo,
}

impl LabelValue {
    pub fn kind(&self) -> &'static str {
        match self {
            LabelValue::Pairwise { .. } => "pairwise",
            LabelValue::Rating { .. } => "rating",
            LabelValue::Correction { .. } => "correction",
            LabelValue::Critique { .. } => "critique",
            LabelValue::Demonstration { .. } => "demonstration",
            LabelValue::Undo => "undo",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Label {
    pub id: i64,
    pub project_id: i64,
    pub item_id: i64,
    pub user_id: i64,
    pub assignment_id: Option<i64>,
    pub value: LabelValue,
    pub supersedes: Option<i64>,
    pub duration_ms: Option<i64>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub user_id: Option<i64>,
    pub username: Option<String>,
    pub action: String,
    pub detail: String,
}
