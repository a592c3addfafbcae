//! Open-domain QA with answer aliases (TriviaQA, NQ, PopQA): the DPR/anserini TSVs, a Python
//! list-literal parser, and the substring / EM / Search-R1 reward graders.

use serde_json::{json, Map, Value};

use super::data::{self, RawRow};
use super::{Graded, Message, Result, Sample, Split, Task, TaskConfig, TaskError};

/// The exact Search-R1 / MemGen system message for search-augmented QA.
pub const SEARCH_SYSTEM_PROMPT: &str = "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you get new information. After reasoning, if you find you lack some knowledge, you can call a search engine by <search> query </search> and it will return the top searched results between <information> and </information>. You can search as many times as your want. If you find no further external knowledge needed, you can directly provide the answer inside <answer> and </answer>, without detailed illustrations. For example, <answer> Beijing </answer>.";

/// Parse TSV text `question<TAB>['alias', ...]` (CSV quoting with `"` and doubled quotes allowed)
/// into rows `{"question": …, "answers": [...]}`.
pub fn parse_qa_tsv(text: &str, shown: &str, stem: &str) -> Result<Vec<RawRow>> {
    let mut rows = Vec::new();
    for (line_no, fields) in csv_records(text, '\t') {
        let location = format!("{shown}:{line_no}");
        if fields.len() == 1 && fields[0].trim().is_empty() {
            continue;
        }
        if fields.len() != 2 {
            return Err(TaskError::BadRow {
                location,
                message: format!("expected 2 tab-separated columns, got {}", fields.len()),
            });
        }
        let answers = parse_py_str_list(&fields[1]).map_err(|e| TaskError::BadRow {
            location: location.clone(),
            message: format!("answer list: {e}"),
        })?;
        let mut value = Map::new();
        value.insert("question".into(), Value::String(unwrap_quotes(&fields[0])));
        value.insert("answers".into(), json!(answers));
        rows.push(RawRow {
            location,
            default_id: format!("{stem}:{line_no}"),
            value,
        });
    }
    Ok(rows)
}

/// Undo a second layer of CSV quoting: `"a ""b"" c"` → `a "b" c`.
fn unwrap_quotes(s: &str) -> String {
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') && s[1..s.len() - 1].contains("\"\"")
    {
        return s[1..s.len() - 1].replace("\"\"", "\"");
    }
    s.to_string()
}

/// A small CSV reader: records of fields split by `delim`, `"`-quoted fields with `""` escapes
/// (quoted fields may span lines). Yields (1-based line where the record starts, fields).
pub fn csv_records(text: &str, delim: char) -> Vec<(usize, Vec<String>)> {
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut line = 1usize;
    let mut start_line = 1usize;
    let mut in_quotes = false;
    let mut at_field_start = true;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    in_quotes = false;
                }
            } else {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
            continue;
        }
        match c {
            '"' if at_field_start => {
                in_quotes = true;
                at_field_start = false;
            }
            c if c == delim => {
                fields.push(std::mem::take(&mut field));
                at_field_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                records.push((start_line, std::mem::take(&mut fields)));
                line += 1;
                start_line = line;
                at_field_start = true;
            }
            c => {
                field.push(c);
                at_field_start = false;
            }
        }
    }
    if !field.is_empty() || !fields.is_empty() {
        fields.push(field);
        records.push((start_line, fields));
    }
    records
}

