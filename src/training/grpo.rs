//! GRPO for the weaver and for the trigger (docs/DESIGN.md, "GRPO").
//!
//! One step: take the next prompts, sample G rollouts of each with memory (temperature from the
//! config), reward them with the task, normalise rewards within each group, then update the
//! policy with the clipped-ratio loss (`num_iterations` optimiser updates on the same rollouts).
//! Single-turn tasks roll out with one `model.generate` call; multi-turn (search) tasks run
//! episodes against the search environment. Both end up as a [`Rollout`]: the token ids the
//! reasoner read, a mask of the ones it generated, and the memory points and trigger decisions at
//! absolute positions.
//!
//! - Weaver: the policy tokens are the generated tokens (prompt and observation tokens masked),
//!   scored teacher-forced with the memories at exactly the points the rollout inserted them.
//! - Trigger: the policy "tokens" are the trigger's decisions at the boundaries the rollout
//!   visited, scored by re-reading the rollout's token ids with the trigger; the weaver is frozen.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor, Var, D};
use serde_json::json;

use super::metrics::{record, Metrics};
use super::optim::{accumulate, clip_grad_norm, AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::{
    checkpoint_after_step, due, fail_if_interrupted, progress, say, step_rng, Plan, TrainerState,
    BEST,
};
use crate::backbone::generate::{Sampler, SamplingConfig};
use crate::backbone::{Mode, Side, Stream};
use crate::config::GrpoConfig;
use crate::memory::checkpoint::Part;
use crate::memory::generate::{MemGenerated, MemoryOptions};
use crate::memory::teacher::TfRow;
use crate::memory::{Kind, MemGenModel, Point};
use crate::tasks::episode::{run_episodes, EpisodeDecision, EpisodeOptions, EpisodeResult};
use crate::tasks::search::SearchEnv;
use crate::tasks::{render_chatml, Message, Sample, Task};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Weaver,
    Trigger,
}

