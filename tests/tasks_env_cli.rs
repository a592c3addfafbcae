//! The search environment with a mock retriever, and `memgen grade` end to end.

use std::process::Command;
use std::sync::{Arc, Mutex};

use memgen::retrieval::{Passage, Retriever};
use memgen::tasks::search::{
    Action, EnvConfig, Episode, SearchEnv, INVALID_ACTION_REPLY, NO_PAGES,
};
use memgen::tasks::{build_task, render_chatml, Split, TaskConfig};
use serde_json::{json, Value};

/// Answers every query with `topk` passages naming the query; fails on the query "boom".
#[derive(Default)]
struct Mock {
    calls: Mutex<Vec<(Vec<String>, usize)>>,
}

impl Retriever for Mock {
    fn retrieve(&self, queries: &[String], topk: usize) -> anyhow::Result<Vec<Vec<Passage>>> {
        self.calls.lock().unwrap().push((queries.to_vec(), topk));
        if queries.iter().any(|q| q == "boom") {
            anyhow::bail!("connection refused");
        }
        Ok(queries
            .iter()
            .map(|q| {
                (0..topk)
                    .map(|i| Passage {
                        id: i.to_string(),
                        contents: format!("\"{q} {i}\"\nAbout {q}."),
                        score: Some(1.0),
                    })
                    .collect()
            })
            .collect())
    }
}

fn env(tags: bool) -> (Arc<Mock>, SearchEnv) {
    let mock = Arc::new(Mock::default());
    let mut cfg = TaskConfig::named("triviaqa");
    cfg.use_information_tags = tags;
    let env = SearchEnv::new(mock.clone(), EnvConfig::from_task(&cfg));
    (mock, env)
}

#[test]
fn search_then_answer() {
    let (mock, env) = env(false);
    let task = build_task(&TaskConfig::named("triviaqa")).unwrap();
    let prompt = vec![
        memgen::tasks::Message::system(memgen::tasks::qa::SEARCH_SYSTEM_PROMPT),
        memgen::tasks::Message::user("Who was the man behind The Chipmunks?"),
    ];
    let mut ep = Episode::new(prompt);
    let step = env.step("<think>not sure</think>\n<search> chipmunks creator\nignored </search> trailing <answer>x</answer>");
    assert_eq!(step.action, Action::Search("chipmunks creator".into()));
    assert_eq!(
        step.response,
        "<think>not sure</think>\n<search> chipmunks creator\nignored </search>"
    );
    assert_eq!(
        step.observation.as_deref(),
        Some("Doc 1(Title: \"chipmunks creator 0\") About chipmunks creator.\nDoc 2(Title: \"chipmunks creator 1\") About chipmunks creator.\nDoc 3(Title: \"chipmunks creator 2\") About chipmunks creator.\n")
    );
    assert_eq!(
        mock.calls.lock().unwrap()[0],
        (vec!["chipmunks creator".to_string()], 3)
    );
    ep.push(step, 5);
    assert!(!ep.done);
    assert_eq!(ep.messages.len(), 4);
    assert_eq!(ep.messages[3].role, "user");

    let step = env.step("Hmm.");
    assert_eq!(step.action, Action::Invalid);
    assert_eq!(step.observation.as_deref(), Some(INVALID_ACTION_REPLY));
    ep.push(step, 5);

    let step = env.step("<answer> David Seville </answer> and more text");
    assert_eq!(step.action, Action::Answer("David Seville".into()));
    assert_eq!(step.observation, None);
    ep.push(step, 5);
    assert!(ep.done);
    assert_eq!(ep.answer.as_deref(), Some("David Seville"));
    assert_eq!(ep.turns, 3);
    let rendered = render_chatml(&ep.messages, false);
    assert!(
        rendered.ends_with("<|im_start|>assistant\n<answer> David Seville </answer><|im_end|>\n")
    );

    let gold = json!({"answers": ["David Seville"]});
    let text = ep.assistant_text();
    let g = task.grade(&text, &gold);
    assert_eq!((g.reward, g.metrics["em"]), (1.0, 1.0));
    assert_eq!(task.reward(&text, &gold), 1.0);
    assert_eq!(task.reward("<answer>Alvin</answer>", &gold), 0.5);
    assert_eq!(task.reward("no answer", &gold), 0.0);
}

#[test]
fn errors_tags_truncation_and_turn_cap() {
    let (mock, env) = env(true);
    let step = env.step("<search>boom</search>");
    assert_eq!(
        step.observation.as_deref(),
        Some(format!("<information>{NO_PAGES}</information>").as_str())
    );
    let s = env.step("<search> paris </search>");
    let obs = s.observation.unwrap();
    assert!(obs.starts_with("<information>Doc 1(Title: \"paris 0\") About paris."));
    assert!(obs.ends_with("About paris.</information>"));

    // A batch makes one retrieval call.
    mock.calls.lock().unwrap().clear();
    let steps = env.step_batch(&[
        "<search>a</search>",
        "<answer>b</answer>",
        "<search>c</search>",
    ]);
    assert_eq!(mock.calls.lock().unwrap().len(), 1);
    assert_eq!(mock.calls.lock().unwrap()[0].0, vec!["a", "c"]);
    assert!(steps[1].observation.is_none());

    // The truncation callback sees every observation.
    let mut cfg = TaskConfig::named("triviaqa");
    cfg.topk = 1;
    let trunc =
        EnvConfig::from_task(&cfg).with_truncate(Arc::new(|s: &str| format!("{}...", &s[..10])));
    let env2 = SearchEnv::new(mock.clone(), trunc);
    assert_eq!(
        env2.step("<search>q</search>").observation.as_deref(),
        Some("Doc 1(Titl...")
    );

    // At most max_turns turns.
    let mut ep = Episode::new(vec![]);
    for _ in 0..7 {
        let s = env.step("<search>again</search>");
        ep.push(s, 5);
    }
    assert!(ep.done);
    assert_eq!(ep.turns, 5);
    assert_eq!(
        ep.messages.iter().filter(|m| m.role == "assistant").count(),
        5
    );
    assert_eq!(ep.messages.last().unwrap().role, "assistant");
    assert_eq!(ep.answer, None);
}

