//! The one training loop weaver SFT, weaver GRPO and trigger GRPO share, read top to bottom like
//! nanoGPT's: resume → for each step { this process's micro-batches → forward/backward with
//! gradients summed → all-reduce → clip → AdamW → log → validate (best model) → checkpoint } →
//! final save. What differs between the three runs — the data, the loss of a micro-batch, the
//! logged numbers and the validation metric — comes from an [`Objective`].
//!
//! Data parallelism has two seams, both on [`DataParallel`]: which micro-batches of a step this
//! process runs ([`step_batch`]) and the gradient all-reduce once per optimiser update, before
//! clipping ([`update`]). The trait's defaults are one process: every item of every
//! micro-batch, nothing reduced; `crate::distributed::Ranks` is the MPI rank (one process
//! behaves exactly as the defaults).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use serde_json::Value;

use super::metrics::{record, Metrics};
use super::optim::{accumulate, clip_grad_norm, AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::{
    checkpoint_after_step, due, fail_if_interrupted, non_finite_stop, progress, resume_or_start,
    say, Plan, TrainerState, BEST,
};
use crate::memory::checkpoint::Part;
use crate::memory::MemGenModel;

/// The optimiser and bookkeeping settings every run has (the fields `SftConfig` and `GrpoConfig`
/// share), so the loop reads them in one shape.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoopConfig {
    pub epochs: f64,
    pub max_steps: Option<usize>,
    pub accum: usize,
    pub adamw: AdamWConfig,
    pub max_grad_norm: f64,
    pub lr_scheduler_type: crate::config::LrScheduler,
    pub warmup_ratio: f64,
    pub logging_steps: usize,
    pub eval_strategy: crate::config::IntervalStrategy,
    pub eval_steps: usize,
    pub save_strategy: crate::config::IntervalStrategy,
    pub save_steps: usize,
    pub load_best_model_at_end: bool,
}

/// A [`LoopConfig`] from an `SftConfig` or a `GrpoConfig` (their shared `TrainingArgs`).
macro_rules! loop_config {
    ($c:expr) => {{
        let c = &$c.args;
        $crate::training::trainer::LoopConfig {
            epochs: c.num_train_epochs,
            max_steps: c.max_steps,
            accum: c.gradient_accumulation_steps,
            adamw: $crate::training::optim::AdamWConfig {
                lr: c.learning_rate,
                beta1: c.adam_beta1,
                beta2: c.adam_beta2,
                eps: c.adam_epsilon,
                weight_decay: c.weight_decay,
            },
            max_grad_norm: c.max_grad_norm,
            lr_scheduler_type: c.lr_scheduler_type,
            warmup_ratio: c.warmup_ratio,
            logging_steps: c.logging_steps,
            eval_strategy: c.eval_strategy,
            eval_steps: c.eval_steps,
            save_strategy: c.save_strategy,
            save_steps: c.save_steps,
            load_best_model_at_end: c.load_best_model_at_end,
        }
    }};
}
pub(crate) use loop_config;

/// Where a run writes, and how it starts and stops (beyond its config): what SFT and GRPO runs
/// share.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub seed: u64,
    pub out: PathBuf,
    /// Resume from this checkpoint; without it, from `<out>/checkpoint-last/` if present.
    pub resume: Option<PathBuf>,
    /// Stop with a resumable checkpoint after this many steps (tests; like a Ctrl-C).
    pub stop_after: Option<usize>,
    /// The run's result-shaping settings ([`super::resume`]): stored in every checkpoint and
    /// compared on resume. None (a run driven without a config) stores and checks nothing.
    pub settings: Option<super::resume::Settings>,
    /// Resume even when `settings` differ from the checkpoint's (the differences are logged).
    pub resume_anyway: bool,
}

impl Session {
    /// A run from step 0 (or `<out>/checkpoint-last/`) to its end, recording no settings.
    pub fn new(seed: u64, out: impl Into<PathBuf>) -> Session {
        Session {
            seed,
            out: out.into(),
            resume: None,
            stop_after: None,
            settings: None,
            resume_anyway: false,
        }
    }
}

