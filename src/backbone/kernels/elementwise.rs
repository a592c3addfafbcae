//! One-pass elementwise kernels between the matrix products of a block: each replaces a chain of
//! small Candle ops (their temporaries, thread-pool wake-ups and `.contiguous()` copies) with the
//! same arithmetic in one pass over the data.

use rayon::prelude::*;

use super::matmul::dot;
use super::{threads, KernelError, PAR_ELEMS, PAR_WORK};

/// `a + b` for equal lengths, or `b` a bias added to every row of `a` (rows of `b.len()`).
pub(crate) fn add(a: &[f32], b: &[f32]) -> Result<Vec<f32>, KernelError> {
    if a.len() == b.len() {
        return Ok(a.iter().zip(b).map(|(x, y)| x + y).collect());
    }
    let w = b.len();
    if w == 0 || !a.len().is_multiple_of(w) {
        return Err(KernelError::shape(
            "add",
            format!("cannot broadcast {w} over {}", a.len()),
        ));
    }
    let mut y = Vec::with_capacity(a.len());
    for row in a.chunks_exact(w) {
        y.extend(row.iter().zip(b).map(|(x, y)| x + y));
    }
    Ok(y)
}

/// `silu(g) · u` for rows `[g | u]` of width `2w`: rows of width `w`.
pub(crate) fn silu_mul(x: &[f32], w2: usize) -> Result<Vec<f32>, KernelError> {
    if !w2.is_multiple_of(2)
        || (w2 == 0 && !x.is_empty())
        || (w2 > 0 && !x.len().is_multiple_of(w2))
    {
        return Err(KernelError::shape(
            "silu-mul",
            format!("{} values in rows of {w2}", x.len()),
        ));
    }
    let w = w2 / 2;
    let rows = x.len().checked_div(w2).unwrap_or(0);
    let mut y = vec![0f32; rows * w];
    let f = |(src, dst): (&[f32], &mut [f32])| {
        let (g, u) = src.split_at(w);
        for ((d, &g), &u) in dst.iter_mut().zip(g).zip(u) {
            // Candle's silu: x / (1 + exp(-x)).
            *d = g / (1.0 + (-g).exp()) * u;
        }
    };
    if rows * w >= PAR_ELEMS && threads() > 1 {
        x.par_chunks(w2).zip(y.par_chunks_mut(w)).for_each(f);
    } else if w > 0 {
        x.chunks(w2).zip(y.chunks_mut(w)).for_each(f);
    }
    Ok(y)
}

/// Rotary embedding (Hugging Face `rotate_half`) of the first `heads` heads of each row of `x`
/// (rows of `w`), with one row of `cos`/`sin` (hd/2 each) per row of `x`; the rest of each row is
/// copied as is.
pub(crate) fn rope_rows(
    x: &[f32],
    w: usize,
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    hd: usize,
) -> Result<Vec<f32>, KernelError> {
    let half = hd / 2;
    let rows = x.len().checked_div(w).unwrap_or(0);
    if rows * w != x.len() || cos.len() != rows * half || sin.len() != cos.len() || heads * hd > w {
        return Err(KernelError::shape(
            "rope",
            "tables or width do not match the input",
        ));
    }
    let mut y = x.to_vec();
    if w == 0 || half == 0 {
        return Ok(y);
    }
    for (r, row) in y.chunks_exact_mut(w).enumerate() {
        let (c, s) = (
            &cos[r * half..(r + 1) * half],
            &sin[r * half..(r + 1) * half],
        );
        for head in row[..heads * hd].chunks_exact_mut(hd) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, bb) = (x1[i], x2[i]);
                x1[i] = a * c[i] - bb * s[i];
                x2[i] = bb * c[i] + a * s[i];
            }
        }
    }
    Ok(y)
}

/// Heads `start..start + n` (each `hd` wide) of rows (b × len × w), as (b × n × len × hd).
pub(crate) fn take_heads(
    x: &[f32],
    (b, len, w): (usize, usize, usize),
    start: usize,
    n: usize,
    hd: usize,
) -> Result<Vec<f32>, KernelError> {
    if (start + n) * hd > w || x.len() != b * len * w {
        return Err(KernelError::shape("take-heads", "heads out of range"));
    }
    let mut y = Vec::with_capacity(b * n * len * hd);
    for bi in 0..b {
        for h in start..start + n {
            for i in 0..len {
                let o = (bi * len + i) * w + h * hd;
                y.extend_from_slice(&x[o..o + hd]);
            }
        }
    }
    Ok(y)
}

/// One LoRA adapter, read in place: `a` (r × k), `b` (w × r) row-major; its update
/// `x Aᵀ · scale · Bᵀ` lands in output columns `col..col + w`.
pub(crate) struct LoraSlices<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub r: usize,
    pub w: usize,
    pub scale: f32,
    pub col: usize,
}

/// `y` (n × m) plus every adapter's update from `x` (n × k), in one pass per row. Per row the
/// rank-r product `x Aᵀ` is taken once and scaled, then multiplied into the adapter's columns:
/// the order of the graph path, so both round alike.
pub(crate) fn lora_add(
    y: &[f32],
    m: usize,
    x: &[f32],
    k: usize,
    adapters: &[LoraSlices],
) -> Result<Vec<f32>, KernelError> {
    let n = y.len().checked_div(m).unwrap_or(0);
    let fits = |u: &LoraSlices| u.a.len() == u.r * k && u.b.len() == u.w * u.r && u.col + u.w <= m;
    if n * m != y.len() || x.len() != n * k || !adapters.iter().all(fits) {
        return Err(KernelError::shape(
            "lora-add",
            "adapters do not fit the rows",
        ));
    }
    let mut out = y.to_vec();
    if m == 0 {
        return Ok(out);
    }
    let rank = adapters.iter().map(|u| u.r).max().unwrap_or(0);
    let width = adapters.iter().map(|u| u.w).max().unwrap_or(0);
    // B transposed (r × w): the second product then runs along the output columns in
    // contiguous, vectorisable rows instead of one rank-long dot product per column.
    let bt: Vec<Vec<f32>> = adapters
        .iter()
        .map(|u| {
            let mut t = vec![0f32; u.r * u.w];
            for c in 0..u.w {
                for j in 0..u.r {
                    t[j * u.w + c] = u.b[c * u.r + j];
                }
            }
            t
        })
        .collect();
    let row = |i: usize, o: &mut [f32]| {
        let xi = &x[i * k..(i + 1) * k];
        let mut t = vec![0f32; rank];
        let mut delta = vec![0f32; width];
        for (u, ad) in adapters.iter().enumerate() {
            for (j, tj) in t[..ad.r].iter_mut().enumerate() {
                *tj = dot(xi, &ad.a[j * k..(j + 1) * k]) * ad.scale;
            }
            let d = &mut delta[..ad.w];
            d.fill(0.0);
            for (j, &tj) in t[..ad.r].iter().enumerate() {
                for (dc, bv) in d.iter_mut().zip(&bt[u][j * ad.w..(j + 1) * ad.w]) {
                    *dc += tj * bv;
                }
            }
            for (oc, dc) in o[ad.col..ad.col + ad.w].iter_mut().zip(d.iter()) {
                *oc += dc;
            }
        }
    };
    let work = n * adapters.iter().map(|u| u.r * (k + u.w)).sum::<usize>();
    if work >= PAR_WORK && threads() > 1 {
        out.par_chunks_mut(m)
            .enumerate()
            .for_each(|(i, o)| row(i, o));
    } else {
        out.chunks_mut(m).enumerate().for_each(|(i, o)| row(i, o));
    }
    Ok(out)
}
