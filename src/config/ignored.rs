//! Keys the run config accepts for compatibility with the original's configs but memgen does not
//! act on. Each draws one warning line at start-up that names it, so a setting that changes
//! nothing is never silent. A key warns only when its value asks for something memgen does not
//! do (`bf16: true`, `report_to: [tensorboard]`, `optim: sgd`, …); the value memgen's behaviour
//! already matches (`bf16: false`, `optim: adamw_torch`, …) stays quiet. Unknown keys remain
//! errors (serde's `deny_unknown_fields`, and `phases.rs` for the training sections), and so
//! are values outside a key's closed set (`run.mode: trian`, `optim: adamw_trch`).

use super::{GenerationConfig, IntervalStrategy, RunConfig, TrainingArgs};
use crate::backbone::LoraConfig;

/// Why a key is ignored, and what to do instead.
struct Ignored {
    key: String,
    why: &'static str,
}

/// The settings SFT and GRPO share, at `at` (`run.weaver.sft`, …).
fn common(at: &str, c: &TrainingArgs, out: &mut Vec<Ignored>) {
    let mut add = |k: &str, why| {
        out.push(Ignored {
            key: format!("{at}.{k}"),
            why,
        })
    };
    if c.bf16 {
        add(
            "bf16",
            "memgen computes in model.dtype: set model.dtype bf16 (or --dtype bf16) instead",
        );
    }
    if c.report_to.iter().any(|r| r != "none") {
        add(
            "report_to",
            "memgen writes its own metrics files under the output directory",
        );
    }
    if c.remove_unused_columns {
        add(
            "remove_unused_columns",
            "memgen's tasks build their rows themselves",
        );
    }
    if !c.optim.is_adamw() {
        add(
            "optim",
            "memgen always uses AdamW (as torch.optim.AdamW, adamw_torch)",
        );
    }
    if c.logging_strategy != IntervalStrategy::Steps {
        add(
            "logging_strategy",
            "memgen logs every logging_steps optimiser steps",
        );
    }
}

fn lora(at: &str, l: &LoraConfig, out: &mut Vec<Ignored>) {
    if l.task_type != "CAUSAL_LM" {
        out.push(Ignored {
            key: format!("{at}.peft_config.task_type"),
            why: "memgen's adapters are always causal-LM LoRA",
        });
    }
}

fn generation(g: &GenerationConfig, out: &mut Vec<Ignored>) {
    let at = "run.generation";
    if g.max_start_length.is_some() {
        out.push(Ignored {
            key: format!("{at}.max_start_length"),
            why: "prompts are checked against the model's context instead",
        });
    }
    if g.max_prompt_length.is_some() {
        out.push(Ignored {
            key: format!("{at}.max_prompt_length"),
            why: "prompts are checked against the model's context instead",
        });
    }
    if g.weaver_do_sample {
        out.push(Ignored {
            key: format!("{at}.weaver_do_sample"),
            why: "the weaver's latents are deterministic (its hidden states, not samples)",
        });
    }
}

impl RunConfig {
    /// One line per key this config sets that memgen accepts but ignores, naming the key.
    pub fn ignored_key_warnings(&self) -> Vec<String> {
        let mut out = vec![];
        let r = &self.run;
        common("run.weaver.sft", &r.weaver.sft.args, &mut out);
        if !r.weaver.sft.assistant_only_loss {
            out.push(Ignored {
                key: "run.weaver.sft.assistant_only_loss".into(),
                why: "the SFT loss is always on the answer tokens only (docs/DESIGN.md, \"The SFT loss\")",
            });
        }
        common("run.weaver.grpo", &r.weaver.grpo.args, &mut out);
        common("run.trigger.grpo", &r.trigger.grpo.args, &mut out);
        generation(&r.generation, &mut out);
        lora("model.weaver", &self.model.weaver.peft_config, &mut out);
        lora("model.trigger", &self.model.trigger.peft_config, &mut out);
        if !self.model.trigger.use_peft {
            out.push(Ignored {
                key: "model.trigger.use_peft".into(),
                why: "memgen always trains the trigger as a LoRA adapter with its head",
            });
        }
        out.into_iter()
            .map(|i| {
                format!(
                    "warning: config: {} is accepted for compatibility with the original and ignored ({})",
                    i.key, i.why
                )
            })
            .collect()
    }

    /// Print [`RunConfig::ignored_key_warnings`] to stderr, once, at start-up.
    pub fn warn_ignored_keys(&self) {
        for w in self.ignored_key_warnings() {
            eprintln!("{w}");
        }
    }
}
