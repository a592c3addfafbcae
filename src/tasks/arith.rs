//! `arith`: built-in, offline, procedurally generated multi-step arithmetic word problems with
//! step-by-step solutions ending in `\boxed{N}`. Same prompt and grader as gsm8k.
//!
//! A problem starts someone with a number of items, then applies 2–4 operations (buy more, buy
//! bags of several, give away, multiply, share equally). The solution has one short sentence with
//! its equation per step. Everything stays a non-negative integer below 1000. Splits come from
//! different seeds and are made disjoint by construction (test first, then valid, then train, each
//! skipping questions already used), so the test set depends only on `seed` and `test_size`.

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

const MAX_VALUE: u64 = 999;

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
    let steps = rng.range(2, 4);
    let mut cur = rng.range(5, 60);
    let mut q = vec![format!("{name} has {cur} {items}.")];
    let mut s = vec![format!("{name} starts with {cur} {items}.")];
    for _ in 0..steps {
        // Pick an operation that keeps the value in range; `add` always fits.
        loop {
            match rng.below(6) {
                0 => {
                    let b = rng.range(2, 40);
                    if cur + b > MAX_VALUE {
                        continue;
                    }
                    let new = cur + b;
                    q.push(match rng.below(2) {
                        0 => format!("{he_cap} buys {b} more {items}."),
                        _ => format!("{he_cap} finds {b} more {items}."),
                    });
                    s.push(format!("{he_cap} gets {b} more, so {cur} + {b} = {new}."));
                    cur = new;
                }
                1 => {
                    let k = rng.range(2, 6);
                    let m = rng.range(2, 12);
                    let km = k * m;
                    if cur + km > MAX_VALUE {
                        continue;
                    }
                    let new = cur + km;
                    q.push(format!(
                        "{he_cap} buys {k} bags with {m} {items} in each bag."
                    ));
                    s.push(format!(
                        "{he_cap} buys {k} * {m} = {km} more. {cur} + {km} = {new}."
                    ));
                    cur = new;
                }
                2 | 3 => {
                    if cur < 2 {
                        continue;
                    }
                    let b = rng.range(1, cur.min(40));
                    let new = cur - b;
                    if rng.below(2) == 0 {
                        q.push(format!("{he_cap} gives {b} {items} to a friend."));
                        s.push(format!("{he_cap} gives away {b}, so {cur} - {b} = {new}."));
                    } else {
                        q.push(format!("{he_cap} loses {b} of {his} {items}."));
                        s.push(format!("{he_cap} loses {b}, so {cur} - {b} = {new}."));
                    }
                    cur = new;
                }
                4 => {
                    let k = rng.range(2, 4);
                    if cur * k > MAX_VALUE || cur == 0 {
                        continue;
                    }
                    let new = cur * k;
                    let phrase = match k {
                        2 => "doubles".to_string(),
                        3 => "triples".to_string(),
                        _ => format!("becomes {k} times as large"),
                    };
                    q.push(format!("Then the number of {items} {he} has {phrase}."));
                    s.push(format!(
                        "The number is multiplied by {k}, so {cur} * {k} = {new}."
                    ));
                    cur = new;
                }
                _ => {
                    let divisors: Vec<u64> = (2..=6)
                        .filter(|d| cur > 0 && cur.is_multiple_of(*d))
                        .collect();
                    if divisors.is_empty() {
                        continue;
                    }
                    let k = divisors[rng.below(divisors.len() as u64) as usize];
                    let new = cur / k;
                    q.push(format!(
                        "{he_cap} splits {his} {items} into {k} equal groups and keeps one group."
                    ));
                    s.push(format!(
                        "{he_cap} keeps one of {k} groups, so {cur} / {k} = {new}."
                    ));
                    cur = new;
                }
            }
            break;
        }
    }
    q.push(format!("How many {items} does {name} have now?"));
    Problem {
        question: q.join(" "),
        solution: format!("{}\n\\boxed{{{cur}}}", s.join(" ")),
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
