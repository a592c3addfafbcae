//! The code grader's verdict cannot be forged and its sandbox contains hostile programs, for root
//! and for an unprivileged user. Every row of `tests/data/code_hostile.jsonl` (a completion, a
//! gold, the reward it must get, what it tries) is graded through `grade_code` and through the
//! `memgen grade --task kodcode` CLI, as the current user and (when that is root) as `nobody`.
//! Each run also checks containment: the evaluator's file untouched, no connection to the
//! evaluator's listening port, no process left behind. The HumanEval canonical solutions all pass.
//!
//! Rows may say `{PORT}` (a port this test listens on, on 127.0.0.1) and `{VICTIM}` (a
//! world-writable file this test owns outside the sandbox): both are filled in here.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use memgen::tasks::code::grade_code;
use memgen::tasks::sandbox::{Isolation, Limits, Sandbox};
use memgen::tasks::{build_task, Split, TaskConfig};
use rayon::prelude::*;
use serde_json::Value;

/// One at a time: process counts, the port and the victim file are per-test state.
static LOCK: Mutex<()> = Mutex::new(());
const PRECIOUS: &str = "precious evaluator data";

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What the hostile programs aim at: a listening port and a file anyone could write outside a
/// sandbox (so only the sandbox protects it).
struct Targets {
    _dir: tempfile::TempDir,
    victim: PathBuf,
    listener: TcpListener,
}

impl Targets {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o777);
        let victim = dir.path().join("checkpoint.safetensors");
        std::fs::write(&victim, PRECIOUS).unwrap();
        chmod(&victim, 0o666);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Self {
            _dir: dir,
            victim,
            listener,
        }
    }

    /// The rows with `{PORT}` and `{VICTIM}` filled in: (name, completion, gold, reward).
    fn rows(&self) -> Vec<(String, String, Value, f64)> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/code_hostile.jsonl");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("missing test data {}: {e}", path.display()));
        let port = self.listener.local_addr().unwrap().port().to_string();
        let text = text
            .replace("{PORT}", &port)
            .replace("{VICTIM}", self.victim.to_str().unwrap());
        let rows: Vec<_> = text
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["name"].as_str().unwrap().to_string(),
                    v["completion"].as_str().unwrap().to_string(),
                    v["gold"].clone(),
                    v["reward"].as_f64().unwrap(),
                )
            })
            .collect();
        assert!(
            rows.len() >= 30,
            "expected the full hostile set, got {}",
            rows.len()
        );
        rows
    }

    /// Nothing reached the file or the port.
    fn assert_contained(&self, who: &str) {
        assert_eq!(
            std::fs::read_to_string(&self.victim).unwrap(),
            PRECIOUS,
            "{who}: the evaluator's file was changed"
        );
        match self.listener.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("{who}: the sandbox reached the evaluator's port: {other:?}"),
        }
    }
}

/// Live (non-zombie) processes whose real uid is in `uids` and that sit in another mount
/// namespace than ours — i.e. inside a sandbox of this build (other evaluators on the same machine
/// may run old-style sandboxes under the same uids; those share our mount namespace).
fn sandboxed_procs(uids: &std::ops::Range<u32>) -> Vec<String> {
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let uid: Option<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|u| u.parse().ok());
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        let Ok(mnt) = std::fs::read_link(e.path().join("ns/mnt")) else {
            continue;
        };
        if uid.is_some_and(|u| uids.contains(&u)) && !zombie && mnt != ours {
            found.push(status.lines().next().unwrap_or_default().to_string());
        }
    }
    found
}

