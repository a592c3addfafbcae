//! Inference-only fused ops: f32 tensors on the CPU, no backward pass (`Mode::Infer`). Each is a
//! thin Candle custom op over a kernel in `backbone::kernels`, replacing a chain of small Candle
//! ops with one pass over the data and the same arithmetic. [`super::generic`] has the Candle-op
//! twin of each, which every other device and dtype runs and the tests compare against.

use std::sync::OnceLock;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor, D,
};

use super::kernel_error;
use crate::backbone::kernels::{self, PackedWeight};

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(&v[l.start_offset()..]),
        _ => candle_core::bail!("{what}: expected f32"),
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    if !l.is_contiguous() {
        candle_core::bail!("{what}: expected a contiguous tensor");
    }
    Ok(&f32_slice(s, l, what)?[..l.shape().elem_count()])
}

/// `a + b` for same-shape tensors, or `b` 1-D and broadcast over the rows of `a` (a bias).
struct AddF32;

impl CustomOp2 for AddF32 {
    fn name(&self) -> &'static str {
        "add-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(s1, l1, "add")?;
        let b = contiguous_f32(s2, l2, "add")?;
        let y = kernels::add(a, b).map_err(kernel_error)?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// `a + b` (`b` the same shape as `a` or a bias over its last dimension).
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == b.dtype() {
        let bias = b.rank() == 1 && a.dim(D::Minus1)? == b.dim(0)?;
        if a.dims() == b.dims() || bias {
            return a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &AddF32);
        }
    }
    a.broadcast_add(b)
}

/// `silu(g) * u` where the input rows are `[g | u]` (the fused gate/up projection).
struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "silu_mul")?;
        let mut dims = l.dims().to_vec();
        let w2 = *dims.last().unwrap_or(&0);
        let y = kernels::silu_mul(x, w2).map_err(kernel_error)?;
        if let Some(last) = dims.last_mut() {
            *last = w2 / 2;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

/// `silu(x[.., :I]) * x[.., I:]` for the fused gate/up output.
pub(crate) fn silu_mul_rows(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul)
}

/// Qwen3's per-head RMSNorm of the q heads (weight `qn`) and k heads (`kn`) of rows
/// `[q heads | k heads | v heads]` (B × L × W); the v heads pass through.
#[allow(clippy::too_many_arguments)]
pub(crate) fn qk_norm_rows(
    qkv: &Tensor,
    qn: &Tensor,
    kn: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
) -> Result<Tensor> {
    let (b, l, _) = qkv.dims3()?;
    let norm = |start: usize, n: usize, w: &Tensor| -> Result<Tensor> {
        let x = qkv
            .narrow(2, start * head_dim, n * head_dim)?
            .contiguous()?
            .reshape((b, l, n, head_dim))?;
        super::train::rms_norm(&x, w, eps)?.reshape((b, l, n * head_dim))
    };
    let q = norm(0, heads, qn)?;
    let k = norm(heads, kv_heads, kn)?;
    let v = qkv.narrow(2, (heads + kv_heads) * head_dim, kv_heads * head_dim)?;
    Tensor::cat(&[&q, &k, &v], 2)
}

/// Rotary embedding on the first `heads` heads of rows `x` (B × L × W, W ≥ heads · hd), with
/// `cos`/`sin` of shape (B × L × hd/2); the rest of each row is copied as is.
struct RopeRows {
    heads: usize,
    head_dim: usize,
}

impl CustomOp3 for RopeRows {
    fn name(&self) -> &'static str {
        "rope-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "rope")?;
        let cos = contiguous_f32(s2, l2, "rope cos")?;
        let sin = contiguous_f32(s3, l3, "rope sin")?;
        let (_, _, w) = l1.shape().dims3()?;
        let y =
            kernels::rope_rows(x, w, cos, sin, self.heads, self.head_dim).map_err(kernel_error)?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// Rotary embedding (as `train::apply_rope`) of the first `heads` heads of each row of `x`
/// (B × L × W); `cos`/`sin` are (B × L × hd/2).
pub(crate) fn rope_rows(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &cos.contiguous()?,
        &sin.contiguous()?,
        &RopeRows { heads, head_dim },
    )
}

