//! GSM8K: the math word-problem task (and the grading shared by every `\boxed{}` task).

use serde_json::{json, Value};

use super::data::{self, field_str, RawRow};
use super::math;
use super::{gold_str, Graded, Message, Result, Sample, Split, Task, TaskConfig};

/// The exact MemGen math prompt (note the missing space after `\boxed{}.`).
pub const MATH_PROMPT: &str =
    "Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER inside \\boxed{}.";

/// The user message for a math question.
pub fn math_prompt(question: &str) -> String {
    format!("{MATH_PROMPT}Question: {question}\n")
}

/// GSM8K target: the rationale before `\n####` (calculator notes kept) immediately followed by
/// `\boxed{N}`, N being the stripped text after `####`; `None` when there is no `####`.
pub fn gsm8k_target(answer: &str) -> Option<(String, String)> {
    let answer = answer.trim();
    let (rationale, final_answer) = answer.split_once("\n####")?;
    let n = final_answer.trim();
    let target = format!("{rationale}\\boxed{{{n}}}");
    Some((target.trim().to_string(), n.to_string()))
}

/// Grade a `\boxed{}` answer as the original's `compute_score` does: the first box of the
/// completion (see `math::first_boxed`) against `gold_answer`, both through MATH's
/// `strip_string`, as strings; the reward and `accuracy` are that score. `lenient_accuracy` is
/// memgen's own extra, not the original's metric: the last number of the completion, compared
/// numerically, to show how many answers are right but not boxed the way the grader wants.
pub fn grade_boxed(completion: &str, gold_answer: &str) -> Graded {
    let extracted = math::first_boxed(completion);
    let correct = extracted
        .as_deref()
        .is_some_and(|e| math::is_equiv(e, gold_answer));
    let lenient = math::lenient_equal(completion, gold_answer);
    Graded::new(if correct { 1.0 } else { 0.0 }, extracted)
        .with("lenient_accuracy", if lenient { 1.0 } else { 0.0 })
}

/// The gold answer of a boxed-answer task: `gold.answer`, or else the last box of `gold.target`.
/// Grade a completion against gold fields holding a boxed answer (`answer`, or `target`'s last
/// `\boxed{}`): the grader of every boxed-answer task (gsm8k, arith, multiple choice).
pub fn grade_boxed_gold(completion: &str, gold: &Value) -> Graded {
    match boxed_gold(gold) {
        Ok(g) => grade_boxed(completion, &g),
        Err(_) => Graded::new(0.0, math::first_boxed(completion)),
    }
}

pub fn boxed_gold(gold: &Value) -> Result<String> {
    if gold.get("answer").is_some() {
        return gold_str(gold, "answer");
    }
    let target = gold_str(gold, "target")
        .map_err(|_| super::TaskError::BadGold("missing field `answer`".into()))?;
    math::last_boxed(&target)
        .ok_or_else(|| super::TaskError::BadGold("`target` has no \\boxed{…}".into()))
}

pub struct Gsm8k {
    cfg: TaskConfig,
}

impl Gsm8k {
    pub fn new(cfg: TaskConfig) -> Self {
        Self { cfg }
    }

    fn build(&self, row: &RawRow) -> std::result::Result<Sample, String> {
        let q_col = self
            .cfg
            .column("question", &["question", "problem"], &row.value);
        let a_col = self
            .cfg
            .column("answer", &["answer", "solution"], &row.value);
        let question = field_str(row, q_col)?.trim().to_string();
        let answer = field_str(row, a_col)?;
        let (target, n) = gsm8k_target(&answer)
            .or_else(|| {
                // MATH-style solutions carry their own box.
                let n = math::last_boxed(&answer)?;
                Some((answer.trim().to_string(), n))
            })
            .ok_or_else(|| format!("field `{a_col}` has no `####` final answer"))?;
        let id = self.cfg.column("id", &["id", "idx"], &row.value);
        Ok(Sample {
            id: field_str(row, id).unwrap_or_else(|_| row.default_id.clone()),
            messages: vec![Message::user(math_prompt(&question))],
            target: Some(target),
            gold: json!({ "answer": n }),
        })
    }
}

impl Task for Gsm8k {
    fn name(&self) -> &str {
        &self.cfg.name
    }
    fn load(&self, split: Split) -> Result<Vec<Sample>> {
        data::load_split(&self.cfg, split, |_, row| self.build(row))
    }
    fn grade(&self, completion: &str, gold: &Value) -> Graded {
        grade_boxed_gold(completion, gold)
    }
    fn gold_from_row(&self, row: &RawRow) -> std::result::Result<Value, String> {
        self.build(row).map(|s| s.gold)
    }
    fn check_gold(&self, gold: &Value) -> Result<()> {
        boxed_gold(gold).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_format() {
        let (t, n) = gsm8k_target("She has 3+4=<<3+4=7>>7.\n#### 7").unwrap();
        assert_eq!(t, "She has 3+4=<<3+4=7>>7.\\boxed{7}");
        assert_eq!(n, "7");
        assert!(gsm8k_target("no final").is_none());
        assert_eq!(
            math_prompt("Q?"),
            "Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER inside \\boxed{}.Question: Q?\n"
        );
    }

    #[test]
    fn grading() {
        let g = grade_boxed("so \\boxed{18}. Also \\boxed{19}", "18");
        assert_eq!(g.reward, 1.0);
        assert_eq!(g.extracted.as_deref(), Some("18"));
        assert_eq!(
            grade_boxed("\\boxed{19} then \\boxed{18}", "18").reward,
            0.0
        );
        assert_eq!(grade_boxed("\\boxed{\\$18}", "18").reward, 1.0);
        assert_eq!(grade_boxed("\\boxed{x = 18}", "18").reward, 1.0);
        assert_eq!(grade_boxed("\\boxed{18\\text{ dollars}}", "18").reward, 1.0);
        // The original's `remove_boxed` rejects `\fbox`.
        assert_eq!(grade_boxed("\\fbox{18}", "18").reward, 0.0);
        let g = grade_boxed("the answer is 1,000 dollars", "1000");
        assert_eq!((g.reward, g.metrics["lenient_accuracy"]), (0.0, 1.0));
        assert_eq!(g.metrics["accuracy"], 0.0);
        let g = grade_boxed("\\boxed{1,000}", "1000");
        assert_eq!((g.reward, g.metrics["lenient_accuracy"]), (0.0, 1.0));
        assert_eq!(grade_boxed("\\boxed{0.5}", "\\frac{1}{2}").reward, 1.0);
        assert_eq!(grade_boxed("\\boxed{18.0}", "18").reward, 0.0);
        let t = Gsm8k::new(TaskConfig::named("gsm8k"));
        assert_eq!(t.grade("\\boxed{7}", &json!({"answer": 7})).reward, 1.0);
        assert_eq!(
            t.grade("\\boxed{7}", &json!({"target": "a\\boxed{7}"}))
                .reward,
            1.0
        );
        assert!(t.check_gold(&json!({"answr": 7})).is_err());
    }
}
