//! The raw f32 CPU kernels behind the backbone's fused inference ops: matrix products against
//! frozen weights (row-major and panel-packed), attention, and the elementwise passes between
//! them. Each kernel takes slices and returns a fresh `Vec`; the `unsafe` (SIMD intrinsics, raw
//! output pointers shared by worker threads) stays inside this module, behind checks of the
//! slices' lengths. The Candle glue (custom ops, layouts, dtypes) lives in `backbone::ops`.
//!
//! Every kernel has a portable scalar body; on x86-64 an AVX2/FMA (or AVX-512) variant is chosen
//! at run time when the CPU has it. See docs/DESIGN.md ("Implementation choices that keep the function").

mod attention;
mod elementwise;
mod matmul;
mod packed;
#[cfg(target_arch = "x86_64")]
mod x86;

pub(crate) use attention::{attention, AttnDims};
pub(crate) use elementwise::{add, lora_add, rope_rows, silu_mul, take_heads, LoraSlices};
pub(crate) use matmul::linear_small;
pub use packed::PackedWeight;

/// Below this many multiply-adds a kernel runs on the calling thread: waking the pool costs
/// more than it saves.
pub(crate) const PAR_WORK: usize = 1 << 18;
/// The same for elementwise passes.
pub(crate) const PAR_ELEMS: usize = 1 << 16;

pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
}

/// Why a kernel refused its input: the slices do not have the lengths the dimensions promise.
/// The ops layer checks shapes first, so this is a bug guard, turned into a Candle error there.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{kernel}: {what}")]
    Shape { kernel: &'static str, what: String },
}

impl KernelError {
    fn shape(kernel: &'static str, what: impl Into<String>) -> KernelError {
        KernelError::Shape {
            kernel,
            what: what.into(),
        }
    }
}

/// A pointer into an output buffer that tasks write disjoint parts of.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes a disjoint set of elements, and the buffer outlives the tasks (each
// kernel joins its tasks before returning the buffer).
unsafe impl Send for Out {}
// SAFETY: as above; the pointer itself is never used to read what another task writes.
unsafe impl Sync for Out {}
impl Out {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}
