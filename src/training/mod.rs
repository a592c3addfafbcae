//! Training: weaver SFT, weaver GRPO and trigger GRPO (docs/DESIGN.md, "The SFT loss", "GRPO").
//! All three run through one loop, [`trainer`]; [`sft`] and [`grpo`] supply its objective.
//!
//! Everything a run needs to continue exactly where it stopped is a pure function of the step
//! number and the seed (data order, dropout and sampling RNGs) plus what a checkpoint stores
//! (trainable weights, AdamW moments, best-so-far bookkeeping). So "N steps, stop, resume, N
//! steps" equals "2N steps" bit for bit.

pub mod grpo;
pub(crate) mod metrics;
pub mod optim;
pub(crate) mod resume;
pub mod schedule;
pub mod sft;
pub(crate) mod trainer;

pub use trainer::Session;

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::config::IntervalStrategy;
use crate::memory::MemGenModel;
use crate::signals;
use optim::AdamW;

/// Install the SIGINT/SIGTERM handlers (once per process): the first signal asks the loop to save
/// a resumable checkpoint after the current step and stop; a second one exits at once.
pub fn install_signal_handlers() {
    signals::install("saving a resumable checkpoint after this step");
}

/// Has a signal asked the run to stop? Under MPI a collective: every rank calls it once per step
/// and they agree, so all stop after the same step (a signal may reach only some ranks).
pub fn interrupted() -> anyhow::Result<bool> {
    Ok(crate::distributed::world().agree_on_signal()?.is_some())
}

/// What `trainer_state.json` records beside a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TrainerState {
    /// Optimiser steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Best validation metric so far (loss: lower is better; reward: stored negated).
    pub best_metric: Option<f64>,
    pub best_step: Option<usize>,
    /// Wall time spent in earlier sessions of this run, seconds.
    pub elapsed: f64,
    /// `sft`, `weaver-grpo` or `trigger-grpo`: a checkpoint resumes only the same kind of run.
    pub kind: String,
    /// The settings that shape the result (see [`resume`]), compared when resuming. Absent in
    /// checkpoints written before memgen recorded them, and for runs started without a config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<resume::Settings>,
}

/// An RNG for one purpose at one step: independent of everything before it, so resuming needs
/// no RNG state. `salt` separates purposes (dropout, sampling, …).
pub fn step_rng(seed: u64, step: u64, salt: u64) -> rand::rngs::StdRng {
    // SplitMix64-style mixing so nearby (step, salt) pairs give unrelated seeds.
    let mut z =
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    rand::rngs::StdRng::seed_from_u64(z ^ (z >> 31))
}

/// How a run walks its data: shuffled each epoch (seeded by epoch), cut into micro-batches of
/// `micro` items, `accum` micro-batches per optimiser step; the last step of an epoch may have
/// fewer (as a Hugging Face dataloader without drop_last).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub n_items: usize,
    pub micro: usize,
    pub accum: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    pub seed: u64,
}

impl Plan {
    pub fn new(
        n_items: usize,
        micro: usize,
        accum: usize,
        epochs: f64,
        max_steps: Option<usize>,
        seed: u64,
    ) -> anyhow::Result<Plan> {
        anyhow::ensure!(n_items > 0, "no training samples");
        anyhow::ensure!(
            micro > 0 && accum > 0,
            "batch size and accumulation must be >= 1"
        );
        let n_micro = n_items.div_ceil(micro);
        let steps_per_epoch = n_micro.div_ceil(accum);
        let total_steps = match max_steps {
            Some(s) if s > 0 => s,
            _ => (epochs * steps_per_epoch as f64).ceil() as usize,
        };
        anyhow::ensure!(
            total_steps > 0,
            "the run has no steps (epochs or max_steps is 0)"
        );
        Ok(Plan {
            n_items,
            micro,
            accum,
            steps_per_epoch,
            total_steps,
            seed,
        })
    }

    pub fn epoch_of(&self, step: usize) -> usize {
        step / self.steps_per_epoch
    }

    /// Fractional epoch after `steps` steps (for logs).
    pub fn epoch_at(&self, steps: usize) -> f64 {
        steps as f64 / self.steps_per_epoch as f64
    }

    /// Is step `s` (0-based) the last of its epoch?
    pub fn ends_epoch(&self, step: usize) -> bool {
        (step + 1).is_multiple_of(self.steps_per_epoch)
    }

    /// The item indices of each micro-batch of step `step`.
    pub fn micro_batches(&self, step: usize) -> Vec<Vec<usize>> {
        let epoch = self.epoch_of(step);
        let mut order: Vec<usize> = (0..self.n_items).collect();
        order.shuffle(&mut step_rng(self.seed, epoch as u64, 0xDA7A));
        let j = step % self.steps_per_epoch;
        let chunks: Vec<&[usize]> = order.chunks(self.micro).collect();
        let lo = j * self.accum;
        let hi = ((j + 1) * self.accum).min(chunks.len());
        chunks[lo..hi].iter().map(|c| c.to_vec()).collect()
    }
}

