//! The decoder: LLaMA / Qwen2 / Qwen3 / SmolLM3 blocks (the families differ only in q/k biases,
//! Qwen3's per-head q/k norms, SmolLM3's NoPE layers and the rope frequencies) over input embeddings, with explicit attention mask, position
//! ids, an optional KV cache and optional LoRA adapters. One forward serves inference (fast fused
//! ops) and training (ops with a backward pass); both compute the same function.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use rand::Rng;

use super::lora::{LoraSet, Target};
use super::ops;
use super::stream::Stream;
use super::weights::BaseWeights;
use super::Config;

/// How a forward pass runs.
pub enum Mode<'a> {
    /// No gradients needed: fused kernels, no dropout.
    Infer,
    /// Differentiable ops, no dropout (gradient checks, scoring under a gradient).
    Grad,
    /// Differentiable ops with LoRA dropout drawn from this (seeded) RNG.
    Train(&'a mut rand::rngs::StdRng),
}

impl Mode<'_> {
    fn grad(&self) -> bool {
        !matches!(self, Mode::Infer)
    }
}

/// A decoder backbone: shared frozen weights plus this instance's own LoRA adapters.
#[derive(Clone)]
pub struct Backbone {
    pub weights: Arc<BaseWeights>,
    pub lora: LoraSet,
}

