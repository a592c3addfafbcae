//! The memory weaver: a LoRA-adapted backbone plus learned query latents, reading the reasoner's
//! input stream through a projection and emitting K latent embeddings in the reasoner's space
//! (docs/DESIGN.md, "Weaving a memory").

use candle_core::{Device, Tensor, Var};

use super::params::{Init, Linear};
use super::Kind;
use crate::backbone::{Backbone, KvCache, LoraConfig, LoraSet, Mode, Side, Stream};

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

    /// Weave one memory per row. `ctx` is the part of the reasoner's stream (d_r wide) the cache
    /// has not seen yet (it stays in the cache); `kinds[b]` picks row b's query latents (None: the
    /// row's result is not wanted, its queries are masked, and masked rows cost no compute in the
    /// inference path). Query latents sit at positions `query_start[b]..+K`.
    /// Returns (B × K_max × d_r); a row with K < K_max has its latents in the last K slots.
    pub fn weave(
        &self,
        cache: &mut KvCache,
        ctx: Option<&Stream>,
        kinds: &[Option<Kind>],
        query_start: &[u32],
        mode: &mut Mode,
    ) -> anyhow::Result<Tensor> {
        let dtype = self.backbone.dtype();
        let ctx = match ctx.filter(|c| !c.is_empty()) {
            Some(c) => {
                Some(c.map_embeds(|x| self.reasoner_to_weaver.forward(&x.to_dtype(dtype)?))?)
            }
            None => None,
        };
        let l_ctx = ctx.as_ref().map_or(0, Stream::len);
        let queries = self.query_block(kinds, query_start)?;
        let k_max = queries.len();
        let parts: Vec<Stream> = ctx
            .into_iter()
            .chain((k_max > 0).then_some(queries))
            .collect();
        let d_r = self.weaver_to_reasoner.weight.dims()[0];
        let none = || Tensor::zeros((kinds.len(), 0, d_r), dtype, self.device());
        if parts.is_empty() {
            return Ok(none()?);
        }
        let before = cache.len();
        let h = self
            .backbone
            .forward(&Stream::cat(&parts)?, Some(cache), mode)?;
        // The queries are not part of the context: later weaves must not see them.
        cache.truncate(before + l_ctx);
        if k_max == 0 {
            return Ok(none()?);
        }
        let states = h.narrow(1, l_ctx, k_max)?;
        Ok(self.weaver_to_reasoner.forward(&states)?)
    }

    /// The query latents of every row (B × K_max × d_w): row r's K queries right-aligned, at
    /// positions `query_start[r]..+K`; the holes in front, and rows that weave nothing, masked.
    fn query_block(&self, kinds: &[Option<Kind>], query_start: &[u32]) -> anyhow::Result<Stream> {
        let pieces: Vec<Vec<Tensor>> = kinds
            .iter()
            .map(|k| {
                k.iter()
                    .map(|&k| self.queries(k).as_tensor().clone())
                    .collect()
            })
            .collect();
        let width = (self.backbone.hidden_size(), self.backbone.dtype());
        Ok(Stream::from_rows(
            &pieces,
            Side::Left,
            query_start,
            width,
            self.device(),
        )?)
    }
}
