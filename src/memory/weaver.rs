//! The memory weaver: a LoRA-adapted backbone plus learned query latents, reading the reasoner's
//! input stream through a projection and emitting K latent embeddings in the reasoner's space
//! (docs/DESIGN.md, "Weaving a memory").

use candle_core::{Device, Tensor, Var};

use super::params::{Init, Linear};
use super::Kind;
use crate::backbone::{Backbone, KvCache, LoraConfig, LoraSet, Mode};

#[derive(Clone)]
pub struct Weaver {
    pub backbone: Backbone,
    /// K_p × d_w
    pub prompt_query_latents: Var,
    /// K_i × d_w
    pub inference_query_latents: Var,
    pub reasoner_to_weaver: Linear,
    pub weaver_to_reasoner: Linear,
}

/// New context for the weaver: reasoner input embeddings (B × L × d_r), their mask and positions.
pub struct Context<'a> {
    pub embeds: &'a Tensor,
    pub mask: &'a [Vec<u8>],
    pub positions: &'a [Vec<u32>],
}

impl Weaver {
    /// A fresh weaver on `base` (its frozen weights shared), sized for a reasoner of width `d_r`.
    pub fn new(
        base: &Backbone,
        d_r: usize,
        k_prompt: usize,
        k_inference: usize,
        lora: &LoraConfig,
        seed: u64,
    ) -> anyhow::Result<Weaver> {
        let dev = base.device().clone();
        let mut backbone = base.clone();
        let n = backbone.config().num_hidden_layers;
        backbone.lora = LoraSet::new(lora, |t| base.proj_dims(t), n, seed, &dev)?;
        let d_w = base.hidden_size();
        let mut init = Init::new(seed.wrapping_add(1));
        Ok(Weaver {
            prompt_query_latents: init.normal(&[k_prompt, d_w], &dev)?,
            inference_query_latents: init.normal(&[k_inference, d_w], &dev)?,
            reasoner_to_weaver: Linear::new(&mut init, d_r, d_w, true, &dev)?,
            weaver_to_reasoner: Linear::new(&mut init, d_w, d_r, true, &dev)?,
            backbone,
        })
    }

    pub fn device(&self) -> &Device {
        self.backbone.device()
    }

    pub fn queries(&self, kind: Kind) -> &Var {
        match kind {
            Kind::Prompt => &self.prompt_query_latents,
            Kind::Inference => &self.inference_query_latents,
        }
    }

    /// Number of latents a memory of this kind has.
    pub fn k(&self, kind: Kind) -> usize {
        self.queries(kind).dims()[0]
    }

    /// Every trainable tensor of the weaver.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = self.backbone.lora.vars();
        v.push(self.prompt_query_latents.clone());
        v.push(self.inference_query_latents.clone());
        v.extend(self.reasoner_to_weaver.vars());
        v.extend(self.weaver_to_reasoner.vars());
        v
    }

    /// Weave one memory per row. `ctx` is the part of the reasoner's stream the cache has not seen
    /// yet (it stays in the cache); `kinds[b]` picks row b's query latents (None: the row's result is
    /// not wanted, its queries are masked, and masked rows cost no compute in the inference
    /// path). Query latents sit at positions `query_start[b]..+K`.
    /// Returns (B × K_max × d_r); a row with K < K_max has its latents in the last K slots.
    pub fn weave(
        &self,
        cache: &mut KvCache,
        ctx: Option<Context>,
        kinds: &[Option<Kind>],
        query_start: &[u32],
        mode: &mut Mode,
    ) -> anyhow::Result<Tensor> {
        let b = kinds.len();
        let dev = self.device().clone();
        let dtype = self.backbone.dtype();
        let k_max = kinds
            .iter()
            .flatten()
            .map(|&k| self.k(k))
            .max()
            .unwrap_or(0);
        let mut parts: Vec<Tensor> = vec![];
        let mut mask: Vec<Vec<u8>> = vec![vec![]; b];
        let mut pos: Vec<Vec<u32>> = vec![vec![]; b];
        let mut l_ctx = 0;
        if let Some(c) = &ctx {
            l_ctx = c.embeds.dim(1)?;
            if l_ctx > 0 {
                parts.push(
                    self.reasoner_to_weaver
                        .forward(&c.embeds.to_dtype(dtype)?)?,
                );
                for r in 0..b {
                    mask[r].extend_from_slice(&c.mask[r]);
                    pos[r].extend_from_slice(&c.positions[r]);
                }
            }
        }
        // Query block: row r's K queries right-aligned in K_max slots (holes in front are masked).
        let d_w = self.backbone.hidden_size();
        let mut q_rows = vec![];
        for (r, kind) in kinds.iter().enumerate().filter(|_| k_max > 0) {
            let (k, q) = match kind {
                Some(kind) => (self.k(*kind), Some(self.queries(*kind).as_tensor())),
                None => (0, None),
            };
            let hole = k_max - k;
            mask[r].extend(std::iter::repeat_n(0u8, hole));
            mask[r].extend(std::iter::repeat_n(1u8, k));
            pos[r].extend(std::iter::repeat_n(0u32, hole));
            pos[r].extend((0..k as u32).map(|i| query_start[r] + i));
            let mut row = vec![];
            if hole > 0 {
                row.push(Tensor::zeros((hole, d_w), dtype, &dev)?);
            }
            if let Some(q) = q {
                row.push(q.to_dtype(dtype)?);
            }
            q_rows.push(if row.len() == 1 {
                row.pop().unwrap()
            } else {
                Tensor::cat(&row, 0)?
            });
        }
        if k_max > 0 {
            parts.push(Tensor::stack(&q_rows, 0)?);
        }
        if parts.is_empty() {
            return Ok(Tensor::zeros(
                (b, 0, self.weaver_to_reasoner.weight.dims()[0]),
                dtype,
                &dev,
            )?);
        }
        let x = if parts.len() == 1 {
            parts.pop().unwrap()
        } else {
            Tensor::cat(&parts, 1)?
        };
        let pos_t = crate::backbone::model::positions_tensor(&pos, &dev)?;
        let before = cache.len();
        let h = self
            .backbone
            .forward(&x, &mask, &pos_t, Some(cache), mode)?;
        // The queries are not part of the context: later weaves must not see them.
        cache.truncate(before + l_ctx);
        if k_max == 0 {
            return Ok(Tensor::zeros(
                (b, 0, self.weaver_to_reasoner.weight.dims()[0]),
                dtype,
                &dev,
            )?);
        }
        let states = h.narrow(1, l_ctx, k_max)?;
        Ok(self.weaver_to_reasoner.forward(&states)?)
    }
}
