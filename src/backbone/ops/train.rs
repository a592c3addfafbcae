//! Ops with a backward pass, for training and gradient checks.
//!
//! Candle's fused ops (`rms_norm`, `softmax_last_dim`, `rope`, `sdpa`, `QMatMul`) silently return no
//! gradient, so each op here computes its value with Candle and attaches it to the graph with a
//! hand-written backward ([`fused`]) — and [`frozen_linear`]'s and the const ops' backward passes
//! deliberately return only the input gradient: the base weights are frozen, and computing their
//! gradient (as Candle's matmul backward would) costs ~3x the time and gigabytes of memory.
//!
//! These run on every device (CPU and CUDA forwards); the f32 CPU forward of [`frozen_linear`]
//! alone uses a memgen kernel ([`kernels::linear_small`]) for a few rows.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, D,
};

use super::kernel_error;
use crate::backbone::kernels;

/// Up to this many input rows, [`frozen_linear`] on f32 CPU tensors uses
/// [`kernels::linear_small`] instead of gemm.
pub(crate) const SMALL_ROWS: usize = 16;

/// The same for inference when the packed copies are off ([`super::Kernels::FusedUnpacked`]). Generation with memory runs many forwards of 16–48 rows (a few new
/// tokens per row plus K latents or queries); there the weight-streaming kernel beats gemm
/// (bench-memory, batch 4: a weaver call ~140 ms → ~100 ms). Training keeps the threshold it was
/// tuned with.
pub(crate) const SMALL_ROWS_INFER: usize = 48;

/// `x @ w^T` for a frozen weight `w` (out × in): x is (n × in), the result (n × out).
struct FrozenMatmul {
    small_rows: usize,
}

impl FrozenMatmul {
    fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize, Layout)> {
        let (n, k) = l1.shape().dims2()?;
        let (out, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen_linear: input has {k} features, weight expects {k2}");
        }
        Ok((n, k, out, l2.transpose(0, 1)?))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k, out, wt) = Self::dims(l1, l2)?;
        // A few rows against a row-major weight (decoding): stream each weight row once and take
        // dot products with every input row; gemm's packing costs more than the work here.
        if let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) {
            if n <= self.small_rows && l1.is_contiguous() && l2.is_contiguous() {
                let x = &x[l1.start_offset()..l1.start_offset() + n * k];
                let w = &w[l2.start_offset()..l2.start_offset() + out * k];
                let y = kernels::linear_small(x, n, k, w, out).map_err(kernel_error)?;
                return Ok((CpuStorage::F32(y), Shape::from((n, out))));
            }
        }
        let s = s1.matmul(s2, (1, n, out, k), l1, &wt)?;
        Ok((s, Shape::from((n, out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, k, out, wt) = Self::dims(l1, l2)?;
        let s = s1.matmul(s2, (1, n, out, k), l1, &wt)?;
        Ok((s, Shape::from((n, out))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d(x w^T)/dx = grad @ w; the frozen weight gets no gradient.
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `x + c` or `x * c` with a constant `c` broadcast to x's shape. Candle's own binary ops compute
/// a gradient for both operands even when one is a constant (a norm weight, a rotary table, an
/// attention mask, a dropout mask), and keep it until the backward pass ends: full-size buffers per
/// layer that cost time and gigabytes. Here the backward pass returns only x's gradient.
struct ConstBinary {
    c: Tensor,
    mul: bool,
}

impl CustomOp1 for ConstBinary {
    fn name(&self) -> &'static str {
        if self.mul {
            "const-mul"
        } else {
            "const-add"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = self.c.broadcast_as(l.shape())?;
        let (cs, cl) = c.storage_and_layout();
        let Storage::Cpu(cs) = &*cs else {
            candle_core::bail!("{}: constant on another device", self.name());
        };
        let out = if self.mul {
            s.binary_impl::<candle_core::op::Mul>(cs, l, cl)?
        } else {
            s.binary_impl::<candle_core::op::Add>(cs, l, cl)?
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let c = self.c.broadcast_as(l.shape())?;
        let (cs, cl) = c.storage_and_layout();
        let Storage::Cuda(cs) = &*cs else {
            candle_core::bail!("{}: constant on another device", self.name());
        };
        let out = if self.mul {
            s.binary_impl::<candle_core::op::Mul>(cs, l, cl)?
        } else {
            s.binary_impl::<candle_core::op::Add>(cs, l, cl)?
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if self.mul {
            Ok(Some(grad.broadcast_mul(&self.c)?))
        } else {
            Ok(Some(grad.clone()))
        }
    }
}

/// `x * c` for a constant `c` (broadcast); only x gets a gradient.
pub(crate) fn const_mul(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.broadcast_mul(c);
    }
    x.apply_op1(ConstBinary {
        c: c.to_dtype(x.dtype())?,
        mul: true,
    })
}

/// `x + c` for a constant `c` (broadcast); only x gets a gradient.
pub(crate) fn const_add(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.broadcast_add(c);
    }
    x.apply_op1(ConstBinary {
        c: c.to_dtype(x.dtype())?,
        mul: false,
    })
}

/// `x @ w^T (+ b)` over the last dimension of `x` (any leading shape), with `w` frozen; up to
/// `small_rows` input rows of f32 on the CPU go through the weight-streaming kernel.
pub(crate) fn frozen_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    small_rows: usize,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().expect("frozen_linear on a scalar");
    let n = x.elem_count() / k.max(1);
    let x2 = x.contiguous()?.reshape((n, k))?;
    let y = x2.apply_op2(w, FrozenMatmul { small_rows })?;
    let y = match b {
        Some(b) => const_add(&y, b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out)
}

/// A value computed by a fused kernel (which has no backward pass) attached to the graph of `x`
/// with a hand-written backward: the forward copies the value once, the graph keeps only the
/// result, and `bwd(x, result, grad)` gives x's gradient.
struct Fused<F> {
    value: std::sync::Mutex<Option<Tensor>>,
    bwd: F,
    name: &'static str,
}

impl<F> Fused<F> {
    fn take(&self) -> Result<Tensor> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused op poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))
    }
}

impl<F> CustomOp1 for Fused<F>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        // A fresh contiguous value starting at offset 0: its storage can be cloned as is. The
        // result has the value's shape (a frozen matmul's differs from its input's).
        let mut v = self.take()?.contiguous()?;
        if v.layout().start_offset() != 0 {
            v = v.copy()?;
        }
        let (st, _) = v.storage_and_layout();
        let Storage::Cpu(cs) = &*st else {
            candle_core::bail!("{}: value on another device", self.name);
        };
        Ok((cs.clone(), v.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let mut v = self.take()?.contiguous()?;
        if v.layout().start_offset() != 0 {
            v = v.copy()?;
        }
        let (st, _) = v.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            candle_core::bail!("{}: value on another device", self.name);
        };
        Ok((cs.try_clone(v.layout())?, v.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.bwd)(x, res, grad)?))
    }
}

