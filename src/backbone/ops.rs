//! Tensor ops the backbone needs, chosen so that gradients flow where training needs them.
//!
//! Candle's fused ops (`rms_norm`, `softmax_last_dim`, `rope`, `sdpa`, `QMatMul`) silently return no
//! gradient, so everything here is built from ops that have a backward pass — except
//! [`frozen_linear`], whose backward deliberately returns only the input gradient: the base weights
//! are frozen, and computing their gradient (as Candle's matmul backward would) costs ~3x the time
//! and gigabytes of memory.

use candle_core::backend::BackendStorage;

use super::packed::PackedWeight;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};

/// Up to this many input rows, [`frozen_linear`] on f32 CPU tensors uses [`kernels::linear_small`]
/// instead of gemm.
const SMALL_ROWS: usize = 16;

/// The same for [`frozen_linear_infer`], which inference uses when the packed copies are off
/// (`MEMGEN_PACKED_WEIGHTS=0`). Generation with memory runs many forwards of 16–48 rows (a few new
/// tokens per row plus K latents or queries); there the weight-streaming kernel beats gemm
/// (bench-memory, batch 4: a weaver call ~140 ms → ~100 ms). Training keeps the threshold it was
/// tuned with.
const SMALL_ROWS_INFER: usize = 48;

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
                let y = kernels::linear_small(x, n, k, w, out);
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
pub fn const_mul(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.broadcast_mul(c);
    }
    x.apply_op1(ConstBinary {
        c: c.to_dtype(x.dtype())?,
        mul: true,
    })
}

/// `x + c` for a constant `c` (broadcast); only x gets a gradient.
pub fn const_add(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.broadcast_add(c);
    }
    x.apply_op1(ConstBinary {
        c: c.to_dtype(x.dtype())?,
        mul: false,
    })
}

/// `x @ w^T (+ b)` over the last dimension of `x` (any leading shape), with `w` frozen.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    frozen_linear_with(x, w, b, SMALL_ROWS)
}

/// [`frozen_linear`] tuned for `Mode::Infer` (no graph is kept either way).
pub fn frozen_linear_infer(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    frozen_linear_with(x, w, b, SMALL_ROWS_INFER)
}

fn frozen_linear_with(
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

/// [`frozen_linear_infer`] by the panel-packed copy of `w` in `cell` (made on first use) when the
/// tensors are f32 on the CPU, at any number of rows: in panels the weights stream at memory speed
/// for one row and stay there up to ~8 (the row-major kernel halves its speed by 4 rows), and
/// the same kernel runs many-row chunks near the cores' peak. Inference only: no backward pass.
pub fn frozen_linear_packed(
    x: &Tensor,
    w: &Tensor,
    cell: &std::sync::OnceLock<PackedWeight>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().expect("frozen_linear on a scalar");
    let n = x.elem_count() / k.max(1);
    if !fused_infer_ok(x.dtype(), x.device()) || w.dtype() != DType::F32 || !packing_enabled() {
        return frozen_linear_infer(x, w, None);
    }
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
    *out.last_mut().unwrap() = m;
    y.reshape(out)
}

/// `MEMGEN_PACKED_WEIGHTS=0` turns the packed copies off, for memory-bound runs: inference then
/// reads the weights in place (no second copy), decoding SmolLM2 at batch 8 at half the speed.
fn packing_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MEMGEN_PACKED_WEIGHTS").map_or(true, |v| v.trim() != "0"))
}

struct PackedMatmul<'a>(&'a PackedWeight);

impl CustomOp1 for PackedMatmul<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "packed-matmul")?;
        let (n, _) = l.shape().dims2()?;
        let y = self.0.matmul(x, n);
        Ok((CpuStorage::F32(y), Shape::from((n, self.0.out_features()))))
    }
}

/// One LoRA adapter's update for [`lora_add_infer`]: `x Aᵀ · scale · Bᵀ` lands in the output's
/// columns `col..col + B.rows`.
pub struct LoraUpdate<'a> {
    /// r × in
    pub a: &'a Tensor,
    /// out × r
    pub b: &'a Tensor,
    pub scale: f32,
    pub col: usize,
}

/// `y` (n × m) plus each adapter's update computed from `x` (n × in), in one pass per row and one
/// allocation: inference's LoRA (f32, CPU, no graph). Per row, the rank-r product `x Aᵀ` is taken
/// once and scaled, then multiplied into the adapter's columns — the order of the graph path.
pub fn lora_add_infer(y: &Tensor, x: &Tensor, updates: &[LoraUpdate]) -> Result<Tensor> {
    if updates.is_empty() {
        return Ok(y.clone());
    }
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
    let a: Vec<Tensor> = updates
        .iter()
        .map(|u| u.a.contiguous())
        .collect::<Result<_>>()?;
    let b: Vec<Tensor> = updates
        .iter()
        .map(|u| u.b.contiguous())
        .collect::<Result<_>>()?;
    let op = LoraAdd {
        a: &a,
        b: &b,
        scale: updates.iter().map(|u| u.scale).collect(),
        col: updates.iter().map(|u| u.col).collect(),
    };
    y2.apply_op2_no_bwd(&x2, &op)?.reshape(shape)
}