/// Parse a Python list literal of strings: `['a', "b's", 'c\'d', '\xe9']`.
pub fn parse_py_str_list(s: &str) -> std::result::Result<Vec<String>, String> {
    let chars: Vec<char> = s.trim().chars().collect();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    if chars.first() != Some(&'[') {
        return Err("expected `[`".into());
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        skip_ws(&mut i);
        match chars.get(i) {
            Some(']') => {
                i += 1;
                break;
            }
            Some('\'') | Some('"') => {
                // Adjacent literals concatenate, as in Python.
                let mut item = String::new();
                while matches!(chars.get(i), Some('\'') | Some('"')) {
                    item.push_str(&py_string(&chars, &mut i)?);
                    skip_ws(&mut i);
                }
                out.push(item);
                skip_ws(&mut i);
                match chars.get(i) {
                    Some(',') => i += 1,
                    Some(']') => {}
                    Some(c) => return Err(format!("expected `,` or `]`, got `{c}`")),
                    None => return Err("unterminated list".into()),
                }
            }
            Some(c) => return Err(format!("expected a string, got `{c}`")),
            None => return Err("unterminated list".into()),
        }
    }
    skip_ws(&mut i);
    if i != chars.len() {
        return Err("trailing text after `]`".into());
    }
    Ok(out)
}

/// One quoted Python string starting at `chars[*i]`; advances `i` past the closing quote.
fn py_string(chars: &[char], i: &mut usize) -> std::result::Result<String, String> {
    let q = chars[*i];
    *i += 1;
    let mut s = String::new();
    loop {
        let Some(&c) = chars.get(*i) else {
            return Err("unterminated string".into());
        };
        *i += 1;
        if c == q {
            return Ok(s);
        }
        if c != '\\' {
            s.push(c);
            continue;
        }
        let Some(&e) = chars.get(*i) else {
            return Err("unterminated escape".into());
        };
        *i += 1;
        let hex = |i: &mut usize, n: usize| -> std::result::Result<char, String> {
            let h: String = chars
                .get(*i..*i + n)
                .ok_or("short escape")?
                .iter()
                .collect();
            *i += n;
            u32::from_str_radix(&h, 16)
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| format!("bad escape `{h}`"))
        };
        match e {
            '\\' => s.push('\\'),
            '\'' => s.push('\''),
            '"' => s.push('"'),
            'n' => s.push('\n'),
            't' => s.push('\t'),
            'r' => s.push('\r'),
            'a' => s.push('\x07'),
            'b' => s.push('\x08'),
            'f' => s.push('\x0c'),
            'v' => s.push('\x0b'),
            '\n' => {}
            'x' => s.push(hex(i, 2)?),
            'u' => s.push(hex(i, 4)?),
            'U' => s.push(hex(i, 8)?),
            '0'..='7' => {
                let mut v = e.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match chars.get(*i).and_then(|c| c.to_digit(8)) {
                        Some(d) => {
                            v = v * 8 + d;
                            *i += 1;
                        }
                        None => break,
                    }
                }
                s.push(char::from_u32(v).ok_or("bad octal escape")?);
            }
            other => {
                // Python keeps unknown escapes verbatim.
                s.push('\\');
                s.push(other);
            }
        }
    }
}

