//! Run configs: the YAML files under `configs/`, shaped like the original project's (`model`,
//! `datasets`, `run`), with dotted `--options key value` overrides. Unknown keys and wrong types are
//! errors that name the key; contradictory settings are caught before any work starts.

mod ignored;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backbone::LoraConfig;
use crate::memory::{InsertionConfig, MemGenSpec};
use crate::retrieval::client::RetrievalConfig;
use crate::tasks::TaskConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    /// One entry: the task name, its data and split settings (`mode`, `sft`, `grpo`) and any
    /// task option (`train_path`, `test_path`, `fields`, `limit`, …).
    #[serde(default)]
    pub datasets: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub run: RunSection,
    /// The Search-R1 retriever, for the search tasks.
    #[serde(default)]
    pub retrieval: RetrievalConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The frozen reasoner: `default` (SmolLM2-135M-Instruct), a .gguf, a model directory or a hub id.
    #[serde(default = "default_model", alias = "model_name")]
    pub reasoner_model_name: String,
    /// A trained checkpoint (`model.safetensors` or its directory) to start from.
    #[serde(default)]
    pub load_model_path: Option<PathBuf>,
    #[serde(default = "one")]
    pub max_prompt_aug_num: usize,
    #[serde(default = "five")]
    pub max_inference_aug_num: usize,
    #[serde(default = "crate::memory::default_delimiters")]
    pub delimiters: Vec<String>,
    #[serde(default = "f32s")]
    pub dtype: String,
    #[serde(default = "cpu")]
    pub device: String,
    #[serde(default)]
    pub weaver: WeaverSection,
    #[serde(default)]
    pub trigger: TriggerSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeaverSection {
    /// The weaver's backbone; null means the reasoner's checkpoint (weights shared).
    #[serde(default, alias = "model_name")]
    pub weaver_model_name: Option<String>,
    #[serde(default = "eight")]
    pub prompt_latents_len: usize,
    #[serde(default = "eight")]
    pub inference_latents_len: usize,
    #[serde(default = "yes")]
    pub use_peft: bool,
    #[serde(default, alias = "lora_config")]
    pub peft_config: LoraConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSection {
    /// The trigger's backbone; null means the reasoner's checkpoint.
    #[serde(default, alias = "model_name")]
    pub trigger_model_name: Option<String>,
    /// Use a trained trigger (true) or the nano trigger that always inserts (false). Trigger
    /// training turns it on.
    #[serde(default)]
    pub active: bool,
    #[serde(default = "yes")]
    pub use_peft: bool,
    #[serde(default, alias = "lora_config")]
    pub peft_config: LoraConfig,
}

/// `datasets.<name>.sft` / `.grpo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSection {
    #[serde(default = "val_ratio")]
    pub val_ratio: f64,
}

