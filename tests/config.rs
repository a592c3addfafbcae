//! Run configs: the shipped YAML files load, overrides apply, and mistakes are one-line errors
//! that name the key.

use memgen::config::{
    parse_options, Device, Dtype, IntervalStrategy, LossType, LrScheduler, Optim, RunConfig,
    RunMode, TrainMethod, TriggerMethod,
};

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn shipped_configs_load_with_the_original_defaults() {
    let mut n = 0;
    for dir in ["configs", "configs/latent_memory"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|x| x.to_str()) != Some("yaml") {
                continue;
            }
            let c = RunConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            c.dataset().unwrap();
            n += 1;
        }
    }
    assert!(n >= 4);
    let c = RunConfig::load(&root().join("configs/latent_memory/gsm8k.yaml"), &[]).unwrap();
    let spec = c.memgen_spec(false);
    assert_eq!(
        (spec.prompt_latents_len, spec.inference_latents_len),
        (8, 8)
    );
    assert_eq!(spec.weaver_lora.r, 16);
    assert_eq!(spec.weaver_lora.lora_alpha, 32.0);
    assert_eq!(spec.weaver_lora.target_modules, vec!["q_proj", "v_proj"]);
    assert_eq!(spec.insertion.max_inference_aug_num, 5);
    assert!(spec.trigger_model.is_none(), "nano trigger unless active");
    assert_eq!(c.run.weaver.sft.args.learning_rate, 1e-5);
    assert_eq!(c.run.weaver.grpo.num_generations, 8);
    assert_eq!(c.run.weaver.grpo.loss_type, LossType::Bnpo);
    assert_eq!(c.run.trigger.grpo.args.learning_rate, 1e-6);
    assert_eq!(c.dataset().unwrap().task.val_ratio, 0.1);
    let t = RunConfig::load(&root().join("configs/latent_memory/triviaqa.yaml"), &[]).unwrap();
    assert_eq!(t.model.max_inference_aug_num, 0);
}

#[test]
fn dotted_overrides_apply_and_round_trip() {
    let p = root().join("configs/latent_memory/gsm8k.yaml");
    let c = RunConfig::load(
        &p,
        &opts(&[
            ("run.weaver.sft.learning_rate", "2e-4"),
            (
                "model.weaver.peft_config.target_modules",
                "[q_proj, k_proj, v_proj]",
            ),
            ("model.max_inference_aug_num", "3"),
            ("datasets.gsm8k.limit", "10"),
        ]),
    )
    .unwrap();
    assert_eq!(c.run.weaver.sft.args.learning_rate, 2e-4);
    assert_eq!(c.model.weaver.peft_config.target_modules.len(), 3);
    assert_eq!(c.model.max_inference_aug_num, 3);
    assert_eq!(c.dataset().unwrap().task.limit, Some(10));
    // The resolved YAML loads back to the same config.
    let back = RunConfig::from_yaml(&c.to_yaml().unwrap(), "resolved", &[]).unwrap();
    assert_eq!(back, c);
}

#[test]
fn mistakes_are_errors_naming_the_key() {
    let p = root().join("configs/latent_memory/gsm8k.yaml");
    let err = |o: &[(&str, &str)]| RunConfig::load(&p, &opts(o)).unwrap_err().to_string();
    let e = err(&[("run.weaver.sft.learning_rat", "1e-4")]);
    assert!(e.contains("learning_rat"), "{e}");
    let e = err(&[("run.weaver.sft.per_device_train_batch_size", "four")]);
    assert!(e.contains("per_device_train_batch_size"), "{e}");
    let e = err(&[("run.train_trigger", "true")]);
    assert!(e.contains("trained weaver"), "{e}");
    let e = err(&[("run.weaver.grpo.loss_type", "ppo")]);
    assert!(e.contains("loss_type"), "{e}");
    let e = err(&[("run.weaver.grpo.per_device_train_batch_size", "6")]);
    assert!(e.contains("multiple of num_generations"), "{e}");
    let e = err(&[("run.weaver.grpo.reasoner_temperature", "0")]);
    assert!(e.contains("trigger GRPO only"), "{e}");
    let e = err(&[("run.trigger.grpo.reasoner_temperature", "-1")]);
    assert!(e.contains("reasoner_temperature"), "{e}");
    let e = err(&[("run.trigger.grpo.initial_insertion_probability", "1.0")]);
    assert!(e.contains("strictly between 0 and 1"), "{e}");
    let e = err(&[("run.weaver.grpo.initial_insertion_probability", "0.9")]);
    assert!(e.contains("trigger GRPO only"), "{e}");
    let e = err(&[("run.weaver.sft.insertion_probability", "1.5")]);
    assert!(
        e.contains("run.weaver.sft.insertion_probability: must be between 0 and 1"),
        "{e}"
    );
    let e = err(&[("datasets.gsm8k.colour", "red")]);
    assert!(e.contains("colour"), "{e}");
    assert!(RunConfig::from_yaml("model: [1, 2", "bad.yaml", &[])
        .unwrap_err()
        .to_string()
        .contains("bad.yaml"));
    assert!(parse_options(&["a".into()]).is_err());
    // The original's older layout (model_name, lora_config, a single `dataset`) is accepted.
    let old = "model:\n  model_name: default\n  weaver:\n    model_name: default\n    lora_config: {r: 8}\ndataset:\n  name: gsm8k\n  mode: sft\n  sft: {val_ratio: 0.2}\n";
    let c = RunConfig::from_yaml(old, "old.yaml", &[]).unwrap();
    assert_eq!(c.model.weaver.peft_config.r, 8);
    assert_eq!(c.dataset().unwrap().task.val_ratio, 0.2);
}