/// Should something run after step `s` (0-based) under `strategy` (`steps` every `every`, `epoch`
/// at epoch ends, `no`)? The last step always counts for saving, so a run ends with a checkpoint.
pub fn due(strategy: IntervalStrategy, every: usize, plan: &Plan, s: usize) -> bool {
    match strategy {
        IntervalStrategy::Steps => every > 0 && (s + 1).is_multiple_of(every),
        IntervalStrategy::Epoch => plan.ends_epoch(s),
        IntervalStrategy::No => false,
    }
}

pub const LAST: &str = "checkpoint-last";
pub const BEST: &str = "checkpoint-best";
/// The previous `checkpoint-last`, present only when a swap was cut between its two renames.
pub const LAST_OLD: &str = "checkpoint-last.old";

/// Save a resumable checkpoint to `<out>/checkpoint-last/`: written in full (every file fsynced)
/// to a scratch directory first, then swapped in with durable renames, so a crash or a kill leaves
/// either the old checkpoint or the new one — `checkpoint-last`, or `checkpoint-last.old` when
/// the kill fell between the two renames ([`find_resume`] looks there too). A second signal
/// during the write waits for it to finish (see [`signals::critical`]).
pub fn save_checkpoint(
    out: &Path,
    model: &MemGenModel,
    opt: &AdamW,
    state: &TrainerState,
) -> anyhow::Result<PathBuf> {
    let _hold = signals::critical();
    let tmp = out.join("checkpoint-last.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    model.save(&tmp)?;
    opt.save(&tmp.join("optimizer.safetensors"))?;
    crate::util::write_atomic(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    let last = out.join(LAST);
    let old = out.join(LAST_OLD);
    if last.exists() {
        let _ = std::fs::remove_dir_all(&old);
        crate::util::rename_durable(&last, &old)?;
    }
    crate::util::rename_durable(&tmp, &last)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(last)
}

/// End of a step: save a resumable checkpoint when one is `due` (always on the `last` step and when
/// stopping) and redraw the curves with it. Returns whether the run stops here, before its last
/// step (a signal, or `stop_after`).
#[allow(clippy::too_many_arguments)]
pub fn checkpoint_after_step(
    out: &Path,
    model: &MemGenModel,
    opt: &AdamW,
    state: &TrainerState,
    elapsed: f64,
    metrics: &metrics::Metrics,
    due: bool,
    last: bool,
    stop_after: Option<usize>,
) -> anyhow::Result<bool> {
    signals::pause_for_test(state.step);
    let stop_now = interrupted()? || stop_after == Some(state.step);
    // Rank 0 alone writes checkpoints (crate::distributed); all ranks stop together.
    if (due || last || stop_now) && crate::distributed::world().is_root() {
        let mut st = state.clone();
        st.elapsed = elapsed;
        save_checkpoint(out, model, opt, &st)?;
        metrics.plot()?;
    }
    Ok(stop_now && !last)
}

/// A run that stopped early: when a signal stopped it, an [`signals::Interrupted`] error saying
/// where the checkpoint is and how to resume (the CLI exits 128 + the signal).
pub fn fail_if_interrupted(step: usize, total: usize, out: &Path) -> anyhow::Result<()> {
    if let Some(sig) = signals::requested() {
        return Err(signals::Interrupted {
            signal: sig,
            message: format!(
                "stopped by {} after step {step} of {total}: checkpoint saved in {}; run the same command again to resume (it picks up {LAST} in the output directory)",
                signals::name(sig),
                out.join(LAST).display()
            ),
        }
        .into());
    }
    Ok(())
}

/// The error for a non-finite loss or gradient norm at `step`, naming the checkpoint that really
/// exists in `out` (none yet, `checkpoint-last`, or the `.old` one a cut swap left). Leaves the
/// progress bar `pb` where it stopped.
pub fn non_finite_stop(
    pb: &indicatif::ProgressBar,
    what: &str,
    value: f64,
    step: usize,
    out: &Path,
) -> anyhow::Error {
    pb.abandon();
    let good = [LAST, LAST_OLD]
        .iter()
        .map(|n| out.join(n))
        .find_map(|d| {
            let text = std::fs::read_to_string(d.join("trainer_state.json")).ok()?;
            let st: TrainerState = serde_json::from_str(&text).ok()?;
            Some(format!(
                "the last good checkpoint is {} (step {}); resume from it with a lower learning rate and --resume-anyway",
                d.display(),
                st.step
            ))
        })
        .unwrap_or_else(|| {
            format!(
                "no checkpoint was written yet in {} (lower the learning rate and start again)",
                out.display()
            )
        });
    anyhow::anyhow!("{what} is {value} at step {step}: stopping; {good}")
}

/// The checkpoint to resume from: `explicit`, else `<out>/checkpoint-last/` when it exists (or the
/// previous one if a swap was interrupted).
pub fn find_resume(out: &Path, explicit: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    if let Some(d) = explicit {
        anyhow::ensure!(
            d.join("trainer_state.json").is_file(),
            "--resume {}: not a training checkpoint (no trainer_state.json)",
            d.display()
        );
        return Ok(Some(d.to_path_buf()));
    }
    for name in [LAST, LAST_OLD] {
        let d = out.join(name);
        if d.join("trainer_state.json").is_file() {
            return Ok(Some(d));
        }
    }
    Ok(None)
}

/// The trainer state a checkpoint recorded.
fn read_state(dir: &Path) -> anyhow::Result<TrainerState> {
    let text = std::fs::read_to_string(dir.join("trainer_state.json"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))
}

/// Restore weights of `parts`, optimiser moments and the trainer state from a checkpoint.
pub fn load_checkpoint(
    dir: &Path,
    model: &MemGenModel,
    opt: &mut AdamW,
    parts: &[crate::memory::checkpoint::Part],
    kind: &str,
) -> anyhow::Result<TrainerState> {
    let st = read_state(dir)?;
    anyhow::ensure!(
        st.kind == kind,
        "{}: a `{}` checkpoint cannot resume a `{kind}` run",
        dir.display(),
        st.kind
    );
    let missing = model.load_weights(&dir.join("model.safetensors"), parts)?;
    anyhow::ensure!(
        missing.is_empty(),
        "{}: checkpoint lacks {} trainable tensors (e.g. {})",
        dir.display(),
        missing.len(),
        missing[0]
    );
    opt.load(&dir.join("optimizer.safetensors"))?;
    Ok(st)
}

/// The state a run starts from: `fresh` (step 0, this run's kind, total steps and settings), or
/// the checkpoint [`find_resume`] finds (`explicit`, else `<out>/checkpoint-last`), loaded into
/// `model` and `opt` once its settings pass [`resume::check`] (`anyway`: `--resume-anyway`) and
/// its step count matches.
pub fn resume_or_start(
    out: &Path,
    explicit: Option<&Path>,
    model: &MemGenModel,
    opt: &mut AdamW,
    parts: &[crate::memory::checkpoint::Part],
    fresh: TrainerState,
    anyway: bool,
) -> anyhow::Result<TrainerState> {
    let Some(dir) = find_resume(out, explicit)? else {
        return Ok(fresh);
    };
    // Settings first (before any weights load): a changed max_steps is then named as such.
    let recorded = read_state(&dir)?;
    resume::check(
        &dir,
        recorded.settings.as_ref(),
        fresh.settings.as_ref(),
        anyway,
    )?;
    let mut state = load_checkpoint(&dir, model, opt, parts, &fresh.kind)?;
    anyhow::ensure!(
        state.total_steps == fresh.total_steps,
        "{}: the checkpoint belongs to a run of {} steps, this one has {} (same config needed to resume)",
        dir.display(),
        state.total_steps,
        fresh.total_steps
    );
    if fresh.settings.is_some() {
        // From here on the checkpoints record the settings this session runs with.
        state.settings = fresh.settings;
    }
    if crate::distributed::world().is_root() {
        eprintln!("resuming from {} at step {}", dir.display(), state.step);
    }
    Ok(state)
}

/// A progress bar for one phase, or a hidden one when stderr is not a terminal (logs then go to
/// stderr as lines).
pub fn progress(total: usize, phase: &str) -> indicatif::ProgressBar {
    if !crate::distributed::world().is_root() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{phase} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}}<{{eta_precise}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

/// Make a log line for a hidden progress bar.
pub fn say(pb: &indicatif::ProgressBar, line: &str) {
    if !crate::distributed::world().is_root() {
        return; // rank 0 alone reports progress
    }
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_stop_names_the_checkpoint_that_exists() {
        let out = tempfile::tempdir().unwrap();
        let pb = indicatif::ProgressBar::hidden();
        let msg = |o: &Path| non_finite_stop(&pb, "loss", f64::NAN, 3, o).to_string();
        assert!(
            msg(out.path()).contains("no checkpoint was written yet"),
            "{}",
            msg(out.path())
        );
        let write = |name: &str, step: usize| {
            let st = TrainerState {
                step,
                ..Default::default()
            };
            crate::util::write_atomic(
                &out.path().join(name).join("trainer_state.json"),
                serde_json::to_string(&st).unwrap().as_bytes(),
            )
            .unwrap();
        };
        // A swap cut between its renames leaves only the `.old` checkpoint.
        write(LAST_OLD, 2);
        let m = msg(out.path());
        assert!(m.contains(LAST_OLD) && m.contains("(step 2)"), "{m}");
        write(LAST, 4);
        let m = msg(out.path());
        assert!(
            m.contains(&format!("{} (step 4)", out.path().join(LAST).display())),
            "{m}"
        );
        assert!(m.starts_with("loss is NaN at step 3: stopping;"), "{m}");
    }
}