impl Default for SplitSection {
    fn default() -> Self {
        SplitSection { val_ratio: 0.1 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    #[serde(default = "seed")]
    pub seed: u64,
    /// `train` or `evaluate` (informational: the subcommand decides what runs).
    #[serde(default = "train")]
    pub mode: String,
    /// Where checkpoints, metrics and answers go; default `runs/<dataset>`.
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    #[serde(default = "yes")]
    pub train_weaver: bool,
    #[serde(default = "sft")]
    pub train_weaver_method: String,
    #[serde(default)]
    pub train_trigger: bool,
    #[serde(default = "grpo")]
    pub train_trigger_method: String,
    #[serde(default)]
    pub weaver: WeaverRun,
    #[serde(default)]
    pub trigger: TriggerRun,
    #[serde(default, alias = "interaction")]
    pub generation: GenerationConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct WeaverRun {
    #[serde(default)]
    pub sft: SftConfig,
    #[serde(default)]
    pub grpo: GrpoConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerRun {
    #[serde(default = "trigger_grpo")]
    pub grpo: GrpoConfig,
}

impl Default for TriggerRun {
    fn default() -> Self {
        TriggerRun {
            grpo: trigger_grpo(),
        }
    }
}

/// Optimiser and bookkeeping settings shared by SFT and GRPO (Hugging Face TrainingArguments names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    #[serde(default = "two")]
    pub num_train_epochs: f64,
    /// Stop after this many optimiser steps (overrides epochs when set).
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default = "four")]
    pub per_device_train_batch_size: usize,
    #[serde(default = "four")]
    pub per_device_eval_batch_size: usize,
    #[serde(default = "one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "adamw")]
    pub optim: String,
    #[serde(default = "cosine")]
    pub lr_scheduler_type: String,
    #[serde(default = "warmup")]
    pub warmup_ratio: f64,
    #[serde(default = "lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "beta1")]
    pub adam_beta1: f64,
    #[serde(default = "beta2")]
    pub adam_beta2: f64,
    #[serde(default = "adam_eps")]
    pub adam_epsilon: f64,
    #[serde(default = "grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default = "steps")]
    pub logging_strategy: String,
    #[serde(default = "one")]
    pub logging_steps: usize,
    /// `steps`, `epoch` or `no`.
    #[serde(default = "epoch")]
    pub eval_strategy: String,
    #[serde(default = "hundred")]
    pub eval_steps: usize,
    #[serde(default = "epoch")]
    pub save_strategy: String,
    #[serde(default = "hundred")]
    pub save_steps: usize,
    #[serde(default = "yes")]
    pub assistant_only_loss: bool,
    /// Longest prompt + answer in tokens; longer samples are cut (answer side).
    #[serde(default = "max_len")]
    pub max_length: usize,
    #[serde(default = "yes")]
    pub load_best_model_at_end: bool,
    /// Beyond the original (1.0 = the original): each answer boundary keeps its memory with this
    /// probability (then the cap applies), so the weaver is trained on the memory layouts a
    /// trigger that skips some boundaries produces, and its memories stay useful when some are
    /// skipped. Validation thins the same way, with a fixed draw per row.
    #[serde(default = "one_f")]
    pub insertion_probability: f64,
    /// Use at most this many training / validation samples.
    #[serde(default)]
    pub max_train_samples: Option<usize>,
    #[serde(default)]
    pub max_eval_samples: Option<usize>,
    // Accepted for compatibility with the original configs and ignored, with a start-up warning
    // when set (config/ignored.rs): memgen computes in `model.dtype`.
    #[serde(default)]
    pub bf16: bool,
    #[serde(default)]
    pub remove_unused_columns: bool,
    #[serde(default)]
    pub report_to: Vec<String>,
}

impl Default for SftConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoConfig {
    #[serde(default = "one_f")]
    pub num_train_epochs: f64,
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Completions per optimiser step (batch 8 with 8 generations = one prompt per step).
    #[serde(default = "eightu")]
    pub per_device_train_batch_size: usize,
    #[serde(default = "eightu")]
    pub per_device_eval_batch_size: usize,
    #[serde(default = "eightu")]
    pub num_generations: usize,
    #[serde(default = "one")]
    pub num_iterations: usize,
    #[serde(default = "one")]
    pub gradient_accumulation_steps: usize,
    /// KL coefficient to the frozen starting policy (0 = no reference model).
    #[serde(default)]
    pub beta: f64,
    /// `grpo`, `bnpo` or `dr_grpo`.
    #[serde(default = "bnpo")]
    pub loss_type: String,
    #[serde(default = "eps_clip")]
    pub epsilon: f64,
    /// Upper clip; defaults to `epsilon`.
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    /// Divide advantages by the group std (+1e-4).
    #[serde(default = "yes")]
    pub scale_rewards: bool,
    /// Weights of the task's reward functions (default: all 1).
    #[serde(default)]
    pub reward_weights: Option<Vec<f64>>,
    #[serde(default = "max_len")]
    pub max_prompt_length: usize,
    #[serde(default = "half_k")]
    pub max_completion_length: usize,
    #[serde(default = "one_f")]
    pub temperature: f64,
    #[serde(default = "one_f")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: usize,
    /// Trigger only: reward − λ · insertions / cap (0 = the original's reward).
    #[serde(default)]
    pub insertion_penalty: f64,
    /// Trigger only: sample the reasoner's tokens at this temperature (0: greedy) while the
    /// trigger's decisions keep `temperature`. Unset (the original): both at `temperature`.
    /// Greedy answers leave the trigger's decisions as the only difference within a group,
    /// so the advantages credit them alone.
    #[serde(default)]
    pub reasoner_temperature: Option<f64>,
    /// Trigger only: a fresh trigger's head starts out inserting at every boundary with this
    /// probability (unset: 0.5, both actions equally likely). Near 1 the rollouts are the nano
    /// trigger's with a memory or two left out, so a group's rewards tell which ones mattered.
    #[serde(default)]
    pub initial_insertion_probability: Option<f64>,
    #[serde(default = "adamw")]
    pub optim: String,
    #[serde(default = "cosine")]
    pub lr_scheduler_type: String,
    #[serde(default = "warmup")]
    pub warmup_ratio: f64,
    #[serde(default = "lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "beta1")]
    pub adam_beta1: f64,
    #[serde(default = "beta2")]
    pub adam_beta2: f64,
    #[serde(default = "adam_eps")]
    pub adam_epsilon: f64,
    #[serde(default = "grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default = "steps")]
    pub logging_strategy: String,
    #[serde(default = "one")]
    pub logging_steps: usize,
    #[serde(default = "epoch")]
    pub eval_strategy: String,
    #[serde(default = "hundred")]
    pub eval_steps: usize,
    #[serde(default = "epoch")]
    pub save_strategy: String,
    #[serde(default = "hundred")]
    pub save_steps: usize,
    #[serde(default = "yes")]
    pub load_best_model_at_end: bool,
    #[serde(default)]
    pub max_train_samples: Option<usize>,
    #[serde(default)]
    pub max_eval_samples: Option<usize>,
    #[serde(default)]
    pub bf16: bool,
    #[serde(default)]
    pub remove_unused_columns: bool,
    #[serde(default)]
    pub report_to: Vec<String>,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults")
    }
}