/// Search-R1 `normalize_answer`: lower-case, drop ASCII punctuation, drop articles, collapse spaces.
pub fn normalize_answer(s: &str) -> String {
    use std::sync::OnceLock;
    static ARTICLES: OnceLock<regex::Regex> = OnceLock::new();
    let re = ARTICLES.get_or_init(|| regex::Regex::new(r"\b(a|an|the)\b").expect("valid regex"));
    let lower = s.to_lowercase();
    let no_punc: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    let no_art = re.replace_all(&no_punc, " ");
    no_art.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Every `<answer>…</answer>` body in `s`, in order.
pub fn answer_spans(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find("<answer>") {
        let body = &rest[open + "<answer>".len()..];
        let Some(close) = body.find("</answer>") else {
            break;
        };
        out.push(&body[..close]);
        rest = &body[close + "</answer>".len()..];
    }
    out
}

/// Eval score for one answer text: 1 iff some (non-empty) alias, lower-cased, is a substring of
/// the answer's first line, lower-cased.
pub fn alias_in_first_line(answer: &str, aliases: &[String]) -> bool {
    let first = answer.trim().lines().next().unwrap_or("").to_lowercase();
    aliases
        .iter()
        .map(|a| a.trim().to_lowercase())
        .any(|a| !a.is_empty() && first.contains(&a))
}

/// Search-R1 exact match after normalisation.
pub fn exact_match(answer: &str, aliases: &[String]) -> bool {
    let a = normalize_answer(answer);
    aliases.iter().any(|g| normalize_answer(g) == a)
}

/// GRPO reward: the last `<answer>` of the completion; 1 if it contains an alias (case-insensitive),
/// 0.5 if present but wrong, 0 if absent.
pub fn search_reward(completion: &str, aliases: &[String]) -> f64 {
    match answer_spans(completion).last() {
        None => 0.0,
        Some(a) => {
            let a = a.to_lowercase();
            let hit = aliases
                .iter()
                .map(|x| x.trim().to_lowercase())
                .any(|x| !x.is_empty() && a.contains(&x));
            if hit {
                1.0
            } else {
                0.5
            }
        }
    }
}

/// The aliases in `gold.answers` (a list, or one string).
pub fn gold_aliases(gold: &Value) -> Result<Vec<String>> {
    match gold.get("answers") {
        Some(Value::Array(a)) => Ok(a
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        _ => Err(TaskError::BadGold(
            "missing field `answers` (a list of aliases)".into(),
        )),
    }
}

/// Grade an open-QA completion: the final `<answer>` (none → 0) by alias substring → `accuracy`;
/// Search-R1 EM → `em`; the GRPO reward → `search_reward`.
pub fn grade_qa(completion: &str, aliases: &[String]) -> Graded {
    let answer = answer_spans(completion)
        .last()
        .map(|a| a.trim().to_string());
    let (acc, em) = match &answer {
        Some(a) => (alias_in_first_line(a, aliases), exact_match(a, aliases)),
        None => (false, false),
    };
    let b = |x: bool| if x { 1.0 } else { 0.0 };
    Graded::new(b(acc), answer)
        .with("em", b(em))
        .with("search_reward", search_reward(completion, aliases))
}

pub struct OpenQa {
    cfg: TaskConfig,
}

impl OpenQa {
    pub fn new(cfg: TaskConfig) -> Self {
        Self { cfg }
    }

    fn build(&self, row: &RawRow) -> std::result::Result<Sample, String> {
        let v = &row.value;
        let q_col = self.cfg.column("question", &["question", "query"], v);
        let question = data::field_str(row, q_col)?.trim().to_string();
        let a_col = self.cfg.column(
            "answers",
            &[
                "answers",
                "golden_answers",
                "answer.normalized_aliases",
                "answer",
                "possible_answers",
            ],
            v,
        );
        let answers = match lookup(v, a_col) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| x.to_string())
                })
                .collect::<Vec<_>>(),
            Some(Value::String(s)) if s.trim_start().starts_with('[') => parse_py_str_list(s)
                .or_else(|_| serde_json::from_str::<Vec<String>>(s).map_err(|e| e.to_string()))?,
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Object(o)) => match o.get("normalized_aliases").or(o.get("aliases")) {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
                _ => return Err(format!("field `{a_col}` has no alias list")),
            },
            _ => return Err(format!("missing field `{a_col}` (the answer aliases)")),
        };
        if answers.is_empty() {
            return Err(format!("field `{a_col}` is an empty list"));
        }
        let id_col = self.cfg.column("id", &["id", "question_id"], v);
        Ok(Sample {
            id: data::field_str(row, id_col).unwrap_or_else(|_| row.default_id.clone()),
            messages: vec![
                Message::system(SEARCH_SYSTEM_PROMPT),
                Message::user(question),
            ],
            target: Some(format!("<answer> {} </answer>", answers[0])),
            gold: json!({ "answers": answers }),
        })
    }
}

/// A (possibly dotted) column: `answer.normalized_aliases`.
fn lookup<'a>(v: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(x) = v.get(path) {
        return Some(x);
    }
    let mut parts = path.split('.');
    let mut cur = v.get(parts.next()?)?;
    for p in parts {
        cur = cur.get(p)?;
    }
    Some(cur)
}

