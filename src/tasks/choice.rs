//! Multiple choice (GPQA, AQuA, any n-way): shuffled options, a boxed letter, graded like gsm8k.
//!
//! Rows may come in three shapes (column names remappable with `fields`):
//! - AQuA: `question`, `options` (`["A)12", …]`), `correct` (letter), `rationale`;
//! - GPQA: `Question`, `Correct Answer`, `Incorrect Answer 1..n`, `Explanation`;
//! - generic: `question`, `choices` (list), `answer` (letter, index or the correct text).

use serde_json::{json, Value};

use super::data::{self, field_str, RawRow, SplitMix64};
use super::gsm8k::{boxed_gold, grade_boxed_gold};
use super::{Graded, Message, Result, Sample, Split, Task, TaskConfig};

/// The exact MemGen multiple-choice instruction.
pub const CHOICE_PROMPT: &str =
    "Solve the problem with proper reasoning, and make sure to put the FINAL CHOICE inside \\boxed{}.";

/// The user message: `{question}\n\nPlease choose one of the following options:\n` then one
/// `{L}. {text}` line per option (joined by `\n`), all inside the instruction template.
pub fn choice_prompt(question: &str, options: &[String]) -> String {
    let lines: Vec<String> = options
        .iter()
        .enumerate()
        .map(|(i, o)| format!("{}. {}", letter(i), o))
        .collect();
    let body = format!(
        "{question}\n\nPlease choose one of the following options:\n{}",
        lines.join("\n")
    );
    format!("{CHOICE_PROMPT}Question: {body}\n")
}

/// The SFT target: `{explanation}\n\nTherefore, the final answer is \boxed{L}`.
pub fn choice_target(explanation: &str, letter: &str) -> String {
    format!("{explanation}\n\nTherefore, the final answer is \\boxed{{{letter}}}")
}

fn letter(i: usize) -> char {
    (b'A' + i as u8) as char
}

/// Strip an AQuA-style `A)` / `A.` / `(A)` label from an option.
fn strip_label(s: &str) -> String {
    let t = s.trim_start();
    let b = t.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_uppercase() && (b[1] == b')' || b[1] == b'.') {
        return t[2..].trim().to_string();
    }
    if b.len() >= 3 && b[0] == b'(' && b[1].is_ascii_uppercase() && b[2] == b')' {
        return t[3..].trim().to_string();
    }
    t.trim().to_string()
}

pub struct MultipleChoice {
    cfg: TaskConfig,
}

impl MultipleChoice {
    pub fn new(cfg: TaskConfig) -> Self {
        Self { cfg }
    }

    /// Options (labels stripped) and the index of the correct one, from any supported row shape.
    fn options(&self, row: &RawRow) -> std::result::Result<(Vec<String>, usize), String> {
        let v = &row.value;
        let correct_col = self.cfg.column("correct_answer", &["Correct Answer"], v);
        if v.contains_key(correct_col) {
            let correct = field_str(row, correct_col)?.trim().to_string();
            let prefix = self
                .cfg
                .fields
                .get("incorrect_prefix")
                .map(String::as_str)
                .unwrap_or("Incorrect Answer ");
            let mut options = vec![correct];
            for k in 1.. {
                match v.get(&format!("{prefix}{k}")) {
                    Some(Value::String(s)) => options.push(s.trim().to_string()),
                    _ => break,
                }
            }
            if options.len() < 2 {
                return Err(format!("no `{prefix}1` column beside `{correct_col}`"));
            }
            return Ok((options, 0));
        }
        let opt_col = self.cfg.column("options", &["options", "choices"], v);
        let options: Vec<String> = match v.get(opt_col) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|o| match o {
                    Value::String(s) => Ok(strip_label(s)),
                    other => Ok(other.to_string()),
                })
                .collect::<std::result::Result<_, String>>()?,
            // HF `choices: {"label": [...], "text": [...]}`.
            Some(Value::Object(o)) => match o.get("text") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| x.as_str().unwrap_or_default().trim().to_string())
                    .collect(),
                _ => return Err(format!("field `{opt_col}` has no `text` list")),
            },
            _ => return Err(format!("missing field `{opt_col}` (a list of options)")),
        };
        if options.len() < 2 || options.len() > 26 {
            return Err(format!("field `{opt_col}` needs 2 to 26 options"));
        }
        let ans_col = self
            .cfg
            .column("answer", &["correct", "answer", "answerKey", "label"], v);
        let idx = match v.get(ans_col) {
            Some(Value::Number(n)) => n.as_u64().map(|n| n as usize),
            Some(Value::String(s)) => {
                let s = s.trim();
                let b = s.as_bytes();
                if b.len() == 1 && b[0].is_ascii_uppercase() {
                    Some((b[0] - b'A') as usize)
                } else if let Ok(n) = s.parse::<usize>() {
                    Some(n)
                } else {
                    options.iter().position(|o| o == s)
                }
            }
            _ => return Err(format!("missing field `{ans_col}` (the correct option)")),
        };
        match idx {
            Some(i) if i < options.len() => Ok((options, i)),
            _ => Err(format!(
                "field `{ans_col}` does not name one of the options"
            )),
        }
    }

    fn build(&self, row: &RawRow) -> std::result::Result<Sample, String> {
        let v = &row.value;
        let q_col = self.cfg.column("question", &["question", "Question"], v);
        let question = field_str(row, q_col)?.trim().to_string();
        let e_col = self.cfg.column(
            "explanation",
            &["rationale", "Explanation", "explanation"],
            v,
        );
        let explanation = field_str(row, e_col).ok().map(|e| e.trim().to_string());
        let (options, correct) = self.options(row)?;
        let id_col = self.cfg.column("id", &["id", "Record ID"], v);
        let id = field_str(row, id_col).unwrap_or_else(|_| row.default_id.clone());
        let mut order: Vec<usize> = (0..options.len()).collect();
        if self.cfg.shuffle_options {
            SplitMix64::keyed(self.cfg.seed, &format!("{id}\u{0}{question}")).shuffle(&mut order);
        }
        let shuffled: Vec<String> = order.iter().map(|&i| options[i].clone()).collect();
        let pos = order.iter().position(|&i| i == correct).expect("present");
        let answer = letter(pos).to_string();
        Ok(Sample {
            id,
            messages: vec![Message::user(choice_prompt(&question, &shuffled))],
            target: explanation.map(|e| choice_target(&e, &answer)),
            gold: json!({ "answer": answer, "options": shuffled }),
        })
    }
}