/// How several processes share a run. The single-process defaults run everything and reduce
/// nothing; the MPI implementation (crate::distributed::Ranks) gives each rank its share of
/// every micro-batch and all-reduces gradients.
pub(crate) trait DataParallel {
    /// Processes sharing the run: a micro-batch holds `per-device items × size` items.
    fn size(&self) -> usize {
        1
    }

    /// This process's share of a micro-batch of `n` items: a range of its positions. Every
    /// process keeps every micro-batch index, so the per-micro-batch RNG seeds do not depend on
    /// the number of processes.
    fn share(&self, n: usize) -> std::ops::Range<usize> {
        0..n
    }

    /// Combine the gradients this process accumulated (one slot per trainable var, None where it
    /// got none) with the other processes', once per optimiser update, before clipping. Called
    /// on every update, also one where this process backpropagated nothing, so a collective
    /// all-reduce never waits on a process that skipped it. `any`: did this process
    /// backpropagate a term; returns whether any process did (all then step the optimiser).
    fn reduce_grads(&mut self, _grads: &mut [Option<Tensor>], any: bool) -> anyhow::Result<bool> {
        Ok(any)
    }

    /// Sum `values` over the processes, in place (logged numbers, validation sums).
    fn sum(&self, _values: &mut [f64]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The micro-batches one process runs at one step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepBatch {
    /// The step (0-based).
    pub step: usize,
    /// The plan's micro-batches per step: RNG seeds index micro-batch `j` of step `s` as
    /// `s · accum + j`.
    pub accum: usize,
    /// Micro-batches in the whole step over all processes: losses average over them.
    pub n_micro: usize,
    /// This process's share of each micro-batch: (index within the step, item indices); empty
    /// when a short last micro-batch has no item for it.
    pub micro: Vec<(usize, Vec<usize>)>,
    /// Every process's items of each micro-batch (by index): what losses normalise over.
    pub whole: Vec<Vec<usize>>,
    /// Where this process's share starts in `whole[j]`, per entry of `micro`.
    pub offset: Vec<usize>,
}

/// The batch selection, in one place: the plan's micro-batches of step `s`, then this process's
/// share of each.
pub(crate) fn step_batch(plan: &Plan, s: usize, dp: &dyn DataParallel) -> StepBatch {
    let whole = plan.micro_batches(s);
    let ranges: Vec<_> = whole.iter().map(|items| dp.share(items.len())).collect();
    StepBatch {
        step: s,
        accum: plan.accum,
        n_micro: whole.len(),
        micro: ranges
            .iter()
            .zip(&whole)
            .enumerate()
            .map(|(j, (r, items))| (j, items[r.clone()].to_vec()))
            .collect(),
        offset: ranges.iter().map(|r| r.start).collect(),
        whole,
    }
}

/// What the loop knows after a step's updates, for the objective's log record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Update {
    /// Steps completed (1-based: the step just finished).
    pub step: usize,
    pub total_steps: usize,
    /// The learning rate and pre-clipping gradient norm of the step's last update.
    pub lr: f64,
    pub grad_norm: f64,
}

/// A log record's run-specific fields, the progress bar's message and the line printed when
/// stderr is not a terminal.
pub(crate) struct LogLine {
    pub fields: Vec<(&'static str, Value)>,
    pub message: String,
    pub line: String,
}

/// A validation result: `metric` is lower-is-better (a reward is negated), `fields` go into the
/// log record, `line` to the log.
pub(crate) struct Validation {
    pub metric: f64,
    pub fields: Vec<(&'static str, Value)>,
    pub line: String,
}

/// Called with each loss term to backpropagate and its value (checked for NaN/inf first).
pub(crate) type Backward<'b> = dyn FnMut(Tensor, f64) -> anyhow::Result<()> + 'b;

/// What one kind of run supplies to the loop.
pub(crate) trait Objective {
    /// `TrainerState::kind`: a checkpoint resumes only a run of the same kind.
    fn kind(&self) -> &'static str;
    /// The progress bar's label.
    fn phase(&self) -> &'static str;
    /// The trained part: what checkpoints restore and the best model reloads.
    fn part(&self) -> Part;
    /// The final model's directory under the output directory.
    fn final_name(&self) -> &'static str;
    /// The trainable vars, in checkpoint-key order.
    fn vars(&self) -> Vec<Var>;
    /// Training items, and items per micro-batch.
    fn items(&self) -> (usize, usize);
    /// Optimiser updates per step on the same data (GRPO's `num_iterations`).
    fn updates_per_step(&self) -> usize {
        1
    }
    /// Once, after the output directory exists and before resuming.
    fn prepare(&mut self, _out: &Path) -> anyhow::Result<()> {
        Ok(())
    }
    /// Before the step's updates (GRPO rolls out every micro-batch here; `dp` sums its
    /// normalisers over the processes).
    fn begin_step(&mut self, batch: &StepBatch, dp: &dyn DataParallel) -> anyhow::Result<()>;
    /// The loss terms of `batch.micro[k]` for update `update`, each handed to `backward` as soon
    /// as it exists (so one graph is alive at a time). Their gradients add up to the update's.
    fn micro_batch(
        &mut self,
        batch: &StepBatch,
        update: usize,
        k: usize,
        backward: &mut Backward,
    ) -> anyhow::Result<()>;
    /// After every step's updates; `dp` sums the step's logged numbers over the processes.
    fn end_step(&mut self, dp: &dyn DataParallel) -> anyhow::Result<()>;
    /// The log record of a step where logging is due.
    fn log(&mut self, u: &Update) -> LogLine;
    /// Is there validation data?
    fn has_validation(&self) -> bool;
    /// Validate the current weights after `step` steps, on this process's share of the
    /// validation items ([`DataParallel::share`]), the result summed over the processes by `dp`.
    fn validate(&mut self, step: usize, dp: &dyn DataParallel) -> anyhow::Result<Validation>;
    /// How the best metric reads in the "loaded the best model" note.
    fn best_note(&self, metric: f64) -> String;
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Finished {
    pub steps: usize,
    /// Best validation metric (lower is better), if any.
    pub best_metric: Option<f64>,
    /// `<out>/<final_name>/` when the run finished; None when it stopped early.
    pub final_dir: Option<PathBuf>,
}

/// Train `obj` to the end of its plan (or until a signal or `stop_after`), resuming from a
/// checkpoint when there is one.
pub(crate) fn train(
    model: &MemGenModel,
    obj: &mut dyn Objective,
    cfg: &LoopConfig,
    run: &Session,
    dp: &mut dyn DataParallel,
) -> anyhow::Result<Finished> {
    let mut lp = Loop::start(model, obj, cfg, run, dp.size())?;
    while lp.state.step < lp.plan.total_steps {
        let s = lp.state.step;
        // ---- this process's micro-batches; forward/backward; all-reduce; clip; AdamW ----
        let batch = step_batch(&lp.plan, s, dp);
        obj.begin_step(&batch, dp)?;
        let (lr, grad_norm) = lp.optimise(obj, &batch, dp)?;
        lp.state.step = s + 1;
        lp.pb.set_position(lp.state.step as u64);
        obj.end_step(dp)?;
        let last = lp.state.step == lp.plan.total_steps;

        // ---- logging ----
        if lp.state.step.is_multiple_of(cfg.logging_steps.max(1)) || last {
            lp.log(obj, lr, grad_norm)?;
        }

        // ---- validation, best model ----
        if obj.has_validation()
            && (due(cfg.eval_strategy, cfg.eval_steps, &lp.plan, s)
                || (last && cfg.eval_strategy != crate::config::IntervalStrategy::No))
        {
            lp.validate(obj, dp)?;
        }

        // ---- checkpoints; a signal or `stop_after` stops here ----
        let save = due(cfg.save_strategy, cfg.save_steps, &lp.plan, s);
        if checkpoint_after_step(
            &run.out,
            model,
            &lp.opt,
            &lp.state,
            lp.clock.elapsed(),
            &lp.metrics,
            save,
            last,
            run.stop_after,
        )? {
            lp.pb.finish_and_clear();
            fail_if_interrupted(lp.state.step, lp.plan.total_steps, &run.out)?;
            return Ok(Finished {
                steps: lp.state.step,
                best_metric: lp.state.best_metric,
                final_dir: None,
            });
        }
    }
    lp.pb.finish_and_clear();
    let final_dir = run.out.join(obj.final_name());
    // Rank 0 alone writes (crate::distributed); the others hold the same weights.
    if crate::distributed::world().is_root() {
        final_save(model, &*obj, cfg, &lp.state, &run.out)?;
        lp.metrics.plot()?;
    }
    Ok(Finished {
        steps: lp.state.step,
        best_metric: lp.state.best_metric,
        final_dir: Some(final_dir),
    })
}

/// A run in progress: its plan, optimiser, state and logs.
struct Loop<'a> {
    model: &'a MemGenModel,
    out: &'a Path,
    plan: Plan,
    sched: Schedule,
    max_grad_norm: f64,
    vars: Vec<Var>,
    opt: AdamW,
    state: TrainerState,
    metrics: Metrics,
    pb: indicatif::ProgressBar,
    clock: Clock,
}

impl<'a> Loop<'a> {
    /// Plan the run, build the optimiser, then resume from a checkpoint or start at step 0.
    fn start(
        model: &'a MemGenModel,
        obj: &mut dyn Objective,
        cfg: &LoopConfig,
        run: &'a Session,
        processes: usize,
    ) -> anyhow::Result<Self> {
        let out = run.out.as_path();
        let world = crate::distributed::world();
        if world.is_root() {
            std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
        }
        let (n_items, micro) = obj.items();
        // `micro` is per process (per device): a micro-batch spans all of them.
        let plan = Plan::new(
            n_items,
            micro * processes,
            cfg.accum,
            cfg.epochs,
            cfg.max_steps,
            run.seed,
        )?;
        // The schedule counts optimiser updates, which may be several per step.
        let sched = Schedule::new(
            cfg.lr_scheduler_type,
            cfg.adamw.lr,
            cfg.warmup_ratio,
            plan.total_steps * obj.updates_per_step(),
        );
        let vars = obj.vars();
        let mut opt = AdamW::new(vars.clone(), cfg.adamw)?;
        obj.prepare(out)?;
        let fresh = TrainerState {
            total_steps: plan.total_steps,
            kind: obj.kind().into(),
            settings: run.settings.clone(),
            ..Default::default()
        };
        let parts = [obj.part()];
        let state = resume_or_start(
            out,
            run.resume.as_deref(),
            model,
            &mut opt,
            &parts,
            fresh,
            run.resume_anyway,
        )?;
        // Every rank continues from rank 0's weights at rank 0's step (one process: no-op).
        crate::distributed::shard::broadcast_vars(world, &vars)?;
        world.check_same("the step to start from", &state.step.to_string())?;
        let metrics = if world.is_root() {
            Metrics::open(out, (state.step > 0).then_some(state.step))?
        } else {
            Metrics::unwritten()
        };
        let pb = progress(plan.total_steps, obj.phase());
        pb.set_position(state.step as u64);
        let clock = Clock {
            before: state.elapsed,
            started: Instant::now(),
        };
        Ok(Loop {
            model,
            out,
            plan,
            sched,
            max_grad_norm: cfg.max_grad_norm,
            vars,
            opt,
            state,
            metrics,
            pb,
            clock,
        })
    }

