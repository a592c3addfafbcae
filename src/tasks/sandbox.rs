//! Run untrusted Python under limits.
//!
//! Each run gets a fresh temporary directory and a child `python3` with: a scrubbed environment
//! (only a minimal `PATH`, `HOME`, `LANG`), its own session and process group, a wall-clock
//! timeout that kills the whole group, `RLIMIT_CPU`, `RLIMIT_AS`, `RLIMIT_NPROC`, `RLIMIT_FSIZE`,
//! `RLIMIT_NOFILE` and no core files, a cap on captured output, `PR_SET_NO_NEW_PRIVS`, a private
//! network namespace when the kernel allows it (then there is no network), and — when the
//! evaluator runs as root — a fresh unprivileged uid/gid per run, so the process-count limit
//! applies, the code cannot touch the evaluator's files or read its `/proc` entries, and every
//! process it leaves behind can be found and killed by uid.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Result, TaskError};

/// Resource limits for one run.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Wall-clock limit.
    pub timeout: Duration,
    /// CPU seconds (`RLIMIT_CPU`).
    pub cpu_secs: u64,
    /// Address space, bytes (`RLIMIT_AS`).
    pub memory_bytes: u64,
    /// Processes/threads of the sandbox user (`RLIMIT_NPROC`).
    pub max_procs: u64,
    /// Largest file the code may write, bytes (`RLIMIT_FSIZE`).
    pub max_file_bytes: u64,
    /// Captured stdout/stderr, bytes each; more kills the run.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            cpu_secs: 10,
            memory_bytes: 1 << 30,
            max_procs: 32,
            max_file_bytes: 16 << 20,
            max_output_bytes: 1 << 20,
        }
    }
}

