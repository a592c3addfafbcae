//! Task configuration (the `task:` section of a run config, or `--options` of `memgen grade`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Result, TaskError};

/// Everything a task needs to load its data and grade. Unknown keys are errors (typos surface).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Task name: `gsm8k`, `arith`, `gpqa`/`aqua`/`mcq`, `kodcode`/`humaneval`, `triviaqa`/`nq`.
    pub name: String,
    /// Training data: a local file (`.jsonl`, `.jsonl.gz`, `.json`, `.parquet`, or a TSV for open
    /// QA), a directory of such shards, or a hub dataset `hf://OWNER/NAME[/CONFIG[/SPLIT]]`
    /// (config `default` and split `train` when left out; see `tasks::hub`).
    #[serde(default)]
    pub train_path: Option<PathBuf>,
    /// Validation data (same forms; a hub split defaults to `validation`); when absent,
    /// validation is `val_ratio` of train (seeded).
    #[serde(default)]
    pub valid_path: Option<PathBuf>,
    /// Test data, the evaluation set (same forms; a hub split defaults to `test`).
    #[serde(default)]
    pub test_path: Option<PathBuf>,
    /// Column names, by logical field (`question`, `answer`, `options`, …) where the data's differ
    /// from the task's defaults.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Share of train held out for validation when there is no `valid_path`.
    #[serde(default = "default_val_ratio")]
    pub val_ratio: f64,
    /// Seed for the train/valid split, option shuffles and the `arith` generator.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Keep at most this many samples per split.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Skip rows missing a required field (with a warning) instead of failing.
    #[serde(default)]
    pub skip_bad_rows: bool,

    // Multiple choice.
    /// Shuffle the options of each question (seeded per sample).
    #[serde(default = "default_true")]
    pub shuffle_options: bool,

    // Code.
    /// Wall-clock limit for running a solution and its tests, seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    /// Address-space limit of the sandboxed Python, MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Python interpreter for the sandbox (looked up in a minimal PATH when not absolute).
    #[serde(default = "default_python")]
    pub python: String,
    /// Run untrusted code even when it cannot be isolated (no bubblewrap / user namespaces):
    /// then only resource limits apply, and a warning is printed once. Off by default, so a
    /// machine without isolation refuses to grade code instead of running it unprotected.
    #[serde(default)]
    pub allow_unsandboxed_code: bool,

    // Open QA / search.
    /// Whether open QA runs as a multi-turn search episode (else a single answer turn).
    #[serde(default = "default_true")]
    pub search: bool,
    /// Wrap observations in `<information>…</information>` as Search-R1 does.
    #[serde(default)]
    pub use_information_tags: bool,
    /// Maximum assistant turns per episode.
    #[serde(default = "default_max_turns")]
    pub max_turns: usize,
    /// Observations are cut to this many tokens (by the tokenizer the caller plugs in).
    #[serde(default = "default_max_obs_tokens")]
    pub max_obs_tokens: usize,
    /// Passages per search.
    #[serde(default = "default_topk")]
    pub topk: usize,

    // arith.
    /// Number of generated problems per split (`arith`).
    #[serde(default = "default_train_size")]
    pub train_size: usize,
    #[serde(default = "default_valid_size")]
    pub valid_size: usize,
    #[serde(default = "default_test_size")]
    pub test_size: usize,
}

fn default_val_ratio() -> f64 {
    0.1
}
fn default_seed() -> u64 {
    42
}
fn default_true() -> bool {
    true
}
fn default_timeout() -> f64 {
    5.0
}
fn default_memory_mb() -> u64 {
    1024
}
fn default_python() -> String {
    "python3".to_string()
}
fn default_max_turns() -> usize {
    5
}
fn default_max_obs_tokens() -> usize {
    512
}
fn default_topk() -> usize {
    3
}
fn default_train_size() -> usize {
    5000
}
fn default_valid_size() -> usize {
    200
}
fn default_test_size() -> usize {
    500
}

