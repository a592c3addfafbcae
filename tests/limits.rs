//! Limits up front: requests longer than a backbone's context (`max_position_embeddings`, 8192 for
//! the default SmolLM2) fail at once with one line, for `generate`, `score`, `eval` and GRPO
//! prompts; over-long SFT rows are skipped and counted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use memgen::memory::{MemGenModel, MemGenSpec};
use memgen::tasks::{render_chatml, Message, Sample};
use memgen::training::sft;

/// The tests here take turns: the timed one must not share the CPU with the others' model
/// loads (the machine is small and shared).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn models_dir() -> PathBuf {
    match std::env::var("MEMGEN_MODELS_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => common::model("default").parent().unwrap().to_path_buf(),
    }
}

fn memgen(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_memgen"))
        .args(["--threads", "2"])
        .args(args)
        .current_dir(common::root())
        .env("MEMGEN_MODELS_DIR", models_dir())
        .output()
        .expect("running memgen");
    (out, t.elapsed())
}

/// The one-line error of a failed run.
fn error_line(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(!err.contains("panicked"), "{err}");
    lines[0].to_string()
}

/// `n` words: SmolLM2's tokenizer makes one token of each ` word` (plus one for the first).
fn words(n: usize) -> String {
    "word ".repeat(n)
}

#[test]
fn over_long_generate_fails_at_once() {
    let _turn = turn();
    let prompt = words(20_000);
    // The best of three runs: the machine is shared, and the other tests here load models at
    // the same time; what is measured is that no weights load and no prefill happen.
    let runs: Vec<(Output, Duration)> = (0..3)
        .map(|_| memgen(&["generate", "--prompt", &prompt, "--max-new-tokens", "256"]))
        .collect();
    let took = runs.iter().map(|r| r.1).min().unwrap();
    let out = &runs[0].0;
    let e = error_line(out);
    assert!(
        e.contains("the prompt: 20001 tokens + 256 max_new_tokens = 20257 positions exceed the model's context of 8192 (max_position_embeddings)"),
        "{e}"
    );
    eprintln!("over-long generate answered in {:.3} s", took.as_secs_f64());
    // Only the model's header is read: no weights load, no prefill.
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(out.stdout.is_empty());

    let (out, _) = memgen(&["score", "--text", &prompt]);
    let e = error_line(&out);
    assert!(
        e.contains("the text: 20001 tokens = 20001 positions exceed the model's context of 8192"),
        "{e}"
    );
}

#[test]
fn memory_latents_count_towards_the_context() {
    let _turn = turn();
    // 8150 tokens + 30 new fit 8192 alone; the memory's 8 + 5 × 8 latents do not.
    let prompt = words(8149);
    let (out, _) = memgen(&[
        "generate",
        "--prompt",
        &prompt,
        "--max-new-tokens",
        "30",
        "--max-inference-aug-num",
        "5",
    ]);
    let e = error_line(&out);
    assert!(
        e.contains("the prompt: 8150 tokens + 30 max_new_tokens + 48 memory latents (at most) = 8228 positions exceed the reasoner's context of 8192"),
        "{e}"
    );
}

fn write_gsm8k(dir: &Path, name: &str, questions: &[String]) -> PathBuf {
    let p = dir.join(name);
    let text: String = questions
        .iter()
        .map(|q| {
            format!(
                "{}\n",
                serde_json::json!({"question": q, "answer": "2+3=5\n#### 5"})
            )
        })
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn eval_checks_every_prompt_before_the_first_batch() {
    let _turn = turn();
    let tmp = tempfile::tempdir().unwrap();
    let test = write_gsm8k(
        tmp.path(),
        "test.jsonl",
        &["What is 2+3?".into(), words(9000)],
    );
    let out_dir = tmp.path().join("run");
    let (out, _) = memgen(&[
        "eval",
        "--config",
        "configs/latent_memory/gsm8k.yaml",
        "--vanilla",
        "--output-dir",
        out_dir.to_str().unwrap(),
        "--options",
        "datasets.gsm8k.test_path",
        test.to_str().unwrap(),
        "run.weaver.sft.report_to",
        "[tensorboard]",
    ]);
    // An accepted-but-ignored key draws its one warning line at start-up.
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let warned: Vec<&str> = err.lines().filter(|l| l.contains("report_to")).collect();
    assert_eq!(warned.len(), 1, "{err}");
    assert!(warned[0].starts_with(
        "warning: config: run.weaver.sft.report_to is accepted for compatibility with the original and ignored"
    ));
    let e = error_line(&out);
    assert!(e.contains("test row test:2:"), "{e}");
    assert!(e.contains("exceed the reasoner's context of 8192"), "{e}");
    // Nothing was generated, so nothing half-written either.
    assert!(!out_dir.join("evaluate/answers.jsonl").exists());
}

#[test]
fn grpo_skips_prompts_that_cannot_fit_with_a_counted_warning() {
    let _turn = turn();
    let tmp = tempfile::tempdir().unwrap();
    let train = write_gsm8k(tmp.path(), "train.jsonl", &[words(9000), words(9100)]);
    let (out, _) = memgen(&[
        "weaver-train",
        "--config",
        "configs/latent_memory/gsm8k.yaml",
        "--output-dir",
        tmp.path().join("run").to_str().unwrap(),
        "--options",
        "run.train_weaver_method",
        "grpo",
        "datasets.gsm8k.mode",
        "grpo",
        "datasets.gsm8k.train_path",
        train.to_str().unwrap(),
        "datasets.gsm8k.valid_path",
        train.to_str().unwrap(),
        "run.weaver.grpo.max_prompt_length",
        "100000",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let warn: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("warning: skipped"))
        .collect();
    assert_eq!(
        warn,
        vec!["warning: skipped 4 of 4 training rows longer than the contexts (reasoner 8192 positions) as prompt + max_completion_length 512 + memory latents"],
        "{err}"
    );
    let e = error_line(&out);
    assert!(e.contains("no training prompt fits"), "{e}");
}

#[test]
fn sft_rows_cut_to_max_length_and_skip_what_cannot_fit() {
    let _turn = turn();
    let spec = MemGenSpec::new(common::model("default").to_str().unwrap());
    let m = MemGenModel::build(&spec, &candle_core::Device::Cpu).unwrap();
    let sample = |id: &str, q: String| Sample {
        id: id.into(),
        messages: vec![Message::user(q)],
        target: Some("2+3=5. So \\boxed{5}".into()),
        gold: serde_json::json!({"answer": "5"}),
    };
    let samples = vec![
        sample("short", "What is 2+3?".into()),
        sample("long", words(9000)),
        sample("fills", words(8170)),
    ];
    // max_length beyond the context: both long rows cannot run with their memories' latents.
    let (rows, n) = sft::sft_rows(&m, &samples, 100_000).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((n.total, n.cut, n.unusable, n.over_context), (3, 0, 0, 2));
    // The original's max_length: answers cut (kept), prompts that fill it skipped.
    let (rows, n) = sft::sft_rows(&m, &samples, 1024).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((n.total, n.cut, n.unusable, n.over_context), (3, 0, 2, 0));
    let p = m
        .tokenizer
        .encode(&render_chatml(&samples[0].messages, true))
        .unwrap()
        .len();
    let (rows, n) = sft::sft_rows(&m, &samples[..1], p + 3).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].tokens.len(), p + 3);
    assert_eq!((n.cut, n.unusable, n.over_context), (1, 0, 0));
}
