//! The memory trigger: a LoRA-adapted backbone whose LM head is replaced by Linear(d → 2); class 1
//! means "insert a memory here". Without a trigger model the nano trigger always answers 1.

use candle_core::{DType, Tensor};

use super::params::{Init, Linear};
use crate::backbone::{Backbone, KvCache, LoraConfig, LoraSet, Mode, Stream};

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

    /// Start the head at one policy everywhere: weights zero, bias giving probability `p_insert`
    /// to class 1. GRPO learns only from decisions that vary within a group; a randomly
    /// initialised head on hidden states of norm ~10s is nearly deterministic (measured on
    /// SmolLM2: the sampled policy inserted at every boundary, so the insertion penalty never
    /// separated rollouts). At 0.5 (the default) both actions are equally likely and the head
    /// is all zeros.
    pub fn init_head(&self, p_insert: f64) -> candle_core::Result<()> {
        let w = &self.head.weight;
        w.set(&w.as_tensor().zeros_like()?)?;
        if let Some(b) = &self.head.bias {
            let logit = (p_insert / (1.0 - p_insert)).ln() as f32;
            let dt = b.as_tensor().dtype();
            b.set(&Tensor::new(&[0f32, logit], b.as_tensor().device())?.to_dtype(dt)?)?;
        }
        Ok(())
    }

    /// Decision logits (B × L × 2, f32) for a new stream of token embeddings (built on the
    /// trigger's own backbone, e.g. by [`Stream::from_ids`]) appended to the trigger's cache.
    /// The trigger reads tokens only, never latents.
    pub fn logits(
        &self,
        tokens: &Stream,
        cache: Option<&mut KvCache>,
        mode: &mut Mode,
    ) -> anyhow::Result<Tensor> {
        let h = self.backbone.forward(tokens, cache, mode)?;
        Ok(self.head.forward(&h)?.to_dtype(DType::F32)?)
    }
}
