//! Generation with memory: batched and left-padded; the prompt memory first, then after every
//! sampled token the boundary check, the trigger's decision and the weaver's latents appended to
//! the reasoner's KV cache. Nothing is recomputed: the reasoner, the weaver and the trigger each
//! keep a KV cache of the stream they have read, and the weaver's query positions are dropped
//! from its cache after every memory.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::weaver::Context;
use super::{Kind, MemGenModel};
use crate::backbone::generate::{ids_tensor, left_pad, Sampler};
use crate::backbone::model::{positions_from_mask, positions_tensor};
use crate::backbone::{KvCache, Mode};

/// Per-call settings of generation with memory.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryOptions {
    /// Insert the prompt memory after the prompt.
    pub prompt_memory: bool,
    /// Cap on inference memories per sequence.
    pub max_inference: usize,
    /// End a sequence on these ids.
    pub stop_ids: Vec<u32>,
    /// A boundary fewer than `min_gap` generated tokens after the previous memory (the prompt
    /// memory sits at token 0) is not a candidate. 0 (the original): every boundary is.
    pub min_gap: usize,
    /// Sample the trigger's decisions at this temperature (0: argmax) instead of the token
    /// sampler's. `None` (the original): decisions follow the token sampler.
    pub decision_temperature: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Insertion {
    /// Index in the generated tokens before which the latents were inserted (0: the prompt memory).
    pub token_index: usize,
    pub kind: Kind,
}

/// The trigger's answer at a boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The boundary lies right before generated token `token_index`.
    pub token_index: usize,
    pub insert: bool,
    /// Log-probability of the chosen action under the trigger (0 for the nano trigger).
    pub logprob: f32,
}

#[derive(Debug, Clone, Default)]
pub struct MemGenerated {
    pub tokens: Vec<u32>,
    pub stopped: bool,
    pub insertions: Vec<Insertion>,
    /// The latents of each insertion (K × d_r, the reasoner's dtype), in the same order: a later
    /// turn of the conversation reads them again (see [`MemGenModel::generate_with_replay`]).
    pub latents: Vec<Tensor>,
    pub decisions: Vec<Decision>,
}

/// A stream chunk: embeddings (B × L × d) with per-row mask and positions.
type Chunk = (Tensor, Vec<Vec<u8>>, Vec<Vec<u32>>);

/// Reasoner inputs the weaver has not read yet (it reads lazily, at the next memory).
struct Pending {
    chunks: Vec<Tensor>,
    mask: Vec<Vec<u8>>,
    pos: Vec<Vec<u32>>,
}

impl Pending {
    fn new(b: usize) -> Pending {
        Pending {
            chunks: vec![],
            mask: vec![vec![]; b],
            pos: vec![vec![]; b],
        }
    }
    fn push(&mut self, x: Tensor, mask: &[Vec<u8>], pos: &[Vec<u32>]) {
        self.chunks.push(x);
        for r in 0..self.mask.len() {
            self.mask[r].extend_from_slice(&mask[r]);
            self.pos[r].extend_from_slice(&pos[r]);
        }
    }
    fn take(&mut self) -> candle_core::Result<Option<Chunk>> {
        if self.chunks.is_empty() {
            return Ok(None);
        }
        let x = Tensor::cat(&std::mem::take(&mut self.chunks), 1)?;
        let b = self.mask.len();
        Ok(Some((
            x,
            std::mem::replace(&mut self.mask, vec![vec![]; b]),
            std::mem::replace(&mut self.pos, vec![vec![]; b]),
        )))
    }
}

/// Token ids the trigger has not read yet.
struct PendingIds {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<u8>>,
    pos: Vec<Vec<u32>>,
}

impl MemGenModel {
    /// Weave memories for the rows with `kinds[r] = Some(_)`, first feeding the weaver what it has
    /// not read yet. Returns (B × K_max × d_r).
    fn weave_pending(
        &self,
        wcache: &mut KvCache,
        pending: &mut Pending,
        kinds: &[Option<Kind>],
        query_start: &[u32],
    ) -> anyhow::Result<Tensor> {
        let ctx = pending.take()?;
        self.weaver.weave(
            wcache,
            ctx.as_ref().map(|(x, m, p)| Context {
                embeds: x,
                mask: m,
                positions: p,
            }),
            kinds,
            query_start,
            &mut Mode::Infer,
        )
    }

