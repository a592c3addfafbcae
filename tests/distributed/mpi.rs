//! The `mpirun -np 2` tests (a build with `--features mpi`).

use super::{common, stderr};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A run config for the tiny model in `model_dir`: weaver SFT of 3 steps without dropout (so two
/// ranks must give the tensors of one), weaver and trigger GRPO of 2 steps, arith data.
fn write_config(dir: &Path, model_dir: &Path) -> PathBuf {
    let lora = "{r: 2, lora_alpha: 4, target_modules: [q_proj, v_proj], lora_dropout: 0.0}";
    let yaml = format!(
        r#"model:
  reasoner_model_name: "{model}"
  max_prompt_aug_num: 1
  max_inference_aug_num: 2
  delimiters: [",", ".", "\n", e, s, t, n]
  weaver: {{prompt_latents_len: 2, inference_latents_len: 2, peft_config: {lora}}}
  trigger: {{peft_config: {lora}}}
datasets:
  arith: {{mode: sft, train_size: 16, valid_size: 5, test_size: 7}}
run:
  seed: 3
  weaver:
    sft: {{max_steps: 3, per_device_train_batch_size: 2, gradient_accumulation_steps: 2,
          learning_rate: 1.0e-2, warmup_ratio: 0.0, logging_steps: 1, eval_strategy: steps,
          eval_steps: 2, per_device_eval_batch_size: 2, save_strategy: steps, save_steps: 100,
          max_length: 160}}
    grpo: {{max_steps: 2, per_device_train_batch_size: 4, num_generations: 2,
           max_completion_length: 10, learning_rate: 1.0e-2, eval_strategy: steps,
           eval_steps: 2, max_eval_samples: 3, save_strategy: steps, save_steps: 100}}
  trigger:
    grpo: {{max_steps: 2, per_device_train_batch_size: 4, num_generations: 2,
           max_completion_length: 10, learning_rate: 1.0e-1, insertion_penalty: 0.5,
           eval_strategy: "no", save_strategy: steps, save_steps: 100}}
  generation: {{max_new_tokens: 8, batch_size: 2, temperature: 0.8}}
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

/// `mpirun` for the tests: as root when need be, more ranks than cores allowed, shared memory
/// between the ranks of this one machine, no stdin to forward.
fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.stdin(std::process::Stdio::null())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env_remove("MEMGEN_PAUSE_AT_STEP")
        .args([
            "--oversubscribe",
            "--bind-to",
            "none",
            "--mca",
            "btl",
            "self,vader",
        ]);
    c
}

impl Setup {
    fn out(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// memgen's arguments for `cmd` into `out` with this config, then `extra`.
    fn args(&self, cmd: &str, out: &Path, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["--threads", "1", cmd, "--config"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(self.config.display().to_string());
        a.push("--output-dir".into());
        a.push(out.display().to_string());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// One plain process.
    fn one(&self, cmd: &str, out: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_memgen"));
        c.env_remove("MEMGEN_PAUSE_AT_STEP")
            .args(self.args(cmd, out, extra));
        c
    }

    /// `np` ranks under mpirun.
    fn ranks(&self, np: usize, cmd: &str, out: &Path, extra: &[&str]) -> Command {
        let mut c = mpirun();
        c.args(["-np", &np.to_string(), env!("CARGO_BIN_EXE_memgen")])
            .args(self.args(cmd, out, extra));
        c
    }
}

/// How long any one launch may take before the test kills it and fails. The runs take seconds;
/// a hang (ranks waiting for each other) must fail the test with its output, not stall CI.
const DEADLINE: Duration = Duration::from_secs(240);

/// Kills the process `pid` and its children (mpirun's ranks) with SIGKILL if it is still running
/// at [`DEADLINE`]. [`Watchdog::disarm`] stops it and fails the test if it fired; dropping it (a
/// test that panicked first) stops it too.
struct Watchdog {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Watchdog {
    fn arm(pid: u32) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        use std::sync::Arc;
        let (done, fired) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (d, f) = (done.clone(), fired.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            while t.elapsed() < DEADLINE {
                if d.load(SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            f.store(true, SeqCst);
            for p in children(pid).into_iter().chain([pid as i32]) {
                // SAFETY: kill(2) takes any pid. These are mpirun, which the test reaps only
                // just before it disarms this watchdog, and mpirun's unreaped ranks; in that
                // instant between reaping and disarming, Linux does not hand the pid to another
                // process (pids are allocated in increasing order up to pid_max before reuse).
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        });
        Watchdog { done, fired }
    }

    /// Disarm; panics if the watchdog had to kill the launch.
    fn disarm(self, output: &str) {
        use std::sync::atomic::Ordering::SeqCst;
        self.done.store(true, SeqCst);
        assert!(
            !self.fired.load(SeqCst),
            "killed after {DEADLINE:?}: {output}"
        );
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Run `c` to the end (at most [`DEADLINE`]) and return its output.
fn run(mut c: Command) -> Output {
    let child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running memgen");
    let dog = Watchdog::arm(child.id());
    let o = child.wait_with_output().expect("running memgen");
    dog.disarm(&stderr(&o));
    o
}

fn ok(c: Command) -> Output {
    let o = run(c);
    assert!(o.status.success(), "failed: {}", stderr(&o));
    o
}

/// Tensors of two safetensors files, equal within `tol` (f32 reduction order differs).
fn assert_close(a: &Path, b: &Path, tol: f32) {
    let (ta, tb) = (common::read_tensors(a), common::read_tensors(b));
    assert_eq!(ta.len(), tb.len(), "{} vs {}", a.display(), b.display());
    for ((ka, va), (kb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(ka, kb);
        let worst = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= tol,
            "{ka}: differs by {worst} between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// The records of `metrics.jsonl`.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The same logged values (keys named) in both runs' metrics, within `tol`.
fn assert_same_metrics(a: &Path, b: &Path, keys: &[&str], tol: f64) {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(
        ma.len(),
        mb.len(),
        "one record per log line, from rank 0 alone"
    );
    for (ra, rb) in ma.iter().zip(&mb) {
        assert_eq!(ra["step"], rb["step"]);
        for k in keys {
            if let (Some(x), Some(y)) = (ra[k].as_f64(), rb[k].as_f64()) {
                assert!(
                    (x - y).abs() <= tol,
                    "{k} at step {}: {x} vs {y}",
                    ra["step"]
                );
            } else {
                assert_eq!(ra[k], rb[k], "{k} at step {}", ra["step"]);
            }
        }
    }
}

#[test]
fn two_rank_eval_writes_the_rows_of_one_rank_and_resumes() {
    let s = setup();
    let extra = ["--allow-untrained", "--batch-size", "2"];
    let one = s.out("one");
    ok(s.one("eval", &one, &extra));
    let two = s.out("two");
    let o = ok(s.ranks(2, "eval", &two, &extra));
    let answers = |d: &Path| std::fs::read_to_string(d.join("evaluate/answers.jsonl")).unwrap();
    // 7 rows in 4 batches: the second rank has none in the last round. Sampled rows (temperature
    // 0.8) are equal too: each batch keeps its rows and seed.
    assert_eq!(answers(&one).lines().count(), 7);
    assert_eq!(answers(&two), answers(&one));
    // Metrics once, printed once, equal but for the timings.
    let m = |d: &Path| -> serde_json::Value {
        let mut v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.join("evaluate/metrics.json")).unwrap(),
        )
        .unwrap();
        for k in ["wall_time_secs", "tokens_per_sec"] {
            v.as_object_mut().unwrap().remove(k).expect(k);
        }
        v
    };
    assert_eq!(m(&two), m(&one));
    assert_eq!(m(&two)["n"], 7);
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);

    // Resume: a run cut after 3 rows with a torn fourth, finished by 1 rank and by 2 ranks, ends
    // with the same file.
    let cut = s.out("cut");
    ok(s.one(
        "eval",
        &cut,
        &[
            "--allow-untrained",
            "--batch-size",
            "2",
            "--max-samples",
            "4",
        ],
    ));
    let mut lines: Vec<String> = answers(&cut).lines().map(String::from).collect();
    lines[3].truncate(20);
    std::fs::write(cut.join("evaluate/answers.jsonl"), lines.join("\n")).unwrap();
    let mut finished = vec![];
    for np in [1, 2] {
        let dir = s.out(&format!("resumed-{np}"));
        std::fs::create_dir_all(dir.join("evaluate")).unwrap();
        for f in ["answers.jsonl", "settings.json"] {
            std::fs::copy(cut.join("evaluate").join(f), dir.join("evaluate").join(f)).unwrap();
        }
        let o = ok(s.ranks(np, "eval", &dir, &extra));
        assert!(stderr(&o).contains("3 already in"), "{}", stderr(&o));
        finished.push(answers(&dir));
    }
    assert_eq!(finished[1], finished[0]);
    assert_eq!(finished[0].lines().count(), 7);
    assert!(finished[0].starts_with(&lines[..3].join("\n")));
}

#[test]
fn a_failure_on_one_rank_ends_every_rank() {
    let s = setup();
    let out = s.out("fail");
    // Rank 1 gets a config that does not exist; rank 0 would wait for it in the first collective.
    let mut c = mpirun();
    c.args(["-np", "1", env!("CARGO_BIN_EXE_memgen")])
        .args(s.args("eval", &out, &["--allow-untrained"]))
        .args([":", "-np", "1", env!("CARGO_BIN_EXE_memgen")])
        .args(["--threads", "1", "eval", "--allow-untrained", "--config"])
        .arg(s.work.path().join("missing.yaml"));
    let t = Instant::now();
    let o = run(c);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}: {err}",
        t.elapsed()
    );
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(ours.len(), 1, "{err}");
    assert!(
        ours[0].starts_with("error (rank 1 of 2):") && ours[0].contains("missing.yaml"),
        "{err}"
    );
    assert!(!out.join("evaluate/metrics.json").exists());
}

#[test]
fn two_ranks_of_sft_train_as_one_rank_with_their_global_batch() {
    let s = setup();
    let one = s.out("one");
    ok(s.one(
        "weaver-train",
        &one,
        &[
            "--options",
            "run.weaver.sft.per_device_train_batch_size",
            "4",
        ],
    ));
    let two = s.out("two");
    let o = ok(s.ranks(2, "weaver-train", &two, &[]));
    assert_close(
        &one.join("weaver/model.safetensors"),
        &two.join("weaver/model.safetensors"),
        1e-4,
    );
    assert_close(
        &one.join("checkpoint-last/optimizer.safetensors"),
        &two.join("checkpoint-last/optimizer.safetensors"),
        1e-4,
    );
    // Sharded validation (5 rows: 2 and 3) reports the global loss; rank 0 alone logs.
    assert_same_metrics(&one, &two, &["loss", "eval_loss", "lr", "grad_norm"], 1e-4);
    let m = metrics(&two);
    assert!(m.iter().filter(|r| r.get("eval_loss").is_some()).count() == 2);
    assert_ne!(m[0]["loss"], m[2]["loss"], "training moved nothing");
    let err = stderr(&o);
    assert_eq!(err.matches("step 3/3 loss").count(), 1, "{err}");
}

/// Weaver GRPO then trigger GRPO (on the SFT weaver), 2 ranks × 2 prompts against 1 rank × 4:
/// each prompt's group is sampled on one rank with its own seed, so the rollouts, rewards and
/// advantages are those of one rank.
#[test]
fn two_ranks_of_grpo_train_as_one_rank_with_their_global_batch() {
    let s = setup();
    let weaver = s.out("sft");
    ok(s.one("weaver-train", &weaver, &[]));
    let weaver_dir = weaver.join("weaver");
    let w = weaver_dir.to_str().unwrap();
    let grpo = ["--options", "run.train_weaver_method", "grpo"];
    for (cmd, extra, key, file) in [
        (
            "weaver-train",
            &grpo[..],
            "run.weaver.grpo.per_device_train_batch_size",
            "weaver",
        ),
        (
            "trigger-train",
            &["--load-model-path", w][..],
            "run.trigger.grpo.per_device_train_batch_size",
            "trigger",
        ),
    ] {
        let one = s.out(&format!("{cmd}-one"));
        let mut args = extra.to_vec();
        if !args.contains(&"--options") {
            args.push("--options");
        }
        args.extend([key, "8"]);
        ok(s.one(cmd, &one, &args));
        let two = s.out(&format!("{cmd}-two"));
        ok(s.ranks(2, cmd, &two, extra));
        assert_close(
            &one.join(file).join("model.safetensors"),
            &two.join(file).join("model.safetensors"),
            1e-4,
        );
        assert_same_metrics(
            &one,
            &two,
            &[
                "loss",
                "reward",
                "reward_std",
                "insertions_per_sample",
                "eval_reward",
            ],
            1e-4,
        );
        // The trigger's rewards vary with its insertions (the penalty), so its updates move it.
        // The tiny random reasoner earns the weaver no reward variance: its advantages are 0
        // and the check above covers its rollouts, rewards and metrics only.
        if cmd == "trigger-train" {
            let moved = metrics(&two)
                .iter()
                .any(|r| r["grad_norm"].as_f64().unwrap_or(0.0) > 0.0);
            assert!(moved, "{cmd}: no update had a gradient");
        }
    }
}

/// The processes `mpirun` (pid `parent`) started.
fn children(parent: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // `pid (comm) state ppid …`: the fields after the command's closing parenthesis.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            rest.split_whitespace().nth(1) == Some(&parent.to_string())
        })
        .collect()
}

#[test]
fn a_two_rank_run_stopped_by_sigterm_resumes() {
    use std::io::{BufRead, BufReader};
    let s = setup();
    let straight = s.out("straight");
    ok(s.ranks(2, "weaver-train", &straight, &[]));
    let out = s.out("stopped");
    let mut child = s
        .ranks(2, "weaver-train", &out, &[])
        .env("MEMGEN_PAUSE_AT_STEP", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let dog = Watchdog::arm(child.id());
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut err = String::new();
    while err
        .matches("paused at step 1 (MEMGEN_PAUSE_AT_STEP)\n")
        .count()
        < 2
    {
        let Some(Ok(line)) = lines.next() else {
            panic!("both ranks should pause at step 1: {err}");
        };
        err.push_str(&line);
        err.push('\n');
    }
    let ranks = children(child.id());
    assert_eq!(ranks.len(), 2, "{err}");
    let t = Instant::now();
    // Only rank 1 gets the signal: rank 0 learns of it when the ranks agree after the step.
    // SAFETY: kill(2) on a process mpirun started for this test and has not reaped.
    let rc = unsafe { libc::kill(ranks[1], libc::SIGTERM) };
    assert_eq!(rc, 0);
    // Rank 0 waits in its pause for a signal of its own (the test hook), so it gets one too.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(ranks[0], libc::SIGTERM) }, 0);
    for line in lines.map_while(Result::ok) {
        err.push_str(&line);
        err.push('\n');
    }
    let status = child.wait().unwrap();
    dog.disarm(&err);
    assert!(!status.success(), "{err}");
    assert!(t.elapsed() < Duration::from_secs(60), "{err}");
    assert_eq!(
        err.matches("stopped by SIGTERM after step 1 of 3").count(),
        1,
        "{err}"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint-last/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 1);
    assert!(!out.join("weaver").exists() && !out.join("checkpoint-last.tmp").exists());

    let o = ok(s.ranks(2, "weaver-train", &out, &[]));
    assert_eq!(
        stderr(&o).matches("resuming from").count(),
        1,
        "{}",
        stderr(&o)
    );
    for f in [
        "weaver/model.safetensors",
        "checkpoint-last/optimizer.safetensors",
    ] {
        assert_eq!(
            common::read_tensors(&straight.join(f)),
            common::read_tensors(&out.join(f)),
            "{f}"
        );
    }
}
