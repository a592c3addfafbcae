//! The backbone's tensor ops, with the choice of implementation made here rather than in the
//! model: [`Ops`] is resolved once per forward from the backbone's [`Kernels`] setting, the mode
//! (graph or not), the dtype and the device, and each method runs
//!
//! - the fused f32 CPU kernels ([`infer`], over `backbone::kernels`) when no graph is needed;
//! - the ops with a backward pass ([`train`]) for f32 CPU graphs;
//! - the device-generic Candle-op twins ([`generic`]) everywhere else: other devices, bf16/f16,
//!   and whenever `Kernels::Generic` forces them (which is how the tests check the kernels).
//!
//! All three compute the same function; see docs/DESIGN.md ("Implementation choices that keep the function").

mod generic;
mod infer;
mod train;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};

use super::kernels::{KernelError, PackedWeight};
pub(crate) use infer::Packing;
pub(crate) use train::rope_tables;

/// Which implementation of the backbone's custom ops runs on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// The fused f32 kernels, with panel-packed copies of the frozen weights (made on first
    /// use) for inference matmuls. The default.
    Fused,
    /// The fused kernels reading the weights in place: no second copy of the weights, for
    /// memory-bound runs; decoding is slower (`MEMGEN_PACKED_WEIGHTS=0` in the CLI).
    FusedUnpacked,
    /// Candle ops only: what other devices and dtypes run, forced on the CPU.
    Generic,
}

impl std::str::FromStr for Kernels {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Kernels, String> {
        match s {
            "fused" => Ok(Kernels::Fused),
            "fused-unpacked" | "unpacked" => Ok(Kernels::FusedUnpacked),
            "generic" => Ok(Kernels::Generic),
            other => Err(format!(
                "unknown kernels `{other}` (expected fused, fused-unpacked or generic)"
            )),
        }
    }
}

/// The setting new backbones take (see [`Kernels::set_default`]).
static DEFAULT_KERNELS: AtomicU8 = AtomicU8::new(0);

impl Kernels {
    /// Make `k` the setting of every backbone created from now on (the CLI calls this once at
    /// start-up; a backbone's own `kernels` field can still be changed afterwards).
    pub fn set_default(k: Kernels) {
        DEFAULT_KERNELS.store(k as u8, Ordering::Relaxed);
    }

    /// The setting new backbones take: [`Kernels::Fused`] unless [`Kernels::set_default`] said
    /// otherwise.
    pub fn current_default() -> Kernels {
        match DEFAULT_KERNELS.load(Ordering::Relaxed) {
            1 => Kernels::FusedUnpacked,
            2 => Kernels::Generic,
            _ => Kernels::Fused,
        }
    }
}

/// How one forward runs its ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Fused f32 CPU kernels, no graph; `packed`: matmuls by the packed weight copies.
    Fast { packed: bool },
    /// f32 CPU ops with a backward pass.
    Train,
    /// Candle ops, any device and dtype, with or without a graph.
    Generic,
}

/// The ops of one forward pass (see the module docs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ops {
    path: Path,
}

/// One LoRA adapter for [`Ops::lora_add`]: `dropout(x) Aᵀ · scale · Bᵀ` lands in the output's
/// columns `col..col + B.rows`.
pub(crate) struct LoraUpdate<'a> {
    /// r × in
    pub a: &'a Tensor,
    /// out × r
    pub b: &'a Tensor,
    pub scale: f64,
    pub dropout: f64,
    pub col: usize,
}

/// The queries of [`Ops::attention`]: stacked rows `[q | k | v]` (B × L × W) on the stacked
/// path, whose kernel reads the q heads in place; q heads (B × heads × L × hd) elsewhere.
pub(crate) enum Queries {
    Rows(Tensor),
    Heads(Tensor),
}

/// The attention of one forward: head counts, the cached length, and the mask over all keys.
pub(crate) struct AttnSpec<'a> {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub past: usize,
    pub mask: &'a [Vec<u8>],
    /// The additive bias the generic path attends through (None on the fast path, which reads
    /// `mask` directly).
    bias: Option<Tensor>,
}

