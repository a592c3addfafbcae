//! A blocking client for a Search-R1 `/retrieve` server.

use super::protocol::{parse_response, RetrieveRequest};
use super::{prefix, Passage, RetrievalError, Retriever, DEFAULT_TOPK, DEFAULT_URL};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::time::Duration;

/// How much of a response body an error message quotes.
const BODY_START: usize = 200;
/// Upper bound on a response body (a large batch is a few MiB).
const MAX_BODY: u64 = 256 << 20;
/// Cap on one backoff sleep.
const MAX_BACKOFF_MS: u64 = 10_000;

/// Client settings; embeds in the training/eval YAML as `retrieval: {url, topk, timeout_secs, retries}`.
/// Every field has a default, so `retrieval: {}` is the original setup on 127.0.0.1:8000.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrievalConfig {
    /// Full endpoint (`http://host:port/retrieve`) or a base URL (`/retrieve` is appended).
    pub url: String,
    /// Passages per query.
    pub topk: usize,
    /// Read (and write) timeout for one attempt, in seconds.
    pub timeout_secs: f64,
    /// TCP connect timeout for one attempt, in seconds.
    pub connect_timeout_secs: f64,
    /// Extra attempts after the first, on connection errors, timeouts and HTTP 5xx.
    pub retries: u32,
    /// First backoff sleep in milliseconds; doubles on every retry.
    pub backoff_ms: u64,
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.to_string(),
            topk: DEFAULT_TOPK,
            timeout_secs: 30.0,
            connect_timeout_secs: 5.0,
            retries: 3,
            backoff_ms: 200,
        }
    }
}

/// The endpoint for a configured URL: `/retrieve` appended to a base URL, `http://` to a bare
/// `host:port`.
pub fn endpoint(url: &str) -> Result<String, RetrievalError> {
    let url = url.trim();
    if url.is_empty() {
        return Err(RetrievalError::Config("empty retrieval URL".into()));
    }
    let mut url = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    while url.ends_with('/') {
        url.pop();
    }
    if !url.ends_with("/retrieve") {
        url.push_str("/retrieve");
    }
    Ok(url)
}

fn secs(what: &str, s: f64) -> Result<Duration, RetrievalError> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            RetrievalError::Config(format!("`{what}` must be a positive number, got {s}"))
        })
}

/// The Search-R1 HTTP client: one request per batch, timeouts, retries with exponential backoff.
pub struct HttpRetriever {
    config: RetrievalConfig,
    url: String,
    agent: ureq::Agent,
}

impl HttpRetriever {
    pub fn new(config: RetrievalConfig) -> Result<Self, RetrievalError> {
        let url = endpoint(&config.url)?;
        let read = secs("timeout_secs", config.timeout_secs)?;
        let connect = secs("connect_timeout_secs", config.connect_timeout_secs)?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(connect)
            .timeout_read(read)
            .timeout_write(read)
            .build();
        agent
            .post(&url)
            .request_url()
            .map_err(|e| RetrievalError::Config(format!("bad URL {url:?}: {e}")))?;
        Ok(Self { config, url, agent })
    }

