//! The retrieval server under abuse, over loopback only: slow and silent clients, floods of idle
//! connections, amplification requests, oversize bodies, clients that never read their answer.
//! Limits are set small so each test takes seconds; every loop is bounded in count and time, and
//! a normal client keeps asking (and must keep getting right answers) throughout.

mod common;

use common::retrieval::{client, post_raw, raw_exchange, start_with, write_corpus};
use memgen::retrieval::limits::ServerLimits;
use memgen::retrieval::server::{BackgroundServer, ServerOptions};
use memgen::retrieval::Retriever;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn serve(dir: &std::path::Path, limits: ServerLimits) -> BackgroundServer {
    let options = ServerOptions {
        limits,
        ..ServerOptions::default()
    };
    start_with(&write_corpus(dir), options)
}

/// One normal question on a fresh connection; panics unless it is answered right.
fn ask(url: &str) -> Duration {
    let t = Instant::now();
    let res = client(url)
        .retrieve(&["When was the cathedral of Pavia begun?".to_string()], 1)
        .unwrap_or_else(|e| panic!("normal client refused: {e}"));
    assert_eq!(res[0][0].id, "2");
    t.elapsed()
}

/// A normal client asking on its own thread every 20 ms (at most 1000 times) until finished.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(usize, Duration), String>>>,
}

impl Prober {
    fn start(url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut answered, mut slowest) = (0, Duration::ZERO);
            for _ in 0..1000 {
                if stopped.load(Ordering::Acquire) {
                    break;
                }
                // A fresh client each time: every question is a new connection, the kind a
                // flood competes with.
                let t = Instant::now();
                match client(&url).retrieve(&["Iowa state highway".to_string()], 1) {
                    Ok(res) if res[0][0].id == "3" => answered += 1,
                    other => return Err(format!("after {answered} answers: {other:?}")),
                }
                slowest = slowest.max(t.elapsed());
                std::thread::sleep(ms(20));
            }
            Ok((answered, slowest))
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop; every question must have been answered, and at least one asked.
    fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().unwrap();
        let (answered, slowest) = thread.join().unwrap().unwrap();
        assert!(answered >= 1, "the prober got no answer at all");
        assert!(
            slowest < Duration::from_secs(3),
            "slowest answer {slowest:?}"
        );
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Read until the server closes the connection (or `limit` passes); (bytes, time to close).
/// `None` time: still open after `limit`.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while t.elapsed() < limit {
        s.set_read_timeout(Some(ms(50))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (got, Some(t.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (got, Some(t.elapsed())),
        }
    }
    (got, None)
}

/// The server closed the connection, after the 500 ms timeout under test and well before 3 s.
fn assert_cut_off(closed: Option<Duration>, what: &str) {
    let closed = closed.unwrap_or_else(|| panic!("{what}: still open after 5 s"));
    assert!(
        (ms(400)..Duration::from_secs(3)).contains(&closed),
        "{what}: closed after {closed:?}"
    );
}

fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).unwrap()
}

const REQUEST: &str = "{\"queries\": [\"Pavia\"], \"topk\": 1}";

#[test]
fn slow_and_silent_clients_are_cut_off_within_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServerLimits {
        header_timeout: ms(500),
        ..ServerLimits::default()
    };
    let server = serve(dir.path(), limits);
    let addr = server.addr();
    let prober = Prober::start(server.url());

    std::thread::scope(|s| {
        // Half the headers, then silence.
        s.spawn(|| {
            let mut c = connect(addr);
            c.write_all(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Le")
                .unwrap();
            let (_, closed) = read_until_closed(&mut c, Duration::from_secs(5));
            assert_cut_off(closed, "partial headers");
        });
        // Nothing at all.
        s.spawn(|| {
            let mut c = connect(addr);
            let (_, closed) = read_until_closed(&mut c, Duration::from_secs(5));
            assert_cut_off(closed, "silent connection");
        });
        // A header byte every 100 ms: progress must not extend the deadline.
        s.spawn(|| {
            let mut c = connect(addr);
            c.write_all(b"POST /retrieve HTTP/1.1\r\nX-Trickle: ")
                .unwrap();
            let t = Instant::now();
            let mut closed = None;
            for _ in 0..50 {
                std::thread::sleep(ms(100));
                let _ = c.write_all(b"a");
                if let (_, Some(_)) = read_until_closed(&mut c, ms(1)) {
                    closed = Some(t.elapsed());
                    break;
                }
            }
            assert_cut_off(closed, "trickling client");
        });
        // A keep-alive connection after one answer: idle counts as waiting for headers.
        s.spawn(|| {
            let mut c = connect(addr);
            write!(
                c,
                "POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{REQUEST}",
                REQUEST.len()
            )
            .unwrap();
            let (reply, closed) = read_until_closed(&mut c, Duration::from_secs(5));
            let reply = String::from_utf8_lossy(&reply);
            assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
            assert_cut_off(closed, "idle keep-alive");
        });
    });
    prober.finish();
}

