//! One batched generation with memory, in the steps [`MemGenModel::generate_with_replay`] takes:
//! [`Run::prefill`] (the prompts, replayed memories and the prompt memory), then per token
//! [`Run::sample`] → [`Run::boundaries`] → [`Run::trigger_reads`] → [`Run::decide`] →
//! [`Run::advance`] (the weaver's latents appended where a memory goes).

use candle_core::{DType, Tensor};

use super::{action_logprob, decide, Decision, Insertion, MemGenerated, MemoryOptions};
use crate::backbone::generate::Sampler;
use crate::backbone::{KvCache, Mode, Side, Stream};
use crate::memory::{Kind, MemGenModel, Trigger};

/// Inputs a model has not read yet: it reads them all at once, when it is next needed.
#[derive(Default)]
struct Unread(Vec<Stream>);

impl Unread {
    fn push(&mut self, s: Stream) {
        self.0.push(s);
    }

    fn take(&mut self) -> anyhow::Result<Option<Stream>> {
        if self.0.is_empty() {
            return Ok(None);
        }
        Ok(Some(Stream::cat(&std::mem::take(&mut self.0))?))
    }
}

/// The trigger's side of a run: it reads tokens only (no latents), so its positions count tokens.
struct TriggerState<'a> {
    trigger: &'a Trigger,
    cache: KvCache,
    unread: Unread,
    /// Real positions per row in the trigger's stream.
    real: Vec<u32>,
}

impl<'a> TriggerState<'a> {
    fn new(trigger: &'a Trigger, prompts: &[Vec<u32>], pad: u32) -> anyhow::Result<Self> {
        let mut unread = Unread::default();
        unread.push(Stream::tokens(&trigger.backbone, prompts, pad, Side::Left)?);
        Ok(TriggerState {
            trigger,
            cache: trigger.backbone.new_cache(prompts.len()),
            unread,
            real: prompts.iter().map(|p| p.len() as u32).collect(),
        })
    }

    /// Queue this step's tokens (masked where a row has stopped).
    fn push(&mut self, step: &Step) -> anyhow::Result<()> {
        let ids: Vec<Vec<u32>> = step.ids.iter().map(|&t| vec![t]).collect();
        let mask = step.live.iter().map(|&l| vec![l as u8]).collect();
        let pos = self.real.iter().map(|&n| vec![n]).collect();
        self.unread
            .push(Stream::from_ids(&self.trigger.backbone, &ids, mask, pos)?);
        for (n, &l) in self.real.iter_mut().zip(&step.live) {
            *n += l as u32;
        }
        Ok(())
    }

    /// Read what is new; the decision logits (2 per row) at each row's last position.
    fn logits(&mut self) -> anyhow::Result<Vec<Vec<f32>>> {
        let new = self
            .unread
            .take()?
            .ok_or_else(|| anyhow::anyhow!("the trigger has nothing new to read"))?;
        let lg = self
            .trigger
            .logits(&new, Some(&mut self.cache), &mut Mode::Infer)?;
        let l = lg.dim(1)?;
        Ok(lg.narrow(1, l - 1, 1)?.squeeze(1)?.to_vec2::<f32>()?)
    }
}

/// The tokens sampled in one step.
pub(super) struct Step {
    /// Per row: the new token, or the pad id where the row has stopped (now or before).
    ids: Vec<u32>,
    /// Per row: a token was sampled and it is not a stop token.
    live: Vec<bool>,
}

/// The state of one generation: the three models' caches, what the weaver and the trigger have
/// not read yet, and each row's output so far. Nothing is recomputed.
pub(super) struct Run<'a> {
    m: &'a MemGenModel,
    opts: &'a MemoryOptions,
    prompts: &'a [Vec<u32>],
    reasoner: KvCache,
    weaver: KvCache,
    /// Reasoner inputs the weaver has not read yet (it reads lazily, at the next memory).
    weaver_unread: Unread,
    trigger: Option<TriggerState<'a>>,
    /// Real positions per row in the reasoner's stream (tokens and latents).
    n_real: Vec<u32>,
    out: Vec<MemGenerated>,
}

