//! The Search-R1 `/retrieve` wire format.
//!
//! Request: `{"queries": ["q1", ...], "topk": 3, "return_scores": true}` (`topk` missing, null or 0
//! means the server's default; `return_scores` defaults to false).
//! Response with scores: `{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}`;
//! without: `{"result": [[{"id", "contents"}, ...], ...]}`. One list per query, in order.

use super::Passage;
use serde::Serialize;
use serde_json::Value;

/// The request body the client sends.
#[derive(Debug, Clone, Serialize)]
pub struct RetrieveRequest<'a> {
    pub queries: &'a [String],
    pub topk: usize,
    pub return_scores: bool,
}

/// A validated request, as the server sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    pub queries: Vec<String>,
    /// `None` when missing, null or 0: the server's default applies.
    pub topk: Option<usize>,
    pub return_scores: bool,
}

/// Validate a request body (server side). The error is a message for a 400 answer.
pub fn parse_request(body: &[u8]) -> Result<ParsedRequest, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("request body is not valid JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "request body must be a JSON object".to_string())?;
    let queries = match obj.get("queries") {
        None | Some(Value::Null) => return Err("missing field `queries`".into()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, q)| {
                q.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("`queries[{i}]` must be a string"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err("`queries` must be a list of strings".into()),
    };
    let topk = match obj.get("topk") {
        None | Some(Value::Null) => None,
        Some(t) => match t.as_u64() {
            Some(0) => None,
            Some(k) => Some(usize::try_from(k).unwrap_or(usize::MAX)),
            None => return Err(format!("`topk` must be a non-negative integer, got {t}")),
        },
    };
    let return_scores = match obj.get("return_scores") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(format!("`return_scores` must be a boolean, got {other}")),
    };
    Ok(ParsedRequest {
        queries,
        topk,
        return_scores,
    })
}

#[derive(Serialize)]
struct Doc<'a> {
    id: &'a str,
    contents: &'a str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Item<'a> {
    Scored { document: Doc<'a>, score: f32 },
    Plain(Doc<'a>),
}

#[derive(Serialize)]
struct Response<'a> {
    result: Vec<Vec<Item<'a>>>,
}

/// Build a response body (server side); documents keep Search-R1's key order (`id`, `contents`).
pub fn response_body(results: &[Vec<Passage>], return_scores: bool) -> Vec<u8> {
    let result = results
        .iter()
        .map(|list| {
            list.iter()
                .map(|p| {
                    let document = Doc {
                        id: &p.id,
                        contents: &p.contents,
                    };
                    if return_scores {
                        Item::Scored {
                            document,
                            score: p.score.unwrap_or(0.0),
                        }
                    } else {
                        Item::Plain(document)
                    }
                })
                .collect()
        })
        .collect();
    serde_json::to_vec(&Response { result }).expect("serializing strings and floats cannot fail")
}

/// Parse a response body (client side), with or without scores. The error says where the shape
/// is wrong, e.g. "result[0][2]: missing string `contents`".
pub fn parse_response(body: &[u8]) -> Result<Vec<Vec<Passage>>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let result = v
        .get("result")
        .ok_or_else(|| "missing field `result`".to_string())?
        .as_array()
        .ok_or_else(|| "`result` is not a list".to_string())?;
    result
        .iter()
        .enumerate()
        .map(|(qi, list)| {
            list.as_array()
                .ok_or_else(|| format!("result[{qi}] is not a list"))?
                .iter()
                .enumerate()
                .map(|(di, item)| parse_item(item).map_err(|e| format!("result[{qi}][{di}]: {e}")))
                .collect()
        })
        .collect()
}

fn parse_item(item: &Value) -> Result<Passage, String> {
    let obj = item.as_object().ok_or("not an object")?;
    let (doc, score) = match obj.get("document") {
        Some(doc) => {
            let score = match obj.get("score") {
                None | Some(Value::Null) => None,
                Some(s) => Some(s.as_f64().ok_or("`score` is not a number")? as f32),
            };
            (doc.as_object().ok_or("`document` is not an object")?, score)
        }
        None => (obj, None),
    };
    let contents = doc
        .get("contents")
        .and_then(Value::as_str)
        .ok_or("missing string `contents`")?
        .to_string();
    let id = match doc.get("id") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(other) => other.to_string(),
    };
    Ok(Passage {
        id,
        contents,
        score,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses_with_and_without_scores() {
        let with =
            br#"{"result": [[{"document": {"id": "7", "contents": "\"T\"\nx"}, "score": 1.5}],
                                   []]}"#;
        let got = parse_response(with).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0][0].id, "7");
        assert_eq!(got[0][0].contents, "\"T\"\nx");
        assert_eq!(got[0][0].score, Some(1.5));
        assert!(got[1].is_empty());

        let without = br#"{"result": [[{"id": 3, "contents": "a\nb", "title": "extra"}]]}"#;
        let got = parse_response(without).unwrap();
        assert_eq!(got[0][0].id, "3");
        assert_eq!(got[0][0].score, None);
    }

    #[test]
    fn response_errors_say_where() {
        let e = parse_response(br#"{"result": [[{"document": {"id": "1"}}]]}"#).unwrap_err();
        assert_eq!(e, "result[0][0]: missing string `contents`");
        assert!(parse_response(b"{}").unwrap_err().contains("result"));
        assert!(parse_response(b"<html>")
            .unwrap_err()
            .contains("invalid JSON"));
    }

    #[test]
    fn round_trips_through_the_server_shape() {
        let ps = vec![vec![Passage {
            id: "1".into(),
            contents: "\"A\"\nb".into(),
            score: Some(2.0),
        }]];
        for scores in [true, false] {
            let body = response_body(&ps, scores);
            let back = parse_response(&body).unwrap();
            assert_eq!(back[0][0].contents, "\"A\"\nb");
            assert_eq!(back[0][0].score.is_some(), scores);
            let text = String::from_utf8(body).unwrap();
            assert!(
                text.contains(r#"{"id":"1","contents":"\"A\"\nb"}"#),
                "{text}"
            );
        }
    }

    #[test]
    fn validates_requests() {
        let r =
            parse_request(br#"{"queries": ["a", "b"], "topk": 5, "return_scores": true}"#).unwrap();
        assert_eq!(r.queries, vec!["a", "b"]);
        assert_eq!(r.topk, Some(5));
        assert!(r.return_scores);
        let r = parse_request(br#"{"queries": [], "topk": 0}"#).unwrap();
        assert_eq!(r.topk, None);
        assert!(!r.return_scores);
        assert!(parse_request(b"not json").is_err());
        assert!(parse_request(br#"{"topk": 3}"#).is_err());
        assert!(parse_request(br#"{"queries": "a"}"#).is_err());
        assert!(parse_request(br#"{"queries": [1]}"#).is_err());
        assert!(parse_request(br#"{"queries": ["a"], "topk": -1}"#).is_err());
        assert!(parse_request(br#"{"queries": ["a"], "topk": 2.5}"#).is_err());
        assert!(parse_request(br#"[1]"#).is_err());
    }
}