#[test]
fn slow_body_gets_408_within_the_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServerLimits {
        request_timeout: ms(500),
        ..ServerLimits::default()
    };
    let server = serve(dir.path(), limits);
    let addr = server.addr();
    let prober = Prober::start(server.url());
    let head = "POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 100\r\n\r\n";
    std::thread::scope(|s| {
        for trickle in [false, true] {
            s.spawn(move || {
                let mut c = connect(addr);
                c.write_all(head.as_bytes()).unwrap();
                c.write_all(b"{\"queries\": [").unwrap();
                let t = Instant::now();
                let mut reply = Vec::new();
                let mut closed = None;
                // Bounded: 50 rounds of at most ~100 ms.
                for _ in 0..50 {
                    if trickle {
                        let _ = c.write_all(b" ");
                    }
                    let (got, done) = read_until_closed(&mut c, ms(100));
                    reply.extend(got);
                    if done.is_some() {
                        closed = Some(t.elapsed());
                        break;
                    }
                }
                let reply = String::from_utf8_lossy(&reply);
                assert!(
                    reply.starts_with("HTTP/1.1 408"),
                    "trickle {trickle}: {reply}"
                );
                assert!(reply.contains("\"limit\":\"request_timeout\""), "{reply}");
                assert_cut_off(closed, "slow body");
            });
        }
    });
    prober.finish();
}

#[test]
fn idle_flood_beyond_the_cap_does_not_lock_out_normal_clients() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServerLimits {
        max_connections: 8,
        // Far longer than the test: without eviction the flood would hold every slot throughout.
        header_timeout: Duration::from_secs(30),
        connection_wait: ms(500),
        ..ServerLimits::default()
    };
    let server = serve(dir.path(), limits);
    let addr = server.addr();
    let url = server.url();

    // 40 silent connections, five times the cap, held open.
    let mut flood: Vec<TcpStream> = (0..40).map(|_| connect(addr)).collect();
    std::thread::sleep(ms(200));
    // Meanwhile: normal clients get answers, on new connections, while more flood arrives.
    let stop = AtomicBool::new(false);
    let more = std::thread::scope(|s| {
        let flooder = s.spawn(|| {
            let mut more = Vec::new();
            while !stop.load(Ordering::Acquire) && more.len() < 200 {
                more.push(connect(addr));
                std::thread::sleep(ms(5));
            }
            more
        });
        for _ in 0..20 {
            let took = ask(&url);
            assert!(took < Duration::from_secs(2), "answer took {took:?}");
        }
        stop.store(true, Ordering::Release);
        flooder.join().unwrap()
    });
    flood.extend(more);
    // The server holds at most its cap of them: the rest were closed on its side.
    let open = flood
        .iter_mut()
        .map(|c| read_until_closed(c, ms(20)).1)
        .filter(Option::is_none)
        .count();
    assert!(
        open <= 8,
        "{open} of {} flood connections still open",
        flood.len()
    );
    // And right after the flood ends.
    drop(flood);
    for _ in 0..5 {
        ask(&url);
    }
}

#[test]
fn busy_slots_make_new_connections_wait_then_get_503_and_free_slots_serve_them() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServerLimits {
        max_connections: 2,
        connection_wait: ms(1500),
        request_timeout: Duration::from_secs(20),
        ..ServerLimits::default()
    };
    let server = serve(dir.path(), limits);
    let (addr, url) = (server.addr(), server.url());
    // Two requests stuck mid-body hold both slots (busy: not evictable).
    let stuck = |_| {
        let mut c = connect(addr);
        c.write_all(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            .unwrap();
        c
    };
    let mut slow: Vec<TcpStream> = (0..2).map(stuck).collect();
    std::thread::sleep(ms(300));

    let t = Instant::now();
    let (status, v) = post_raw(&url, REQUEST.as_bytes());
    let waited = t.elapsed();
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["limit"], "max_connections", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("--max-connections"),
        "{v}"
    );
    assert!(
        (ms(1300)..Duration::from_secs(5)).contains(&waited),
        "{waited:?}"
    );

    // A client waiting for a slot gets the one that frees.
    std::thread::scope(|s| {
        let waiter = s.spawn(|| ask(&url));
        std::thread::sleep(ms(300));
        drop(slow.remove(0));
        let took = waiter.join().unwrap();
        assert!(took < Duration::from_secs(3), "{took:?}");
    });
    drop(slow);
    for _ in 0..5 {
        ask(&url);
    }
}

