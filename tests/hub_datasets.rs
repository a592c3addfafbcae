//! Hub datasets (`hf://…`) against a local stand-in for the Hugging Face hub on 127.0.0.1: first
//! download, cache hits with the server gone, offline mode, 404s, gated repos, truncated and corrupt
//! downloads, stalled servers. Each case runs `memgen data` as a subprocess with its own `HF_HOME`
//! and `HF_ENDPOINT` (environment variables are process-wide), and checks that a failure is one
//! line naming the dataset and leaves nothing in the cache.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the server answers a file download.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Serve {
    /// The whole file, straight from `resolve/`.
    Direct,
    /// A relative 302 to `/cdn/…`, as the hub does for LFS files.
    Redirect,
    /// Headers promise the full length; half the body, then the connection closes.
    Truncated,
    /// Headers and half the body, then silence.
    StallBody,
}

#[derive(Clone)]
struct File {
    body: Vec<u8>,
    serve: Serve,
}

/// One revision of one repo.
#[derive(Clone)]
struct Revision {
    sha: String,
    files: Vec<(String, File)>,
}

#[derive(Default)]
struct Hub {
    /// (repo id, revision) → revision content.
    repos: HashMap<(String, String), Revision>,
    /// Repos that answer 401 (gated).
    gated: Vec<String>,
    /// Stall on the info call (accept, read, never answer).
    stall_info: bool,
}

struct Server {
    url: String,
    requests: Arc<AtomicUsize>,
}

fn start(hub: Hub) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hub = Arc::new(Mutex::new(hub));
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let hub = hub.clone();
            let count = count.clone();
            std::thread::spawn(move || {
                count.fetch_add(1, Ordering::SeqCst);
                let _ = handle(stream, &hub);
            });
        }
    });
    Server { url, requests }
}

fn percent_decode(s: &str) -> String {
    s.replace("%2F", "/").replace("%2f", "/")
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let _ = s.flush();
}

fn handle(mut stream: TcpStream, hub: &Mutex<Hub>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range_start = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(r) = lower.strip_prefix("range: bytes=") {
            range_start = r
                .split('-')
                .next()
                .unwrap_or("0")
                .trim()
                .parse()
                .unwrap_or(0);
        }
    }
    let hub = hub.lock().unwrap();
    if let Some(rest) = path.strip_prefix("/api/datasets/") {
        // {owner}/{name}/revision/{rev}
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        let (repo, rev) = (
            format!("{}/{}", parts[0], parts[1]),
            percent_decode(parts[3]),
        );
        if hub.stall_info {
            drop(hub);
            std::thread::sleep(Duration::from_secs(60));
            return Ok(());
        }
        if hub.gated.contains(&repo) {
            respond(
                &mut stream,
                "401 Unauthorized",
                &[],
                b"{\"error\":\"gated\"}",
            );
            return Ok(());
        }
        match hub.repos.get(&(repo, rev)) {
            Some(r) => {
                let siblings: Vec<serde_json::Value> = r
                    .files
                    .iter()
                    .map(|(f, _)| serde_json::json!({ "rfilename": f }))
                    .collect();
                let body = serde_json::json!({ "sha": r.sha, "siblings": siblings }).to_string();
                respond(
                    &mut stream,
                    "200 OK",
                    &[("Content-Type", "application/json".into())],
                    body.as_bytes(),
                );
            }
            None => respond(
                &mut stream,
                "404 Not Found",
                &[],
                b"{\"error\":\"not found\"}",
            ),
        }
        return Ok(());
    }
    let (file, direct) = if let Some(rest) = path.strip_prefix("/datasets/") {
        // {owner}/{name}/resolve/{rev}/{file}
        let parts: Vec<&str> = rest.splitn(5, '/').collect();
        let key = (
            format!("{}/{}", parts[0], parts[1]),
            percent_decode(parts[3]),
        );
        let Some(r) = hub.repos.get(&key) else {
            respond(&mut stream, "404 Not Found", &[], b"");
            return Ok(());
        };
        let Some((_, f)) = r.files.iter().find(|(n, _)| n == parts[4]) else {
            respond(&mut stream, "404 Not Found", &[], b"");
            return Ok(());
        };
        let etag = format!("{:016x}", fnv(&f.body));
        let mut headers = vec![
            ("X-Repo-Commit", r.sha.clone()),
            ("ETag", format!("\"{etag}\"")),
        ];
        if f.serve == Serve::Redirect {
            headers.push(("X-Linked-Etag", format!("\"{etag}\"")));
            headers.push(("X-Linked-Size", f.body.len().to_string()));
            headers.push(("Location", format!("/cdn/{etag}")));
            respond(&mut stream, "302 Found", &headers, b"");
            return Ok(());
        }
        (f.clone(), headers)
    } else if let Some(etag) = path.strip_prefix("/cdn/") {
        let found = hub
            .repos
            .values()
            .flat_map(|r| r.files.iter())
            .find(|(_, f)| format!("{:016x}", fnv(&f.body)) == etag)
            .map(|(_, f)| f.clone());
        match found {
            Some(f) => (f, vec![]),
            None => {
                respond(&mut stream, "404 Not Found", &[], b"");
                return Ok(());
            }
        }
    } else {
        respond(&mut stream, "404 Not Found", &[], b"");
        return Ok(());
    };
    drop(hub);
    let body = &file.body[range_start.min(file.body.len())..];
    let mut headers = direct;
    headers.push(("Content-Length", body.len().to_string()));
    match file.serve {
        Serve::Direct | Serve::Redirect => respond(&mut stream, "200 OK", &headers, body),
        Serve::Truncated => respond(&mut stream, "200 OK", &headers, &body[..body.len() / 2]),
        Serve::StallBody => {
            respond(&mut stream, "200 OK", &headers, &body[..body.len() / 2]);
            std::thread::sleep(Duration::from_secs(60));
        }
    }
    Ok(())
}

fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A GSM8K-shaped parquet file (`question`, `answer`) with `n` rows tagged `tag`.
fn parquet_rows(tag: &str, n: usize) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = parquet::schema::parser::parse_message_type(
        "message schema { REQUIRED BYTE_ARRAY question (UTF8); REQUIRED BYTE_ARRAY answer (UTF8); }",
    )
    .unwrap();
    let mut out = Vec::new();
    {
        let props = Arc::new(WriterProperties::builder().build());
        let mut w = SerializedFileWriter::new(&mut out, Arc::new(schema), props).unwrap();
        let mut g = w.next_row_group().unwrap();
        for col in 0..2 {
            let mut c = g.next_column().unwrap().unwrap();
            let values: Vec<ByteArray> = (0..n)
                .map(|i| {
                    ByteArray::from(
                        if col == 0 {
                            format!("{tag} question {i}?")
                        } else {
                            format!("{i} + 1 = <<{i}+1={}>>{}\n#### {}", i + 1, i + 1, i + 1)
                        }
                        .as_str(),
                    )
                })
                .collect();
            c.typed::<ByteArrayType>()
                .write_batch(&values, None, None)
                .unwrap();
            c.close().unwrap();
        }
        g.close().unwrap();
        w.close().unwrap();
    }
    out
}

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// `openai/gsm8k` with configs `main` (train 3 rows via redirect, test 2 rows direct) and
/// `socratic`.
fn gsm8k_hub(train: Serve) -> Hub {
    let mut hub = Hub::default();
    let f = |body: Vec<u8>, serve| File { body, serve };
    hub.repos.insert(
        ("openai/gsm8k".into(), "main".into()),
        Revision {
            sha: SHA.into(),
            files: vec![
                (
                    ".gitattributes".into(),
                    f(b"*.parquet lfs".to_vec(), Serve::Direct),
                ),
                (
                    "main/train-00000-of-00001.parquet".into(),
                    f(parquet_rows("train", 3), train),
                ),
                (
                    "main/test-00000-of-00001.parquet".into(),
                    f(parquet_rows("test", 2), Serve::Direct),
                ),
                (
                    "socratic/train-00000-of-00001.parquet".into(),
                    f(parquet_rows("socratic", 4), Serve::Direct),
                ),
            ],
        },
    );
    hub
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
    secs: f64,
}