    /// The endpoint requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn config(&self) -> &RetrievalConfig {
        &self.config
    }

    /// Retrieve `topk` passages (0: the configured `topk`) for each query, in one request.
    pub fn search(
        &self,
        queries: &[String],
        topk: usize,
    ) -> Result<Vec<Vec<Passage>>, RetrievalError> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let topk = if topk == 0 { self.config.topk } else { topk };
        let body = serde_json::to_vec(&RetrieveRequest {
            queries,
            topk,
            return_scores: true,
        })
        .expect("serializing a list of strings cannot fail");
        let attempts = self.config.retries.saturating_add(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failure = match self.attempt(&body) {
                Ok((status, text)) => return self.decode(status, &text, queries.len()),
                Err(f) => f,
            };
            let retryable = match &failure {
                Failure::Transport(_) => true,
                Failure::Status(code, _) => *code >= 500,
            };
            if !retryable || attempt >= attempts {
                return Err(match failure {
                    Failure::Transport(detail) => RetrievalError::Transport {
                        url: self.url.clone(),
                        attempts: attempt,
                        detail,
                    },
                    Failure::Status(status, body) => RetrievalError::Status {
                        url: self.url.clone(),
                        attempts: attempt,
                        status,
                        body_start: prefix(&body, BODY_START),
                    },
                });
            }
            let backoff = self
                .config
                .backoff_ms
                .saturating_mul(1u64 << (attempt - 1).min(20))
                .min(MAX_BACKOFF_MS);
            tracing::info!(url = %self.url, attempt, backoff_ms = backoff, "retrieval failed, retrying: {}", failure.describe());
            std::thread::sleep(Duration::from_millis(backoff));
        }
    }

    fn attempt(&self, body: &[u8]) -> Result<(u16, String), Failure> {
        let resp = match self
            .agent
            .post(&self.url)
            .set("Content-Type", "application/json")
            .send_bytes(body)
        {
            Ok(resp) => resp,
            Err(ureq::Error::Status(code, resp)) => {
                return Err(Failure::Status(code, read_body(resp).unwrap_or_default()))
            }
            Err(ureq::Error::Transport(t)) => return Err(Failure::Transport(transport_detail(&t))),
        };
        let status = resp.status();
        read_body(resp)
            .map(|text| (status, text))
            .map_err(|e| Failure::Transport(format!("reading the response body: {e}")))
    }

    fn decode(
        &self,
        status: u16,
        text: &str,
        n_queries: usize,
    ) -> Result<Vec<Vec<Passage>>, RetrievalError> {
        let malformed = |detail: String| RetrievalError::Malformed {
            url: self.url.clone(),
            status,
            detail,
            body_start: prefix(text, BODY_START),
        };
        let result = parse_response(text.as_bytes()).map_err(malformed)?;
        if result.len() != n_queries {
            return Err(malformed(format!(
                "{} result lists for {} queries",
                result.len(),
                n_queries
            )));
        }
        Ok(result)
    }
}

impl Retriever for HttpRetriever {
    fn retrieve(&self, queries: &[String], topk: usize) -> anyhow::Result<Vec<Vec<Passage>>> {
        Ok(self.search(queries, topk)?)
    }
}

enum Failure {
    Transport(String),
    Status(u16, String),
}

impl Failure {
    fn describe(&self) -> String {
        match self {
            Failure::Transport(d) => d.clone(),
            Failure::Status(code, body) => format!("HTTP {code}: {:?}", prefix(body, 80)),
        }
    }
}

fn read_body(resp: ureq::Response) -> std::io::Result<String> {
    let mut buf = Vec::new();
    resp.into_reader().take(MAX_BODY).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// "Connection Failed: Connect error: Connection refused (os error 111)", without the URL
/// (the caller's message already names it).
fn transport_detail(t: &ureq::Transport) -> String {
    let mut s = t.kind().to_string();
    if let Some(m) = t.message() {
        s.push_str(": ");
        s.push_str(m);
    }
    let mut source = std::error::Error::source(t);
    while let Some(e) = source {
        let msg = e.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        source = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_accepts_base_and_full_urls() {
        let full = "http://127.0.0.1:8000/retrieve";
        assert_eq!(endpoint(full).unwrap(), full);
        assert_eq!(endpoint("http://127.0.0.1:8000").unwrap(), full);
        assert_eq!(endpoint("http://127.0.0.1:8000/").unwrap(), full);
        assert_eq!(endpoint("127.0.0.1:8000").unwrap(), full);
        assert!(endpoint(" ").is_err());
    }

    #[test]
    fn config_defaults_and_yaml_shape() {
        let c: RetrievalConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, RetrievalConfig::default());
        assert_eq!(c.url, "http://127.0.0.1:8000/retrieve");
        assert_eq!(c.topk, 3);
        let c: RetrievalConfig = serde_json::from_str(
            r#"{"url": "http://127.0.0.1:9000", "topk": 5, "timeout_secs": 2.5, "retries": 1}"#,
        )
        .unwrap();
        assert_eq!((c.topk, c.retries, c.timeout_secs), (5, 1, 2.5));
        assert!(serde_json::from_str::<RetrievalConfig>(r#"{"ulr": "x"}"#).is_err());
    }

    #[test]
    fn rejects_bad_configs() {
        let bad = |c: RetrievalConfig| HttpRetriever::new(c).is_err();
        assert!(bad(RetrievalConfig {
            timeout_secs: 0.0,
            ..Default::default()
        }));
        assert!(bad(RetrievalConfig {
            connect_timeout_secs: -1.0,
            ..Default::default()
        }));
        assert!(bad(RetrievalConfig {
            url: "http://[::1".into(),
            ..Default::default()
        }));
    }
}
