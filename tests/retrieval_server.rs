//! The built-in BM25 server and the HTTP client, over loopback.

mod common;

use common::retrieval::{client, post_raw, raw_exchange, start, wiki18_sample, write_corpus};
use memgen::retrieval::index::{Bm25Index, IndexOrigin};
use memgen::retrieval::{format_passages, Retriever};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn client_and_server_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&write_corpus(dir.path()));
    // A base URL works as well as the full endpoint.
    let base = format!("http://{}", server.addr());
    for url in [server.url(), base] {
        let c = client(&url);
        let queries = vec![
            "Which framework is written in Rust by Hugging Face?".to_string(),
            "When was the cathedral of Pavia begun?".to_string(),
            "zzzz qqqq".to_string(),
            String::new(),
        ];
        let res = c.retrieve(&queries, 2).unwrap();
        assert_eq!(res.len(), 4);
        assert_eq!(res[0].len(), 2);
        assert_eq!(res[0][0].id, "1");
        assert!(res[0][0].score.unwrap() > res[0][1].score.unwrap());
        assert_eq!(res[1][0].id, "2");
        assert!(res[1][0].contents.starts_with("\"Pavia Cathedral\"\n"));
        assert!(res[2].is_empty() && res[3].is_empty());
        let text = format_passages(&res[1][..1]);
        assert!(text.starts_with("Doc 1(Title: \"Pavia Cathedral\") Pavia Cathedral The"));
    }
}

#[test]
fn server_speaks_search_r1_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&write_corpus(dir.path()));
    let url = server.url();

    // Default topk (missing or 0) is 3; scores only on request.
    for body in [
        r#"{"queries": ["Iowa highway"]}"#,
        r#"{"queries": ["Iowa highway"], "topk": 0, "return_scores": false}"#,
    ] {
        let (status, v) = post_raw(&url, body.as_bytes());
        assert_eq!(status, 200);
        let list = v["result"][0].as_array().unwrap();
        assert!(!list.is_empty() && list.len() <= 3);
        assert_eq!(list[0]["id"], "3");
        assert!(list[0]["contents"]
            .as_str()
            .unwrap()
            .starts_with("\"Iowa Highway 17\""));
        assert!(list[0].get("score").is_none());
    }
    let (status, v) = post_raw(
        &url,
        br#"{"queries": ["Rust language", "lobbyist"], "topk": 1, "return_scores": true}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(v["result"].as_array().unwrap().len(), 2);
    assert_eq!(v["result"][0][0]["document"]["id"], "0");
    assert!(v["result"][0][0]["score"].as_f64().unwrap() > 0.0);
    assert_eq!(v["result"][1][0]["document"]["id"], "4");

    // Query text that would choke a query parser.
    let nasty = r#"{"queries": ["title:\"Rust (programming) AND OR NOT -+^~*? [a TO b] {x} \\ :: ((", "\u0000\ud83d\ude00"], "topk": 2}"#;
    let (status, v) = post_raw(&url, nasty.as_bytes());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["result"][0][0]["id"], "0");
}

