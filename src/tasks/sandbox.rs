//! Run untrusted Python under limits, isolated.
//!
//! **What holds, and when.** Every run gets a fresh scratch directory, a scrubbed environment
//! (`PATH`, `HOME`, `TMPDIR`, `LANG` only), its own session and process group, a wall-clock
//! timeout that kills the whole group, `RLIMIT_CPU`/`AS`/`NPROC`/`FSIZE`/`NOFILE`, no core files,
//! a cap on captured output, `PR_SET_NO_NEW_PRIVS` and `PR_SET_PDEATHSIG`. On top of that:
//!
//! - [`Isolation::Namespaces`] (the default; needs bubblewrap, `/usr/bin/bwrap`, and
//!   unprivileged user namespaces — both checked once per interpreter by a probe run): the code
//!   runs in new user, pid, network, mount, IPC, UTS and cgroup namespaces. It has **no network**
//!   (not even loopback: a fresh net namespace has only a down `lo`), sees only a **read-only**
//!   `/usr` (plus the `/bin`, `/lib*` links and the interpreter's own prefix when it lives outside
//!   `/usr`), its scratch directory (writable, at `/sandbox`), a private `/tmp`, a minimal `/dev`
//!   and the `/proc` of its own pid namespace — none of the evaluator's files, checkpoints or
//!   processes. It cannot signal the evaluator, and killing the namespace's init (bubblewrap dies
//!   with memgen, and memgen kills it at the end of every run) kills every process it started.
//!   This holds for any user. When the evaluator runs as root the code additionally runs under a
//!   fresh unprivileged uid per run, so `RLIMIT_NPROC` counts only its processes and stragglers can
//!   also be killed by uid; as another user the process limit is the user's count plus
//!   `max_procs`, and concurrent runs share that one per-user count, so a fork bomb in one run
//!   can make a concurrent run fail to start its processes (a wrong 0, never a wrong 1). Without
//!   root, grade one run at a time (`RAYON_NUM_THREADS=1`) when that matters.
//! - [`Isolation::Unsandboxed`] (only when asked for with `allow_unsandboxed_code`; a warning is
//!   printed once): the limits above, a network namespace only if the kernel grants one, and a
//!   fresh uid only as root. As a non-root user the code can then read and write whatever that
//!   user can and reach the network.
//!
//! When neither bubblewrap nor user namespaces work and unsandboxed runs were not allowed,
//! [`Sandbox::new`] fails with an error naming the remedy: untrusted code is never run silently
//! without isolation.
//!
//! Besides stdout/stderr, each run has a third pipe on fd 3 ([`Outcome::report`]): the code
//! grader's trusted harness reports its verdict there (see `code.rs`).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
    /// What the program wrote to fd 3 (the code harness's verdict channel).
    pub report: String,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status == Status::Exited(0)
    }
}

/// How a run is isolated (see the module docs for what each guarantees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// bubblewrap at this path: user, pid, network, mount, IPC, UTS and cgroup namespaces.
    Namespaces(PathBuf),
    /// Limits only (plus a fresh uid as root): explicitly allowed by the configuration.
    Unsandboxed,
}

/// A Python sandbox: the interpreter to use, the limits to apply and the isolation.
#[derive(Debug, Clone)]
pub struct Sandbox {
    python: PathBuf,
    limits: Limits,
    isolation: Isolation,
}

const SAFE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Where the scratch directory appears inside the namespaces.
const SCRATCH: &str = "/sandbox";
/// First uid handed to sandboxed runs when the evaluator is root.
const UID_BASE: u32 = 200_000;
const UID_SPAN: u32 = 1_000_000;
static NEXT_UID: AtomicU32 = AtomicU32::new(0);
/// Probe results per interpreter: the bwrap path, or why namespaces cannot be had.
static PROBES: Mutex<Vec<(PathBuf, std::result::Result<PathBuf, String>)>> = Mutex::new(Vec::new());
static WARNED: AtomicBool = AtomicBool::new(false);

/// The one-line remedy named when isolation is missing.
pub const REMEDY: &str = "install bubblewrap (apt-get install bubblewrap) or, to run untrusted code without isolation, set `allow_unsandboxed_code: true` in the task config (CLI: `--options allow_unsandboxed_code true`)";