pub(crate) fn fused<F>(x: &Tensor, value: Tensor, name: &'static str, bwd: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if !x.track_op() {
        return Ok(value);
    }
    x.apply_op1(Fused {
        value: std::sync::Mutex::new(Some(value)),
        bwd,
        name,
    })
}

/// RMSNorm as Hugging Face computes it (`x * rsqrt(mean(x^2) + eps) * w`), by Candle's fused kernel,
/// with the backward pass written out: dx = r·(g∘w) − x·r³·mean((g∘w)∘x), r = rsqrt(mean(x²)+eps).
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let xc = x.contiguous()?;
    let value = candle_nn::ops::rms_norm(&xc.detach(), w, eps as f32)?;
    let w = w.clone();
    fused(&xc, value, "rms-norm", move |x, _res, g| {
        let dtype = x.dtype();
        let (x, g) = (x.to_dtype(DType::F32)?, g.to_dtype(DType::F32)?);
        let gw = g.broadcast_mul(&w.to_dtype(DType::F32)?)?;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        let m = (&gw * &x)?.mean_keepdim(D::Minus1)?;
        let dx = (gw.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * m)?)?)?;
        dx.to_dtype(dtype)
    })
}

/// Attention weights `softmax(scale · scores + bias)` over the last dimension, by fused kernels,
/// keeping only the raw scores and the weights for the backward pass:
/// d scores = scale · p∘(g − Σ g∘p). `bias` (the additive mask) broadcasts to the scores.
pub(crate) fn masked_softmax(scores: &Tensor, scale: f64, bias: &Tensor) -> Result<Tensor> {
    let sc = scores.contiguous()?;
    let dtype = sc.dtype();
    if dtype != DType::F32 {
        return masked_softmax_half(&sc, scale, bias);
    }
    let z = (sc.detach() * scale)?.broadcast_add(&bias.to_dtype(dtype)?)?;
    let value = candle_nn::ops::softmax_last_dim(&z)?;
    fused(&sc, value, "masked-softmax", move |_x, p, g| {
        let s = (g * p)?.sum_keepdim(D::Minus1)?;
        (p * g.broadcast_sub(&s)?)? * scale
    })
}