impl TaskConfig {
    /// A config with every default, for task `name`.
    pub fn named(name: &str) -> Self {
        let v = serde_json::json!({ "name": name });
        serde_json::from_value(v).expect("defaults deserialize")
    }

    /// Build from a name plus `key value` overrides (values parsed as YAML scalars, so `0.2`,
    /// `true`, `7` and `path/to/file` all work). Unknown keys are errors.
    pub fn from_options(name: &str, options: &[(String, String)]) -> Result<Self> {
        let mut map = serde_json::Map::new();
        map.insert("name".into(), serde_json::Value::String(name.into()));
        for (k, v) in options {
            let value = if let Some(field) = k.strip_prefix("fields.") {
                let entry = map
                    .entry("fields")
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if let Some(obj) = entry.as_object_mut() {
                    obj.insert(field.to_string(), serde_json::Value::String(v.clone()));
                }
                continue;
            } else {
                let parsed: serde_json::Value = serde_yaml::from_str(v)
                    .unwrap_or_else(|_| serde_json::Value::String(v.clone()));
                match parsed {
                    // Paths and names stay strings even when YAML reads them otherwise.
                    serde_json::Value::Null => serde_json::Value::String(v.clone()),
                    p => p,
                }
            };
            let value = if k.ends_with("_path") || k == "python" {
                serde_json::Value::String(v.clone())
            } else {
                value
            };
            map.insert(k.clone(), value);
        }
        let cfg: TaskConfig = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| TaskError::Config(format!("task options: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check value ranges.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.val_ratio) {
            return Err(TaskError::Config(format!(
                "val_ratio must be in [0, 1), got {}",
                self.val_ratio
            )));
        }
        if !(self.timeout_secs > 0.0 && self.timeout_secs <= 3600.0) {
            return Err(TaskError::Config(format!(
                "timeout_secs must be in (0, 3600], got {}",
                self.timeout_secs
            )));
        }
        if self.max_turns == 0 {
            return Err(TaskError::Config("max_turns must be at least 1".into()));
        }
        if self.memory_mb < 64 {
            return Err(TaskError::Config("memory_mb must be at least 64".into()));
        }
        Ok(())
    }

    /// The column for logical field `logical`: the configured one, else the first of `defaults`
    /// present in `row`, else the first default.
    pub fn column<'a>(
        &'a self,
        logical: &str,
        defaults: &[&'a str],
        row: &serde_json::Map<String, serde_json::Value>,
    ) -> &'a str {
        if let Some(c) = self.fields.get(logical) {
            return c.as_str();
        }
        defaults
            .iter()
            .copied()
            .find(|d| row.contains_key(*d))
            .unwrap_or_else(|| defaults.first().copied().unwrap_or(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_options() {
        let c = TaskConfig::named("gsm8k");
        assert_eq!(c.val_ratio, 0.1);
        assert_eq!(c.seed, 42);
        assert_eq!(c.max_turns, 5);
        let c = TaskConfig::from_options(
            "gsm8k",
            &[
                ("val_ratio".into(), "0.2".into()),
                ("limit".into(), "7".into()),
                ("test_path".into(), "123".into()),
                ("fields.question".into(), "problem".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.val_ratio, 0.2);
        assert_eq!(c.limit, Some(7));
        assert_eq!(c.test_path, Some(PathBuf::from("123")));
        assert_eq!(
            c.fields.get("question").map(String::as_str),
            Some("problem")
        );
        let e = TaskConfig::from_options("gsm8k", &[("val_ration".into(), "0.2".into())]);
        assert!(e.unwrap_err().to_string().contains("val_ration"));
        let e = TaskConfig::from_options("gsm8k", &[("val_ratio".into(), "2".into())]);
        assert!(e.is_err());
    }

    #[test]
    fn yaml_config_rejects_typos() {
        let ok: TaskConfig = serde_yaml::from_str("name: arith\ntrain_size: 10\n").unwrap();
        assert_eq!(ok.train_size, 10);
        assert!(serde_yaml::from_str::<TaskConfig>("name: arith\ntrain_sise: 10\n").is_err());
    }
}
