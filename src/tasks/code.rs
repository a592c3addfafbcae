//! Code tasks: KodCode rows (`question`, `solution`, pytest-style `test`, `test_info`) and
//! HumanEval rows (`prompt`, `canonical_solution`, `test` with `check(candidate)`, `entry_point`).
//! Grading runs the extracted functions and the tests in the [`Sandbox`].

use serde_json::{json, Value};

use super::data::{self, field_str, RawRow};
use super::sandbox::{Limits, Sandbox};
use super::{gold_str, Graded, Message, Result, Sample, Split, Task, TaskConfig};

/// The exact MemGen code instruction.
pub const CODE_PROMPT: &str =
    "Write an efficient and correct Python function to solve the following problem.";

pub fn code_prompt(question: &str) -> String {
    format!("{CODE_PROMPT}Question: {question}\n")
}

/// The code in a completion: the ```python fenced blocks joined (any ``` block when none is
/// marked python; the whole completion when there is no fence).
pub fn fenced_code(completion: &str) -> String {
    let mut python = Vec::new();
    let mut any = Vec::new();
    let mut rest = completion;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        let (lang, body) = match after.find('\n') {
            Some(nl) => (after[..nl].trim(), &after[nl + 1..]),
            None => break,
        };
        let (block, next) = match body.find("```") {
            Some(close) => (&body[..close], &body[close + 3..]),
            None => (body, ""),
        };
        let lang = lang.to_ascii_lowercase();
        if lang == "python" || lang == "py" || lang == "python3" {
            python.push(block);
        }
        any.push(block);
        rest = next;
    }
    if !python.is_empty() {
        python.join("\n")
    } else if !any.is_empty() {
        any.join("\n")
    } else {
        completion.to_string()
    }
}

/// Keep the import lines and the top-level functions (with their decorators) of `code`, in order.
/// Returns the kept code and the names of the functions, in order.
pub fn keep_imports_and_functions(code: &str) -> (String, Vec<String>) {
    let lines: Vec<&str> = code.lines().collect();
    let mut out: Vec<&str> = Vec::new();
    let mut names = Vec::new();
    let mut i = 0;
    let top = |l: &str| !l.is_empty() && !l.starts_with([' ', '\t']);
    while i < lines.len() {
        let line = lines[i];
        if !top(line) {
            i += 1;
            continue;
        }
        if line.starts_with("import ") || line.starts_with("from ") {
            // Keep continuation lines of a parenthesised or backslashed import.
            let mut depth: i32 = 0;
            loop {
                let l = lines[i];
                out.push(l);
                depth += l.matches('(').count() as i32 - l.matches(')').count() as i32;
                i += 1;
                if (depth <= 0 && !l.trim_end().ends_with('\\')) || i >= lines.len() {
                    break;
                }
            }
            continue;
        }
        let is_decorator = line.starts_with('@');
        if is_decorator || def_name(line).is_some() {
            // Decorators, then the def line, then its indented body (blank lines included).
            let start = i;
            while i < lines.len() && lines[i].starts_with('@') {
                i += 1;
            }
            let Some(name) = lines.get(i).and_then(|l| def_name(l)) else {
                // A decorator on a class or something else: skip it.
                i = start + 1;
                continue;
            };
            names.push(name);
            i += 1;
            // A multi-line signature: continue until the parentheses close.
            let mut depth: i32 = paren_depth(lines[i - 1]);
            while depth > 0 && i < lines.len() {
                depth += paren_depth(lines[i]);
                i += 1;
            }
            while i < lines.len() && !top(lines[i]) {
                i += 1;
            }
            // Trailing blank lines belong to the gap, not the function.
            let mut end = i;
            while end > start && lines[end - 1].trim().is_empty() {
                end -= 1;
            }
            out.extend_from_slice(&lines[start..end]);
            out.push("");
            continue;
        }
        i += 1;
    }
    (out.join("\n"), names)
}

fn paren_depth(l: &str) -> i32 {
    l.matches(['(', '[']).count() as i32 - l.matches([')', ']']).count() as i32
}