impl Limits {
    /// Limits for a wall-clock budget of `secs` and `memory_mb` of address space.
    pub fn with_timeout(secs: f64, memory_mb: u64) -> Self {
        Self {
            timeout: Duration::from_secs_f64(secs),
            cpu_secs: secs.ceil() as u64 + 1,
            memory_bytes: memory_mb << 20,
            ..Self::default()
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal (e.g. SIGXCPU, SIGKILL from the OOM path).
    Signaled(i32),
    /// Over the wall-clock limit; killed.
    Timeout,
    /// Wrote more than `max_output_bytes`; killed.
    OutputLimit,
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Status,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status == Status::Exited(0)
    }
}

/// A Python sandbox: the interpreter to use and the limits to apply.
#[derive(Debug, Clone)]
pub struct Sandbox {
    python: PathBuf,
    limits: Limits,
}

const SAFE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// First uid handed to sandboxed runs when the evaluator is root.
const UID_BASE: u32 = 200_000;
const UID_SPAN: u32 = 1_000_000;
static NEXT_UID: AtomicU32 = AtomicU32::new(0);

impl Sandbox {
    /// A sandbox running `python` (an absolute path, or a name looked up in `SAFE_PATH` — never in
    /// the caller's PATH, whose entries the sandbox user may not be able to read).
    pub fn new(python: &str, limits: Limits) -> Result<Self> {
        let python = resolve(python)
            .ok_or_else(|| TaskError::Sandbox(format!("`{python}` not found in {SAFE_PATH}")))?;
        Ok(Self { python, limits })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Run `main.py` (with `files` beside it) in a fresh directory; the script's own failures show
    /// in the [`Outcome`], an `Err` means the sandbox itself could not run.
    pub fn run(&self, main: &str, files: &[(&str, &str)]) -> Result<Outcome> {
        let err = |what: &str, e: std::io::Error| TaskError::Sandbox(format!("{what}: {e}"));
        let is_root = unsafe { libc::geteuid() } == 0;
        // As root the code runs as another user, who must be able to reach the directory: use
        // /tmp rather than a TMPDIR that may sit inside a private home.
        let parent = if is_root && Path::new("/tmp").is_dir() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("memgen-sandbox-")
            .tempdir_in(&parent)
            .map_err(|e| err("creating the scratch directory", e))?;
        write_file(&dir.path().join("main.py"), main).map_err(|e| err("writing main.py", e))?;
        for (name, text) in files {
            if name.contains('/') || name.starts_with('.') {
                return Err(TaskError::Sandbox(format!("bad file name `{name}`")));
            }
            write_file(&dir.path().join(name), text)
                .map_err(|e| err(&format!("writing {name}"), e))?;
        }
        let uid = if is_root {
            // A fresh uid per run (start at a random offset so parallel evaluators rarely meet).
            let n = NEXT_UID.fetch_add(1, Ordering::Relaxed);
            let start = *START_OFFSET.get_or_init(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                (super::data::SplitMix64::new(t ^ u64::from(std::process::id())).next_u64()
                    % u64::from(UID_SPAN)) as u32
            });
            let uid = UID_BASE + (start.wrapping_add(n) % UID_SPAN);
            chown_tree(dir.path(), uid).map_err(|e| err("handing the scratch dir over", e))?;
            Some(uid)
        } else {
            None
        };
        let nproc = if is_root {
            self.limits.max_procs
        } else {
            // Not root: the limit counts all of our user's processes, so allow for those.
            count_user_procs(unsafe { libc::getuid() }) + self.limits.max_procs
        };
        let limits = self.limits.clone();
        let mut cmd = Command::new(&self.python);
        cmd.args(["-E", "-s", "-B", "main.py"])
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", SAFE_PATH)
            .env("HOME", dir.path())
            .env("TMPDIR", dir.path())
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || child_setup(&limits, nproc, uid));
        }
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| err(&format!("starting {}", self.python.display()), e))?;
        let pid = child.id() as libc::pid_t;
        let overflow = Arc::new(AtomicBool::new(false));
        let cap = self.limits.max_output_bytes;
        let out = Arc::new(Mutex::new(Vec::new()));
        let errb = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let mut readers = 0;
        if let Some(s) = child.stdout.take() {
            spawn_reader(s, out.clone(), cap, overflow.clone(), done_tx.clone());
            readers += 1;
        }
        if let Some(s) = child.stderr.take() {
            spawn_reader(s, errb.clone(), cap, overflow.clone(), done_tx.clone());
            readers += 1;
        }
        drop(done_tx);
        // Poll without reaping, so the process group id stays ours until everything is killed.
        let status = loop {
            match exited_nowait(pid) {
                Ok(true) => {
                    kill_all(pid, uid);
                    break child
                        .wait()
                        .map(exit_status)
                        .map_err(|e| err("waiting", e))?;
                }
                Ok(false) => {}
                Err(e) => {
                    kill_all(pid, uid);
                    let _ = child.wait();
                    return Err(err("waiting for the child", e));
                }
            }
            if overflow.load(Ordering::Relaxed) {
                kill_all(pid, uid);
                let _ = child.wait();
                break Status::OutputLimit;
            }
            if start.elapsed() >= self.limits.timeout {
                kill_all(pid, uid);
                let _ = child.wait();
                break Status::Timeout;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let elapsed = start.elapsed();
        // Stragglers that escaped the group (new sessions) die by uid.
        if let Some(u) = uid {
            kill_uid(u);
        }
        // Readers end when every holder of the pipes is gone; don't wait forever for them.
        let deadline = Instant::now() + Duration::from_secs(1);
        for _ in 0..readers {
            let left = deadline.saturating_duration_since(Instant::now());
            if done_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        let status = if overflow.load(Ordering::Relaxed) {
            Status::OutputLimit
        } else {
            status
        };
        let text = |b: &Arc<Mutex<Vec<u8>>>| {
            String::from_utf8_lossy(&b.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
        };
        Ok(Outcome {
            status,
            stdout: text(&out),
            stderr: text(&errb),
            elapsed,
        })
    }
}

static START_OFFSET: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

fn resolve(python: &str) -> Option<PathBuf> {
    let p = Path::new(python);
    if p.is_absolute() {
        return p.is_file().then(|| p.to_path_buf());
    }
    SAFE_PATH
        .split(':')
        .map(|d| Path::new(d).join(python))
        .find(|c| c.is_file())
}

fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn chown_tree(dir: &Path, uid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        std::os::unix::fs::chown(&path, Some(uid), Some(uid))?;
    }
    Ok(())
}

/// In the child, between fork and exec: new session, limits, no network, drop privileges.
fn child_setup(limits: &Limits, nproc: u64, uid: Option<u32>) -> std::io::Result<()> {
    unsafe {
        if libc::setsid() < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let set = |res, v: u64| -> std::io::Result<()> {
            let r = libc::rlimit {
                rlim_cur: v as libc::rlim_t,
                rlim_max: v as libc::rlim_t,
            };
            if libc::setrlimit(res, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        set(libc::RLIMIT_CPU, limits.cpu_secs)?;
        set(libc::RLIMIT_AS, limits.memory_bytes)?;
        set(libc::RLIMIT_FSIZE, limits.max_file_bytes)?;
        set(libc::RLIMIT_NOFILE, 256)?;
        set(libc::RLIMIT_CORE, 0)?;
        set(libc::RLIMIT_NPROC, nproc)?;
        // No network where the kernel lets us make a namespace; ignore failure.
        let _ = libc::unshare(libc::CLONE_NEWNET);
        if let Some(uid) = uid {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid as libc::gid_t) != 0
                || libc::setuid(uid as libc::uid_t) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        // Die with the evaluator (set after the uid change, which clears it).
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    Ok(())
}

fn spawn_reader(
    mut src: impl Read + Send + 'static,
    buf: Arc<Mutex<Vec<u8>>>,
    cap: usize,
    overflow: Arc<AtomicBool>,
    done: std::sync::mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match src.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
                    let room = cap.saturating_sub(b.len());
                    b.extend_from_slice(&chunk[..n.min(room)]);
                    if n > room {
                        overflow.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
        let _ = done.send(());
    });
}

fn exit_status(st: std::process::ExitStatus) -> Status {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => Status::Exited(c),
        (None, Some(s)) => Status::Signaled(s),
        (None, None) => Status::Exited(-1),
    }
}

/// Whether `pid` has exited, without reaping it.
fn exited_nowait(pid: libc::pid_t) -> std::io::Result<bool> {
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(info.si_pid() != 0)
    }
}

/// Kill the child's process group (the child itself not yet reaped, so the id is still ours) and,
/// when it ran under its own uid, every process of that uid.
fn kill_all(pgid: libc::pid_t, uid: Option<u32>) {
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    if let Some(uid) = uid {
        kill_uid(uid);
    }
}

fn kill_uid(uid: u32) {
    for _ in 0..100 {
        let pids = user_pids(uid);
        if pids.is_empty() {
            return;
        }
        for p in pids {
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Pids (not zombies) whose real uid is `uid`.
fn user_pids(uid: u32) -> Vec<libc::pid_t> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let mut owned = false;
        let mut zombie = false;
        for line in status.lines() {
            if let Some(rest) = line.strip_prefix("Uid:") {
                owned = rest.split_whitespace().next() == Some(&uid.to_string());
            } else if let Some(rest) = line.strip_prefix("State:") {
                zombie = rest.trim_start().starts_with('Z');
            }
        }
        if owned && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// Tasks (threads included, as `RLIMIT_NPROC` counts them) of user `uid`.
fn count_user_procs(uid: u32) -> u64 {
    user_pids(uid)
        .into_iter()
        .map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Threads:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(1)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_python() {
        let sb = Sandbox::new("python3", Limits::default()).unwrap();
        let o = sb.run("print('hi')\n", &[]).unwrap();
        assert!(o.success(), "{o:?}");
        assert_eq!(o.stdout, "hi\n");
        let o = sb
            .run(
                "import helper\nprint(helper.X)\n",
                &[("helper.py", "X = 7\n")],
            )
            .unwrap();
        assert_eq!(o.stdout, "7\n", "{o:?}");
        let o = sb.run("raise SystemExit(3)\n", &[]).unwrap();
        assert_eq!(o.status, Status::Exited(3));
        assert!(Sandbox::new("no-such-python-xyz", Limits::default()).is_err());
    }
}
