//! The teacher-forced forward used by SFT and by GRPO scoring: every row's memories are woven in
//! order (each may read the ones before it), spliced into the reasoner's input, and the outputs are
//! realigned one-to-one with the original tokens (docs/DESIGN.md, "The SFT loss").
//!
//! Rows are processed together: round r weaves every row's r-th memory in one weaver call, the
//! weaver reading the context through its KV cache (so it never re-reads a prefix), and the reasoner
//! reads the prompt prefix — which nothing trainable precedes — without building a graph.

use candle_core::{DType, IndexOp, Tensor, D};

use super::weaver::Context;
use super::{Kind, MemGenModel, Point};
use crate::backbone::model::positions_tensor;
use crate::backbone::Mode;

/// One sequence to score: its tokens, which of them carry loss, and where memories go.
#[derive(Debug, Clone, PartialEq)]
pub struct TfRow {
    pub tokens: Vec<u32>,
    /// `loss_mask[i]`: token i is a target (an answer token).
    pub loss_mask: Vec<bool>,
    /// Sorted; each `pos` in 1..tokens.len().
    pub points: Vec<Point>,
}

/// Hidden states aligned with the original tokens: `hidden[b, i]` is the reasoner's final hidden
/// state that predicts `tokens[i + 1]` (for a latent block right before token i+1, the state at
/// its last latent). Rows shorter than the longest are padded at the end.
pub struct TfOutput {
    pub hidden: Tensor,
    pub lens: Vec<usize>,
}

fn check_rows(rows: &[TfRow]) -> anyhow::Result<()> {
    for (b, r) in rows.iter().enumerate() {
        if r.tokens.is_empty() || r.loss_mask.len() != r.tokens.len() {
            anyhow::bail!("row {b}: empty, or loss mask length differs from tokens");
        }
        let mut last = 0;
        for p in &r.points {
            if p.pos == 0 || p.pos >= r.tokens.len() || p.pos <= last {
                anyhow::bail!(
                    "row {b}: insertion points must be increasing and inside the sequence"
                );
            }
            last = p.pos;
        }
    }
    Ok(())
}