    /// Next-token logits (f32) of the rows still generating; finished rows get an empty row. The
    /// LM head is a large share of a decode step (a quarter of Qwen2.5-0.5B's weights), so rows
    /// that have stopped skip it.
    fn live_logits(&self, last: &Tensor, out: &[MemGenerated]) -> anyhow::Result<Vec<Vec<f32>>> {
        let live: Vec<u32> = (0..out.len() as u32)
            .filter(|&r| !out[r as usize].stopped)
            .collect();
        let last = last.squeeze(1)?;
        let sel = if live.len() == out.len() {
            last
        } else {
            let n = live.len();
            last.index_select(&Tensor::from_vec(live.clone(), n, last.device())?, 0)?
        };
        let lg = self
            .reasoner
            .logits_infer(&sel)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut rows = vec![vec![]; out.len()];
        for (r, l) in live.into_iter().zip(lg) {
            rows[r as usize] = l;
        }
        Ok(rows)
    }

    /// Generate with memory for a batch of prompts. `on_token(row, token)` sees each new token.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        opts: &MemoryOptions,
        sampler: &mut Sampler,
        on_token: impl FnMut(usize, u32),
    ) -> anyhow::Result<Vec<MemGenerated>> {
        let none = vec![vec![]; prompts.len()];
        self.generate_with_replay(prompts, &none, opts, sampler, on_token)
    }

    /// [`MemGenModel::generate`] for prompts that already had memories (the earlier turns of a
    /// conversation): `replay[r]` lists `(i, latents)`, latents (K × d_r) that went right before
    /// `prompts[r][i]`, sorted by `i`. The reasoner and the weaver read them again in place, so a
    /// later turn sees the stream a teacher-forced pass over the whole conversation sees.
    pub fn generate_with_replay(
        &self,
        prompts: &[Vec<u32>],
        replay: &[Vec<(usize, Tensor)>],
        opts: &MemoryOptions,
        sampler: &mut Sampler,
        mut on_token: impl FnMut(usize, u32),
    ) -> anyhow::Result<Vec<MemGenerated>> {
        let b = prompts.len();
        if b == 0 {
            return Ok(vec![]);
        }
        if prompts.iter().any(|p| p.is_empty()) {
            anyhow::bail!("cannot generate from an empty prompt");
        }
        if replay.len() != b {
            anyhow::bail!("{} replay lists for {b} prompts", replay.len());
        }
        // Before any work: a prompt that cannot fit would otherwise run (slowly) past the
        // positions the backbones were trained on.
        self.check_generation(
            prompts,
            replay,
            sampler.cfg.max_new_tokens,
            opts.prompt_memory,
            opts.max_inference,
        )?;
        let dev = self.reasoner.device().clone();
        let d = self.reasoner.hidden_size();
        let pad = self.tokenizer.pad_id;
        let (ids, tok_mask) = left_pad(prompts, pad);
        let tok_pos = positions_from_mask(&tok_mask, &vec![0; b]);
        let (e, mask, pos) = if replay.iter().all(Vec::is_empty) {
            let e = self.reasoner.embed(&ids_tensor(&ids, &dev)?)?;
            (e, tok_mask.clone(), tok_pos.clone())
        } else {
            self.replayed_prefill(prompts, replay)?
        };
        let mut n_real: Vec<u32> = mask
            .iter()
            .map(|m| m.iter().map(|&x| x as u32).sum())
            .collect();
        // The trigger reads tokens only (no latents), so its positions count tokens.
        let mut t_real: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
        let mut rcache = self.reasoner.new_cache(b);
        let mut wcache = self.weaver.backbone.new_cache(b);
        let mut tcache = self.trigger.as_ref().map(|t| t.backbone.new_cache(b));
        let mut pending = Pending::new(b);
        pending.push(e.clone(), &mask, &pos);
        let mut tpend = PendingIds {
            ids: ids.clone(),
            mask: tok_mask,
            pos: tok_pos,
        };
        let mut out: Vec<MemGenerated> = vec![MemGenerated::default(); b];

        // Whether a row may still get an inference memory after `extra` more. The weaver reads only
        // such rows: what a row reads after its last memory is never used.
        let k_i = self.weaver.k(Kind::Inference);
        let open = |o: &MemGenerated, extra: usize| {
            k_i > 0
                && o.insertions
                    .iter()
                    .filter(|i| i.kind == Kind::Inference)
                    .count()
                    + extra
                    < opts.max_inference
        };

        // Prompt memory.
        let k_p = self.weaver.k(Kind::Prompt);
        let (x0, m0, p0) = if opts.prompt_memory && k_p > 0 {
            let lat = self.weave_pending(
                &mut wcache,
                &mut pending,
                &vec![Some(Kind::Prompt); b],
                &n_real,
            )?;
            let lm: Vec<Vec<u8>> = vec![vec![1u8; k_p]; b];
            let lpos: Vec<Vec<u32>> = n_real
                .iter()
                .map(|&n| (n..n + k_p as u32).collect())
                .collect();
            let wm = vec![vec![open(&MemGenerated::default(), 0) as u8; k_p]; b];
            pending.push(lat.clone(), &wm, &lpos);
            let lat_r = lat.to_dtype(e.dtype())?;
            for (r, o) in out.iter_mut().enumerate() {
                o.insertions.push(Insertion {
                    token_index: 0,
                    kind: Kind::Prompt,
                });
                o.latents.push(lat_r.get(r)?);
                n_real[r] += k_p as u32;
            }
            let x = Tensor::cat(&[e.clone(), lat_r], 1)?;
            let m: Vec<Vec<u8>> = mask
                .iter()
                .zip(&lm)
                .map(|(a, c)| [a.clone(), c.clone()].concat())
                .collect();
            let p: Vec<Vec<u32>> = pos
                .iter()
                .zip(&lpos)
                .map(|(a, c)| [a.clone(), c.clone()].concat())
                .collect();
            (x, m, p)
        } else {
            (e.clone(), mask.clone(), pos.clone())
        };
        let h = self.reasoner.forward(
            &x0,
            &m0,
            &positions_tensor(&p0, &dev)?,
            Some(&mut rcache),
            &mut Mode::Infer,
        )?;
        let l = h.dim(1)?;
        let mut last = h.narrow(1, l - 1, 1)?;

        let max_new = sampler.cfg.max_new_tokens;
        for _ in 0..max_new {
            let logits = self.live_logits(&last, &out)?;
            let mut step = vec![pad; b];
            let mut live = vec![0u8; b];
            for r in 0..b {
                if out[r].stopped {
                    continue;
                }
                let t = sampler.sample(&logits[r]);
                out[r].tokens.push(t);
                on_token(r, t);
                if opts.stop_ids.contains(&t) {
                    out[r].stopped = true;
                } else {
                    step[r] = t;
                    live[r] = 1;
                }
            }
            let done = out.iter().all(|o| o.stopped || o.tokens.len() >= max_new);
            if done {
                break;
            }
            // Boundaries where a memory may go.
            let cand: Vec<usize> = (0..b)
                .filter(|&r| {
                    live[r] == 1
                        && open(&out[r], 0)
                        && out[r].tokens.len()
                            >= out[r].insertions.last().map_or(0, |i| i.token_index) + opts.min_gap
                        && {
                            let mut full = prompts[r].clone();
                            full.extend_from_slice(&out[r].tokens);
                            self.boundary.is_boundary(&full)
                        }
                })
                .collect();
            let step_mask: Vec<Vec<u8>> = live.iter().map(|&m| vec![m]).collect();
            let step_pos: Vec<Vec<u32>> = n_real.iter().map(|&n| vec![n]).collect();
            for r in 0..b {
                tpend.ids[r].push(step[r]);
                tpend.mask[r].push(live[r]);
                tpend.pos[r].push(t_real[r]);
                t_real[r] += live[r] as u32;
            }
            let mut insert = vec![false; b];
            if !cand.is_empty() {
                match (&self.trigger, tcache.as_mut()) {
                    (Some(trig), Some(tc)) => {
                        let ids_t = ids_tensor(&tpend.ids, &dev)?;
                        let pos_t = positions_tensor(&tpend.pos, &dev)?;
                        let lg =
                            trig.logits(&ids_t, &tpend.mask, &pos_t, Some(tc), &mut Mode::Infer)?;
                        let ll = lg.dim(1)?;
                        let lg = lg.narrow(1, ll - 1, 1)?.squeeze(1)?.to_vec2::<f32>()?;
                        tpend = PendingIds {
                            ids: vec![vec![]; b],
                            mask: vec![vec![]; b],
                            pos: vec![vec![]; b],
                        };
                        for &r in &cand {
                            let (a, logprob) = match opts.decision_temperature {
                                Some(t) => decide(&lg[r], t, sampler.rng()),
                                None => {
                                    let a = sampler.sample(&lg[r]) as usize;
                                    (a, action_logprob(&lg[r], sampler.cfg.temperature, a))
                                }
                            };
                            insert[r] = a == 1;
                            let token_index = out[r].tokens.len();
                            out[r].decisions.push(Decision {
                                token_index,
                                insert: a == 1,
                                logprob,
                            });
                        }
                    }
                    _ => {
                        for &r in &cand {
                            insert[r] = true;
                            let token_index = out[r].tokens.len();
                            out[r].decisions.push(Decision {
                                token_index,
                                insert: true,
                                logprob: 0.0,
                            });
                        }
                    }
                }
            }
            let e_t = self
                .reasoner
                .embed(&Tensor::from_vec(step.clone(), (b, 1), &dev)?)?;
            let wm: Vec<Vec<u8>> = (0..b)
                .map(|r| vec![live[r] * open(&out[r], 0) as u8])
                .collect();
            pending.push(e_t.clone(), &wm, &step_pos);
            for r in 0..b {
                n_real[r] += live[r] as u32;
            }
            if insert.iter().any(|&x| x) {
                let kinds: Vec<Option<Kind>> = insert
                    .iter()
                    .map(|&i| i.then_some(Kind::Inference))
                    .collect();
                let lat = self.weave_pending(&mut wcache, &mut pending, &kinds, &n_real)?;
                let lm: Vec<Vec<u8>> = insert.iter().map(|&i| vec![i as u8; k_i]).collect();
                let lpos: Vec<Vec<u32>> = insert
                    .iter()
                    .zip(&n_real)
                    .map(|(&i, &n)| {
                        if i {
                            (n..n + k_i as u32).collect()
                        } else {
                            vec![0; k_i]
                        }
                    })
                    .collect();
                let wm: Vec<Vec<u8>> = (0..b)
                    .map(|r| vec![(insert[r] && open(&out[r], 1)) as u8; k_i])
                    .collect();
                pending.push(lat.clone(), &wm, &lpos);
                // In the reasoner's dtype: what it reads now and what later turns replay.
                let lat_r = lat.to_dtype(self.reasoner.dtype())?;
                let x = Tensor::cat(&[e_t, lat_r.clone()], 1)?;
                let m: Vec<Vec<u8>> = step_mask
                    .iter()
                    .zip(&lm)
                    .map(|(a, c)| [a.clone(), c.clone()].concat())
                    .collect();
                let p: Vec<Vec<u32>> = step_pos
                    .iter()
                    .zip(&lpos)
                    .map(|(a, c)| [a.clone(), c.clone()].concat())
                    .collect();
                let h = self.reasoner.forward(
                    &x,
                    &m,
                    &positions_tensor(&p, &dev)?,
                    Some(&mut rcache),
                    &mut Mode::Infer,
                )?;
                // Each row continues from its last real input: the last latent, or the token.
                let w = 1 + k_i;
                let idx: Vec<u32> = (0..b)
                    .map(|r| (r * w + if insert[r] { k_i } else { 0 }) as u32)
                    .collect();
                last = h
                    .reshape((b * w, d))?
                    .index_select(&Tensor::from_vec(idx, b, &dev)?, 0)?
                    .unsqueeze(1)?;
                for r in 0..b {
                    if insert[r] {
                        n_real[r] += k_i as u32;
                        let token_index = out[r].tokens.len();
                        out[r].insertions.push(Insertion {
                            token_index,
                            kind: Kind::Inference,
                        });
                        out[r].latents.push(lat_r.get(r)?);
                    }
                }
            } else {
                last = self.reasoner.forward(
                    &e_t,
                    &step_mask,
                    &positions_tensor(&step_pos, &dev)?,
                    Some(&mut rcache),
                    &mut Mode::Infer,
                )?;
            }
        }
        Ok(out)
    }
}

