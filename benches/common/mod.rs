//! What the bench binaries share: argument parsing and the CLI's one-line error exit.

/// Run a bench's body; an error (bad arguments, a missing file) ends as one line on stderr and
/// exit status 1, as in the `memgen` CLI, never a backtrace.
pub fn main(run: fn() -> anyhow::Result<()>) {
    // As the `memgen` binary does, so the benches time what users run.
    memgen::keep_freed_memory();
    if let Err(e) = run() {
        eprintln!("error: {}", memgen::cli::one_line(&e));
        std::process::exit(1);
    }
}

/// The optional whole-number argument `name` (from the command line or the environment).
pub fn whole(name: &str, v: Option<&str>, default: usize) -> anyhow::Result<usize> {
    v.map_or(Ok(default), |s| {
        s.parse()
            .map_err(|_| anyhow::anyhow!("{name} must be a whole number, got {s:?}"))
    })
}
