//! How the process's allocator treats freed memory.
//!
//! Candle gives every op's output a fresh buffer, and a training step frees and reallocates
//! hundreds of buffers of tens of MB (MLP activations, attention scores). glibc's mmap threshold
//! starts at 128 KiB and only adapts upwards as mapped blocks are freed, never past 32 MiB, so
//! early buffers and every buffer above 32 MiB go through `mmap`/`munmap` and are faulted in and
//! zeroed by the kernel page by page again on every op.
//!
//! A fixed 256 MiB threshold and no trimming serve every buffer below that size from the heap,
//! whose freed pages stay mapped for the next op; only the rare larger blocks (the answer tokens'
//! logits of a big-vocabulary model) are still mapped, so they never fragment the heap. Measured
//! on a Qwen2.5-0.5B GSM8K SFT run from one checkpoint, quiet machine (docs/EXPERIMENTS.md,
//! "Allocator"): 32.0 s per step against glibc's 34.1, the same 18.4 GB peak, identical losses.
//! Serving even the largest blocks from the heap was no faster and peaked higher.

/// Serve buffers below 256 MiB from the heap and keep freed heap pages mapped (glibc only;
/// other allocators already cache freed pages). The `memgen` binary calls it first thing; a
/// program using the library may too, before any thread starts. It changes speed, never results.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; both values are in range for glibc (2.36
    // accepts thresholds up to i32::MAX, and any positive trim threshold), and no other thread
    // allocates yet. A rejected value (return 0) leaves glibc's defaults, which are correct,
    // only slower, so the results are not checked.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
