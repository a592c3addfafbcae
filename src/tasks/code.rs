//! Code tasks: KodCode rows (`question`, `solution`, pytest-style `test`, `test_info`) and
//! HumanEval rows (`prompt`, `canonical_solution`, `test` with `check(candidate)`, `entry_point`).
//! Grading runs the extracted functions and the tests in the [`Sandbox`].
//!
//! **What a reward of 1 means.** The completion's imports and top-level functions are kept (the
//! first function also bound to the entry point), the test file's `from solution import` lines
//! dropped, and every `test_*` function it defines is called in definition order; the reward is 1
//! iff the trusted harness's report arrived complete, says at least one test was collected and
//! every one passed, and the run did not time out. The verdict cannot be forged by the solution:
//! - the harness (`code_harness.py`, ours) never imports or execs the solution; the solution runs
//!   in a separate worker process (`code_worker.py`) and the tests' `solution` names are proxies
//!   calling it over two pipes, with arguments and results as plain data (`code_rpc.py`; never
//!   pickle). An exception crosses as the builtin of that name; mutated list/dict/set arguments
//!   are written back; generators are pulled lazily; callables passed either way are called back
//!   through the same pipes. A value with no plain-data encoding (an instance of a class, an
//!   object whose `__eq__` always says yes) is an error in that test;
//! - the verdict travels on fd 3, which only the harness holds (the worker gets the two RPC pipes
//!   and `/dev/null`), and the harness is non-dumpable before the worker starts, so the worker
//!   cannot ptrace it or open its `/proc/<pid>/fd` or `/mem`;
//! - stdout, stderr and exit codes are never read for the verdict: printing, exiting early with
//!   any status, killing itself or the harness, and patching builtins, `sys.exit` or anything in
//!   the worker can only make tests fail.
//!
//! Differences from running solution and tests in one module: test code cannot reach solution
//! globals other than its functions, objects of classes (the tests' own included) cannot be passed,
//! and `pytest` is not provided (it is not installed in the sandbox, as in the original's
//! environment, so tests importing it fail). Of the solution's imports, only unaliased ones that
//! shadow no builtin are made visible to the tests (an alias could redefine what a test computes).

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

/// The RPC codec, prepended to both the harness and the worker.
const RPC: &str = include_str!("code_rpc.py");
/// The trusted harness: loads the tests, calls the worker, reports on fd 3.
const HARNESS: &str = include_str!("code_harness.py");
/// The untrusted worker: runs the solution and answers calls.
const WORKER: &str = include_str!("code_worker.py");

/// The harness's report on fd 3: complete only when `done` is there.
#[derive(Debug, serde::Deserialize)]
struct Report {
    done: bool,
    collected: usize,
    /// `[test name, passed, error]` per test, in order.
    results: Vec<(String, bool, String)>,
}

/// Whether a harness report says every collected test ran and passed.
fn all_passed(report: &str) -> bool {
    let mut lines = report.lines().filter(|l| !l.trim().is_empty());
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return false;
    };
    match serde_json::from_str::<Report>(line) {
        Ok(r) => {
            r.done
                && r.collected >= 1
                && r.results.len() == r.collected
                && r.results.iter().all(|(_, ok, _)| *ok)
        }
        Err(_) => false,
    }
}

/// The plain `import …` / `from … import …` statements among the kept code's top-level lines.
fn import_statements(code: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut open: Option<(String, i32)> = None;
    for line in code.lines() {
        if let Some((mut stmt, depth)) = open.take() {
            stmt.push('\n');
            stmt.push_str(line);
            let depth = depth + line.matches('(').count() as i32 - line.matches(')').count() as i32;
            if depth > 0 || line.trim_end().ends_with('\\') {
                open = Some((stmt, depth));
            } else {
                out.push(stmt);
            }
            continue;
        }
        if line.starts_with("import ") || line.starts_with("from ") {
            let depth = line.matches('(').count() as i32 - line.matches(')').count() as i32;
            if depth > 0 || line.trim_end().ends_with('\\') {
                open = Some((line.to_string(), depth));
            } else {
                out.push(line.to_string());
            }
        }
    }
    out.extend(open.map(|(s, _)| s));
    out
}

/// Grade a code completion against `gold` (`entry_point`, `test`): 1 iff every test passes in time.
pub fn grade_code(sandbox: &Sandbox, completion: &str, gold: &Value) -> Graded {
    let (Ok(entry), Ok(tests)) = (gold_str(gold, "entry_point"), gold_str(gold, "test")) else {
        return Graded::new(0.0, None);
    };
    let (code, mut names) = solution_code(completion, &entry);
    if names.is_empty() {
        return Graded::new(0.0, Some(code)).with("timeout", 0.0);
    }
    if !entry.is_empty() && !names.contains(&entry) {
        names.push(entry.clone());
    }
    let harness = format!("{RPC}\n{HARNESS}");
    let worker = format!("{RPC}\n{WORKER}");
    let tests = clean_tests(&tests);
    let names = Value::from(names).to_string();
    let imports = Value::from(import_statements(&code)).to_string();
    let files = [
        ("worker.py", worker.as_str()),
        ("solution.py", code.as_str()),
        ("tests.py", tests.as_str()),
        ("names.json", names.as_str()),
        ("imports.json", imports.as_str()),
    ];
    match sandbox.run(&harness, &files) {
        Ok(o) => {
            let timeout = matches!(o.status, super::sandbox::Status::Timeout);
            // Only the harness's report counts; the worker's output and exit codes never do.
            let passed = !timeout
                && o.status != super::sandbox::Status::OutputLimit
                && all_passed(&o.report);
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
            cfg.allow_unsandboxed_code,
        )?;
        Ok(Self { cfg, sandbox })
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