fn memgen_data(home: &Path, endpoint: &str, source: &str, env: &[(&str, &str)]) -> Run {
    let start = Instant::now();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_memgen"));
    cmd.args(["data", source])
        .env("HF_HOME", home)
        .env("HF_ENDPOINT", endpoint)
        .env("MEMGEN_HUB_TIMEOUT_SECS", "2")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running memgen data");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        secs: start.elapsed().as_secs_f64(),
    }
}

fn rows_of(r: &Run) -> u64 {
    assert!(r.ok, "memgen data failed: {}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    v["rows"].as_u64().unwrap()
}

/// A failure: non-zero exit, one line on stderr naming the dataset and containing `what`.
fn assert_fails(r: &Run, dataset: &str, what: &str) {
    assert!(!r.ok, "expected a failure, got {}", r.stdout);
    assert_eq!(r.stderr.lines().count(), 1, "not one line: {}", r.stderr);
    assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
    assert!(
        r.stderr.contains(dataset),
        "does not name {dataset}: {}",
        r.stderr
    );
    assert!(r.stderr.contains(what), "no `{what}` in: {}", r.stderr);
}

/// Every file under `dir` (following nothing), relative.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// After a failed fetch: no blob, snapshot, ref or temporary file for the repo.
fn assert_nothing_cached(home: &Path) {
    let files = files_under(home);
    assert!(
        files
            .iter()
            .all(|f| !f.contains("/blobs/") && !f.contains("/snapshots/") && !f.contains("/refs/")),
        "left in the cache: {files:?}"
    );
}

fn dead_endpoint() -> String {
    // A port that was just free: nothing listens there.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

#[test]
fn download_then_cache_hit_without_server_and_offline() {
    let server = start(gsm8k_hub(Serve::Redirect));
    let home = tempfile::tempdir().unwrap();
    let r = memgen_data(
        home.path(),
        &server.url,
        "hf://openai/gsm8k/main/train",
        &[],
    );
    assert_eq!(rows_of(&r), 3);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["source"], "hf://openai/gsm8k/main/train");
    assert_eq!(v["columns"], serde_json::json!(["answer", "question"]));
    // The hub's cache layout: blob by etag, snapshot link, ref to the commit.
    let repo = home.path().join("hub/datasets--openai--gsm8k");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        SHA
    );
    let link = repo.join(format!("snapshots/{SHA}/main/train-00000-of-00001.parquet"));
    assert!(link.is_file(), "{} missing", link.display());
    let files = files_under(&repo);
    assert_eq!(
        files.iter().filter(|f| f.starts_with("blobs/")).count(),
        1,
        "{files:?}"
    );
    assert!(files.iter().all(|f| !f.contains("incomplete")), "{files:?}");
    // Only the train shard was fetched (not test, not socratic).
    assert!(!repo
        .join(format!("snapshots/{SHA}/main/test-00000-of-00001.parquet"))
        .exists());

    let before = server.requests.load(Ordering::SeqCst);
    let again = memgen_data(
        home.path(),
        &server.url,
        "hf://openai/gsm8k/main/train",
        &[],
    );
    assert_eq!(rows_of(&again), 3);
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        before,
        "a cached split must not touch the network"
    );
    let down = memgen_data(
        home.path(),
        &dead_endpoint(),
        "hf://openai/gsm8k/main/train",
        &[],
    );
    assert_eq!(rows_of(&down), 3);
    let offline = memgen_data(
        home.path(),
        &dead_endpoint(),
        "hf://openai/gsm8k/main/train",
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(rows_of(&offline), 3);
    // Another split of the same repo is not cached: offline says so, online fetches it.
    let r = memgen_data(
        home.path(),
        &dead_endpoint(),
        "hf://openai/gsm8k/main/test",
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert_fails(&r, "hf://openai/gsm8k/main/test", "HF_HUB_OFFLINE");
    let r = memgen_data(home.path(), &server.url, "hf://openai/gsm8k/main/test", &[]);
    assert_eq!(rows_of(&r), 2);
    // A config given alone takes the split from the command (default train).
    let r = memgen_data(home.path(), &server.url, "hf://openai/gsm8k/socratic", &[]);
    assert_eq!(rows_of(&r), 4);
}

#[test]
fn offline_without_cache_is_one_line() {
    let home = tempfile::tempdir().unwrap();
    let r = memgen_data(
        home.path(),
        &dead_endpoint(),
        "hf://openai/gsm8k/main/train",
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert_fails(&r, "hf://openai/gsm8k/main/train", "not in the hub cache");
    assert_nothing_cached(home.path());
    // Not offline, but nothing listens: a one-line connection error.
    let r = memgen_data(
        home.path(),
        &dead_endpoint(),
        "hf://openai/gsm8k/main/train",
        &[],
    );
    assert_fails(&r, "hf://openai/gsm8k/main/train", "info");
    assert_nothing_cached(home.path());
}

#[test]
fn unknown_dataset_config_split_and_gated() {
    let mut hub = gsm8k_hub(Serve::Direct);
    hub.gated.push("Idavidrein/gpqa".into());
    let server = start(hub);
    let home = tempfile::tempdir().unwrap();
    let r = memgen_data(
        home.path(),
        &server.url,
        "hf://nobody/nothing/main/train",
        &[],
    );
    assert_fails(&r, "hf://nobody/nothing/main/train", "no such dataset");
    let r = memgen_data(
        home.path(),
        &server.url,
        "hf://openai/gsm8k/main/validation",
        &[],
    );
    assert_fails(
        &r,
        "hf://openai/gsm8k/main/validation",
        "available: main/test, main/train, socratic/train",
    );
    let r = memgen_data(
        home.path(),
        &server.url,
        "hf://openai/gsm8k/nope/train",
        &[],
    );
    assert_fails(
        &r,
        "hf://openai/gsm8k/nope/train",
        "config `nope` split `train`",
    );
    let r = memgen_data(
        home.path(),
        &server.url,
        "hf://Idavidrein/gpqa/gpqa_diamond/train",
        &[],
    );
    assert_fails(&r, "hf://Idavidrein/gpqa/gpqa_diamond/train", "HF_TOKEN");
    let r = memgen_data(home.path(), &server.url, "hf://gsm8k", &[]);
    assert_fails(&r, "hf://gsm8k", "hf://OWNER/NAME");
    assert_nothing_cached(home.path());
}

#[test]
fn parquet_conversion_branch() {
    // GPQA ships CSV on main; its parquet lives on refs/convert/parquet as {config}/{split}/*.parquet.
    let mut hub = Hub::default();
    hub.repos.insert(
        ("Idavidrein/gpqa".into(), "main".into()),
        Revision {
            sha: SHA.into(),
            files: vec![(
                "gpqa_diamond.csv".into(),
                File {
                    body: b"Question\n".to_vec(),
                    serve: Serve::Direct,
                },
            )],
        },
    );
    let convert_sha = "fedcba9876543210fedcba9876543210fedcba98";
    hub.repos.insert(
        ("Idavidrein/gpqa".into(), "refs/convert/parquet".into()),
        Revision {
            sha: convert_sha.into(),
            files: vec![(
                "gpqa_diamond/train/0000.parquet".into(),
                File {
                    body: parquet_rows("gpqa", 5),
                    serve: Serve::Redirect,
                },
            )],
        },
    );
    let server = start(hub);
    let home = tempfile::tempdir().unwrap();
    let r = memgen_data(
        home.path(),
        &server.url,
        "hf://Idavidrein/gpqa/gpqa_diamond/train",
        &[],
    );
    assert_eq!(rows_of(&r), 5);
    let repo = home.path().join("hub/datasets--Idavidrein--gpqa");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/refs/convert/parquet")).unwrap(),
        convert_sha
    );
    let r = memgen_data(
        home.path(),
        &dead_endpoint(),
        "hf://Idavidrein/gpqa/gpqa_diamond/train",
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(rows_of(&r), 5);
}

/// Fetch `hf://openai/gsm8k/main/train` from `hub` into a fresh cache; it must fail with one line
/// containing `what`, and leave nothing in the cache.
fn fails_cleanly(hub: Hub, what: &str) -> Run {
    let server = start(hub);
    let home = tempfile::tempdir().unwrap();
    let source = "hf://openai/gsm8k/main/train";
    let r = memgen_data(home.path(), &server.url, source, &[]);
    assert_fails(&r, source, what);
    assert_nothing_cached(home.path());
    r
}

#[test]
fn truncated_download_leaves_nothing() {
    fails_cleanly(gsm8k_hub(Serve::Truncated), "nothing was cached");
}

#[test]
fn corrupt_parquet_leaves_nothing() {
    let mut hub = gsm8k_hub(Serve::Direct);
    let rev = hub
        .repos
        .get_mut(&("openai/gsm8k".to_string(), "main".to_string()))
        .unwrap();
    rev.files[1].1.body = b"PAR1 this is not a parquet file at all PAR1".to_vec();
    fails_cleanly(hub, "not valid parquet");
}

#[test]
fn stalled_server_times_out() {
    // Headers and half the body, then silence; then a server that never answers the info call.
    let r = fails_cleanly(gsm8k_hub(Serve::StallBody), "MEMGEN_HUB_TIMEOUT_SECS");
    assert!(r.secs < 20.0, "took {:.1} s", r.secs);
    let mut hub = gsm8k_hub(Serve::Direct);
    hub.stall_info = true;
    let r = fails_cleanly(hub, "MEMGEN_HUB_TIMEOUT_SECS");
    assert!(r.secs < 20.0, "took {:.1} s", r.secs);
}

/// Local directories of shards load like one file.
#[test]
fn shard_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("train-00000-of-00002.parquet"),
        parquet_rows("a", 2),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("train-00001-of-00002.parquet"),
        parquet_rows("b", 3),
    )
    .unwrap();
    let r = memgen_data(
        dir.path(),
        &dead_endpoint(),
        dir.path().to_str().unwrap(),
        &[],
    );
    assert_eq!(rows_of(&r), 5);
}

