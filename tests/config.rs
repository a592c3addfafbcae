//! Run configs: the shipped YAML files load, overrides apply, and mistakes are one-line errors
//! that name the key.

use memgen::config::{parse_options, RunConfig};

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
    assert_eq!(c.run.weaver.sft.learning_rate, 1e-5);
    assert_eq!(c.run.weaver.grpo.num_generations, 8);
    assert_eq!(c.run.weaver.grpo.loss_type, "bnpo");
    assert_eq!(c.run.trigger.grpo.learning_rate, 1e-6);
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
    assert_eq!(c.run.weaver.sft.learning_rate, 2e-4);
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
        e.contains("insertion_probability must be between 0 and 1"),
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
