//! Math answer extraction and normalisation: `\boxed{…}` extraction and the Hendrycks-MATH
//! `strip_string` / `is_equiv`, reproduced step by step so that scores match the original.

/// The text of the first `\boxed{…}` in `s` (brace-matched, without the wrapper); when `s` has no
/// `\boxed` at all, the first `\fbox{…}`. `None` when absent or its braces never close.
pub fn first_boxed(s: &str) -> Option<String> {
    boxed_at(s, find_box(s, false)?)
}

/// The text of the last `\boxed{…}` (else the last `\fbox{…}`), as MATH's `last_boxed_only_string`.
pub fn last_boxed(s: &str) -> Option<String> {
    boxed_at(s, find_box(s, true)?)
}

/// Byte offset and command length of the first (or last) `\boxed`, falling back to `\fbox`.
fn find_box(s: &str, last: bool) -> Option<(usize, usize)> {
    for cmd in ["\\boxed", "\\fbox"] {
        let pos = if last { s.rfind(cmd) } else { s.find(cmd) };
        if let Some(p) = pos {
            return Some((p, cmd.len()));
        }
    }
    None
}

/// Extract the argument of the box command at `(pos, len)`.
/// `\boxed{…}` is brace-matched; `\boxed 5` (the space form) runs to the next `$` or line end.
fn boxed_at(s: &str, (pos, len): (usize, usize)) -> Option<String> {
    let rest = &s[pos + len..];
    if let Some(arg) = rest.strip_prefix(' ') {
        if !arg.trim_start().starts_with('{') {
            let end = arg.find(['$', '\n']).unwrap_or(arg.len());
            let v = arg[..end].trim();
            return (!v.is_empty()).then(|| v.to_string());
        }
    }
    let open = rest.find('{')?;
    // Only whitespace may sit between the command and its brace.
    if !rest[..open].trim().is_empty() {
        return None;
    }
    let body = &rest[open + 1..];
    let mut depth = 1usize;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(body[..i].to_string());
                }
            }
            _ => {}
        }
    }
    None
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

    #[test]
    fn boxed_extraction() {
        assert_eq!(
            first_boxed("so \\boxed{18} and \\boxed{20}").as_deref(),
            Some("18")
        );
        assert_eq!(
            last_boxed("so \\boxed{18} and \\boxed{20}").as_deref(),
            Some("20")
        );
        assert_eq!(
            first_boxed("\\boxed{\\frac{1}{2}}").as_deref(),
            Some("\\frac{1}{2}")
        );
        assert_eq!(
            first_boxed("x \\boxed{{a}{b{c}}} y").as_deref(),
            Some("{a}{b{c}}")
        );
        assert_eq!(first_boxed("a \\fbox{7} b").as_deref(), Some("7"));
        // \boxed wins over an earlier \fbox, as in last_boxed_only_string's fallback order.
        assert_eq!(first_boxed("\\fbox{1} \\boxed{2}").as_deref(), Some("2"));
        assert_eq!(first_boxed("no box here, 42"), None);
        assert_eq!(first_boxed("\\boxed{12"), None);
        assert_eq!(first_boxed("\\boxed 5$ more").as_deref(), Some("5"));
        assert_eq!(first_boxed("\\boxed{}").as_deref(), Some(""));
        assert_eq!(first_boxed("é\\boxed{ü}").as_deref(), Some("ü"));
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
