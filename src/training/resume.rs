//! Honest resume: a checkpoint records the settings that shape its run's result, and resuming
//! with different ones is refused unless asked for (`--resume-anyway`).
//!
//! The settings are the resolved run config flattened to `dotted.key → value` (values as compact
//! JSON, strings bare), minus the keys listed in [`IGNORED`]: settings that cannot change the
//! trained weights (where files go, how often to log or save, eval batch size), and sections the
//! run's kind never reads (SFT does not read the GRPO section, …). Everything else is compared —
//! a key whose effect is unclear stays in, since a needless refusal costs a flag while a silent
//! mismatch costs a run.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::RunConfig;

/// `dotted.key → value` of the settings a run's result depends on.
pub type Settings = BTreeMap<String, String>;

/// Kinds of run, as in `TrainerState::kind`.
const SFT: &str = "sft";
const WEAVER_GRPO: &str = "weaver-grpo";
const TRIGGER_GRPO: &str = "trigger-grpo";

/// A key pattern left out of the comparison, for which kinds of run, and why. A pattern ending in
/// `.` is a prefix (a whole section); one starting with `.` is a suffix (that field in any
/// section); anything else is one exact key.
pub struct Ignored {
    pub pattern: &'static str,
    /// Empty: every kind.
    pub kinds: &'static [&'static str],
    // The reason, kept beside each pattern for whoever edits the table; the code never prints it.
    #[allow(dead_code)]
    pub why: &'static str,
}

pub const IGNORED: &[Ignored] = &[
    Ignored {
        pattern: "run.output_dir",
        kinds: &[],
        why: "where files go",
    },
    Ignored {
        pattern: "run.mode",
        kinds: &[],
        why: "informational; the subcommand decides",
    },
    Ignored {
        pattern: ".logging_strategy",
        kinds: &[],
        why: "log cadence",
    },
    Ignored {
        pattern: ".logging_steps",
        kinds: &[],
        why: "log cadence",
    },
    Ignored {
        pattern: ".save_strategy",
        kinds: &[],
        why: "checkpoint cadence; every save is resumable",
    },
    Ignored {
        pattern: ".save_steps",
        kinds: &[],
        why: "checkpoint cadence; every save is resumable",
    },
    Ignored {
        pattern: ".per_device_eval_batch_size",
        kinds: &[],
        why: "validation batching",
    },
    Ignored {
        pattern: ".report_to",
        kinds: &[],
        why: "logging sinks",
    },
    Ignored {
        pattern: ".remove_unused_columns",
        kinds: &[],
        why: "accepted for compatibility, unused",
    },
    Ignored {
        pattern: "retrieval.timeout_secs",
        kinds: &[],
        why: "whether a call succeeds, not what it returns",
    },
    Ignored {
        pattern: "retrieval.connect_timeout_secs",
        kinds: &[],
        why: "as timeout_secs",
    },
    Ignored {
        pattern: "retrieval.retries",
        kinds: &[],
        why: "as timeout_secs",
    },
    Ignored {
        pattern: "retrieval.backoff_ms",
        kinds: &[],
        why: "as timeout_secs",
    },
    // Sections a kind of run never reads.
    Ignored {
        pattern: "retrieval.",
        kinds: &[SFT],
        why: "SFT makes no retrieval calls",
    },
    Ignored {
        pattern: "run.generation.",
        kinds: &[SFT],
        why: "SFT generates nothing",
    },
    Ignored {
        pattern: "run.weaver.grpo.",
        kinds: &[SFT, TRIGGER_GRPO],
        why: "another phase's settings",
    },
    Ignored {
        pattern: "run.weaver.sft.",
        kinds: &[WEAVER_GRPO, TRIGGER_GRPO],
        why: "another phase's settings",
    },
    Ignored {
        pattern: "run.trigger.",
        kinds: &[SFT, WEAVER_GRPO],
        why: "another phase's settings",
    },
    Ignored {
        pattern: "run.train_trigger",
        kinds: &[SFT, WEAVER_GRPO],
        why: "another phase's switch",
    },
    Ignored {
        pattern: "run.train_trigger_method",
        kinds: &[SFT, WEAVER_GRPO],
        why: "another phase's switch",
    },
    Ignored {
        pattern: "run.train_weaver",
        kinds: &[TRIGGER_GRPO],
        why: "another phase's switch",
    },
    Ignored {
        pattern: "run.train_weaver_method",
        kinds: &[TRIGGER_GRPO],
        why: "another phase's switch",
    },
    // GRPO episodes read only the turn and observation caps of the eval generation settings.
    Ignored {
        pattern: "run.generation.max_new_tokens",
        kinds: &[WEAVER_GRPO, TRIGGER_GRPO],
        why: "eval only",
    },
    Ignored {
        pattern: "run.generation.temperature",
        kinds: &[WEAVER_GRPO, TRIGGER_GRPO],
        why: "eval only",
    },
    Ignored {
        pattern: "run.generation.top_p",
        kinds: &[WEAVER_GRPO, TRIGGER_GRPO],
        why: "eval only",
    },
    Ignored {
        pattern: "run.generation.top_k",
        kinds: &[WEAVER_GRPO, TRIGGER_GRPO],
        why: "eval only",
    },
    Ignored {
        pattern: "run.generation.batch_size",
        kinds: &[WEAVER_GRPO, TRIGGER_GRPO],
        why: "eval only",
    },
    Ignored {
        pattern: "run.generation.max_samples",
        kinds: &[WEAVER_GRPO, TRIGGER_GRPO],
        why: "eval only",
    },
    Ignored {
        pattern: "run.generation.weaver_do_sample",
        kinds: &[WEAVER_GRPO, TRIGGER_GRPO],
        why: "eval only",
    },
    Ignored {
        pattern: "run.generation.trigger_do_sample",
        kinds: &[WEAVER_GRPO, TRIGGER_GRPO],
        why: "eval only",
    },
];

