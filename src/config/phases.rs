//! The settings of the training phases: weaver SFT, weaver GRPO and trigger GRPO. The optimiser
//! and bookkeeping keys they share (Hugging Face TrainingArguments names) are one struct,
//! [`TrainingArgs`], flattened into each phase's section, so the YAML keeps the original's flat
//! layout (`run.weaver.sft.learning_rate`).
//!
//! serde's `flatten` buffers the section before handing it to the shared struct, which loses the
//! key path of an error and cannot reject unknown keys. So a section is read here key by key
//! (`SectionVisitor`): each key is checked against the phase's defaults with only that key
//! changed — the error then carries the key's full path — and the checked keys are laid over the
//! defaults. A phase's `Default` is therefore where all of its defaults live, including those of
//! the shared keys (SFT and GRPO differ in epochs and batch sizes).

use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use super::checked;
use super::enums::{IntervalStrategy, LossType, LrScheduler, Optim};

/// Optimiser and bookkeeping settings shared by SFT and GRPO (Hugging Face TrainingArguments
/// names). Their defaults depend on the phase: see [`SftConfig::default`] and
/// [`GrpoConfig::default`].
// Read only as part of a phase section, which rejects unknown keys and supplies the defaults;
// hence no `deny_unknown_fields` (serde's `flatten` does not support it) and no `Default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingArgs {
    pub num_train_epochs: f64,
    /// Stop after this many optimiser steps (overrides epochs when set).
    pub max_steps: Option<usize>,
    /// GRPO: completions per optimiser step (batch 8 with 8 generations = one prompt per step).
    #[serde(deserialize_with = "checked::at_least_one")]
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    #[serde(deserialize_with = "checked::at_least_one")]
    pub gradient_accumulation_steps: usize,
    pub optim: Optim,
    pub lr_scheduler_type: LrScheduler,
    pub warmup_ratio: f64,
    #[serde(deserialize_with = "checked::positive")]
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub logging_strategy: IntervalStrategy,
    pub logging_steps: usize,
    pub eval_strategy: IntervalStrategy,
    pub eval_steps: usize,
    pub save_strategy: IntervalStrategy,
    pub save_steps: usize,
    pub load_best_model_at_end: bool,
    /// Use at most this many training / validation samples.
    pub max_train_samples: Option<usize>,
    pub max_eval_samples: Option<usize>,
    // Accepted for compatibility with the original configs and ignored, with a start-up warning
    // when set (config/ignored.rs): memgen computes in `model.dtype`.
    pub bf16: bool,
    pub remove_unused_columns: bool,
    pub report_to: Vec<String>,
}

impl TrainingArgs {
    /// The defaults both phases share; `epochs` and `batch` are where they differ.
    fn phase_defaults(epochs: f64, batch: usize) -> TrainingArgs {
        TrainingArgs {
            num_train_epochs: epochs,
            max_steps: None,
            per_device_train_batch_size: batch,
            per_device_eval_batch_size: batch,
            gradient_accumulation_steps: 1,
            optim: Optim::AdamwTorch,
            lr_scheduler_type: LrScheduler::Cosine,
            warmup_ratio: 0.1,
            learning_rate: 1e-5,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            logging_strategy: IntervalStrategy::Steps,
            logging_steps: 1,
            eval_strategy: IntervalStrategy::Epoch,
            eval_steps: 100,
            save_strategy: IntervalStrategy::Epoch,
            save_steps: 100,
            load_best_model_at_end: true,
            max_train_samples: None,
            max_eval_samples: None,
            bf16: false,
            remove_unused_columns: false,
            report_to: vec![],
        }
    }
}

/// `run.weaver.sft`: supervised training of the weaver.
// `remote = "Self"`: serde's derive becomes the inherent `SftConfig::deserialize` (which needs
// every key), and the `Deserialize` impl below reads a section key by key (`SectionVisitor`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct SftConfig {
    #[serde(flatten)]
    pub args: TrainingArgs,
    /// The SFT loss is always on the answer tokens; `false` is accepted and warns.
    pub assistant_only_loss: bool,
    /// Longest prompt + answer in tokens; longer samples are cut (answer side).
    pub max_length: usize,
    /// Beyond the original (1.0 = the original): each answer boundary keeps its memory with this
    /// probability (then the cap applies), so the weaver is trained on the memory layouts a
    /// trigger that skips some boundaries produces, and its memories stay useful when some are
    /// skipped. Validation thins the same way, with a fixed draw per row.
    #[serde(deserialize_with = "checked::probability")]
    pub insertion_probability: f64,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            args: TrainingArgs::phase_defaults(2.0, 4),
            assistant_only_loss: true,
            max_length: 1024,
            insertion_probability: 1.0,
        }
    }
}