impl Task for MultipleChoice {
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

    fn row(v: Value) -> RawRow {
        RawRow {
            location: "t:1".into(),
            default_id: "t:1".into(),
            value: v.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn aqua_and_gpqa_rows() {
        let t = MultipleChoice::new(TaskConfig::named("aqua"));
        let s = t
            .build(&row(
                json!({"question": "Q", "options": ["A)1", "B)2", "C)3", "D)4", "E)5"],
                "rationale": "because", "correct": "C"}),
            ))
            .unwrap();
        let opts: Vec<String> = serde_json::from_value(s.gold["options"].clone()).unwrap();
        let ans = s.gold["answer"].as_str().unwrap();
        let idx = (ans.as_bytes()[0] - b'A') as usize;
        assert_eq!(opts[idx], "3");
        let p = &s.messages[0].content;
        assert!(p.starts_with("Solve the problem with proper reasoning, and make sure to put the FINAL CHOICE inside \\boxed{}.Question: Q\n\nPlease choose one of the following options:\nA. "), "{p}");
        assert!(
            p.ends_with(&format!("D. {}\nE. {}\n", opts[3], opts[4])),
            "{p:?}"
        );
        assert_eq!(
            s.target.as_deref(),
            Some(format!("because\n\nTherefore, the final answer is \\boxed{{{ans}}}").as_str())
        );
        assert_eq!(t.grade(s.target.as_deref().unwrap(), &s.gold).reward, 1.0);
        // Same sample, same shuffle.
        let s2 = t
            .build(&row(
                json!({"question": "Q", "options": ["A)1", "B)2", "C)3", "D)4", "E)5"],
                "rationale": "because", "correct": "C"}),
            ))
            .unwrap();
        assert_eq!(s, s2);

        let g = t
            .build(&row(json!({"Question": "Which?", "Correct Answer": "yes",
                "Incorrect Answer 1": "no", "Incorrect Answer 2": "maybe", "Incorrect Answer 3": "never",
                "Explanation": "obvious"})))
            .unwrap();
        let opts: Vec<String> = serde_json::from_value(g.gold["options"].clone()).unwrap();
        let idx = (g.gold["answer"].as_str().unwrap().as_bytes()[0] - b'A') as usize;
        assert_eq!(opts.len(), 4);
        assert_eq!(opts[idx], "yes");
        assert!(t
            .build(&row(json!({"question": "Q", "options": ["A)1", "B)2"]})))
            .is_err());
    }

    #[test]
    fn prompt_shape() {
        let p = choice_prompt("Q", &["x".into(), "y".into()]);
        assert_eq!(
            p,
            "Solve the problem with proper reasoning, and make sure to put the FINAL CHOICE inside \\boxed{}.Question: Q\n\nPlease choose one of the following options:\nA. x\nB. y\n"
        );
    }
}
