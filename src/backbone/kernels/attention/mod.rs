//! Causal grouped-query attention for inference, one (row, head) task at a time: a scalar body
//! that every variant is tested against, a 64-wide-head AVX2 kernel for decoding and a blocked
//! AVX2 kernel for many query rows (prefill, the weaver's chunks).

use rayon::prelude::*;

use super::matmul::dot;
use super::{threads, KernelError, Out, PAR_WORK};

/// The shapes of one attention call: queries are the first `heads` heads of contiguous rows
/// (b × l × w); keys and values are (b × heads/rep × t × hd) with the given strides (the last
/// dimension contiguous).
pub(crate) struct AttnDims {
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

impl AttnDims {
    /// Whether `q`, `k`, `v` and `mask` are long enough for these dimensions: every index the
    /// kernels form (including their raw-pointer reads) then stays inside the slices.
    fn check(&self, q: &[f32], k: &[f32], v: &[f32], mask: &[Vec<u8>]) -> Result<(), KernelError> {
        let d = self;
        let bad = |what: String| Err(KernelError::shape("attention", what));
        if d.rep == 0 || !d.heads.is_multiple_of(d.rep) || d.hd == 0 || d.heads * d.hd > d.w {
            return bad(format!(
                "{} heads of {} over rows of {}, rep {}",
                d.heads, d.hd, d.w, d.rep
            ));
        }
        if d.t != d.past + d.l || mask.len() != d.b || mask.iter().any(|m| m.len() != d.t) {
            return bad(format!(
                "mask of {} rows for {} × {} keys",
                mask.len(),
                d.b,
                d.t
            ));
        }
        if q.len() < d.b * d.l * d.w {
            return bad(format!(
                "{} query values for {} × {} × {}",
                q.len(),
                d.b,
                d.l,
                d.w
            ));
        }
        if d.b == 0 || d.t == 0 {
            return Ok(());
        }
        // One past the last value a kernel reads: the last position of the last kv head.
        let kvh = d.heads / d.rep;
        let end = |s: &[usize; 3]| (d.b - 1) * s[0] + (kvh - 1) * s[1] + (d.t - 1) * s[2] + d.hd;
        if k.len() < end(&d.ks) || v.len() < end(&d.vs) {
            return bad(format!(
                "{} keys / {} values too few for the strides",
                k.len(),
                v.len()
            ));
        }
        Ok(())
    }
}

/// From this many query rows per task on, attention runs blocked over queries
/// ([`avx::head_many`]); decoding (1 row) keeps the one-query kernels.
const MANY_QUERIES: usize = 8;

/// Causal grouped-query attention over f32 slices (see [`AttnDims`]); query i sits at position
/// `past + i` and sees key j when j ≤ past + i and `mask[b][j] != 0`. A query that sees no key
/// averages all t values, as adding an `f32::MIN` bias everywhere and taking the softmax does;
/// a padding query (its own slot masked) is skipped and left 0. Output: (b × l × heads · hd).
pub(crate) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: &AttnDims,
    mask: &[Vec<u8>],
) -> Result<Vec<f32>, KernelError> {
    d.check(q, k, v, mask)?;
    let width = d.heads * d.hd;
    let mut y = vec![0f32; d.b * d.l * width];
    let out = Out(y.as_mut_ptr());
    let run = |task: usize| {
        let (bi, h) = (task / d.heads, task % d.heads);
        // SAFETY: `check` bounded every read by the slices; task (bi, h) writes only
        // y[bi, .., h·hd..(h+1)·hd], which no other task touches, and y outlives the tasks.
        unsafe { head(q, k, v, d, &mask[bi], bi, h, out.ptr()) }
    };
    let tasks = d.b * d.heads;
    let work = tasks * d.l * d.t.min(d.past + d.l) * d.hd * 2;
    if work >= PAR_WORK && threads() > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
    Ok(y)
}

/// One (row, head) task: the widest kernel this CPU runs.
///
/// # Safety
/// `d` was checked against `q`, `k`, `v` and `mask` by `AttnDims::check`, `bi < d.b`, `h < d.heads`,
/// and `y` points to d.b·d.l·d.heads·d.hd writable floats whose (bi, h) slots no other thread
/// touches during the call.
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

/// [`head`] by the AVX2 kernels where the shapes suit them.
///
/// # Safety
/// As [`head`], and the CPU must support AVX2 and FMA.
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
    head_body(q, k, v, d, mask, bi, h, y, |p, m| {
        super::x86::exp_shifted(p, m)
    })
}

/// `p[j] = exp(p[j] − shift)`; −∞ gives 0.
fn exp_shifted(p: &mut [f32], shift: f32) {
    p.iter_mut().for_each(|e| *e = (*e - shift).exp());
}

/// The portable body: per query, scores, one pass of `exp`, and the weighted sum of values.
///
/// # Safety
/// `d` was checked against `q`, `k`, `v` and `mask` by `AttnDims::check`, `bi < d.b`, `h < d.heads`,
/// and `y` points to d.b·d.l·d.heads·d.hd writable floats whose (bi, h) slots no other thread
/// touches during the call.
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

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::super::x86::{exp_shifted, hmax, hsum};
    use std::arch::x86_64::*;

    /// [`super::head_body`] for 64-wide heads (SmolLM2, Qwen2.5-0.5B): the query row and the
    /// output accumulator live in registers, and scores are taken four keys at a time, so
    /// the four dot products' FMA chains overlap and share one horizontal reduction.
    ///
    /// # Safety
    /// As [`super::head`], with `d.hd == 64`, and the CPU must support AVX2 and FMA.
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
    ///
    /// # Safety
    /// As [`super::head`], with `d.hd % 16 == 0`, and the CPU must support AVX2 and FMA.
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
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `qb` holds R rows of `hd`, `kt` hd × 16 values, and `out` has
    /// R rows of `ld ≥ 16` writable floats.
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
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
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
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests;
