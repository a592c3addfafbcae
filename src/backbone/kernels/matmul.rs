//! `x · wᵀ` against a row-major frozen weight for a few input rows (decoding, small training
//! batches): each weight row is streamed once and dotted with every input row.

use rayon::prelude::*;

use super::{threads, KernelError, Out, PAR_WORK};

/// `y (n × m) = x (n × k) · w (m × k)ᵀ`, streaming each weight row once: a few rows against a
/// row-major weight (decoding), where gemm's packing costs more than the work.
pub(crate) fn linear_small(
    x: &[f32],
    n: usize,
    k: usize,
    w: &[f32],
    m: usize,
) -> Result<Vec<f32>, KernelError> {
    if x.len() != n * k || w.len() != m * k {
        return Err(KernelError::shape(
            "linear-small",
            format!(
                "x has {} values for {n} × {k}, w {} for {m} × {k}",
                x.len(),
                w.len()
            ),
        ));
    }
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
    Ok(y)
}

/// Columns `j0..j1` of `y (n × m) = x · wᵀ`.
///
/// # Safety
/// `x` holds n·k values, `w` m·k, `j0 ≤ j1 ≤ m`, and `y` points to n·m writable floats of which no
/// other thread touches columns `j0..j1` during the call.
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

/// `a · b` (equal lengths), eight lanes at a time (the compiler vectorises the lanes).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::super::x86::hsum;
    use std::arch::x86_64::*;

    /// [`super::linear_cols`] with AVX2/FMA: register tiles of weight rows × input rows.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` holds n·k values, `w` m·k, `j0 ≤ j1 ≤ m`, and `y` points to
    /// n·m writable floats whose columns `j0..j1` no other thread touches during the call.
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
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` and `w` point to k readable floats, `y` to one writable.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_dot(x: *const f32, k: usize, w: *const f32, y: *mut f32) {
        let mut a = [_mm256_setzero_ps(); 4];
        let k32 = k / 32 * 32;
        let mut p = 0;
        while p < k32 {
            for (u, au) in a.iter_mut().enumerate() {
                let o = p + 8 * u;
                *au = _mm256_fmadd_ps(_mm256_loadu_ps(w.add(o)), _mm256_loadu_ps(x.add(o)), *au);
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

    /// # Safety
    /// The CPU must support AVX2 and FMA; rows `i..i+R` of `x` (k wide) and `j..j+C` of `w` exist, and
    /// `y` (m wide) has room for them.
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