/// [`masked_softmax`] for bf16/f16 scores, computed in f32 and returned in the scores' dtype, as
/// transformers' eager attention does. The mask's `f32::MIN` has no finite bf16/f16 value: cast
/// down it becomes −∞, and a row with every key masked (left padding, the holes of rows that
/// insert no memory) would turn into NaN; so the bias is taken in f32, −∞ clamped back to
/// `f32::MIN` in case the caller already cast it down.
fn masked_softmax_half(sc: &Tensor, scale: f64, bias: &Tensor) -> Result<Tensor> {
    let dtype = sc.dtype();
    let bias = bias.to_dtype(DType::F32)?.maximum(f32::MIN)?;
    let z = (sc.detach().to_dtype(DType::F32)? * scale)?.broadcast_add(&bias)?;
    let value = candle_nn::ops::softmax_last_dim(&z)?.to_dtype(dtype)?;
    fused(sc, value, "masked-softmax", move |_x, p, g| {
        let (p, g) = (p.to_dtype(DType::F32)?, g.to_dtype(DType::F32)?);
        let s = (&g * &p)?.sum_keepdim(D::Minus1)?;
        ((p * g.broadcast_sub(&s)?)? * scale)?.to_dtype(dtype)
    })
}

/// `silu(gate) ∘ up`, the gated MLP activation, keeping only gate and up for the backward pass:
/// d gate = g∘up∘σ(gate)∘(1 + gate∘(1 − σ(gate))), d up = g∘silu(gate).
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let value = (gate.detach().silu()? * up.detach())?;
    if !gate.track_op() && !up.track_op() {
        return Ok(value);
    }
    gate.apply_op2(
        up,
        Fused2 {
            value: std::sync::Mutex::new(Some(value)),
        },
    )
}

struct Fused2 {
    value: std::sync::Mutex<Option<Tensor>>,
}

impl Fused2 {
    fn take(&self) -> Result<Tensor> {
        let mut v = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused op poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("silu-mul: forward ran twice".into()))?
            .contiguous()?;
        if v.layout().start_offset() != 0 {
            v = v.copy()?;
        }
        Ok(v)
    }
}

impl CustomOp2 for Fused2 {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let v = self.take()?;
        let (st, _) = v.storage_and_layout();
        let Storage::Cpu(cs) = &*st else {
            candle_core::bail!("silu-mul: value on another device");
        };
        Ok((cs.clone(), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let v = self.take()?;
        let (st, _) = v.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            candle_core::bail!("silu-mul: value on another device");
        };
        Ok((cs.try_clone(v.layout())?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let sig = candle_nn::ops::sigmoid(gate)?;
        let silu = (gate * &sig)?;
        let one_minus = sig.affine(-1.0, 1.0)?;
        let dsilu = (&sig * (gate * one_minus)?.affine(1.0, 1.0)?)?;
        let d_gate = ((g * up)? * dsilu)?;
        let d_up = (g * silu)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// Rotary embedding tables for explicit per-row positions: `positions` is (B × L) u32, `inv_freq`
/// the D/2 inverse frequencies (already rescaled, see `Config::inv_freq`); returns cos, sin of
/// shape (B × L × D/2) in f32, computed like Hugging Face (f32 outer product).
pub(crate) fn rope_tables(positions: &Tensor, inv_freq: &[f32]) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let inv = Tensor::from_slice(inv_freq, (1, 1, half), positions.device())?;
    let pos = positions.to_dtype(DType::F32)?.unsqueeze(2)?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Non-interleaved (Hugging Face `rotate_half`) rotary embedding of x (B × H × L × D) by Candle's
/// fused kernel; its backward is the inverse rotation (the same kernel with −sin).
pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let xc = x.contiguous()?;
    let value = candle_nn::rotary_emb::rope(&xc.detach(), &cos, &sin)?;
    let neg_sin = sin.neg()?;
    fused(&xc, value, "rope", move |_x, _res, g| {
        candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin)
    })
}
