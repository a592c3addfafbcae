//! GRPO rollouts: sample G completions of each prompt with memory, reward them with the task,
//! and keep them in the one form single- and multi-turn tasks share ([`Rollout`]); greedy
//! rollouts for validation ([`eval_reward_sums`]).

use crate::backbone::generate::{Sampler, SamplingConfig};
use crate::memory::generate::{MemGenerated, MemoryOptions};
use crate::memory::teacher::TfRow;
use crate::memory::{Kind, MemGenModel, Point};
use crate::rollout::episode::{run_episodes, EpisodeDecision, EpisodeOptions, EpisodeResult};
use crate::tasks::search::SearchEnv;
use crate::tasks::{render_chatml, Message, Sample, Task};

/// One sampled rollout with its reward, in the one form single- and multi-turn tasks share:
/// absolute token ids, which of them are the reasoner's own, and where memories and trigger
/// decisions were.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// The token ids the reasoner read: the prompt, its own turns and (multi-turn tasks) the
    /// observations between them.
    pub tokens: Vec<u32>,
    /// `loss_mask[i]`: the reasoner generated token i. These are the weaver's policy tokens; the
    /// prompt and every observation are false.
    pub loss_mask: Vec<bool>,
    /// Memories where the rollout inserted them: latents right before `tokens[pos]`. Sorted.
    pub points: Vec<Point>,
    /// Trigger decisions at the boundaries the rollout visited; the one at `pos` (right before
    /// `tokens[pos]`) came from the trigger's logits after reading `tokens[..pos]`.
    pub decisions: Vec<EpisodeDecision>,
    /// The conversation: the sample's messages, then every assistant turn and observation.
    pub messages: Vec<Message>,
    /// Tokens the reasoner sampled (including any cut off a turn), for throughput.
    pub sampled_tokens: usize,
    pub reward: f64,
    pub task_reward: f64,
}

impl Rollout {
    /// A single-turn rollout from one `model.generate` row: prompt ids, then the completion.
    fn from_generated(sample: &Sample, prompt: Vec<u32>, gen: MemGenerated, text: String) -> Self {
        let p = prompt.len();
        let mut tokens = prompt;
        tokens.extend_from_slice(&gen.tokens);
        let loss_mask = (0..tokens.len()).map(|i| i >= p).collect();
        let points = gen
            .insertions
            .iter()
            .map(|ins| Point {
                pos: p + ins.token_index,
                kind: ins.kind,
            })
            .filter(|pt| pt.pos < tokens.len())
            .collect();
        let decisions = gen
            .decisions
            .iter()
            .map(|d| EpisodeDecision {
                turn: 0,
                pos: p + d.token_index,
                insert: d.insert,
                logprob: d.logprob,
            })
            .collect();
        let mut messages = sample.messages.clone();
        messages.push(Message::assistant(text));
        Self {
            loss_mask,
            points,
            decisions,
            messages,
            sampled_tokens: gen.tokens.len(),
            tokens,
            reward: 0.0,
            task_reward: 0.0,
        }
    }

    /// A multi-turn rollout from an episode: its mask already leaves the observations out.
    fn from_episode(ep: EpisodeResult) -> Self {
        let n = ep.tokens.len();
        Self {
            tokens: ep.tokens,
            loss_mask: ep.generated,
            // A turn that kept no tokens at the very end leaves its prompt memory at `n`:
            // nothing follows it, so it affects no policy token.
            points: ep.points.into_iter().filter(|p| p.pos < n).collect(),
            decisions: ep.decisions,
            messages: ep.messages,
            sampled_tokens: ep.sampled_tokens,
            reward: 0.0,
            task_reward: 0.0,
        }
    }

    pub fn inference_insertions(&self) -> usize {
        self.points
            .iter()
            .filter(|p| p.kind == Kind::Inference)
            .count()
    }

    /// Tokens the reasoner generated (the weaver's policy tokens).
    pub fn generated_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&g| g).count()
    }

    /// The teacher-forcing row scoring the generated tokens with memories where the rollout put them.
    pub fn tf_row(&self) -> TfRow {
        TfRow {
            tokens: self.tokens.clone(),
            loss_mask: self.loss_mask.clone(),
            points: self.points.clone(),
        }
    }
}

/// How the trigger acts in rollouts (trigger GRPO); the default is the original's: no penalty,
/// decisions sampled like tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TriggerRollout {
    /// λ: the reward loses λ · inference insertions / cap.
    pub insertion_penalty: f64,
    /// The temperature of the trigger's decisions, apart from the reasoner's tokens.
    pub decision_temperature: Option<f64>,
}

/// The prompt ids of a sample (ChatML with the generation prompt), cut from the left to `max`.
pub fn prompt_ids(model: &MemGenModel, s: &Sample, max: usize) -> anyhow::Result<Vec<u32>> {
    let mut ids = model.tokenizer.encode(&render_chatml(&s.messages, true))?;
    if ids.len() > max {
        ids.drain(..ids.len() - max);
    }
    Ok(ids)
}

