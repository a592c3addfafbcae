//! The teacher-forced forward used by SFT and by GRPO scoring: every row's memories are woven in
//! order (each may read the ones before it), spliced into the reasoner's input, and the outputs are
//! realigned one-to-one with the original tokens (docs/DESIGN.md, "The SFT loss").
//!
//! Rows are processed together: round r weaves every row's r-th memory in one weaver call, the
//! weaver reading the context through its KV cache (so it never re-reads a prefix), and the reasoner
//! reads the prompt prefix — which nothing trainable precedes — without building a graph.

use candle_core::{DType, IndexOp, Tensor, D};

use super::{Kind, MemGenModel, Point};
use crate::backbone::{Mode, Side, Stream};

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

/// What one slot of the reasoner's input after the prompt prefix holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Token i of the row.
    Token(usize),
    /// A latent of the memory inserted right before token `before`.
    Latent { before: usize },
}

/// The reasoner's final hidden states over a batch: the prompt prefixes (B × L_p, left-padded)
/// and the rest of every row (B × L_r, right-padded), flattened to (B·L_p + B·L_r) × d, with
/// what each row's rest slots hold.
struct ReasonerStates {
    flat: Tensor,
    /// Per row, the number of prefix tokens (tokens before the first memory).
    prefix: Vec<usize>,
    prefix_len: usize,
    rest: Vec<Vec<Slot>>,
    rest_len: usize,
}

impl MemGenModel {
    /// The teacher-forced forward: weave every row's memories, run the reasoner over the tokens
    /// with the latents spliced in, and realign its states with the original tokens.
    pub fn teacher_forced(&self, rows: &[TfRow], mode: &mut Mode) -> anyhow::Result<TfOutput> {
        check_rows(rows)?;
        let emb = self.token_embeddings(rows)?;
        let latents = self.weave_rounds(rows, &emb, mode)?;
        let states = self.reasoner_pass(rows, &emb, &latents, mode)?;
        let lens: Vec<usize> = rows.iter().map(|r| r.tokens.len()).collect();
        let hidden = realign(&states, &lens, self.reasoner.hidden_size())?;
        Ok(TfOutput { hidden, lens })
    }

    /// Frozen token embeddings of every row (B × N_max × d, padded at the end; no graph).
    fn token_embeddings(&self, rows: &[TfRow]) -> anyhow::Result<Tensor> {
        let n_max = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
        let padded: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                let mut v = r.tokens.clone();
                v.resize(n_max, self.tokenizer.pad_id);
                v
            })
            .collect();
        let dev = self.reasoner.device();
        let ids = Tensor::from_vec(padded.concat(), (rows.len(), n_max), dev)?;
        Ok(self.reasoner.embed(&ids)?)
    }

    /// Weave every row's memories: round r weaves each row's r-th memory in one weaver call,
    /// after feeding the weaver what that row's stream holds since its previous memory (the
    /// previous latents, then the tokens up to this point). Returns `latents[row][point]`
    /// (K × d_r); empty when memories have no latents.
    fn weave_rounds(
        &self,
        rows: &[TfRow],
        emb: &Tensor,
        mode: &mut Mode,
    ) -> anyhow::Result<Vec<Vec<Tensor>>> {
        let b = rows.len();
        let mut latents: Vec<Vec<Tensor>> = vec![vec![]; b];
        // Zero-length memories need no weaving at all.
        if self.weaver.k(Kind::Prompt) == 0 && self.weaver.k(Kind::Inference) == 0 {
            return Ok(latents);
        }
        let rounds = rows.iter().map(|r| r.points.len()).max().unwrap_or(0);
        let mut cache = self.weaver.backbone.new_cache(b);
        // Per row: tokens the weaver has read, and real positions in its cache.
        let mut read = vec![0usize; b];
        let mut n_real = vec![0u32; b];
        for round in 0..rounds {
            let ctx = self.round_context(rows, emb, &latents, round, &read, &n_real)?;
            for (r, n) in n_real.iter_mut().enumerate() {
                *n += ctx.real_len(r) as u32;
            }
            let kinds: Vec<Option<Kind>> = rows
                .iter()
                .map(|row| row.points.get(round).map(|p| p.kind))
                .collect();
            let out = self
                .weaver
                .weave(&mut cache, Some(&ctx), &kinds, &n_real, mode)?;
            let k_max = out.dim(1)?;
            for (r, kind) in kinds.iter().enumerate() {
                if let Some(kind) = kind {
                    let k = self.weaver.k(*kind);
                    latents[r].push(out.i((r, k_max - k.., ..))?);
                    read[r] = rows[r].points[round].pos;
                }
            }
        }
        Ok(latents)
    }

    /// The weaver's new context in `round`: for each row with a memory in this round, its
    /// previous memory's latents and its tokens from `read[r]` up to the insertion point,
    /// left-padded, at positions continuing `n_real`. Rows without a memory add nothing.
    fn round_context(
        &self,
        rows: &[TfRow],
        emb: &Tensor,
        latents: &[Vec<Tensor>],
        round: usize,
        read: &[usize],
        n_real: &[u32],
    ) -> anyhow::Result<Stream> {
        let mut pieces: Vec<Vec<Tensor>> = vec![vec![]; rows.len()];
        for (r, row) in rows.iter().enumerate() {
            let Some(pt) = row.points.get(round) else {
                continue;
            };
            if round > 0 {
                pieces[r].push(latents[r][round - 1].clone());
            }
            if pt.pos > read[r] {
                pieces[r].push(emb.i((r, read[r]..pt.pos, ..))?);
            }
        }
        let width = (self.reasoner.hidden_size(), self.reasoner.dtype());
        let dev = self.reasoner.device();
        Ok(Stream::from_rows(&pieces, Side::Left, n_real, width, dev)?)
    }

    /// The reasoner over every row: the prompt prefix (which nothing trainable precedes) without
    /// a graph, then the rest — [latents, tokens, latents, tokens, …] — in `mode`, through the
    /// same cache.
    fn reasoner_pass(
        &self,
        rows: &[TfRow],
        emb: &Tensor,
        latents: &[Vec<Tensor>],
        mode: &mut Mode,
    ) -> anyhow::Result<ReasonerStates> {
        let (b, d) = (rows.len(), self.reasoner.hidden_size());
        let prefix: Vec<usize> = rows
            .iter()
            .map(|r| r.points.first().map_or(r.tokens.len(), |p| p.pos))
            .collect();
        let heads: Vec<Vec<u32>> = rows
            .iter()
            .zip(&prefix)
            .map(|(r, &p)| r.tokens[..p].to_vec())
            .collect();
        let head = Stream::tokens(&self.reasoner, &heads, self.tokenizer.pad_id, Side::Left)?;
        let mut cache = self.reasoner.new_cache(b);
        let hp = self
            .reasoner
            .forward(&head, Some(&mut cache), &mut Mode::Infer)?;
        let mut pieces = Vec::with_capacity(b);
        let mut rest = Vec::with_capacity(b);
        for (r, row) in rows.iter().enumerate() {
            let (p, slots) = rest_of_row(row, &latents[r], emb.get(r)?)?;
            pieces.push(p);
            rest.push(slots);
        }
        let start: Vec<u32> = prefix.iter().map(|&p| p as u32).collect();
        let width = (d, self.reasoner.dtype());
        let tail = Stream::from_rows(&pieces, Side::Right, &start, width, self.reasoner.device())?;
        let flat_prefix = hp.reshape((b * head.len(), d))?;
        let flat = if tail.is_empty() {
            flat_prefix
        } else {
            let hr = self.reasoner.forward(&tail, Some(&mut cache), mode)?;
            Tensor::cat(&[flat_prefix, hr.reshape((b * tail.len(), d))?], 0)?
        };
        Ok(ReasonerStates {
            flat,
            prefix,
            prefix_len: head.len(),
            rest,
            rest_len: tail.len(),
        })
    }
}

