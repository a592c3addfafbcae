//! The HTTP client against tiny misbehaving servers: refused connections, 5xx, malformed JSON,
//! stalls. Timeouts and backoffs are short so this stays fast.

use memgen::retrieval::client::{HttpRetriever, RetrievalConfig};
use memgen::retrieval::{RetrievalError, Retriever};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const OK_BODY: &str =
    r#"{"result": [[{"document": {"id": "1", "contents": "\"T\"\ntext"}, "score": 2.5}]]}"#;

/// What the fake server does with the n-th request (0-based).
type Behaviour = dyn Fn(usize, &mut TcpStream) + Send + Sync;

/// Serve `behaviour` on a loopback port until the process ends; returns the address and a
/// counter of requests seen.
fn fake_server(behaviour: Arc<Behaviour>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let behaviour = behaviour.clone();
            let seen = seen.clone();
            std::thread::spawn(move || {
                if read_request(&mut stream).is_some() {
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    behaviour(n, &mut stream);
                }
            });
        }
    });
    (addr, count)
}

/// Read one HTTP request (headers and a Content-Length body); returns the body.
fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(body)
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

fn client(url: String, retries: u32, timeout_secs: f64) -> HttpRetriever {
    HttpRetriever::new(RetrievalConfig {
        url,
        topk: 3,
        timeout_secs,
        connect_timeout_secs: 1.0,
        retries,
        backoff_ms: 20,
    })
    .unwrap()
}

fn q() -> Vec<String> {
    vec!["who?".to_string()]
}

#[test]
fn refused_connection_is_retried_then_reported() {
    // Bind then drop: nothing listens on that port any more.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let c = client(format!("http://{addr}"), 2, 1.0);
    let t = Instant::now();
    let err = c.search(&q(), 3).unwrap_err();
    assert!(
        matches!(err, RetrievalError::Transport { attempts: 3, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&format!("http://{addr}/retrieve")), "{msg}");
    assert!(msg.contains("3 attempt"), "{msg}");
    assert!(!msg.contains('\n'));
    // Backoff 20 + 40 ms.
    assert!(t.elapsed() >= Duration::from_millis(60));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn server_error_then_success_is_retried() {
    let (addr, count) = fake_server(Arc::new(|n, s: &mut TcpStream| {
        if n < 2 {
            respond(s, "503 Service Unavailable", "busy");
        } else {
            respond(s, "200 OK", OK_BODY);
        }
    }));
    let c = client(format!("http://{addr}/retrieve"), 3, 2.0);
    let res = c.retrieve(&q(), 3).unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 3);
    assert_eq!(res[0][0].id, "1");
    assert_eq!(res[0][0].contents, "\"T\"\ntext");
    assert_eq!(res[0][0].score, Some(2.5));
}

#[test]
fn persistent_server_error_is_a_clear_error() {
    let (addr, count) = fake_server(Arc::new(|_, s: &mut TcpStream| {
        respond(
            s,
            "500 Internal Server Error",
            "Traceback (most recent call last): boom\nline 2",
        );
    }));
    let c = client(format!("http://{addr}"), 2, 2.0);
    let err = c.search(&q(), 3).unwrap_err();
    assert_eq!(count.load(Ordering::SeqCst), 3);
    let msg = err.to_string();
    assert!(
        matches!(err, RetrievalError::Status { status: 500, .. }),
        "{msg}"
    );
    assert!(msg.contains(&format!("http://{addr}/retrieve")), "{msg}");
    assert!(
        msg.contains("HTTP 500") && msg.contains("Traceback"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn client_errors_are_not_retried() {
    let (addr, count) = fake_server(Arc::new(|_, s: &mut TcpStream| {
        respond(s, "422 Unprocessable Entity", r#"{"detail": "bad"}"#);
    }));
    let err = client(format!("http://{addr}"), 3, 2.0)
        .search(&q(), 3)
        .unwrap_err();
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert!(err.to_string().contains("HTTP 422"), "{err}");
}

#[test]
fn malformed_json_is_a_clear_error() {
    let long_html = format!("<html>{}</html>", "x".repeat(5000));
    let bodies = [
        (long_html.clone(), "invalid JSON"),
        (r#"{"results": []}"#.to_string(), "missing field `result`"),
        (
            r#"{"result": [[{"document": {"id": "1"}}]]}"#.to_string(),
            "result[0][0]",
        ),
        (
            r#"{"result": []}"#.to_string(),
            "0 result lists for 1 queries",
        ),
    ];
    for (body, want) in bodies {
        let b = body.clone();
        let (addr, count) = fake_server(Arc::new(move |_, s: &mut TcpStream| {
            respond(s, "200 OK", &b);
        }));
        let err = client(format!("http://{addr}"), 2, 2.0)
            .search(&q(), 3)
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, RetrievalError::Malformed { status: 200, .. }),
            "{msg}"
        );
        assert!(msg.contains(want), "{msg}");
        assert!(msg.contains(&format!("http://{addr}/retrieve")), "{msg}");
        assert!(
            msg.len() < 600,
            "error quotes only the start of the body: {msg}"
        );
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "malformed answers are not retried"
        );
    }
}

#[test]
fn stalled_server_times_out() {
    let (addr, count) = fake_server(Arc::new(|_, s: &mut TcpStream| {
        std::thread::sleep(Duration::from_secs(3));
        respond(s, "200 OK", OK_BODY);
    }));
    let c = client(format!("http://{addr}"), 1, 0.3);
    let t = Instant::now();
    let err = c.search(&q(), 3).unwrap_err();
    let elapsed = t.elapsed();
    assert!(
        matches!(err, RetrievalError::Transport { attempts: 2, .. }),
        "{err}"
    );
    assert!(
        err.to_string().to_lowercase().contains("timed out"),
        "{err}"
    );
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[test]
fn sends_search_r1_requests() {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let tx = std::sync::Mutex::new(tx);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let body = read_request(&mut s).unwrap();
        tx.lock().unwrap().send(body).unwrap();
        let two = r#"{"result": [[], [{"id": "9", "contents": "x"}]]}"#;
        respond(&mut s, "200 OK", two);
    });
    let c = client(format!("http://{addr}/retrieve/"), 0, 2.0);
    let res = c
        .search(&["a \"quoted\" q".to_string(), "b".to_string()], 0)
        .unwrap();
    let sent: serde_json::Value = serde_json::from_slice(&rx.recv().unwrap()).unwrap();
    assert_eq!(
        sent,
        serde_json::json!({"queries": ["a \"quoted\" q", "b"], "topk": 3, "return_scores": true})
    );
    assert!(res[0].is_empty());
    assert_eq!(res[1][0].id, "9");
    assert_eq!(res[1][0].score, None);
    // An empty batch needs no server.
    assert!(c.search(&[], 3).unwrap().is_empty());
}
