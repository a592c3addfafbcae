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
//!
//! The files: [`loss`] (advantages and the clipped loss), [`rollout`] (sampling and rewarding),
//! [`policy`] (scoring rollouts under the current weights), [`objective`] (one GRPO step for the
//! shared loop in [`super::trainer`]).

mod loss;
mod objective;
mod policy;
mod rollout;

use std::path::PathBuf;

pub use loss::{advantages, seq_weights, sequence_loss, LossSpec};
pub use policy::{trigger_logprobs, weaver_logprobs, Policy};
pub use rollout::{prompt_ids, rollouts, Rollout, TriggerRollout};

use super::trainer::{self, loop_config, Objective, Session};
use crate::config::GrpoConfig;
use crate::memory::checkpoint::Part;
use crate::memory::MemGenModel;
use crate::tasks::search::SearchEnv;
use crate::tasks::{Sample, Task};
use objective::Grpo;

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
    pub session: Session,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GrpoOutcome {
    pub steps: usize,
    pub first_reward: f64,
    pub last_reward: f64,
    pub final_dir: Option<PathBuf>,
}

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
    anyhow::ensure!(
        run.cfg.args.per_device_train_batch_size / run.cfg.num_generations > 0,
        "per_device_train_batch_size must be a multiple of num_generations"
    );
    let mut obj = Grpo::new(model, run, task, env, train, valid);
    let mut ranks = crate::distributed::Ranks::new(obj.vars());
    let done = trainer::train(
        model,
        &mut obj,
        &loop_config!(&run.cfg),
        &run.session,
        &mut ranks,
    )?;
    Ok(GrpoOutcome {
        steps: done.steps,
        first_reward: obj.first_reward.unwrap_or(f64::NAN),
        last_reward: obj.last_reward,
        final_dir: done.final_dir,
    })
}