/// Row `row`'s input after its prompt prefix — each memory's latents, then the tokens up to the
/// next memory — as pieces (n × d) for [`Stream::from_rows`], with what each slot holds.
/// `emb` is the row's token embeddings (N_max × d).
fn rest_of_row(
    row: &TfRow,
    latents: &[Tensor],
    emb: Tensor,
) -> anyhow::Result<(Vec<Tensor>, Vec<Slot>)> {
    let mut pieces = vec![];
    let mut slots = vec![];
    for (j, pt) in row.points.iter().enumerate() {
        if let Some(lat) = latents.get(j).filter(|l| l.dim(0).is_ok_and(|k| k > 0)) {
            pieces.push(lat.clone());
            slots.extend(std::iter::repeat_n(
                Slot::Latent { before: pt.pos },
                lat.dim(0)?,
            ));
        }
        let end = row.points.get(j + 1).map_or(row.tokens.len(), |p| p.pos);
        pieces.push(emb.i(pt.pos..end)?);
        slots.extend((pt.pos..end).map(Slot::Token));
    }
    Ok((pieces, slots))
}

/// Hidden states aligned with the tokens (B × N_max × d): position i of a row gets the state
/// that predicts token i + 1 — the state at token i, or at the last latent of a memory inserted
/// right before token i + 1. Positions past a row's end get the first state of the batch.
fn realign(s: &ReasonerStates, lens: &[usize], d: usize) -> anyhow::Result<Tensor> {
    let b = lens.len();
    let n_max = lens.iter().copied().max().unwrap_or(0);
    let (lp, lr) = (s.prefix_len, s.rest_len);
    let mut idx = Vec::with_capacity(b * n_max);
    for r in 0..b {
        let mut predictor = vec![0usize; n_max];
        // Prefix tokens sit right-aligned in their left-padded row.
        for (i, p) in predictor.iter_mut().enumerate().take(s.prefix[r]) {
            *p = r * lp + (lp - s.prefix[r]) + i;
        }
        // In stream order, so a memory's last latent overrides the token before it.
        for (c, slot) in s.rest[r].iter().enumerate() {
            let flat = b * lp + r * lr + c;
            match *slot {
                Slot::Token(i) => predictor[i] = flat,
                Slot::Latent { before } => predictor[before - 1] = flat,
            }
        }
        idx.extend(predictor.into_iter().map(|i| i as u32));
    }
    let idx = Tensor::from_vec(idx, b * n_max, s.flat.device())?;
    Ok(s.flat.index_select(&idx, 0)?.reshape((b, n_max, d))?)
}

impl MemGenModel {
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