impl Task for OpenQa {
    fn name(&self) -> &str {
        &self.cfg.name
    }
    fn load(&self, split: Split) -> Result<Vec<Sample>> {
        data::load_split(&self.cfg, split, |_, row| self.build(row))
    }
    fn grade(&self, completion: &str, gold: &Value) -> Graded {
        match gold_aliases(gold) {
            Ok(a) => grade_qa(completion, &a),
            Err(_) => Graded::new(0.0, None),
        }
    }
    fn reward(&self, completion: &str, gold: &Value) -> f64 {
        gold_aliases(gold)
            .map(|a| search_reward(completion, &a))
            .unwrap_or(0.0)
    }
    fn gold_from_row(&self, row: &RawRow) -> std::result::Result<Value, String> {
        self.build(row).map(|s| s.gold)
    }
    fn check_gold(&self, gold: &Value) -> Result<()> {
        gold_aliases(gold).map(|_| ())
    }
    fn multi_turn(&self) -> bool {
        self.cfg.search
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn py_lists() {
        assert_eq!(parse_py_str_list("['a', 'b']").unwrap(), vec!["a", "b"]);
        assert_eq!(
            parse_py_str_list(r#"["Hitler's", 'x\'y', 'caf\xe9', '\u00e9', 'a\\b', "q\"q"]"#)
                .unwrap(),
            vec!["Hitler's", "x'y", "café", "é", "a\\b", "q\"q"]
        );
        assert_eq!(parse_py_str_list("[]").unwrap(), Vec::<String>::new());
        assert_eq!(parse_py_str_list("['a',]").unwrap(), vec!["a"]);
        assert_eq!(parse_py_str_list(r"['\d']").unwrap(), vec!["\\d"]);
        assert!(parse_py_str_list("['a'").is_err());
        assert!(parse_py_str_list("['a' 'b'").is_err());
        assert!(parse_py_str_list("[1]").is_err());
        assert!(parse_py_str_list("['a'] x").is_err());
    }

    #[test]
    fn csv() {
        let r = csv_records("a\tb\n\"x\"\"y\"\t\"['z', \"\"w's\"\"]\"\n", '\t');
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, 2);
        assert_eq!(r[1].1, vec!["x\"y", "['z', \"w's\"]"]);
        assert_eq!(unwrap_quotes("\"a \"\"b\"\" c\""), "a \"b\" c");
        assert_eq!(unwrap_quotes("\"plain\" thing"), "\"plain\" thing");
    }

    #[test]
    fn qa_grading() {
        let al = vec!["Sunset Boulevard".to_string(), "Sunset Blvd".to_string()];
        let g = grade_qa("<think>hm</think><answer> sunset blvd. </answer>", &al);
        assert_eq!(g.reward, 1.0);
        assert_eq!(g.metrics["em"], 1.0);
        assert_eq!(g.extracted.as_deref(), Some("sunset blvd."));
        let g = grade_qa("<answer>The Sunset Boulevard musical\nmore</answer>", &al);
        assert_eq!((g.reward, g.metrics["em"]), (1.0, 0.0));
        let g = grade_qa("<answer>Cats\nSunset Blvd</answer>", &al);
        assert_eq!(g.reward, 0.0); // only the first line counts
        assert_eq!(grade_qa("Sunset Blvd", &al).reward, 0.0);
        assert_eq!(
            search_reward("<answer>x</answer><answer>Sunset Blvd</answer>", &al),
            1.0
        );
        assert_eq!(
            search_reward("<answer>Sunset Blvd</answer><answer>x</answer>", &al),
            0.5
        );
        assert_eq!(search_reward("<answer>x", &al), 0.0);
        assert_eq!(normalize_answer("The  Grand, Hotel!"), "grand hotel");
        assert!(exact_match("the grand hotel", &["Grand Hotel".into()]));
    }
}