impl<'a> Run<'a> {
    /// Read the prompts (with replayed memories spliced in) and the prompt memory. Returns the
    /// run and the reasoner's last hidden state per row (B × 1 × d).
    pub(super) fn prefill(
        m: &'a MemGenModel,
        prompts: &'a [Vec<u32>],
        replay: &[Vec<(usize, Tensor)>],
        opts: &'a MemoryOptions,
    ) -> anyhow::Result<(Run<'a>, Tensor)> {
        let b = prompts.len();
        let pad = m.tokenizer.pad_id;
        let stream = if replay.iter().all(Vec::is_empty) {
            Stream::tokens(&m.reasoner, prompts, pad, Side::Left)?
        } else {
            replayed_prefill(m, prompts, replay)?
        };
        let trigger = match &m.trigger {
            Some(t) => Some(TriggerState::new(t, prompts, pad)?),
            None => None,
        };
        let mut run = Run {
            m,
            opts,
            prompts,
            reasoner: m.reasoner.new_cache(b),
            weaver: m.weaver.backbone.new_cache(b),
            weaver_unread: Unread::default(),
            trigger,
            n_real: (0..b).map(|r| stream.real_len(r) as u32).collect(),
            out: vec![MemGenerated::default(); b],
        };
        run.weaver_unread.push(stream.clone());
        let input = run.prompt_memory(stream)?;
        let h = m
            .reasoner
            .forward(&input, Some(&mut run.reasoner), &mut Mode::Infer)?;
        let l = h.dim(1)?;
        let last = h.narrow(1, l - 1, 1)?;
        Ok((run, last))
    }

    /// The prefill followed by the prompt memory, when there is one.
    fn prompt_memory(&mut self, prefill: Stream) -> anyhow::Result<Stream> {
        let k_p = self.m.weaver.k(Kind::Prompt);
        if !self.opts.prompt_memory || k_p == 0 {
            return Ok(prefill);
        }
        let b = self.out.len();
        let all = vec![true; b];
        let lat = self.weave(&vec![Some(Kind::Prompt); b])?;
        let open: Vec<bool> = (0..b).map(|r| self.open(r, 0)).collect();
        self.weaver_unread
            .push(Stream::latents(&lat, &all, &self.n_real)?.mask_rows(&open)?);
        let lat_r = lat.to_dtype(prefill.embeds().dtype())?;
        let input = prefill.append_latents(&lat_r, &all, &self.n_real)?;
        for r in 0..b {
            self.record(r, Kind::Prompt, &lat_r)?;
            self.n_real[r] += k_p as u32;
        }
        Ok(input)
    }

    /// Sample the next token of every row still generating from `last` (B × 1 × d).
    pub(super) fn sample(
        &mut self,
        last: &Tensor,
        sampler: &mut Sampler,
        on_token: &mut impl FnMut(usize, u32),
    ) -> anyhow::Result<Step> {
        let logits = self.live_logits(last)?;
        let b = self.out.len();
        let mut step = Step {
            ids: vec![self.m.tokenizer.pad_id; b],
            live: vec![false; b],
        };
        for (r, o) in self.out.iter_mut().enumerate() {
            if o.stopped {
                continue;
            }
            let t = sampler.sample(&logits[r]);
            o.tokens.push(t);
            on_token(r, t);
            if self.opts.stop_ids.contains(&t) {
                o.stopped = true;
            } else {
                step.ids[r] = t;
                step.live[r] = true;
            }
        }
        Ok(step)
    }

    /// Every row has stopped or has `max_new` tokens.
    pub(super) fn finished(&self, max_new: usize) -> bool {
        self.out
            .iter()
            .all(|o| o.stopped || o.tokens.len() >= max_new)
    }