/// Heads `start..start + n` of rows (B × L × W) as a contiguous (B × n × L × hd) tensor.
struct TakeHeads {
    start: usize,
    n: usize,
    head_dim: usize,
}

impl CustomOp1 for TakeHeads {
    fn name(&self) -> &'static str {
        "take-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "take_heads")?;
        let (b, len, w) = l.shape().dims3()?;
        let y = kernels::take_heads(x, (b, len, w), self.start, self.n, self.head_dim)
            .map_err(kernel_error)?;
        Ok((
            CpuStorage::F32(y),
            Shape::from((b, self.n, len, self.head_dim)),
        ))
    }
}

pub(crate) fn take_heads(x: &Tensor, start: usize, n: usize, head_dim: usize) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&TakeHeads { start, n, head_dim })
}

/// Causal grouped-query attention (see [`kernels::attention`]). Queries are the first `heads`
/// heads of the rows `qrows` (B × L × W); keys and values are (B × KV × T × hd) views (any
/// strides but the last). Output: (B × L × heads · hd).
struct Attention<'a> {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    past: usize,
    mask: &'a [Vec<u8>],
}

impl CustomOp3 for Attention<'_> {
    fn name(&self) -> &'static str {
        "attention-infer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(s1, l1, "attention q")?;
        let (b, l, w) = l1.shape().dims3()?;
        let k = f32_slice(s2, l2, "attention k")?;
        let v = f32_slice(s3, l3, "attention v")?;
        let (kb, kvh, t, hd) = l2.shape().dims4()?;
        if l3.dims() != l2.dims()
            || kb != b
            || kvh != self.kv_heads
            || hd != self.head_dim
            || l2.stride()[3] != 1
            || l3.stride()[3] != 1
            || !self.heads.is_multiple_of(kvh)
        {
            candle_core::bail!("attention: inconsistent shapes");
        }
        let dims = kernels::AttnDims {
            b,
            l,
            t,
            w,
            heads: self.heads,
            rep: self.heads / kvh,
            hd,
            past: self.past,
            ks: [l2.stride()[0], l2.stride()[1], l2.stride()[2]],
            vs: [l3.stride()[0], l3.stride()[1], l3.stride()[2]],
        };
        let y = kernels::attention(q, k, v, &dims, self.mask).map_err(kernel_error)?;
        Ok((CpuStorage::F32(y), Shape::from((b, l, self.heads * hd))))
    }
}

/// [`Attention`] over rows `qkv` (queries first) and the keys and values so far.
pub(crate) fn attention(
    qkv: &Tensor,
    k: &Tensor,
    v: &Tensor,
    a: &super::AttnSpec,
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op3_no_bwd(
        k,
        v,
        &Attention {
            heads: a.heads,
            kv_heads: a.kv_heads,
            head_dim: a.head_dim,
            past: a.past,
            mask: a.mask,
        },
    )
}

/// `y` (n × m) plus each adapter's update computed from `x` (n × in), in one pass per row and one
/// allocation (see [`kernels::lora_add`]).
pub(crate) fn lora_add(y: &Tensor, x: &Tensor, updates: &[super::LoraUpdate]) -> Result<Tensor> {
    let m = y.dim(D::Minus1)?;
    let k = x.dim(D::Minus1)?;
    let n = y.elem_count() / m.max(1);
    if x.elem_count() != n * k {
        candle_core::bail!("lora-add: {:?} rows do not match {:?}", x.dims(), y.dims());
    }
    for u in updates {
        let (r, ka) = u.a.dims2()?;
        let (w, rb) = u.b.dims2()?;
        if ka != k || rb != r || u.col + w > m {
            candle_core::bail!(
                "lora-add: A {:?} and B {:?} at column {} do not fit x {:?} and y {:?}",
                u.a.dims(),
                u.b.dims(),
                u.col,
                x.dims(),
                y.dims()
            );
        }
    }
    let shape = y.shape().clone();
    let y2 = y.contiguous()?.reshape((n, m))?;
    let x2 = x.contiguous()?.reshape((n, k))?;
    let ab: Vec<(Tensor, Tensor)> = updates
        .iter()
        .map(|u| Ok((u.a.contiguous()?, u.b.contiguous()?)))
        .collect::<Result<_>>()?;
    let op = LoraAdd {
        ab: &ab,
        scale: updates.iter().map(|u| u.scale as f32).collect(),
        col: updates.iter().map(|u| u.col).collect(),
    };
    y2.apply_op2_no_bwd(&x2, &op)?.reshape(shape)
}