    /// The step's optimiser updates (`updates_per_step` on the same micro-batches): gradients
    /// summed over this process's micro-batches, reduced across processes, clipped to the global
    /// norm, then AdamW. An update without any loss term (GRPO rollouts without policy tokens)
    /// leaves weights and moments alone. Returns the last update's learning rate and gradient
    /// norm (0 when no update had a term).
    fn optimise(
        &mut self,
        obj: &mut dyn Objective,
        batch: &StepBatch,
        dp: &mut dyn DataParallel,
    ) -> anyhow::Result<(f64, f64)> {
        let (s, iters) = (batch.step, obj.updates_per_step());
        let (mut lr, mut grad_norm) = (0f64, 0f64);
        for it in 0..iters {
            let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
            let mut any = false;
            for k in 0..batch.micro.len() {
                obj.micro_batch(batch, it, k, &mut |loss: Tensor, value: f64| {
                    if !value.is_finite() {
                        return Err(non_finite_stop(&self.pb, "loss", value, s + 1, self.out));
                    }
                    accumulate(&mut grads, &self.vars, &loss.backward()?)?;
                    any = true;
                    Ok(())
                })?;
            }
            let any = dp.reduce_grads(&mut grads, any)?;
            lr = self.sched.lr(s * iters + it);
            if any {
                grad_norm = clip_grad_norm(&mut grads, self.max_grad_norm)?;
                if !grad_norm.is_finite() {
                    let pb = &self.pb;
                    return Err(non_finite_stop(
                        pb,
                        "gradient norm",
                        grad_norm,
                        s + 1,
                        self.out,
                    ));
                }
                self.opt.step(&grads, lr)?;
            }
        }
        Ok((lr, grad_norm))
    }