    /// The rows whose text now ends at a boundary where a memory may go.
    pub(super) fn boundaries(&self, step: &Step) -> Vec<usize> {
        (0..self.out.len())
            .filter(|&r| {
                let o = &self.out[r];
                let since = o.insertions.last().map_or(0, |i| i.token_index);
                step.live[r] && self.open(r, 0) && o.tokens.len() >= since + self.opts.min_gap && {
                    let mut full = self.prompts[r].clone();
                    full.extend_from_slice(&o.tokens);
                    self.m.boundary.is_boundary(&full)
                }
            })
            .collect()
    }

    /// Queue this step's tokens for the trigger (it reads them at its next decision).
    pub(super) fn trigger_reads(&mut self, step: &Step) -> anyhow::Result<()> {
        match &mut self.trigger {
            Some(t) => t.push(step),
            None => Ok(()),
        }
    }

    /// The trigger's decision for each candidate row (the nano trigger always inserts).
    /// Returns, per row, whether a memory goes in now.
    pub(super) fn decide(
        &mut self,
        candidates: &[usize],
        sampler: &mut Sampler,
    ) -> anyhow::Result<Vec<bool>> {
        let mut insert = vec![false; self.out.len()];
        if candidates.is_empty() {
            return Ok(insert);
        }
        let Some(trigger) = self.trigger.as_mut() else {
            for &r in candidates {
                insert[r] = true;
                self.decided(r, true, 0.0);
            }
            return Ok(insert);
        };
        let lg = trigger.logits()?;
        for &r in candidates {
            let (a, logprob) = match self.opts.decision_temperature {
                Some(t) => decide(&lg[r], t, sampler.rng()),
                None => {
                    let a = sampler.sample(&lg[r]) as usize;
                    (a, action_logprob(&lg[r], sampler.cfg.temperature, a))
                }
            };
            insert[r] = a == 1;
            self.decided(r, a == 1, logprob);
        }
        Ok(insert)
    }

    /// Feed this step's tokens to the reasoner, with an inference memory after them in the rows
    /// with `insert[r]`. Returns the reasoner's new last hidden state per row (B × 1 × d).
    pub(super) fn advance(&mut self, step: &Step, insert: &[bool]) -> anyhow::Result<Tensor> {
        let b = self.out.len();
        let ids: Vec<Vec<u32>> = step.ids.iter().map(|&t| vec![t]).collect();
        let mask = step.live.iter().map(|&l| vec![l as u8]).collect();
        let pos = self.n_real.iter().map(|&n| vec![n]).collect();
        let input = Stream::from_ids(&self.m.reasoner, &ids, mask, pos)?;
        // The weaver reads only rows that may still get a memory: what a row reads after its
        // last memory is never used.
        let open: Vec<bool> = (0..b).map(|r| self.open(r, 0)).collect();
        self.weaver_unread.push(input.mask_rows(&open)?);
        for (n, &l) in self.n_real.iter_mut().zip(&step.live) {
            *n += l as u32;
        }
        if !insert.iter().any(|&i| i) {
            let h = self
                .m
                .reasoner
                .forward(&input, Some(&mut self.reasoner), &mut Mode::Infer)?;
            return Ok(h);
        }
        self.insert_memories(input, insert)
    }

    /// Weave an inference memory for the rows with `insert[r]` and feed the reasoner `input`
    /// followed by the latents. Returns each row's state at its last real input.
    fn insert_memories(&mut self, input: Stream, insert: &[bool]) -> anyhow::Result<Tensor> {
        let (b, d) = (self.out.len(), self.m.reasoner.hidden_size());
        let k_i = self.m.weaver.k(Kind::Inference);
        let kinds: Vec<Option<Kind>> = insert
            .iter()
            .map(|&i| i.then_some(Kind::Inference))
            .collect();
        let lat = self.weave(&kinds)?;
        let keep: Vec<bool> = (0..b).map(|r| insert[r] && self.open(r, 1)).collect();
        self.weaver_unread
            .push(Stream::latents(&lat, insert, &self.n_real)?.mask_rows(&keep)?);
        // In the reasoner's dtype: what it reads now and what later turns replay.
        let lat_r = lat.to_dtype(self.m.reasoner.dtype())?;
        let input = input.append_latents(&lat_r, insert, &self.n_real)?;
        let h = self
            .m
            .reasoner
            .forward(&input, Some(&mut self.reasoner), &mut Mode::Infer)?;
        // Each row continues from its last real input: the last latent, or the token.
        let w = 1 + k_i;
        let idx: Vec<u32> = (0..b)
            .map(|r| (r * w + if insert[r] { k_i } else { 0 }) as u32)
            .collect();
        let last = h
            .reshape((b * w, d))?
            .index_select(&Tensor::from_vec(idx, b, h.device())?, 0)?
            .unsqueeze(1)?;
        for r in (0..b).filter(|&r| insert[r]) {
            self.n_real[r] += k_i as u32;
            self.record(r, Kind::Inference, &lat_r)?;
        }
        Ok(last)
    }

