//! The `memgen` command line: argument parsing and dispatch; the work lives in the library modules.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "memgen",
    version,
    about = "MemGen: generative latent memory for LLM agents, on Candle"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Grade existing completions (an answers.jsonl) with a task's grader; print summary metrics.
    Grade(crate::tasks::grade::GradeArgs),
}

/// Parse arguments, run, and turn any error into one line on stderr and a non-zero exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            1
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Grade(args) => crate::tasks::grade::run_grade(&args),
    }
}

/// The error and its causes on one line: "outer: inner: root".
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string().replace('\n', " ");
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MEMGEN_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
