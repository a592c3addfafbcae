//! Helpers for the retrieval server tests: a tiny corpus, a background server, raw HTTP.

use memgen::retrieval::client::{HttpRetriever, RetrievalConfig};
use memgen::retrieval::index::{Bm25Index, IndexOrigin};
use memgen::retrieval::server::{BackgroundServer, ServerOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The shared Wikipedia sample (10 passages) in `../shared` beside the repository; a missing
/// file fails the test that needs it, naming the path (never a silent pass).
pub fn wiki18_sample() -> PathBuf {
    let path = super::shared().join("data/wiki18_sample/corpus.jsonl");
    assert!(
        path.is_file(),
        "missing test data: {} (the shared wiki18 sample, expected in ../shared beside the \
         repository)",
        path.display()
    );
    path
}

/// A small corpus in Search-R1's format: quoted title line, then text.
pub fn write_corpus(dir: &Path) -> PathBuf {
    let rows = [
        (
            "0",
            "Rust (programming language)",
            "Rust is a systems programming language focused on safety and speed.",
        ),
        (
            "1",
            "Candle (software)",
            "Candle is a minimalist machine learning framework written in Rust by Hugging Face.",
        ),
        (
            "2",
            "Pavia Cathedral",
            "The cathedral of Pavia was begun in 1488 and has a large dome.",
        ),
        (
            "3",
            "Iowa Highway 17",
            "Iowa Highway 17 is a state highway in central Iowa, designated in 1969.",
        ),
        (
            "4",
            "Evan Morris",
            "Evan Morris was a lobbyist for Genentech and Roche in Washington, D.C.",
        ),
        (
            "5",
            "Horatio Hale",
            "Horatio Hale was an ethnologist and philologist on the Wilkes expedition.",
        ),
    ];
    let mut s = String::new();
    for (id, title, text) in rows {
        let contents = format!("\"{title}\"\n{title} {text}");
        s.push_str(&serde_json::json!({"id": id, "contents": contents}).to_string());
        s.push('\n');
    }
    let path = dir.join("corpus.jsonl");
    std::fs::write(&path, s).unwrap();
    path
}

/// A server over `corpus` on a free loopback port.
pub fn start_with(corpus: &Path, options: ServerOptions) -> BackgroundServer {
    let (index, origin) = Bm25Index::open_or_build(corpus, None, false).unwrap();
    assert_eq!(origin, IndexOrigin::Built);
    BackgroundServer::start(Arc::new(index), options, "127.0.0.1:0".parse().unwrap()).unwrap()
}

pub fn start(corpus: &Path) -> BackgroundServer {
    start_with(corpus, ServerOptions::default())
}

/// A client without retries, so a failure shows.
pub fn client(url: &str) -> HttpRetriever {
    HttpRetriever::new(RetrievalConfig {
        url: url.to_string(),
        timeout_secs: 5.0,
        connect_timeout_secs: 2.0,
        retries: 0,
        ..Default::default()
    })
    .unwrap()
}

/// POST a raw body; (status, JSON body).
pub fn post_raw(url: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let resp = match ureq::post(url)
        .timeout(Duration::from_secs(10))
        .set("Content-Type", "application/json")
        .send_bytes(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, json)
}

/// Write `raw` (as far as the server reads it), maybe half-close, and return what the server
/// answered until it closed the connection.
pub fn raw_exchange(addr: std::net::SocketAddr, raw: &[u8], half_close: bool) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(raw);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).into_owned()
}
