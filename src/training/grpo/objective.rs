//! One GRPO step as the shared loop's [`Objective`]: roll out every micro-batch of the step
//! (G rollouts per prompt, rewarded and group-normalised), then per update backpropagate each
//! rollout's [`Policy::loss`] term; validation is the greedy reward.

use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::Rng;
use serde_json::json;

use super::loss::{advantages, seq_weights_over, LossSpec};
use super::policy::{reference_values, with_values, Policy};
use super::rollout::{eval_reward_sums, rollouts, Rollout, TriggerRollout};
use super::{GrpoRun, Target};
use crate::backbone::generate::SamplingConfig;
use crate::backbone::Mode;
use crate::config::GrpoConfig;
use crate::memory::checkpoint::Part;
use crate::memory::MemGenModel;
use crate::tasks::search::SearchEnv;
use crate::tasks::{Sample, Task};
use crate::training::step_rng;
use crate::training::trainer::{
    Backward, DataParallel, LogLine, Objective, StepBatch, Update, Validation,
};

/// One micro-batch's rollouts (this process's share), their advantages, their weights in the
/// whole micro-batch's loss, and the log-probs fixed before the updates: the old policy's (only
/// with several updates) and the reference policy's (only with β > 0).
struct Rolled {
    rollouts: Vec<Rollout>,
    adv: Vec<f64>,
    /// Policy tokens per rollout ([`Policy::len`]), then each rollout's [`seq_weights_over`].
    lens: Vec<usize>,
    weights: Vec<f64>,
    old: Option<Vec<Tensor>>,
    reference: Option<Vec<Tensor>>,
}

/// The step's numbers for the log: reward mean and spread, task reward, inference insertions
/// and generated tokens per rollout.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    reward: f64,
    reward_std: f64,
    task_reward: f64,
    insertions: f64,
    length: f64,
}

pub(super) struct Grpo<'a> {
    model: &'a MemGenModel,
    cfg: &'a GrpoConfig,
    target: Target,
    seed: u64,
    task: &'a dyn Task,
    env: Option<&'a SearchEnv>,
    train: &'a [Sample],
    valid: &'a [Sample],
    /// The trainable vars, in checkpoint-key order (so the reference policy's tensors line up).
    vars: Vec<Var>,
    /// The reference policy's values for β > 0: the run's starting weights.
    reference: Option<Vec<Tensor>>,
    spec: LossSpec,
    trig: TriggerRollout,
    /// The temperature of the reasoner's tokens in rollouts.
    token_temperature: f64,
    /// `reward_weights[0]`: the one reward function's weight.
    reward_weight: f64,
    /// This step: its rollouts, tokens sampled and seconds spent sampling, summed loss.
    rolled: Vec<Rolled>,
    gen_tokens: usize,
    gen_secs: f64,
    loss_sum: f64,
    stats: Stats,
    pub(super) first_reward: Option<f64>,
    pub(super) last_reward: f64,
}

impl<'a> Grpo<'a> {
    pub(super) fn new(
        model: &'a MemGenModel,
        run: &'a GrpoRun,
        task: &'a dyn Task,
        env: Option<&'a SearchEnv>,
        train: &'a [Sample],
        valid: &'a [Sample],
    ) -> Self {
        let cfg = &run.cfg;
        let vars = model
            .named_vars()
            .into_iter()
            .filter(|(_, _, p)| *p == run.target.part())
            .map(|(_, v, _)| v)
            .collect();
        // The trigger's decisions always sample at `temperature` (its policy); the reasoner's
        // tokens may be sampled apart (`reasoner_temperature`, trigger GRPO only).
        let (trig, token_temperature) = match run.target {
            Target::Trigger => (
                TriggerRollout {
                    insertion_penalty: cfg.insertion_penalty,
                    decision_temperature: Some(cfg.temperature),
                },
                cfg.reasoner_temperature.unwrap_or(cfg.temperature),
            ),
            Target::Weaver => (TriggerRollout::default(), cfg.temperature),
        };
        Grpo {
            model,
            cfg,
            target: run.target,
            seed: run.session.seed,
            task,
            env,
            train,
            valid,
            vars,
            reference: None,
            spec: LossSpec {
                loss_type: cfg.loss_type,
                eps_low: cfg.epsilon,
                eps_high: cfg.epsilon_high.unwrap_or(cfg.epsilon),
                beta: cfg.beta,
                max_completion_length: cfg.max_completion_length,
            },
            trig,
            token_temperature,
            reward_weight: cfg
                .reward_weights
                .as_ref()
                .and_then(|w| w.first().copied())
                .unwrap_or(1.0),
            rolled: vec![],
            gen_tokens: 0,
            gen_secs: 0.0,
            loss_sum: 0.0,
            stats: Stats::default(),
            first_reward: None,
            last_reward: f64::NAN,
        }
    }