impl Target {
    /// The `TrainerState::kind` of a run training this part.
    pub fn kind(self) -> &'static str {
        match self {
            Target::Weaver => "weaver-grpo",
            Target::Trigger => "trigger-grpo",
        }
    }
    fn part(self) -> Part {
        match self {
            Target::Weaver => Part::Weaver,
            Target::Trigger => Part::Trigger,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GrpoRun {
    pub cfg: GrpoConfig,
    pub target: Target,
    pub seed: u64,
    pub out: PathBuf,
    pub resume: Option<PathBuf>,
    /// Stop with a resumable checkpoint after this many steps (tests).
    pub stop_after: Option<usize>,
    /// The run's result-shaping settings ([`super::resume`]): stored in every checkpoint and
    /// compared on resume. None (a run driven without a config) stores and checks nothing.
    pub settings: Option<super::resume::Settings>,
    /// Resume even when `settings` differ from the checkpoint's (the differences are logged).
    pub resume_anyway: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrpoOutcome {
    pub steps: usize,
    pub first_reward: f64,
    pub last_reward: f64,
    pub final_dir: Option<PathBuf>,
}

// ---------------------------------------------------------------- the math

/// Group-normalised advantages: reward − group mean, divided by (group std + 1e-4) when `scale`
/// (std with the n − 1 denominator, as torch's `std()`). Groups are consecutive runs of `group`.
pub fn advantages(rewards: &[f64], group: usize, scale: bool) -> Vec<f64> {
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group.max(1)) {
        let n = g.len() as f64;
        let mean = g.iter().sum::<f64>() / n;
        let var = if g.len() > 1 {
            g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        for r in g {
            let a = r - mean;
            out.push(if scale { a / (var.sqrt() + 1e-4) } else { a });
        }
    }
    out
}

/// The settings of the clipped policy loss.
#[derive(Debug, Clone, PartialEq)]
pub struct LossSpec {
    pub loss_type: String,
    pub eps_low: f64,
    pub eps_high: f64,
    pub beta: f64,
    /// `dr_grpo` normaliser: the configured maximum completion length.
    pub max_completion_length: usize,
}

/// Per-token GRPO loss: −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) + β·KL, with r = e^(new−old)
/// and the k3 estimator KL = e^(ref−new) − (ref−new) − 1 (as TRL). `a[i]`: token i's advantage.
pub fn per_token_loss(
    new_lp: &Tensor,
    old_lp: &Tensor,
    ref_lp: Option<&Tensor>,
    a: &[f64],
    spec: &LossSpec,
) -> anyhow::Result<Tensor> {
    let n = a.len();
    anyhow::ensure!(new_lp.dims1()? == n, "one log-prob per policy token");
    let a = Tensor::from_vec(
        a.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        n,
        new_lp.device(),
    )?;
    let ratio = (new_lp - old_lp)?.exp()?;
    let l1 = (&ratio * &a)?;
    let l2 = (ratio.clamp(1.0 - spec.eps_low, 1.0 + spec.eps_high)? * &a)?;
    let mut per = l1.minimum(&l2)?.neg()?;
    if spec.beta != 0.0 {
        if let Some(r) = ref_lp {
            let d = (r - new_lp)?;
            let kl = ((d.exp()? - &d)? - 1.0)?;
            per = (per + (kl * spec.beta)?)?;
        }
    }
    Ok(per)
}

/// The weight of each token of sequence s in the aggregated loss, from the sequences' policy
/// token counts: grpo 1/(S·len_s) (mean per sequence, then over sequences), bnpo 1/Σlen (the
/// token mean), dr_grpo 1/(S·max completion length).
pub fn seq_weights(lens: &[usize], spec: &LossSpec) -> Vec<f64> {
    let n_seqs = lens.len().max(1) as f64;
    let total = lens.iter().sum::<usize>().max(1) as f64;
    lens.iter()
        .map(|&l| match spec.loss_type.as_str() {
            "grpo" => 1.0 / (n_seqs * l.max(1) as f64),
            "dr_grpo" => 1.0 / (n_seqs * spec.max_completion_length.max(1) as f64),
            _ => 1.0 / total,
        })
        .collect()
}

/// The GRPO loss over a flat list of policy tokens: `seq[i]` is the sequence of token i
/// (0..n_seqs), `adv[s]` each sequence's advantage; per-token losses weighted by [`seq_weights`].
pub fn policy_loss(
    new_lp: &Tensor,
    old_lp: &Tensor,
    ref_lp: Option<&Tensor>,
    adv: &[f64],
    seq: &[usize],
    spec: &LossSpec,
) -> anyhow::Result<Tensor> {
    let mut lens = vec![0usize; adv.len()];
    for &s in seq {
        lens[s] += 1;
    }
    let w = seq_weights(&lens, spec);
    let a: Vec<f64> = seq.iter().map(|&s| adv[s]).collect();
    let per = per_token_loss(new_lp, old_lp, ref_lp, &a, spec)?;
    let wt: Vec<f32> = seq.iter().map(|&s| w[s] as f32).collect();
    let n = wt.len();
    Ok((per * Tensor::from_vec(wt, n, new_lp.device())?)?.sum_all()?)
}

// ---------------------------------------------------------------- rollouts and scoring

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

/// Weaver policy log-probs: every generated token (never a prompt or observation token),
/// teacher-forced with the rollout's memories. Returns (log-probs, sequence of each).
pub fn weaver_logprobs(
    model: &MemGenModel,
    rolls: &[Rollout],
    mode: &mut Mode,
) -> anyhow::Result<(Tensor, Vec<usize>)> {
    let rows: Vec<TfRow> = rolls.iter().map(|r| r.tf_row()).collect();
    let out = model.teacher_forced(&rows, mode)?;
    let (lp, at) = model.target_logprobs(&rows, &out)?;
    Ok((lp, at.into_iter().map(|(r, _)| r).collect()))
}

/// Trigger policy log-probs of the decisions each rollout made: the trigger re-reads the
/// rollout's token ids (no latents; in multi-turn rollouts the whole episode); the decision at
/// `pos` came from its logits at position `pos − 1`, sampled at `temperature`.
pub fn trigger_logprobs(
    model: &MemGenModel,
    rolls: &[Rollout],
    temperature: f64,
    mode: &mut Mode,
) -> anyhow::Result<(Tensor, Vec<usize>)> {
    let trig = model
        .trigger
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("trigger GRPO needs a trigger"))?;
    let dev = model.reasoner.device().clone();
    let b = rolls.len();
    let l = rolls.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
    let mut sel = vec![];
    let mut act = vec![];
    let mut seq = vec![];
    for (r, ro) in rolls.iter().enumerate() {
        for d in &ro.decisions {
            anyhow::ensure!(
                d.pos >= 1 && d.pos < ro.tokens.len(),
                "rollout {r}: trigger decision at {} outside its {} tokens",
                d.pos,
                ro.tokens.len()
            );
            sel.push((r * l + d.pos - 1) as u32);
            act.push(d.insert as u32);
            seq.push(r);
        }
    }
    if sel.is_empty() {
        return Ok((Tensor::zeros(0, DType::F32, &dev)?, seq));
    }
    // Only rows with decisions need reading, but keeping the batch whole keeps indices simple.
    let tokens: Vec<Vec<u32>> = rolls.iter().map(|r| r.tokens.clone()).collect();
    let pad = model.tokenizer.pad_id;
    let stream = Stream::tokens(&trig.backbone, &tokens, pad, Side::Right)?;
    let lg = trig.logits(&stream, None, mode)?;
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let n = sel.len();
    let lg = (lg
        .reshape((b * l, 2))?
        .index_select(&Tensor::from_vec(sel, n, &dev)?, 0)?
        / t)?;
    let lsm = candle_nn::ops::log_softmax(&lg, D::Minus1)?;
    let lp = lsm
        .gather(&Tensor::from_vec(act, (n, 1), &dev)?, 1)?
        .squeeze(1)?;
    Ok((lp, seq))
}

/// The policy GRPO trains: the weaver (policy tokens: the generated tokens) or the trigger
/// (policy tokens: its decisions), with the loss settings.
pub struct Policy<'a> {
    pub model: &'a MemGenModel,
    pub target: Target,
    /// The rollouts' sampling temperature (the trigger's decisions were sampled at it).
    pub temperature: f64,
    pub spec: &'a LossSpec,
}

impl Policy<'_> {
    /// Policy tokens of a rollout.
    pub fn len(&self, r: &Rollout) -> usize {
        match self.target {
            Target::Weaver => r.generated_tokens(),
            Target::Trigger => r.decisions.len(),
        }
    }

    /// Log-probs of the rollouts' policy tokens under the current weights, with the rollout of each.
    pub fn logprobs(
        &self,
        rolls: &[Rollout],
        mode: &mut Mode,
    ) -> anyhow::Result<(Tensor, Vec<usize>)> {
        match self.target {
            Target::Weaver => weaver_logprobs(self.model, rolls, mode),
            Target::Trigger => trigger_logprobs(self.model, rolls, self.temperature, mode),
        }
    }

    /// One rollout's share of the loss: its per-token losses (advantage `adv` on each policy
    /// token) summed and scaled by `weight`. `old`: the log-probs fixed before the first update
    /// (None: the new ones detached, ratio 1, as TRL does with one update per rollout);
    /// `reference`: the reference policy's, for the KL term. None when it has no policy tokens.
    pub fn loss(
        &self,
        r: &Rollout,
        adv: f64,
        weight: f64,
        old: Option<&Tensor>,
        reference: Option<&Tensor>,
        mode: &mut Mode,
    ) -> anyhow::Result<Option<Tensor>> {
        let n = self.len(r);
        if n == 0 {
            return Ok(None);
        }
        let (new, _) = self.logprobs(std::slice::from_ref(r), mode)?;
        let old = match old {
            Some(o) => o.clone(),
            None => new.detach(),
        };
        let per = per_token_loss(&new, &old, reference, &vec![adv; n], self.spec)?;
        Ok(Some((per.sum_all()? * weight)?))
    }
}