impl MemGenModel {
    pub fn teacher_forced(&self, rows: &[TfRow], mode: &mut Mode) -> anyhow::Result<TfOutput> {
        check_rows(rows)?;
        let dev = self.reasoner.device().clone();
        let dtype = self.reasoner.dtype();
        let d = self.reasoner.hidden_size();
        let b = rows.len();
        let lens: Vec<usize> = rows.iter().map(|r| r.tokens.len()).collect();
        let n_max = *lens.iter().max().unwrap_or(&0);

        // Frozen token embeddings of every row (no graph).
        let padded: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                let mut v = r.tokens.clone();
                v.resize(n_max, self.tokenizer.pad_id);
                v
            })
            .collect();
        let emb = self
            .reasoner
            .embed(&Tensor::from_vec(padded.concat(), (b, n_max), &dev)?)?;
        let emb_row = |r: usize, s: usize, e: usize| emb.i((r, s..e, ..));

        // ---- Weaver: round r weaves every row's r-th memory. ----
        // Zero-length memories need no weaving at all.
        let weaving = self.weaver.k(Kind::Prompt) > 0 || self.weaver.k(Kind::Inference) > 0;
        let rounds = if weaving {
            rows.iter().map(|r| r.points.len()).max().unwrap_or(0)
        } else {
            0
        };
        let mut latents: Vec<Vec<Tensor>> = vec![vec![]; b];
        let mut wcache = self.weaver.backbone.new_cache(b);
        let mut seg_start = vec![0usize; b];
        let mut n_real = vec![0u32; b];
        for round in 0..rounds {
            // Each row's new context: the previous memory's latents, then tokens up to this point.
            let mut segs: Vec<Option<Tensor>> = vec![];
            let mut seg_len = vec![0usize; b];
            for (r, row) in rows.iter().enumerate() {
                let Some(pt) = row.points.get(round) else {
                    segs.push(None);
                    continue;
                };
                let mut parts = vec![];
                if round > 0 {
                    parts.push(latents[r][round - 1].clone());
                }
                if pt.pos > seg_start[r] {
                    parts.push(emb_row(r, seg_start[r], pt.pos)?);
                }
                let seg = if parts.is_empty() {
                    None
                } else {
                    Some(Tensor::cat(&parts, 0)?)
                };
                seg_len[r] = seg.as_ref().map(|s| s.dim(0)).transpose()?.unwrap_or(0);
                segs.push(seg);
            }
            let s_max = *seg_len.iter().max().unwrap_or(&0);
            let mut xs = vec![];
            let mut mask = vec![];
            let mut pos = vec![];
            for r in 0..b {
                let hole = s_max - seg_len[r];
                let mut row_parts = vec![];
                if hole > 0 {
                    row_parts.push(Tensor::zeros((hole, d), dtype, &dev)?);
                }
                if let Some(s) = &segs[r] {
                    row_parts.push(s.to_dtype(dtype)?);
                }
                if s_max > 0 {
                    xs.push(if row_parts.len() == 1 {
                        row_parts.pop().unwrap()
                    } else {
                        Tensor::cat(&row_parts, 0)?
                    });
                }
                let mut m = vec![0u8; hole];
                m.extend(std::iter::repeat_n(1u8, seg_len[r]));
                let mut p = vec![0u32; hole];
                p.extend((0..seg_len[r] as u32).map(|i| n_real[r] + i));
                n_real[r] += seg_len[r] as u32;
                mask.push(m);
                pos.push(p);
            }
            let kinds: Vec<Option<Kind>> = rows
                .iter()
                .map(|row| row.points.get(round).map(|p| p.kind))
                .collect();
            let x = if s_max > 0 {
                Some(Tensor::stack(&xs, 0)?)
            } else {
                None
            };
            let out = self.weaver.weave(
                &mut wcache,
                x.as_ref().map(|embeds| Context {
                    embeds,
                    mask: &mask,
                    positions: &pos,
                }),
                &kinds,
                &n_real,
                mode,
            )?;
            let k_max = out.dim(1)?;
            for (r, kind) in kinds.iter().enumerate() {
                if let Some(kind) = kind {
                    let k = self.weaver.k(*kind);
                    latents[r].push(out.i((r, k_max - k.., ..))?);
                    seg_start[r] = rows[r].points[round].pos;
                }
            }
        }

        // ---- Reasoner: the prompt prefix without a graph, the rest in `mode`. ----
        let prefix: Vec<usize> = rows
            .iter()
            .map(|r| r.points.first().map(|p| p.pos).unwrap_or(r.tokens.len()))
            .collect();
        let lp = *prefix.iter().max().unwrap_or(&0);
        let mut rcache = self.reasoner.new_cache(b);
        let pids: Vec<Vec<u32>> = rows
            .iter()
            .zip(&prefix)
            .map(|(r, &p)| {
                let mut v = vec![self.tokenizer.pad_id; lp - p];
                v.extend_from_slice(&r.tokens[..p]);
                v
            })
            .collect();
        let pmask: Vec<Vec<u8>> = prefix
            .iter()
            .map(|&p| {
                let mut v = vec![0u8; lp - p];
                v.extend(std::iter::repeat_n(1u8, p));
                v
            })
            .collect();
        let ppos: Vec<Vec<u32>> = prefix
            .iter()
            .map(|&p| {
                let mut v = vec![0u32; lp - p];
                v.extend(0..p as u32);
                v
            })
            .collect();
        let px = self
            .reasoner
            .embed(&Tensor::from_vec(pids.concat(), (b, lp), &dev)?)?;
        let hp = self.reasoner.forward(
            &px,
            &pmask,
            &positions_tensor(&ppos, &dev)?,
            Some(&mut rcache),
            &mut Mode::Infer,
        )?;
        // The rest of each row: [latents, tokens, latents, tokens, …], right-padded.
        // `src[r][i]` = flat index (into [prefix ; rest]) of the state predicting token i+1.
        let mut src: Vec<Vec<usize>> = vec![vec![0; n_max]; b];
        let mut rest_rows: Vec<Vec<Tensor>> = vec![vec![]; b];
        let mut rest_len = vec![0usize; b];
        for (r, row) in rows.iter().enumerate() {
            for (i, s) in src[r].iter_mut().enumerate().take(prefix[r]) {
                *s = r * lp + (lp - prefix[r]) + i;
            }
            let mut off = 0usize;
            for (j, pt) in row.points.iter().enumerate() {
                let k = latents[r]
                    .get(j)
                    .map(|l| l.dim(0))
                    .transpose()?
                    .unwrap_or(0);
                if k > 0 {
                    let lat = &latents[r][j];
                    rest_rows[r].push(lat.to_dtype(dtype)?);
                    off += k;
                    // The last latent predicts the token after the block.
                    src[r][pt.pos - 1] = usize::MAX - (off - 1);
                }
                let end = row
                    .points
                    .get(j + 1)
                    .map(|p| p.pos)
                    .unwrap_or(row.tokens.len());
                rest_rows[r].push(emb_row(r, pt.pos, end)?);
                for s in &mut src[r][pt.pos..end] {
                    *s = usize::MAX - off;
                    off += 1;
                }
            }
            rest_len[r] = off;
        }
        let lr = *rest_len.iter().max().unwrap_or(&0);
        let flat_prefix = hp.reshape((b * lp, d))?;
        let flat = if lr > 0 {
            let mut xs = vec![];
            let mut mask = vec![];
            let mut pos = vec![];
            for r in 0..b {
                let mut parts = std::mem::take(&mut rest_rows[r]);
                let hole = lr - rest_len[r];
                if hole > 0 {
                    parts.push(Tensor::zeros((hole, d), dtype, &dev)?);
                }
                xs.push(Tensor::cat(&parts, 0)?);
                let mut m = vec![1u8; rest_len[r]];
                m.extend(std::iter::repeat_n(0u8, hole));
                let mut p: Vec<u32> = (0..rest_len[r] as u32)
                    .map(|i| prefix[r] as u32 + i)
                    .collect();
                p.extend(std::iter::repeat_n(0u32, hole));
                mask.push(m);
                pos.push(p);
            }
            let x = Tensor::stack(&xs, 0)?;
            let hr = self.reasoner.forward(
                &x,
                &mask,
                &positions_tensor(&pos, &dev)?,
                Some(&mut rcache),
                mode,
            )?;
            Tensor::cat(&[flat_prefix, hr.reshape((b * lr, d))?], 0)?
        } else {
            flat_prefix
        };
        // Resolve rest offsets (encoded as usize::MAX - offset) to flat indices.
        let base_rest = b * lp;
        let mut idx = Vec::with_capacity(b * n_max);
        for (r, s) in src.iter().enumerate() {
            for (i, &v) in s.iter().enumerate() {
                let flat_i = if i >= lens[r] {
                    0
                } else if v > usize::MAX / 2 {
                    base_rest + r * lr + (usize::MAX - v)
                } else {
                    v
                };
                idx.push(flat_i as u32);
            }
        }
        let idx = Tensor::from_vec(idx, b * n_max, &dev)?;
        let hidden = flat.index_select(&idx, 0)?.reshape((b, n_max, d))?;
        Ok(TfOutput { hidden, lens })
    }

    /// Log-probabilities of every target token (`loss_mask[i+1]`), in row order, with their (row, index).
    pub fn target_logprobs(
        &self,
        rows: &[TfRow],
        out: &TfOutput,
    ) -> anyhow::Result<(Tensor, Vec<(usize, usize)>)> {
        let dev = self.reasoner.device().clone();
        let (b, n_max, d) = out.hidden.dims3()?;
        let mut sel = vec![];
        let mut tgt = vec![];
        let mut at = vec![];
        for (r, row) in rows.iter().enumerate() {
            for i in 0..row.tokens.len().saturating_sub(1) {
                if row.loss_mask[i + 1] {
                    sel.push((r * n_max + i) as u32);
                    tgt.push(row.tokens[i + 1]);
                    at.push((r, i + 1));
                }
            }
        }
        debug_assert_eq!(b, rows.len());
        if sel.is_empty() {
            return Ok((Tensor::zeros(0, DType::F32, &dev)?, at));
        }
        let n = sel.len();
        let h = out
            .hidden
            .reshape((b * n_max, d))?
            .index_select(&Tensor::from_vec(sel, n, &dev)?, 0)?;
        let logits = self.reasoner.logits(&h)?.to_dtype(DType::F32)?;
        let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let lp = lsm
            .gather(&Tensor::from_vec(tgt, (n, 1), &dev)?, 1)?
            .squeeze(1)?;
        Ok((lp, at))
    }

    /// Mean negative log-likelihood over all target tokens of the batch (the SFT loss), and the count.
    pub fn sft_loss(&self, rows: &[TfRow], mode: &mut Mode) -> anyhow::Result<(Tensor, usize)> {
        let out = self.teacher_forced(rows, mode)?;
        let (lp, at) = self.target_logprobs(rows, &out)?;
        if at.is_empty() {
            anyhow::bail!("no answer tokens to train on");
        }
        Ok((lp.mean_all()?.neg()?, at.len()))
    }
}
