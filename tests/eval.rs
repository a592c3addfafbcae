//! `memgen eval` end to end with the default model (SmolLM2-135M): vanilla GSM8K with resume, the
//! search task against the built-in retriever, a saved checkpoint, and bad inputs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use memgen::retrieval::index::Bm25Index;
use memgen::retrieval::server::{BackgroundServer, ServerOptions};
use serde_json::Value;

/// Where the models are: `$MEMGEN_MODELS_DIR`, else the test helper's `models/` (fetched once).
fn models_dir() -> PathBuf {
    match std::env::var("MEMGEN_MODELS_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => common::model("default").parent().unwrap().to_path_buf(),
    }
}

fn memgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memgen"))
        .args(["--threads", "2"])
        .args(args)
        .current_dir(common::root())
        .env("MEMGEN_MODELS_DIR", models_dir())
        // The shipped configs name hub datasets; tests pass local files and must never fetch.
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("running memgen")
}

/// A file of the shared test data (fails, naming it, when the data is missing).
fn shared_data(rel: &str) -> String {
    let p = common::shared().join("data").join(rel);
    assert!(p.is_file(), "missing test data {}", p.display());
    p.to_str().unwrap().to_string()
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "memgen failed: {err}");
    err
}

fn rows(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("evaluate/answers.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn metrics(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("evaluate/metrics.json")).unwrap())
        .unwrap()
}

fn gsm8k(out: &Path, n: usize, extra: &[&str]) -> Output {
    let n = n.to_string();
    let test = shared_data("gsm8k/test.jsonl");
    let mut args = vec![
        "eval",
        "--config",
        "configs/latent_memory/gsm8k.yaml",
        "--output-dir",
        out.to_str().unwrap(),
        "--max-samples",
        &n,
        "--batch-size",
        "3",
        "--options",
        "datasets.gsm8k.test_path",
        &test,
        "run.generation.max_new_tokens",
        "24",
    ];
    args.extend_from_slice(extra);
    memgen(&args)
}

#[test]
fn vanilla_gsm8k_then_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ok(&gsm8k(tmp.path(), 2, &["--vanilla"]));
    assert!(err.contains("0 already"), "{err}");
    let first = std::fs::read_to_string(tmp.path().join("evaluate/answers.jsonl")).unwrap();
    assert_eq!(first.lines().count(), 2);

    // Resume with one more row: only that row is generated, the first two stay as they were.
    let err = ok(&gsm8k(tmp.path(), 3, &["--vanilla"]));
    assert!(err.contains("2 already"), "{err}");
    assert!(err.contains("1 to generate"), "{err}");
    let all = std::fs::read_to_string(tmp.path().join("evaluate/answers.jsonl")).unwrap();
    assert!(all.starts_with(&first));
    let rs = rows(tmp.path());
    assert_eq!(rs.len(), 3);
    for r in &rs {
        for k in [
            "id",
            "prompt",
            "completion",
            "extracted",
            "gold",
            "reward",
            "metrics",
            "insertion_points",
        ] {
            assert!(r.get(k).is_some(), "row lacks `{k}`: {r}");
        }
        assert!(r["prompt"]
            .as_str()
            .unwrap()
            .ends_with("<|im_start|>assistant\n"));
        assert!(r["insertion_points"].as_array().unwrap().is_empty());
        assert!(r["metrics"].get("lenient_accuracy").is_some());
        assert!(r["gold"].get("answer").is_some());
    }
    let m = metrics(tmp.path());
    assert_eq!(m["n"], 3);
    assert_eq!(m["generated_rows"], 1);
    assert_eq!(m["insertions_per_answer"], 0.0);
    let acc = m["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(m["tokens_per_sec"].as_f64().unwrap() > 0.0);
    assert!(m["wall_time_secs"].as_f64().unwrap() > 0.0);

    // Everything done: nothing is generated again.
    let err = ok(&gsm8k(tmp.path(), 3, &["--vanilla"]));
    assert!(err.contains("0 to generate"), "{err}");
    assert_eq!(rows(tmp.path()).len(), 3);
}

#[test]
fn search_task_against_the_builtin_retriever() {
    let corpus = common::shared().join("data/wiki18_sample/corpus.jsonl");
    let (index, _) = Bm25Index::open_or_build(&corpus, None, false).unwrap();
    let server = BackgroundServer::start(
        Arc::new(index),
        ServerOptions::default(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let url = server.url();
    let tmp = tempfile::tempdir().unwrap();
    let test = shared_data("triviaqa/topics.dpr.trivia.test.txt");
    let out = memgen(&[
        "eval",
        "--config",
        "configs/latent_memory/triviaqa.yaml",
        "--allow-untrained",
        "--output-dir",
        tmp.path().to_str().unwrap(),
        "--max-samples",
        "2",
        "--options",
        "datasets.triviaqa.test_path",
        &test,
        "run.generation.max_new_tokens",
        "16",
        "run.generation.max_turns",
        "2",
        "model.weaver.prompt_latents_len",
        "2",
        "retrieval.url",
        &url,
    ]);
    ok(&out);
    let rs = rows(tmp.path());
    assert_eq!(rs.len(), 2);
    for r in &rs {
        let turns = r["turns"].as_array().expect("turns");
        assert!(!turns.is_empty() && turns.len() <= 2, "{r}");
        // One prompt memory at the start of every assistant turn (cap 6 > 2 turns).
        let points = r["insertion_points"].as_array().unwrap();
        assert_eq!(points.len(), turns.len());
        for (p, t) in points.iter().zip(turns) {
            assert_eq!(p["kind"], "prompt");
            assert_eq!(p["pos"], t["start"]);
        }
        assert!(r["metrics"].get("em").is_some());
        assert!(r["gold"].is_object());
    }
    let m = metrics(tmp.path());
    assert_eq!(m["n"], 2);
    assert!(m["turns_per_answer"].as_f64().unwrap() >= 1.0);
}

#[test]
fn eval_a_saved_checkpoint() {
    std::env::set_var("MEMGEN_MODELS_DIR", models_dir());
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    let mut spec = memgen::memory::MemGenSpec::new("default");
    spec.prompt_latents_len = 2;
    spec.inference_latents_len = 2;
    let m = memgen::memory::MemGenModel::build(&spec, &candle_core::Device::Cpu).unwrap();
    m.save(&ckpt).unwrap();
    drop(m);
    let out_dir = tmp.path().join("run");
    ok(&gsm8k(
        &out_dir,
        2,
        &[
            "model.max_inference_aug_num",
            "2",
            "--load-model-path",
            ckpt.to_str().unwrap(),
        ],
    ));
    let rs = rows(&out_dir);
    assert_eq!(rs.len(), 2);
    for r in &rs {
        let points = r["insertion_points"].as_array().unwrap();
        let prompt_tokens = r["prompt_tokens"].as_u64().unwrap();
        assert_eq!(points[0]["kind"], "prompt");
        assert_eq!(points[0]["pos"].as_u64().unwrap(), prompt_tokens);
        assert!(points.len() <= 3);
        for p in &points[1..] {
            assert_eq!(p["kind"], "inference");
            assert!(p["pos"].as_u64().unwrap() > prompt_tokens);
        }
    }
    let m = metrics(&out_dir);
    assert!(m["insertions_per_answer"].as_f64().unwrap() >= 1.0);
    assert_eq!(
        m["model"],
        ckpt.join("model.safetensors").display().to_string()
    );
}

fn one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let err = err.trim_end();
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(needle), "{err}");
}

#[test]
fn bad_inputs() {
    let test = shared_data("gsm8k/test.jsonl");
    one_line_error(
        &memgen(&["eval", "--config", "no/such.yaml", "--vanilla"]),
        "no/such.yaml",
    );
    one_line_error(
        &memgen(&[
            "eval",
            "--config",
            "configs/latent_memory/gsm8k.yaml",
            "--options",
            "datasets.gsm8k.test_path",
            &test,
            "--vanilla",
            "--load-model-path",
            "x",
        ]),
        "--vanilla and --load-model-path",
    );
    one_line_error(
        &memgen(&[
            "eval",
            "--config",
            "configs/latent_memory/gsm8k.yaml",
            "--options",
            "datasets.gsm8k.test_path",
            &test,
            "--max-samples",
            "1",
        ]),
        "--load-model-path",
    );
    one_line_error(
        &memgen(&[
            "eval",
            "--config",
            "configs/latent_memory/gsm8k.yaml",
            "--options",
            "datasets.gsm8k.test_path",
            &test,
            "--load-model-path",
            "/no/such/ckpt",
        ]),
        "no such checkpoint",
    );
}

#[test]
fn resume_refuses_other_settings() {
    let tmp = tempfile::tempdir().unwrap();
    ok(&gsm8k(tmp.path(), 1, &["--vanilla"]));
    let out = gsm8k(
        tmp.path(),
        2,
        &[
            "--vanilla",
            "--options",
            "run.generation.max_new_tokens",
            "12",
        ],
    );
    one_line_error(&out, "max_new_tokens");
    assert_eq!(rows(tmp.path()).len(), 1);
}