/// Per-layer keys and values of everything seen so far, in preallocated buffers that grow by
/// doubling so decoding appends in place instead of copying the whole cache every token.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Attention mask of the cached positions, one row per sequence (1 = attend, 0 = padding).
    mask: Vec<Vec<u8>>,
    len: usize,
    cap: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, batch: usize) -> KvCache {
        KvCache {
            layers: vec![None; num_layers],
            mask: vec![Vec::new(); batch],
            len: 0,
            cap: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch(&self) -> usize {
        self.mask.len()
    }

    pub fn mask(&self) -> &[Vec<u8>] {
        &self.mask
    }

    /// Forget everything after the first `len` positions (e.g. the weaver's query latents).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            self.len = len;
            for m in &mut self.mask {
                m.truncate(len);
            }
        }
    }

    /// Keep only the given rows (sequences), in that order.
    pub fn select_rows(&mut self, rows: &[usize]) -> candle_core::Result<()> {
        let dev_rows = |t: &Tensor| -> candle_core::Result<Tensor> {
            let idx = Tensor::new(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                t.device(),
            )?;
            t.index_select(&idx, 0)
        };
        for l in self.layers.iter_mut().flatten() {
            *l = (dev_rows(&l.0)?, dev_rows(&l.1)?);
        }
        self.mask = rows.iter().map(|&r| self.mask[r].clone()).collect();
        Ok(())
    }

    /// Make room for `total` positions in every layer (amortised doubling; copies only on growth).
    fn reserve(&mut self, total: usize) -> candle_core::Result<()> {
        if total <= self.cap {
            return Ok(());
        }
        let cap = total.max(64).next_power_of_two().max(self.cap * 2);
        for (ck, cv) in self.layers.iter_mut().flatten() {
            let (b, kv, _, hd) = ck.dims4()?;
            let nk = Tensor::zeros((b, kv, cap, hd), ck.dtype(), ck.device())?;
            let nv = Tensor::zeros((b, kv, cap, hd), cv.dtype(), cv.device())?;
            if self.len > 0 {
                nk.slice_set(&ck.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&cv.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            *ck = nk;
            *cv = nv;
        }
        self.cap = cap;
        Ok(())
    }

    /// Write this step's k/v (B × KV × L × D) for `layer` after the cached ones; returns views of
    /// all keys and values so far. With `grad`, the cache is extended by concatenation, which
    /// keeps the autograd graph (training runs the weaver incrementally through its cache).
    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        grad: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let l = k.dim(2)?;
        let total = self.len + l;
        if grad {
            let (nk, nv) = match &self.layers[layer] {
                Some((ck, cv)) if self.len > 0 => (
                    Tensor::cat(&[&ck.narrow(2, 0, self.len)?, k], 2)?,
                    Tensor::cat(&[&cv.narrow(2, 0, self.len)?, v], 2)?,
                ),
                _ => (k.contiguous()?, v.contiguous()?),
            };
            self.layers[layer] = Some((nk.clone(), nv.clone()));
            // Concatenated buffers are exactly full: the next in-place append must reallocate.
            self.cap = total;
            return Ok((nk, nv));
        }
        let needs_alloc = match &self.layers[layer] {
            None => true,
            Some((ck, _)) => ck.dim(2)? < total,
        };
        if needs_alloc {
            let (b, kv, _, hd) = k.dims4()?;
            let cap = self.cap.max(total);
            let nk = Tensor::zeros((b, kv, cap, hd), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, kv, cap, hd), k.dtype(), k.device())?;
            if let Some((ok, ov)) = &self.layers[layer] {
                if self.len > 0 {
                    nk.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            self.layers[layer] = Some((nk, nv));
        }
        let (ck, cv) = self.layers[layer].as_ref().expect("allocated above");
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((ck.narrow(2, 0, total)?, cv.narrow(2, 0, total)?))
    }
}

/// Where the real (unmasked) rows of a B × L input sit, for running the row-wise parts of a block
/// on those rows alone.
struct Packing {
    b: usize,
    l: usize,
    /// Flat indices (b·L + i) of the real rows, in order.
    real: Tensor,
    /// For each of the B·L slots, its row in `[packed; zero row]` (N for a masked slot).
    spread: Tensor,
    n: usize,
}

impl Packing {
    /// None when every row is real (nothing to gain) or none is.
    fn new(mask: &[Vec<u8>], device: &Device) -> candle_core::Result<Option<Packing>> {
        let (b, l) = (mask.len(), mask.first().map_or(0, |m| m.len()));
        let mut real = Vec::with_capacity(b * l);
        let mut spread = Vec::with_capacity(b * l);
        for (i, &m) in mask.iter().flatten().enumerate() {
            if m != 0 {
                spread.push(real.len() as u32);
                real.push(i as u32);
            } else {
                spread.push(u32::MAX);
            }
        }
        let n = real.len();
        if n == b * l || n == 0 {
            return Ok(None);
        }
        for s in &mut spread {
            if *s == u32::MAX {
                *s = n as u32;
            }
        }
        Ok(Some(Packing {
            b,
            l,
            real: Tensor::from_vec(real, n, device)?,
            spread: Tensor::from_vec(spread, b * l, device)?,
            n,
        }))
    }

    /// (B × L × w) → (1 × N × w): the real rows.
    fn pack(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = x.dim(2)?;
        x.reshape((self.b * self.l, w))?
            .index_select(&self.real, 0)?
            .reshape((1, self.n, w))
    }

    /// (1 × N × w) → (B × L × w), zeros in the masked slots.
    fn unpack(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = x.dim(2)?;
        let zero = Tensor::zeros((1, w), x.dtype(), x.device())?;
        Tensor::cat(&[&x.reshape((self.n, w))?, &zero], 0)?
            .index_select(&self.spread, 0)?
            .reshape((self.b, self.l, w))
    }
}

/// Additive attention bias (B × 1 × 1 × L × T) for L new queries after `past` cached positions:
/// causal by sequence index, and masked wherever the key is padding.
fn attention_bias(
    full_mask: &[Vec<u8>],
    past: usize,
    l: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let b = full_mask.len();
    let t = past + l;
    let neg = f32::MIN;
    let mut v = vec![neg; b * l * t];
    for (bi, row) in full_mask.iter().enumerate() {
        for i in 0..l {
            let base = (bi * l + i) * t;
            for j in 0..=past + i {
                if row[j] != 0 {
                    v[base + j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(v, (b, 1, 1, l, t), device)
}

impl Backbone {
    pub fn new(weights: Arc<BaseWeights>) -> Backbone {
        Backbone {
            weights,
            lora: LoraSet::default(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.weights.config
    }

    pub fn device(&self) -> &Device {
        &self.weights.device
    }

    pub fn dtype(&self) -> DType {
        self.weights.dtype
    }

    pub fn hidden_size(&self) -> usize {
        self.weights.config.hidden_size
    }

    /// (out, in) of a projection, for sizing adapters.
    pub fn proj_dims(&self, t: Target) -> (usize, usize) {
        let c = self.config();
        let (d, i) = (c.hidden_size, c.intermediate_size);
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        match t {
            Target::Q => (q, d),
            Target::K | Target::V => (kv, d),
            Target::O => (d, q),
            Target::Gate | Target::Up => (i, d),
            Target::Down => (d, i),
        }
    }

    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.config().num_hidden_layers, batch)
    }

    /// Token embeddings (B × L × d) from the frozen table; they carry no gradient.
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        self.weights
            .embed_tokens
            .index_select(&flat, 0)?
            .reshape((b, l, self.hidden_size()))
    }

    /// Logits (… × vocab) from final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        ops::frozen_linear(hidden, &self.weights.lm_head, None)
    }

    /// [`Backbone::logits`] without a backward pass, by the packed LM head on f32 CPU: a quarter
    /// of a SmolLM2 decode step's weights, read at twice the speed at batch 4.
    pub fn logits_infer(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        ops::frozen_linear_packed(hidden, &self.weights.lm_head, &self.weights.lm_head_packed)
    }

    /// Run the decoder over a new [`Stream`]: its embeddings (B × L × d), attention mask for
    /// those positions (1 = real, 0 = padding) and position ids. With a cache, the new positions
    /// attend to everything cached and are appended to it.
    /// Returns the final hidden states after the final norm (B × L × d).
    pub fn forward(
        &self,
        stream: &Stream,
        mut cache: Option<&mut KvCache>,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let (x, mask) = (stream.embeds(), stream.mask());
        let positions = &stream.positions_tensor()?;
        let c = self.config();
        let (b, l, _) = x.dims3()?;
        if mask.len() != b || mask.iter().any(|r| r.len() != l) {
            candle_core::bail!("attention mask must be {b} rows of {l}");
        }
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let full_mask: Vec<Vec<u8>> = match cache.as_ref() {
            Some(cache) => {
                if cache.batch() != b {
                    candle_core::bail!("cache holds {} rows, input has {b}", cache.batch());
                }
                cache
                    .mask
                    .iter()
                    .zip(mask)
                    .map(|(p, n)| p.iter().chain(n.iter()).copied().collect())
                    .collect()
            }
            None => mask.to_vec(),
        };
        let (cos, sin) = ops::rope_tables(positions, &c.inv_freq())?;
        if let Some(cache) = cache.as_deref_mut() {
            if !mode.grad() {
                cache.reserve(past + l)?;
            }
        }
        let mut h = x.clone();
        if !mode.grad() && ops::fused_infer_ok(x.dtype(), x.device()) {
            // Fused f32 CPU kernels: the mask is applied inside the attention kernel, and the
            // rope tables are used as (B × L × hd/2) rows. Masked inputs (padding, finished rows,
            // the latent slots of rows that insert no memory) are packed away: only real rows go
            // through the projections and the MLP; they are spread out again around attention.
            let half = c.head_dim / 2;
            let packing = Packing::new(mask, x.device())?;
            let (cos, sin) = (cos.reshape((b, l, half))?, sin.reshape((b, l, half))?);
            let (cos, sin) = match &packing {
                Some(p) => (p.pack(&cos)?, p.pack(&sin)?),
                None => (cos, sin),
            };
            if let Some(p) = &packing {
                h = p.pack(&h)?;
            }
            for li in 0..c.num_hidden_layers {
                h = self.block_infer(
                    li,
                    &h,
                    &full_mask,
                    past,
                    &cos,
                    &sin,
                    cache.as_deref_mut(),
                    packing.as_ref(),
                )?;
            }
            if let Some(p) = &packing {
                h = p.unpack(&h)?;
            }
        } else {
            let bias = attention_bias(&full_mask, past, l, x.device())?.to_dtype(self.dtype())?;
            for li in 0..c.num_hidden_layers {
                h = self.block(li, &h, &bias, &cos, &sin, cache.as_deref_mut(), mode)?;
            }
        }
        if let Some(cache) = cache {
            cache.len += l;
            cache.mask = full_mask;
        }
        self.norm(&h, &self.weights.norm, mode)
    }

    fn norm(&self, x: &Tensor, w: &Tensor, _mode: &Mode) -> candle_core::Result<Tensor> {
        ops::rms_norm(x, w, self.config().rms_norm_eps)
    }

    /// A frozen projection plus its LoRA adapter, if any.
    fn proj(
        &self,
        li: usize,
        t: Target,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let y = if mode.grad() {
            ops::frozen_linear(x, w, bias)?
        } else {
            ops::frozen_linear_infer(x, w, bias)?
        };
        match self.lora_delta(li, t, x, mode)? {
            Some(d) => y + d,
            None => Ok(y),
        }
    }

    /// The LoRA update `dropout(x) Aᵀ · scale · Bᵀ` of target `t` in layer `li`, shaped like
    /// the projection's output (None where no adapter sits).
    fn lora_delta(
        &self,
        li: usize,
        t: Target,
        x: &Tensor,
        mode: &mut Mode,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(lora) = self.lora.get(li, t) else {
            return Ok(None);
        };
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap();
        let n = x.elem_count() / k;
        let mut x2 = x.contiguous()?.reshape((n, k))?;
        let mut out = dims;
        *out.last_mut().unwrap() = lora.b.dim(0)?;
        if let Mode::Train(rng) = mode {
            if lora.dropout > 0.0 {
                let keep = 1.0 - lora.dropout;
                let m: Vec<f32> = (0..n * k)
                    .map(|_| {
                        if rng.random::<f64>() < keep {
                            (1.0 / keep) as f32
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let m = Tensor::from_vec(m, (n, k), x.device())?.to_dtype(x.dtype())?;
                x2 = ops::const_mul(&x2, &m)?;
            }
        }
        let a = lora.a.as_tensor().to_dtype(x.dtype())?;
        let bm = lora.b.as_tensor().to_dtype(x.dtype())?;
        // Scale the rank-r product, not the full-width one: same result, a smaller saved tensor.
        let delta = (x2.matmul(&a.t()?)? * lora.scale)?.matmul(&bm.t()?)?;
        Ok(Some(delta.reshape(out)?))
    }

    /// One decoder block in `Mode::Infer` on f32 CPU tensors: fused q/k/v and gate/up matmuls,
    /// and fused rope, attention, SwiGLU and residual kernels (see `ops`). Same function as
    /// [`Backbone::block`], with fewer passes over memory and no thread-pool round trips for
    /// small elementwise ops. With `packing`, `x` holds only the real rows (1 × N × d) and so
    /// does the result.
    #[allow(clippy::too_many_arguments)]
    fn block_infer(
        &self,
        li: usize,
        x: &Tensor,
        full_mask: &[Vec<u8>],
        past: usize,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut KvCache>,
        packing: Option<&Packing>,
    ) -> candle_core::Result<Tensor> {
        let c = self.config();
        let w = &self.weights.layers[li];
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let mode = &mut Mode::Infer;

        let h = self.norm(x, &w.input_layernorm, mode)?;
        // The fused product serves LoRA'd projections too: their updates are added to their
        // columns afterwards (one pass over the weights instead of three).
        let qkv = match &w.qkv_proj {
            Some(wqkv) => {
                let y = ops::frozen_linear_packed(&h, wqkv, &w.packed.qkv)?;
                let y = match &w.qkv_bias {
                    Some(b) => ops::add_infer(&y, b)?,
                    None => y,
                };
                let (nq, nk) = (w.q_proj.dim(0)?, w.k_proj.dim(0)?);
                self.add_lora_infer(
                    li,
                    y,
                    &h,
                    &[(Target::Q, 0), (Target::K, nq), (Target::V, nq + nk)],
                )?
            }
            None => {
                let q = self.proj_infer(li, Target::Q, &h, &w.q_proj, w.q_bias.as_ref())?;
                let k = self.proj_infer(li, Target::K, &h, &w.k_proj, w.k_bias.as_ref())?;
                let v = self.proj_infer(li, Target::V, &h, &w.v_proj, w.v_bias.as_ref())?;
                Tensor::cat(&[q, k, v], D::Minus1)?
            }
        };
        // Qwen3 normalises each q and k head before the rotation.
        let qkv = match (&w.q_norm, &w.k_norm) {
            (Some(qn), Some(kn)) => ops::qk_norm_rows(&qkv, qn, kn, nh, nkv, hd, c.rms_norm_eps)?,
            _ => qkv,
        };
        // Rows [q heads | k heads | v heads], with rope applied to the q and k heads (NoPE layers
        // leave them as they are).
        let rows = if c.uses_rope(li) {
            ops::rope_rows_infer(&qkv, cos, sin, nh + nkv, hd)?
        } else {
            qkv
        };
        // Attention works on the full (B × L) layout: the cache keeps every slot.
        let rows = match packing {
            Some(p) => p.unpack(&rows)?,
            None => rows,
        };
        let k = ops::take_heads_infer(&rows, nh, nkv, hd)?;
        let v = ops::take_heads_infer(&rows, nh + nkv, nkv, hd)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(li, &k, &v, false)?,
            None => (k, v),
        };
        let attn = rows.apply_op3_no_bwd(
            &k,
            &v,
            &ops::Attention {
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                past,
                mask: full_mask,
            },
        )?;
        let attn = match packing {
            Some(p) => p.pack(&attn)?,
            None => attn,
        };
        let o = self.proj_packed(li, Target::O, &attn, &w.o_proj, &w.packed.o)?;
        let x = ops::add_infer(x, &o)?;

        let h = self.norm(&x, &w.post_attention_layernorm, mode)?;
        let gate_up = match &w.gate_up_proj {
            Some(wgu) => {
                let y = ops::frozen_linear_packed(&h, wgu, &w.packed.gate_up)?;
                let ng = w.gate_proj.dim(0)?;
                self.add_lora_infer(li, y, &h, &[(Target::Gate, 0), (Target::Up, ng)])?
            }
            None => {
                let gate = self.proj_infer(li, Target::Gate, &h, &w.gate_proj, None)?;
                let up = self.proj_infer(li, Target::Up, &h, &w.up_proj, None)?;
                Tensor::cat(&[gate, up], D::Minus1)?
            }
        };
        let act = ops::silu_mul_infer(&gate_up)?;
        let down = self.proj_packed(li, Target::Down, &act, &w.down_proj, &w.packed.down)?;
        ops::add_infer(&x, &down)
    }

    /// [`Backbone::proj`] for `Mode::Infer` by the packed copy of `w` in `cell` (for many rows).
    fn proj_packed(
        &self,
        li: usize,
        t: Target,
        x: &Tensor,
        w: &Tensor,
        cell: &std::sync::OnceLock<crate::backbone::packed::PackedWeight>,
    ) -> candle_core::Result<Tensor> {
        let y = ops::frozen_linear_packed(x, w, cell)?;
        self.add_lora_infer(li, y, x, &[(t, 0)])
    }

    /// `y` plus the updates of the adapters on `targets` (each at its column in `y`), computed
    /// from the projections' input `x`. Inference only.
    fn add_lora_infer(
        &self,
        li: usize,
        y: Tensor,
        x: &Tensor,
        targets: &[(Target, usize)],
    ) -> candle_core::Result<Tensor> {
        let updates: Vec<ops::LoraUpdate> = targets
            .iter()
            .filter_map(|&(t, col)| {
                self.lora.get(li, t).map(|l| ops::LoraUpdate {
                    a: l.a.as_tensor(),
                    b: l.b.as_tensor(),
                    scale: l.scale as f32,
                    col,
                })
            })
            .collect();
        ops::lora_add_infer(&y, x, &updates)
    }

    /// [`Backbone::proj`] for `Mode::Infer`, adding the bias with the fused kernel.
    fn proj_infer(
        &self,
        li: usize,
        t: Target,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let y = self.proj(li, t, x, w, None, &mut Mode::Infer)?;
        match bias {
            Some(b) => ops::add_infer(&y, b),
            None => Ok(y),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        li: usize,
        x: &Tensor,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut KvCache>,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let c = self.config();
        let w = &self.weights.layers[li];
        let (b, l, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let rep = nh / nkv;

        let h = self.norm(x, &w.input_layernorm, mode)?;
        let q = self.proj(li, Target::Q, &h, &w.q_proj, w.q_bias.as_ref(), mode)?;
        let k = self.proj(li, Target::K, &h, &w.k_proj, w.k_bias.as_ref(), mode)?;
        let v = self.proj(li, Target::V, &h, &w.v_proj, w.v_bias.as_ref(), mode)?;
        let (q, k) = (q.reshape((b, l, nh, hd))?, k.reshape((b, l, nkv, hd))?);
        let (q, k) = match (&w.q_norm, &w.k_norm) {
            (Some(qn), Some(kn)) => (
                ops::rms_norm(&q, qn, c.rms_norm_eps)?,
                ops::rms_norm(&k, kn, c.rms_norm_eps)?,
            ),
            _ => (q, k),
        };
        let q = q.transpose(1, 2)?;
        let k = k.transpose(1, 2)?;
        let v = v.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let (q, k) = if c.uses_rope(li) {
            (
                ops::apply_rope(&q, cos, sin)?,
                ops::apply_rope(&k, cos, sin)?,
            )
        } else {
            (q.contiguous()?, k.contiguous()?)
        };
        let (k, v) = match cache {
            Some(cache) => cache.append(li, &k, &v, mode.grad())?,
            None => (k, v),
        };
        let t = k.dim(2)?;
        // Grouped-query attention without copying k/v: the `rep` query heads that share a kv head
        // are stacked along the row axis (head h uses kv head h / rep, as HF's repeat_kv does).
        let q = q.contiguous()?.reshape((b, nkv, rep * l, hd))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, nkv, rep, l, t))?;
        let probs = ops::masked_softmax(&scores, 1.0 / (hd as f64).sqrt(), bias)?;
        let attn = probs.reshape((b, nkv, rep * l, t))?.matmul(&v)?;
        let attn = attn
            .reshape((b, nh, l, hd))?
            .transpose(1, 2)?
            .reshape((b, l, nh * hd))?;
        let o = self.proj(li, Target::O, &attn, &w.o_proj, None, mode)?;
        let x = (x + o)?;

        let h = self.norm(&x, &w.post_attention_layernorm, mode)?;
        let gate = self.proj(li, Target::Gate, &h, &w.gate_proj, None, mode)?;
        let up = self.proj(li, Target::Up, &h, &w.up_proj, None, mode)?;
        let act = ops::silu_mul(&gate, &up)?;
        let down = self.proj(li, Target::Down, &act, &w.down_proj, None, mode)?;
        x + down
    }
}

/// Softmax over the last dimension of logits, in f32 (for log-probs and sampling).
pub fn log_softmax(logits: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)
}