struct LoraAdd<'a> {
    a: &'a [Tensor],
    b: &'a [Tensor],
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
            .a
            .iter()
            .zip(self.b)
            .map(|(a, b)| (a.storage_and_layout(), b.storage_and_layout()))
            .collect();
        let mut ab: Vec<(&[f32], &[f32], usize, usize)> = vec![];
        for ((ga, gb), (a, b)) in guards.iter().zip(self.a.iter().zip(self.b)) {
            let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*ga.0, &*gb.0) else {
                candle_core::bail!("lora-add: adapters must be on the CPU");
            };
            let (r, _) = a.dims2()?;
            let (w, _) = b.dims2()?;
            ab.push((
                contiguous_f32(sa, ga.1, "lora-add A")?,
                contiguous_f32(sb, gb.1, "lora-add B")?,
                r,
                w,
            ));
        }
        let mut out = y.to_vec();
        let rank = ab.iter().map(|u| u.2).max().unwrap_or(0);
        let width = ab.iter().map(|u| u.3).max().unwrap_or(0);
        // B transposed (r × w): the second product then runs along the output columns in
        // contiguous, vectorisable rows instead of one rank-long dot product per column.
        let bt: Vec<Vec<f32>> = ab
            .iter()
            .map(|&(_, b, r, w)| {
                let mut t = vec![0f32; r * w];
                for c in 0..w {
                    for j in 0..r {
                        t[j * w + c] = b[c * r + j];
                    }
                }
                t
            })
            .collect();
        let row = |i: usize, o: &mut [f32]| {
            let xi = &x[i * k..(i + 1) * k];
            let mut t = vec![0f32; rank];
            let mut delta = vec![0f32; width];
            for (u, &(a, _, r, w)) in ab.iter().enumerate() {
                for (j, tj) in t[..r].iter_mut().enumerate() {
                    *tj = kernels::dot_slices(xi, &a[j * k..(j + 1) * k]) * self.scale[u];
                }
                let d = &mut delta[..w];
                d.fill(0.0);
                for (j, &tj) in t[..r].iter().enumerate() {
                    for (dc, bv) in d.iter_mut().zip(&bt[u][j * w..(j + 1) * w]) {
                        *dc += tj * bv;
                    }
                }
                let c0 = self.col[u];
                for (oc, dc) in o[c0..c0 + w].iter_mut().zip(d.iter()) {
                    *oc += dc;
                }
            }
        };
        let work = n * ab.iter().map(|u| u.2 * (k + u.3)).sum::<usize>();
        if work >= kernels::PAR_WORK && kernels::threads() > 1 {
            use rayon::prelude::*;
            out.par_chunks_mut(m)
                .enumerate()
                .for_each(|(i, o)| row(i, o));
        } else {
            out.chunks_mut(m).enumerate().for_each(|(i, o)| row(i, o));
        }
        Ok((CpuStorage::F32(out), Shape::from((n, m))))
    }
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

    fn cpu_fwd(&self, _s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        // A fresh contiguous value starting at offset 0: its storage can be cloned as is.
        let mut v = self.take()?.contiguous()?;
        if v.layout().start_offset() != 0 {
            v = v.copy()?;
        }
        let (st, _) = v.storage_and_layout();
        let Storage::Cpu(cs) = &*st else {
            candle_core::bail!("{}: value on another device", self.name);
        };
        Ok((cs.clone(), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let mut v = self.take()?.contiguous()?;
        if v.layout().start_offset() != 0 {
            v = v.copy()?;
        }
        let (st, _) = v.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            candle_core::bail!("{}: value on another device", self.name);
        };
        Ok((cs.try_clone(v.layout())?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.bwd)(x, res, grad)?))
    }
}

fn fused<F>(x: &Tensor, value: Tensor, name: &'static str, bwd: F) -> Result<Tensor>
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
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
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
pub fn masked_softmax(scores: &Tensor, scale: f64, bias: &Tensor) -> Result<Tensor> {
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
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
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
pub fn rope_tables(positions: &Tensor, inv_freq: &[f32]) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let inv = Tensor::from_slice(inv_freq, (1, 1, half), positions.device())?;
    let pos = positions.to_dtype(DType::F32)?.unsqueeze(2)?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Qwen3's per-head RMSNorm of the q heads (weight `qn`) and k heads (`kn`) of fused rows
/// `[q heads | k heads | v heads]` (B × L × W); the v heads pass through. Inference only.
pub fn qk_norm_rows(
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
        candle_nn::ops::rms_norm(&x, w, eps as f32)?.reshape((b, l, n * head_dim))
    };
    let q = norm(0, heads, qn)?;
    let k = norm(heads, kv_heads, kn)?;
    let v = qkv.narrow(2, (heads + kv_heads) * head_dim, kv_heads * head_dim)?;
    Tensor::cat(&[&q, &k, &v], 2)
}

/// Non-interleaved (Hugging Face `rotate_half`) rotary embedding of x (B × H × L × D) by Candle's
/// fused kernel; its backward is the inverse rotation (the same kernel with −sin).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    let xc = x.contiguous()?;
    let value = candle_nn::rotary_emb::rope(&xc.detach(), &cos, &sin)?;
    let neg_sin = sin.neg()?;
    fused(&xc, value, "rope", move |_x, _res, g| {
        candle_nn::rotary_emb::rope(&g.contiguous()?, &cos, &neg_sin)
    })
}

// ---------------------------------------------------------------------------------------------
// Inference-only fused kernels (f32 on the CPU). They have no backward pass: `Mode::Infer` only.
// Each replaces a chain of small Candle ops (and their temporaries, thread-pool wake-ups and
// `.contiguous()` copies) by one pass over the data, computing the same arithmetic.
// ---------------------------------------------------------------------------------------------