fn trigger_grpo() -> GrpoConfig {
    GrpoConfig {
        learning_rate: 1e-6,
        ..GrpoConfig::default()
    }
}

/// Generation during evaluation (greedy by default, as the original evaluates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    #[serde(default = "k", alias = "max_response_length")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub temperature: f64,
    #[serde(default = "one_f")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: usize,
    /// Rows generated together.
    #[serde(default = "eightu")]
    pub batch_size: usize,
    /// Evaluate at most this many test rows.
    #[serde(default)]
    pub max_samples: Option<usize>,
    /// Multi-turn tasks: assistant turns per episode.
    #[serde(default = "five")]
    pub max_turns: usize,
    /// Multi-turn tasks: observations are cut to this many tokens.
    #[serde(default = "obs", alias = "max_obs_length")]
    pub max_obs_tokens: usize,
    // Accepted for compatibility with the original's `interaction` section and ignored, with a
    // start-up warning when set (config/ignored.rs).
    #[serde(default)]
    pub max_start_length: Option<usize>,
    #[serde(default)]
    pub max_prompt_length: Option<usize>,
    #[serde(default)]
    pub weaver_do_sample: bool,
    /// Sample the trigger's decisions (at temperature 1 when `temperature` is 0) instead of
    /// taking its argmax.
    #[serde(default)]
    pub trigger_do_sample: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults")
    }
}

impl Default for RunSection {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults")
    }
}

impl Default for WeaverSection {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults")
    }
}

impl Default for TriggerSection {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults")
    }
}

