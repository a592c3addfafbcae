//! Weaver SFT: the whole loop in one place (nanoGPT style).
//!
//! data → ChatML tokens with the loss on the assistant turn → batches → teacher-forced loss with
//! memories at the prompt point and the first delimiter boundaries → AdamW with warmup/decay and
//! global-norm clipping → periodic validation loss, checkpoints and logs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use super::metrics::{record, Metrics};
use super::optim::{accumulate, clip_grad_norm, AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::{
    checkpoint_after_step, due, fail_if_interrupted, progress, say, step_rng, Plan, TrainerState,
    BEST,
};
use crate::backbone::Mode;
use crate::config::{IntervalStrategy, SftConfig};
use crate::memory::checkpoint::Part;
use crate::memory::limits::Budget;
use crate::memory::teacher::TfRow;
use crate::memory::{Kind, MemGenModel};
use crate::tasks::{render_chatml, Sample};

/// Samples [`sft_rows`] cut or left out, by reason, for the one-line notes of the caller.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RowCounts {
    /// Samples given.
    pub total: usize,
    /// Cut to `max_length` on the answer side (kept).
    pub cut: usize,
    /// No target, or the prompt alone fills `max_length`: nothing to learn from.
    pub unusable: usize,
    /// Longer than a backbone's context with their memories' latents, even after the cut.
    pub over_context: usize,
}

/// Turn samples into teacher-forcing rows: the prompt with its generation prompt, then the target,
/// `<|im_end|>` and `\n` — those last three carry the loss (docs/DESIGN.md, "Prompts and the
/// chat template"). Rows longer than `max_length` are cut on the answer side, as the original's
/// `max_length` truncation does; samples whose prompt alone fills `max_length`, or without a
/// target, are skipped. A row that still does not fit the reasoner's or weaver's context
/// (`max_position_embeddings`) once its memories' latents are counted is skipped too: it cannot
/// run. Each is counted in [`RowCounts`].
pub fn sft_rows(
    model: &MemGenModel,
    samples: &[Sample],
    max_length: usize,
) -> anyhow::Result<(Vec<TfRow>, RowCounts)> {
    let mut rows = vec![];
    let mut n = RowCounts {
        total: samples.len(),
        ..RowCounts::default()
    };
    for s in samples {
        let Some(target) = &s.target else {
            n.unusable += 1;
            continue;
        };
        let prompt = model.tokenizer.encode(&render_chatml(&s.messages, true))?;
        let answer = model.tokenizer.encode(&format!("{target}<|im_end|>\n"))?;
        let cut = prompt.len() + answer.len() > max_length;
        let Some(r) = sft_row(model, prompt, answer, max_length) else {
            n.unusable += 1;
            continue;
        };
        let budget = Budget {
            tokens: r.tokens.len(),
            new_tokens: 0,
            latents: model.latents_at(&r.points),
        };
        if model.check_fits(&s.id, budget).is_err() {
            n.over_context += 1;
            continue;
        }
        n.cut += usize::from(cut);
        rows.push(r);
    }
    Ok((rows, n))
}

/// One row from prompt and answer ids, with the training insertion points.
pub fn sft_row(
    model: &MemGenModel,
    prompt: Vec<u32>,
    answer: Vec<u32>,
    max_length: usize,
) -> Option<TfRow> {
    let p = prompt.len();
    if p == 0 || answer.is_empty() || p + 1 > max_length {
        return None;
    }
    let mut tokens = prompt;
    tokens.extend(answer);
    tokens.truncate(max_length);
    let loss_mask: Vec<bool> = (0..tokens.len()).map(|i| i >= p).collect();
    let ins = &model.spec.insertion;
    let prompt_points: Vec<usize> = if ins.max_prompt_aug_num > 0 {
        vec![p]
    } else {
        vec![]
    };
    let points = model.boundary.training_points(
        &tokens,
        &loss_mask,
        &prompt_points,
        ins.max_inference_aug_num,
    );
    Some(TfRow {
        tokens,
        loss_mask,
        points,
    })
}

/// `insertion_probability` < 1 (beyond the original): every answer boundary of `row` — not only
/// the first `max_inference_aug_num` — keeps its memory with probability `q`, then the cap
/// applies to the kept ones, as in generation with a trigger that inserts with probability `q`.
/// Prompt points always stay (the trigger does not decide them).
pub fn thin_points(model: &MemGenModel, row: &TfRow, q: f64, rng: &mut impl rand::Rng) -> TfRow {
    let prompt: Vec<usize> = row
        .points
        .iter()
        .filter(|p| p.kind == Kind::Prompt)
        .map(|p| p.pos)
        .collect();
    let all = model
        .boundary
        .training_points(&row.tokens, &row.loss_mask, &prompt, usize::MAX);
    let cap = model.spec.insertion.max_inference_aug_num;
    let mut kept = 0;
    let points = all
        .into_iter()
        .filter(|p| {
            p.kind == Kind::Prompt || {
                // One draw per boundary, also past the cap, so a row's draws do not depend on it.
                let keep = rng.random_bool(q) && kept < cap;
                kept += keep as usize;
                keep
            }
        })
        .collect();
    TfRow {
        tokens: row.tokens.clone(),
        loss_mask: row.loss_mask.clone(),
        points,
    }
}

