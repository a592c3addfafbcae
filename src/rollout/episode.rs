//! Rollouts with memory: one assistant turn for single-turn tasks, or a multi-turn search episode
//! (docs/DESIGN.md, "Tasks and graders", triviaqa). Used by `memgen eval` and by GRPO training.
//!
//! Every turn re-reads the whole conversation so far as its prompt (batched over the live episodes)
//! and may get a prompt memory right after its `<|im_start|>assistant\n`. The result records the
//! exact token ids the reasoner read, which of them it generated, and where memories went, so
//! training can score the rollout with memories at the same points.
//!
//! A turn's prefill replays the latents of the earlier turns' memories where they went, so each turn
//! reads the stream a teacher-forced pass over [`EpisodeResult::tf_row`] sees.

use std::collections::BTreeMap;

use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::backbone::chat::{render_chatml, Message};
use crate::backbone::generate::Sampler;
use crate::memory::generate::MemoryOptions;
use crate::memory::teacher::TfRow;
use crate::memory::{Kind, MemGenModel, Point};
use crate::tasks::search::{Action, Episode, SearchEnv, Step};
use crate::tasks::Sample;

/// Settings of a rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct EpisodeOptions {
    /// Assistant turns per episode (forced to 1 without an environment).
    pub max_turns: usize,
    /// Turns that get a prompt memory; chosen at random (seeded) when `max_turns` exceeds it.
    pub max_prompt_aug_num: usize,
    /// Inference memories per episode (all turns together).
    pub max_inference_aug_num: usize,
    /// Seed of the choice of memory turns.
    pub seed: u64,
    /// The trigger's decisions at this temperature instead of the token sampler's (see
    /// [`MemoryOptions::decision_temperature`]).
    pub decision_temperature: Option<f64>,
}

impl EpisodeOptions {
    /// The caps of `model`'s spec, with `max_turns` turns.
    pub fn from_model(model: &MemGenModel, max_turns: usize, seed: u64) -> Self {
        Self {
            max_turns,
            max_prompt_aug_num: model.spec.insertion.max_prompt_aug_num,
            max_inference_aug_num: model.spec.insertion.max_inference_aug_num,
            seed,
            decision_temperature: None,
        }
    }
}

/// One assistant turn of an episode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// The response as kept (cut after the first `</search>` / `</answer>` in multi-turn tasks).
    pub response: String,
    /// `search`, `answer`, `invalid`, or `none` (single-turn: no environment).
    pub action: String,
    /// The search query or the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argument: Option<String>,
    /// The next user message (search results or the invalid-action reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observation: Option<String>,
    /// Absolute position of the turn's first content token in [`EpisodeResult::tokens`].
    pub start: usize,
    /// Content tokens kept in the conversation.
    pub len: usize,
    /// Tokens the reasoner sampled in this turn (before any cut).
    pub generated_tokens: usize,
    /// The turn ended on a stop token.
    pub stopped: bool,
    pub prompt_memory: bool,
}

/// A trigger decision, placed in the episode's token ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeDecision {
    pub turn: usize,
    /// The boundary lies right before `tokens[pos]`.
    pub pos: usize,
    pub insert: bool,
    /// Log-probability of the action under the trigger (0 for the nano trigger).
    pub logprob: f32,
}

/// A finished rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct EpisodeResult {
    /// The sample's id.
    pub id: String,
    /// The conversation's token ids: the prompt, then every turn (ChatML), exactly as the reasoner
    /// read them. An intermediate assistant turn ends with `<|im_end|>\n`; the last one ends with
    /// the stop token when the model produced it (and nothing was cut).
    pub tokens: Vec<u32>,
    /// `generated[i]`: token i belongs to an assistant turn (content, and `<|im_end|>\n` between
    /// turns); prompt and observation tokens are false.
    pub generated: Vec<bool>,
    /// Tokens of the initial prompt (up to and including the first `<|im_start|>assistant\n`).
    pub prompt_len: usize,
    /// Memories in `tokens`: latents went right before `tokens[pos]`. Sorted by position.
    pub points: Vec<Point>,
    /// The assistant turns joined by `\n` (what graders and rewards read).
    pub completion: String,
    /// The whole conversation as messages.
    pub messages: Vec<Message>,
    pub turns: Vec<Turn>,
    /// Trigger decisions at the boundaries visited (inside the kept text).
    pub decisions: Vec<EpisodeDecision>,
    /// The final answer of a search episode.
    pub answer: Option<String>,
    /// Tokens sampled over all turns (for throughput).
    pub sampled_tokens: usize,
}