#[test]
fn amplification_requests_get_400_fast_and_the_server_stays_responsive() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), ServerLimits::default());
    let url = server.url();
    let prober = Prober::start(url.clone());
    let body = |n: usize, topk: usize| {
        serde_json::json!({"queries": vec!["Rust Pavia Iowa lobbyist"; n], "topk": topk})
            .to_string()
            .into_bytes()
    };
    for (n, topk, limit) in [
        (8192, 100, "max_results"),
        (8192, 4, "max_results"),
        (8193, 1, "max_queries"),
        (1, 101, "max_topk"),
    ] {
        let b = body(n, topk);
        assert!(b.len() < 1 << 20, "{} bytes", b.len());
        let t = Instant::now();
        let (status, v) = post_raw(&url, &b);
        assert_eq!(status, 400, "{n} x {topk}: {v}");
        assert_eq!(v["limit"], limit, "{n} x {topk}: {v}");
        assert!(v["error"]
            .as_str()
            .unwrap()
            .contains(&format!("--{}", limit.replace('_', "-"))));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    // The largest batch the defaults admit at the default topk still gets its answer.
    let (status, v) = post_raw(&url, &body(8192, 3));
    assert_eq!(status, 200);
    assert_eq!(v["result"].as_array().unwrap().len(), 8192);
    prober.finish();
}

#[test]
fn work_and_body_limits_follow_the_options() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServerLimits {
        max_results: 9,
        max_body_bytes: 1000,
        ..ServerLimits::default()
    };
    let server = serve(dir.path(), limits);
    let url = server.url();
    let prober = Prober::start(url.clone());
    let (status, v) = post_raw(&url, br#"{"queries": ["a", "b", "c"], "topk": 3}"#);
    assert_eq!(status, 200, "{v}");
    let (status, v) = post_raw(&url, br#"{"queries": ["a", "b", "c", "d"], "topk": 3}"#);
    assert_eq!(
        (status, v["limit"].as_str()),
        (400, Some("max_results")),
        "{v}"
    );
    // 4 queries at the default topk 3 is 12 passages, over the limit too.
    let (status, v) = post_raw(&url, br#"{"queries": ["a", "b", "c", "d"]}"#);
    assert_eq!(
        (status, v["limit"].as_str()),
        (400, Some("max_results")),
        "{v}"
    );

    // Oversize bodies, declared and chunked, get 413 naming the limit.
    let big = format!(r#"{{"queries": ["{}"]}}"#, "x".repeat(2000));
    let declared = format!(
        "POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{big}",
        big.len()
    );
    let chunked = format!(
        "POST /retrieve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    for (what, raw) in [("declared", declared), ("chunked", chunked)] {
        let reply = raw_exchange(server.addr(), raw.as_bytes(), true);
        assert!(reply.starts_with("HTTP/1.1 413"), "{what}: {reply}");
        assert!(
            reply.contains("\"limit\":\"max_body_bytes\""),
            "{what}: {reply}"
        );
    }
    prober.finish();
}

/// A corpus whose passages (2 KB each) all match "common", for answers of tens of MB.
fn write_bulky_corpus(dir: &std::path::Path) -> std::path::PathBuf {
    let mut s = String::new();
    for i in 0..300 {
        let text = format!("common passage {i} {}", "filler ".repeat(290));
        let contents = format!("\"Bulk {i}\"\n{text}");
        s.push_str(&serde_json::json!({"id": i.to_string(), "contents": contents}).to_string());
        s.push('\n');
    }
    let path = dir.join("bulky.jsonl");
    std::fs::write(&path, s).unwrap();
    path
}

#[test]
fn a_client_that_never_reads_its_answer_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let options = ServerOptions {
        limits: ServerLimits {
            request_timeout: Duration::from_secs(1),
            ..ServerLimits::default()
        },
        ..ServerOptions::default()
    };
    let server = start_with(&write_bulky_corpus(dir.path()), options);
    // 240 × 100 passages of ~2 KB: ~50 MB, far more than the socket buffers hold.
    let body = serde_json::json!({"queries": vec!["common"; 240], "topk": 100}).to_string();
    let mut c = connect(server.addr());
    write!(
        c,
        "POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read nothing for well past the write-stall limit.
    std::thread::sleep(Duration::from_secs(4));
    let (got, closed) = read_until_closed(&mut c, Duration::from_secs(10));
    assert!(closed.is_some(), "still sending after 10 s of reading");
    let text = String::from_utf8_lossy(&got[..got.len().min(4096)]).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text:.200}");
    let head_end = text.find("\r\n\r\n").unwrap() + 4;
    let declared: usize = text
        .split("content-length: ")
        .nth(1)
        .and_then(|r| r.split("\r\n").next())
        .and_then(|n| n.parse().ok())
        .expect("content-length");
    assert!(
        declared > 20 << 20,
        "answer of {declared} bytes is too small to stall"
    );
    assert!(
        got.len() - head_end < declared,
        "the whole answer arrived: the write never stalled"
    );
    // Still serving.
    let (status, _) = post_raw(&server.url(), br#"{"queries": ["common"], "topk": 1}"#);
    assert_eq!(status, 200);
}