/// Run `f` with `vars` temporarily set to `values` (the reference policy for the KL term).
fn with_values<T>(
    vars: &[Var],
    values: &[Tensor],
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let saved: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().copy())
        .collect::<Result<_, _>>()?;
    for (v, x) in vars.iter().zip(values) {
        v.set(x)?;
    }
    let r = f();
    for (v, x) in vars.iter().zip(&saved) {
        v.set(x)?;
    }
    r
}

/// Mean task reward and inference insertions of greedy rollouts (validation).
pub fn eval_reward(
    model: &MemGenModel,
    task: &dyn Task,
    env: Option<&SearchEnv>,
    samples: &[Sample],
    batch: usize,
    max_new: usize,
    max_prompt: usize,
) -> anyhow::Result<(f64, f64)> {
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
    let n = samples.len().max(1) as f64;
    Ok((sum / n, ins as f64 / n))
}

// ---------------------------------------------------------------- the loop

/// GRPO-train the weaver or the trigger on `train`. Multi-turn tasks roll out episodes against
/// `env`, the search environment (unused for single-turn tasks).
pub fn train_grpo(
    model: &MemGenModel,
    run: &GrpoRun,
    task: &dyn Task,
    env: Option<&SearchEnv>,
    train: &[Sample],
    valid: &[Sample],
) -> anyhow::Result<GrpoOutcome> {
    let cfg = &run.cfg;
    let out = &run.out;
    let target = run.target;
    if target == Target::Trigger && model.trigger.is_none() {
        anyhow::bail!("trigger GRPO needs a model with a trigger");
    }
    if target == Target::Trigger && model.spec.insertion.max_inference_aug_num == 0 {
        // The trigger only decides at inference boundaries: there would be nothing to train.
        anyhow::bail!("trigger GRPO needs max_inference_aug_num > 0 (the trigger decides only where inference memories may go)");
    }
    if task.multi_turn() && env.is_none() {
        anyhow::bail!(
            "task `{}` is multi-turn: GRPO needs a search environment for its rollouts",
            task.name()
        );
    }
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    let g = cfg.num_generations;
    let prompts_per_micro = cfg.per_device_train_batch_size / g;
    anyhow::ensure!(
        prompts_per_micro > 0,
        "per_device_train_batch_size must be a multiple of num_generations"
    );
    let plan = Plan::new(
        train.len(),
        prompts_per_micro,
        cfg.gradient_accumulation_steps,
        cfg.num_train_epochs,
        cfg.max_steps,
        run.seed,
    )?;
    // Each step makes `num_iterations` optimiser updates on its rollouts; the schedule counts updates.
    let iters = cfg.num_iterations.max(1);
    let sched = Schedule::new(
        &cfg.lr_scheduler_type,
        cfg.learning_rate,
        cfg.warmup_ratio,
        plan.total_steps * iters,
    );
    // In checkpoint-key order, so the reference policy's saved tensors line up with them.
    let vars: Vec<Var> = model
        .named_vars()
        .into_iter()
        .filter(|(_, _, p)| *p == target.part())
        .map(|(_, v, _)| v)
        .collect();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: cfg.learning_rate,
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        },
    )?;
    // The reference policy for β > 0: the starting weights (before any resume).
    let reference: Option<Vec<Tensor>> = if cfg.beta != 0.0 {
        let start = out.join("reference.safetensors");
        Some(reference_values(&vars, model, &start, target)?)
    } else {
        None
    };
    let mut state = super::resume_or_start(
        out,
        run.resume.as_deref(),
        model,
        &mut opt,
        &[target.part()],
        TrainerState {
            total_steps: plan.total_steps,
            kind: target.kind().into(),
            settings: run.settings.clone(),
            ..Default::default()
        },
        run.resume_anyway,
    )?;
    let mut metrics = Metrics::open(out, (state.step > 0).then_some(state.step))?;
    let phase = match target {
        Target::Weaver => "weaver grpo",
        Target::Trigger => "trigger grpo",
    };
    let pb = progress(plan.total_steps, phase);
    pb.set_position(state.step as u64);
    let started = Instant::now();
    let elapsed = |st: &TrainerState| st.elapsed + started.elapsed().as_secs_f64();
    let spec = LossSpec {
        loss_type: cfg.loss_type.clone(),
        eps_low: cfg.epsilon,
        eps_high: cfg.epsilon_high.unwrap_or(cfg.epsilon),
        beta: cfg.beta,
        max_completion_length: cfg.max_completion_length,
    };
    // The trigger's decisions always sample at `temperature` (its policy); the reasoner's tokens
    // may be sampled apart (`reasoner_temperature`, trigger GRPO only).
    let (trig, token_temperature) = match target {
        Target::Trigger => (
            TriggerRollout {
                insertion_penalty: cfg.insertion_penalty,
                decision_temperature: Some(cfg.temperature),
            },
            cfg.reasoner_temperature.unwrap_or(cfg.temperature),
        ),
        Target::Weaver => (TriggerRollout::default(), cfg.temperature),
    };
    let policy = Policy {
        model,
        target,
        temperature: cfg.temperature,
        spec: &spec,
    };
    let weight = cfg
        .reward_weights
        .as_ref()
        .and_then(|w| w.first().copied())
        .unwrap_or(1.0);
    let (mut first_reward, mut last_reward) = (None, f64::NAN);
    let mut stopped = false;

    while state.step < plan.total_steps {
        let s = state.step;
        let t0 = Instant::now();
        // ---- rollouts for every micro-batch of this step ----
        let micro = plan.micro_batches(s);
        let mut batches = vec![];
        let mut gen_tokens = 0usize;
        for (j, idx) in micro.iter().enumerate() {
            let samples: Vec<&Sample> = idx.iter().map(|&i| &train[i]).collect();
            let sampling = SamplingConfig {
                temperature: token_temperature,
                top_p: cfg.top_p,
                top_k: cfg.top_k,
                max_new_tokens: cfg.max_completion_length,
                seed: {
                    use rand::Rng;
                    step_rng(run.seed, (s * plan.accum + j) as u64, 0x5A3).random()
                },
            };
            let mut rs = rollouts(
                model,
                task,
                env,
                &samples,
                g,
                sampling,
                cfg.max_prompt_length,
                trig,
            )?;
            for r in &mut rs {
                r.reward *= weight;
            }
            gen_tokens += rs.iter().map(|r| r.sampled_tokens).sum::<usize>();
            let rewards: Vec<f64> = rs.iter().map(|r| r.reward).collect();
            let adv = advantages(&rewards, g, cfg.scale_rewards);
            // Everything below works one rollout at a time: the loss is a weighted sum over
            // tokens, so per-row backward passes add up to the batch gradient with a fraction of
            // the memory. Old log-probs: with one update per rollout they equal the new ones
            // (ratio 1), as TRL does; with more, they are fixed before the first update.
            let one = |r: &Rollout, mode: &mut Mode| -> anyhow::Result<Tensor> {
                Ok(policy.logprobs(std::slice::from_ref(r), mode)?.0)
            };
            let old: Option<Vec<Tensor>> = if iters > 1 {
                Some(
                    rs.iter()
                        .map(|r| one(r, &mut Mode::Infer))
                        .collect::<anyhow::Result<_>>()?,
                )
            } else {
                None
            };
            let refl: Option<Vec<Tensor>> = match &reference {
                Some(v) => Some(with_values(&vars, v, || {
                    rs.iter().map(|r| one(r, &mut Mode::Infer)).collect()
                })?),
                None => None,
            };
            batches.push((rs, adv, old, refl));
        }
        let gen_secs = t0.elapsed().as_secs_f64();

        // ---- num_iterations updates on these rollouts ----
        let (mut loss_sum, mut grad_norm, mut lr) = (0f64, 0f64, 0f64);
        for it in 0..iters {
            let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
            let mut any = false;
            for (j, (rs, adv, old, refl)) in batches.iter().enumerate() {
                let mut rng = step_rng(run.seed, ((s * iters + it) * plan.accum + j) as u64, 0x6A0);
                let lens: Vec<usize> = rs.iter().map(|r| policy.len(r)).collect();
                let w = seq_weights(&lens, &spec);
                for (r, ro) in rs.iter().enumerate() {
                    let Some(loss) = policy.loss(
                        ro,
                        adv[r],
                        w[r] / batches.len() as f64,
                        old.as_ref().map(|o| &o[r]),
                        refl.as_ref().map(|v| &v[r]),
                        &mut Mode::Train(&mut rng),
                    )?
                    else {
                        continue; // no policy tokens (e.g. no trigger decisions)
                    };
                    let l = loss.to_scalar::<f32>()? as f64;
                    if !l.is_finite() {
                        return Err(super::non_finite_stop(&pb, "loss", l, s + 1, out));
                    }
                    loss_sum += l / iters as f64;
                    let gs = loss.backward()?;
                    accumulate(&mut grads, &vars, &gs)?;
                    any = true;
                }
            }
            lr = sched.lr(s * iters + it);
            if any {
                grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
                if !grad_norm.is_finite() {
                    return Err(super::non_finite_stop(
                        &pb,
                        "gradient norm",
                        grad_norm,
                        s + 1,
                        out,
                    ));
                }
                opt.step(&grads, lr)?;
            }
        }
        state.step = s + 1;
        pb.set_position(state.step as u64);

        // ---- logging ----
        let all: Vec<&Rollout> = batches.iter().flat_map(|b| &b.0).collect();
        let n = all.len().max(1) as f64;
        let rmean = all.iter().map(|r| r.reward).sum::<f64>() / n;
        let rstd = (all.iter().map(|r| (r.reward - rmean).powi(2)).sum::<f64>() / n).sqrt();
        let task_mean = all.iter().map(|r| r.task_reward).sum::<f64>() / n;
        let ins = all.iter().map(|r| r.inference_insertions()).sum::<usize>() as f64 / n;
        let len = all.iter().map(|r| r.generated_tokens()).sum::<usize>() as f64 / n;
        first_reward.get_or_insert(rmean);
        last_reward = rmean;
        if state.step.is_multiple_of(cfg.logging_steps.max(1)) || state.step == plan.total_steps {
            let mut rec = record(state.step, plan.epoch_at(state.step), elapsed(&state));
            rec["loss"] = json!(loss_sum);
            rec["reward"] = json!(rmean);
            rec["reward_std"] = json!(rstd);
            rec["task_reward"] = json!(task_mean);
            rec["insertions_per_sample"] = json!(ins);
            rec["completion_length"] = json!(len);
            rec["lr"] = json!(lr);
            rec["grad_norm"] = json!(grad_norm);
            rec["tokens_per_s"] = json!(gen_tokens as f64 / gen_secs.max(1e-9));
            metrics.log(rec)?;
            let msg = format!(
                "reward {rmean:.3}±{rstd:.3} ins {ins:.2} len {len:.0} lr {lr:.2e} {:.0} tok/s",
                gen_tokens as f64 / gen_secs.max(1e-9)
            );
            pb.set_message(msg.clone());
            if pb.is_hidden() {
                say(
                    &pb,
                    &format!("step {}/{} {msg}", state.step, plan.total_steps),
                );
            }
        }

        // ---- validation (greedy reward), best model ----
        let last = state.step == plan.total_steps;
        if !valid.is_empty()
            && (due(&cfg.eval_strategy, cfg.eval_steps, &plan, s)
                || (last && cfg.eval_strategy != "no"))
        {
            let (vr, vins) = eval_reward(
                model,
                task,
                env,
                valid,
                cfg.per_device_eval_batch_size,
                cfg.max_completion_length,
                cfg.max_prompt_length,
            )?;
            let mut rec = record(state.step, plan.epoch_at(state.step), elapsed(&state));
            rec["eval_reward"] = json!(vr);
            rec["eval_insertions_per_sample"] = json!(vins);
            metrics.log(rec)?;
            say(
                &pb,
                &format!(
                    "step {} validation reward {vr:.3} insertions {vins:.2}",
                    state.step
                ),
            );
            // best_metric is "lower is better": store the negated reward.
            if state.best_metric.is_none_or(|b| -vr < b) {
                state.best_metric = Some(-vr);
                state.best_step = Some(state.step);
                let _hold = crate::signals::critical();
                model.save(&out.join(BEST))?;
            }
        }

        // ---- checkpoints ----
        if checkpoint_after_step(
            out,
            model,
            &opt,
            &state,
            elapsed(&state),
            &metrics,
            due(&cfg.save_strategy, cfg.save_steps, &plan, s),
            last,
            run.stop_after,
        )? {
            stopped = true;
            break;
        }
    }
    pb.finish_and_clear();
    if stopped {
        fail_if_interrupted(state.step, plan.total_steps, out)?;
        return Ok(GrpoOutcome {
            steps: state.step,
            first_reward: first_reward.unwrap_or(f64::NAN),
            last_reward,
            final_dir: None,
        });
    }
    let final_dir = out.join(match target {
        Target::Weaver => "weaver",
        Target::Trigger => "trigger",
    });
    if cfg.load_best_model_at_end && state.best_metric.is_some() && out.join(BEST).is_dir() {
        model.load_weights(
            &Path::new(out).join(BEST).join("model.safetensors"),
            &[target.part()],
        )?;
        eprintln!(
            "loaded the best model (step {}, validation reward {:.3})",
            state.best_step.unwrap_or(0),
            -state.best_metric.unwrap_or(f64::NAN)
        );
    }
    {
        let _hold = crate::signals::critical();
        model.save(&final_dir)?;
    }
    metrics.plot()?;
    Ok(GrpoOutcome {
        steps: state.step,
        first_reward: first_reward.unwrap_or(f64::NAN),
        last_reward,
        final_dir: Some(final_dir),
    })
}