impl EpisodeResult {
    /// The rollout as a teacher-forcing row: loss on generated tokens, memories at the rollout's points.
    pub fn tf_row(&self) -> TfRow {
        TfRow {
            tokens: self.tokens.clone(),
            loss_mask: self.generated.clone(),
            points: self.points.clone(),
        }
    }
}

struct State {
    ep: Episode,
    tokens: Vec<u32>,
    generated: Vec<bool>,
    prompt_len: usize,
    points: Vec<Point>,
    /// The latents of `points`, in order, for the next turns' prefill.
    latents: Vec<(usize, candle_core::Tensor)>,
    turns: Vec<Turn>,
    decisions: Vec<EpisodeDecision>,
    memory_turns: Vec<bool>,
    inference_used: usize,
    sampled: usize,
}

/// Which turns get a prompt memory: all when the cap allows, else `cap` of them at random.
fn choose_memory_turns(max_turns: usize, cap: usize, rng: &mut rand::rngs::StdRng) -> Vec<bool> {
    if cap >= max_turns {
        return vec![true; max_turns];
    }
    let mut v = vec![false; max_turns];
    for i in rand::seq::index::sample(rng, max_turns, cap) {
        v[i] = true;
    }
    v
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn action_parts(action: &Action) -> (String, Option<String>) {
    match action {
        Action::Search(q) => ("search".into(), Some(q.clone())),
        Action::Answer(a) => ("answer".into(), Some(a.clone())),
        Action::Invalid => ("invalid".into(), None),
    }
}

/// Run one episode per sample: single-turn without `env`, else up to `opts.max_turns` turns with
/// the search environment. Generation is batched over all live episodes of a turn.
pub fn run_episodes(
    model: &MemGenModel,
    samples: &[Sample],
    env: Option<&SearchEnv>,
    opts: &EpisodeOptions,
    sampler: &mut Sampler,
) -> anyhow::Result<Vec<EpisodeResult>> {
    let tok = &model.tokenizer;
    let max_turns = if env.is_some() {
        opts.max_turns.max(1)
    } else {
        1
    };
    let end_turn = tok.encode("<|im_end|>\n")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut states: Vec<State> = Vec::with_capacity(samples.len());
    for s in samples {
        let prompt = tok.encode(&render_chatml(&s.messages, true))?;
        if prompt.is_empty() {
            anyhow::bail!("sample {}: empty prompt", s.id);
        }
        states.push(State {
            ep: Episode::new(s.messages.clone()),
            generated: vec![false; prompt.len()],
            prompt_len: prompt.len(),
            tokens: prompt,
            points: vec![],
            latents: vec![],
            turns: vec![],
            decisions: vec![],
            memory_turns: choose_memory_turns(max_turns, opts.max_prompt_aug_num, &mut rng),
            inference_used: 0,
            sampled: 0,
        });
    }

    for turn in 0..max_turns {
        let live: Vec<usize> = (0..states.len()).filter(|&i| !states[i].ep.done).collect();
        if live.is_empty() {
            break;
        }
        // Generation options are per batch, so group rows that share them.
        let mut groups: BTreeMap<(bool, usize), Vec<usize>> = BTreeMap::new();
        for &i in &live {
            let s = &states[i];
            let left = opts.max_inference_aug_num.saturating_sub(s.inference_used);
            groups
                .entry((s.memory_turns[turn], left))
                .or_default()
                .push(i);
        }
        let mut outs = BTreeMap::new();
        for ((prompt_memory, left), rows) in groups {
            let prompts: Vec<Vec<u32>> = rows.iter().map(|&i| states[i].tokens.clone()).collect();
            let replay: Vec<Vec<(usize, candle_core::Tensor)>> =
                rows.iter().map(|&i| states[i].latents.clone()).collect();
            let gen = model.generate_with_replay(
                &prompts,
                &replay,
                &MemoryOptions {
                    prompt_memory,
                    max_inference: left,
                    stop_ids: tok.eos_ids.clone(),
                    decision_temperature: opts.decision_temperature,
                    min_gap: 0,
                },
                sampler,
                |_, _| {},
            )?;
            for (i, g) in rows.into_iter().zip(gen) {
                outs.insert(i, (prompt_memory, g));
            }
        }
        let mut raws = Vec::with_capacity(live.len());
        for &i in &live {
            let g = &outs[&i].1;
            let n = g.tokens.len() - usize::from(g.stopped);
            raws.push(tok.decode_skip_special(&g.tokens[..n])?);
        }
        let steps: Vec<Step> = match env {
            Some(env) => {
                let refs: Vec<&str> = raws.iter().map(String::as_str).collect();
                env.step_batch(&refs)
            }
            None => raws
                .iter()
                .map(|r| Step {
                    response: r.clone(),
                    action: Action::Invalid,
                    observation: None,
                })
                .collect(),
        };
        for ((&i, raw), step) in live.iter().zip(&raws).zip(steps) {
            let (prompt_memory, g) = outs.remove(&i).expect("generated");
            let s = &mut states[i];
            s.sampled += g.tokens.len();
            let n = g.tokens.len() - usize::from(g.stopped);
            let cut = step.response != *raw;
            // A cut response is re-tokenised: its last token may straddle the cut.
            let content = if cut {
                tok.encode(&step.response)?
            } else {
                g.tokens[..n].to_vec()
            };
            let (action, argument) = if env.is_some() {
                action_parts(&step.action)
            } else {
                ("none".into(), None)
            };
            let observation = step.observation.clone();
            let start = s.tokens.len();
            s.tokens.extend_from_slice(&content);
            s.generated.resize(s.tokens.len(), true);
            let n_msgs = s.ep.messages.len();
            s.ep.push(step, max_turns);
            let continues = !s.ep.done;
            if continues {
                s.tokens.extend_from_slice(&end_turn);
                s.generated.resize(s.tokens.len(), true);
                // Episode::push added the observation as the next user message.
                let obs_msg = &s.ep.messages[n_msgs + 1..];
                let text = render_chatml(obs_msg, true);
                s.tokens.extend(tok.encode(&text)?);
                s.generated.resize(s.tokens.len(), false);
            } else if !cut && g.stopped {
                s.tokens.push(*g.tokens.last().expect("stop token"));
                s.generated.push(true);
            }
            // Memories and decisions count only where the kept tokens are the generated ones.
            let kept = common_prefix(&g.tokens, &s.tokens[start..]);
            let mut inference = 0;
            for (ins, lat) in g.insertions.iter().zip(&g.latents) {
                let pos = match ins.kind {
                    Kind::Prompt => start,
                    Kind::Inference if ins.token_index < kept => {
                        inference += 1;
                        start + ins.token_index
                    }
                    Kind::Inference => continue,
                };
                s.points.push(Point {
                    pos,
                    kind: ins.kind,
                });
                s.latents.push((pos, lat.clone()));
            }
            s.inference_used += inference;
            for d in &g.decisions {
                if d.token_index < kept {
                    s.decisions.push(EpisodeDecision {
                        turn,
                        pos: start + d.token_index,
                        insert: d.insert,
                        logprob: d.logprob,
                    });
                }
            }
            s.turns.push(Turn {
                response: s.ep.messages[n_msgs].content.clone(),
                action,
                argument,
                observation: if continues { observation } else { None },
                start,
                len: content.len(),
                generated_tokens: g.tokens.len(),
                stopped: g.stopped,
                prompt_memory: prompt_memory && g.insertions.iter().any(|x| x.kind == Kind::Prompt),
            });
        }
    }

    Ok(samples
        .iter()
        .zip(states)
        .map(|(sample, s)| EpisodeResult {
            id: sample.id.clone(),
            completion: s.ep.assistant_text(),
            answer: s.ep.answer.clone(),
            messages: s.ep.messages,
            tokens: s.tokens,
            generated: s.generated,
            prompt_len: s.prompt_len,
            points: s.points,
            turns: s.turns,
            decisions: s.decisions,
            sampled_tokens: s.sampled,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_turns() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(choose_memory_turns(3, 6, &mut rng), vec![true; 3]);
        let v = choose_memory_turns(5, 2, &mut rng);
        assert_eq!(v.iter().filter(|&&b| b).count(), 2);
        assert_eq!(choose_memory_turns(4, 0, &mut rng), vec![false; 4]);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
    }
}