impl MemGenModel {
    /// The prefill of prompts with replayed memories: per row the token embeddings with each
    /// replayed block of latents spliced in before its token, left-padded to a common length.
    /// Returns (B × L × d, mask, positions); latents take positions like tokens.
    fn replayed_prefill(
        &self,
        prompts: &[Vec<u32>],
        replay: &[Vec<(usize, Tensor)>],
    ) -> anyhow::Result<Chunk> {
        let dev = self.reasoner.device().clone();
        let d = self.reasoner.hidden_size();
        let dtype = self.reasoner.dtype();
        let mut rows = Vec::with_capacity(prompts.len());
        for (p, rep) in prompts.iter().zip(replay) {
            let e = self
                .reasoner
                .embed(&Tensor::from_vec(p.clone(), (1, p.len()), &dev)?)?;
            let mut pieces = vec![];
            let mut prev = 0;
            for (i, lat) in rep {
                if *i < prev || *i > p.len() {
                    anyhow::bail!(
                        "replayed memory at token {i} of a {}-token prompt (after {prev})",
                        p.len()
                    );
                }
                let (k, dl) = lat.dims2()?;
                if dl != d {
                    anyhow::bail!("replayed latents are {k} × {dl}, the reasoner is {d} wide");
                }
                if *i > prev {
                    pieces.push(e.narrow(1, prev, i - prev)?);
                }
                pieces.push(lat.to_dtype(dtype)?.unsqueeze(0)?);
                prev = *i;
            }
            if prev < p.len() {
                pieces.push(e.narrow(1, prev, p.len() - prev)?);
            }
            rows.push(Tensor::cat(&pieces, 1)?);
        }
        let max = rows
            .iter()
            .map(|x| x.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let l = max.iter().copied().max().unwrap_or(0);
        let mut xs = Vec::with_capacity(rows.len());
        let mut mask = Vec::with_capacity(rows.len());
        for (x, n) in rows.into_iter().zip(max) {
            let mut m = vec![0u8; l - n];
            m.extend(std::iter::repeat_n(1u8, n));
            mask.push(m);
            xs.push(if n < l {
                Tensor::cat(&[Tensor::zeros((1, l - n, d), dtype, &dev)?, x], 1)?
            } else {
                x
            });
        }
        let pos = positions_from_mask(&mask, &vec![0; mask.len()]);
        Ok((Tensor::cat(&xs, 0)?, mask, pos))
    }
}

/// Log-probability of action `a` under the trigger's logits at temperature `t` (at 1 when
/// greedy, `t` ≤ 0).
fn action_logprob(logits: &[f32], t: f64, a: usize) -> f32 {
    let tt = if t > 0.0 { t as f32 } else { 1.0 };
    let (z0, z1) = (logits[0] / tt, logits[1] / tt);
    let m = z0.max(z1);
    let lse = m + ((z0 - m).exp() + (z1 - m).exp()).ln();
    if a == 1 {
        z1 - lse
    } else {
        z0 - lse
    }
}

/// The trigger's two-way decision from its logits at temperature `t` (argmax when `t` ≤ 0), with
/// its log-probability.
fn decide(logits: &[f32], t: f64, rng: &mut rand::rngs::StdRng) -> (usize, f32) {
    use rand::Rng;
    let a = if t > 0.0 {
        // As `Sampler::sample` draws: the likelier action (action 0 on a tie) wins when u < p.
        let p1 = action_logprob(logits, t, 1).exp();
        let u: f32 = rng.random();
        if p1 > 0.5 {
            usize::from(u < p1)
        } else {
            usize::from(u >= 1.0 - p1)
        }
    } else {
        crate::backbone::generate::argmax(logits) as usize
    };
    (a, action_logprob(logits, t, a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn decisions_sample_at_their_temperature_or_take_the_argmax() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        // Greedy: the argmax, with its log-probability at temperature 1.
        let (a, lp) = decide(&[0.3, -0.2], 0.0, &mut rng);
        assert_eq!(a, 0);
        assert!((lp - (1.0f32 / (1.0 + (-0.5f32).exp())).ln()).abs() < 1e-6);
        // Sampled: insert with p = σ((z1 − z0) / t); at t = 2, p(insert) = σ(1) ≈ 0.731.
        let n = 20_000;
        let mut ins = 0;
        for _ in 0..n {
            let (a, lp) = decide(&[0.0, 2.0], 2.0, &mut rng);
            let p1 = 1.0 / (1.0 + (-1.0f32).exp());
            let want = if a == 1 { p1.ln() } else { (1.0 - p1).ln() };
            assert!((lp - want).abs() < 1e-5);
            ins += a;
        }
        let f = ins as f64 / n as f64;
        assert!((f - 0.731).abs() < 0.015, "{f}");
    }
}