    /// Log the step: the objective's record to metrics.jsonl, its message to the progress bar
    /// (and as a line when the bar is hidden).
    fn log(&mut self, obj: &mut dyn Objective, lr: f64, grad_norm: f64) -> anyhow::Result<()> {
        let step = self.state.step;
        let line = obj.log(&Update {
            step,
            total_steps: self.plan.total_steps,
            lr,
            grad_norm,
        });
        let mut rec = record(step, self.plan.epoch_at(step), self.clock.elapsed());
        for (k, v) in line.fields {
            rec[k] = v;
        }
        self.metrics.log(rec)?;
        self.pb.set_message(line.message);
        if self.pb.is_hidden() {
            say(&self.pb, &line.line);
        }
        Ok(())
    }

    /// Validate, log the result, and save `checkpoint-best` when it is the best so far.
    fn validate(&mut self, obj: &mut dyn Objective, dp: &dyn DataParallel) -> anyhow::Result<()> {
        let step = self.state.step;
        let v = obj.validate(step, dp)?;
        let mut rec = record(step, self.plan.epoch_at(step), self.clock.elapsed());
        for (k, x) in v.fields {
            rec[k] = x;
        }
        self.metrics.log(rec)?;
        say(&self.pb, &v.line);
        if v.metric.is_finite() && self.state.best_metric.is_none_or(|b| v.metric < b) {
            self.state.best_metric = Some(v.metric);
            self.state.best_step = Some(step);
            if crate::distributed::world().is_root() {
                let _hold = crate::signals::critical();
                self.model.save(&self.out.join(BEST))?;
            }
        }
        Ok(())
    }
}

/// Wall time of the run across sessions.
struct Clock {
    /// Seconds spent in earlier sessions (from the checkpoint resumed).
    before: f64,
    started: Instant,
}

impl Clock {
    fn elapsed(&self) -> f64 {
        self.before + self.started.elapsed().as_secs_f64()
    }
}

/// Save the final model to `<out>/<final_name>/`: the best validation checkpoint when
/// `load_best_model_at_end` asks for it and there is one, else the last weights.
fn final_save(
    model: &MemGenModel,
    obj: &dyn Objective,
    cfg: &LoopConfig,
    state: &TrainerState,
    out: &Path,
) -> anyhow::Result<()> {
    let final_dir = out.join(obj.final_name());
    if cfg.load_best_model_at_end && state.best_metric.is_some() && out.join(BEST).is_dir() {
        model.load_weights(&out.join(BEST).join("model.safetensors"), &[obj.part()])?;
        eprintln!(
            "loaded the best model (step {}, {})",
            state.best_step.unwrap_or(0),
            obj.best_note(state.best_metric.unwrap_or(f64::NAN))
        );
    }
    let _hold = crate::signals::critical();
    model.save(&final_dir)?;
    Ok(())
}
