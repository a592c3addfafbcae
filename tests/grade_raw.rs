//! `memgen grade` on raw dataset rows plus a `completion` gives exactly the rewards of the same
//! completions graded against the gold the loader writes (`answers.jsonl` form), for every task
//! family, on the real data in ../shared/data.

mod common;

use std::path::{Path, PathBuf};

use memgen::tasks::{build_task, data, grade, Sample, Split, TaskConfig};
use serde_json::{json, Map, Value};

fn data_file(rel: &str) -> PathBuf {
    let p = common::shared().join("data").join(rel);
    assert!(
        p.is_file(),
        "missing test data {} (the shared data folder beside the repository)",
        p.display()
    );
    p
}

/// Grade `rows` (JSON objects) from a file named `name` in `dir`; per-row rewards and the summary.
fn grade_rows(cfg: &TaskConfig, dir: &Path, name: &str, rows: &[Value]) -> (Vec<f64>, Value) {
    let input = dir.join(name);
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&input, text).unwrap();
    let output = dir.join(format!("graded-{name}"));
    let task = build_task(cfg).unwrap();
    let summary = grade::grade_file(task.as_ref(), &input, Some(&output)).unwrap();
    let rewards = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["reward"]
                .as_f64()
                .unwrap()
        })
        .collect();
    (rewards, serde_json::to_value(summary).unwrap())
}

/// Load `n` test samples of `cfg` and the same raw rows, make completions with `complete` (index,
/// sample), grade both forms and check they agree row by row, with some right and some wrong.
fn check_same_rewards(
    cfg: TaskConfig,
    raw_rows: Vec<Map<String, Value>>,
    complete: impl Fn(usize, &Sample) -> String,
) {
    let task = build_task(&cfg).unwrap();
    let samples = task.load(Split::Test).unwrap();
    assert_eq!(samples.len(), raw_rows.len());
    let dir = tempfile::tempdir().unwrap();
    let mut gold_form = Vec::new();
    let mut raw_form = Vec::new();
    for (i, (s, raw)) in samples.iter().zip(raw_rows).enumerate() {
        let completion = complete(i, s);
        gold_form.push(json!({ "id": s.id, "completion": completion, "gold": s.gold }));
        let mut r = raw;
        r.insert("completion".into(), Value::String(completion));
        // The sample id travels with the row (it seeds option shuffles, as in answers.jsonl).
        r.entry("id").or_insert_with(|| Value::String(s.id.clone()));
        raw_form.push(Value::Object(r));
    }
    let (a, sa) = grade_rows(&cfg, dir.path(), "answers.jsonl", &gold_form);
    let (b, sb) = grade_rows(&cfg, dir.path(), "raw.jsonl", &raw_form);
    assert_eq!(a, b, "{}: rewards differ", cfg.name);
    assert_eq!(sa, sb);
    let right = a.iter().filter(|r| **r == 1.0).count();
    assert!(right > 0 && right < a.len(), "{}: {a:?}", cfg.name);
}

fn cfg(name: &str, test: &Path, n: usize) -> TaskConfig {
    let mut c = TaskConfig::named(name);
    c.test_path = Some(test.to_path_buf());
    c.limit = Some(n);
    c
}

fn raw(path: &Path, n: usize) -> Vec<Map<String, Value>> {
    data::read_rows(path)
        .unwrap()
        .into_iter()
        .take(n)
        .map(|r| r.value)
        .collect()
}

#[test]
fn gsm8k_raw_rows() {
    let p = data_file("gsm8k/test.jsonl");
    check_same_rewards(cfg("gsm8k", &p, 12), raw(&p, 12), |i, s| {
        if i % 3 == 0 {
            "I think \\boxed{-1}".into()
        } else {
            s.target.clone().unwrap()
        }
    });
}

#[test]
fn multiple_choice_raw_rows() {
    let p = data_file("aqua/dev.json");
    // The answer is a letter after the seeded shuffle: only the same id and question reproduce it.
    check_same_rewards(cfg("aqua", &p, 12), raw(&p, 12), |i, s| {
        let letter = s.gold["answer"].as_str().unwrap();
        if i % 4 == 1 {
            let wrong = if letter == "A" { "B" } else { "A" };
            format!("so \\boxed{{{wrong}}}")
        } else {
            format!("so \\boxed{{{letter}}}")
        }
    });
}

#[test]
fn open_qa_raw_rows() {
    let p = data_file("triviaqa/topics.dpr.trivia.test.txt");
    check_same_rewards(cfg("triviaqa", &p, 12), raw(&p, 12), |i, s| {
        let first = s.gold["answers"][0].as_str().unwrap();
        if i % 3 == 2 {
            "<answer> certainly not this </answer>".into()
        } else {
            format!("<think>x</think><answer> {first} </answer>")
        }
    });
}

#[test]
fn code_raw_rows() {
    let p = data_file("humaneval/HumanEval.jsonl.gz");
    check_same_rewards(cfg("humaneval", &p, 4), raw(&p, 4), |i, s| {
        if i == 1 {
            "```python\ndef nothing():\n    return None\n```".into()
        } else {
            format!("```python\n{}\n```", s.target.clone().unwrap())
        }
    });
}

/// A KodCode row as the hub ships it (`question`, `solution`, `test`, `test_info`), raw and as gold.
#[test]
fn kodcode_raw_rows() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("kodcode.jsonl");
    let row = json!({
        "question_id": "Leetcode_1",
        "question": "Write a function add(a, b) that returns a + b.",
        "solution": "def add(a, b):\n    return a + b",
        "test": "from solution import add\n\ndef test_add():\n    assert add(1, 2) == 3\n    assert add(-1, 1) == 0\n",
        "test_info": [{"function_name": "add", "parameter_list": "(a, b)",
                       "function_declaration": "def add(a, b):", "docstring": null}],
    });
    std::fs::write(&p, format!("{row}\n{row}\n")).unwrap();
    let rows = raw(&p, 2);
    check_same_rewards(cfg("kodcode", &p, 2), rows, |i, s| {
        if i == 0 {
            s.target.clone().unwrap()
        } else {
            "def add(a, b):\n    return a - b".into()
        }
    });
}