/// The name in a top-level `def name(` / `async def name(` line.
fn def_name(line: &str) -> Option<String> {
    let rest = line
        .strip_prefix("def ")
        .or_else(|| line.strip_prefix("async def "))?;
    let name: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// The solution module built from a completion: imports and top-level functions; when no
/// function carries the expected name, the first function is bound to it too (a rename that keeps
/// recursive calls working).
pub fn solution_code(completion: &str, entry_point: &str) -> (String, Vec<String>) {
    let (mut code, names) = keep_imports_and_functions(&fenced_code(completion));
    if let Some(first) = names.first() {
        if !entry_point.is_empty() && !names.iter().any(|n| n == entry_point) {
            code.push_str(&format!("\n{entry_point} = {first}\n"));
        }
    }
    (code, names)
}

/// The test file without its `from solution import …` lines (`import solution` still works: the
/// solution is also written as `solution.py`).
pub fn clean_tests(test: &str) -> String {
    test.lines()
        .filter(|l| {
            let t = l.trim_start();
            !t.starts_with("from solution import")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A pytest-style test file for a HumanEval row: its `check` plus `test_check` calling it.
pub fn humaneval_tests(test: &str, entry_point: &str) -> String {
    format!("{test}\n\n\ndef test_check():\n    check({entry_point})\n")
}

/// Runs every `test_*` function, in definition order; any exception fails the run.
const RUNNER: &str = r#"

def __memgen_run_tests():
    import sys
    tests = [(n, f) for n, f in list(globals().items()) if n.startswith("test_") and callable(f)]
    if not tests:
        print("no test_* functions", file=sys.stderr)
        sys.exit(2)
    for name, f in tests:
        f()
    print("MEMGEN_ALL_PASSED")

__memgen_run_tests()
"#;

/// The script run in the sandbox: the solution, the tests, then the runner.
pub fn test_script(solution: &str, tests: &str) -> String {
    format!(
        "{solution}\n\n# ---- tests ----\n{}\n{RUNNER}",
        clean_tests(tests)
    )
}

/// Grade a code completion against `gold` (`entry_point`, `test`): 1 iff every test passes in time.
pub fn grade_code(sandbox: &Sandbox, completion: &str, gold: &Value) -> Graded {
    let (Ok(entry), Ok(tests)) = (gold_str(gold, "entry_point"), gold_str(gold, "test")) else {
        return Graded::new(0.0, None);
    };
    let (code, names) = solution_code(completion, &entry);
    if names.is_empty() {
        return Graded::new(0.0, Some(code)).with("timeout", 0.0);
    }
    let script = test_script(&code, &tests);
    match sandbox.run(&script, &[("solution.py", &code)]) {
        Ok(o) => {
            let passed = o.success() && o.stdout.contains("MEMGEN_ALL_PASSED");
            let timeout = matches!(o.status, super::sandbox::Status::Timeout);
            Graded::new(if passed { 1.0 } else { 0.0 }, Some(code))
                .with("timeout", if timeout { 1.0 } else { 0.0 })
        }
        Err(e) => {
            tracing::warn!("sandbox failed: {e}");
            Graded::new(0.0, Some(code))
        }
    }
}

pub struct Code {
    cfg: TaskConfig,
    sandbox: Sandbox,
}

impl Code {
    pub fn new(cfg: TaskConfig) -> Result<Self> {
        let sandbox = Sandbox::new(
            &cfg.python,
            Limits::with_timeout(cfg.timeout_secs, cfg.memory_mb),
        )?;
        Ok(Self { cfg, sandbox })
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    fn build(&self, row: &RawRow) -> std::result::Result<Sample, String> {
        let v = &row.value;
        let id_col = self.cfg.column("id", &["task_id", "question_id", "id"], v);
        let id = field_str(row, id_col).unwrap_or_else(|_| row.default_id.clone());
        let test_col = self.cfg.column("test", &["test"], v);
        let test = field_str(row, test_col)?;
        let humaneval = v.contains_key("canonical_solution") || self.cfg.name == "humaneval";
        if humaneval {
            let q_col = self.cfg.column("question", &["prompt"], v);
            let prompt = field_str(row, q_col)?;
            let e_col = self.cfg.column("entry_point", &["entry_point"], v);
            let entry = field_str(row, e_col)?;
            let s_col = self.cfg.column("solution", &["canonical_solution"], v);
            let target = field_str(row, s_col)
                .ok()
                .map(|s| format!("{prompt}{s}").trim().to_string());
            return Ok(Sample {
                id,
                messages: vec![Message::user(code_prompt(prompt.trim()))],
                target,
                gold: json!({ "entry_point": entry, "test": humaneval_tests(&test, &entry) }),
            });
        }
        let q_col = self.cfg.column("question", &["question"], v);
        let question = field_str(row, q_col)?;
        let s_col = self.cfg.column("solution", &["solution"], v);
        let solution = field_str(row, s_col).ok().map(|s| s.trim().to_string());
        let entry = kodcode_entry_point(row, &self.cfg, solution.as_deref())?;
        Ok(Sample {
            id,
            messages: vec![Message::user(code_prompt(question.trim()))],
            target: solution,
            gold: json!({ "entry_point": entry, "test": test.trim() }),
        })
    }
}

/// KodCode's expected function: `test_info[0].function_name`, else an `entry_point` column, else
/// the name imported by `from solution import`, else the solution's first function.
fn kodcode_entry_point(
    row: &RawRow,
    cfg: &TaskConfig,
    solution: Option<&str>,
) -> std::result::Result<String, String> {
    let v = &row.value;
    let info_col = cfg.column("test_info", &["test_info"], v);
    let info = match v.get(info_col) {
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).ok(),
        Some(other) => Some(other.clone()),
        None => None,
    };
    if let Some(name) = info
        .as_ref()
        .and_then(|i| i.get(0))
        .and_then(|i| i.get("function_name"))
        .and_then(Value::as_str)
    {
        return Ok(name.to_string());
    }
    let e_col = cfg.column("entry_point", &["entry_point"], v);
    if let Ok(e) = field_str(row, e_col) {
        return Ok(e);
    }
    let test = v.get("test").and_then(Value::as_str).unwrap_or_default();
    for l in test.lines() {
        if let Some(rest) = l.trim_start().strip_prefix("from solution import ") {
            let name: String = rest
                .trim_start_matches('(')
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                return Ok(name);
            }
        }
    }
    if let Some(first) = solution.and_then(|s| keep_imports_and_functions(s).1.into_iter().next()) {
        return Ok(first);
    }
    Err("cannot tell the expected function name (no `test_info`, `entry_point` or `from solution import`)".into())
}

impl Task for Code {
    fn name(&self) -> &str {
        &self.cfg.name
    }
    fn load(&self, split: Split) -> Result<Vec<Sample>> {
        data::load_split(&self.cfg, split, |_, row| self.build(row))
    }
    fn grade(&self, completion: &str, gold: &Value) -> Graded {
        grade_code(&self.sandbox, completion, gold)
    }
    fn gold_from_row(&self, row: &RawRow) -> std::result::Result<Value, String> {
        self.build(row).map(|s| s.gold)
    }
    fn check_gold(&self, gold: &Value) -> Result<()> {
        gold_str(gold, "entry_point")?;
        gold_str(gold, "test")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction() {
        let c = "Here:\n```python\nimport math\nfrom typing import List\n\ndef helper(x):\n    return x\n\n\ndef f(a,\n      b):\n    return math.floor(a) + b\n\nprint(f(1, 2))\nif __name__ == '__main__':\n    f(1, 2)\nclass A:\n    pass\n```\nDone.";
        let (code, names) = keep_imports_and_functions(&fenced_code(c));
        assert_eq!(names, vec!["helper", "f"]);
        assert!(code.contains("import math\nfrom typing import List\n"));
        assert!(code.contains("def f(a,\n      b):\n    return math.floor(a) + b"));
        assert!(!code.contains("print(") && !code.contains("__main__") && !code.contains("class"));
        // Entry point present: nothing renamed; absent: the first function is bound to it.
        let (code, _) = solution_code(c, "f");
        assert!(!code.contains("f = helper"));
        let (code, _) = solution_code(c, "g");
        assert!(code.ends_with("\ng = helper\n"), "{code}");
        // No fence: the whole completion.
        let (_, names) = keep_imports_and_functions(&fenced_code("def g():\n    return 1\n"));
        assert_eq!(names, vec!["g"]);
        // Decorators are kept with their function.
        let (code, names) =
            keep_imports_and_functions("@functools.lru_cache(None)\ndef fib(n):\n    return n\n");
        assert_eq!(names, vec!["fib"]);
        assert!(code.starts_with("@functools.lru_cache(None)\ndef fib"));
        // Two python blocks are joined; an unmarked block is used when no python block exists.
        assert_eq!(fenced_code("```\nx\n```"), "x\n");
        assert_eq!(fenced_code("```py\na\n```\n```python\nb\n```"), "a\n\nb\n");
        let t =
            clean_tests("from solution import f\nimport solution\ndef test_a():\n    assert f()");
        assert_eq!(t, "import solution\ndef test_a():\n    assert f()");
    }
}
