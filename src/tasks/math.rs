//! Math answer extraction and normalisation: `\boxed{…}` extraction and the Hendrycks-MATH
//! `strip_string` / `is_equiv`, reproduced step by step so that scores match the original.

/// The answer in the first box of `s`, as the original MemGen's `compute_score` takes it:
/// `remove_boxed(first_boxed_only_string(s))` (its `larm/data/utils/math_utils.py`, adapted from
/// the Hendrycks MATH / lm-evaluation-harness helpers). `None` where the original finds no box or
/// where `remove_boxed` rejects what was found (an `\fbox{…}`, `\boxed` not directly followed by
/// `{`), both of which score 0 there.
pub fn first_boxed(s: &str) -> Option<String> {
    remove_boxed(&boxed_only_string(s, false)?)
}

/// The answer in the last box: `remove_boxed(last_boxed_only_string(s))`, as the original reads
/// the ground truth.
pub fn last_boxed(s: &str) -> Option<String> {
    remove_boxed(&boxed_only_string(s, true)?)
}

/// The space form of the box command. The original tests for it *anywhere* in the text before
/// anything else, so one `\boxed 7` wins over an earlier `\boxed{5}`.
const SPACED: &str = "\\boxed ";

/// `first_boxed_only_string` / `last_boxed_only_string`: the whole box command with its argument.
fn boxed_only_string(s: &str, last: bool) -> Option<String> {
    if s.contains(SPACED) {
        // Python: `"\\boxed " + s.split("\\boxed ")[1 or -1].split("$")[0]` — the text after the
        // first (last) `\boxed `, up to the next `\boxed ` or `$`; newlines do not end it.
        let mut pieces = s.split(SPACED);
        let piece = if last { pieces.last() } else { pieces.nth(1) }?;
        let arg = piece.split('$').next().unwrap_or("");
        return Some(format!("{SPACED}{arg}"));
    }
    let find = |cmd: &str| if last { s.rfind(cmd) } else { s.find(cmd) };
    let idx = find("\\boxed").or_else(|| find("\\fbox"))?;
    // The original's brace count starts at the command itself and only checks for zero after a
    // closing brace, so a `}` before the first `{` can never be matched.
    let mut open = 0i64;
    for (i, c) in s[idx..].char_indices() {
        match c {
            '{' => open += 1,
            '}' => {
                open -= 1;
                if open == 0 {
                    return Some(s[idx..idx + i + 1].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// Hendrycks `remove_boxed`: strips `\boxed ` or asserts the `\boxed{…}` form. Its assertion
/// failing (an `\fbox{…}` found by the fallback, `\boxed\n{7}`, `\boxedx{7}`) raises inside the
/// original's `compute_score`, whose `except` scores 0: `None` here.
fn remove_boxed(b: &str) -> Option<String> {
    if b.contains(SPACED) {
        return b.strip_prefix(SPACED).map(str::to_string);
    }
    b.strip_prefix("\\boxed{")?
        .strip_suffix('}')
        .map(str::to_string)
}

/// Hendrycks-MATH `is_equiv`: compare after `strip_string`; if normalising either side fails (the
/// Python raises), compare the raw strings.
pub fn is_equiv(a: &str, b: &str) -> bool {
    match (strip_string(a), strip_string(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Hendrycks-MATH `_strip_string`. `None` where the Python version raises an exception.
pub fn strip_string(s: &str) -> Option<String> {
    let mut s = s.replace('\n', "");
    s = s.replace("\\!", "");
    s = s.replace("\\\\", "\\");
    s = s.replace("tfrac", "frac").replace("dfrac", "frac");
    s = s.replace("\\left", "").replace("\\right", "");
    s = s.replace("^{\\circ}", "").replace("^\\circ", "");
    s = s.replace("\\$", "");
    s = remove_right_units(&s)?;
    s = s.replace("\\%", "");
    s = s.replace(" .", " 0.").replace("{.", "{0.");
    if s.is_empty() {
        return Some(s);
    }
    if s.starts_with('.') {
        s.insert(0, '0');
    }
    // Drop a short "k = " prefix.
    let parts: Vec<&str> = s.split('=').collect();
    if parts.len() == 2 && parts[0].chars().count() <= 2 {
        s = parts[1].to_string();
    }
    s = fix_sqrt(&s)?;
    s = s.replace(' ', "");
    s = fix_fracs(&s)?;
    if s == "0.5" {
        s = "\\frac{1}{2}".to_string();
    }
    Some(fix_a_slash_b(&s))
}

/// `_remove_right_units`: everything before `\text{ ` (the Python asserts it occurs once).
fn remove_right_units(s: &str) -> Option<String> {
    if s.contains("\\text{ ") {
        let parts: Vec<&str> = s.split("\\text{ ").collect();
        if parts.len() != 2 {
            return None;
        }
        return Some(parts[0].to_string());
    }
    Some(s.to_string())
}

/// `_fix_sqrt`: `\sqrt3` → `\sqrt{3}`.
fn fix_sqrt(s: &str) -> Option<String> {
    if !s.contains("\\sqrt") {
        return Some(s.to_string());
    }
    let mut parts = s.split("\\sqrt");
    let mut out = parts.next().unwrap_or("").to_string();
    for part in parts {
        let mut chars = part.chars();
        let first = chars.next()?; // Python: split[0] on "" raises
        if first != '{' {
            out.push_str("\\sqrt{");
            out.push(first);
            out.push('}');
            out.push_str(chars.as_str());
        } else {
            out.push_str("\\sqrt");
            out.push_str(part);
        }
    }
    Some(out)
}

/// `_fix_fracs`: `\frac12` → `\frac{1}{2}`, `\frac1{72}` → `\frac{1}{72}`. Returns the input
/// unchanged when a `\frac` has exactly one character after it (the Python's assert branch);
/// `None` when nothing follows (the Python indexes an empty string and raises).
fn fix_fracs(s: &str) -> Option<String> {
    let mut parts = s.split("\\frac");
    let mut out = parts.next().unwrap_or("").to_string();
    for part in parts {
        out.push_str("\\frac");
        let chars: Vec<char> = part.chars().collect();
        if chars.first() == Some(&'{') {
            out.push_str(part);
            continue;
        }
        if chars.is_empty() {
            return None;
        }
        if chars.len() < 2 {
            return Some(s.to_string());
        }
        let (a, b) = (chars[0], chars[1]);
        let post: String = chars[2..].iter().collect();
        if b != '{' {
            out.push_str(&format!("{{{a}}}{{{b}}}{post}"));
        } else {
            out.push_str(&format!("{{{a}}}{b}{post}"));
        }
    }
    Some(out)
}

/// `_fix_a_slash_b`: `3/4` → `\frac{3}{4}` when both sides are canonical integers.
fn fix_a_slash_b(s: &str) -> String {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() == 2 && is_canonical_int(parts[0]) && is_canonical_int(parts[1]) {
        return format!("\\frac{{{}}}{{{}}}", parts[0], parts[1]);
    }
    s.to_string()
}

/// True when `s == str(int(s))` in Python: optional `-`, no leading zeros, not `-0`.
fn is_canonical_int(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return false;
    }
    !(s.starts_with('-') && digits == "0")
}

/// The last number in `s` (commas between digits and a leading `$` ignored), for the lenient metric.
pub fn last_number(s: &str) -> Option<f64> {
    let re = number_regex();
    re.find_iter(s)
        .filter_map(|m| m.as_str().replace(',', "").parse::<f64>().ok())
        .last()
}

fn number_regex() -> &'static regex::Regex {
    use std::sync::OnceLock;
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    RE.get_or_init(|| {
        regex::Regex::new(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+").expect("valid regex")
    })
}

/// Lenient numeric comparison: the last number of the completion against the gold value's number
/// (relative tolerance 1e-6, so `18.0` == `18` and `1,000` == `1000`).
pub fn lenient_equal(completion: &str, gold: &str) -> bool {
    match (last_number(completion), last_number(gold)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * b.abs().max(1.0),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(s: &str) -> String {
        strip_string(s).unwrap()
    }

    /// (completion, first box as the original's `remove_boxed(first_boxed_only_string(·))`,
    /// last box likewise). Expected values follow the Python of the original MemGen
    /// (`larm/data/utils/math_utils.py`, from the Hendrycks MATH helpers), traced by hand.
    const BOXES: &[(&str, Option<&str>, Option<&str>)] = &[
        ("so \\boxed{18} and \\boxed{20}", Some("18"), Some("20")),
        (
            "\\boxed{\\frac{1}{2}}",
            Some("\\frac{1}{2}"),
            Some("\\frac{1}{2}"),
        ),
        (
            "x \\boxed{{a}{b{c}}} y",
            Some("{a}{b{c}}"),
            Some("{a}{b{c}}"),
        ),
        // `\fbox` is found by the fallback but `remove_boxed` asserts `\boxed{`: no answer.
        ("a \\fbox{7} b", None, None),
        ("\\fbox{1} \\boxed{2}", Some("2"), Some("2")),
        ("no box here, 42", None, None),
        ("\\boxed{12", None, None),
        ("\\boxed{}", Some(""), Some("")),
        ("é\\boxed{ü}", Some("ü"), Some("ü")),
        // Only `{` directly after `\boxed` is the brace form.
        ("\\boxed\n{7}", None, None),
        ("\\boxedx{7}", None, None),
        ("\\boxed}{7}", None, None),
        // The space form: up to the next `$` or `\boxed `, newlines kept, untrimmed.
        ("\\boxed 5$ more", Some("5"), Some("5")),
        ("so \\boxed 7", Some("7"), Some("7")),
        (
            "\\boxed 7\nThat is all.",
            Some("7\nThat is all."),
            Some("7\nThat is all."),
        ),
        ("\\boxed 1 and \\boxed 2", Some("1 and "), Some("2")),
        // A space form anywhere wins over any brace form.
        ("\\boxed{5} then \\boxed 7", Some("7"), Some("7")),
        ("\\boxed {5}", Some("{5}"), Some("{5}")),
    ];

    #[test]
    fn boxed_extraction() {
        for &(s, first, last) in BOXES {
            assert_eq!(first_boxed(s).as_deref(), first, "first box of {s:?}");
            assert_eq!(last_boxed(s).as_deref(), last, "last box of {s:?}");
        }
    }

    #[test]
    fn strip_string_cases() {
        assert_eq!(strip("0.5"), "\\frac{1}{2}");
        assert!(is_equiv("0.5", "\\frac{1}{2}"));
        assert!(is_equiv("1/2", "\\frac{1}{2}"));
        assert!(is_equiv("\\dfrac{3}{4}", "\\frac34"));
        assert!(is_equiv("\\tfrac12", "\\frac{1}{2}"));
        assert_eq!(strip("\\frac1{72}"), "\\frac{1}{72}");
        assert_eq!(strip("x = 5"), "5");
        assert_eq!(strip("k=5"), "5");
        assert_eq!(strip("abc=5"), "abc=5");
        assert_eq!(strip("10\\%"), "10");
        assert_eq!(strip("\\$18"), "18");
        assert_eq!(strip("90^\\circ"), "90");
        assert_eq!(strip("90^{\\circ}"), "90");
        assert_eq!(strip("5\\text{ cm}"), "5");
        assert_eq!(strip(".5"), "\\frac{1}{2}"); // leading "." → "0.", then 0.5 → 1/2
        assert_eq!(strip(".25"), "0.25");
        assert_eq!(strip("\\left(1,2\\right)"), "(1,2)");
        assert_eq!(strip("\\sqrt3"), "\\sqrt{3}");
        assert_eq!(strip("1\n000"), "1000");
        assert_eq!(strip("3/04"), "3/04");
        assert_eq!(strip("1,000"), "1,000");
        assert!(!is_equiv("1,000", "1000")); // no numeric tolerance, commas kept
        assert!(!is_equiv("18.0", "18"));
        // Two "\text{ " raise in Python → raw compare.
        assert_eq!(strip_string("1\\text{ a}\\text{ b}"), None);
        assert!(is_equiv("1\\text{ a}\\text{ b}", "1\\text{ a}\\text{ b}"));
        assert_eq!(strip_string("\\sqrt"), None);
        assert_eq!(strip_string("1+\\frac"), None);
        assert_eq!(strip("\\frac1"), "\\frac1");
        assert_eq!(strip(""), "");
    }

    #[test]
    fn lenient_numbers() {
        assert!(lenient_equal("The answer is $1,000.", "1000"));
        assert!(lenient_equal("so 18.0 dollars", "18"));
        assert!(lenient_equal("it is -3", "-3"));
        assert!(!lenient_equal("it is 3 then 4", "3"));
        assert!(!lenient_equal("none", "3"));
        assert_eq!(last_number("at 5 pm, 12 apples"), Some(12.0));
    }
}
