//! `arith`: built-in, offline, procedurally generated multi-step arithmetic word problems with
//! step-by-step solutions ending in `\boxed{N}`. Same prompt and grader as gsm8k.
//!
//! A problem starts someone with a number of items (a plain count, or bags of equal size), then
//! applies 2 operations (find or buy a few more, give a few away, double). The solution has one
//! line per step: the question's sentence again, then its equation. The numbers are deliberately
//! small. Probed one equation at a time, SmolLM2-135M got these right: times table ≤ 5 20/20,
//! teen + digit 20/20, doubling ≤ 12 20/20, ≤ 10 minus ≤ 4 19/20; but 10–60 + digit only 3/12
//! and 2-digit subtraction 4/20. So the task mostly measures whether a model *follows the
//! step-by-step format and finishes with `\boxed{}`* (the vanilla model scores 0), not the
//! reasoner's arithmetic; sums above 20 still cost some accuracy.
//! Splits come from different seeds and are made disjoint by construction (test first, then valid,
//! then train, each skipping questions already used), so the test set depends only on `seed` and
//! `test_size`.

use std::collections::HashSet;

use serde_json::{json, Value};

use super::data::SplitMix64;
use super::gsm8k::{boxed_gold, grade_boxed_gold, math_prompt};
use super::{Graded, Message, Result, Sample, Split, Task, TaskConfig};

const NAMES: &[(&str, bool)] = &[
    ("Tom", true),
    ("Anna", false),
    ("Ben", true),
    ("Lily", false),
    ("Sam", true),
    ("Mia", false),
    ("Jack", true),
    ("Emma", false),
    ("Leo", true),
    ("Sofia", false),
    ("Max", true),
    ("Nora", false),
    ("Omar", true),
    ("Zoe", false),
    ("Ravi", true),
    ("Grace", false),
];

const ITEMS: &[&str] = &[
    "apples", "marbles", "stickers", "books", "pencils", "cookies", "cards", "coins", "stamps",
    "shells", "balloons", "eggs", "candies", "beads", "toy cars", "oranges",
];

/// One generated problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub question: String,
    pub solution: String,
    pub answer: u64,
}