/// Whether the fused inference kernels apply to tensors of this dtype on this device.
pub fn fused_infer_ok(dtype: DType, device: &candle_core::Device) -> bool {
    dtype == DType::F32 && device.is_cpu()
}

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
        let y: Vec<f32> = if a.len() == b.len() {
            a.iter().zip(b).map(|(x, y)| x + y).collect()
        } else {
            let w = b.len();
            if w == 0 || a.len() % w != 0 {
                candle_core::bail!("add: cannot broadcast {} over {}", w, a.len());
            }
            let mut y = Vec::with_capacity(a.len());
            for row in a.chunks_exact(w) {
                y.extend(row.iter().zip(b).map(|(x, y)| x + y));
            }
            y
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// `a + b` (no backward; `b` the same shape as `a` or a bias over its last dimension).
pub fn add_infer(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused_infer_ok(a.dtype(), a.device()) && a.dtype() == b.dtype() {
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
        let w2 = *dims.last().unwrap();
        let w = w2 / 2;
        *dims.last_mut().unwrap() = w;
        let rows = x.len() / w2.max(1);
        let mut y = vec![0f32; rows * w];
        let f = |(src, dst): (&[f32], &mut [f32])| {
            let (g, u) = src.split_at(w);
            for ((d, &g), &u) in dst.iter_mut().zip(g).zip(u) {
                // Candle's silu: x / (1 + exp(-x)).
                *d = g / (1.0 + (-g).exp()) * u;
            }
        };
        if rows * w >= kernels::PAR_ELEMS && kernels::threads() > 1 {
            use rayon::prelude::*;
            x.par_chunks(w2).zip(y.par_chunks_mut(w)).for_each(f);
        } else {
            x.chunks(w2).zip(y.chunks_mut(w)).for_each(f);
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

/// `silu(x[.., :I]) * x[.., I:]` for the fused gate/up output (no backward).
pub fn silu_mul_infer(gate_up: &Tensor) -> Result<Tensor> {
    if fused_infer_ok(gate_up.dtype(), gate_up.device()) {
        return gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul);
    }
    let w = gate_up.dim(D::Minus1)? / 2;
    gate_up.narrow(D::Minus1, 0, w)?.silu()? * gate_up.narrow(D::Minus1, w, w)?
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
        let (b, l, w) = l1.shape().dims3()?;
        let (hd, half) = (self.head_dim, self.head_dim / 2);
        if cos.len() != b * l * half || sin.len() != cos.len() || self.heads * hd > w {
            candle_core::bail!("rope: tables or width do not match the input");
        }
        let mut y = x.to_vec();
        for (r, row) in y.chunks_exact_mut(w).enumerate() {
            let (c, s) = (
                &cos[r * half..(r + 1) * half],
                &sin[r * half..(r + 1) * half],
            );
            for head in row[..self.heads * hd].chunks_exact_mut(hd) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, bb) = (x1[i], x2[i]);
                    x1[i] = a * c[i] - bb * s[i];
                    x2[i] = bb * c[i] + a * s[i];
                }
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// Rotary embedding (as [`apply_rope`]) of the first `heads` heads of each row of `x` (B × L × W);
/// `cos`/`sin` are (B × L × hd/2). No backward.
pub fn rope_rows_infer(
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
        let hd = self.head_dim;
        if (self.start + self.n) * hd > w {
            candle_core::bail!("take_heads: heads out of range");
        }
        let mut y = Vec::with_capacity(b * self.n * len * hd);
        for bi in 0..b {
            for h in self.start..self.start + self.n {
                for i in 0..len {
                    let o = (bi * len + i) * w + h * hd;
                    y.extend_from_slice(&x[o..o + hd]);
                }
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((b, self.n, len, hd))))
    }
}

pub fn take_heads_infer(x: &Tensor, start: usize, n: usize, head_dim: usize) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&TakeHeads { start, n, head_dim })
}

/// Causal grouped-query attention for inference. Queries are the first `heads` heads of the rows
/// `qrows` (B × L × W); keys and values are (B × KV × T × hd) views (any strides but the last);
/// the L queries sit at positions `past..past + L` of the T keys. Key j is visible to query i when
/// j ≤ past + i and `mask[b][j] != 0`. A query that sees no key averages all T values, exactly as
/// adding a `f32::MIN` bias everywhere and taking the softmax does. Output: (B × L × heads · hd).
pub struct Attention<'a> {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub past: usize,
    pub mask: &'a [Vec<u8>],
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
            || self.heads * hd > w
            || !self.heads.is_multiple_of(kvh)
            || t != self.past + l
            || self.mask.len() != b
            || self.mask.iter().any(|m| m.len() != t)
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
        let y = kernels::attention(q, k, v, &dims, self.mask);
        Ok((CpuStorage::F32(y), Shape::from((b, l, self.heads * hd))))
    }
}

pub(crate) mod kernels {
    use rayon::prelude::*;

    /// Below this many multiply-adds a kernel runs on the calling thread: waking the pool costs
    /// more than it saves.
    pub const PAR_WORK: usize = 1 << 18;
    /// The same for elementwise passes.
    pub const PAR_ELEMS: usize = 1 << 16;

    pub fn threads() -> usize {
        rayon::current_num_threads()
    }