/// Is `key` left out of the comparison for a `kind` run?
pub fn is_ignored(key: &str, kind: &str) -> bool {
    IGNORED.iter().any(|i| {
        (i.kinds.is_empty() || i.kinds.contains(&kind))
            && if let Some(suffix) = i.pattern.strip_prefix('.') {
                key.ends_with(&format!(".{suffix}"))
            } else if i.pattern.ends_with('.') {
                key.starts_with(i.pattern)
            } else {
                key == i.pattern
            }
    })
}

/// The settings of a `kind` run (`sft`, `weaver-grpo`, `trigger-grpo`) with config `cfg`.
pub fn settings(cfg: &RunConfig, kind: &str) -> anyhow::Result<Settings> {
    let mut flat = Settings::new();
    flatten("", &serde_json::to_value(cfg)?, &mut flat);
    flat.retain(|k, _| !is_ignored(k, kind));
    Ok(flat)
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Settings) {
    match v {
        serde_json::Value::Object(o) if !o.is_empty() => {
            for (k, x) in o {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        serde_json::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        // Lists (LoRA targets, delimiters, reward weights) compare whole.
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The keys whose values differ between `old` and `new` (absent shows as `(unset)`).
pub fn differences(old: &Settings, new: &Settings) -> Vec<(String, String, String)> {
    let unset = || "(unset)".to_string();
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| {
            (
                k.clone(),
                old.get(k).cloned().unwrap_or_else(unset),
                new.get(k).cloned().unwrap_or_else(unset),
            )
        })
        .collect()
}

/// A value short enough for a one-line message.
fn shown(v: &str) -> String {
    let v = v.replace('\n', " ");
    if v.chars().count() > 60 {
        format!("{}…", v.chars().take(57).collect::<String>())
    } else {
        v
    }
}

/// Check that resuming from the checkpoint in `dir` (which recorded `stored`) with `current`
/// settings continues the same run. A mismatch is an error naming the keys, unless `anyway`
/// (then one warning line names them). A checkpoint without settings resumes with a warning;
/// `current` None (a run driven without a config) checks nothing.
pub fn check(
    dir: &Path,
    stored: Option<&Settings>,
    current: Option<&Settings>,
    anyway: bool,
) -> anyhow::Result<()> {
    let Some(current) = current else {
        return Ok(());
    };
    let Some(stored) = stored else {
        eprintln!(
            "warning: {} records no settings (an older checkpoint): resuming without checking that they match",
            dir.display()
        );
        return Ok(());
    };
    let diff = differences(stored, current);
    if diff.is_empty() {
        return Ok(());
    }
    let list = diff
        .iter()
        .map(|(k, a, b)| format!("{k} ({} → {})", shown(a), shown(b)))
        .collect::<Vec<_>>()
        .join(", ");
    if anyway {
        eprintln!(
            "warning: resuming {} with changed settings (--resume-anyway): {list}",
            dir.display()
        );
        return Ok(());
    }
    anyhow::bail!(
        "resume: settings differ from the checkpoint's run ({}): {list}; pass --resume-anyway to continue with the new settings",
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(opts: &[(&str, &str)]) -> RunConfig {
        let opts: Vec<(String, String)> = opts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let yaml = "model: {reasoner_model_name: default}\ndatasets: {arith: {train_size: 8}}\n";
        RunConfig::from_yaml(yaml, "test.yaml", &opts).unwrap()
    }

    #[test]
    fn result_shaping_keys_differ_and_bookkeeping_keys_do_not() {
        let base = settings(&cfg(&[]), SFT).unwrap();
        for key in [
            "run.seed",
            "run.weaver.sft.learning_rate",
            "run.weaver.sft.adam_beta2",
            "run.weaver.sft.max_grad_norm",
            "run.weaver.sft.warmup_ratio",
            "run.weaver.sft.gradient_accumulation_steps",
            "run.weaver.sft.max_length",
            "model.reasoner_model_name",
            "model.dtype",
            "model.weaver.prompt_latents_len",
            "model.weaver.peft_config.r",
            "datasets.arith.train_size",
        ] {
            assert!(base.contains_key(key), "{key} is not compared");
        }
        let changed = settings(
            &cfg(&[("run.weaver.sft.learning_rate", "2e-5"), ("run.seed", "7")]),
            SFT,
        )
        .unwrap();
        let d = differences(&base, &changed);
        let keys: Vec<&str> = d.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(keys, ["run.seed", "run.weaver.sft.learning_rate"]);
        assert_eq!(d[0].1, "42");
        assert_eq!(d[0].2, "7");
        // Bookkeeping, and another phase's section, are not compared.
        let same = settings(
            &cfg(&[
                ("run.output_dir", "elsewhere"),
                ("run.weaver.sft.logging_steps", "7"),
                ("run.weaver.sft.save_steps", "3"),
                ("run.weaver.sft.per_device_eval_batch_size", "2"),
                ("run.weaver.grpo.learning_rate", "0.1"),
                ("run.generation.max_new_tokens", "9"),
            ]),
            SFT,
        )
        .unwrap();
        assert!(differences(&base, &same).is_empty());
        // …but GRPO reads its own section and the episode caps.
        let g = settings(&cfg(&[]), WEAVER_GRPO).unwrap();
        assert!(
            g.contains_key("run.weaver.grpo.beta") && g.contains_key("run.generation.max_turns")
        );
        assert!(!g.contains_key("run.generation.temperature"));
        assert!(!g.keys().any(|k| k.starts_with("run.weaver.sft.")));
    }

    #[test]
    fn check_refuses_names_keys_and_can_be_overridden() {
        let dir = Path::new("out/checkpoint-last");
        let a = settings(&cfg(&[]), SFT).unwrap();
        let b = settings(&cfg(&[("run.weaver.sft.learning_rate", "2e-5")]), SFT).unwrap();
        let e = check(dir, Some(&a), Some(&b), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("run.weaver.sft.learning_rate (0.00001 → 0.00002)")
                && e.contains("--resume-anyway")
                && !e.contains('\n'),
            "{e}"
        );
        check(dir, Some(&a), Some(&b), true).unwrap();
        check(dir, Some(&a), Some(&a), false).unwrap();
        check(dir, None, Some(&a), false).unwrap();
        check(dir, Some(&a), None, false).unwrap();
    }
}
