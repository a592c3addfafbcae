//! `memgen grade`: grade existing completions with a task's grader (the work is
//! [`crate::tasks::grade::grade_file`]).

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::tasks::grade::grade_file;
use crate::tasks::{build_task, TaskConfig};

/// `memgen grade`: grade existing completions.
#[derive(Debug, Clone, clap::Args)]
pub struct GradeArgs {
    /// Task whose grader to use (gsm8k, arith, gpqa, aqua, mcq, kodcode, humaneval, triviaqa, nq).
    #[arg(long)]
    pub task: String,
    /// JSON lines with `completion` and either `gold` (an `answers.jsonl`), the task's raw dataset
    /// columns (a GSM8K, KodCode, AQuA/GPQA or TriviaQA row), or the gold fields themselves.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the graded rows (default: rewrite the input in place, atomically).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Task options as `key value` pairs (e.g. `--options timeout_secs 10 python /usr/bin/python3`).
    #[arg(long, num_args = 1.., value_names = ["KEY", "VALUE"])]
    pub options: Vec<String>,
}

/// Run `memgen grade`: grade, write, print the summary as JSON on stdout.
pub fn run(args: &GradeArgs) -> anyhow::Result<()> {
    if !args.options.len().is_multiple_of(2) {
        anyhow::bail!("--options takes `key value` pairs; got an odd number of words");
    }
    let pairs: Vec<(String, String)> = args
        .options
        .chunks(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect();
    let cfg = TaskConfig::from_options(&args.task, &pairs)?;
    let task = build_task(&cfg)?;
    let mut summary: Map<String, Value> = Map::new();
    summary.insert("task".into(), Value::String(cfg.name.clone()));
    for (k, v) in grade_file(task.as_ref(), &args.input, args.output.as_deref())? {
        summary.insert(k, serde_json::json!(v));
    }
    println!("{}", serde_json::to_string(&Value::Object(summary))?);
    Ok(())
}
