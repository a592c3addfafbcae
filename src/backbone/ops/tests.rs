//! Each fused kernel against its device-generic twin on the same inputs (the model-level
//! comparisons are in tests/generic_ops.rs).

use super::*;
use candle_core::{Device, Tensor};

fn seq(n: usize, f: f32) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) * f).collect()
}

fn t(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn lora_add_matches_the_two_products_in_each_adapters_columns() {
    let (n, k, m) = (3, 5, 9);
    let y = t(seq(n * m, 0.5), &[n, m]);
    let x = t(seq(n * k, 0.3), &[n, k]);
    // Two adapters (ranks 2 and 3) on columns 1..5 and 6..8; columns 0, 5 stay as they are.
    let (a1, b1) = (t(seq(2 * k, 0.2), &[2, k]), t(seq(4 * 2, 0.1), &[4, 2]));
    let (a2, b2) = (t(seq(3 * k, 0.4), &[3, k]), t(seq(3 * 3, 0.25), &[3, 3]));
    let up = |a, b, scale, col| LoraUpdate {
        a,
        b,
        scale,
        dropout: 0.0,
        col,
    };
    let updates = [up(&a1, &b1, 2.0, 1), up(&a2, &b2, 0.5, 6)];
    let got = infer::lora_add(&y, &x, &updates).unwrap();
    let d1 = (x.matmul(&a1.t().unwrap()).unwrap() * 2.0)
        .unwrap()
        .matmul(&b1.t().unwrap())
        .unwrap();
    let d2 = (x.matmul(&a2.t().unwrap()).unwrap() * 0.5)
        .unwrap()
        .matmul(&b2.t().unwrap())
        .unwrap();
    let zero = |w: usize| Tensor::zeros((n, w), DType::F32, &Device::Cpu).unwrap();
    let want = (&y + Tensor::cat(&[zero(1), d1, zero(1), d2, zero(0)], 1).unwrap()).unwrap();
    assert!(diff(&got, &want) < 1e-5, "{}", diff(&got, &want));
    let generic = generic::lora_add(&y, &x, &updates, None, generic::const_mul).unwrap();
    assert!(diff(&generic, &want) < 1e-5, "{}", diff(&generic, &want));
    // An adapter that does not fit is an error, not a write past the row.
    assert!(infer::lora_add(&y, &x, &[up(&a2, &b2, 1.0, 7)]).is_err());
    assert!(generic::lora_add(&y, &x, &[up(&a2, &b2, 1.0, 7)], None, generic::const_mul).is_err());
}

#[test]
fn row_kernels_match_their_generic_twins() {
    let (b, l, heads, kvh, hd) = (2, 3, 4, 2, 8);
    let w = (heads + 2 * kvh) * hd;
    let rows = t(seq(b * l * w, 0.07), &[b, l, w]);
    let pos = Tensor::from_vec(vec![0u32, 1, 2, 4, 5, 6], (b, l), &Device::Cpu).unwrap();
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 100f32.powf(i as f32 / 4.0))
        .collect();
    let (cos, sin) = rope_tables(&pos, &inv).unwrap();
    // The stacked rows' kernels against one projection split into heads, as graphs run them.
    let fast = infer::rope_rows(&rows, &cos, &sin, heads + kvh, hd).unwrap();
    assert!(diff(&fast, &rows) > 1e-2);
    for (start, n, rotated) in [
        (0, heads, true),
        (heads, kvh, true),
        (heads + kvh, kvh, false),
    ] {
        let part = rows.narrow(2, start * hd, n * hd).unwrap();
        let rope = rotated.then_some((&cos, &sin));
        let (f, g) = (
            infer::take_heads(&fast, start, n, hd).unwrap(),
            generic::heads(&part, n, hd, None, rope).unwrap(),
        );
        assert_eq!(f.dims(), g.dims());
        assert!(diff(&f, &g) < 1e-6, "{}", diff(&f, &g));
    }
    let gu = t(seq(b * l * 2 * w, 0.3), &[b, l, 2 * w]);
    let (f, g) = (
        infer::silu_mul_rows(&gu).unwrap(),
        train::silu_mul(&gu.narrow(2, 0, w).unwrap(), &gu.narrow(2, w, w).unwrap()).unwrap(),
    );
    assert!(diff(&f, &g) < 1e-6, "{}", diff(&f, &g));
    let bias = t(seq(w, 0.2), &[w]);
    let (f, g) = (
        infer::add(&rows, &bias).unwrap(),
        generic::const_add(&rows, &bias).unwrap(),
    );
    assert_eq!(diff(&f, &g), 0.0);
}

#[test]
fn attention_and_linear_kernels_match_their_generic_twins() {
    let (b, past, l, heads, kvh, hd) = (2, 4, 3, 4, 2, 8);
    let tt = past + l;
    let w = heads * hd;
    let q = t(seq(b * l * w, 0.11), &[b, l, w]);
    let q_heads = generic::heads(&q, heads, hd, None, None).unwrap();
    let k = t(seq(b * kvh * tt * hd, 0.05), &[b, kvh, tt, hd]);
    let v = t(seq(b * kvh * tt * hd, 0.09), &[b, kvh, tt, hd]);
    // A padded key in the cache of row 0, a left-padded row 1; no padding query.
    let mask = vec![vec![1, 0, 1, 1, 1, 1, 1], vec![0, 0, 1, 1, 1, 1, 1]];
    let dev = Device::Cpu;
    let spec = |k: Kernels| {
        Ops::new(k, false, DType::F32, &dev)
            .attn_spec((heads, kvh, hd), &mask, past, l, DType::F32, &dev)
            .unwrap()
    };
    let (sf, sg) = (spec(Kernels::Fused), spec(Kernels::Generic));
    let f = infer::attention(&q, &k, &v, &sf).unwrap();
    let g = generic::attention(&q_heads, &k, &v, &sg, sg.bias.as_ref().unwrap()).unwrap();
    assert!(diff(&f, &g) < 1e-6, "{}", diff(&f, &g));
    // Linear: packed, row-major and generic products of 1, 20 and 60 rows.
    let (m, kk) = (40, 24);
    let wt = t(seq(m * kk, 0.02), &[m, kk]);
    for n in [1, 20, 60] {
        let x = t(seq(n * kk, 0.13), &[1, n, kk]);
        let cell = OnceLock::new();
        let want = generic::frozen_linear(&x, &wt, None).unwrap();
        let packed = Ops::new(Kernels::Fused, false, DType::F32, &dev)
            .linear(&x, &wt, Some(&cell))
            .unwrap();
        let rowmajor = Ops::new(Kernels::FusedUnpacked, false, DType::F32, &dev)
            .linear(&x, &wt, Some(&cell))
            .unwrap();
        assert!(cell.get().is_some(), "the packed copy was not used");
        assert_eq!(packed.dims(), &[1, n, m]);
        assert!(diff(&packed, &want) < 1e-5 && diff(&rowmajor, &want) < 1e-5);
    }
}
