//! AVX2/FMA building blocks shared by the matmul and attention kernels: a vectorised `exp`
//! (softmax) and horizontal reductions.
//!
//! Every function here needs AVX2 and FMA: calling one on a CPU without them is undefined
//! behaviour, so each is an `unsafe fn` that its callers reach only after
//! `is_x86_feature_detected!("avx2")` and `("fma")` returned true.

use std::arch::x86_64::*;

/// `p[j] = exp(p[j] − shift)`, eight at a time; −∞ (and anything below −87.3) gives 0.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp_shifted(p: &mut [f32], shift: f32) {
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
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp8(x: __m256) -> __m256 {
    let lo = _mm256_set1_ps(-87.336_55);
    let hi = _mm256_set1_ps(88.376_26);
    let xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
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

/// # Safety
/// The CPU must support AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn hmax(a: __m256) -> f32 {
    let m4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)))
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn hsum(a: __m256) -> f32 {
    let hi = _mm256_extractf128_ps(a, 1);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(a), hi);
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    _mm_cvtss_f32(s1)
}
