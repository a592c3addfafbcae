//! The decoder: LLaMA / Qwen2 / Qwen3 / SmolLM3 blocks (the families differ only in q/k biases,
//! Qwen3's per-head q/k norms, SmolLM3's NoPE layers and the rope frequencies) over input
//! embeddings, with explicit attention mask, position ids, an optional KV cache and optional LoRA
//! adapters. One block serves inference and training: which implementation each op runs (fused
//! f32 CPU kernels, ops with a backward pass, or the device-generic Candle ops) is decided by
//! [`Ops`] from the mode, dtype, device and [`Kernels`] setting; all compute the same function.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor, D};

use super::kernels::PackedWeight;
use super::lora::{LoraSet, Target};
use super::ops::{self, AttnSpec, Kernels, LoraUpdate, Ops, Packing, Queries};
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
    /// Which implementation of the custom ops runs on the CPU (fused kernels unless set).
    pub kernels: Kernels,
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

impl Backbone {
    pub fn new(weights: Arc<BaseWeights>) -> Backbone {
        Backbone {
            weights,
            lora: LoraSet::default(),
            kernels: Kernels::current_default(),
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

    /// The ops a pass in `mode` runs (see [`Ops`]).
    fn ops(&self, grad: bool) -> Ops {
        Ops::new(self.kernels, grad, self.dtype(), self.device())
    }

    /// Logits (… × vocab) from final hidden states, with a backward pass to the hidden states.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.ops(true).linear(hidden, &self.weights.lm_head, None)
    }

    /// [`Backbone::logits`] without a backward pass, by the packed LM head on f32 CPU: a quarter
    /// of a SmolLM2 decode step's weights, read at twice the speed at batch 4.
    pub fn logits_infer(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let w = &self.weights;
        self.ops(false)
            .linear(hidden, &w.lm_head, Some(&w.lm_head_packed))
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
        if let Some(cache) = cache.as_deref_mut() {
            if !mode.grad() {
                cache.reserve(past + l)?;
            }
        }
        let ops = self.ops(mode.grad());
        let h = {
            // Masked inputs (padding, finished rows, the latent slots of rows that insert no
            // memory) are packed away on the fast path: only real rows go through the
            // projections and the MLP; attention spreads them out again.
            let packing = ops.packing(mask, x.device())?;
            let pack = |t: Tensor| match &packing {
                Some(p) => p.pack(&t),
                None => Ok(t),
            };
            let (cos, sin) = ops::rope_tables(positions, &c.inv_freq())?;
            let rope = (pack(cos)?, pack(sin)?);
            let mut h = pack(x.clone())?;
            let heads = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
            let pass = Pass {
                ops,
                rope,
                attn: ops.attn_spec(heads, &full_mask, past, l, self.dtype(), x.device())?,
                packing,
            };
            for li in 0..c.num_hidden_layers {
                h = self.block(li, &h, &pass, cache.as_deref_mut(), mode)?;
            }
            pass.unpack(&h)?
        };
        if let Some(cache) = cache {
            cache.len += l;
            cache.mask = full_mask;
        }
        ops.rms_norm(&h, &self.weights.norm, c.rms_norm_eps)
    }

    /// One decoder block: pre-norm attention and pre-norm SwiGLU MLP, each added to the residual
    /// stream. With row packing, `x` holds only the real rows (1 × N × d), and so does the
    /// result.
    fn block(
        &self,
        li: usize,
        x: &Tensor,
        pass: &Pass,
        cache: Option<&mut KvCache>,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let w = &self.weights.layers[li];
        let (ops, eps) = (&pass.ops, self.config().rms_norm_eps);

        let h = ops.rms_norm(x, &w.input_layernorm, eps)?;
        let (q, k, v) = self.attention_inputs(li, &h, pass, mode)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(li, &k, &v, mode.grad())?,
            None => (k, v),
        };
        let attn = pass.pack(&ops.attention(&q, &k, &v, &pass.attn)?)?;
        let o = self.proj(
            li,
            Target::O,
            &attn,
            (&w.o_proj, Some(&w.packed.o)),
            ops,
            mode,
        )?;
        let x = ops.residual(x, &o)?;

        let h = ops.rms_norm(&x, &w.post_attention_layernorm, eps)?;
        let act = if ops.stacked() {
            ops.silu_mul_rows(&self.gate_up(li, &h, ops, mode)?)?
        } else {
            let gate = self.proj(li, Target::Gate, &h, (&w.gate_proj, None), ops, mode)?;
            let up = self.proj(li, Target::Up, &h, (&w.up_proj, None), ops, mode)?;
            ops.silu_mul(&gate, &up)?
        };
        let down = self.proj(
            li,
            Target::Down,
            &act,
            (&w.down_proj, Some(&w.packed.down)),
            ops,
            mode,
        )?;
        ops.residual(&x, &down)
    }

