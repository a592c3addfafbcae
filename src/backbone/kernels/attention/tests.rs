//! Every AVX2 attention kernel and the vectorised exp against the portable scalar body.

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
///
/// # Safety
/// `fast` may need CPU features: the caller has checked them.
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
fn dims(b: usize, l: usize, past: usize, heads: usize, kvh: usize, hd: usize) -> super::AttnDims {
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
            unsafe { agrees_with_generic(super::avx::head64, &q, &k, &v, &d, row_mask, bi, h) };
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
                    agrees_with_generic(super::avx::head_many, &q, &k, &v, &d, row_mask, bi, h)
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
    unsafe { super::super::x86::exp_shifted(&mut got, 0.0) };
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
    // SAFETY: the CPU has AVX2 and FMA (checked above).
    unsafe { super::super::x86::exp_shifted(&mut p, 2.0) };
    for (g, w) in p.iter().zip(&want) {
        assert!((g - w).abs() <= 2e-7 * w, "{g} vs {w}");
    }
}
