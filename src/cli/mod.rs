//! The `memgen` command line: argument parsing and dispatch; the work lives in the library modules.

mod backbone_cmds;
mod data_cmd;
mod eval_cmd;
mod grade_cmd;
mod memory_args;
mod retriever_cmd;
mod train_cmd;

pub use backbone_cmds::top_logits;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "memgen",
    version,
    about = "MemGen: generative latent memory for LLM agents, on Candle"
)]
pub(crate) struct Cli {
    /// Worker threads for matrix kernels (default: all cores, shared evenly by the MPI ranks
    /// on this node).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// CPU kernels: fused (default), fused-unpacked (no packed weight copies: less memory,
    /// slower decoding; also MEMGEN_PACKED_WEIGHTS=0) or generic (the Candle ops other devices run).
    #[arg(long, global = true)]
    pub kernels: Option<crate::backbone::Kernels>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Generate text from a prompt with the plain backbone (streams to stdout).
    Generate(backbone_cmds::GenerateArgs),
    /// Print token ids and the top-k logits at every position (parity checks against other stacks).
    Score(backbone_cmds::ScoreArgs),
    /// Retrieval for the search tasks: a Search-R1 compatible BM25 server and client.
    Retriever(retriever_cmd::RetrieverArgs),
    /// Fetch or read a dataset source (a file, a directory, or hf://OWNER/NAME/CONFIG/SPLIT into
    /// the hub cache) and print its row count and columns.
    Data(data_cmd::DataArgs),
    /// Grade existing completions (an answers.jsonl, or raw dataset rows plus `completion`) with a
    /// task's grader; print summary metrics.
    Grade(grade_cmd::GradeArgs),
    /// Evaluate on a task's test split (with a trained weaver, or --vanilla): answers.jsonl + metrics.json.
    Eval(eval_cmd::EvalArgs),
    /// Train the weaver (SFT or GRPO, per run.train_weaver_method) from a run config.
    WeaverTrain(train_cmd::TrainArgs),
    /// Train the trigger with GRPO on top of a trained weaver (--load-model-path).
    TriggerTrain(train_cmd::TrainArgs),
}

/// Options every model-loading command shares.
#[derive(Args, Debug, Clone)]
pub(crate) struct ModelArgs {
    /// A .gguf file, a Hugging Face model directory, a hub repo id, or `default` / `qwen`.
    #[arg(long)]
    pub model: Option<String>,
    /// cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype for the frozen weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Parse arguments, run, and turn any error into one line on stderr and a non-zero exit code.
pub fn main() -> i32 {
    crate::allocator::keep_freed_memory();
    let cli = Cli::parse();
    // Before any thread pool starts: MPI (with the `mpi` feature) or the guard against a
    // multi-rank launch of a build without it.
    let _mpi = match crate::distributed::init() {
        Ok(s) => s,
        // Every copy of a guarded launch refuses; the one the launcher calls rank 0 says why.
        Err(crate::distributed::Error::NotBuiltWithMpi { rank, .. }) if rank > 0 => return 1,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let world = crate::distributed::world();
    let threads = cli
        .threads
        .or_else(|| (world.size() > 1).then(|| world.default_threads()));
    if let Some(n) = threads {
        // Candle's CPU kernels size their thread pools from these variables on first use.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
    crate::backbone::Kernels::set_default(kernels_setting(cli.kernels));
    init_tracing();
    match run(cli) {
        Ok(()) => 0,
        // A run stopped by a signal says where its checkpoint is, and exits 128 + the signal.
        // The ranks agree on such stops, so rank 0 alone says it.
        Err(e) if e.is::<crate::signals::Interrupted>() => {
            if world.is_root() {
                eprintln!("{}", one_line(&e));
            }
            crate::signals::exit_code_of(&e)
        }
        Err(e) => fail_every_rank(&e),
    }
}

/// `--kernels`, else the older switch `MEMGEN_PACKED_WEIGHTS=0` (read here, once), else fused.
fn kernels_setting(flag: Option<crate::backbone::Kernels>) -> crate::backbone::Kernels {
    use crate::backbone::Kernels;
    flag.unwrap_or_else(|| match std::env::var("MEMGEN_PACKED_WEIGHTS") {
        Ok(v) if v.trim() == "0" => Kernels::FusedUnpacked,
        _ => Kernels::Fused,
    })
}

/// Print an error and exit 1; under MPI, end every rank (they may be waiting for this one in a
/// collective). Rank 0 prints and aborts at once; another rank waits a second first, so that
/// when every rank hits the same error (bad input), rank 0's abort ends them before they print:
/// one error line either way.
fn fail_every_rank(e: &anyhow::Error) -> i32 {
    let world = crate::distributed::world();
    if world.size() == 1 {
        eprintln!("error: {}", one_line(e));
        return 1;
    }
    if !world.is_root() {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    // In one piece: mpirun merges the ranks' stderr.
    crate::signals::write_whole(&format!(
        "error (rank {} of {}): {}\n",
        world.rank(),
        world.size(),
        one_line(e)
    ));
    world.abort(1)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(a) => backbone_cmds::generate(a),
        Command::Score(a) => backbone_cmds::score(a),
        Command::Retriever(args) => retriever_cmd::run(args),
        Command::Data(args) => data_cmd::run(&args),
        Command::Grade(args) => grade_cmd::run(&args),
        Command::Eval(args) => eval_cmd::run(args),
        Command::WeaverTrain(a) => train_cmd::run(a, train_cmd::Which::Weaver),
        Command::TriggerTrain(a) => train_cmd::run(a, train_cmd::Which::Trigger),
    }
}

/// The error and its causes on one line: "outer: inner: root".
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = strip_backtrace(&cause.to_string()).replace('\n', " ");
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// Candle errors can carry a captured backtrace in their message; a user needs only the message.
fn strip_backtrace(s: &str) -> String {
    let mut out = vec![];
    for line in s.lines() {
        if line.trim_start().starts_with("0: ") {
            break;
        }
        out.push(line.trim_end());
    }
    out.join("\n").trim().to_string()
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MEMGEN_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
