//! The device-generic path: every custom op and fused kernel of the backbone, built from Candle
//! ops (plus [`train::fused`] to give a value a hand-written backward). It runs on any device and
//! dtype, with or without a graph, and computes the same function as the f32 CPU kernels; the
//! tests force it on the CPU (`Kernels::Generic`) and compare, so the math CUDA runs is tested.

use candle_core::{Device, Result, Tensor, D};
use rand::Rng;

use super::train::{self, fused};
use super::{AttnSpec, LoraUpdate};

/// `x @ w^T (+ b)` over the last dimension of `x` with `w` frozen: the backward pass returns only
/// x's gradient (`grad @ w`), as [`train::frozen_linear`]'s does.
pub(crate) fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let n = x.elem_count() / k.max(1);
    let x2 = x.contiguous()?.reshape((n, k))?;
    let value = x2.detach().matmul(&w.t()?)?;
    let w2 = w.clone();
    let y = fused(&x2, value, "frozen-matmul", move |_x, _res, g| {
        g.matmul(&w2)
    })?;
    let y = match b {
        Some(b) => const_add(&y, b)?,
        None => y,
    };
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = w.dim(0)?;
    }
    y.reshape(out)
}

/// `x + c` for a constant `c` (broadcast); only x gets a gradient.
pub(crate) fn const_add(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let c = c.to_dtype(x.dtype())?;
    fused(
        x,
        x.detach().broadcast_add(&c)?,
        "const-add",
        |_x, _res, g| Ok(g.clone()),
    )
}

/// `x * c` for a constant `c` (broadcast); only x gets a gradient.
pub(crate) fn const_mul(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let c = c.to_dtype(x.dtype())?;
    let value = x.detach().broadcast_mul(&c)?;
    fused(x, value, "const-mul", move |_x, _res, g| {
        g.broadcast_mul(&c)
    })
}

/// One projection's output `x` (B × L × n·hd) as heads (B × n × L × hd), split once: Qwen3's
/// per-head RMSNorm (`norm`: weight, eps) and the rotary embedding (`rope`: cos, sin of
/// B × L × hd/2) are applied to the heads. Slicing stacked `[q | k | v]` rows instead costs a
/// full-width gradient per slice in the backward pass (docs/EXPERIMENTS.md).
pub(crate) fn heads(
    x: &Tensor,
    n: usize,
    hd: usize,
    norm: Option<(&Tensor, f64)>,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let (b, l, _) = x.dims3()?;
    let x = x.reshape((b, l, n, hd))?;
    let x = match norm {
        Some((w, eps)) => train::rms_norm(&x, w, eps)?,
        None => x,
    };
    let x = x.transpose(1, 2)?;
    match rope {
        Some((cos, sin)) => train::apply_rope(&x, cos, sin),
        None => x.contiguous(),
    }
}

/// Additive attention bias (B × 1 × 1 × L × T) for L new queries after `past` cached positions:
/// causal by sequence index, and masked wherever the key is padding.
pub(crate) fn attention_bias(
    full_mask: &[Vec<u8>],
    past: usize,
    l: usize,
    device: &Device,
) -> Result<Tensor> {
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

/// Causal grouped-query attention of the query heads `q` (B × heads × L × hd) over keys and
/// values (B × KV × T × hd), through the additive `bias`: (B × L × heads · hd).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    a: &AttnSpec,
    bias: &Tensor,
) -> Result<Tensor> {
    let (b, _, l, _) = q.dims4()?;
    let (nh, nkv, hd) = (a.heads, a.kv_heads, a.head_dim);
    let rep = nh / nkv;
    let t = k.dim(2)?;
    // Grouped-query attention without copying k/v: the `rep` query heads that share a kv head
    // are stacked along the row axis (head h uses kv head h / rep, as HF's repeat_kv does).
    let q = q.contiguous()?.reshape((b, nkv, rep * l, hd))?;
    let scores = q.matmul(&k.t()?)?.reshape((b, nkv, rep, l, t))?;
    let probs = train::masked_softmax(&scores, 1.0 / (hd as f64).sqrt(), bias)?;
    let attn = probs.reshape((b, nkv, rep * l, t))?.matmul(v)?;
    attn.reshape((b, nh, l, hd))?
        .transpose(1, 2)?
        .reshape((b, l, nh * hd))
}

/// A constant product `x * c` (only x gets a gradient), as dropout applies its mask.
pub(crate) type ConstMul = fn(&Tensor, &Tensor) -> Result<Tensor>;

/// `y` plus each adapter's update `dropout(x) Aᵀ · scale · Bᵀ` in its columns, as graph ops (the
/// adapters' gradients flow). With `rng`, dropout masks are drawn from it, adapter by adapter,
/// and applied by `mul`.
pub(crate) fn lora_add(
    y: &Tensor,
    x: &Tensor,
    updates: &[LoraUpdate],
    mut rng: Option<&mut rand::rngs::StdRng>,
    mul: ConstMul,
) -> Result<Tensor> {
    let m = y.dim(D::Minus1)?;
    let mut pieces = Vec::with_capacity(2 * updates.len() + 1);
    let mut at = 0;
    for u in updates {
        let w = u.b.dim(0)?;
        if u.col < at || u.col + w > m {
            candle_core::bail!(
                "lora-add: adapter at column {} overlaps or overflows {m}",
                u.col
            );
        }
        let delta = lora_delta(x, u, rng.as_deref_mut(), mul)?;
        if u.col == 0 && w == m {
            return y + delta;
        }
        if u.col > at {
            pieces.push(y.narrow(D::Minus1, at, u.col - at)?);
        }
        pieces.push((y.narrow(D::Minus1, u.col, w)? + delta)?);
        at = u.col + w;
    }
    if pieces.is_empty() {
        return Ok(y.clone());
    }
    if at < m {
        pieces.push(y.narrow(D::Minus1, at, m - at)?);
    }
    Tensor::cat(&pieces, D::Minus1)
}

/// One adapter's update, shaped like the projection's output.
fn lora_delta(
    x: &Tensor,
    u: &LoraUpdate,
    rng: Option<&mut rand::rngs::StdRng>,
    mul: ConstMul,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let n = x.elem_count() / k.max(1);
    let mut x2 = x.contiguous()?.reshape((n, k))?;
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = u.b.dim(0)?;
    }
    if let Some(rng) = rng {
        if u.dropout > 0.0 {
            let keep = 1.0 - u.dropout;
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
            x2 = mul(&x2, &m)?;
        }
    }
    let a = u.a.to_dtype(x.dtype())?;
    let bm = u.b.to_dtype(x.dtype())?;
    // Scale the rank-r product, not the full-width one: same result, a smaller saved tensor.
    let delta = (x2.matmul(&a.t()?)? * u.scale)?.matmul(&bm.t()?)?;
    delta.reshape(out)
}