fn kernel_error(e: KernelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl Ops {
    pub(crate) fn new(kernels: Kernels, grad: bool, dtype: DType, device: &Device) -> Ops {
        let fused_cpu = kernels != Kernels::Generic && dtype == DType::F32 && device.is_cpu();
        let path = match (fused_cpu, grad) {
            (true, false) => Path::Fast {
                packed: kernels == Kernels::Fused,
            },
            (true, true) => Path::Train,
            (false, _) => Path::Generic,
        };
        Ops { path }
    }

    fn fast(&self) -> bool {
        matches!(self.path, Path::Fast { .. })
    }

    /// Row packing of masked inputs, on the fast path only (elsewhere every row is computed).
    pub(crate) fn packing(&self, mask: &[Vec<u8>], device: &Device) -> Result<Option<Packing>> {
        if self.fast() {
            Packing::new(mask, device)
        } else {
            Ok(None)
        }
    }

    /// The attention of one forward over `mask` (all keys, cached and new) for `l` new queries.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attn_spec<'a>(
        &self,
        (heads, kv_heads, head_dim): (usize, usize, usize),
        mask: &'a [Vec<u8>],
        past: usize,
        l: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<AttnSpec<'a>> {
        let bias = if self.fast() {
            None
        } else {
            Some(generic::attention_bias(mask, past, l, device)?.to_dtype(dtype)?)
        };
        Ok(AttnSpec {
            heads,
            kv_heads,
            head_dim,
            past,
            mask,
            bias,
        })
    }

    /// `x · wᵀ` over the last dimension, `w` frozen (only x gets a gradient); `packed` is where
    /// the fast path keeps (or makes) its packed copy of `w`.
    pub(crate) fn linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        packed: Option<&OnceLock<PackedWeight>>,
    ) -> Result<Tensor> {
        match (self.path, packed) {
            (Path::Fast { packed: true }, Some(cell)) if w.dtype() == DType::F32 => {
                infer::packed_linear(x, w, cell)
            }
            (Path::Fast { .. }, _) => train::frozen_linear(x, w, None, train::SMALL_ROWS_INFER),
            (Path::Train, _) => train::frozen_linear(x, w, None, train::SMALL_ROWS),
            (Path::Generic, _) => generic::frozen_linear(x, w, None),
        }
    }

    /// `y + b` for a bias `b` over the last dimension (a constant: only y gets a gradient).
    pub(crate) fn bias(&self, y: &Tensor, b: &Tensor) -> Result<Tensor> {
        match self.path {
            Path::Fast { .. } => infer::add(y, b),
            Path::Train => train::const_add(y, b),
            Path::Generic => generic::const_add(y, b),
        }
    }

    /// The residual sum `x + y` (same shapes).
    pub(crate) fn residual(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        if self.fast() {
            infer::add(x, y)
        } else {
            x + y
        }
    }

    /// RMSNorm over the last dimension (Candle's kernel on every device, with a backward pass).
    pub(crate) fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        train::rms_norm(x, w, eps)
    }

    /// Whether this path computes q/k/v and gate/up as stacked rows (`[q | k | v]`,
    /// `[gate | up]`: one product each, f32 CPU inference, where the fused row kernels below
    /// pay), or one product per projection split into heads once ([`Ops::heads`]: graphs and
    /// other devices, where slicing rows would cost a full-width gradient per slice).
    pub(crate) fn stacked(&self) -> bool {
        self.fast()
    }

    /// Stacked rows only: Qwen3's per-head RMSNorm of the q and k heads of rows `[q | k | v]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn qk_norm_rows(
        &self,
        qkv: &Tensor,
        qn: &Tensor,
        kn: &Tensor,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        eps: f64,
    ) -> Result<Tensor> {
        infer::qk_norm_rows(qkv, qn, kn, heads, kv_heads, head_dim, eps)
    }

    /// Stacked rows only: rotary embedding of the first `heads` heads of rows (B × L × W).
    pub(crate) fn rope_rows(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        heads: usize,
        head_dim: usize,
    ) -> Result<Tensor> {
        infer::rope_rows(x, cos, sin, heads, head_dim)
    }

    /// Stacked rows only: heads `start..start + n` of rows (B × L × W) as (B × n × L × hd).
    pub(crate) fn take_heads(
        &self,
        x: &Tensor,
        start: usize,
        n: usize,
        hd: usize,
    ) -> Result<Tensor> {
        infer::take_heads(x, start, n, hd)
    }

    /// Stacked rows only: `silu(gate) ∘ up` of the gate/up rows `[gate | up]`.
    pub(crate) fn silu_mul_rows(&self, gate_up: &Tensor) -> Result<Tensor> {
        infer::silu_mul_rows(gate_up)
    }

    /// One projection's output (B × L × n·hd) as heads (B × n × L × hd), with Qwen3's per-head
    /// norm (`norm`: weight, eps) and the rotary embedding (`rope`: cos, sin) applied to them.
    pub(crate) fn heads(
        &self,
        x: &Tensor,
        n: usize,
        hd: usize,
        norm: Option<(&Tensor, f64)>,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        generic::heads(x, n, hd, norm, rope)
    }

    /// `silu(gate) ∘ up`, with a backward pass.
    pub(crate) fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        train::silu_mul(gate, up)
    }

    /// Causal grouped-query attention of `q` over keys and values so far (B × KV × T × hd):
    /// (B × L × heads · hd).
    pub(crate) fn attention(
        &self,
        q: &Queries,
        k: &Tensor,
        v: &Tensor,
        a: &AttnSpec,
    ) -> Result<Tensor> {
        match (q, &a.bias) {
            (Queries::Rows(qkv), None) => infer::attention(qkv, k, v, a),
            (Queries::Heads(q), Some(bias)) => generic::attention(q, k, v, a, bias),
            _ => candle_core::bail!(
                "attention: stacked rows go with the fused path, heads with the bias"
            ),
        }
    }

    /// `y` plus each adapter's update computed from the projections' input `x`; with `rng`
    /// (training), LoRA dropout masks are drawn from it.
    pub(crate) fn lora_add(
        &self,
        y: Tensor,
        x: &Tensor,
        updates: &[LoraUpdate],
        rng: Option<&mut rand::rngs::StdRng>,
    ) -> Result<Tensor> {
        if updates.is_empty() {
            return Ok(y);
        }
        match self.path {
            Path::Fast { .. } => infer::lora_add(&y, x, updates),
            Path::Train => generic::lora_add(&y, x, updates, rng, train::const_mul),
            Path::Generic => generic::lora_add(&y, x, updates, rng, generic::const_mul),
        }
    }
}

#[cfg(test)]
mod tests;
