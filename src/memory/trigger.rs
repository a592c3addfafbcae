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

    /// Zero the head: both actions equally likely everywhere. GRPO learns only from decisions
    /// that vary within a group; a randomly initialised head on hidden states of norm ~10s is
    /// nearly deterministic (measured on SmolLM2: the sampled policy inserted at every boundary,
    /// so the insertion penalty never separated rollouts). Starting at maximum entropy explores.
    pub fn zero_head(&self) -> candle_core::Result<()> {
        for v in self.head.vars() {
            v.set(&v.as_tensor().zeros_like()?)?;
        }
        Ok(())
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
