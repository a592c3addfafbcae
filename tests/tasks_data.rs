//! Tasks on the real data in ../shared/data: loading, prompts, targets and graders.

use std::path::PathBuf;

use memgen::tasks::{build_task, render_chatml, Split, TaskConfig};
use rayon::prelude::*;
use serde_json::json;

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel)
}

fn cfg(name: &str, train: Option<&str>, test: Option<&str>) -> TaskConfig {
    let mut c = TaskConfig::named(name);
    c.train_path = train.map(data);
    c.test_path = test.map(data);
    c
}

#[test]
fn gsm8k_real_rows() {
    let c = cfg("gsm8k", Some("gsm8k/train.jsonl"), Some("gsm8k/test.jsonl"));
    let task = build_task(&c).unwrap();
    let train = task.load(Split::Train).unwrap();
    let valid = task.load(Split::Valid).unwrap();
    let test = task.load(Split::Test).unwrap();
    assert_eq!((train.len(), valid.len(), test.len()), (6725, 748, 1319));
    // Seeded: the same split every time, and disjoint.
    let again = task.load(Split::Valid).unwrap();
    assert_eq!(valid, again);
    let train_ids: std::collections::HashSet<_> = train.iter().map(|s| &s.id).collect();
    assert!(valid.iter().all(|s| !train_ids.contains(&s.id)));

    // First row of train.jsonl (Natalia's clips).
    let first = train
        .iter()
        .chain(valid.iter())
        .find(|s| s.id == "train:1")
        .unwrap();
    assert_eq!(
        first.messages[0].content,
        "Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER inside \\boxed{}.Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?\n"
    );
    assert_eq!(
        first.target.as_deref(),
        Some("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\\boxed{72}")
    );
    assert_eq!(first.gold, json!({"answer": "72"}));
    assert_eq!(
        render_chatml(&first.messages, true),
        format!(
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            first.messages[0].content
        )
    );
    // Every target grades as correct against its own gold.
    for s in train.iter().chain(&test) {
        let g = task.grade(s.target.as_deref().unwrap(), &s.gold);
        assert_eq!(g.reward, 1.0, "{}: {:?}", s.id, s.target);
    }
    let mut limited = c.clone();
    limited.limit = Some(5);
    assert_eq!(
        build_task(&limited)
            .unwrap()
            .load(Split::Test)
            .unwrap()
            .len(),
        5
    );
}

#[test]
fn bad_rows_are_located() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.jsonl");
    std::fs::write(
        &p,
        "{\"question\": \"q\", \"answer\": \"a\\n#### 1\"}\n{\"question\": \"q2\"}\n",
    )
    .unwrap();
    let mut c = TaskConfig::named("gsm8k");
    c.test_path = Some(p.clone());
    let e = build_task(&c)
        .unwrap()
        .load(Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.jsonl:2") && e.contains("missing field `answer`"),
        "{e}"
    );
    c.skip_bad_rows = true;
    assert_eq!(build_task(&c).unwrap().load(Split::Test).unwrap().len(), 1);
    // Remapped columns.
    std::fs::write(&p, "{\"problem\": \"q\", \"sol\": \"a\\n#### 1\"}\n").unwrap();
    c.skip_bad_rows = false;
    c.fields.insert("answer".into(), "sol".into());
    let s = build_task(&c).unwrap().load(Split::Test).unwrap();
    assert!(s[0].messages[0].content.ends_with("Question: q\n"));
    // No test path: a clear error.
    c.test_path = None;
    let e = build_task(&c)
        .unwrap()
        .load(Split::Test)
        .unwrap_err()
        .to_string();
    assert!(e.contains("test_path"), "{e}");
}

