//! Tensor ops the backbone needs, chosen so that gradients flow where training needs them.
//!
//! Candle's fused ops (`rms_norm`, `softmax_last_dim`, `rope`, `sdpa`, `QMatMul`) silently return no
//! gradient, so everything here is built from ops that have a backward pass — except
//! [`frozen_linear`], whose backward deliberately returns only the input gradient: the base weights
//! are frozen, and computing their gradient (as Candle's matmul backward would) costs ~3x the time
//! and gigabytes of memory.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// `x @ w^T` for a frozen weight `w` (out × in): x is (n × in), the result (n × out).
struct FrozenMatmul;

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

/// `x @ w^T (+ b)` over the last dimension of `x` (any leading shape), with `w` frozen.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().expect("frozen_linear on a scalar");
    let n = x.elem_count() / k.max(1);
    let x2 = x.contiguous()?.reshape((n, k))?;
    let y = x2.apply_op2(w, FrozenMatmul)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out)
}

/// RMSNorm computed in f32 as Hugging Face does (`x * rsqrt(mean(x^2) + eps)` then `* w`), from
/// ops that all have a backward pass.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    // Half types are normalised in f32 (as HF does); f32/f64 stay as they are.
    let xf = match dtype {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)
}

/// Numerically stable softmax over the last dimension with a backward pass.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Rotary embedding tables for explicit per-row positions: `positions` is (B × L) u32; returns
/// cos, sin of shape (B × 1 × L × D/2) in f32, computed like Hugging Face (f32 outer product).
pub fn rope_tables(positions: &Tensor, head_dim: usize, theta: f64) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let inv = Tensor::from_vec(inv_freq, (1, 1, half), positions.device())?;
    let pos = positions.to_dtype(DType::F32)?.unsqueeze(2)?;
    let freqs = pos.broadcast_mul(&inv)?.unsqueeze(1)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Non-interleaved (Hugging Face `rotate_half`) rotary embedding of x (B × H × L × D).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)
}