fn memgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_memgen"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn grade_command_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("answers.jsonl");
    let output = dir.path().join("graded.jsonl");
    let rows = [
        json!({"id": "a", "prompt": "p", "completion": "so \\boxed{72}", "gold": {"answer": "72"}, "note": "kept"}),
        json!({"id": "b", "prompt": "p", "completion": "it is 1,000 apples", "gold": {"answer": "1000"}}),
        json!({"id": "c", "completion": "\\boxed{\\frac{1}{2}}", "answer": "0.5"}),
        json!({"id": "d", "completion": "\\boxed{5}", "gold": {"answer": 6}}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&input, text).unwrap();
    let o = memgen(&[
        "grade",
        "--task",
        "gsm8k",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["task"], "gsm8k");
    assert_eq!(summary["count"], 4.0);
    assert_eq!(summary["accuracy"], 0.5);
    assert_eq!(summary["lenient_accuracy"], 0.5); // a and b (c has no plain number)
    let graded: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(graded.len(), 4);
    assert_eq!(graded[0]["extracted"], "72");
    assert_eq!(graded[0]["reward"], 1.0);
    assert_eq!(graded[0]["note"], "kept");
    assert_eq!(graded[0]["metrics"]["accuracy"], 1.0);
    assert_eq!(graded[1]["extracted"], Value::Null);
    assert_eq!(graded[2]["reward"], 1.0);
    // The input is untouched when --output is given.
    assert!(!std::fs::read_to_string(&input).unwrap().contains("reward"));

    // Code through the same sandbox, options passed through.
    let code_in = dir.path().join("code.jsonl");
    let gold = json!({"entry_point": "add", "test": "from solution import add\ndef test_add():\n    assert add(1, 2) == 3\n"});
    let rows = [
        json!({"id": "ok", "completion": "```python\ndef add(a, b):\n    return a + b\n```", "gold": gold}),
        json!({"id": "bad", "completion": "```python\ndef add(a, b):\n    return a - b\n```", "gold": gold}),
        json!({"id": "hang", "completion": "```python\ndef add(a, b):\n    while True: pass\n```", "gold": gold}),
    ];
    std::fs::write(
        &code_in,
        rows.iter().map(|r| format!("{r}\n")).collect::<String>(),
    )
    .unwrap();
    let o = memgen(&[
        "grade",
        "--task",
        "kodcode",
        "--input",
        code_in.to_str().unwrap(),
        "--options",
        "timeout_secs",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        (summary["accuracy"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9,
        "{summary}"
    );
    assert!(
        (summary["timeout"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9,
        "{summary}"
    );
    // Rewritten in place.
    assert!(std::fs::read_to_string(&code_in)
        .unwrap()
        .contains("\"reward\""));

    // Triviaqa: eval score, em, and the GRPO reward beside them.
    let qa_in = dir.path().join("qa.jsonl");
    std::fs::write(
        &qa_in,
        format!(
            "{}\n",
            json!({"completion": "<answer>Sunset Blvd.</answer>", "answers": ["Sunset Blvd", "x"]})
        ),
    )
    .unwrap();
    let o = memgen(&[
        "grade",
        "--task",
        "triviaqa",
        "--input",
        qa_in.to_str().unwrap(),
    ]);
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (summary["accuracy"].as_f64(), summary["em"].as_f64()),
        (Some(1.0), Some(1.0))
    );
}

#[test]
fn grade_command_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"completion\": \"x\", \"gold\": {\"answer\": \"1\"}}\n{\"gold\": {}}\n",
    )
    .unwrap();
    let check = |args: &[&str], needle: &str| {
        let o = memgen(args);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    let p = input.to_str().unwrap();
    check(&["grade", "--task", "gsm8k", "--input", p], "in.jsonl:2");
    check(&["grade", "--task", "nope", "--input", p], "unknown task");
    check(
        &["grade", "--task", "gsm8k", "--input", "/no/such.jsonl"],
        "/no/such.jsonl",
    );
    check(
        &[
            "grade",
            "--task",
            "gsm8k",
            "--input",
            p,
            "--options",
            "sed",
            "1",
        ],
        "sed",
    );
    check(
        &[
            "grade",
            "--task",
            "gsm8k",
            "--input",
            p,
            "--options",
            "seed",
        ],
        "pairs",
    );
    std::fs::write(
        &input,
        "{\"completion\": \"x\", \"gold\": {\"answr\": \"1\"}}\n",
    )
    .unwrap();
    check(
        &["grade", "--task", "gsm8k", "--input", p],
        "missing field `answer`",
    );
    // Loading data is separate from grading: a gsm8k task without data still grades.
    assert!(build_task(&TaskConfig::named("gsm8k"))
        .unwrap()
        .load(Split::Train)
        .is_err());
}
