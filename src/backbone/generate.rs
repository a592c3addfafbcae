//! Batched generation for the plain backbone: left-padded prompts, one prefill, then KV-cached
//! decoding with greedy or temperature / top-k / top-p sampling from a seeded RNG.

use candle_core::{DType, IndexOp};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::model::{Backbone, Mode};
use super::stream::{Side, Stream};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax).
    #[serde(default)]
    pub temperature: f64,
    /// Nucleus sampling mass; 1.0 turns it off.
    #[serde(default = "one")]
    pub top_p: f64,
    /// Keep the k most likely tokens; 0 turns it off.
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn one() -> f64 {
    1.0
}
fn default_max_new() -> usize {
    256
}
fn default_seed() -> u64 {
    42
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: default_max_new(),
            seed: default_seed(),
        }
    }
}

impl SamplingConfig {
    pub fn greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Picks the next token from a row of logits (Hugging Face order: temperature, top-k, top-p).
pub struct Sampler {
    pub cfg: SamplingConfig,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Sampler {
        let rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        Sampler { cfg, rng }
    }

    pub fn rng(&mut self) -> &mut rand::rngs::StdRng {
        &mut self.rng
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.greedy() {
            return argmax(logits);
        }
        let t = self.cfg.temperature as f32;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / t))
            .collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.cfg.top_k > 0 && self.cfg.top_k < cand.len() {
            cand.truncate(self.cfg.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.cfg.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.cfg.top_p as f32 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// First index of the maximum (as torch.argmax).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New tokens, including the stop token when one ended the sequence.
    pub tokens: Vec<u32>,
    pub stopped: bool,
}

/// Generate for a batch of prompts. `on_token(row, token)` sees every new token as it is chosen.
pub fn generate(
    model: &Backbone,
    prompts: &[Vec<u32>],
    pad_id: u32,
    stop_ids: &[u32],
    sampler: &mut Sampler,
    mut on_token: impl FnMut(usize, u32),
) -> anyhow::Result<Vec<Generated>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    if prompts.iter().any(|p| p.is_empty()) {
        anyhow::bail!("cannot generate from an empty prompt");
    }
    // Before any work: past the context the model would run slowly into positions it never saw.
    for (r, p) in prompts.iter().enumerate() {
        let what = if b == 1 {
            "the prompt".to_string()
        } else {
            format!("prompt {r} of the batch")
        };
        let budget = super::limits::Budget {
            tokens: p.len(),
            new_tokens: sampler.cfg.max_new_tokens,
            latents: 0,
        };
        super::limits::check_backbone(model, "model", &what, budget, false)?;
    }
    let mut cache = model.new_cache(b);
    let prefill = Stream::tokens(model, prompts, pad_id, Side::Left)?;
    let hidden = model.forward(&prefill, Some(&mut cache), &mut Mode::Infer)?;
    let l = hidden.dim(1)?;
    let mut last = hidden.i((.., l - 1..l, ..))?;
    let mut out: Vec<Generated> = vec![
        Generated {
            tokens: vec![],
            stopped: false
        };
        b
    ];
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    for _ in 0..sampler.cfg.max_new_tokens {
        let logits = model
            .logits_infer(&last)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut step = vec![pad_id; b];
        for row in 0..b {
            if out[row].stopped {
                continue;
            }
            let tok = sampler.sample(&logits[row]);
            out[row].tokens.push(tok);
            on_token(row, tok);
            if stop_ids.contains(&tok) {
                out[row].stopped = true;
            }
            step[row] = tok;
        }
        if out.iter().all(|g| g.stopped) {
            break;
        }
        if out
            .iter()
            .all(|g| g.tokens.len() >= sampler.cfg.max_new_tokens)
        {
            break;
        }
        let ids: Vec<Vec<u32>> = step.iter().map(|&t| vec![t]).collect();
        let pos = next_pos.iter().map(|&p| vec![p]).collect();
        let x = Stream::from_ids(model, &ids, vec![vec![1u8]; b], pos)?;
        last = model.forward(&x, Some(&mut cache), &mut Mode::Infer)?;
        next_pos.iter_mut().for_each(|p| *p += 1);
    }
    Ok(out)
}
