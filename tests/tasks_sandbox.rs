//! Hostile programs in the code sandbox: none may hang, crash or damage the evaluator.
//! The tests run one at a time (a lock), so process counts and timings are not disturbed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use memgen::tasks::sandbox::{Limits, Sandbox, Status};

static LOCK: Mutex<()> = Mutex::new(());
const SECRET: &str = "memgen-test-secret-4f1c9a";

fn sandbox(timeout_secs: f64) -> Sandbox {
    Sandbox::new("python3", Limits::with_timeout(timeout_secs, 512), false).unwrap()
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Sandbox processes (uids the sandbox hands out) still alive.
fn sandbox_procs() -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let uid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|u| u.parse().ok())
            .unwrap_or(0);
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        if (200_000..1_200_000).contains(&uid) && !zombie {
            n += 1;
        }
    }
    n
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn infinite_loop_times_out() {
    let _g = lock();
    let t = Instant::now();
    let o = sandbox(1.5).run("while True:\n    pass\n", &[]).unwrap();
    assert_eq!(o.status, Status::Timeout, "{o:?}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // Sleeping (no CPU) is caught by the wall clock too.
    let o = sandbox(1.0)
        .run("import time\ntime.sleep(60)\n", &[])
        .unwrap();
    assert_eq!(o.status, Status::Timeout);
}

#[test]
fn fork_bomb_is_contained() {
    let _g = lock();
    let script =
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n";
    let t = Instant::now();
    let o = sandbox(2.0).run(script, &[]).unwrap();
    assert!(!o.success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    if is_root() {
        assert_eq!(sandbox_procs(), 0, "fork bomb left processes behind");
        // The process limit really applies: at most ~32 live processes.
        let o = sandbox(3.0)
            .run(
                "import os, time\nok = 0\nfor _ in range(100):\n    try:\n        if os.fork() == 0:\n            time.sleep(2)\n            os._exit(0)\n        ok += 1\n    except OSError:\n        pass\nprint(ok, os.getuid(), flush=True)\nos._exit(0)\n",
                &[],
            )
            .unwrap();
        let words: Vec<u64> = o
            .stdout
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect();
        assert!(words[0] < 40, "{o:?}");
        assert!(words[1] >= 200_000, "not running as a sandbox uid: {o:?}");
        assert_eq!(sandbox_procs(), 0);
    }
}

#[test]
fn escaped_daemon_is_killed() {
    let _g = lock();
    // The child leaves its process group and keeps stdout open; the parent exits at once.
    let script = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nelse:\n    print('parent done')\n";
    let t = Instant::now();
    let o = sandbox(3.0).run(script, &[]).unwrap();
    assert!(o.success(), "{o:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    if is_root() {
        assert_eq!(sandbox_procs(), 0, "daemon survived");
    }
}

#[test]
fn huge_allocation_fails_cleanly() {
    let _g = lock();
    let o = sandbox(3.0)
        .run("x = bytearray(8 * 1024 ** 3)\nprint('allocated')\n", &[])
        .unwrap();
    assert!(!o.success());
    assert!(!o.stdout.contains("allocated"));
    assert!(o.stderr.contains("MemoryError"), "{o:?}");
    // Growing step by step hits the same wall.
    let o = sandbox(3.0)
        .run("a = []\nwhile True:\n    a.append(' ' * 10**7)\n", &[])
        .unwrap();
    assert!(!o.success());
}

#[test]
fn output_flood_is_cut() {
    let _g = lock();
    let t = Instant::now();
    let o = sandbox(3.0)
        .run(
            "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
            &[],
        )
        .unwrap();
    assert_eq!(o.status, Status::OutputLimit);
    assert!(o.stdout.len() <= Limits::default().max_output_bytes);
    assert!(t.elapsed() < Duration::from_secs(3));
    let o = sandbox(3.0)
        .run(
            "import sys\nwhile True:\n    sys.stderr.write('e' * 65536)\n",
            &[],
        )
        .unwrap();
    assert_eq!(o.status, Status::OutputLimit);
}

#[test]
fn environment_is_scrubbed() {
    let _g = lock();
    // Only this test binary's own threads read the environment, and they hold the lock.
    unsafe { std::env::set_var("MEMGEN_SECRET_TOKEN", SECRET) };
    let script = r#"
import os
print(sorted(os.environ.items()))
for pid in (os.getppid(), 1):
    try:
        print(open('/proc/%d/environ' % pid, 'rb').read())
    except OSError as e:
        print('denied', e.errno)
"#;
    let o = sandbox(3.0).run(script, &[]).unwrap();
    assert!(o.success(), "{o:?}");
    assert!(!o.stdout.contains("MEMGEN_SECRET_TOKEN"), "{}", o.stdout);
    // No process the code can see (its own pid namespace) carries the evaluator's environment.
    assert!(!o.stdout.contains(SECRET), "{}", o.stdout);
    assert!(o
        .stdout
        .contains("('PATH', '/usr/local/bin:/usr/bin:/bin')"));
}

#[test]
fn cannot_touch_evaluator_files_or_process() {
    let _g = lock();
    // Namespaces isolate for any user: the victim is world-writable, so only the sandbox's mount
    // namespace keeps it safe.
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("weights.safetensors");
    std::fs::write(&victim, b"precious").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let script = format!(
        r#"
import os, signal
results = []
for action in ("overwrite", "create", "remove", "kill"):
    try:
        if action == "overwrite":
            open({victim:?}, "w").write("pwned")
        elif action == "create":
            open({new:?}, "w").write("x")
        elif action == "remove":
            os.remove({victim:?})
        else:
            os.kill({evaluator}, signal.SIGKILL)
        results.append(action + " ok")
    except OSError:
        results.append(action + " denied")
print(results)
"#,
        victim = victim.display().to_string(),
        new = dir.path().join("new.txt").display().to_string(),
        // The evaluator's pid: not in the sandbox's pid namespace.
        evaluator = std::process::id()
    );
    let o = sandbox(3.0).run(&script, &[]).unwrap();
    assert!(o.success(), "{o:?}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!dir.path().join("new.txt").exists());
    assert!(
        o.stdout
            .contains("'overwrite denied', 'create denied', 'remove denied', 'kill denied'"),
        "{}",
        o.stdout
    );
    // And no network.
    let o = sandbox(3.0)
        .run(
            "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    print('connected')\nexcept OSError:\n    print('no network')\n",
            &[],
        )
        .unwrap();
    assert_eq!(o.stdout.trim(), "no network", "{o:?}");
}

#[test]
fn big_files_are_limited() {
    let _g = lock();
    let o = sandbox(3.0)
        .run(
            "f = open('big.bin', 'wb')\nfor _ in range(64):\n    f.write(b'0' * (1 << 20))\nf.close()\nprint('wrote')\n",
            &[],
        )
        .unwrap();
    assert!(!o.success(), "{o:?}");
    assert!(!o.stdout.contains("wrote"));
}