/// Sample `repeat` rollouts of each sample with memory and reward them with the task. Single-turn
/// tasks take one batched `model.generate` call (prompts cut to `max_prompt_length`); multi-turn
/// tasks run episodes against `env` (the search environment), whose turn cap bounds their length.
/// `trig` sets the trigger's insertion penalty (λ · inference insertions / cap comes off the
/// reward) and the temperature of its decisions.
#[allow(clippy::too_many_arguments)]
pub fn rollouts(
    model: &MemGenModel,
    task: &dyn Task,
    env: Option<&SearchEnv>,
    samples: &[&Sample],
    repeat: usize,
    sampling: SamplingConfig,
    max_prompt_length: usize,
    trig: TriggerRollout,
) -> anyhow::Result<Vec<Rollout>> {
    let mut out = if task.multi_turn() {
        let env = env.ok_or_else(|| {
            anyhow::anyhow!(
                "task `{}` is multi-turn: its rollouts need a search environment",
                task.name()
            )
        })?;
        episode_rollouts(model, task, env, samples, repeat, sampling, trig)?
    } else {
        generated_rollouts(
            model,
            task,
            samples,
            repeat,
            sampling,
            max_prompt_length,
            trig,
        )?
    };
    let cap = model.spec.insertion.max_inference_aug_num;
    if trig.insertion_penalty != 0.0 && cap > 0 {
        for r in &mut out {
            r.reward -= trig.insertion_penalty * r.inference_insertions() as f64 / cap as f64;
        }
    }
    Ok(out)
}

/// Single-turn rollouts: all prompts in one `model.generate` batch.
fn generated_rollouts(
    model: &MemGenModel,
    task: &dyn Task,
    samples: &[&Sample],
    repeat: usize,
    sampling: SamplingConfig,
    max_prompt_length: usize,
    trig: TriggerRollout,
) -> anyhow::Result<Vec<Rollout>> {
    let mut prompts = vec![];
    let mut rows = vec![];
    for s in samples {
        let ids = prompt_ids(model, s, max_prompt_length)?;
        for _ in 0..repeat {
            prompts.push(ids.clone());
            rows.push(*s);
        }
    }
    let ins = &model.spec.insertion;
    let opts = MemoryOptions {
        prompt_memory: ins.max_prompt_aug_num > 0,
        max_inference: ins.max_inference_aug_num,
        stop_ids: model.tokenizer.eos_ids.clone(),
        decision_temperature: trig.decision_temperature,
        min_gap: 0,
    };
    let mut sampler = Sampler::new(sampling);
    let gens = model.generate(&prompts, &opts, &mut sampler, |_, _| {})?;
    let mut out = vec![];
    for ((prompt, gen), s) in prompts.into_iter().zip(gens).zip(rows) {
        let text = model.tokenizer.decode_skip_special(&gen.tokens)?;
        let task_reward = task.reward(&text, &s.gold);
        let mut r = Rollout::from_generated(s, prompt, gen, text);
        r.reward = task_reward;
        r.task_reward = task_reward;
        out.push(r);
    }
    Ok(out)
}

/// Multi-turn rollouts: one episode per generation, all of them batched turn by turn
/// (`sampling.max_new_tokens` caps each turn); the reward reads the whole episode's assistant
/// text, as evaluation grades it.
fn episode_rollouts(
    model: &MemGenModel,
    task: &dyn Task,
    env: &SearchEnv,
    samples: &[&Sample],
    repeat: usize,
    sampling: SamplingConfig,
    trig: TriggerRollout,
) -> anyhow::Result<Vec<Rollout>> {
    let batch: Vec<Sample> = samples
        .iter()
        .flat_map(|s| std::iter::repeat_n((*s).clone(), repeat))
        .collect();
    // The sampling seed also seeds which turns get a prompt memory (when capped below max_turns).
    let opts = EpisodeOptions {
        decision_temperature: trig.decision_temperature,
        ..EpisodeOptions::from_model(model, env.config().max_turns, sampling.seed)
    };
    let mut sampler = Sampler::new(sampling);
    let eps = run_episodes(model, &batch, Some(env), &opts, &mut sampler)?;
    Ok(eps
        .into_iter()
        .zip(&batch)
        .map(|(ep, s)| {
            let task_reward = task.reward(&ep.completion, &s.gold);
            let mut r = Rollout::from_episode(ep);
            r.reward = task_reward;
            r.task_reward = task_reward;
            r
        })
        .collect())
}

/// Validation by greedy rollouts: task reward and inference insertions summed, and the sample
/// count (sums, so data-parallel validation can add them up over the ranks before dividing).
pub(crate) fn eval_reward_sums(
    model: &MemGenModel,
    task: &dyn Task,
    env: Option<&SearchEnv>,
    samples: &[Sample],
    batch: usize,
    max_new: usize,
    max_prompt: usize,
) -> anyhow::Result<[f64; 3]> {
    let (mut sum, mut ins) = (0f64, 0usize);
    for chunk in samples.chunks(batch.max(1)) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let sampling = SamplingConfig {
            temperature: 0.0,
            max_new_tokens: max_new,
            ..Default::default()
        };
        let rs = rollouts(
            model,
            task,
            env,
            &refs,
            1,
            sampling,
            max_prompt,
            TriggerRollout::default(),
        )?;
        sum += rs.iter().map(|r| r.task_reward).sum::<f64>();
        ins += rs.iter().map(|r| r.inference_insertions()).sum::<usize>();
    }
    Ok([sum, ins as f64, samples.len() as f64])
}