/// The shipped experiment configs name the original's hub datasets, in a form the loader accepts.
#[test]
fn shipped_configs_name_hub_datasets() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let expect = [
        (
            "gsm8k",
            "hf://openai/gsm8k/main/train",
            "hf://openai/gsm8k/main/test",
        ),
        (
            "gpqa",
            "hf://Idavidrein/gpqa/gpqa_diamond/train",
            "hf://Idavidrein/gpqa/gpqa_diamond/train",
        ),
        (
            "kodcode",
            "hf://KodCode/KodCode-Light-RL-10K/default/train",
            "hf://KodCode/KodCode-Light-RL-10K/default/train",
        ),
        (
            "triviaqa",
            "hf://mandarjoshi/trivia_qa/rc.wikipedia.nocontext/train",
            "hf://mandarjoshi/trivia_qa/rc.wikipedia.nocontext/validation",
        ),
    ];
    for (name, train, test) in expect {
        let p = root.join(format!("configs/latent_memory/{name}.yaml"));
        let task = memgen::config::RunConfig::load(&p, &[])
            .unwrap()
            .dataset()
            .unwrap()
            .task;
        let show = |p: &Option<std::path::PathBuf>| p.as_ref().unwrap().display().to_string();
        assert_eq!(
            (show(&task.train_path), show(&task.test_path)),
            (train.into(), test.into())
        );
        for s in [train, test] {
            memgen::tasks::hub::HubSource::parse(s, "train").unwrap();
        }
    }
}
