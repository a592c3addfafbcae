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

/// Heads `start..start + n` of rows (B × L × W) as a contiguous (B × n × L × hd) tensor.
pub(crate) fn take_heads(x: &Tensor, start: usize, n: usize, hd: usize) -> Result<Tensor> {
    let (b, l, _) = x.dims3()?;
    x.narrow(2, start * hd, n * hd)?
        .reshape((b, l, n, hd))?
        .transpose(1, 2)?
        .contiguous()
}

/// Rotary embedding of the first `heads` heads of each row of `x` (B × L × W), `cos`/`sin`
/// (B × L × hd/2); the rest of each row passes through.
pub(crate) fn rope_rows(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    hd: usize,
) -> Result<Tensor> {
    let (b, l, w) = x.dims3()?;
    let r = train::apply_rope(&take_heads(x, 0, heads, hd)?, cos, sin)?
        .transpose(1, 2)?
        .reshape((b, l, heads * hd))?;
    if heads * hd == w {
        return Ok(r);
    }
    Tensor::cat(&[&r, &x.narrow(2, heads * hd, w - heads * hd)?], 2)
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
        train::rms_norm(&x, w, eps)?.reshape((b, l, n * head_dim))
    };
    let q = norm(0, heads, qn)?;
    let k = norm(heads, kv_heads, kn)?;
    let v = qkv.narrow(2, (heads + kv_heads) * head_dim, kv_heads * head_dim)?;
    Tensor::cat(&[&q, &k, &v], 2)
}

/// `silu(x[.., :I]) * x[.., I:]` for the fused gate/up output, with a backward pass.
pub(crate) fn silu_mul_rows(gate_up: &Tensor) -> Result<Tensor> {
    let w = gate_up.dim(D::Minus1)? / 2;
    train::silu_mul(
        &gate_up.narrow(D::Minus1, 0, w)?,
        &gate_up.narrow(D::Minus1, w, w)?,
    )
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

/// Causal grouped-query attention of the q heads of rows `qkv` (B × L × W) over keys and values
/// (B × KV × T × hd), through the additive `bias`: (B × L × heads · hd).
pub(crate) fn attention(
    qkv: &Tensor,
    k: &Tensor,
    v: &Tensor,
    a: &AttnSpec,
    bias: &Tensor,
) -> Result<Tensor> {
    let (b, l, _) = qkv.dims3()?;
    let (nh, nkv, hd) = (a.heads, a.kv_heads, a.head_dim);
    let rep = nh / nkv;
    let t = k.dim(2)?;
    // Grouped-query attention without copying k/v: the `rep` query heads that share a kv head
    // are stacked along the row axis (head h uses kv head h / rep, as HF's repeat_kv does).
    let q = take_heads(qkv, 0, nh, hd)?.reshape((b, nkv, rep * l, hd))?;
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