/// Generate one problem from `rng`.
pub fn generate(rng: &mut SplitMix64) -> Problem {
    let (name, male) = NAMES[rng.below(NAMES.len() as u64) as usize];
    let items = ITEMS[rng.below(ITEMS.len() as u64) as usize];
    let (he, his) = if male { ("he", "his") } else { ("she", "her") };
    let he_cap = capitalize(he);
    let steps = 2;
    // Each step is a question sentence and, for all but a plain start, its equation. The solution
    // repeats the sentence and appends the equation, one step per line: a format a small model
    // can imitate by copying from the question.
    let mut parts: Vec<(String, Option<String>)> = vec![];
    let mut cur;
    if rng.below(2) == 0 {
        cur = rng.range(3, 12);
        parts.push((format!("{name} has {cur} {items}."), None));
    } else {
        let k = rng.range(2, 5);
        let m = rng.range(2, 5);
        cur = k * m;
        parts.push((
            format!("{name} has {k} bags with {m} {items} in each bag."),
            Some(format!("{k} * {m} = {cur}")),
        ));
    }
    for _ in 0..steps {
        // Pick an operation that stays in the easy range; `add` always fits.
        loop {
            let (sentence, new, eq) = match rng.below(4) {
                0 | 1 => {
                    let b = rng.range(1, 9);
                    let verb = if rng.below(2) == 0 { "buys" } else { "finds" };
                    let new = cur + b;
                    (
                        format!("{he_cap} {verb} {b} more {items}."),
                        new,
                        format!("{cur} + {b} = {new}"),
                    )
                }
                2 => {
                    if !(3..=12).contains(&cur) {
                        continue;
                    }
                    let b = rng.range(1, 4.min(cur - 1));
                    let new = cur - b;
                    let sentence = if rng.below(2) == 0 {
                        format!("{he_cap} gives {b} {items} to a friend.")
                    } else {
                        format!("{he_cap} loses {b} of {his} {items}.")
                    };
                    (sentence, new, format!("{cur} - {b} = {new}"))
                }
                _ => {
                    if cur > 12 {
                        continue;
                    }
                    let new = cur * 2;
                    (
                        format!("Then the number of {items} {he} has doubles."),
                        new,
                        format!("{cur} * 2 = {new}"),
                    )
                }
            };
            parts.push((sentence, Some(eq)));
            cur = new;
            break;
        }
    }
    let mut q: Vec<String> = parts.iter().map(|(s, _)| s.clone()).collect();
    q.push(format!("How many {items} does {name} have now?"));
    let lines: Vec<String> = parts
        .iter()
        .map(|(s, eq)| match eq {
            Some(eq) => format!("{}, so {eq}.", s.trim_end_matches('.')),
            None => s.clone(),
        })
        .collect();
    Problem {
        question: q.join(" "),
        solution: format!("{}\n\\boxed{{{cur}}}", lines.join("\n")),
        answer: cur,
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Generate `n` problems whose questions are not in `used` (and adds them to it).
fn generate_split(seed: u64, key: &str, n: usize, used: &mut HashSet<String>) -> Vec<Problem> {
    let mut rng = SplitMix64::keyed(seed, key);
    let mut out = Vec::with_capacity(n);
    let mut attempts = 0usize;
    while out.len() < n && attempts < n * 100 + 1000 {
        attempts += 1;
        let p = generate(&mut rng);
        if used.insert(p.question.clone()) {
            out.push(p);
        }
    }
    out
}

/// The three splits: (train, valid, test).
pub fn splits(
    seed: u64,
    train: usize,
    valid: usize,
    test: usize,
) -> (Vec<Problem>, Vec<Problem>, Vec<Problem>) {
    let mut used = HashSet::new();
    let te = generate_split(seed, "arith-test", test, &mut used);
    let va = generate_split(seed, "arith-valid", valid, &mut used);
    let tr = generate_split(seed, "arith-train", train, &mut used);
    (tr, va, te)
}

pub struct Arith {
    cfg: TaskConfig,
}

impl Arith {
    pub fn new(cfg: TaskConfig) -> Self {
        Self { cfg }
    }
}

impl Task for Arith {
    fn name(&self) -> &str {
        &self.cfg.name
    }
    fn load(&self, split: Split) -> Result<Vec<Sample>> {
        let c = &self.cfg;
        let (tr, va, te) = match split {
            // Only what is needed: the earlier splits still have to be drawn for disjointness.
            Split::Test => splits(c.seed, 0, 0, c.test_size),
            Split::Valid => splits(c.seed, 0, c.valid_size, c.test_size),
            Split::Train => splits(c.seed, c.train_size, c.valid_size, c.test_size),
        };
        let problems = match split {
            Split::Train => tr,
            Split::Valid => va,
            Split::Test => te,
        };
        let n = c.limit.unwrap_or(usize::MAX);
        Ok(problems
            .into_iter()
            .take(n)
            .enumerate()
            .map(|(i, p)| Sample {
                id: format!("arith/{split}/{i}"),
                messages: vec![Message::user(math_prompt(&p.question))],
                target: Some(p.solution),
                gold: json!({ "answer": p.answer.to_string() }),
            })
            .collect())
    }
    fn grade(&self, completion: &str, gold: &Value) -> Graded {
        grade_boxed_gold(completion, gold)
    }
    fn check_gold(&self, gold: &Value) -> Result<()> {
        boxed_gold(gold).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::gsm8k::grade_boxed;

    /// No value in a problem exceeds this (two of the largest adds on top of the largest start).
    const MAX_VALUE: u64 = 43;

    /// Re-check every equation in a solution.
    fn check_equations(sol: &str) {
        let re = regex::Regex::new(r"(\d+) ([-+*/]) (\d+) = (\d+)").unwrap();
        let mut n = 0;
        for c in re.captures_iter(sol) {
            let a: u64 = c[1].parse().unwrap();
            let b: u64 = c[3].parse().unwrap();
            let r: u64 = c[4].parse().unwrap();
            let v = match &c[2] {
                "+" => a + b,
                "-" => a - b,
                "*" => a * b,
                _ => {
                    assert_eq!(a % b, 0, "{sol}");
                    a / b
                }
            };
            assert_eq!(v, r, "{sol}");
            assert!(r <= MAX_VALUE);
            n += 1;
        }
        assert!(n >= 2, "{sol}");
    }

    #[test]
    fn generator() {
        let mut rng = SplitMix64::new(7);
        for _ in 0..2000 {
            let p = generate(&mut rng);
            check_equations(&p.solution);
            assert!(p.solution.ends_with(&format!("\n\\boxed{{{}}}", p.answer)));
            assert!(p.answer <= MAX_VALUE);
            assert_eq!(grade_boxed(&p.solution, &p.answer.to_string()).reward, 1.0);
        }
    }
}
