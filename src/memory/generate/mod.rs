//! Generation with memory: batched and left-padded; the prompt memory first, then after every
//! sampled token the boundary check, the trigger's decision and the weaver's latents appended to
//! the reasoner's KV cache. Nothing is recomputed: the reasoner, the weaver and the trigger each
//! keep a KV cache of the stream they have read, and the weaver's query positions are dropped
//! from its cache after every memory.

mod run;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{Kind, MemGenModel};
use crate::backbone::generate::Sampler;
use run::Run;

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

impl MemGenModel {
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
        let max_new = sampler.cfg.max_new_tokens;
        let (mut run, mut last) = Run::prefill(self, prompts, replay, opts)?;
        for _ in 0..max_new {
            let step = run.sample(&last, sampler, &mut on_token)?;
            if run.finished(max_new) {
                break;
            }
            let candidates = run.boundaries(&step);
            run.trigger_reads(&step)?;
            let insert = run.decide(&candidates, sampler)?;
            last = run.advance(&step, &insert)?;
        }
        Ok(run.into_output())
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