fn default_model() -> String {
    "default".into()
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn five() -> usize {
    5
}
fn eight() -> usize {
    8
}
fn eightu() -> usize {
    8
}
fn hundred() -> usize {
    100
}
fn max_len() -> usize {
    1024
}
fn half_k() -> usize {
    512
}
fn k() -> usize {
    1024
}
fn obs() -> usize {
    512
}
fn two() -> f64 {
    2.0
}
fn one_f() -> f64 {
    1.0
}
fn val_ratio() -> f64 {
    0.1
}
fn warmup() -> f64 {
    0.1
}
fn lr() -> f64 {
    1e-5
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.999
}
fn adam_eps() -> f64 {
    1e-8
}
fn grad_norm() -> f64 {
    1.0
}
fn eps_clip() -> f64 {
    0.2
}
fn seed() -> u64 {
    42
}
fn yes() -> bool {
    true
}
fn f32s() -> String {
    "f32".into()
}
fn cpu() -> String {
    "cpu".into()
}
fn train() -> String {
    "train".into()
}
fn sft() -> String {
    "sft".into()
}
fn grpo() -> String {
    "grpo".into()
}
fn bnpo() -> String {
    "bnpo".into()
}
fn adamw() -> String {
    "adamw_torch".into()
}
fn cosine() -> String {
    "cosine".into()
}
fn steps() -> String {
    "steps".into()
}
fn epoch() -> String {
    "epoch".into()
}

/// The dataset entry of a run: its name, split settings and the task config built from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub mode: String,
    pub sft: SplitSection,
    pub grpo: SplitSection,
    pub task: TaskConfig,
}

/// Set `a.b.c = value` in a JSON tree, creating objects on the way; `value` is parsed as YAML so
/// numbers, booleans, null and lists work (`[q_proj, v_proj]`).
fn set_dotted(root: &mut serde_json::Value, key: &str, value: &str) -> anyhow::Result<()> {
    let parsed: serde_json::Value = serde_yaml::from_str(value)
        .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        anyhow::bail!("--options: bad key `{key}`");
    }
    for (i, p) in parts.iter().enumerate() {
        let obj = cur.as_object_mut().ok_or_else(|| {
            anyhow::anyhow!(
                "--options {key}: `{}` is not a section",
                parts[..i].join(".")
            )
        })?;
        if i + 1 == parts.len() {
            obj.insert(p.to_string(), parsed);
            return Ok(());
        }
        cur = obj
            .entry(p.to_string())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if cur.is_null() {
            *cur = serde_json::Value::Object(Default::default());
        }
    }
    Ok(())
}