impl Sandbox {
    /// A sandbox running `python` (an absolute path, or a name looked up in `SAFE_PATH` — never in
    /// the caller's PATH, whose entries the sandbox user may not be able to read; symlinks are
    /// resolved so the real interpreter can be mounted). Isolation is required unless
    /// `allow_unsandboxed`; then a missing isolation only prints a warning (once per process).
    pub fn new(python: &str, limits: Limits, allow_unsandboxed: bool) -> Result<Self> {
        let found = resolve(python)
            .ok_or_else(|| TaskError::Sandbox(format!("`{python}` not found in {SAFE_PATH}")))?;
        let python = found
            .canonicalize()
            .map_err(|e| TaskError::Sandbox(format!("resolving {}: {e}", found.display())))?;
        match probe(&python) {
            Ok(bwrap) => Ok(Self {
                python,
                limits,
                isolation: Isolation::Namespaces(bwrap),
            }),
            Err(why) if allow_unsandboxed => {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "WARNING: running untrusted code WITHOUT isolation ({why}); it can read and write this user's files and use the network"
                    );
                }
                Ok(Self {
                    python,
                    limits,
                    isolation: Isolation::Unsandboxed,
                })
            }
            Err(why) => Err(TaskError::Sandbox(format!(
                "cannot isolate untrusted code ({why}); {REMEDY}"
            ))),
        }
    }

    pub fn isolation(&self) -> &Isolation {
        &self.isolation
    }

    /// Run `main.py` (with `files` beside it) in a fresh directory; the script's own failures show
    /// in the [`Outcome`], an `Err` means the sandbox itself could not run.
    pub fn run(&self, main: &str, files: &[(&str, &str)]) -> Result<Outcome> {
        let err = |what: &str, e: std::io::Error| TaskError::Sandbox(format!("{what}: {e}"));
        // SAFETY: geteuid has no preconditions and cannot fail.
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
            let uid = fresh_uid();
            chown_tree(dir.path(), uid).map_err(|e| err("handing the scratch dir over", e))?;
            Some(uid)
        } else {
            None
        };
        let nproc = if is_root {
            self.limits.max_procs
        } else {
            // Not root: the limit counts all of our user's processes, so allow for those.
            // SAFETY: getuid has no preconditions and cannot fail.
            count_user_procs(unsafe { libc::getuid() }) + self.limits.max_procs
        };
        let mut cmd = match &self.isolation {
            Isolation::Namespaces(bwrap) => {
                let mut c = Command::new(bwrap);
                c.env_clear()
                    .args(bwrap_args(&self.python, dir.path()))
                    .env("HOME", SCRATCH)
                    .env("TMPDIR", "/tmp");
                c
            }
            Isolation::Unsandboxed => {
                let mut c = Command::new(&self.python);
                c.env_clear()
                    .current_dir(dir.path())
                    .env("HOME", dir.path())
                    .env("TMPDIR", dir.path());
                c
            }
        };
        cmd.args(["-E", "-s", "-B", "main.py"])
            .env("PATH", SAFE_PATH)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The report pipe: our end close-on-exec, the child's end moved to fd 3 before exec.
        let (report_r, report_w) = report_pipe().map_err(|e| err("creating the report pipe", e))?;
        let report_fd = report_w.as_raw_fd();
        let limits = self.limits.clone();
        let try_netns = self.isolation == Isolation::Unsandboxed;
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || child_setup(&limits, nproc, uid, report_fd, try_netns));
        }
        let start = Instant::now();
        let spawned = cmd.spawn();
        // Our copy of the write end must go, or the report reader never sees end-of-file.
        drop(report_w);
        let mut child =
            spawned.map_err(|e| err(&format!("starting {}", self.python.display()), e))?;
        let pid = child.id() as libc::pid_t;
        let overflow = Arc::new(AtomicBool::new(false));
        let cap = self.limits.max_output_bytes;
        let out = Arc::new(Mutex::new(Vec::new()));
        let errb = Arc::new(Mutex::new(Vec::new()));
        let rep = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let mut readers = 1;
        spawn_reader(
            report_r,
            rep.clone(),
            cap,
            overflow.clone(),
            done_tx.clone(),
        );
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
            report: text(&rep),
        })
    }
}

/// Whether namespaces work for `python`: bwrap must exist and a trivial run inside must succeed
/// (as the real runs do: as root under a fresh uid). Probed once per interpreter.
fn probe(python: &Path) -> std::result::Result<PathBuf, String> {
    let mut probes = PROBES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, r)) = probes.iter().find(|(p, _)| p == python) {
        return r.clone();
    }
    let result = (|| {
        let bwrap =
            resolve("bwrap").ok_or_else(|| "bubblewrap (bwrap) is not installed".to_string())?;
        let sb = Sandbox {
            python: python.to_path_buf(),
            limits: Limits::with_timeout(10.0, 1024),
            isolation: Isolation::Namespaces(bwrap.clone()),
        };
        let o = sb.run("print('ok')\n", &[]).map_err(|e| e.to_string())?;
        if o.success() && o.stdout == "ok\n" {
            Ok(bwrap)
        } else {
            let why = o.stderr.lines().next().unwrap_or("no output").to_string();
            Err(format!("bubblewrap cannot create namespaces here: {why}"))
        }
    })();
    probes.push((python.to_path_buf(), result.clone()));
    result
}