    fn policy(&self) -> Policy<'_> {
        Policy {
            model: self.model,
            target: self.target,
            temperature: self.cfg.temperature,
            spec: &self.spec,
        }
    }

    /// Roll out this process's prompts `idx` of micro-batch `j` of step `s` (`accum`
    /// micro-batches per step), which start at position `off` of the whole micro-batch: G
    /// rollouts per prompt, rewards weighted and group-normalised, log-probs fixed for the
    /// updates. Each prompt's group is sampled on its own, with the seed of its position in the
    /// micro-batch, so the rollouts do not depend on how prompts are split over processes (the
    /// first position's seed is the micro-batch's).
    fn roll_out(
        &self,
        s: usize,
        accum: usize,
        j: usize,
        idx: &[usize],
        off: usize,
    ) -> anyhow::Result<Rolled> {
        let cfg = self.cfg;
        let mut seeds = step_rng(self.seed, (s * accum + j) as u64, 0x5A3);
        let seeds: Vec<u64> = (0..off + idx.len()).map(|_| seeds.random()).collect();
        let g = cfg.num_generations;
        let mut rs = vec![];
        for (&i, &seed) in idx.iter().zip(&seeds[off..]) {
            let sampling = SamplingConfig {
                temperature: self.token_temperature,
                top_p: cfg.top_p,
                top_k: cfg.top_k,
                max_new_tokens: cfg.max_completion_length,
                seed,
            };
            rs.extend(rollouts(
                self.model,
                self.task,
                self.env,
                &[&self.train[i]],
                g,
                sampling,
                cfg.max_prompt_length,
                self.trig,
            )?);
        }
        for r in &mut rs {
            r.reward *= self.reward_weight;
        }
        let rewards: Vec<f64> = rs.iter().map(|r| r.reward).collect();
        let adv = advantages(&rewards, g, cfg.scale_rewards);
        // The loss is a weighted sum over tokens, so per-rollout backward passes add up to the
        // batch gradient with a fraction of the memory. Old log-probs: with one update per
        // rollout they equal the new ones (ratio 1), as TRL does; with more, they are fixed
        // before the first update.
        let policy = self.policy();
        let one = |r: &Rollout| -> anyhow::Result<Tensor> {
            Ok(policy
                .logprobs(std::slice::from_ref(r), &mut Mode::Infer)?
                .0)
        };
        let old = if cfg.num_iterations.max(1) > 1 {
            Some(rs.iter().map(one).collect::<anyhow::Result<_>>()?)
        } else {
            None
        };
        let reference = match &self.reference {
            Some(v) => Some(with_values(&self.vars, v, || rs.iter().map(one).collect())?),
            None => None,
        };
        let lens = rs.iter().map(|r| policy.len(r)).collect();
        Ok(Rolled {
            rollouts: rs,
            adv,
            lens,
            weights: vec![],
            old,
            reference,
        })
    }
}