/// How one SFT run is driven (beyond the config).
#[derive(Debug, Clone)]
pub struct SftRun {
    pub cfg: SftConfig,
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

#[derive(Debug, Clone, PartialEq)]
pub struct SftOutcome {
    pub steps: usize,
    /// Mean training loss of the first and the last logged window.
    pub first_loss: f64,
    pub last_loss: f64,
    pub best_eval: Option<f64>,
    /// `<out>/weaver/` when the run finished; None when it stopped early (checkpoint-last holds it).
    pub final_dir: Option<PathBuf>,
}

/// Target tokens of a row (tokens predicted from the one before: `loss_mask[i]`, i ≥ 1).
fn n_targets(r: &TfRow) -> usize {
    r.loss_mask.iter().skip(1).filter(|&&m| m).count()
}

/// Token-weighted mean validation loss, no dropout and no graph.
pub fn eval_loss(model: &MemGenModel, rows: &[TfRow], batch: usize) -> anyhow::Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in rows.chunks(batch.max(1)) {
        let (loss, count) = model.sft_loss(chunk, &mut Mode::Infer)?;
        sum += loss.to_scalar::<f32>()? as f64 * count as f64;
        n += count;
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

pub fn train_sft(
    model: &MemGenModel,
    run: &SftRun,
    train: &[TfRow],
    valid: &[TfRow],
) -> anyhow::Result<SftOutcome> {
    let cfg = &run.cfg;
    let out = &run.out;
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    let plan = Plan::new(
        train.len(),
        cfg.args.per_device_train_batch_size,
        cfg.args.gradient_accumulation_steps,
        cfg.args.num_train_epochs,
        cfg.args.max_steps,
        run.seed,
    )?;
    let sched = Schedule::new(
        cfg.args.lr_scheduler_type,
        cfg.args.learning_rate,
        cfg.args.warmup_ratio,
        plan.total_steps,
    );
    let q = cfg.insertion_probability;
    // Validation thins once, with a fixed draw per row, so its losses stay comparable.
    let thinned_valid: Vec<TfRow>;
    let valid = if q < 1.0 {
        thinned_valid = valid
            .iter()
            .enumerate()
            .map(|(i, r)| thin_points(model, r, q, &mut step_rng(run.seed, i as u64, 0xD82)))
            .collect();
        &thinned_valid[..]
    } else {
        valid
    };
    let vars = model.weaver_vars();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: cfg.args.learning_rate,
            beta1: cfg.args.adam_beta1,
            beta2: cfg.args.adam_beta2,
            eps: cfg.args.adam_epsilon,
            weight_decay: cfg.args.weight_decay,
        },
    )?;
    let mut state = super::resume_or_start(
        out,
        run.resume.as_deref(),
        model,
        &mut opt,
        &[Part::Weaver],
        TrainerState {
            total_steps: plan.total_steps,
            kind: "sft".into(),
            settings: run.settings.clone(),
            ..Default::default()
        },
        run.resume_anyway,
    )?;
    let mut metrics = Metrics::open(out, (state.step > 0).then_some(state.step))?;
    let pb = progress(plan.total_steps, "weaver sft");
    pb.set_position(state.step as u64);
    let started = Instant::now();
    let elapsed = |st: &TrainerState| st.elapsed + started.elapsed().as_secs_f64();

    let (mut win_loss, mut win_n, mut win_tokens) = (0f64, 0usize, 0usize);
    let mut win_start = Instant::now();
    let mut first_loss = None;
    let mut last_loss = f64::NAN;
    let mut stopped = false;