    /// The attention's inputs from the normed input `h`: the queries, and k and v as heads
    /// (B × KV × L × hd) over the full (B × L) layout (the cache keeps every slot). Qwen3
    /// normalises each q and k head before the rotation; NoPE layers (SmolLM3) leave q and k
    /// unrotated.
    fn attention_inputs(
        &self,
        li: usize,
        h: &Tensor,
        pass: &Pass,
        mode: &mut Mode,
    ) -> candle_core::Result<(Queries, Tensor, Tensor)> {
        let c = self.config();
        let w = &self.weights.layers[li];
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (ops, eps) = (&pass.ops, c.rms_norm_eps);
        let (cos, sin) = &pass.rope;
        if ops.stacked() {
            // Rows `[q | k | v]` by one product, normed and rotated in place.
            let qkv = self.qkv(li, h, ops, mode)?;
            let qkv = match (&w.q_norm, &w.k_norm) {
                (Some(qn), Some(kn)) => ops.qk_norm_rows(&qkv, qn, kn, nh, nkv, hd, eps)?,
                _ => qkv,
            };
            let qkv = if c.uses_rope(li) {
                ops.rope_rows(&qkv, cos, sin, nh + nkv, hd)?
            } else {
                qkv
            };
            let qkv = pass.unpack(&qkv)?;
            let k = ops.take_heads(&qkv, nh, nkv, hd)?;
            let v = ops.take_heads(&qkv, nh + nkv, nkv, hd)?;
            return Ok((Queries::Rows(qkv), k, v));
        }
        // One product per projection, each split into heads once.
        let rope = c.uses_rope(li).then_some((cos, sin));
        let q = self.part(li, h, (Target::Q, &w.q_proj, w.q_bias.as_ref()), ops, mode)?;
        let k = self.part(li, h, (Target::K, &w.k_proj, w.k_bias.as_ref()), ops, mode)?;
        let v = self.part(li, h, (Target::V, &w.v_proj, w.v_bias.as_ref()), ops, mode)?;
        let q = ops.heads(&q, nh, hd, w.q_norm.as_ref().map(|n| (n, eps)), rope)?;
        let k = ops.heads(&k, nkv, hd, w.k_norm.as_ref().map(|n| (n, eps)), rope)?;
        let v = ops.heads(&v, nkv, hd, None, None)?;
        Ok((Queries::Heads(q), k, v))
    }

    /// Rows `[q | k | v]` of layer `li` from the normed input `h`.
    fn qkv(
        &self,
        li: usize,
        h: &Tensor,
        ops: &Ops,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let w = &self.weights.layers[li];
        let stack = w.qkv_proj.as_ref();
        let stack = stack.map(|s| (s, w.qkv_bias.as_ref(), &w.packed.qkv));
        let parts = [
            (Target::Q, &w.q_proj, w.q_bias.as_ref()),
            (Target::K, &w.k_proj, w.k_bias.as_ref()),
            (Target::V, &w.v_proj, w.v_bias.as_ref()),
        ];
        self.side_by_side(li, h, stack, &parts, ops, mode)
    }

    /// Rows `[gate | up]` of layer `li` from the normed input `h`.
    fn gate_up(
        &self,
        li: usize,
        h: &Tensor,
        ops: &Ops,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let w = &self.weights.layers[li];
        let stack = w
            .gate_up_proj
            .as_ref()
            .map(|s| (s, None, &w.packed.gate_up));
        let parts = [
            (Target::Gate, &w.gate_proj, None),
            (Target::Up, &w.up_proj, None),
        ];
        self.side_by_side(li, h, stack, &parts, ops, mode)
    }

