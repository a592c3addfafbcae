//! How the process's allocator treats freed memory.
//!
//! Candle gives every op's output a fresh buffer, and a training step frees and reallocates
//! hundreds of buffers of tens to hundreds of MB (MLP activations, attention scores, the answer
//! tokens' logits). glibc serves every buffer above its mmap threshold (which it never raises
//! past 32 MiB) with `mmap` and returns it with `munmap` on free, so the next op's buffer is
//! faulted in and zeroed by the kernel page by page again. On a Qwen2.5-0.5B GSM8K SFT step at
//! batch 4 that was a third of the CPU time (docs/EXPERIMENTS.md, "Allocator").
//!
//! Serving every allocation from the heap, and not trimming the heap, keeps freed pages mapped
//! for the next op: the step ran 1.5x faster. The price is resident memory. Freed blocks stay in
//! the heap, and a large block that fits no free hole extends it, so the peak creeps up over a
//! run: on that GSM8K run it reached 19.4 GB by step 64, against 14.2 GB over the first two
//! steps (13.9 GB with glibc's defaults, which were not followed further). A run that must stay
//! under a tight memory limit sets `MEMGEN_KEEP_FREED_MEMORY=0`.

/// Keep freed memory mapped for reuse instead of returning it to the kernel (glibc only; other
/// allocators already cache freed pages). The `memgen` binary calls it first thing; a program
/// using the library should too, before any thread starts. It changes speed and resident memory,
/// never results. `MEMGEN_KEEP_FREED_MEMORY=0` leaves glibc's defaults (smaller resident set
/// between the peaks of a step, slower steps).
pub fn keep_freed_memory() {
    if std::env::var("MEMGEN_KEEP_FREED_MEMORY").is_ok_and(|v| v == "0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; both values are in range for glibc (0
    // disables mmap-backed allocations, the trim threshold is any positive int), and no other
    // thread allocates yet. A rejected value (return 0) leaves glibc's defaults, which are
    // correct, only slower — so the results are not checked.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