/// Accepted-but-ignored keys: one warning line naming each key set to something memgen does not
/// do; the shipped configs (whose keys all work) draw none; unknown keys stay errors.
#[test]
fn ignored_keys_warn_once_by_name() {
    for dir in ["configs", "configs/latent_memory"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|x| x.to_str()) != Some("yaml") {
                continue;
            }
            let c = RunConfig::load(&p, &[]).unwrap();
            assert_eq!(
                c.ignored_key_warnings(),
                Vec::<String>::new(),
                "{}",
                p.display()
            );
        }
    }
    let gsm8k = root().join("configs/latent_memory/gsm8k.yaml");
    // The original's own settings of these keys (its configs/latent_memory/gsm8k.yaml).
    let set = [
        ("run.weaver.sft.bf16", "true"),
        ("run.weaver.sft.report_to", "[tensorboard]"),
        ("run.weaver.grpo.remove_unused_columns", "true"),
        ("run.trigger.grpo.optim", "sgd"),
        ("run.weaver.sft.logging_strategy", "epoch"),
        ("run.weaver.sft.assistant_only_loss", "false"),
        ("run.generation.max_start_length", "1024"),
        ("run.generation.max_prompt_length", "4096"),
        ("run.generation.weaver_do_sample", "true"),
        ("model.trigger.use_peft", "false"),
        ("model.weaver.peft_config.task_type", "SEQ_CLS"),
    ];
    for (k, v) in set {
        let c = RunConfig::load(&gsm8k, &opts(&[(k, v)])).unwrap();
        let w = c.ignored_key_warnings();
        assert_eq!(w.len(), 1, "{k}: {w:?}");
        assert!(
            w[0].starts_with(&format!(
                "warning: config: {k} is accepted for compatibility with the original and ignored ("
            )),
            "{}",
            w[0]
        );
        assert!(!w[0].contains('\n'));
    }
    let c = RunConfig::load(&gsm8k, &opts(&[("run.weaver.sft.bf16", "true")])).unwrap();
    assert!(c.ignored_key_warnings()[0].contains("model.dtype bf16"));
    // Values memgen already does stay quiet.
    let quiet = [
        ("run.weaver.sft.bf16", "false"),
        ("run.weaver.sft.report_to", "[none]"),
        ("run.weaver.sft.optim", "adamw_torch"),
        ("run.mode", "evaluate"),
    ];
    for (k, v) in quiet {
        let c = RunConfig::load(&gsm8k, &opts(&[(k, v)])).unwrap();
        assert!(c.ignored_key_warnings().is_empty(), "{k} {v}");
    }
    let e = RunConfig::load(&gsm8k, &opts(&[("run.weaver.sft.bf17", "true")])).unwrap_err();
    assert!(e.to_string().contains("bf17"), "{e}");
}

/// One row per key whose value is a closed set: the key, every spelling it accepts (as the error
/// lists them), and how to read the loaded value back as its canonical spelling.
type EnumRow = (
    &'static str,
    &'static [&'static str],
    fn(&RunConfig) -> String,
);

