//! Tasks with verifiable answers: datasets, prompts, graders and environments.
//!
//! Every task turns dataset rows into [`Sample`]s (a prompt conversation, an optional SFT target and
//! the gold fields its grader needs) and grades completions against that gold. Prompts, targets and
//! graders follow `docs/DESIGN.md` ("Prompts and the chat template", "Tasks and graders") exactly.
//!
//! - `gsm8k`, `arith` (built-in, procedurally generated): `\boxed{}` answers, MATH normalisation.
//! - `gpqa` / `aqua` / `mcq`: n-way multiple choice, graded like gsm8k on the letter.
//! - `kodcode` / `humaneval`: Python functions run against tests in a [`sandbox`].
//! - `triviaqa` / `nq`: open QA with aliases, multi-turn with a search engine ([`search`]).

pub(crate) mod arith;
pub(crate) mod choice;
pub mod code;
pub(crate) mod config;
pub mod data;
pub mod grade;
pub mod gsm8k;
pub mod hub;
pub(crate) mod math;
pub mod qa;
pub mod sandbox;
pub mod search;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use config::TaskConfig;
// Prompts are chat conversations; the types live with the backbone that reads them.
pub use crate::backbone::chat::{render_chatml, Message};

/// A dataset split. `Train` and `Valid` come from the training data (split by `val_ratio` and the
/// seed unless a validation file is given); `Test` is the evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Split {
    type Err = TaskError;
    fn from_str(s: &str) -> Result<Self, TaskError> {
        match s {
            "train" => Ok(Split::Train),
            "valid" | "validation" | "val" | "dev" => Ok(Split::Valid),
            "test" | "eval" => Ok(Split::Test),
            other => Err(TaskError::Config(format!(
                "unknown split `{other}` (expected train, valid or test)"
            ))),
        }
    }
}

/// One task instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Stable id (the row's own id when it has one, else `{file stem}:{line}`).
    pub id: String,
    /// The prompt conversation (optional system message, then the user turn).
    pub messages: Vec<Message>,
    /// SFT target: the content of the assistant turn.
    pub target: Option<String>,
    /// Task-specific gold fields (what [`Task::grade`] needs); written to `answers.jsonl`.
    pub gold: serde_json::Value,
}

/// The result of grading one completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Graded {
    /// The task's score in the original metric (also `metrics["accuracy"]`).
    pub reward: f64,
    /// What the grader read from the completion (boxed answer, letter, code, final answer…).
    pub extracted: Option<String>,
    /// `accuracy` plus task-specific extras (`lenient_accuracy`, `em`, …).
    pub metrics: BTreeMap<String, f64>,
}

impl Graded {
    /// A grade whose reward is also reported as `accuracy`.
    pub fn new(reward: f64, extracted: Option<String>) -> Self {
        let mut metrics = BTreeMap::new();
        metrics.insert("accuracy".to_string(), reward);
        Self {
            reward,
            extracted,
            metrics,
        }
    }
    pub fn with(mut self, metric: &str, value: f64) -> Self {
        self.metrics.insert(metric.to_string(), value);
        self
    }
}

/// Errors from the tasks module (bad configuration, bad data, sandbox failures).
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{location}: {message}")]
    BadRow { location: String, message: String },
    #[error("gold: {0}")]
    BadGold(String),
    #[error("sandbox: {0}")]
    Sandbox(String),
    /// A hub dataset could not be resolved or fetched (the message names the `hf://` source).
    #[error(transparent)]
    Hub(#[from] hub::HubError),
}

pub type Result<T, E = TaskError> = std::result::Result<T, E>;

/// A task: data loading, prompts, targets and grading.
pub trait Task: Send + Sync {
    /// The configured task name (`gsm8k`, `arith`, …).
    fn name(&self) -> &str;
    /// Load one split as samples (train/valid split by `val_ratio` with the seed; `limit` applied).
    fn load(&self, split: Split) -> Result<Vec<Sample>>;
    /// Evaluation score: the original metric as `reward` and `metrics["accuracy"]`, extras beside it.
    fn grade(&self, completion: &str, gold: &serde_json::Value) -> Graded;
    /// GRPO reward (the eval score unless the task says otherwise, as triviaqa does).
    fn reward(&self, completion: &str, gold: &serde_json::Value) -> f64 {
        self.grade(completion, gold).reward
    }
    /// Check that `gold` has the fields this task grades against (for `memgen grade` input).
    fn check_gold(&self, gold: &serde_json::Value) -> Result<()>;
    /// The gold fields the loader derives from one raw dataset row (so `memgen grade` can take the
    /// task's own rows plus a `completion`). Tasks without dataset rows refuse.
    fn gold_from_row(&self, row: &data::RawRow) -> Result<serde_json::Value, String> {
        let _ = row;
        Err(format!("task `{}` has no dataset rows", self.name()))
    }
    /// Whether samples are multi-turn episodes driven by an environment ([`search::SearchEnv`]).
    fn multi_turn(&self) -> bool {
        false
    }
}

/// Build the task named in `cfg`.
pub fn build_task(cfg: &TaskConfig) -> Result<Box<dyn Task>> {
    cfg.validate()?;
    let task: Box<dyn Task> = match cfg.name.as_str() {
        "gsm8k" | "math" => Box::new(gsm8k::Gsm8k::new(cfg.clone())),
        "arith" => Box::new(arith::Arith::new(cfg.clone())),
        "gpqa" | "aqua" | "mcq" => Box::new(choice::MultipleChoice::new(cfg.clone())),
        "kodcode" | "humaneval" => Box::new(code::Code::new(cfg.clone())?),
        "triviaqa" | "nq" | "popqa" => Box::new(qa::OpenQa::new(cfg.clone())),
        other => {
            return Err(TaskError::Config(format!(
                "unknown task `{other}` (known: {})",
                TASK_NAMES.join(", ")
            )))
        }
    };
    Ok(task)
}

/// Task names [`build_task`] accepts.
pub const TASK_NAMES: &[&str] = &[
    "gsm8k",
    "math",
    "arith",
    "gpqa",
    "aqua",
    "mcq",
    "kodcode",
    "humaneval",
    "triviaqa",
    "nq",
    "popqa",
];

/// Read a string gold field (numbers are accepted and printed as JSON does).
pub(crate) fn gold_str(gold: &serde_json::Value, key: &str) -> Result<String> {
    match gold.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(v @ serde_json::Value::Number(_)) => Ok(v.to_string()),
        Some(other) => Err(TaskError::BadGold(format!(
            "field `{key}` should be a string, got {other}"
        ))),
        None => Err(TaskError::BadGold(format!("missing field `{key}`"))),
    }
}
