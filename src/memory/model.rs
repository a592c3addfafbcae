//! `MemGenModel`: the frozen reasoner, the weaver and the (optional) trigger, built from a
//! `MemGenSpec` — the settings `memgen.json` records beside every checkpoint.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Var};
use serde::{Deserialize, Serialize};

use super::insertion::BoundaryDetector;
use super::trigger::Trigger;
use super::weaver::Weaver;
use super::InsertionConfig;
use crate::backbone::{self, Backbone, LoraConfig, TextTokenizer};

/// Everything needed to rebuild a MemGen model (written as `memgen.json` beside checkpoints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemGenSpec {
    /// The frozen reasoner: a .gguf path, model directory, hub id, or `default`.
    pub reasoner_model: String,
    /// The weaver's backbone; by default the reasoner's checkpoint (weights shared in memory).
    #[serde(default)]
    pub weaver_model: Option<String>,
    /// The trigger's backbone; none means the nano trigger (always insert).
    #[serde(default)]
    pub trigger_model: Option<String>,
    #[serde(default)]
    pub weaver_lora: LoraConfig,
    #[serde(default)]
    pub trigger_lora: LoraConfig,
    #[serde(default = "eight")]
    pub prompt_latents_len: usize,
    #[serde(default = "eight")]
    pub inference_latents_len: usize,
    #[serde(default)]
    pub insertion: InsertionConfig,
    #[serde(default = "f32s")]
    pub dtype: String,
    /// Seed of the initial LoRA, latent and projection values.
    #[serde(default = "seed")]
    pub seed: u64,
}

fn eight() -> usize {
    8
}
fn f32s() -> String {
    "f32".into()
}
fn seed() -> u64 {
    42
}

impl MemGenSpec {
    pub fn new(reasoner_model: &str) -> MemGenSpec {
        MemGenSpec {
            reasoner_model: reasoner_model.into(),
            weaver_model: None,
            trigger_model: None,
            weaver_lora: LoraConfig::default(),
            trigger_lora: LoraConfig::default(),
            prompt_latents_len: 8,
            inference_latents_len: 8,
            insertion: InsertionConfig::default(),
            dtype: "f32".into(),
            seed: 42,
        }
    }

    pub fn read(path: &Path) -> anyhow::Result<MemGenSpec> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

#[derive(Clone)]
pub struct MemGenModel {
    pub spec: MemGenSpec,
    pub reasoner: Backbone,
    pub tokenizer: Arc<TextTokenizer>,
    pub weaver: Weaver,
    pub trigger: Option<Trigger>,
    pub boundary: BoundaryDetector,
}

impl MemGenModel {
    /// Load the backbones named by `spec` (sharing frozen weights between same checkpoints) and
    /// initialise fresh trainable tensors from `spec.seed`.
    pub fn build(spec: &MemGenSpec, device: &Device) -> anyhow::Result<MemGenModel> {
        let dtype = backbone::parse_dtype(&spec.dtype)?;
        let rpath = backbone::resolve_model(Some(&spec.reasoner_model))?;
        let reasoner = backbone::load(&rpath, dtype, device)?;
        let weaver_base = match &spec.weaver_model {
            Some(w) => backbone::load(&backbone::resolve_model(Some(w))?, dtype, device)?.backbone,
            None => reasoner.backbone.clone(),
        };
        let trigger_base = match &spec.trigger_model {
            Some(t) => {
                let m = backbone::load(&backbone::resolve_model(Some(t))?, dtype, device)?;
                if m.tokenizer.vocab_size() != reasoner.tokenizer.vocab_size() {
                    anyhow::bail!(
                        "trigger model {t} has a different tokenizer than the reasoner ({} vs {} tokens): the trigger reads the reasoner's token ids",
                        m.tokenizer.vocab_size(),
                        reasoner.tokenizer.vocab_size()
                    );
                }
                Some(m.backbone)
            }
            None => None,
        };
        Self::assemble(
            spec.clone(),
            reasoner.backbone,
            reasoner.tokenizer,
            &weaver_base,
            trigger_base.as_ref(),
        )
    }

    /// Assemble from already loaded backbones (tests build tiny ones in code).
    pub fn assemble(
        spec: MemGenSpec,
        reasoner: Backbone,
        tokenizer: Arc<TextTokenizer>,
        weaver_base: &Backbone,
        trigger_base: Option<&Backbone>,
    ) -> anyhow::Result<MemGenModel> {
        if !reasoner.lora.layers.is_empty() {
            anyhow::bail!("the reasoner must be frozen (no LoRA)");
        }
        let weaver = Weaver::new(
            weaver_base,
            reasoner.hidden_size(),
            spec.prompt_latents_len,
            spec.inference_latents_len,
            &spec.weaver_lora,
            spec.seed,
        )?;
        let trigger = match trigger_base {
            Some(t) => Some(Trigger::new(
                t,
                &spec.trigger_lora,
                spec.seed.wrapping_add(1000),
            )?),
            None => None,
        };
        let boundary = BoundaryDetector::new(tokenizer.clone(), &spec.insertion.delimiters);
        Ok(MemGenModel {
            spec,
            reasoner,
            tokenizer,
            weaver,
            trigger,
            boundary,
        })
    }

    pub fn weaver_vars(&self) -> Vec<Var> {
        self.weaver.vars()
    }
}