/// `run.weaver.grpo` and `run.trigger.grpo`: reinforcement learning of the weaver or trigger.
// `remote = "Self"`: as for SftConfig.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct GrpoConfig {
    #[serde(flatten)]
    pub args: TrainingArgs,
    #[serde(deserialize_with = "checked::at_least_two")]
    pub num_generations: usize,
    #[serde(deserialize_with = "checked::at_least_one")]
    pub num_iterations: usize,
    /// KL coefficient to the frozen starting policy (0 = no reference model).
    pub beta: f64,
    pub loss_type: LossType,
    pub epsilon: f64,
    /// Upper clip; defaults to `epsilon`.
    pub epsilon_high: Option<f64>,
    /// Divide advantages by the group std (+1e-4).
    pub scale_rewards: bool,
    /// Weights of the task's reward functions (default: all 1).
    pub reward_weights: Option<Vec<f64>>,
    pub max_prompt_length: usize,
    pub max_completion_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    /// Trigger only: reward − λ · insertions / cap (0 = the original's reward).
    pub insertion_penalty: f64,
    /// Trigger only: sample the reasoner's tokens at this temperature (0: greedy) while the
    /// trigger's decisions keep `temperature`. Unset (the original): both at `temperature`.
    /// Greedy answers leave the trigger's decisions as the only difference within a group,
    /// so the advantages credit them alone.
    #[serde(deserialize_with = "checked::optional_temperature")]
    pub reasoner_temperature: Option<f64>,
    /// Trigger only: a fresh trigger's head starts out inserting at every boundary with this
    /// probability (unset: 0.5, both actions equally likely). Near 1 the rollouts are the nano
    /// trigger's with a memory or two left out, so a group's rewards tell which ones mattered.
    #[serde(deserialize_with = "checked::optional_open_probability")]
    pub initial_insertion_probability: Option<f64>,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            args: TrainingArgs::phase_defaults(1.0, 8),
            num_generations: 8,
            num_iterations: 1,
            beta: 0.0,
            loss_type: LossType::Bnpo,
            epsilon: 0.2,
            epsilon_high: None,
            scale_rewards: true,
            reward_weights: None,
            max_prompt_length: 1024,
            max_completion_length: 512,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            insertion_penalty: 0.0,
            reasoner_temperature: None,
            initial_insertion_probability: None,
        }
    }
}

/// A phase section, read by `SectionVisitor`.
trait Section: Serialize + Default {
    /// serde's derive: a map holding every key of the section.
    fn from_complete(v: Value) -> Result<Self, serde_json::Error>;
}

/// Implements `Section` and the serde traits over the `remote = "Self"` derive.
macro_rules! section_impls {
    ($t:ident) => {
        impl Section for $t {
            fn from_complete(v: Value) -> Result<Self, serde_json::Error> {
                $t::deserialize(v)
            }
        }

        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                $t::serialize(self, s)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_map(SectionVisitor::<$t>(PhantomData))
            }
        }
    };
}

section_impls!(SftConfig);
section_impls!(GrpoConfig);

/// A phase's defaults as a flat map of its keys.
fn defaults<T: Section>() -> Result<Map<String, Value>, String> {
    match serde_json::to_value(T::default()) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("a phase section must serialise as a mapping".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Reads a section key by key; see the module docs.
struct SectionVisitor<T>(PhantomData<T>);

impl<'de, T: Section> Visitor<'de> for SectionVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a mapping of training settings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let base = defaults::<T>().map_err(de::Error::custom)?;
        let mut full = base.clone();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(KeyCheck::<T> {
                key: &key,
                base: &base,
                phase: PhantomData,
            })?;
            full.insert(key, value);
        }
        T::from_complete(Value::Object(full)).map_err(de::Error::custom)
    }
}

/// One key's value, checked as the phase would read it with every other key at its default.
/// Deserialised as a map value, so an error here carries the key in its path.
struct KeyCheck<'a, T> {
    key: &'a str,
    base: &'a Map<String, Value>,
    phase: PhantomData<T>,
}

impl<'de, T: Section> DeserializeSeed<'de> for KeyCheck<'_, T> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        let value = Value::deserialize(d)?;
        if !self.base.contains_key(self.key) {
            let known: Vec<String> = self.base.keys().map(|k| format!("`{k}`")).collect();
            return Err(de::Error::custom(format!(
                "unknown field `{}`, expected one of {}",
                self.key,
                known.join(", ")
            )));
        }
        let mut probe = self.base.clone();
        probe.insert(self.key.to_string(), value.clone());
        T::from_complete(Value::Object(probe)).map_err(de::Error::custom)?;
        Ok(value)
    }
}