    /// The projections `parts` (target, weight, bias) of layer `li`, their outputs side by side:
    /// one product by the stacked weight `stack` (weight, bias, packed copy) where the loader
    /// stacked them, with each LoRA update added to its columns; else one product each.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn side_by_side(
        &self,
        li: usize,
        h: &Tensor,
        stack: Option<(&Tensor, Option<&Tensor>, &OnceLock<PackedWeight>)>,
        parts: &[(Target, &Tensor, Option<&Tensor>)],
        ops: &Ops,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let Some((w, bias, packed)) = stack else {
            let mut ys = Vec::with_capacity(parts.len());
            for &part in parts {
                ys.push(self.part(li, h, part, ops, mode)?);
            }
            return Tensor::cat(&ys, D::Minus1);
        };
        let y = self.add_bias(ops.linear(h, w, Some(packed))?, bias, ops)?;
        let mut targets = Vec::with_capacity(parts.len());
        let mut col = 0;
        for &(t, w, _) in parts {
            targets.push((t, col));
            col += w.dim(0)?;
        }
        self.add_lora(li, y, h, &targets, ops, mode)
    }

    /// One projection `(target, weight, bias)` of layer `li` from `h`, plus its LoRA update.
    fn part(
        &self,
        li: usize,
        h: &Tensor,
        (t, w, b): (Target, &Tensor, Option<&Tensor>),
        ops: &Ops,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let y = self.add_bias(ops.linear(h, w, None)?, b, ops)?;
        self.add_lora(li, y, h, &[(t, 0)], ops, mode)
    }

    fn add_bias(&self, y: Tensor, b: Option<&Tensor>, ops: &Ops) -> candle_core::Result<Tensor> {
        match b {
            Some(b) => ops.bias(&y, b),
            None => Ok(y),
        }
    }

    /// A frozen projection `(w, its packed copy)` of target `t` plus its LoRA adapter, if any.
    fn proj(
        &self,
        li: usize,
        t: Target,
        x: &Tensor,
        (w, packed): (&Tensor, Option<&OnceLock<PackedWeight>>),
        ops: &Ops,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let y = ops.linear(x, w, packed)?;
        self.add_lora(li, y, x, &[(t, 0)], ops, mode)
    }

    /// `y` plus the updates `dropout(x) Aᵀ · scale · Bᵀ` of the adapters on `targets` (each at its
    /// column in `y`), computed from the projections' input `x`. Dropout only in `Mode::Train`.
    fn add_lora(
        &self,
        li: usize,
        y: Tensor,
        x: &Tensor,
        targets: &[(Target, usize)],
        ops: &Ops,
        mode: &mut Mode,
    ) -> candle_core::Result<Tensor> {
        let updates: Vec<LoraUpdate> = targets
            .iter()
            .filter_map(|&(t, col)| {
                self.lora.get(li, t).map(|l| LoraUpdate {
                    a: l.a.as_tensor(),
                    b: l.b.as_tensor(),
                    scale: l.scale,
                    dropout: l.dropout,
                    col,
                })
            })
            .collect();
        let rng = match mode {
            Mode::Train(rng) => Some(&mut **rng),
            _ => None,
        };
        ops.lora_add(y, x, &updates, rng)
    }
}

/// What every block of one forward shares: the ops, the rope tables (cos, sin: B × L × hd/2,
/// packed like the rows), the attention spec, and the row packing (fast path only).
struct Pass<'a> {
    ops: Ops,
    rope: (Tensor, Tensor),
    attn: AttnSpec<'a>,
    packing: Option<Packing>,
}

impl Pass<'_> {
    /// (B × L × w) → the rows the row-wise ops run on.
    fn pack(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.packing {
            Some(p) => p.pack(x),
            None => Ok(x.clone()),
        }
    }

    /// The inverse of [`Pass::pack`], zeros in the masked slots.
    fn unpack(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.packing {
            Some(p) => p.unpack(x),
            None => Ok(x.clone()),
        }
    }
}

/// Softmax over the last dimension of logits, in f32 (for log-probs and sampling).
pub fn log_softmax(logits: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)
}
