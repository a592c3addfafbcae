//! Checkpoints: `model.safetensors` with only the trainable tensors, under the original PyTorch
//! implementation's key names (so either side reads the other's file), plus `memgen.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};

use super::model::{MemGenModel, MemGenSpec};
use crate::backbone::LoraSet;

const WEAVER_LORA: &str = "weaver.model.base_model.model.model.layers";
const TRIGGER_LORA: &str = "trigger.model.base_model.model.model.layers";
const TRIGGER_HEAD: &str = "trigger.model.base_model.model.lm_head";

fn lora_entries(prefix: &str, set: &LoraSet, out: &mut Vec<(String, Var)>) {
    for (i, t, l) in set.iter() {
        let p = format!("{prefix}.{i}.{}", t.module_path());
        out.push((format!("{p}.lora_A.default.weight"), l.a.clone()));
        out.push((format!("{p}.lora_B.default.weight"), l.b.clone()));
    }
}

/// Which parts of the model a checkpoint covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Weaver,
    Trigger,
}

impl MemGenModel {
    /// Every trainable tensor with its checkpoint key and the part it belongs to.
    pub fn named_vars(&self) -> Vec<(String, Var, Part)> {
        let mut w = vec![
            (
                "weaver.prompt_query_latents".to_string(),
                self.weaver.prompt_query_latents.clone(),
            ),
            (
                "weaver.inference_query_latents".to_string(),
                self.weaver.inference_query_latents.clone(),
            ),
            (
                "reasoner_to_weaver.weight".to_string(),
                self.weaver.reasoner_to_weaver.weight.clone(),
            ),
            (
                "weaver_to_reasoner.weight".to_string(),
                self.weaver.weaver_to_reasoner.weight.clone(),
            ),
        ];
        if let Some(b) = &self.weaver.reasoner_to_weaver.bias {
            w.push(("reasoner_to_weaver.bias".into(), b.clone()));
        }
        if let Some(b) = &self.weaver.weaver_to_reasoner.bias {
            w.push(("weaver_to_reasoner.bias".into(), b.clone()));
        }
        lora_entries(WEAVER_LORA, &self.weaver.backbone.lora, &mut w);
        let mut all: Vec<(String, Var, Part)> =
            w.into_iter().map(|(k, v)| (k, v, Part::Weaver)).collect();
        if let Some(t) = &self.trigger {
            let mut tv = vec![(format!("{TRIGGER_HEAD}.weight"), t.head.weight.clone())];
            if let Some(b) = &t.head.bias {
                tv.push((format!("{TRIGGER_HEAD}.bias"), b.clone()));
            }
            lora_entries(TRIGGER_LORA, &t.backbone.lora, &mut tv);
            all.extend(tv.into_iter().map(|(k, v)| (k, v, Part::Trigger)));
        }
        all
    }

    /// Write `dir/model.safetensors` (trainable tensors, f32) and `dir/memgen.json`, each atomically.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        let map: HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(k, v, _)| Ok((k, v.as_tensor().to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<_>>()?;
        let tmp = tempfile::Builder::new()
            .prefix(".model.safetensors.")
            .tempfile_in(dir)?;
        candle_core::safetensors::save(&map, tmp.path())?;
        crate::util::persist(tmp, &dir.join("model.safetensors"))?;
        crate::util::write_atomic(
            &dir.join("memgen.json"),
            serde_json::to_string_pretty(&self.spec)?.as_bytes(),
        )?;
        Ok(())
    }

    /// Load trainable tensors from a `model.safetensors` written by memgen or by the original
    /// (a full state dict: frozen keys are ignored). Returns the keys of `parts` it did not find.
    pub fn load_weights(&self, file: &Path, parts: &[Part]) -> anyhow::Result<Vec<String>> {
        let shown = file.display().to_string();
        if !file.is_file() {
            anyhow::bail!("{shown}: no such file");
        }
        // SAFETY: read-only mapping of a checkpoint memgen does not write while it is mapped.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }
            .map_err(|e| anyhow::anyhow!("{shown}: not a readable safetensors file: {e}"))?;
        let mut missing = vec![];
        for (key, var, part) in self.named_vars() {
            if !parts.contains(&part) {
                continue;
            }
            let t = match st.get(&key) {
                Ok(_) => st
                    .load(&key, var.device())
                    .map_err(|e| anyhow::anyhow!("{shown}: tensor `{key}`: {e}"))?,
                Err(_) => {
                    missing.push(key);
                    continue;
                }
            };
            if t.dims() != var.dims() {
                anyhow::bail!(
                    "{shown}: tensor `{key}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(missing)
    }
}

/// Resolve `--load-model-path`: a `model.safetensors` file or a directory holding one.
/// Returns (weights file, spec beside it if any).
pub fn resolve_checkpoint(path: &Path) -> anyhow::Result<(PathBuf, Option<MemGenSpec>)> {
    let file = if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    };
    if !file.is_file() {
        anyhow::bail!("{}: no such checkpoint file", file.display());
    }
    let spec_path = file.with_file_name("memgen.json");
    let spec = if spec_path.is_file() {
        Some(MemGenSpec::read(&spec_path)?)
    } else {
        None
    };
    Ok((file, spec))
}
