//! The sections of a run config other than the training phases (`phases.rs`): the models, the
//! run switches, the dataset split settings and evaluation's generation settings. Every field
//! has a default (the `Default` impls, which serde uses for missing keys); unknown keys are
//! errors.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::checked;
use super::enums::{Device, Dtype, RunMode, TrainMethod, TriggerMethod};
use super::phases::{GrpoConfig, SftConfig};
use crate::backbone::LoraConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// The frozen reasoner: `default` (SmolLM2-135M-Instruct), a .gguf, a model directory or a hub id.
    #[serde(alias = "model_name")]
    pub reasoner_model_name: String,
    /// A trained checkpoint (`model.safetensors` or its directory) to start from.
    pub load_model_path: Option<PathBuf>,
    pub max_prompt_aug_num: usize,
    pub max_inference_aug_num: usize,
    pub delimiters: Vec<String>,
    pub dtype: Dtype,
    pub device: Device,
    pub weaver: WeaverSection,
    pub trigger: TriggerSection,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            reasoner_model_name: "default".into(),
            load_model_path: None,
            max_prompt_aug_num: 1,
            max_inference_aug_num: 5,
            delimiters: crate::memory::default_delimiters(),
            dtype: Dtype::F32,
            device: Device::Cpu,
            weaver: WeaverSection::default(),
            trigger: TriggerSection::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WeaverSection {
    /// The weaver's backbone; null means the reasoner's checkpoint (weights shared).
    #[serde(alias = "model_name")]
    pub weaver_model_name: Option<String>,
    pub prompt_latents_len: usize,
    pub inference_latents_len: usize,
    #[serde(deserialize_with = "checked::lora_only")]
    pub use_peft: bool,
    #[serde(alias = "lora_config")]
    pub peft_config: LoraConfig,
}

impl Default for WeaverSection {
    fn default() -> Self {
        WeaverSection {
            weaver_model_name: None,
            prompt_latents_len: 8,
            inference_latents_len: 8,
            use_peft: true,
            peft_config: LoraConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TriggerSection {
    /// The trigger's backbone; null means the reasoner's checkpoint.
    #[serde(alias = "model_name")]
    pub trigger_model_name: Option<String>,
    /// Use a trained trigger (true) or the nano trigger that always inserts (false). Trigger
    /// training turns it on.
    pub active: bool,
    /// Accepted for compatibility: the trigger is always a LoRA adapter (`false` warns).
    pub use_peft: bool,
    #[serde(alias = "lora_config")]
    pub peft_config: LoraConfig,
}

impl Default for TriggerSection {
    fn default() -> Self {
        TriggerSection {
            trigger_model_name: None,
            active: false,
            use_peft: true,
            peft_config: LoraConfig::default(),
        }
    }
}

/// `datasets.<name>.sft` / `.grpo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitSection {
    pub val_ratio: f64,
}

impl Default for SplitSection {
    fn default() -> Self {
        SplitSection { val_ratio: 0.1 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    pub seed: u64,
    /// Informational: the subcommand decides what runs.
    pub mode: RunMode,
    /// Where checkpoints, metrics and answers go; default `runs/<dataset>`.
    pub output_dir: Option<PathBuf>,
    pub train_weaver: bool,
    pub train_weaver_method: TrainMethod,
    pub train_trigger: bool,
    pub train_trigger_method: TriggerMethod,
    pub weaver: WeaverRun,
    pub trigger: TriggerRun,
    #[serde(alias = "interaction")]
    pub generation: GenerationConfig,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            seed: 42,
            mode: RunMode::Train,
            output_dir: None,
            train_weaver: true,
            train_weaver_method: TrainMethod::Sft,
            train_trigger: false,
            train_trigger_method: TriggerMethod::Grpo,
            weaver: WeaverRun::default(),
            trigger: TriggerRun::default(),
            generation: GenerationConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct WeaverRun {
    pub sft: SftConfig,
    pub grpo: GrpoConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TriggerRun {
    /// Without a `grpo` section the trigger learns at 1e-6 (the original's); a section that
    /// leaves `learning_rate` out gets GRPO's 1e-5, as it always has.
    pub grpo: GrpoConfig,
}

impl Default for TriggerRun {
    fn default() -> Self {
        let mut grpo = GrpoConfig::default();
        grpo.args.learning_rate = 1e-6;
        TriggerRun { grpo }
    }
}

/// Generation during evaluation (greedy by default, as the original evaluates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    #[serde(alias = "max_response_length")]
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    /// Rows generated together.
    pub batch_size: usize,
    /// Evaluate at most this many test rows.
    pub max_samples: Option<usize>,
    /// Multi-turn tasks: assistant turns per episode.
    pub max_turns: usize,
    /// Multi-turn tasks: observations are cut to this many tokens.
    #[serde(alias = "max_obs_length")]
    pub max_obs_tokens: usize,
    // Accepted for compatibility with the original's `interaction` section and ignored, with a
    // start-up warning when set (config/ignored.rs).
    pub max_start_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    pub weaver_do_sample: bool,
    /// Sample the trigger's decisions (at temperature 1 when `temperature` is 0) instead of
    /// taking its argmax.
    pub trigger_do_sample: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 1024,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            batch_size: 8,
            max_samples: None,
            max_turns: 5,
            max_obs_tokens: 512,
            max_start_length: None,
            max_prompt_length: None,
            weaver_do_sample: false,
            trigger_do_sample: false,
        }
    }
}