fn enum_rows() -> Vec<EnumRow> {
    vec![
        ("model.dtype", Dtype::ACCEPTED, |c| {
            c.model.dtype.to_string()
        }),
        ("model.device", Device::ACCEPTED, |c| {
            c.model.device.to_string()
        }),
        ("run.mode", RunMode::ACCEPTED, |c| c.run.mode.to_string()),
        ("run.train_weaver_method", TrainMethod::ACCEPTED, |c| {
            c.run.train_weaver_method.to_string()
        }),
        ("run.train_trigger_method", TriggerMethod::ACCEPTED, |c| {
            c.run.train_trigger_method.to_string()
        }),
        ("datasets.gsm8k.mode", TrainMethod::ACCEPTED, |c| {
            c.dataset().unwrap().mode.to_string()
        }),
        ("run.weaver.sft.optim", Optim::ACCEPTED, |c| {
            c.run.weaver.sft.args.optim.to_string()
        }),
        (
            "run.weaver.grpo.lr_scheduler_type",
            LrScheduler::ACCEPTED,
            |c| c.run.weaver.grpo.args.lr_scheduler_type.to_string(),
        ),
        (
            "run.trigger.grpo.logging_strategy",
            IntervalStrategy::ACCEPTED,
            |c| c.run.trigger.grpo.args.logging_strategy.to_string(),
        ),
        (
            "run.weaver.sft.eval_strategy",
            IntervalStrategy::ACCEPTED,
            |c| c.run.weaver.sft.args.eval_strategy.to_string(),
        ),
        (
            "run.weaver.grpo.save_strategy",
            IntervalStrategy::ACCEPTED,
            |c| c.run.weaver.grpo.args.save_strategy.to_string(),
        ),
        ("run.trigger.grpo.loss_type", LossType::ACCEPTED, |c| {
            c.run.trigger.grpo.loss_type.to_string()
        }),
    ]
}

fn gsm8k_with(o: &[(&str, &str)]) -> Result<RunConfig, String> {
    RunConfig::load(&root().join("configs/latent_memory/gsm8k.yaml"), &opts(o))
        .map_err(|e| e.to_string())
}

/// The spellings of the original's configs and of Hugging Face's TrainingArguments are the ones
/// accepted.
#[test]
fn accepted_spellings_are_the_original_and_hugging_face_names() {
    assert_eq!(
        LrScheduler::ACCEPTED,
        ["linear", "cosine", "constant", "constant_with_warmup"]
    );
    assert_eq!(IntervalStrategy::ACCEPTED, ["no", "steps", "epoch"]);
    assert_eq!(LossType::ACCEPTED, ["grpo", "bnpo", "dr_grpo"]);
    assert_eq!(
        Dtype::ACCEPTED,
        ["f32", "float32", "f16", "float16", "bf16", "bfloat16"]
    );
    for name in [
        "adamw_torch",
        "adamw_torch_fused",
        "adamw_hf",
        "adafactor",
        "sgd",
    ] {
        assert!(Optim::ACCEPTED.contains(&name), "{name}");
    }
    assert_eq!(TrainMethod::ACCEPTED, ["sft", "grpo"]);
    assert_eq!(TriggerMethod::ACCEPTED, ["grpo"]);
    assert_eq!(RunMode::ACCEPTED, ["train", "evaluate"]);
}

/// Every accepted spelling loads, reads back as its canonical spelling, and the canonical
/// spelling loads to the same config; the resolved YAML round-trips.
#[test]
fn every_enum_spelling_round_trips() {
    for (key, accepted, read) in enum_rows() {
        for &s in accepted {
            // `cuda:N` stands for any device number.
            let s = if s == "cuda:N" { "cuda:1" } else { s };
            let c = gsm8k_with(&[(key, s)]).unwrap_or_else(|e| panic!("{key} {s}: {e}"));
            let canonical = read(&c);
            let again = gsm8k_with(&[(key, &canonical)]).unwrap();
            assert_eq!(again, c, "{key}: {s} → {canonical}");
            let back = RunConfig::from_yaml(&c.to_yaml().unwrap(), "resolved", &[]).unwrap();
            assert_eq!(back, c, "{key} {s}");
        }
    }
    let c = gsm8k_with(&[("model.dtype", "bfloat16"), ("model.device", "cuda:3")]).unwrap();
    assert_eq!(c.model.dtype, Dtype::Bf16);
    assert_eq!(c.model.device, Device::Cuda(Some(3)));
    assert_eq!(c.memgen_spec(false).dtype, "bf16");
}