/// bwrap's arguments up to the interpreter: every namespace, a read-only system, the scratch dir.
fn bwrap_args(python: &Path, scratch: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = Vec::new();
    let mut push = |xs: &[&std::ffi::OsStr]| a.extend(xs.iter().map(|x| x.to_os_string()));
    let s = |x: &'static str| std::ffi::OsStr::new(x);
    push(&[
        s("--unshare-all"),
        s("--die-with-parent"),
        s("--cap-drop"),
        s("ALL"),
    ]);
    push(&[s("--ro-bind"), s("/usr"), s("/usr")]);
    // Merged-/usr systems have /bin, /lib… as links into /usr; others have real directories.
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        let p = Path::new(top);
        match std::fs::read_link(p) {
            Ok(target) => push(&[s("--symlink"), target.as_os_str(), p.as_os_str()]),
            Err(_) if p.is_dir() => push(&[s("--ro-bind"), p.as_os_str(), p.as_os_str()]),
            Err(_) => {}
        }
    }
    // An interpreter outside /usr (pyenv, conda, /opt): mount its installation prefix.
    if !python.starts_with("/usr") {
        if let Some(prefix) = python.parent().and_then(Path::parent) {
            push(&[s("--ro-bind"), prefix.as_os_str(), prefix.as_os_str()]);
        }
    }
    push(&[
        s("--ro-bind-try"),
        s("/etc/ld.so.cache"),
        s("/etc/ld.so.cache"),
    ]);
    push(&[
        s("--proc"),
        s("/proc"),
        s("--dev"),
        s("/dev"),
        s("--tmpfs"),
        s("/tmp"),
    ]);
    push(&[
        s("--bind"),
        scratch.as_os_str(),
        s(SCRATCH),
        s("--chdir"),
        s(SCRATCH),
    ]);
    push(&[s("--"), python.as_os_str()]);
    a
}

/// A uid no other run of this process is using (a random start so parallel evaluators rarely
/// meet).
fn fresh_uid() -> u32 {
    let n = NEXT_UID.fetch_add(1, Ordering::Relaxed);
    let start = *START_OFFSET.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (super::data::SplitMix64::new(t ^ u64::from(std::process::id())).next_u64()
            % u64::from(UID_SPAN)) as u32
    });
    UID_BASE + (start.wrapping_add(n) % UID_SPAN)
}

/// A pipe whose both ends are close-on-exec (the child's end is moved to fd 3 explicitly).
fn report_pipe() -> std::io::Result<(std::fs::File, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((std::fs::File::from(r), w))
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

/// In the child, between fork and exec: new session, limits, the report pipe on fd 3, (when
/// unsandboxed) a network namespace if the kernel grants one, drop privileges.
fn child_setup(
    limits: &Limits,
    nproc: u64,
    uid: Option<u32>,
    report_fd: libc::c_int,
    try_netns: bool,
) -> std::io::Result<()> {
    let fail = || Err(std::io::Error::last_os_error());
    // SAFETY (whole block): we are in the forked child before exec; every call below is an
    // async-signal-safe system call on plain values or on `r`, a live stack value, and nothing
    // allocates or takes a lock.
    unsafe {
        if libc::setsid() < 0 {
            return fail();
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
        // fd 3 must survive exec: dup2 clears close-on-exec, unless it is already fd 3.
        if report_fd == 3 {
            if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                return fail();
            }
        } else if libc::dup2(report_fd, 3) != 3 {
            return fail();
        }
        if try_netns {
            // Best effort only on the explicitly unsandboxed path (the user was warned).
            let _ = libc::unshare(libc::CLONE_NEWNET);
        }
        if let Some(uid) = uid {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid as libc::gid_t) != 0
                || libc::setuid(uid as libc::uid_t) != 0
            {
                return fail();
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return fail();
        }
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
    // SAFETY: siginfo_t is plain data (all-zero is valid) and waitid only writes into `info`.
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
    // SAFETY: kill has no memory effects; the group is our unreaped child's, so the id is not
    // reused by anyone else.
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
            // SAFETY: kill has no memory effects; `p` runs as the sandbox's own uid.
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
        let sb = Sandbox::new("python3", Limits::default(), false).unwrap();
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
        assert!(Sandbox::new("no-such-python-xyz", Limits::default(), false).is_err());
    }
}