/// The reference policy's values: saved at the start of a run (so a resumed run keeps the same
/// reference), read back when present.
fn reference_values(
    vars: &[Var],
    model: &MemGenModel,
    file: &Path,
    target: Target,
) -> anyhow::Result<Vec<Tensor>> {
    if file.is_file() {
        let map = candle_core::safetensors::load(file, model.reasoner.device())?;
        let keys: Vec<String> = model
            .named_vars()
            .into_iter()
            .filter(|(_, _, p)| *p == target.part())
            .map(|(k, _, _)| k)
            .collect();
        return keys
            .iter()
            .zip(vars)
            .map(|(k, v)| {
                let t = map
                    .get(k)
                    .ok_or_else(|| anyhow::anyhow!("{}: missing `{k}`", file.display()))?;
                Ok(t.to_dtype(v.dtype())?)
            })
            .collect();
    }
    let named: Vec<(String, Tensor)> = model
        .named_vars()
        .into_iter()
        .filter(|(_, _, p)| *p == target.part())
        .map(|(k, v, _)| Ok((k, v.as_tensor().copy()?)))
        .collect::<anyhow::Result<_>>()?;
    let map: std::collections::HashMap<String, Tensor> = named.iter().cloned().collect();
    let tmp = tempfile::Builder::new()
        .prefix(".reference.")
        .tempfile_in(file.parent().unwrap_or(Path::new(".")))?;
    candle_core::safetensors::save(&map, tmp.path())?;
    crate::util::persist(tmp, file)?;
    Ok(named.into_iter().map(|(_, t)| t).collect())
}