/// A spelling outside the set is one line naming the file, the key, the value and every
/// accepted spelling.
#[test]
fn wrong_spellings_name_the_key_and_the_accepted_values() {
    for (key, accepted, _) in enum_rows() {
        let e = gsm8k_with(&[(key, "cosinee")]).unwrap_err();
        let want = format!(
            "gsm8k.yaml: {key}: `cosinee` is not one of {}",
            accepted.join(", ")
        );
        assert!(e.ends_with(&want), "{e}\nwant …{want}");
        assert!(!e.contains('\n'), "{e}");
    }
    // `cuda:` needs a number.
    let e = gsm8k_with(&[("model.device", "cuda:x")]).unwrap_err();
    assert!(
        e.ends_with("model.device: `cuda:x` is not one of cpu, cuda, cuda:N"),
        "{e}"
    );
}

/// One-value rules are part of reading the value: the error names the key's full path.
#[test]
fn one_value_rules_name_the_key() {
    let rows = [
        (
            "run.weaver.sft.learning_rate",
            "0",
            "must be positive, got 0",
        ),
        (
            "run.trigger.grpo.learning_rate",
            "-1e-5",
            "must be positive",
        ),
        (
            "run.weaver.sft.per_device_train_batch_size",
            "0",
            "must be at least 1, got 0",
        ),
        (
            "run.weaver.grpo.gradient_accumulation_steps",
            "0",
            "must be at least 1",
        ),
        ("run.trigger.grpo.num_iterations", "0", "must be at least 1"),
        (
            "run.weaver.grpo.num_generations",
            "1",
            "must be at least 2 (advantages compare a group)",
        ),
        (
            "run.weaver.sft.insertion_probability",
            "-0.1",
            "must be between 0 and 1",
        ),
        (
            "run.trigger.grpo.reasoner_temperature",
            "-1",
            "must be a finite number ≥ 0",
        ),
        (
            "run.trigger.grpo.initial_insertion_probability",
            "0",
            "must be strictly between 0 and 1",
        ),
        (
            "model.weaver.use_peft",
            "false",
            "false is not supported (memgen trains LoRA adapters)",
        ),
    ];
    for (key, value, why) in rows {
        let e = gsm8k_with(&[(key, value)]).unwrap_err();
        assert!(
            e.contains(&format!("gsm8k.yaml: {key}: {why}")),
            "{key}: {e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
    // Unset optional values and the edges of a closed range are fine.
    gsm8k_with(&[
        ("run.trigger.grpo.reasoner_temperature", "0"),
        ("run.weaver.sft.insertion_probability", "0"),
        ("run.trigger.grpo.initial_insertion_probability", "null"),
    ])
    .unwrap();
}

/// Unknown keys are errors naming the key in every section, the training phases (whose shared
/// keys are flattened in) included; keys of another phase are unknown too.
#[test]
fn unknown_keys_are_errors_in_every_section() {
    for section in [
        "model",
        "model.weaver",
        "model.trigger",
        "run",
        "run.weaver",
        "run.weaver.sft",
        "run.weaver.grpo",
        "run.trigger.grpo",
        "run.generation",
        "retrieval",
    ] {
        let e = gsm8k_with(&[(&format!("{section}.colour"), "red")]).unwrap_err();
        assert!(e.contains("colour"), "{section}: {e}");
        assert!(e.contains(section), "{section}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
    let e = gsm8k_with(&[("run.weaver.sft.num_generations", "4")]).unwrap_err();
    assert!(
        e.contains("run.weaver.sft.num_generations: unknown field"),
        "{e}"
    );
    let e = gsm8k_with(&[("run.weaver.grpo.max_length", "4")]).unwrap_err();
    assert!(
        e.contains("run.weaver.grpo.max_length: unknown field"),
        "{e}"
    );
}

/// The original's older key names (and torch's dtype names) load as the current ones.
#[test]
fn old_names_load() {
    let old = "model:
  model_name: default
  dtype: bfloat16
  weaver:
    model_name: w
    lora_config: {r: 8}
  trigger:
    model_name: t
    lora_config: {r: 4}
dataset:
  name: gsm8k
  mode: grpo
  grpo: {val_ratio: 0.3}
run:
  train_weaver_method: grpo
  interaction:
    max_response_length: 77
    max_obs_length: 33
";
    let c = RunConfig::from_yaml(old, "old.yaml", &[]).unwrap();
    assert_eq!(c.model.reasoner_model_name, "default");
    assert_eq!(c.model.dtype, Dtype::Bf16);
    assert_eq!(c.model.weaver.weaver_model_name.as_deref(), Some("w"));
    assert_eq!(c.model.weaver.peft_config.r, 8);
    assert_eq!(c.model.trigger.trigger_model_name.as_deref(), Some("t"));
    assert_eq!(c.model.trigger.peft_config.r, 4);
    assert_eq!(c.run.generation.max_new_tokens, 77);
    assert_eq!(c.run.generation.max_obs_tokens, 33);
    let ds = c.dataset().unwrap();
    assert_eq!((ds.name.as_str(), ds.mode), ("gsm8k", TrainMethod::Grpo));
    assert_eq!(ds.task.val_ratio, 0.3);
}

/// The defaults are the original's, per phase: SFT and GRPO share one struct of optimiser and
/// bookkeeping keys but not all of its defaults, and a trigger without a `grpo` section learns
/// at 1e-6.
#[test]
fn phase_defaults_differ_where_the_original_does() {
    let c = RunConfig::from_yaml("model: {}\ndatasets: {arith: {}}\n", "min.yaml", &[]).unwrap();
    let (s, g, t) = (&c.run.weaver.sft, &c.run.weaver.grpo, &c.run.trigger.grpo);
    assert_eq!(s.args.num_train_epochs, 2.0);
    assert_eq!(g.args.num_train_epochs, 1.0);
    assert_eq!(
        (
            s.args.per_device_train_batch_size,
            g.args.per_device_train_batch_size
        ),
        (4, 8)
    );
    assert_eq!(
        (
            s.args.learning_rate,
            g.args.learning_rate,
            t.args.learning_rate
        ),
        (1e-5, 1e-5, 1e-6)
    );
    assert_eq!(s.args.optim, Optim::AdamwTorch);
    assert_eq!(s.args.lr_scheduler_type, LrScheduler::Cosine);
    assert_eq!(
        (
            s.args.logging_strategy,
            s.args.eval_strategy,
            s.args.save_strategy
        ),
        (
            IntervalStrategy::Steps,
            IntervalStrategy::Epoch,
            IntervalStrategy::Epoch
        )
    );
    assert_eq!(g.loss_type, LossType::Bnpo);
    assert_eq!((c.model.dtype, c.model.device), (Dtype::F32, Device::Cpu));
    // A section that sets one key keeps the phase's other defaults.
    let c = RunConfig::from_yaml(
        "model: {}\ndatasets: {arith: {}}\nrun: {weaver: {grpo: {beta: 0.1}}}\n",
        "one.yaml",
        &[],
    )
    .unwrap();
    assert_eq!(c.run.weaver.grpo.beta, 0.1);
    assert_eq!(c.run.weaver.grpo.args.per_device_train_batch_size, 8);
    assert_eq!(c.run.weaver.grpo.args.num_train_epochs, 1.0);
}

/// The CLI on a config with a misspelt value, an unknown key or a bad override: exit status 1
/// and exactly one line on stderr, naming the file, the key and (for a closed set) the accepted
/// spellings. Nothing runs, so nothing is written.
#[test]
fn cli_reports_a_bad_config_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(root().join("configs/latent_memory/gsm8k.yaml")).unwrap();
    let out_dir = tmp.path().join("out");
    let cases = [
        (
            good.replacen("lr_scheduler_type: cosine", "lr_scheduler_type: cosinee", 1),
            vec![],
            "run.weaver.sft.lr_scheduler_type: `cosinee` is not one of linear, cosine, constant, constant_with_warmup",
        ),
        (
            good.replacen("warmup_ratio: 0.1", "warmup_ration: 0.1", 1),
            vec![],
            "run.weaver.sft.warmup_ration: unknown field `warmup_ration`",
        ),
        (
            good.clone(),
            vec!["--options", "model.dtype", "fp32"],
            "model.dtype: `fp32` is not one of f32, float32, f16, float16, bf16, bfloat16",
        ),
    ];
    for (i, (text, extra, want)) in cases.into_iter().enumerate() {
        let cfg = tmp.path().join(format!("bad{i}.yaml"));
        std::fs::write(&cfg, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_memgen"))
            .args(["eval", "--vanilla", "--config", cfg.to_str().unwrap()])
            .args(["--output-dir", out_dir.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!("error: {}: {want}", cfg.display())),
            "{err}\nwant {want}"
        );
    }
    assert!(!out_dir.exists());
}