    /// A pointer into an output buffer that tasks write disjoint parts of.
    #[derive(Clone, Copy)]
    pub(crate) struct Out(pub(crate) *mut f32);
    // SAFETY: every task writes a disjoint set of elements, and the buffer outlives the tasks.
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}
    impl Out {
        pub(crate) fn ptr(self) -> *mut f32 {
            self.0
        }
    }

    /// `y (n × m) = x (n × k) · w (m × k)ᵀ`, streaming each weight row once.
    pub fn linear_small(x: &[f32], n: usize, k: usize, w: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * m];
        let out = Out(y.as_mut_ptr());
        let run = |j0: usize, j1: usize| {
            // SAFETY: this call writes only columns j0..j1 of y (n × m); x and w have n·k and m·k
            // elements.
            unsafe { linear_cols(x, n, k, w, m, j0, j1, out.ptr()) }
        };
        let nt = threads();
        if n * m * k >= PAR_WORK && nt > 1 {
            // Several chunks per thread so a thread that gets descheduled on a busy machine does
            // not hold everyone up.
            let chunk = m.div_ceil(nt * 8).next_multiple_of(4).max(4);
            (0..m.div_ceil(chunk))
                .into_par_iter()
                .for_each(|c| run(c * chunk, ((c + 1) * chunk).min(m)));
        } else {
            run(0, m);
        }
        y
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn linear_cols(
        x: &[f32],
        n: usize,
        k: usize,
        w: &[f32],
        m: usize,
        j0: usize,
        j1: usize,
        y: *mut f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return avx::linear_cols(x.as_ptr(), n, k, w.as_ptr(), m, j0, j1, y);
        }
        for j in j0..j1 {
            let wr = &w[j * k..(j + 1) * k];
            for i in 0..n {
                *y.add(i * m + j) = dot(&x[i * k..(i + 1) * k], wr);
            }
        }
    }

    /// `a · b` (equal lengths), eight lanes at a time.
    pub fn dot_slices(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }

    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ar, br) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            for i in 0..8 {
                acc[i] += x[i] * y[i];
            }
        }
        let mut s =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (x, y) in ar.iter().zip(br) {
            s += x * y;
        }
        s
    }

    #[cfg(target_arch = "x86_64")]
    mod avx {
        use std::arch::x86_64::*;

        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn linear_cols(
            x: *const f32,
            n: usize,
            k: usize,
            w: *const f32,
            m: usize,
            j0: usize,
            j1: usize,
            y: *mut f32,
        ) {
            if n == 1 {
                // One input row: memory-bound, so walk the weights strictly in memory order (one
                // long stream the hardware prefetcher follows; interleaved rows ran at 2/3 speed).
                for j in j0..j1 {
                    row_dot(x, k, w.add(j * k), y.add(j));
                }
                return;
            }
            // Several input rows: compute-bound, so tile CW weight rows × up to RX input rows in
            // registers (fewer loads per multiply-add).
            const CW: usize = 4;
            const RX: usize = 3;
            let mut j = j0;
            while j + CW <= j1 {
                let mut i = 0;
                while i < n {
                    match n - i {
                        1 => tile::<CW, 1>(x, k, w, y, m, i, j),
                        2 => tile::<CW, 2>(x, k, w, y, m, i, j),
                        _ => tile::<CW, RX>(x, k, w, y, m, i, j),
                    }
                    i += (n - i).min(RX);
                }
                j += CW;
            }
            while j < j1 {
                for i in 0..n {
                    row_dot(x.add(i * k), k, w.add(j * k), y.add(i * m + j));
                }
                j += 1;
            }
        }

        /// *y = x · w over k elements, with four independent accumulators.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn row_dot(x: *const f32, k: usize, w: *const f32, y: *mut f32) {
            let mut a = [_mm256_setzero_ps(); 4];
            let k32 = k / 32 * 32;
            let mut p = 0;
            while p < k32 {
                for (u, au) in a.iter_mut().enumerate() {
                    let o = p + 8 * u;
                    *au =
                        _mm256_fmadd_ps(_mm256_loadu_ps(w.add(o)), _mm256_loadu_ps(x.add(o)), *au);
                }
                p += 32;
            }
            while p + 8 <= k {
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(w.add(p)), _mm256_loadu_ps(x.add(p)), a[0]);
                p += 8;
            }
            let v = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            let mut s = hsum(v);
            while p < k {
                s += *x.add(p) * *w.add(p);
                p += 1;
            }
            *y = s;
        }

        /// [`super::head_body`] for 64-wide heads (SmolLM2, Qwen2.5-0.5B): the query row and the
        /// output accumulator live in registers, and scores are taken four keys at a time, so
        /// the four dot products' FMA chains overlap and share one horizontal reduction.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn head64(
            q: &[f32],
            k: &[f32],
            v: &[f32],
            d: &super::AttnDims,
            mask: &[u8],
            bi: usize,
            h: usize,
            y: *mut f32,
        ) {
            const HD: usize = 64;
            let g = h / d.rep;
            // As the reference: (q·k) · (1/√hd) with the scale applied in f32.
            let scale = (1.0 / (HD as f64).sqrt()) as f32;
            let kbase = bi * d.ks[0] + g * d.ks[1];
            let vbase = bi * d.vs[0] + g * d.vs[1];
            assert!(d.t == 0 || kbase + (d.t - 1) * d.ks[2] + HD <= k.len());
            assert!(d.t == 0 || vbase + (d.t - 1) * d.vs[2] + HD <= v.len());
            let kp = |j: usize| k.as_ptr().add(kbase + j * d.ks[2]);
            let vp = |j: usize| v.as_ptr().add(vbase + j * d.vs[2]);
            let mut p = vec![0f32; d.t];
            for i in 0..d.l {
                let qo = (bi * d.l + i) * d.w + h * HD;
                assert!(qo + HD <= q.len());
                let yo = (bi * d.l + i) * d.heads * HD + h * HD;
                if d.past + i < d.t && mask[d.past + i] == 0 {
                    continue; // a padding query: see head_body
                }
                let limit = (d.past + i + 1).min(d.t);
                let qv: [__m256; 8] =
                    std::array::from_fn(|c| _mm256_loadu_ps(q.as_ptr().add(qo + 8 * c)));
                let dot4 = |j: usize| -> __m256 {
                    // Four keys j..j+4 (the caller keeps j + 3 < limit): lanes 0–3 of the result.
                    let mut a = [_mm256_setzero_ps(); 4];
                    for (u, au) in a.iter_mut().enumerate() {
                        let kr = kp(j + u);
                        for (c, qc) in qv.iter().enumerate() {
                            *au = _mm256_fmadd_ps(*qc, _mm256_loadu_ps(kr.add(8 * c)), *au);
                        }
                    }
                    let s01 = _mm256_hadd_ps(a[0], a[1]);
                    let s23 = _mm256_hadd_ps(a[2], a[3]);
                    let s = _mm256_hadd_ps(s01, s23);
                    // [a0 a1 a2 a3 | a0 a1 a2 a3] halves: add the two 128-bit lanes.
                    _mm256_castps128_ps256(_mm_add_ps(
                        _mm256_castps256_ps128(s),
                        _mm256_extractf128_ps(s, 1),
                    ))
                };
                let mut max = f32::NEG_INFINITY;
                let mut any = false;
                let mut j = 0;
                let mut four = [0f32; 8];
                while j < limit {
                    // Blocks of four keys, then the last 1–3 one at a time.
                    let n = if j + 4 <= limit {
                        _mm256_storeu_ps(four.as_mut_ptr(), dot4(j));
                        4
                    } else {
                        let kr = kp(j);
                        let mut a = _mm256_setzero_ps();
                        for (c, qc) in qv.iter().enumerate() {
                            a = _mm256_fmadd_ps(*qc, _mm256_loadu_ps(kr.add(8 * c)), a);
                        }
                        four[0] = hsum(a);
                        1
                    };
                    for (u, &dot) in four[..n].iter().enumerate() {
                        let jj = j + u;
                        if mask[jj] != 0 {
                            let s = dot * scale;
                            p[jj] = s;
                            max = max.max(s);
                            any = true;
                        } else {
                            p[jj] = f32::NEG_INFINITY;
                        }
                    }
                    j += n;
                }
                let mut acc = [_mm256_setzero_ps(); 8];
                if any {
                    exp_shifted(&mut p[..limit], max);
                    let mut sum = 0f32;
                    for &e in &p[..limit] {
                        sum += e;
                    }
                    for (jj, &e) in p[..limit].iter().enumerate() {
                        if mask[jj] != 0 {
                            let pj = _mm256_set1_ps(e / sum);
                            let vr = vp(jj);
                            for (c, ac) in acc.iter_mut().enumerate() {
                                *ac = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr.add(8 * c)), *ac);
                            }
                        }
                    }
                } else {
                    let pj = _mm256_set1_ps(1.0 / d.t as f32);
                    for jj in 0..d.t {
                        let vr = vp(jj);
                        for (c, ac) in acc.iter_mut().enumerate() {
                            *ac = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr.add(8 * c)), *ac);
                        }
                    }
                }
                for (c, ac) in acc.iter().enumerate() {
                    _mm256_storeu_ps(y.add(yo + 8 * c), *ac);
                }
            }
        }

        /// [`super::head_body`] for many query rows at once (a prefill, a weaver chunk): the
        /// scores are a small GEMM of 6 queries × 16 keys per register tile against the keys
        /// transposed once per task, and P·V another of 4 queries × 16 dims, so each key and
        /// value row is loaded once per block of queries instead of once per query (one query at
        /// a time is bound by reading K and V from L2). Needs `hd % 16 == 0`.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn head_many(
            q: &[f32],
            k: &[f32],
            v: &[f32],
            d: &super::AttnDims,
            mask: &[u8],
            bi: usize,
            h: usize,
            y: *mut f32,
        ) {
            const GQ: usize = 6;
            const KB: usize = 16;
            let hd = d.hd;
            let g = h / d.rep;
            // As the reference: (q·k) · (1/√hd) with the scale applied in f32.
            let scale = (1.0 / (hd as f64).sqrt()) as f32;
            let kbase = bi * d.ks[0] + g * d.ks[1];
            let vbase = bi * d.vs[0] + g * d.vs[1];
            // Padding queries (see head_body) are skipped and their outputs left at 0.
            let real: Vec<usize> = (0..d.l)
                .filter(|&i| !(d.past + i < d.t && mask[d.past + i] == 0))
                .collect();
            let Some(&last) = real.last() else {
                return;
            };
            let tmax = (d.past + last + 1).min(d.t);
            let tpad = tmax.next_multiple_of(KB);
            // Keys transposed into tiles of 16: kt[(tile · hd + c) · 16 + j % 16] = k[j][c], so a
            // score tile reads one contiguous 4 KB block. Transposed 8 × 8 in registers.
            let mut kt = vec![0f32; hd * tpad];
            for j0 in (0..tpad).step_by(8) {
                let tile = kt.as_mut_ptr().add((j0 / KB) * hd * KB + j0 % KB);
                let full = j0 + 8 <= tmax;
                for c0 in (0..hd).step_by(8) {
                    let mut rows = [_mm256_setzero_ps(); 8];
                    for (r, row) in rows.iter_mut().enumerate() {
                        let j = j0 + r;
                        if full || j < tmax {
                            *row = _mm256_loadu_ps(k.as_ptr().add(kbase + j * d.ks[2] + c0));
                        }
                    }
                    let cols = transpose8(rows);
                    for (c, col) in cols.iter().enumerate() {
                        _mm256_storeu_ps(tile.add((c0 + c) * KB), *col);
                    }
                }
            }
            // 0 for a key that may be attended to, −∞ for a padding key.
            let kbias: Vec<f32> = (0..tpad)
                .map(|j| {
                    if j < d.t && mask[j] != 0 {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let mut sc = vec![0f32; GQ * tpad];
            let mut qb = vec![0f32; GQ * hd];
            for blk in real.chunks(GQ) {
                let nq = blk.len();
                for (r, &i) in blk.iter().enumerate() {
                    let qo = (bi * d.l + i) * d.w + h * hd;
                    qb[r * hd..(r + 1) * hd].copy_from_slice(&q[qo..qo + hd]);
                }
                let bl = (d.past + blk[nq - 1] + 1).min(d.t);
                let blp = bl.next_multiple_of(KB);
                for j0 in (0..blp).step_by(KB) {
                    macro_rules! go {
                        ($($r:literal)*) => {
                            match nq {
                                $($r => score_tile::<$r>(
                                    qb.as_ptr(),
                                    hd,
                                    kt.as_ptr().add(j0 * hd),
                                    sc.as_mut_ptr().add(j0),
                                    tpad,
                                ),)*
                                _ => unreachable!(),
                            }
                        };
                    }
                    go!(1 2 3 4 5 6)
                }
                let mut limits = [0usize; GQ];
                let mut inv = [0f32; GQ];
                for (r, &i) in blk.iter().enumerate() {
                    let limit = (d.past + i + 1).min(d.t);
                    limits[r] = limit;
                    let row = &mut sc[r * tpad..r * tpad + blp];
                    // Scale, mask (bias −∞) and running max, eight at a time.
                    let (sv, l8) = (_mm256_set1_ps(scale), limit / 8 * 8);
                    let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
                    for j in (0..l8).step_by(8) {
                        let x = _mm256_fmadd_ps(
                            _mm256_loadu_ps(row.as_ptr().add(j)),
                            sv,
                            _mm256_loadu_ps(kbias.as_ptr().add(j)),
                        );
                        _mm256_storeu_ps(row.as_mut_ptr().add(j), x);
                        mv = _mm256_max_ps(mv, x);
                    }
                    let mut max = hmax(mv);
                    for j in l8..limit {
                        row[j] = row[j] * scale + kbias[j];
                        max = max.max(row[j]);
                    }
                    if max == f32::NEG_INFINITY {
                        // Unreachable for a real query (it sees itself); kept as head_body has it.
                        let yo = (bi * d.l + i) * d.heads * hd + h * hd;
                        let pj = 1.0 / d.t as f32;
                        for j in 0..d.t {
                            let vr = &v[vbase + j * d.vs[2]..vbase + j * d.vs[2] + hd];
                            for (c, &x) in vr.iter().enumerate() {
                                *y.add(yo + c) += pj * x;
                            }
                        }
                        row.iter_mut().for_each(|x| *x = 0.0);
                        limits[r] = 0;
                        continue;
                    }
                    exp_shifted(&mut row[..limit], max);
                    let mut acc = _mm256_setzero_ps();
                    for j in (0..l8).step_by(8) {
                        acc = _mm256_add_ps(acc, _mm256_loadu_ps(row.as_ptr().add(j)));
                    }
                    let mut sum = hsum(acc);
                    for &e in &row[l8..limit] {
                        sum += e;
                    }
                    // Normalised on the output (hd values) instead of on every probability.
                    inv[r] = 1.0 / sum;
                    row[limit..].iter_mut().for_each(|x| *x = 0.0);
                }
                for r0 in (0..nq).step_by(4) {
                    let go = (nq - r0).min(4);
                    let keys = limits[r0..r0 + go].iter().copied().max().unwrap_or(0);
                    for c0 in (0..hd).step_by(16) {
                        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                        for j in 0..keys {
                            let vr = v.as_ptr().add(vbase + j * d.vs[2] + c0);
                            let v0 = _mm256_loadu_ps(vr);
                            let v1 = _mm256_loadu_ps(vr.add(8));
                            for (r, ar) in acc.iter_mut().enumerate().take(go) {
                                let p = _mm256_broadcast_ss(&sc[(r0 + r) * tpad + j]);
                                ar[0] = _mm256_fmadd_ps(p, v0, ar[0]);
                                ar[1] = _mm256_fmadd_ps(p, v1, ar[1]);
                            }
                        }
                        for (r, ar) in acc.iter().enumerate().take(go) {
                            if limits[r0 + r] == 0 {
                                continue;
                            }
                            let i = blk[r0 + r];
                            let yo = (bi * d.l + i) * d.heads * hd + h * hd + c0;
                            let s = _mm256_set1_ps(inv[r0 + r]);
                            _mm256_storeu_ps(y.add(yo), _mm256_mul_ps(ar[0], s));
                            _mm256_storeu_ps(y.add(yo + 8), _mm256_mul_ps(ar[1], s));
                        }
                    }
                }
            }
        }

        /// Scores of R queries (rows of `qb`, `hd` wide) against one tile of 16 transposed keys
        /// (`kt`: hd × 16); row r of the result goes to `out + r · ld`.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn score_tile<const R: usize>(
            qb: *const f32,
            hd: usize,
            kt: *const f32,
            out: *mut f32,
            ld: usize,
        ) {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for c in 0..hd {
                let k0 = _mm256_loadu_ps(kt.add(c * 16));
                let k1 = _mm256_loadu_ps(kt.add(c * 16 + 8));
                for (r, ar) in acc.iter_mut().enumerate() {
                    let a = _mm256_broadcast_ss(&*qb.add(r * hd + c));
                    ar[0] = _mm256_fmadd_ps(a, k0, ar[0]);
                    ar[1] = _mm256_fmadd_ps(a, k1, ar[1]);
                }
            }
            for (r, ar) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * ld), ar[0]);
                _mm256_storeu_ps(out.add(r * ld + 8), ar[1]);
            }
        }

        /// The 8 × 8 transpose of `rows`.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ]
        }

        /// `p[j] = exp(p[j] − shift)`, eight at a time; −∞ (and anything below −87.3) gives 0.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn exp_shifted(p: &mut [f32], shift: f32) {
            let n8 = p.len() / 8 * 8;
            let sh = _mm256_set1_ps(shift);
            let ptr = p.as_mut_ptr();
            let mut i = 0;
            while i < n8 {
                let x = _mm256_sub_ps(_mm256_loadu_ps(ptr.add(i)), sh);
                _mm256_storeu_ps(ptr.add(i), exp8(x));
                i += 8;
            }
            for e in &mut p[n8..] {
                *e = (*e - shift).exp();
            }
        }

        /// e^x for eight lanes, the Cephes `expf` way: e^x = 2^n · e^r with n = round(x · log₂e),
        /// r = x − n · ln 2 (ln 2 in two parts, so r is exact), e^r from a degree-6 polynomial.
        /// Within 2 ulp of `f32::exp`; below ln(2^−126) the result is 0 (no denormals).
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn exp8(x: __m256) -> __m256 {
            let lo = _mm256_set1_ps(-87.336_55);
            let hi = _mm256_set1_ps(88.376_26);
            let xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
            let mut y = _mm256_set1_ps(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                0.166_666_65,
                0.5,
            ] {
                y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
            }
            let r2 = _mm256_mul_ps(r, r);
            let y = _mm256_add_ps(_mm256_fmadd_ps(y, r2, r), _mm256_set1_ps(1.0));
            // 2^n: n + 127 in the exponent field. n ≥ −126 after the clamp, so it is normal.
            let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            let v = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
            // Below the clamp (−∞: masked positions) the answer is exactly 0.
            _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, lo), v)
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn hmax(a: __m256) -> f32 {
            let m4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)))
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn hsum(a: __m256) -> f32 {
            let hi = _mm256_extractf128_ps(a, 1);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(a), hi);
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
            _mm_cvtss_f32(s1)
        }

        /// y[i..i+R, j..j+C] from C weight rows and R input rows.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn tile<const C: usize, const R: usize>(
            x: *const f32,
            k: usize,
            w: *const f32,
            y: *mut f32,
            m: usize,
            i: usize,
            j: usize,
        ) {
            let mut acc = [[_mm256_setzero_ps(); R]; C];
            let k8 = k / 8 * 8;
            let mut p = 0;
            while p < k8 {
                let mut xv = [_mm256_setzero_ps(); R];
                for (r, xr) in xv.iter_mut().enumerate() {
                    *xr = _mm256_loadu_ps(x.add((i + r) * k + p));
                }
                for (c, ac) in acc.iter_mut().enumerate() {
                    let wv = _mm256_loadu_ps(w.add((j + c) * k + p));
                    for r in 0..R {
                        ac[r] = _mm256_fmadd_ps(wv, xv[r], ac[r]);
                    }
                }
                p += 8;
            }
            for (c, ac) in acc.iter().enumerate() {
                for (r, a) in ac.iter().enumerate() {
                    let mut s = hsum(*a);
                    for q in k8..k {
                        s += *x.add((i + r) * k + q) * *w.add((j + c) * k + q);
                    }
                    *y.add((i + r) * m + j + c) = s;
                }
            }
        }
    }

    pub struct AttnDims {
        pub b: usize,
        pub l: usize,
        pub t: usize,
        /// Row width of the query rows.
        pub w: usize,
        pub heads: usize,
        /// Query heads per kv head.
        pub rep: usize,
        pub hd: usize,
        pub past: usize,
        /// Strides of k and v over (batch, kv head, position).
        pub ks: [usize; 3],
        pub vs: [usize; 3],
    }

    /// From this many query rows per task on, attention runs blocked over queries
    /// ([`avx::head_many`]); decoding (1 row) keeps the one-query kernels.
    pub const MANY_QUERIES: usize = 8;

    pub fn attention(q: &[f32], k: &[f32], v: &[f32], d: &AttnDims, mask: &[Vec<u8>]) -> Vec<f32> {
        let width = d.heads * d.hd;
        let mut y = vec![0f32; d.b * d.l * width];
        let out = Out(y.as_mut_ptr());
        let run = |task: usize| {
            let (bi, h) = (task / d.heads, task % d.heads);
            // SAFETY: task (bi, h) writes only y[bi, .., h·hd..(h+1)·hd].
            unsafe { head(q, k, v, d, &mask[bi], bi, h, out.ptr()) }
        };
        let tasks = d.b * d.heads;
        let work = tasks * d.l * d.t.min(d.past + d.l) * d.hd * 2;
        if work >= PAR_WORK && threads() > 1 {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
        y
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn head(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: &AttnDims,
        mask: &[u8],
        bi: usize,
        h: usize,
        y: *mut f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return head_avx(q, k, v, d, mask, bi, h, y);
        }
        head_body(q, k, v, d, mask, bi, h, y, exp_shifted)
    }

    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn head_avx(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: &AttnDims,
        mask: &[u8],
        bi: usize,
        h: usize,
        y: *mut f32,
    ) {
        if d.l >= MANY_QUERIES && d.hd.is_multiple_of(16) {
            return avx::head_many(q, k, v, d, mask, bi, h, y);
        }
        if d.hd == 64 {
            return avx::head64(q, k, v, d, mask, bi, h, y);
        }
        head_body(q, k, v, d, mask, bi, h, y, |p, m| avx::exp_shifted(p, m))
    }

    /// `p[j] = exp(p[j] − shift)`; −∞ gives 0.
    fn exp_shifted(p: &mut [f32], shift: f32) {
        p.iter_mut().for_each(|e| *e = (*e - shift).exp());
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn head_body(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: &AttnDims,
        mask: &[u8],
        bi: usize,
        h: usize,
        y: *mut f32,
        exp: impl Fn(&mut [f32], f32),
    ) {
        let hd = d.hd;
        let g = h / d.rep;
        let scale = 1.0 / (hd as f64).sqrt();
        let kbase = bi * d.ks[0] + g * d.ks[1];
        let vbase = bi * d.vs[0] + g * d.vs[1];
        let krow = |j: usize| &k[kbase + j * d.ks[2]..kbase + j * d.ks[2] + hd];
        let vrow = |j: usize| &v[vbase + j * d.vs[2]..vbase + j * d.vs[2] + hd];
        let mut p = vec![0f32; d.t];
        let mut acc = vec![0f32; hd];
        for i in 0..d.l {
            let qo = (bi * d.l + i) * d.w + h * hd;
            let qi = &q[qo..qo + hd];
            let limit = (d.past + i + 1).min(d.t);
            let yo = (bi * d.l + i) * d.heads * hd + h * hd;
            if d.past + i < d.t && mask[d.past + i] == 0 {
                // A padding query (a finished row, or a row without latents in a step where
                // others have some): nothing reads its output, so skip the work and leave 0.
                continue;
            }
            let mut max = f32::NEG_INFINITY;
            let mut any = false;
            for j in 0..limit {
                if mask[j] != 0 {
                    // As the reference: (q·k) · (1/√hd) with the scale applied in f32.
                    let s = dot(qi, krow(j)) * scale as f32;
                    p[j] = s;
                    max = max.max(s);
                    any = true;
                } else {
                    p[j] = f32::NEG_INFINITY;
                }
            }
            acc.iter_mut().for_each(|a| *a = 0.0);
            if any {
                // One vectorised pass of exp: a decode step does heads × positions of them per
                // layer, and scalar `expf` made attention ~15% of decoding.
                exp(&mut p[..limit], max);
                let mut sum = 0f32;
                for &e in &p[..limit] {
                    sum += e;
                }
                for j in 0..limit {
                    if mask[j] != 0 {
                        let pj = p[j] / sum;
                        for (a, &x) in acc.iter_mut().zip(vrow(j)) {
                            *a += pj * x;
                        }
                    }
                }
            } else {
                let pj = 1.0 / d.t as f32;
                for j in 0..d.t {
                    for (a, &x) in acc.iter_mut().zip(vrow(j)) {
                        *a += pj * x;
                    }
                }
            }
            std::ptr::copy_nonoverlapping(acc.as_ptr(), y.add(yo), hd);
        }
    }

    #[cfg(all(test, target_arch = "x86_64"))]
    mod tests {
        /// A deterministic stream of values in [-1, 1), `n` at a time.
        fn values(mut seed: u64) -> impl FnMut(usize) -> Vec<f32> {
            move |n| {
                (0..n)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                    })
                    .collect()
            }
        }

        type HeadKernel =
            unsafe fn(&[f32], &[f32], &[f32], &super::AttnDims, &[u8], usize, usize, *mut f32);

        /// `fast` writes what the generic head writes for (row `bi`, head `h`), within 1e-5, and
        /// not all zeros. Unsafe: `fast` may need CPU features the caller has checked.
        #[allow(clippy::too_many_arguments)]
        unsafe fn agrees_with_generic(
            fast: HeadKernel,
            q: &[f32],
            k: &[f32],
            v: &[f32],
            d: &super::AttnDims,
            mask: &[u8],
            bi: usize,
            h: usize,
        ) {
            let n = d.b * d.l * d.heads * d.hd;
            let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
            fast(q, k, v, d, mask, bi, h, got.as_mut_ptr());
            super::head_body(
                q,
                k,
                v,
                d,
                mask,
                bi,
                h,
                want.as_mut_ptr(),
                super::exp_shifted,
            );
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() < 1e-5,
                    "l {} past {} hd {}, row {bi} head {h} elem {i}: {g} vs {e}",
                    d.l,
                    d.past,
                    d.hd
                );
            }
            assert!(got.iter().any(|&x| x != 0.0));
        }

        /// Dimensions of contiguous (b × l × heads·hd) queries over (b × kvh × t × hd) keys.
        fn dims(
            b: usize,
            l: usize,
            past: usize,
            heads: usize,
            kvh: usize,
            hd: usize,
        ) -> super::AttnDims {
            let t = past + l;
            super::AttnDims {
                b,
                l,
                t,
                w: heads * hd,
                heads,
                rep: heads / kvh,
                hd,
                past,
                ks: [kvh * t * hd, t * hd, hd],
                vs: [kvh * t * hd, t * hd, hd],
            }
        }

        #[test]
        fn head64_matches_the_generic_head() {
            if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
                return;
            }
            // 2 rows × 3 new positions after 6 cached ones (t = 9: two blocks of four keys and a
            // tail), 4 query heads over 2 kv heads; padding keys, a padding query (row 0,
            // position 7) and a left-padded row.
            let (b, l, past, heads, kvh, hd) = (2, 3, 6, 4, 2, 64);
            let t = past + l;
            let mut rnd = values(1);
            let w = heads * hd;
            let q = rnd(b * l * w);
            let k = rnd(b * kvh * t * hd);
            let v = rnd(b * kvh * t * hd);
            let d = dims(b, l, past, heads, kvh, hd);
            let mask = [
                vec![1, 0, 1, 1, 0, 1, 1, 0, 1],
                vec![0, 0, 0, 0, 0, 0, 1, 1, 1],
            ];
            for (bi, row_mask) in mask.iter().enumerate() {
                for h in 0..heads {
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    unsafe {
                        agrees_with_generic(super::avx::head64, &q, &k, &v, &d, row_mask, bi, h)
                    };
                }
            }
        }

        #[test]
        fn head_many_matches_the_generic_head() {
            if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
                return;
            }
            let mut rnd = values(7);
            // Query blocks of 6 with ragged tails, key counts off the 16-key tiles, with and
            // without a cache, head widths 16, 64 and 128; padding keys inside the cache, padding
            // queries among the new rows (a masked latent slot) and a left-padded row.
            for (l, past, hd) in [
                (8, 0, 64),
                (13, 5, 64),
                (20, 37, 16),
                (9, 3, 128),
                (31, 0, 64),
            ] {
                let (b, heads, kvh) = (2, 4, 2);
                let t = past + l;
                let w = heads * hd;
                let q = rnd(b * l * w);
                let k = rnd(b * kvh * t * hd);
                let v = rnd(b * kvh * t * hd);
                let d = dims(b, l, past, heads, kvh, hd);
                let row0: Vec<u8> = (0..t).map(|j| u8::from(j % 5 != 1 || j == t - 1)).collect();
                let row1: Vec<u8> = (0..t).map(|j| u8::from(j >= past + 2)).collect();
                for (bi, row_mask) in [row0, row1].iter().enumerate() {
                    for h in 0..heads {
                        // SAFETY: the CPU has AVX2 and FMA (checked above).
                        unsafe {
                            agrees_with_generic(
                                super::avx::head_many,
                                &q,
                                &k,
                                &v,
                                &d,
                                row_mask,
                                bi,
                                h,
                            )
                        };
                    }
                }
            }
        }

        #[test]
        fn vector_exp_matches_libm_and_zeroes_masked_scores() {
            if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
                return;
            }
            // Softmax inputs are scores minus their max: ≤ 0, down to −∞ for masked positions.
            let mut xs: Vec<f32> = (0..20_000).map(|i| -90.0 + i as f32 * 0.0045).collect();
            xs.extend([
                0.0,
                -0.0,
                1e-8,
                -1e-8,
                0.5,
                3.0,
                80.0,
                -87.3,
                f32::NEG_INFINITY,
            ]);
            let mut got = xs.clone();
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { super::avx::exp_shifted(&mut got, 0.0) };
            for (&x, &g) in xs.iter().zip(&got) {
                let want = x.exp();
                if x < -87.336 {
                    assert_eq!(g, 0.0, "exp({x})");
                } else {
                    let rel = ((g - want) / want).abs();
                    assert!(rel < 3e-7, "exp({x}) = {g}, libm {want}, rel {rel:e}");
                }
            }
            // The shift is subtracted first: exp(s − max).
            let mut p = vec![
                2.0f32,
                1.0,
                f32::NEG_INFINITY,
                2.0,
                0.0,
                1.5,
                -1.0,
                2.0,
                0.25,
            ];
            let want: Vec<f32> = p.iter().map(|&s| (s - 2.0).exp()).collect();
            unsafe { super::avx::exp_shifted(&mut p, 2.0) };
            for (g, w) in p.iter().zip(&want) {
                assert!((g - w).abs() <= 2e-7 * w, "{g} vs {w}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn lora_add_matches_the_two_products_in_each_adapters_columns() {
        let dev = Device::Cpu;
        let t = |v: Vec<f32>, r: usize, c: usize| Tensor::from_vec(v, (r, c), &dev).unwrap();
        let seq = |n: usize, f: f32| (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) * f).collect();
        let (n, k, m) = (3, 5, 9);
        let y = t(seq(n * m, 0.5), n, m);
        let x = t(seq(n * k, 0.3), n, k);
        // Two adapters (ranks 2 and 3) on columns 1..5 and 6..8; columns 0, 5 stay as they are.
        let (a1, b1) = (t(seq(2 * k, 0.2), 2, k), t(seq(4 * 2, 0.1), 4, 2));
        let (a2, b2) = (t(seq(3 * k, 0.4), 3, k), t(seq(3 * 3, 0.25), 3, 3));
        let got = lora_add_infer(
            &y,
            &x,
            &[
                LoraUpdate {
                    a: &a1,
                    b: &b1,
                    scale: 2.0,
                    col: 1,
                },
                LoraUpdate {
                    a: &a2,
                    b: &b2,
                    scale: 0.5,
                    col: 6,
                },
            ],
        )
        .unwrap();
        let d1 = (x.matmul(&a1.t().unwrap()).unwrap() * 2.0)
            .unwrap()
            .matmul(&b1.t().unwrap())
            .unwrap();
        let d2 = (x.matmul(&a2.t().unwrap()).unwrap() * 0.5)
            .unwrap()
            .matmul(&b2.t().unwrap())
            .unwrap();
        let zero = |w: usize| Tensor::zeros((n, w), DType::F32, &dev).unwrap();
        let want = (&y + Tensor::cat(&[zero(1), d1, zero(1), d2, zero(0)], 1).unwrap()).unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        // An adapter that does not fit is an error, not a write past the row.
        let bad = lora_add_infer(
            &y,
            &x,
            &[LoraUpdate {
                a: &a2,
                b: &b2,
                scale: 1.0,
                col: 7,
            }],
        );
        assert!(bad.is_err());
    }
}
