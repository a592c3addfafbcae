//! Options that turn the plain backbone commands into MemGen ones, and building the model from them.

use std::path::PathBuf;

use clap::Args;

use super::ModelArgs;
use crate::backbone;
use crate::memory::checkpoint::{resolve_checkpoint, Part};
use crate::memory::{MemGenModel, MemGenSpec};

#[derive(Args, Debug, Clone, Default)]
pub struct MemoryArgs {
    /// A trained checkpoint: `model.safetensors` (memgen's or the original's) or its directory.
    #[arg(long)]
    pub load_model_path: Option<PathBuf>,
    /// A trigger backbone (sharing the reasoner's tokenizer); without it the nano trigger always inserts.
    #[arg(long)]
    pub trigger_model: Option<String>,
    /// Prompt memories per sequence (0 or 1 for single-turn prompts).
    #[arg(long)]
    pub max_prompt_aug_num: Option<usize>,
    /// Cap on inference memories per sequence.
    #[arg(long)]
    pub max_inference_aug_num: Option<usize>,
    /// Latents per prompt memory (K_p).
    #[arg(long)]
    pub prompt_latents_len: Option<usize>,
    /// Latents per inference memory (K_i).
    #[arg(long)]
    pub inference_latents_len: Option<usize>,
    /// Run the plain reasoner, ignoring any checkpoint.
    #[arg(long)]
    pub no_memory: bool,
}

impl MemoryArgs {
    fn any_memory_flag(&self) -> bool {
        self.trigger_model.is_some()
            || self.max_prompt_aug_num.is_some()
            || self.max_inference_aug_num.is_some()
            || self.prompt_latents_len.is_some()
            || self.inference_latents_len.is_some()
    }

    /// Apply the command-line overrides to a spec.
    pub fn apply(&self, spec: &mut MemGenSpec) {
        if let Some(t) = &self.trigger_model {
            spec.trigger_model = Some(t.clone());
        }
        if let Some(v) = self.max_prompt_aug_num {
            spec.insertion.max_prompt_aug_num = v;
        }
        if let Some(v) = self.max_inference_aug_num {
            spec.insertion.max_inference_aug_num = v;
        }
        if let Some(v) = self.prompt_latents_len {
            spec.prompt_latents_len = v;
        }
        if let Some(v) = self.inference_latents_len {
            spec.inference_latents_len = v;
        }
    }
}

/// The MemGen model these options describe, or None for the plain reasoner: memory is on with a
/// checkpoint or any memory option, and off with `--no-memory`.
pub fn build_memgen(model: &ModelArgs, mem: &MemoryArgs) -> anyhow::Result<Option<MemGenModel>> {
    if mem.no_memory || (mem.load_model_path.is_none() && !mem.any_memory_flag()) {
        return Ok(None);
    }
    let device = backbone::parse_device(&model.device)?;
    let ckpt = mem
        .load_model_path
        .as_deref()
        .map(resolve_checkpoint)
        .transpose()?;
    let mut spec = ckpt
        .as_ref()
        .and_then(|(_, s)| s.clone())
        .unwrap_or_else(|| MemGenSpec::new(model.model.as_deref().unwrap_or("default")));
    if let Some(m) = &model.model {
        spec.reasoner_model = m.clone();
    }
    spec.dtype = model.dtype.clone();
    mem.apply(&mut spec);
    let m = MemGenModel::build(&spec, &device)?;
    match &ckpt {
        Some((file, _)) => {
            let mut parts = vec![Part::Weaver];
            if m.trigger.is_some() {
                parts.push(Part::Trigger);
            }
            let missing = m.load_weights(file, &parts)?;
            let weaver_keys = m
                .named_vars()
                .iter()
                .filter(|(_, _, p)| *p == Part::Weaver)
                .count();
            let weaver_missing = missing
                .iter()
                .filter(|k| !k.starts_with("trigger."))
                .count();
            if weaver_missing == weaver_keys {
                anyhow::bail!(
                    "{}: holds no weaver tensors (expected keys such as `weaver.prompt_query_latents`)",
                    file.display()
                );
            }
            if !missing.is_empty() {
                eprintln!(
                    "warning: {} trainable tensors not in {} (left at their initial values), e.g. {}",
                    missing.len(),
                    file.display(),
                    missing[0]
                );
            }
        }
        None => eprintln!(
            "warning: no --load-model-path: the weaver is untrained (seeded random initialisation)"
        ),
    }
    Ok(Some(m))
}
