//! Safe stops with real signals sent to a real `memgen` process: SIGTERM and SIGINT stop weaver
//! SFT, trigger GRPO and `eval` with exit code 128 + signal and a complete checkpoint (or whole
//! answer rows); resuming finishes bit-identical to an uninterrupted run; a resume with changed
//! settings is refused unless `--resume-anyway`.
//!
//! The runs use a tiny random model saved as a Hugging Face directory (with SmolLM2's tokenizer),
//! so a step takes milliseconds. Timing is not raced: `MEMGEN_PAUSE_AT_STEP=N` makes the process
//! wait after step N until the signal arrives.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

/// A run config for the tiny model in `model_dir`: weaver SFT of 6 steps (dropout on, so the
/// resume covers the dropout RNG), trigger GRPO of 4 steps with sampled decisions, arith data.
fn write_config(dir: &Path, model_dir: &Path) -> PathBuf {
    let lora = "{r: 2, lora_alpha: 4, target_modules: [q_proj, v_proj], lora_dropout: 0.1}";
    let yaml = format!(
        r#"model:
  reasoner_model_name: "{model}"
  max_prompt_aug_num: 1
  max_inference_aug_num: 2
  # Letters too: the random model rarely samples punctuation, and trigger GRPO learns only where
  # it meets boundaries (its reward varies with the insertion penalty).
  delimiters: [",", ".", "\n", e, s, t, n]
  weaver: {{prompt_latents_len: 2, inference_latents_len: 2, peft_config: {lora}}}
  trigger: {{peft_config: {lora}}}
datasets:
  arith: {{mode: sft, train_size: 12, valid_size: 2, test_size: 6}}
run:
  seed: 5
  weaver:
    sft: {{max_steps: 6, per_device_train_batch_size: 2, learning_rate: 1.0e-2, warmup_ratio: 0.0,
          logging_steps: 1, eval_strategy: steps, eval_steps: 2, save_strategy: steps,
          save_steps: 100, max_length: 160}}
  trigger:
    grpo: {{max_steps: 4, per_device_train_batch_size: 4, num_generations: 2,
           max_completion_length: 12, learning_rate: 1.0e-1, insertion_penalty: 0.5,
           eval_strategy: "no", save_strategy: steps, save_steps: 100}}
  generation: {{max_new_tokens: 8, batch_size: 2}}
"#,
        model = model_dir.display(),
    );
    let p = dir.join("run.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

use common::RunSetup as Setup;

fn setup() -> Setup {
    common::run_setup(write_config)
}

impl Setup {
    fn out(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_memgen"));
        c.args(["--threads", "1"])
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("MEMGEN_PAUSE_AT_STEP");
        c
    }
}

/// Exit code and stderr of a finished command.
fn run(mut c: Command) -> (i32, String) {
    let o = c.output().expect("running memgen");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(c: Command) -> String {
    let (code, err) = run(c);
    assert_eq!(code, 0, "memgen failed: {err}");
    err
}

/// Start `c` paused after step `at`, send `signal` once it says so, and return its exit code and
/// stderr.
fn stop_at(mut c: Command, at: usize, signal: i32) -> (i32, String) {
    let mut child = c
        .env("MEMGEN_PAUSE_AT_STEP", at.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting memgen");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let want = format!("paused at step {at}");
    // Generous: the machine may be loaded, and the wait ends as soon as the line appears.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(&want) => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "memgen never reached step {at}: {}",
                    reader.join().unwrap_or_default()
                );
            }
        }
    }
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill failed");
    let status = child.wait().unwrap();
    let err = reader.join().unwrap();
    (status.code().unwrap_or(-1), err)
}

fn trainer_state(ckpt: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
        .unwrap()
}

/// The stop left a complete, resumable checkpoint at `step` and nothing half-made beside it.
fn assert_stopped_cleanly(out: &Path, step: usize, final_dir: &str, err: &str) {
    let ckpt = out.join("checkpoint-last");
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(f).is_file(), "checkpoint lacks {f}: {err}");
    }
    assert_eq!(trainer_state(&ckpt)["step"], step, "{err}");
    assert!(trainer_state(&ckpt)["settings"]["run.seed"] == "5");
    assert!(!out.join("checkpoint-last.tmp").exists());
    assert!(!out.join("checkpoint-last.old").exists());
    assert!(
        !out.join(final_dir).exists(),
        "a stopped run saved a final model"
    );
    // The last line says where the checkpoint is and how to resume.
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains(&ckpt.display().to_string()) && last.contains("run the same command again"),
        "{err}"
    );
}

