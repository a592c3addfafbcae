//! Grading completions that already exist (`memgen grade`), and the `answers.jsonl` row schema the
//! evaluation writes.
//!
//! One JSON object per line:
//! `{"id", "prompt", "completion", "gold": {…task gold fields…}, "extracted", "reward", "metrics": {…}}`.
//! Only `completion` and the gold are needed to grade. A row without a `gold` object is either a raw
//! dataset row plus `completion` (a GSM8K `{question, answer: "…#### 18"}`, a KodCode
//! `{question, test, test_info, …}`, an AQuA/GPQA row with its `id` when options are shuffled, …),
//! whose gold is derived exactly as the dataset loader derives it; or, when the task cannot build a
//! sample from it, its other top-level fields are taken as the gold itself (so
//! `{"completion": "…", "answer": "18"}` works). Any other fields are kept as they are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::data::RawRow;
use super::{Graded, Sample, Task, TaskError};

/// One row of `answers.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerRow {
    pub id: String,
    /// The rendered prompt (or any text identifying it).
    #[serde(default)]
    pub prompt: String,
    pub completion: String,
    pub gold: Value,
    #[serde(default)]
    pub extracted: Option<String>,
    #[serde(default)]
    pub reward: f64,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

impl AnswerRow {
    pub fn new(sample: &Sample, prompt: String, completion: String, graded: Graded) -> Self {
        Self {
            id: sample.id.clone(),
            prompt,
            completion,
            gold: sample.gold.clone(),
            extracted: graded.extracted,
            reward: graded.reward,
            metrics: graded.metrics,
        }
    }
}

/// Mean of every metric over `grades`, plus `count`.
pub fn summarize<'a>(grades: impl IntoIterator<Item = &'a Graded>) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut count = 0usize;
    for g in grades {
        count += 1;
        for (k, v) in &g.metrics {
            let e = sums.entry(k.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
        let e = sums.entry("reward".into()).or_insert((0.0, 0));
        e.0 += g.reward;
        e.1 += 1;
    }
    let mut out: BTreeMap<String, f64> = sums
        .into_iter()
        .map(|(k, (s, n))| (k, if n == 0 { 0.0 } else { s / n as f64 }))
        .collect();
    out.insert("count".into(), count as f64);
    out
}

/// Grade every row of the JSON-lines `input` with `task` (in parallel), write the rows back with
/// `extracted`, `reward` and `metrics` to `output` (atomically; `input` itself when `None`), and
/// return the summary metrics.
pub fn grade_file(
    task: &dyn Task,
    input: &Path,
    output: Option<&Path>,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let shown = input.display().to_string();
    let text = std::fs::read_to_string(input).map_err(|source| TaskError::Io {
        path: shown.clone(),
        source,
    })?;
    let stem = input
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .split('.')
                .next()
                .unwrap_or("row")
                .to_string()
        })
        .unwrap_or_else(|| "row".into());
    let mut rows: Vec<(String, Map<String, Value>, Value)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let location = format!("{shown}:{}", i + 1);
        let bad = |message: String| TaskError::BadRow {
            location: location.clone(),
            message,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(bad("expected a JSON object".into()).into());
        };
        match obj.get("completion") {
            Some(Value::String(_)) => {}
            _ => return Err(bad("missing string field `completion`".into()).into()),
        }
        let gold = match obj.get("gold") {
            Some(g @ Value::Object(_)) => g.clone(),
            Some(_) => return Err(bad("`gold` should be an object".into()).into()),
            None => {
                // `prompt` stays: it is HumanEval's question column.
                let mut fields = obj.clone();
                for k in ["completion", "extracted", "reward", "metrics"] {
                    fields.remove(k);
                }
                // Rows the loader would read: the same id (it seeds option shuffles) and columns.
                let default_id = match fields.get("id") {
                    Some(Value::String(id)) => id.clone(),
                    _ => format!("{stem}:{}", i + 1),
                };
                let raw = RawRow {
                    location: location.clone(),
                    default_id,
                    value: fields.clone(),
                };
                match task.gold_from_row(&raw) {
                    Ok(gold) => gold,
                    Err(raw_error) => {
                        fields.remove("id");
                        fields.remove("prompt");
                        let gold = Value::Object(fields);
                        task.check_gold(&gold).map_err(|e| {
                            bad(format!(
                                "neither gold fields ({e}) nor a raw {} row ({raw_error})",
                                task.name()
                            ))
                        })?;
                        gold
                    }
                }
            }
        };
        task.check_gold(&gold).map_err(|e| bad(e.to_string()))?;
        rows.push((location, obj, gold));
    }
    let grades: Vec<Graded> = rows
        .par_iter()
        .map(|(_, obj, gold)| {
            let completion = obj
                .get("completion")
                .and_then(Value::as_str)
                .unwrap_or_default();
            task.grade(completion, gold)
        })
        .collect();
    let mut out = String::new();
    for ((_, mut obj, _), g) in rows.into_iter().zip(&grades) {
        obj.insert(
            "extracted".into(),
            g.extracted
                .clone()
                .map(Value::String)
                .unwrap_or(Value::Null),
        );
        obj.insert("reward".into(), serde_json::json!(g.reward));
        obj.insert("metrics".into(), serde_json::to_value(&g.metrics)?);
        out.push_str(&serde_json::to_string(&Value::Object(obj))?);
        out.push('\n');
    }
    let target: PathBuf = output.unwrap_or(input).to_path_buf();
    crate::util::write_atomic(&target, out.as_bytes())?;
    Ok(summarize(&grades))
}
