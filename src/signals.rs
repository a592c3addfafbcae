//! Stopping long runs cleanly on SIGINT (Ctrl-C) and SIGTERM (what Slurm, Kubernetes and
//! `timeout` send).
//!
//! The first signal only sets a flag: training loops check it after every optimiser step, save a
//! resumable checkpoint and return [`Interrupted`]; `eval` finishes the batch in flight. The CLI
//! maps [`Interrupted`] to exit code 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as
//! a shell reports a process killed by that signal, so schedulers see the run as stopped, not
//! finished. A second signal exits at once, except inside a [`critical`] section (a checkpoint
//! swap, an appended answers batch): there the exit waits for the section to end, so an abort
//! never leaves a half-written file behind.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering::SeqCst};

/// The first signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// A second signal that arrived inside a critical section: exit when the section ends.
static ABORT: AtomicI32 = AtomicI32::new(0);
/// How many critical sections are open.
static CRITICAL: AtomicUsize = AtomicUsize::new(0);
/// The whole announcement of a first SIGINT and of a first SIGTERM, built once at [`install`] so
/// the handler writes each in one write(2): under mpirun the ranks' stderr are merged, and a
/// message written in pieces interleaves with another rank's.
static ANNOUNCE: std::sync::OnceLock<[String; 2]> = std::sync::OnceLock::new();

pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;

/// Exit code for a run stopped by `signal`: 128 + its number, as a shell reports it.
pub fn exit_code(signal: i32) -> i32 {
    128 + signal
}

pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// The signal that asked the run to stop, if any.
pub fn requested() -> Option<i32> {
    match SIGNAL.load(SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Act on `signal` as if this process had received it (without the announcement): under MPI,
/// a signal that reached another rank stops this one after the same step
/// ([`crate::distributed::World::agree_on_signal`]). A signal already received stays.
pub fn adopt(signal: i32) {
    let _ = SIGNAL.compare_exchange(0, signal, SeqCst, SeqCst);
}

/// A run that stopped on a signal after saving what it could; `message` says where and how to
/// resume. The CLI prints it and exits with [`exit_code`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Interrupted {
    pub signal: i32,
    pub message: String,
}

/// The process exit code for an error: 128 + signal for [`Interrupted`], 1 otherwise.
pub fn exit_code_of(e: &anyhow::Error) -> i32 {
    e.downcast_ref::<Interrupted>()
        .map_or(1, |i| exit_code(i.signal))
}

/// Install the handlers for SIGINT and SIGTERM (the first call wins; later calls do nothing).
/// `note` is printed when the first signal arrives, after "memgen: SIGTERM received: ".
pub fn install(note: &'static str) {
    let announce = [SIGINT, SIGTERM].map(|sig| {
        format!(
            "\nmemgen: {} received: {note} (send it again to abort at once)\n",
            name(sig)
        )
    });
    if ANNOUNCE.set(announce).is_err() {
        return;
    }
    imp::install();
}

/// Write `text` to stderr in one write(2) call. `eprintln!` with arguments writes each piece
/// separately, and under mpirun two ranks' pieces interleave into garbled lines.
pub(crate) fn write_whole(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// While the returned guard lives, a second signal does not kill the process; it exits when the
/// last guard drops.
pub fn critical() -> Critical {
    CRITICAL.fetch_add(1, SeqCst);
    Critical(())
}

pub struct Critical(());

impl Drop for Critical {
    fn drop(&mut self) {
        // Mirror of the handler: it stores ABORT before reading CRITICAL, we decrement before
        // reading ABORT, so one of the two always sees the other and the abort is never lost.
        if CRITICAL.fetch_sub(1, SeqCst) == 1 {
            let a = ABORT.load(SeqCst);
            if a != 0 {
                std::process::exit(exit_code(a));
            }
        }
    }
}

/// Test hook: with `MEMGEN_PAUSE_AT_STEP=N`, wait at point N (after training step N, or after
/// eval batch N) until a signal arrives, so the signal tests stop a real process at a known
/// point without racing it on a loaded machine. Unset (always, outside those tests): no effect.
pub fn pause_for_test(point: usize) {
    let at = std::env::var("MEMGEN_PAUSE_AT_STEP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if at == Some(point) {
        write_whole(&format!("paused at step {point} (MEMGEN_PAUSE_AT_STEP)\n"));
        while requested().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

#[cfg(unix)]
mod imp {
    use super::*;

    fn write_stderr(s: &str) {
        // SAFETY: write(2) is async-signal-safe; the pointer and length come from a live &str.
        unsafe {
            libc::write(2, s.as_ptr().cast(), s.len());
        }
    }

    /// Runs in signal context: only atomics, write(2) and _exit(2), all async-signal-safe.
    extern "C" fn on_signal(sig: libc::c_int) {
        if SIGNAL.compare_exchange(0, sig, SeqCst, SeqCst).is_ok() {
            // The handler is installed only after ANNOUNCE is set, so this reads a value that no
            // longer changes (OnceLock::get is a load, no allocation or lock).
            if let Some(announce) = ANNOUNCE.get() {
                write_stderr(&announce[usize::from(sig == libc::SIGTERM)]);
            }
            return;
        }
        ABORT.store(sig, SeqCst);
        if CRITICAL.load(SeqCst) == 0 {
            // SAFETY: _exit is async-signal-safe and ends the process without running anything.
            unsafe { libc::_exit(exit_code(sig)) }
        }
    }

    pub(super) fn install() {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is
            // an `extern "C" fn(c_int)` as sa_sigaction expects without SA_SIGINFO; SA_RESTART
            // keeps blocking reads and writes from failing with EINTR when a signal lands.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                    tracing::warn!("could not install the handler for signal {sig}");
                }
            }
        }
    }
}

#[cfg(not(unix))]
mod imp {
    use super::*;

    /// Without POSIX signals, Ctrl-C (and console close) through the `ctrlc` crate.
    pub(super) fn install() {
        let _ = ctrlc::set_handler(|| {
            if SIGNAL.compare_exchange(0, SIGINT, SeqCst, SeqCst).is_ok() {
                if let Some(announce) = ANNOUNCE.get() {
                    write_whole(&announce[0]);
                }
                return;
            }
            ABORT.store(SIGINT, SeqCst);
            if CRITICAL.load(SeqCst) == 0 {
                std::process::exit(exit_code(SIGINT));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(SIGINT), 130);
        assert_eq!(exit_code(SIGTERM), 143);
        let e: anyhow::Error = Interrupted {
            signal: SIGTERM,
            message: "stopped".into(),
        }
        .into();
        assert_eq!(exit_code_of(&e), 143);
        assert_eq!(exit_code_of(&anyhow::anyhow!("bad input")), 1);
        assert_eq!(e.to_string(), "stopped");
    }
}