    while state.step < plan.total_steps {
        let s = state.step;
        // ---- forward/backward over this step's micro-batches, gradients summed ----
        let micro = plan.micro_batches(s);
        let mut grads: Vec<Option<candle_core::Tensor>> = vec![None; vars.len()];
        let mut step_loss = 0f64;
        for (j, idx) in micro.iter().enumerate() {
            let rows: Vec<&TfRow> = idx.iter().map(|&i| &train[i]).collect();
            win_tokens += rows.iter().map(|r| r.tokens.len()).sum::<usize>();
            // The batch loss is the mean NLL over all its target tokens, computed for the whole
            // micro-batch at once (rows with different memory layouts are woven together).
            let n_batch: usize = rows.iter().map(|r| n_targets(r)).sum();
            anyhow::ensure!(n_batch > 0, "a batch without answer tokens");
            let mut rng = step_rng(run.seed, (s * plan.accum + j) as u64, 0xD80);
            let batch: Vec<TfRow> = if q < 1.0 {
                let mut thin_rng = step_rng(run.seed, (s * plan.accum + j) as u64, 0xD81);
                rows.into_iter()
                    .map(|r| thin_points(model, r, q, &mut thin_rng))
                    .collect()
            } else {
                rows.into_iter().cloned().collect()
            };
            let (loss, _) = model.sft_loss(&batch, &mut Mode::Train(&mut rng))?;
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                return Err(super::non_finite_stop(&pb, "loss", l, s + 1, out));
            }
            // Micro-batch means are averaged, as Hugging Face scales by 1/accumulation.
            let w = 1.0 / micro.len() as f64;
            step_loss += l * w;
            let g = (loss * w)?.backward()?;
            accumulate(&mut grads, &vars, &g)?;
        }
        let grad_norm = clip_grad_norm(&mut grads, cfg.args.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(super::non_finite_stop(
                &pb,
                "gradient norm",
                grad_norm,
                s + 1,
                out,
            ));
        }
        let lr = sched.lr(s);
        opt.step(&grads, lr)?;
        state.step = s + 1;
        win_loss += step_loss;
        win_n += 1;
        last_loss = step_loss;
        pb.set_position(state.step as u64);

        // ---- logging ----
        if state.step.is_multiple_of(cfg.args.logging_steps.max(1))
            || state.step == plan.total_steps
        {
            let secs = win_start.elapsed().as_secs_f64();
            let avg = win_loss / win_n as f64;
            first_loss.get_or_insert(avg);
            let mut rec = record(state.step, plan.epoch_at(state.step), elapsed(&state));
            rec["loss"] = json!(avg);
            rec["lr"] = json!(lr);
            rec["grad_norm"] = json!(grad_norm);
            rec["tokens_per_s"] = json!(win_tokens as f64 / secs.max(1e-9));
            metrics.log(rec)?;
            pb.set_message(format!(
                "loss {avg:.4} lr {lr:.2e} {:.0} tok/s",
                win_tokens as f64 / secs.max(1e-9)
            ));
            if pb.is_hidden() {
                say(
                    &pb,
                    &format!(
                        "step {}/{} loss {avg:.4} lr {lr:.2e} grad_norm {grad_norm:.3} {:.0} tok/s",
                        state.step,
                        plan.total_steps,
                        win_tokens as f64 / secs.max(1e-9)
                    ),
                );
            }
            (win_loss, win_n, win_tokens) = (0.0, 0, 0);
            win_start = Instant::now();
        }

        // ---- validation, best model ----
        let last = state.step == plan.total_steps;
        if !valid.is_empty()
            && (due(cfg.args.eval_strategy, cfg.args.eval_steps, &plan, s)
                || (last && cfg.args.eval_strategy != IntervalStrategy::No))
        {
            let vl = eval_loss(model, valid, cfg.args.per_device_eval_batch_size)?;
            let mut rec = record(state.step, plan.epoch_at(state.step), elapsed(&state));
            rec["eval_loss"] = json!(vl);
            metrics.log(rec)?;
            say(&pb, &format!("step {} validation loss {vl:.4}", state.step));
            if vl.is_finite() && state.best_metric.is_none_or(|b| vl < b) {
                state.best_metric = Some(vl);
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
            due(cfg.args.save_strategy, cfg.args.save_steps, &plan, s),
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
        return Ok(SftOutcome {
            steps: state.step,
            first_loss: first_loss.unwrap_or(f64::NAN),
            last_loss,
            best_eval: state.best_metric,
            final_dir: None,
        });
    }
    // The final weaver: the best validation checkpoint when asked for, else the last weights.
    let final_dir = out.join("weaver");
    if cfg.args.load_best_model_at_end && state.best_metric.is_some() && out.join(BEST).is_dir() {
        let best = Path::new(out).join(BEST).join("model.safetensors");
        model.load_weights(&best, &[Part::Weaver])?;
        eprintln!(
            "loaded the best model (step {}, validation loss {:.4})",
            state.best_step.unwrap_or(0),
            state.best_metric.unwrap_or(f64::NAN)
        );
    }
    {
        let _hold = crate::signals::critical();
        model.save(&final_dir)?;
    }
    metrics.plot()?;
    Ok(SftOutcome {
        steps: state.step,
        first_loss: first_loss.unwrap_or(f64::NAN),
        last_loss,
        best_eval: state.best_metric,
        final_dir: Some(final_dir),
    })
}
