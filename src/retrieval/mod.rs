//! Retrieval for the search tasks: the Search-R1 `/retrieve` protocol (client and a built-in server).
//!
//! - `protocol`: the wire format (`{"queries", "topk", "return_scores"}` → `{"result": ...}`).
//! - [`client`]: [`client::HttpRetriever`], a blocking client with timeouts and retries.
//! - [`index`]: a BM25 index over a Search-R1 corpus (`{"id", "contents"}` JSON lines), on tantivy.
//! - [`server`]: the `/retrieve` HTTP server over that index (axum routes).
//! - `listener`: its connection handling: slots, eviction of idle connections, timeouts.
//! - [`limits`]: [`limits::ServerLimits`], every bound the server puts on a client.
//!
//! `memgen retriever serve|query` lives in `cli/retriever_cmd.rs`.

pub mod client;
pub mod index;
pub mod limits;
pub(crate) mod listener;
pub(crate) mod protocol;
pub mod server;

use serde::{Deserialize, Serialize};

/// One retrieved passage, as Search-R1 returns it: `contents` is `"Title"\ntext` (title line first,
/// quotes included when the corpus has them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Passage {
    pub id: String,
    pub contents: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

/// Anything that answers a batch of queries with `topk` passages each (one list per query).
pub trait Retriever: Send + Sync {
    fn retrieve(&self, queries: &[String], topk: usize) -> anyhow::Result<Vec<Vec<Passage>>>;
}

/// What the model is shown when retrieval fails (Search-R1 / MemGen show exactly this text).
pub const RETRIEVAL_FAILED_TEXT: &str = "Cannot find corresponding pages.";

/// The default retrieval endpoint of the original configs.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8000/retrieve";

/// The server's `topk` when a request leaves it out (or sends 0), as in Search-R1.
pub const DEFAULT_TOPK: usize = 3;

/// Format passages for the model, exactly as Search-R1 does: for i = 1, 2, …
/// `Doc {i}(Title: {first line of contents}) {remaining lines joined by "\n"}\n`.
pub fn format_passages(passages: &[Passage]) -> String {
    let mut out = String::new();
    for (i, p) in passages.iter().enumerate() {
        let (title, text) = match p.contents.split_once('\n') {
            Some((title, text)) => (title, text),
            None => (p.contents.as_str(), ""),
        };
        out.push_str(&format!("Doc {}(Title: {}) {}\n", i + 1, title, text));
    }
    out
}

/// Errors of the retrieval module (client, index and server); the CLI wraps them with anyhow.
#[derive(Debug, thiserror::Error)]
pub enum RetrievalError {
    /// The server could not be reached (or timed out) on every attempt.
    #[error("retrieval request to {url} failed after {attempts} attempt(s): {detail}")]
    Transport {
        url: String,
        attempts: u32,
        detail: String,
    },
    /// The server answered with a non-success HTTP status.
    #[error("retrieval request to {url} failed after {attempts} attempt(s): HTTP {status}; body starts: {body_start:?}")]
    Status {
        url: String,
        attempts: u32,
        status: u16,
        body_start: String,
    },
    /// The server answered 2xx but the body is not the Search-R1 response shape.
    #[error(
        "malformed response from {url} (HTTP {status}): {detail}; body starts: {body_start:?}"
    )]
    Malformed {
        url: String,
        status: u16,
        detail: String,
        body_start: String,
    },
    /// A bad client configuration (e.g. an unparsable URL).
    #[error("invalid retrieval config: {0}")]
    Config(String),
    /// The corpus file cannot be read.
    #[error("reading corpus {path}: {source}")]
    CorpusIo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A corpus line is not a `{"id": ..., "contents": "..."}` JSON object.
    #[error("{path}:{line}: {detail}")]
    CorpusLine {
        path: String,
        line: usize,
        detail: String,
    },
    /// Anything the index (tantivy or its directory) reports.
    #[error("index {path}: {detail}")]
    Index { path: String, detail: String },
    /// A server limit no request could meet (a zero count or duration), or a default `topk`
    /// outside them.
    #[error("invalid server limit: {0}")]
    InvalidLimit(String),
    /// The server could not bind, or its runtime could not start.
    #[error("retrieval server: {what}: {source}")]
    Serve {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// At most `n` bytes of `s` (cut on a char boundary), for error messages.
pub(crate) fn prefix(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(contents: &str) -> Passage {
        Passage {
            id: "0".into(),
            contents: contents.into(),
            score: None,
        }
    }

    #[test]
    fn format_passages_matches_search_r1() {
        let ps = vec![
            p("\"Evan Morris\"\nEvan Morris Evan L. Morris was a lobbyist."),
            p("\"Multi\"\nline one\nline two"),
            p("No newline at all"),
            p("\"Empty body\"\n"),
        ];
        assert_eq!(
            format_passages(&ps),
            "Doc 1(Title: \"Evan Morris\") Evan Morris Evan L. Morris was a lobbyist.\n\
             Doc 2(Title: \"Multi\") line one\nline two\n\
             Doc 3(Title: No newline at all) \n\
             Doc 4(Title: \"Empty body\") \n"
        );
        assert_eq!(format_passages(&[]), "");
    }

    #[test]
    fn failure_text_is_the_original() {
        assert_eq!(RETRIEVAL_FAILED_TEXT, "Cannot find corresponding pages.");
    }

    #[test]
    fn prefix_cuts_on_char_boundary() {
        assert_eq!(prefix("abc", 10), "abc");
        assert_eq!(prefix("ééé", 3), "é…");
    }
}