    pub(super) fn into_output(self) -> Vec<MemGenerated> {
        self.out
    }

    /// Weave memories for the rows with `kinds[r] = Some(_)`, the weaver first reading what it
    /// has not read yet; queries sit right after each row's real positions. (B × K_max × d_r.)
    fn weave(&mut self, kinds: &[Option<Kind>]) -> anyhow::Result<Tensor> {
        let ctx = self.weaver_unread.take()?;
        self.m.weaver.weave(
            &mut self.weaver,
            ctx.as_ref(),
            kinds,
            &self.n_real,
            &mut Mode::Infer,
        )
    }

    /// Whether row r may still get an inference memory after `extra` more.
    fn open(&self, r: usize, extra: usize) -> bool {
        let done = self.out[r]
            .insertions
            .iter()
            .filter(|i| i.kind == Kind::Inference)
            .count();
        self.m.weaver.k(Kind::Inference) > 0 && done + extra < self.opts.max_inference
    }

    /// Row r got a memory of `kind` before its next token; `lat` holds every row's latents.
    fn record(&mut self, r: usize, kind: Kind, lat: &Tensor) -> anyhow::Result<()> {
        let o = &mut self.out[r];
        o.insertions.push(Insertion {
            token_index: o.tokens.len(),
            kind,
        });
        o.latents.push(lat.get(r)?);
        Ok(())
    }

    fn decided(&mut self, r: usize, insert: bool, logprob: f32) {
        let o = &mut self.out[r];
        o.decisions.push(Decision {
            token_index: o.tokens.len(),
            insert,
            logprob,
        });
    }

    /// Next-token logits (f32) of the rows still generating; finished rows get an empty row. The
    /// LM head is a large share of a decode step (a quarter of Qwen2.5-0.5B's weights), so rows
    /// that have stopped skip it.
    fn live_logits(&self, last: &Tensor) -> anyhow::Result<Vec<Vec<f32>>> {
        let out = &self.out;
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
            .m
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
}

/// The prefill of prompts with replayed memories: per row the token embeddings with each
/// replayed block of latents spliced in before its token, left-padded to a common length;
/// latents take positions like tokens.
fn replayed_prefill(
    m: &MemGenModel,
    prompts: &[Vec<u32>],
    replay: &[Vec<(usize, Tensor)>],
) -> anyhow::Result<Stream> {
    let bb = &m.reasoner;
    let d = bb.hidden_size();
    let mut pieces = Vec::with_capacity(prompts.len());
    for (p, rep) in prompts.iter().zip(replay) {
        let e = bb
            .embed(&Tensor::from_vec(p.clone(), (1, p.len()), bb.device())?)?
            .squeeze(0)?;
        let mut row = vec![];
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
                row.push(e.narrow(0, prev, i - prev)?);
            }
            row.push(lat.clone());
            prev = *i;
        }
        if prev < p.len() {
            row.push(e.narrow(0, prev, p.len() - prev)?);
        }
        pieces.push(row);
    }
    let start = vec![0; prompts.len()];
    let width = (d, bb.dtype());
    Ok(Stream::from_rows(
        &pieces,
        Side::Left,
        &start,
        width,
        bb.device(),
    )?)
}
