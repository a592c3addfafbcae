//! One GRPO step as the shared loop's [`Objective`]: roll out every micro-batch of the step
//! (G rollouts per prompt, rewarded and group-normalised), then per update backpropagate each
//! rollout's [`Policy::loss`] term; validation is the greedy reward.

use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::Rng;
use serde_json::json;

use super::loss::{advantages, seq_weights, LossSpec};
use super::policy::{reference_values, with_values, Policy};
use super::rollout::{eval_reward, rollouts, Rollout, TriggerRollout};
use super::{GrpoRun, Target};
use crate::backbone::generate::SamplingConfig;
use crate::backbone::Mode;
use crate::config::GrpoConfig;
use crate::memory::checkpoint::Part;
use crate::memory::MemGenModel;
use crate::tasks::search::SearchEnv;
use crate::tasks::{Sample, Task};
use crate::training::step_rng;
use crate::training::trainer::{Backward, LogLine, Objective, StepBatch, Update, Validation};

/// One micro-batch's rollouts, their advantages, and the log-probs fixed before the updates:
/// the old policy's (only with several updates) and the reference policy's (only with β > 0).
struct Rolled {
    rollouts: Vec<Rollout>,
    adv: Vec<f64>,
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
                loss_type: cfg.loss_type.clone(),
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

    /// Roll out micro-batch `j` of step `s` (`accum` micro-batches per step): G rollouts per
    /// prompt, rewards weighted and group-normalised, log-probs fixed for the updates.
    fn roll_out(&self, s: usize, accum: usize, j: usize, idx: &[usize]) -> anyhow::Result<Rolled> {
        let cfg = self.cfg;
        let samples: Vec<&Sample> = idx.iter().map(|&i| &self.train[i]).collect();
        let sampling = SamplingConfig {
            temperature: self.token_temperature,
            top_p: cfg.top_p,
            top_k: cfg.top_k,
            max_new_tokens: cfg.max_completion_length,
            seed: step_rng(self.seed, (s * accum + j) as u64, 0x5A3).random(),
        };
        let g = cfg.num_generations;
        let mut rs = rollouts(
            self.model,
            self.task,
            self.env,
            &samples,
            g,
            sampling,
            cfg.max_prompt_length,
            self.trig,
        )?;
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
        Ok(Rolled {
            rollouts: rs,
            adv,
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
        let prompts = self.cfg.per_device_train_batch_size / self.cfg.num_generations;
        (self.train.len(), prompts)
    }
    fn updates_per_step(&self) -> usize {
        self.cfg.num_iterations.max(1)
    }

    /// The reference policy for β > 0: the starting weights (before any resume).
    fn prepare(&mut self, out: &Path) -> anyhow::Result<()> {
        if self.cfg.beta != 0.0 {
            let file = out.join("reference.safetensors");
            let values = reference_values(&self.vars, self.model, &file, self.target)?;
            self.reference = Some(values);
        }
        Ok(())
    }

    fn begin_step(&mut self, batch: &StepBatch) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let rolled = batch
            .micro
            .iter()
            .map(|(j, idx)| self.roll_out(batch.step, batch.accum, *j, idx))
            .collect::<anyhow::Result<Vec<_>>>()?;
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
        let lens: Vec<usize> = b.rollouts.iter().map(|r| policy.len(r)).collect();
        let w = seq_weights(&lens, &self.spec);
        for (r, ro) in b.rollouts.iter().enumerate() {
            let Some(loss) = policy.loss(
                ro,
                b.adv[r],
                w[r] / batch.n_micro as f64,
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

    fn end_step(&mut self) {
        let all: Vec<&Rollout> = self.rolled.iter().flat_map(|b| &b.rollouts).collect();
        let n = all.len().max(1) as f64;
        let mean = |f: &dyn Fn(&Rollout) -> f64| all.iter().map(|r| f(r)).sum::<f64>() / n;
        let reward = mean(&|r| r.reward);
        let var = mean(&|r| (r.reward - reward).powi(2));
        self.stats = Stats {
            reward,
            reward_std: var.sqrt(),
            task_reward: mean(&|r| r.task_reward),
            insertions: all.iter().map(|r| r.inference_insertions()).sum::<usize>() as f64 / n,
            length: all.iter().map(|r| r.generated_tokens()).sum::<usize>() as f64 / n,
        };
        self.first_reward.get_or_insert(reward);
        self.last_reward = reward;
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

    fn validate(&mut self, step: usize) -> anyhow::Result<Validation> {
        let cfg = self.cfg;
        let (vr, vins) = eval_reward(
            self.model,
            self.task,
            self.env,
            self.valid,
            cfg.per_device_eval_batch_size,
            cfg.max_completion_length,
            cfg.max_prompt_length,
        )?;
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