fn assert_same_tensors(a: &Path, b: &Path, files: &[&str]) {
    for f in files {
        assert_eq!(
            common::read_tensors(&a.join(f)),
            common::read_tensors(&b.join(f)),
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn sft_stopped_by_sigterm_or_sigint_resumes_bit_identical() {
    let s = setup();
    let train = |out: &Path| s.command(&["weaver-train", "--output-dir", out.to_str().unwrap()]);
    let straight = s.out("straight");
    ok(train(&straight));
    for (signal, code, name) in [(SIGTERM, 143, "sigterm"), (SIGINT, 130, "sigint")] {
        let out = s.out(name);
        let (got, err) = stop_at(train(&out), 3, signal);
        assert_eq!(got, code, "{name}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_stopped_cleanly(&out, 3, "weaver", &err);
        let at_stop = common::read_tensors(&out.join("checkpoint-last/model.safetensors"));
        let err = ok(train(&out));
        // Steps 4-6 moved the weaver, so the equality below is not of two untouched copies.
        assert_ne!(
            common::read_tensors(&out.join("checkpoint-last/model.safetensors")),
            at_stop
        );
        assert!(err.contains("resuming from"), "{err}");
        assert_same_tensors(
            &straight,
            &out,
            &[
                "weaver/model.safetensors",
                "checkpoint-last/model.safetensors",
                "checkpoint-last/optimizer.safetensors",
            ],
        );
    }
}

#[test]
fn resume_with_changed_settings_is_refused_unless_asked() {
    let s = setup();
    let out = s.out("run");
    let train = |extra: &[&str]| {
        let mut args = vec!["weaver-train", "--output-dir", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        s.command(&args)
    };
    let (code, err) = stop_at(train(&[]), 2, SIGTERM);
    assert_eq!(code, 143, "{err}");
    let before = common::read_tensors(&out.join("checkpoint-last/model.safetensors"));

    // Another learning rate and seed: refused in one line naming both, the checkpoint untouched.
    let changed = [
        "--options",
        "run.weaver.sft.learning_rate",
        "2.0e-2",
        "run.seed",
        "7",
    ];
    let (code, err) = run(train(&changed));
    assert_eq!(code, 1, "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines.last().unwrap();
    assert!(last.starts_with("error: resume: settings differ"), "{err}");
    assert!(
        last.contains("run.weaver.sft.learning_rate (0.01 → 0.02)")
            && last.contains("run.seed (5 → 7)")
            && last.contains("--resume-anyway"),
        "{err}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("resuming from")),
        "{err}"
    );
    assert_eq!(
        common::read_tensors(&out.join("checkpoint-last/model.safetensors")),
        before
    );

    // Bookkeeping settings (log and save cadence, eval batch size) may change freely.
    let (code, err) = stop_at(
        train(&[
            "--options",
            "run.weaver.sft.logging_steps",
            "2",
            "run.weaver.sft.per_device_eval_batch_size",
            "1",
        ]),
        4,
        SIGTERM,
    );
    assert_eq!(code, 143, "{err}");
    assert!(err.contains("resuming from"), "{err}");

    // With the override the run continues on the new settings, and says which changed.
    let mut args = changed.to_vec();
    args.push("--resume-anyway");
    let err = ok(train(&args));
    assert!(
        err.contains("--resume-anyway") && err.contains("run.seed (5 → 7)"),
        "{err}"
    );
    assert!(out.join("weaver/model.safetensors").is_file());
    // Later checkpoints record the settings the run continued with.
    assert_eq!(
        trainer_state(&out.join("checkpoint-last"))["settings"]["run.seed"],
        "7"
    );
}

#[test]
fn trigger_grpo_stopped_by_sigterm_resumes_bit_identical() {
    let s = setup();
    // A trained weaver to start from (trigger-train needs one).
    let weaver = s.out("weaver-run");
    ok(s.command(&["weaver-train", "--output-dir", weaver.to_str().unwrap()]));
    let weaver_dir = weaver.join("weaver");
    let train = |out: &Path| {
        s.command(&[
            "trigger-train",
            "--load-model-path",
            weaver_dir.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
        ])
    };
    let straight = s.out("straight");
    ok(train(&straight));
    let out = s.out("stopped");
    let (code, err) = stop_at(train(&out), 2, SIGTERM);
    assert_eq!(code, 143, "{err}");
    assert_stopped_cleanly(&out, 2, "trigger", &err);
    let at_stop = common::read_tensors(&out.join("checkpoint-last/model.safetensors"));
    ok(train(&out));
    // Steps 3-4 moved the trigger, so the equality below is not of two untouched copies.
    assert_ne!(
        common::read_tensors(&out.join("trigger/model.safetensors")),
        at_stop
    );
    assert_same_tensors(
        &straight,
        &out,
        &[
            "trigger/model.safetensors",
            "checkpoint-last/optimizer.safetensors",
        ],
    );
}

#[test]
fn eval_stopped_by_sigterm_keeps_whole_rows_and_resumes() {
    let s = setup();
    let out = s.out("eval");
    let eval = || {
        s.command(&[
            "eval",
            "--vanilla",
            "--output-dir",
            out.to_str().unwrap(),
            "--batch-size",
            "2",
        ])
    };
    let answers = out.join("evaluate/answers.jsonl");
    let (code, err) = stop_at(eval(), 1, SIGTERM);
    assert_eq!(code, 143, "{err}");
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("stopped by SIGTERM after 2 of 6 rows")
            && last.contains("run the same command again"),
        "{err}"
    );
    let text = std::fs::read_to_string(&answers).unwrap();
    assert!(text.ends_with('\n'), "a torn last line: {text:?}");
    assert_eq!(text.lines().count(), 2);
    for l in text.lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap();
    }
    assert!(!out.join("evaluate/metrics.json").exists());
    let err = ok(eval());
    assert!(err.contains("2 already in"), "{err}");
    let text = std::fs::read_to_string(&answers).unwrap();
    assert_eq!(text.lines().count(), 6);
    assert!(out.join("evaluate/metrics.json").is_file());
}