/// No sandboxed process survives: killed processes may take a moment to vanish while their pid
/// namespace is torn down, so allow a short grace period.
fn assert_no_leftovers(uids: std::ops::Range<u32>, who: &str) {
    let deadline = Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let left = sandboxed_procs(&uids);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{who}: left behind: {left:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The uids a root evaluator hands to sandboxed runs.
const SANDBOX_UIDS: std::ops::Range<u32> = 200_000..1_200_000;
const NOBODY: std::ops::Range<u32> = 65_534..65_535;

fn report(who: &str, rows: &[(String, String, Value, f64)], got: &[f64]) {
    eprintln!("{who}:");
    for ((name, _, _, want), r) in rows.iter().zip(got) {
        eprintln!("  {name:<28} expected {want}  got {r}");
    }
    let wrong: Vec<_> = rows
        .iter()
        .zip(got)
        .filter(|((_, _, _, want), r)| *want != **r)
        .map(|((n, ..), r)| format!("{n} (got {r})"))
        .collect();
    assert!(wrong.is_empty(), "{who}: wrong rewards: {wrong:?}");
}

#[test]
fn hostile_rows_through_grade_code() {
    let _g = lock();
    let t = Targets::new();
    let rows = t.rows();
    let sb = Sandbox::new("python3", Limits::with_timeout(3.0, 512), false).unwrap();
    assert!(matches!(sb.isolation(), Isolation::Namespaces(_)));
    let got: Vec<f64> = rows
        .par_iter()
        .map(|(_, completion, gold, _)| grade_code(&sb, completion, gold).reward)
        .collect();
    report("grade_code", &rows, &got);
    t.assert_contained("grade_code");
    assert_no_leftovers(SANDBOX_UIDS, "grade_code");
}

/// Run `memgen grade --task kodcode` on the rows in a directory anyone can use, optionally as
/// `nobody`; returns the rewards in row order.
fn grade_via_cli(rows: &[(String, String, Value, f64)], as_nobody: bool) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o777);
    // nobody cannot read under a private target dir: run a copy of the binary.
    let bin = dir.path().join("memgen");
    std::fs::copy(env!("CARGO_BIN_EXE_memgen"), &bin).unwrap();
    chmod(&bin, 0o755);
    let input = dir.path().join("in.jsonl");
    let text: String = rows
        .iter()
        .map(|(name, completion, gold, _)| {
            format!(
                "{}\n",
                serde_json::json!({"id": name, "completion": completion, "gold": gold})
            )
        })
        .collect();
    std::fs::write(&input, text).unwrap();
    chmod(&input, 0o644);
    let output = dir.path().join("out.jsonl");
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    let o = cmd
        .args(["grade", "--task", "kodcode", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--options", "timeout_secs", "3"])
        .env("TMPDIR", dir.path())
        .env("HOME", dir.path())
        // One row at a time: without root every run shares this user's process limit, so a
        // fork bomb could starve a concurrent correct run (a documented limitation).
        .env(
            "RAYON_NUM_THREADS",
            if as_nobody || !is_root() { "1" } else { "2" },
        )
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "memgen grade failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = std::fs::read_to_string(&output).unwrap();
    let graded: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(graded.len(), rows.len());
    graded
        .iter()
        .zip(rows)
        .map(|(g, (name, ..))| {
            assert_eq!(g["id"].as_str(), Some(name.as_str()));
            g["reward"].as_f64().unwrap()
        })
        .collect()
}

#[test]
fn hostile_rows_through_the_cli_as_this_user() {
    let _g = lock();
    let t = Targets::new();
    let rows = t.rows();
    let got = grade_via_cli(&rows, false);
    report("memgen grade (this user)", &rows, &got);
    t.assert_contained("memgen grade (this user)");
    let uids = if is_root() { SANDBOX_UIDS } else { this_uid() };
    assert_no_leftovers(uids, "memgen grade (this user)");
}

/// The unprivileged path: as root (CI) drop to `nobody`; as any other user this user already is
/// unprivileged.
#[test]
fn hostile_rows_through_the_cli_unprivileged() {
    let _g = lock();
    let t = Targets::new();
    let rows = t.rows();
    let got = grade_via_cli(&rows, is_root());
    report("memgen grade (unprivileged)", &rows, &got);
    t.assert_contained("memgen grade (unprivileged)");
    let uids = if is_root() { NOBODY } else { this_uid() };
    assert_no_leftovers(uids, "memgen grade (unprivileged)");
}

fn this_uid() -> std::ops::Range<u32> {
    // SAFETY: getuid has no preconditions and cannot fail.
    let u = unsafe { libc::getuid() };
    u..u + 1
}

#[test]
fn humaneval_canonical_solutions_all_pass() {
    let data =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/humaneval/HumanEval.jsonl.gz");
    assert!(data.is_file(), "missing test data {}", data.display());
    let mut c = TaskConfig::named("humaneval");
    c.test_path = Some(data);
    let task = build_task(&c).unwrap();
    let samples = task.load(Split::Test).unwrap();
    assert_eq!(samples.len(), 164);
    let start = Instant::now();
    let failed: Vec<String> = samples
        .par_iter()
        .filter_map(|s| {
            let completion = format!("```python\n{}\n```\n", s.target.as_deref().unwrap());
            let r = task.grade(&completion, &s.gold).reward;
            (r != 1.0).then(|| s.id.clone())
        })
        .collect();
    eprintln!(
        "graded {} HumanEval canonical solutions in {:.1} s",
        samples.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(failed.is_empty(), "canonical solutions failing: {failed:?}");
}