#[test]
fn server_rejects_bad_requests_and_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&write_corpus(dir.path()));
    let url = server.url();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("invalid JSON", b"{not json".to_vec(), 400),
        ("empty body", Vec::new(), 400),
        ("not an object", b"[1, 2]".to_vec(), 400),
        ("missing queries", br#"{"topk": 3}"#.to_vec(), 400),
        ("queries not a list", br#"{"queries": "x"}"#.to_vec(), 400),
        ("non-string query", br#"{"queries": [1]}"#.to_vec(), 400),
        (
            "topk too large",
            br#"{"queries": ["x"], "topk": 101}"#.to_vec(),
            400,
        ),
        (
            "topk negative",
            br#"{"queries": ["x"], "topk": -3}"#.to_vec(),
            400,
        ),
        (
            "topk huge",
            br#"{"queries": ["x"], "topk": 1e300}"#.to_vec(),
            400,
        ),
        (
            "return_scores not bool",
            br#"{"queries": ["x"], "return_scores": "yes"}"#.to_vec(),
            400,
        ),
    ];
    for (what, body, want) in cases {
        let (status, v) = post_raw(&url, &body);
        assert_eq!(status, want, "{what}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
    }
    // Oversize bodies (over 1 MiB), declared or chunked: the server answers 413 without reading
    // it all, so talk raw TCP (a client still writing the body may see the connection close).
    let declared = "POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n";
    // One chunk just over the limit: the server reads (almost) all of it before refusing, so
    // closing does not reset the connection under our feet.
    let n = (1 << 20) + 1;
    let mut chunked = format!(
        "POST /retrieve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{n:x}\r\n"
    )
    .into_bytes();
    chunked.extend(std::iter::repeat_n(b'a', n));
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    for (what, raw, half_close) in [
        ("declared", declared.as_bytes().to_vec(), false),
        ("chunked", chunked, true),
    ] {
        let reply = raw_exchange(server.addr(), &raw, half_close);
        assert!(reply.starts_with("HTTP/1.1 413"), "{what}: {reply}");
        assert!(reply.contains("\"error\""), "{what}: {reply}");
    }

    // Wrong path and wrong method.
    match ureq::get(&url).call() {
        Err(ureq::Error::Status(405, r)) => assert!(r.into_string().unwrap().contains("POST")),
        other => panic!("GET /retrieve: {other:?}"),
    }
    let (status, v) = post_raw(&format!("http://{}/search", server.addr()), b"{}");
    assert_eq!(status, 404, "{v}");

    // A garbage request line and a truncated body over raw TCP.
    for raw in [
        &b"\x00\x01garbage\r\n\r\n"[..],
        b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"queries\"",
    ] {
        raw_exchange(server.addr(), raw, true);
    }

    // Still serving.
    let res = client(&url)
        .retrieve(&["Horatio Hale".to_string()], 1)
        .unwrap();
    assert_eq!(res[0][0].id, "5");
}

#[test]
fn server_handles_concurrent_clients() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&write_corpus(dir.path()));
    let url = server.url();
    let queries = [
        ("Rust programming language", "0"),
        ("Candle machine learning", "1"),
        ("Pavia dome", "2"),
        ("Iowa state highway", "3"),
        ("Genentech lobbyist", "4"),
        ("ethnologist Wilkes", "5"),
    ];
    std::thread::scope(|s| {
        for t in 0..8 {
            let url = url.clone();
            s.spawn(move || {
                let c = client(&url);
                for i in 0..25 {
                    let (q, want) = queries[(t + i) % queries.len()];
                    let res = c.retrieve(&[q.to_string()], 3).unwrap();
                    assert_eq!(res[0][0].id, want, "{q}");
                }
            });
        }
    });
}

#[test]
fn bm25_ranks_titles_first_on_wiki18_sample() {
    let path = wiki18_sample();
    let (index, _) = Bm25Index::open_or_build(&path, None, false).unwrap();
    assert_eq!(index.num_docs(), 10);
    let cases: &[(&str, &[&str])] = &[
        ("Evan Morris", &["0"]),
        ("Horatio Hale", &["1"]),
        ("Dibba Al-Hisn", &["2"]),
        ("Ao Oni (film)", &["3", "8"]),
        ("Pavia Cathedral", &["4", "5"]),
        ("Iowa Highway 17", &["6"]),
        ("E.T. the Extra-Terrestrial (video game)", &["7"]),
        ("4th Airborne Corps (Soviet Union)", &["9"]),
        ("who was \"Evan Morris\"?: a lobbyist", &["0"]),
    ];
    for (q, want) in cases {
        let hits = index.search(q, 3).unwrap();
        assert!(
            want.contains(&hits[0].id.as_str()),
            "{q:?}: got {:?}",
            hits.iter().map(|h| &h.id).collect::<Vec<_>>()
        );
    }
    // Both passages of a two-passage title come before the rest.
    let hits = index.search("Pavia Cathedral", 3).unwrap();
    let mut top2: Vec<&str> = hits[..2].iter().map(|h| h.id.as_str()).collect();
    top2.sort();
    assert_eq!(top2, ["4", "5"]);
}