impl RunConfig {
    /// Read a YAML config, apply `--options` overrides, and check it.
    pub fn load(path: &Path, options: &[(String, String)]) -> anyhow::Result<RunConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::from_yaml(&text, &path.display().to_string(), options)
    }

    pub fn from_yaml(
        text: &str,
        file: &str,
        options: &[(String, String)],
    ) -> anyhow::Result<RunConfig> {
        let mut tree: serde_json::Value =
            serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("{file}: invalid YAML: {e}"))?;
        if tree.is_null() {
            tree = serde_json::Value::Object(Default::default());
        }
        // The original's single `dataset: {name: …}` section maps onto `datasets.<name>`.
        if let Some(obj) = tree.as_object_mut() {
            if let Some(mut ds) = obj.remove("dataset") {
                let name = ds
                    .as_object_mut()
                    .and_then(|o| o.remove("name"))
                    .and_then(|n| n.as_str().map(String::from))
                    .ok_or_else(|| anyhow::anyhow!("{file}: `dataset` needs a `name`"))?;
                obj.insert("datasets".into(), serde_json::json!({ name: ds }));
            }
        }
        for (k, v) in options {
            set_dotted(&mut tree, k, v).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        }
        let cfg: RunConfig = serde_path_to_error::deserialize(&tree).map_err(|e| {
            let at = e.path().to_string();
            anyhow::anyhow!("{file}: at `{at}`: {}", e.inner())
        })?;
        cfg.validate().map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        Ok(cfg)
    }

    /// Contradictions and out-of-range values, before any work starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        let r = &self.run;
        if !matches!(r.train_weaver_method.as_str(), "sft" | "grpo") {
            anyhow::bail!(
                "run.train_weaver_method must be sft or grpo, got `{}`",
                r.train_weaver_method
            );
        }
        if r.train_trigger_method != "grpo" {
            anyhow::bail!(
                "run.train_trigger_method must be grpo, got `{}`",
                r.train_trigger_method
            );
        }
        for (name, g) in [
            ("run.weaver.grpo", &r.weaver.grpo),
            ("run.trigger.grpo", &r.trigger.grpo),
        ] {
            if !matches!(g.loss_type.as_str(), "grpo" | "bnpo" | "dr_grpo") {
                anyhow::bail!(
                    "{name}.loss_type must be grpo, bnpo or dr_grpo, got `{}`",
                    g.loss_type
                );
            }
            if g.num_generations < 2 {
                anyhow::bail!(
                    "{name}.num_generations must be at least 2 (advantages compare a group)"
                );
            }
            if g.per_device_train_batch_size % g.num_generations != 0 {
                anyhow::bail!(
                    "{name}.per_device_train_batch_size ({}) must be a multiple of num_generations ({})",
                    g.per_device_train_batch_size,
                    g.num_generations
                );
            }
            if g.reasoner_temperature
                .is_some_and(|t| !(t >= 0.0 && t.is_finite()))
            {
                anyhow::bail!("{name}.reasoner_temperature must be a finite number ≥ 0");
            }
            if g.num_iterations == 0 || g.gradient_accumulation_steps == 0 {
                anyhow::bail!(
                    "{name}: num_iterations and gradient_accumulation_steps must be at least 1"
                );
            }
        }
        if r.trigger
            .grpo
            .initial_insertion_probability
            .is_some_and(|p| !(p > 0.0 && p < 1.0))
        {
            anyhow::bail!(
                "run.trigger.grpo.initial_insertion_probability must be strictly between 0 and 1"
            );
        }
        if r.weaver.grpo.initial_insertion_probability.is_some() {
            anyhow::bail!(
                "run.weaver.grpo.initial_insertion_probability applies to trigger GRPO only"
            );
        }
        if r.weaver.grpo.reasoner_temperature.is_some() {
            // The weaver's policy is the reasoner's token distribution: it must be sampled.
            anyhow::bail!("run.weaver.grpo.reasoner_temperature applies to trigger GRPO only (weaver GRPO samples at temperature)");
        }
        let s = &r.weaver.sft;
        if s.per_device_train_batch_size == 0 || s.gradient_accumulation_steps == 0 {
            anyhow::bail!(
                "run.weaver.sft: batch size and gradient_accumulation_steps must be at least 1"
            );
        }
        if !(0.0..=1.0).contains(&s.insertion_probability) {
            anyhow::bail!(
                "run.weaver.sft.insertion_probability must be between 0 and 1, got {}",
                s.insertion_probability
            );
        }
        for (name, v) in [
            ("run.weaver.sft.learning_rate", s.learning_rate),
            ("run.weaver.grpo.learning_rate", r.weaver.grpo.learning_rate),
            (
                "run.trigger.grpo.learning_rate",
                r.trigger.grpo.learning_rate,
            ),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                anyhow::bail!("{name} must be positive, got {v}");
            }
        }
        for (name, v) in [
            ("run.weaver.sft.lr_scheduler_type", &s.lr_scheduler_type),
            (
                "run.weaver.grpo.lr_scheduler_type",
                &r.weaver.grpo.lr_scheduler_type,
            ),
            (
                "run.trigger.grpo.lr_scheduler_type",
                &r.trigger.grpo.lr_scheduler_type,
            ),
        ] {
            if !matches!(
                v.as_str(),
                "cosine" | "linear" | "constant" | "constant_with_warmup"
            ) {
                anyhow::bail!(
                    "{name} must be cosine, linear, constant or constant_with_warmup, got `{v}`"
                );
            }
        }
        if r.train_trigger && self.model.load_model_path.is_none() {
            anyhow::bail!(
                "trigger training needs a trained weaver: set model.load_model_path (or --load-model-path)"
            );
        }
        if self.datasets.len() > 1 {
            anyhow::bail!("datasets: one dataset per run, got {}", self.datasets.len());
        }
        if self.model.max_prompt_aug_num == 0
            && self.model.max_inference_aug_num == 0
            && r.train_weaver
        {
            anyhow::bail!("model: max_prompt_aug_num and max_inference_aug_num are both 0, so the weaver would never be used");
        }
        if !self.model.weaver.use_peft {
            anyhow::bail!(
                "model.weaver.use_peft: false is not supported (memgen trains LoRA adapters)"
            );
        }
        self.dataset()?;
        Ok(())
    }

    /// The run's dataset entry and the task config it describes.
    pub fn dataset(&self) -> anyhow::Result<Dataset> {
        let (name, v) = self
            .datasets
            .iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("datasets: no dataset configured"))?;
        let mut obj = match v {
            serde_json::Value::Object(o) => o.clone(),
            serde_json::Value::Null => Default::default(),
            _ => anyhow::bail!("datasets.{name} must be a mapping"),
        };
        let mode = obj
            .remove("mode")
            .map(|m| {
                m.as_str()
                    .map(String::from)
                    .ok_or_else(|| anyhow::anyhow!("datasets.{name}.mode must be a string"))
            })
            .transpose()?
            .unwrap_or_else(|| self.run.train_weaver_method.clone());
        let split = |v: Option<serde_json::Value>, key: &str| -> anyhow::Result<SplitSection> {
            match v {
                None | Some(serde_json::Value::Null) => Ok(SplitSection::default()),
                Some(v) => serde_path_to_error::deserialize(&v).map_err(|e| {
                    anyhow::anyhow!("datasets.{name}.{key}.{}: {}", e.path(), e.inner())
                }),
            }
        };
        let sft = split(obj.remove("sft"), "sft")?;
        let grpo = split(obj.remove("grpo"), "grpo")?;
        obj.entry("name")
            .or_insert_with(|| serde_json::Value::String(name.clone()));
        obj.entry("seed")
            .or_insert_with(|| serde_json::json!(self.run.seed));
        let val_ratio = if mode == "grpo" {
            grpo.val_ratio
        } else {
            sft.val_ratio
        };
        obj.entry("val_ratio")
            .or_insert_with(|| serde_json::json!(val_ratio));
        let task: TaskConfig = serde_path_to_error::deserialize(&serde_json::Value::Object(obj))
            .map_err(|e| anyhow::anyhow!("datasets.{name}.{}: {}", e.path(), e.inner()))?;
        Ok(Dataset {
            name: name.clone(),
            mode,
            sft,
            grpo,
            task,
        })
    }

    /// Where this run writes: `run.output_dir`, else `runs/<dataset>`.
    pub fn output_dir(&self) -> PathBuf {
        self.run.output_dir.clone().unwrap_or_else(|| {
            PathBuf::from("runs").join(
                self.datasets
                    .keys()
                    .next()
                    .cloned()
                    .unwrap_or_else(|| "run".into()),
            )
        })
    }

    /// The MemGen model this config describes. `with_trigger`: build a trainable/active trigger.
    pub fn memgen_spec(&self, with_trigger: bool) -> MemGenSpec {
        let m = &self.model;
        let trigger = with_trigger || m.trigger.active;
        MemGenSpec {
            reasoner_model: m.reasoner_model_name.clone(),
            weaver_model: m.weaver.weaver_model_name.clone(),
            trigger_model: trigger.then(|| {
                m.trigger
                    .trigger_model_name
                    .clone()
                    .unwrap_or_else(|| m.reasoner_model_name.clone())
            }),
            weaver_lora: m.weaver.peft_config.clone(),
            trigger_lora: m.trigger.peft_config.clone(),
            prompt_latents_len: m.weaver.prompt_latents_len,
            inference_latents_len: m.weaver.inference_latents_len,
            insertion: InsertionConfig {
                max_prompt_aug_num: m.max_prompt_aug_num,
                max_inference_aug_num: m.max_inference_aug_num,
                delimiters: m.delimiters.clone(),
            },
            dtype: m.dtype.clone(),
            seed: self.run.seed,
        }
    }

    /// The resolved config as YAML (saved as `<output_dir>/config.yaml`).
    pub fn to_yaml(&self) -> anyhow::Result<String> {
        Ok(serde_yaml::to_string(self)?)
    }
}

/// Parse `--options k1 v1 k2 v2 …` into pairs.
pub fn parse_options(words: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    if !words.len().is_multiple_of(2) {
        anyhow::bail!(
            "--options takes key value pairs; `{}` has no value",
            words.last().unwrap()
        );
    }
    Ok(words
        .chunks(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect())
}
