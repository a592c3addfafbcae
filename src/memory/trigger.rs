//! The memory trigger: a LoRA-adapted backbone whose LM head is replaced by Linear(d → 2); class 1
//! means "insert a memory here". Without a trigger model the nano trigger always answers 1.

use candle_core::{DType, Tensor, Var};

use super::params::{Init, Linear};
use crate::backbone::{Backbone, KvCache, LoraConfig, LoraSet, Mode};

#[derive(Clone)]
pub struct Trigger {
    pub backbone: Backbone,
    pub head: Linear,
}

impl Trigger {
    pub fn new(base: &Backbone, lora: &LoraConfig, seed: u64) -> anyhow::Result<Trigger> {
        let dev = base.device().clone();
        let mut backbone = base.clone();
        let n = backbone.config().num_hidden_layers;
        backbone.lora = LoraSet::new(lora, |t| base.proj_dims(t), n, seed, &dev)?;
        let mut init = Init::new(seed.wrapping_add(7));
        let head = Linear::new(&mut init, base.hidden_size(), 2, true, &dev)?;
        Ok(Trigger { backbone, head })
    }

    pub fn vars(&self) -> Vec<Var> {
        let mut v = self.backbone.lora.vars();
        v.extend(self.head.vars());
        v
    }

    /// Decision logits (B × L × 2, f32) for new token ids (B × L) appended to the trigger's cache.
    pub fn logits(
        &self,
        ids: &Tensor,
        mask: &[Vec<u8>],
        positions: &Tensor,
        cache: Option<&mut KvCache>,
        mode: &mut Mode,
    ) -> anyhow::Result<Tensor> {
        let x = self.backbone.embed(ids)?;
        let h = self.backbone.forward(&x, mask, positions, cache, mode)?;
        Ok(self.head.forward(&h)?.to_dtype(DType::F32)?)
    }
}