impl Objective for Grpo<'_> {
    fn kind(&self) -> &'static str {
        self.target.kind()
    }
    fn phase(&self) -> &'static str {
        match self.target {
            Target::Weaver => "weaver grpo",
            Target::Trigger => "trigger grpo",
        }
    }
    fn part(&self) -> Part {
        self.target.part()
    }
    fn final_name(&self) -> &'static str {
        match self.target {
            Target::Weaver => "weaver",
            Target::Trigger => "trigger",
        }
    }
    fn vars(&self) -> Vec<Var> {
        self.vars.clone()
    }
    fn items(&self) -> (usize, usize) {
        let prompts = self.cfg.args.per_device_train_batch_size / self.cfg.num_generations;
        (self.train.len(), prompts)
    }
    fn updates_per_step(&self) -> usize {
        self.cfg.num_iterations.max(1)
    }

    /// The reference policy for β > 0: the starting weights (before any resume).
    fn prepare(&mut self, out: &Path) -> anyhow::Result<()> {
        if self.cfg.beta != 0.0 {
            // Rank 0 writes the file when it is new; the others then read it (crate::distributed).
            let world = crate::distributed::world();
            let file = out.join("reference.safetensors");
            let load = || reference_values(&self.vars, self.model, &file, self.target);
            let from_root = if world.is_root() { Some(load()?) } else { None };
            world.barrier()?;
            self.reference = Some(match from_root {
                Some(values) => values,
                None => load()?,
            });
        }
        Ok(())
    }

    fn begin_step(&mut self, batch: &StepBatch, dp: &dyn DataParallel) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let mut rolled = batch
            .micro
            .iter()
            .zip(&batch.offset)
            .map(|((j, idx), &off)| self.roll_out(batch.step, batch.accum, *j, idx, off))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Each loss normalises over the whole micro-batch: its sequences and policy tokens summed
        // over the processes.
        let mut counts: Vec<f64> = rolled
            .iter()
            .flat_map(|b| [b.lens.len() as f64, b.lens.iter().sum::<usize>() as f64])
            .collect();
        dp.sum(&mut counts)?;
        for (b, c) in rolled.iter_mut().zip(counts.chunks(2)) {
            b.weights = seq_weights_over(&b.lens, c[0] as usize, c[1] as usize, &self.spec);
        }
        self.gen_tokens = rolled
            .iter()
            .flat_map(|b| &b.rollouts)
            .map(|r| r.sampled_tokens)
            .sum();
        self.rolled = rolled;
        self.gen_secs = t0.elapsed().as_secs_f64();
        self.loss_sum = 0.0;
        Ok(())
    }

    fn micro_batch(
        &mut self,
        batch: &StepBatch,
        update: usize,
        k: usize,
        backward: &mut Backward,
    ) -> anyhow::Result<()> {
        let iters = self.updates_per_step();
        let j = batch.micro[k].0;
        let at = (batch.step * iters + update) * batch.accum + j;
        let mut rng = step_rng(self.seed, at as u64, 0x6A0);
        let policy = Policy {
            model: self.model,
            target: self.target,
            temperature: self.cfg.temperature,
            spec: &self.spec,
        };
        let b = &self.rolled[k];
        for (r, ro) in b.rollouts.iter().enumerate() {
            let Some(loss) = policy.loss(
                ro,
                b.adv[r],
                b.weights[r] / batch.n_micro as f64,
                b.old.as_ref().map(|o| &o[r]),
                b.reference.as_ref().map(|v| &v[r]),
                &mut Mode::Train(&mut rng),
            )?
            else {
                continue; // no policy tokens (e.g. no trigger decisions)
            };
            let l = loss.to_scalar::<f32>()? as f64;
            self.loss_sum += l / iters as f64;
            backward(loss, l)?;
        }
        Ok(())
    }

    /// The step's numbers over every process's rollouts: sums first, then the spread around
    /// the global mean.
    fn end_step(&mut self, dp: &dyn DataParallel) -> anyhow::Result<()> {
        let all: Vec<&Rollout> = self.rolled.iter().flat_map(|b| &b.rollouts).collect();
        let total = |f: &dyn Fn(&Rollout) -> f64| all.iter().map(|r| f(r)).sum::<f64>();
        let mut sums = [
            all.len() as f64,
            total(&|r| r.reward),
            total(&|r| r.task_reward),
            all.iter().map(|r| r.inference_insertions()).sum::<usize>() as f64,
            all.iter().map(|r| r.generated_tokens()).sum::<usize>() as f64,
            self.gen_tokens as f64,
            self.loss_sum,
        ];
        dp.sum(&mut sums)?;
        let n = sums[0].max(1.0);
        let reward = sums[1] / n;
        let mut spread = [total(&|r| (r.reward - reward).powi(2))];
        dp.sum(&mut spread)?;
        self.stats = Stats {
            reward,
            reward_std: (spread[0] / n).sqrt(),
            task_reward: sums[2] / n,
            insertions: sums[3] / n,
            length: sums[4] / n,
        };
        self.gen_tokens = sums[5] as usize;
        self.loss_sum = sums[6];
        self.first_reward.get_or_insert(reward);
        self.last_reward = reward;
        Ok(())
    }

    fn log(&mut self, u: &Update) -> LogLine {
        let st = self.stats;
        let tok_s = self.gen_tokens as f64 / self.gen_secs.max(1e-9);
        let message = format!(
            "reward {:.3}±{:.3} ins {:.2} len {:.0} lr {:.2e} {tok_s:.0} tok/s",
            st.reward, st.reward_std, st.insertions, st.length, u.lr
        );
        LogLine {
            fields: vec![
                ("loss", json!(self.loss_sum)),
                ("reward", json!(st.reward)),
                ("reward_std", json!(st.reward_std)),
                ("task_reward", json!(st.task_reward)),
                ("insertions_per_sample", json!(st.insertions)),
                ("completion_length", json!(st.length)),
                ("lr", json!(u.lr)),
                ("grad_norm", json!(u.grad_norm)),
                ("tokens_per_s", json!(tok_s)),
            ],
            line: format!("step {}/{} {message}", u.step, u.total_steps),
            message,
        }
    }

    fn has_validation(&self) -> bool {
        !self.valid.is_empty()
    }

    fn validate(&mut self, step: usize, dp: &dyn DataParallel) -> anyhow::Result<Validation> {
        let cfg = self.cfg;
        let mut sums = eval_reward_sums(
            self.model,
            self.task,
            self.env,
            &self.valid[dp.share(self.valid.len())],
            cfg.args.per_device_eval_batch_size,
            cfg.max_completion_length,
            cfg.max_prompt_length,
        )?;
        dp.sum(&mut sums)?;
        let n = sums[2].max(1.0);
        let (vr, vins) = (sums[0] / n, sums[1] / n);
        Ok(Validation {
            // Lower is better for the loop: the reward negated.
            metric: -vr,
            fields: vec![
                ("eval_reward", json!(vr)),
                ("eval_insertions_per_sample", json!(vins)),
            ],
            line: format!("step {step} validation reward {vr:.3} insertions {vins:.2}"),
        })
    }

    fn best_note(&self, metric: f64) -> String {
        format!("validation reward {:.3}", -metric)
    }
}