struct LoraAdd<'a> {
    ab: &'a [(Tensor, Tensor)],
    scale: Vec<f32>,
    col: Vec<usize>,
}

impl CustomOp2 for LoraAdd<'_> {
    fn name(&self) -> &'static str {
        "lora-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, "lora-add y")?;
        let x = contiguous_f32(s2, l2, "lora-add x")?;
        let (n, m) = l1.shape().dims2()?;
        let k = l2.shape().dims2()?.1;
        // The adapters' weights, read in place.
        let guards: Vec<_> = self
            .ab
            .iter()
            .map(|(a, b)| (a.storage_and_layout(), b.storage_and_layout()))
            .collect();
        let mut adapters = vec![];
        for (u, (ga, gb)) in guards.iter().enumerate() {
            let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*ga.0, &*gb.0) else {
                candle_core::bail!("lora-add: adapters must be on the CPU");
            };
            let (a, b) = &self.ab[u];
            adapters.push(kernels::LoraSlices {
                a: contiguous_f32(sa, ga.1, "lora-add A")?,
                b: contiguous_f32(sb, gb.1, "lora-add B")?,
                r: a.dim(0)?,
                w: b.dim(0)?,
                scale: self.scale[u],
                col: self.col[u],
            });
        }
        let out = kernels::lora_add(y, m, x, k, &adapters).map_err(kernel_error)?;
        Ok((CpuStorage::F32(out), Shape::from((n, m))))
    }
}

/// `x · wᵀ` by the panel-packed copy of `w` in `cell` (made on first use), at any number of rows:
/// in panels the weights stream at memory speed for one row and stay there up to ~8 (the
/// row-major kernel halves its speed by 4 rows), and the same kernel runs many-row chunks near
/// the cores' peak. `w` must be f32 on the CPU.
pub(crate) fn packed_linear(
    x: &Tensor,
    w: &Tensor,
    cell: &OnceLock<PackedWeight>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let n = x.elem_count() / k.max(1);
    let (m, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("frozen_linear: input has {k} features, weight expects {k2}");
    }
    let packed = match cell.get() {
        Some(p) => p,
        None => {
            let v = w.flatten_all()?.to_vec1::<f32>()?;
            // Two threads racing here both pack; one result is kept. Same values either way.
            let _ = cell.set(PackedWeight::pack(&v, m, k));
            cell.get().expect("just set")
        }
    };
    let y = x
        .contiguous()?
        .reshape((n, k))?
        .apply_op1_no_bwd(&PackedMatmul(packed))?;
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = m;
    }
    y.reshape(out)
}

struct PackedMatmul<'a>(&'a PackedWeight);

impl CustomOp1 for PackedMatmul<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "packed-matmul")?;
        let (n, _) = l.shape().dims2()?;
        let y = self.0.matmul(x, n).map_err(kernel_error)?;
        Ok((CpuStorage::F32(y), Shape::from((n, self.0.out_features()))))
    }
}

/// Where the real (unmasked) rows of a B × L input sit, for running the row-wise parts of a block
/// on those rows alone (projections, norms, MLP); attention spreads them out again.
pub(crate) struct Packing {
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
    pub(crate) fn new(mask: &[Vec<u8>], device: &Device) -> Result<Option<Packing>> {
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
    pub(crate) fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let w = x.dim(2)?;
        x.reshape((self.b * self.l, w))?
            .index_select(&self.real, 0)?
            .reshape((1, self.n, w))
    }

    /// (1 × N × w) → (B × L × w), zeros in the masked slots.
    pub(crate) fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let w = x.dim(2)?;
        let zero = Tensor::zeros((1, w), x.dtype(), x.device())?;
        Tensor::cat(&[&x.reshape((self.n, w))?, &zero], 0)?
            .index_select(&self.spread, 0)?
            .reshape((self.b, self.l, w))
    }
}