#[test]
fn index_dir_is_reused_and_rebuilt_when_stale() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    let index_dir = dir.path().join("index");
    let (a, origin) = Bm25Index::open_or_build(&corpus, Some(&index_dir), false).unwrap();
    assert_eq!((origin, a.num_docs()), (IndexOrigin::Built, 6));
    drop(a);
    let (b, origin) = Bm25Index::open_or_build(&corpus, Some(&index_dir), false).unwrap();
    assert_eq!((origin, b.num_docs()), (IndexOrigin::Reused, 6));
    assert_eq!(b.search("Candle", 1).unwrap()[0].id, "1");
    drop(b);

    // Grow the corpus: size and mtime change, the index is rebuilt and sees the new row.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&corpus)
        .unwrap();
    writeln!(
        f,
        r#"{{"id": "6", "contents": "\"Zanzibar\"\nZanzibar is an archipelago."}}"#
    )
    .unwrap();
    drop(f);
    let (c, origin) = Bm25Index::open_or_build(&corpus, Some(&index_dir), false).unwrap();
    assert_eq!((origin, c.num_docs()), (IndexOrigin::Built, 7));
    assert_eq!(c.search("Zanzibar", 1).unwrap()[0].id, "6");

    // A directory of unrelated files is never wiped.
    let other = dir.path().join("not-an-index");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "keep me").unwrap();
    let err = Bm25Index::open_or_build(&corpus, Some(&other), false)
        .err()
        .unwrap();
    assert!(err.to_string().contains("refusing"), "{err}");
    assert!(other.join("notes.txt").exists());
}

/// A `memgen` child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn memgen() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_memgen"));
    c.env_remove("MEMGEN_LOG");
    c
}

#[test]
fn binary_serves_and_queries() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    let mut child = Proc(
        memgen()
            .args(["retriever", "serve", "--port", "0", "--corpus"])
            .arg(&corpus)
            .arg("--index")
            .arg(dir.path().join("idx"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split("listening on ").nth(1) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server printed its address");
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/retrieve"),
        "{url}"
    );

    let out = memgen()
        .args([
            "retriever",
            "query",
            "--topk",
            "1",
            "--url",
            &url,
            "Who built the cathedral of Pavia?",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("Doc 1(Title: \"Pavia Cathedral\") "),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1);

    let out = memgen()
        .args([
            "retriever",
            "query",
            "--json",
            "--url",
            &url,
            "Iowa",
            "Candle",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0][0]["id"], "3");
    assert_eq!(v[1][0]["id"], "1");
}

fn one_line_failure(out: &std::process::Output) -> String {
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    lines[0].to_string()
}

#[test]
fn binary_reports_bad_input_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.jsonl");
    let out = memgen()
        .args(["retriever", "serve", "--port", "0", "--corpus"])
        .arg(&missing)
        .output()
        .unwrap();
    let line = one_line_failure(&out);
    assert!(line.contains("missing.jsonl"), "{line}");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"0\", \"contents\": \"\\\"A\\\"\\nok\"}\n\n{\"id\": \"1\", \"contents\": 3}\n",
    )
    .unwrap();
    let out = memgen()
        .args(["retriever", "serve", "--port", "0", "--corpus"])
        .arg(&bad)
        .output()
        .unwrap();
    let line = one_line_failure(&out);
    assert!(line.contains("bad.jsonl:3:"), "{line}");
    assert!(line.contains("contents"), "{line}");

    // A limit no request could meet fails at once, before any index is built.
    let out = memgen()
        .args([
            "retriever",
            "serve",
            "--port",
            "0",
            "--max-connections",
            "0",
        ])
        .arg("--corpus")
        .arg(&missing)
        .output()
        .unwrap();
    let line = one_line_failure(&out);
    assert!(line.contains("max_connections"), "{line}");

    // Nothing listens on port 1: a one-line connection error, fast.
    let t = Instant::now();
    let out = memgen()
        .args([
            "retriever",
            "query",
            "--retries",
            "1",
            "--url",
            "http://127.0.0.1:1",
            "q",
        ])
        .output()
        .unwrap();
    let line = one_line_failure(&out);
    assert!(
        line.contains("http://127.0.0.1:1/retrieve") && line.contains("2 attempt"),
        "{line}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn equal_scores_keep_corpus_order() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("dups.jsonl");
    let mut rows = String::new();
    for id in ["b", "a", "d", "c"] {
        rows.push_str(&format!(
            "{{\"id\": \"{id}\", \"contents\": \"\\\"Twin\\\"\\nTwin peaks\"}}\n"
        ));
    }
    std::fs::write(&corpus, rows).unwrap();
    for _ in 0..2 {
        let (index, _) = Bm25Index::open_or_build(&corpus, None, false).unwrap();
        let ids: Vec<String> = index
            .search("twin peaks", 4)
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, ["b", "a", "d", "c"]);
    }
}