#[test]
fn aqua_real_rows() {
    let c = cfg("aqua", Some("aqua/dev.json"), Some("aqua/test.json"));
    let task = build_task(&c).unwrap();
    let test = task.load(Split::Test).unwrap();
    assert_eq!(test.len(), 254);
    let train = task.load(Split::Train).unwrap();
    assert_eq!(train.len(), 228);
    let s = &test[0];
    let p = &s.messages[0].content;
    assert!(p.starts_with("Solve the problem with proper reasoning, and make sure to put the FINAL CHOICE inside \\boxed{}.Question: "));
    assert!(p.contains("\n\nPlease choose one of the following options:\nA. "));
    assert!(p.contains("\nE. ") && p.ends_with('\n'));
    for s in test.iter().chain(&train) {
        let t = s.target.as_deref().unwrap();
        assert!(t.contains("\n\nTherefore, the final answer is \\boxed{"));
        assert_eq!(task.grade(t, &s.gold).reward, 1.0);
        assert_eq!(task.grade("\\boxed{Z}", &s.gold).reward, 0.0);
    }
    // Shuffled: the correct letters spread over all five.
    let letters: std::collections::HashSet<String> = test
        .iter()
        .map(|s| s.gold["answer"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(letters.len(), 5);
}

#[test]
fn open_qa_tsvs_parse_completely() {
    for (name, file, n) in [
        ("triviaqa", "triviaqa/topics.dpr.trivia.test.txt", 11313),
        ("triviaqa", "triviaqa/topics.dpr.trivia.dev.txt", 8837),
        ("nq", "nq_open/topics.dpr.nq.test.txt", 3610),
    ] {
        let c = cfg(name, None, Some(file));
        let task = build_task(&c).unwrap();
        let test = task.load(Split::Test).unwrap();
        assert_eq!(test.len(), n, "{file}");
        assert!(task.multi_turn());
    }
    let c = cfg(
        "triviaqa",
        None,
        Some("triviaqa/topics.dpr.trivia.test.txt"),
    );
    let test = build_task(&c).unwrap().load(Split::Test).unwrap();
    let s = &test[0];
    assert_eq!(s.messages[0].role, "system");
    assert!(s.messages[0].content.starts_with(
        "Answer the given question. You must conduct reasoning inside <think> and </think> first"
    ));
    assert_eq!(
        s.messages[1].content,
        "Who was the man behind The Chipmunks?"
    );
    assert_eq!(s.gold, json!({"answers": ["David Seville"]}));
    // CSV-quoted lines: doubled quotes in the question and the list.
    let crackers = test
        .iter()
        .find(|s| s.messages[1].content.contains("Animal Crackers"))
        .unwrap();
    assert_eq!(
        crackers.messages[1].content,
        "How many different animal shapes are there in the \"Animal Crackers\" cookie zoo?"
    );
    let hitler = test
        .iter()
        .find(|s| s.messages[1].content.contains("Bomb Plot"))
        .unwrap();
    let answers: Vec<String> = serde_json::from_value(hitler.gold["answers"].clone()).unwrap();
    assert!(answers.contains(&"Hitler's medical health".to_string()));
    assert!(answers.contains(&"Adolf Hitler".to_string()));
    assert_eq!(answers.len(), 60);
}

#[test]
fn humaneval_canonical_solutions_pass() {
    let c = cfg("humaneval", None, Some("humaneval/HumanEval.jsonl.gz"));
    let task = build_task(&c).unwrap();
    let test = task.load(Split::Test).unwrap();
    assert_eq!(test.len(), 164);
    let s = &test[0];
    assert_eq!(s.id, "HumanEval/0");
    assert!(s.messages[0].content.starts_with(
        "Write an efficient and correct Python function to solve the following problem.Question: from typing import List\n"
    ));
    // A handful of canonical solutions, fenced as a model would write them, pass.
    let picks = [0usize, 2, 10, 32, 38, 50, 100, 163];
    let results: Vec<(usize, f64)> = picks
        .par_iter()
        .map(|&i| {
            let s = &test[i];
            let completion = format!("Sure.\n```python\n{}\n```\n", s.target.as_deref().unwrap());
            (i, task.grade(&completion, &s.gold).reward)
        })
        .collect();
    for (i, r) in results {
        assert_eq!(r, 1.0, "{} should pass", test[i].id);
    }
    // A wrong solution fails; no code at all fails.
    let wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```";
    assert_eq!(task.grade(wrong, &test[0].gold).reward, 0.0);
    assert_eq!(task.grade("I don't know.", &test[0].gold).reward, 0.0);
    // A misnamed function is bound to the expected name.
    let renamed = test[2]
        .target
        .as_deref()
        .unwrap()
        .replace("def truncate_number", "def my_truncate");
    assert_eq!(task.grade(&renamed, &test[2].gold).reward, 1.0);
}

#[test]
fn kodcode_style_rows() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("kod.jsonl");
    let row = json!({
        "question": "Add two numbers.",
        "solution": "def add(a, b):\n    return a + b",
        "test": "from solution import add\n\ndef test_add():\n    assert add(1, 2) == 3\n\ndef test_neg():\n    assert add(-1, 1) == 0\n",
        "test_info": [{"function_name": "add", "parameter_list": "(a, b)"}]
    });
    std::fs::write(&p, format!("{row}\n")).unwrap();
    let mut c = TaskConfig::named("kodcode");
    c.test_path = Some(p);
    let task = build_task(&c).unwrap();
    let s = &task.load(Split::Test).unwrap()[0];
    assert_eq!(
        s.messages[0].content,
        "Write an efficient and correct Python function to solve the following problem.Question: Add two numbers.\n"
    );
    assert_eq!(s.gold["entry_point"], "add");
    assert_eq!(
        task.grade(s.target.as_deref().unwrap(), &s.gold).reward,
        1.0
    );
    let half = "```python\ndef plus(a, b):\n    return a + b if a > 0 else 1\n```";
    assert_eq!(task.grade(half, &s.gold).reward, 0.0);
    let renamed = "```python\nimport math\n\ndef plus(a, b):\n    return int(math.fsum([a, b]))\n\nprint(plus(1, 1))\n```";
    assert_eq!(task.grade(renamed, &s.gold).reward, 1.0);
}

#[test]
fn arith_splits() {
    let mut c = TaskConfig::named("arith");
    c.train_size = 3000;
    c.valid_size = 200;
    c.test_size = 300;
    let task = build_task(&c).unwrap();
    let train = task.load(Split::Train).unwrap();
    let valid = task.load(Split::Valid).unwrap();
    let test = task.load(Split::Test).unwrap();
    assert_eq!((train.len(), valid.len(), test.len()), (3000, 200, 300));
    // Deterministic, and the test set does not depend on the train size.
    assert_eq!(test, task.load(Split::Test).unwrap());
    let mut c2 = c.clone();
    c2.train_size = 10;
    assert_eq!(test, build_task(&c2).unwrap().load(Split::Test).unwrap());
    // Disjoint questions.
    let q = |v: &Vec<memgen::tasks::Sample>| -> std::collections::HashSet<String> {
        v.iter().map(|s| s.messages[0].content.clone()).collect()
    };
    let (a, b, t) = (q(&train), q(&valid), q(&test));
    assert_eq!(a.len(), 3000);
    assert!(a.is_disjoint(&b) && a.is_disjoint(&t) && b.is_disjoint(&t));
    // Same prompt template as gsm8k; targets grade 1.0.
    assert!(test[0].messages[0].content.starts_with(
        "Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER inside \\boxed{}.Question: "
    ));
    for s in train.iter().chain(&test) {
        assert_eq!(
            task.grade(s.target.as_deref().unwrap(), &s.gold).reward,
            1.0
        );
    }
    // A different seed gives different problems.
    let mut c3 = c.clone();
    c3.seed = 7;
    assert_ne!(test, build_task(&c3).unwrap().load(Split::Test).unwrap());
    println!(
        "{}\n{}",
        test[0].messages[0].content,
        test[0].target.as_deref().unwrap()
    );
}

/// The boxed-answer grader (gsm8k, arith, gpqa/aqua) against the original MemGen's
/// `compute_score` (`larm/data/utils/math_utils.py`: `first_boxed_only_string`, `remove_boxed`,
/// then the Hendrycks MATH `is_equiv` / `strip_string`). Each expected extraction and reward was
/// traced by hand through that Python: (completion, gold, extraction, reward).
#[test]
fn boxed_grader_matches_the_original() {
    use memgen::tasks::gsm8k::grade_boxed;
    let cases: &[(&str, &str, Option<&str>, f64)] = &[
        ("so \\boxed{18}.", "18", Some("18"), 1.0),
        // The first box counts, not the last.
        ("\\boxed{18} or \\boxed{19}", "18", Some("18"), 1.0),
        ("\\boxed{19} or \\boxed{18}", "18", Some("19"), 0.0),
        // `\fbox` is found, then `remove_boxed`'s assertion fails: 0.
        ("\\fbox{18}", "18", None, 0.0),
        ("\\boxed{{18}}", "18", Some("{18}"), 0.0),
        // Space form: to the next `$`; newlines do not end it.
        ("\\boxed 18", "18", Some("18"), 1.0),
        ("$\\boxed 18$.", "18", Some("18"), 1.0),
        ("\\boxed 18.\nDone", "18", Some("18.\nDone"), 0.0),
        ("\\boxed {18}", "18", Some("{18}"), 0.0),
        ("\\boxed{18} and \\boxed 19", "18", Some("19"), 0.0),
        // Units after `\text{ `, `\$`, `\%`, `\!`, `\left`/`\right` are dropped; bare `$` and `%`
        // are not.
        (
            "\\boxed{18\\text{ dollars}}",
            "18",
            Some("18\\text{ dollars}"),
            1.0,
        ),
        ("\\boxed{\\$18}", "18", Some("\\$18"), 1.0),
        ("\\boxed{$18}", "18", Some("$18"), 0.0),
        ("\\boxed{18\\%}", "18", Some("18\\%"), 1.0),
        ("\\boxed{18%}", "18", Some("18%"), 0.0),
        ("\\boxed{1\\!000}", "1000", Some("1\\!000"), 1.0),
        (
            "\\boxed{\\left(1,2\\right)}",
            "(1,2)",
            Some("\\left(1,2\\right)"),
            1.0,
        ),
        // No numeric tolerance: commas and trailing zeros or dots stay.
        ("\\boxed{1,000}", "1000", Some("1,000"), 0.0),
        ("\\boxed{18.0}", "18", Some("18.0"), 0.0),
        ("\\boxed{18.}", "18", Some("18."), 0.0),
        // 0.5, \frac12, a/b, leading `.`, \sqrt2, short `x=` prefixes.
        ("\\boxed{0.5}", "\\frac{1}{2}", Some("0.5"), 1.0),
        ("\\boxed{\\frac12}", "0.5", Some("\\frac12"), 1.0),
        ("\\boxed{.5}", "0.5", Some(".5"), 1.0),
        ("\\boxed{3/4}", "\\frac{3}{4}", Some("3/4"), 1.0),
        ("\\boxed{\\sqrt2}", "\\sqrt{2}", Some("\\sqrt2"), 1.0),
        ("\\boxed{x = 18}", "18", Some("x = 18"), 1.0),
        ("\\boxed{abc=18}", "18", Some("abc=18"), 0.0),
        ("the answer is 18", "18", None, 0.0),
    ];
    for &(completion, gold, extraction, reward) in cases {
        let g = grade_boxed(completion, gold);
        assert_eq!(
            g.extracted.as_deref(),
            extraction,
            "extraction of {completion:?}"
        );
        assert_eq!(
            g.reward, reward,
            "reward of {completion:?} against {gold:?}"
        );
        assert_eq!(g.metrics["accuracy"], reward, "accuracy of {completion:?}");
    }
    // `lenient_accuracy` is memgen's own extra (last number, numeric tolerance), never the reward.
    let g = grade_boxed("so it is 1,000 dollars", "1000");
    assert_eq!((g.reward, g.metrics["lenient_accuracy"]), (0.0, 1.0));
}
