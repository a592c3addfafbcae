//! Weaver SFT: data → ChatML tokens with the loss on the assistant turn → teacher-forcing rows
//! with memories at the prompt point and the first delimiter boundaries; then the shared loop
//! ([`super::trainer`]) with [`Sft`] as its objective: the teacher-forced loss of each micro-batch,
//! the validation loss, and the windowed training loss in the logs.

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Var;
use serde_json::json;

use super::step_rng;
use super::trainer::{
    self, loop_config, Backward, DataParallel, LogLine, Objective, Session, StepBatch, Update,
    Validation,
};
use crate::backbone::Mode;
use crate::config::SftConfig;
use crate::distributed::Ranks;
use crate::memory::checkpoint::Part;
use crate::memory::limits::Budget;
use crate::memory::teacher::TfRow;
use crate::memory::{Kind, MemGenModel};
use crate::tasks::{render_chatml, Message, Sample};

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

/// Rows from a plain (prompt, answer) text pair, for callers without a task.
pub fn text_row(model: &MemGenModel, question: &str, answer: &str) -> anyhow::Result<TfRow> {
    let prompt = model
        .tokenizer
        .encode(&render_chatml(&[Message::user(question)], true))?;
    let ans = model.tokenizer.encode(&format!("{answer}<|im_end|>\n"))?;
    sft_row(model, prompt, ans, usize::MAX).ok_or_else(|| anyhow::anyhow!("empty row"))
}

/// How one SFT run is driven (beyond the config).
#[derive(Debug, Clone)]
pub struct SftRun {
    pub cfg: SftConfig,
    pub session: Session,
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
    let [sum, n] = eval_loss_sums(model, rows, batch)?;
    Ok(if n == 0.0 { f64::NAN } else { sum / n })
}

/// The validation loss summed over target tokens, and the token count.
fn eval_loss_sums(model: &MemGenModel, rows: &[TfRow], batch: usize) -> anyhow::Result<[f64; 2]> {
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in rows.chunks(batch.max(1)) {
        let (loss, count) = model.sft_loss(chunk, &mut Mode::Infer)?;
        sum += loss.to_scalar::<f32>()? as f64 * count as f64;
        n += count;
    }
    Ok([sum, n as f64])
}

/// SFT-train the weaver on `train`, validating on `valid` (docs/DESIGN.md, "The SFT loss").
pub fn train_sft(
    model: &MemGenModel,
    run: &SftRun,
    train: &[TfRow],
    valid: &[TfRow],
) -> anyhow::Result<SftOutcome> {
    let mut obj = Sft::new(model, run, train, valid);
    let done = trainer::train(
        model,
        &mut obj,
        &loop_config!(&run.cfg),
        &run.session,
        &mut Ranks::new(model.weaver_vars()),
    )?;
    Ok(SftOutcome {
        steps: done.steps,
        first_loss: obj.first_loss.unwrap_or(f64::NAN),
        last_loss: obj.last_loss,
        best_eval: done.best_metric,
        final_dir: done.final_dir,
    })
}

/// SFT as the loop's [`Objective`]: teacher-forced loss with memories at the prompt point and the
/// (possibly thinned) delimiter boundaries, averaged over the step's micro-batches.
struct Sft<'a> {
    model: &'a MemGenModel,
    train: &'a [TfRow],
    /// Thinned once, with a fixed draw per row, so validation losses stay comparable.
    valid: Cow<'a, [TfRow]>,
    /// `insertion_probability`.
    q: f64,
    seed: u64,
    micro: usize,
    eval_batch: usize,
    /// This step's loss: the mean over its micro-batches (this process's part, then summed over
    /// the processes at the end of the step), and the tokens it read.
    step_loss: f64,
    step_tokens: usize,
    /// The logging window: summed step losses, steps, tokens read, since when.
    win_loss: f64,
    win_n: usize,
    win_tokens: usize,
    win_start: Instant,
    /// Mean training loss of the first logged window, and the last step's loss.
    first_loss: Option<f64>,
    last_loss: f64,
}

impl<'a> Sft<'a> {
    fn new(model: &'a MemGenModel, run: &SftRun, train: &'a [TfRow], valid: &'a [TfRow]) -> Self {
        let q = run.cfg.insertion_probability;
        let valid = if q < 1.0 {
            Cow::Owned(
                valid
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        thin_points(
                            model,
                            r,
                            q,
                            &mut step_rng(run.session.seed, i as u64, 0xD82),
                        )
                    })
                    .collect(),
            )
        } else {
            Cow::Borrowed(valid)
        };
        Sft {
            model,
            train,
            valid,
            q,
            seed: run.session.seed,
            micro: run.cfg.args.per_device_train_batch_size,
            eval_batch: run.cfg.args.per_device_eval_batch_size,
            step_loss: 0.0,
            step_tokens: 0,
            win_loss: 0.0,
            win_n: 0,
            win_tokens: 0,
            win_start: Instant::now(),
            first_loss: None,
            last_loss: f64::NAN,
        }
    }
}

impl Objective for Sft<'_> {
    fn kind(&self) -> &'static str {
        "sft"
    }
    fn phase(&self) -> &'static str {
        "weaver sft"
    }
    fn part(&self) -> Part {
        Part::Weaver
    }
    fn final_name(&self) -> &'static str {
        "weaver"
    }
    fn vars(&self) -> Vec<Var> {
        self.model.weaver_vars()
    }
    fn items(&self) -> (usize, usize) {
        (self.train.len(), self.micro)
    }

    fn begin_step(&mut self, _: &StepBatch, _: &dyn DataParallel) -> anyhow::Result<()> {
        self.step_loss = 0.0;
        self.step_tokens = 0;
        Ok(())
    }

    fn micro_batch(
        &mut self,
        batch: &StepBatch,
        _update: usize,
        k: usize,
        backward: &mut Backward,
    ) -> anyhow::Result<()> {
        let (j, idx) = &batch.micro[k];
        let (whole, off) = (&batch.whole[*j], batch.offset[k]);
        // The batch loss is the mean NLL over the target tokens of the whole micro-batch (every
        // process's rows), so the processes' gradients sum to one process's over all of them.
        let n_whole: usize = whole.iter().map(|&i| n_targets(&self.train[i])).sum();
        anyhow::ensure!(n_whole > 0, "a batch without answer tokens");
        if idx.is_empty() {
            return Ok(()); // a short last micro-batch left this process nothing
        }
        let rows: Vec<&TfRow> = idx.iter().map(|&i| &self.train[i]).collect();
        self.step_tokens += rows.iter().map(|r| r.tokens.len()).sum::<usize>();
        let n_mine: usize = rows.iter().map(|r| n_targets(r)).sum();
        let at = (batch.step * batch.accum + j) as u64;
        // Dropout: each process its own stream (offset 0: the one-process stream).
        let mut rng = step_rng(self.seed, at, 0xD80 + off as u64);
        let rows: Vec<TfRow> = if self.q < 1.0 {
            // Thinning draws run over the whole micro-batch in order, so a row's memories do
            // not depend on how the rows are split.
            let mut thin_rng = step_rng(self.seed, at, 0xD81);
            let thinned: Vec<TfRow> = whole
                .iter()
                .map(|&i| thin_points(self.model, &self.train[i], self.q, &mut thin_rng))
                .collect();
            thinned[off..off + idx.len()].to_vec()
        } else {
            rows.into_iter().cloned().collect()
        };
        // This process's rows at once (rows with different memory layouts are woven together).
        let (loss, _) = self.model.sft_loss(&rows, &mut Mode::Train(&mut rng))?;
        let l = loss.to_scalar::<f32>()? as f64;
        // Micro-batch means are averaged, as Hugging Face scales by 1/accumulation; this
        // process's rows weigh by their share of the micro-batch's tokens.
        let w = (n_mine as f64 / n_whole as f64) / batch.n_micro as f64;
        backward((loss * w)?, l)?;
        self.step_loss += l * w;
        Ok(())
    }

    fn end_step(&mut self, dp: &dyn DataParallel) -> anyhow::Result<()> {
        let mut step = [self.step_loss, self.step_tokens as f64];
        dp.sum(&mut step)?;
        self.win_loss += step[0];
        self.win_tokens += step[1] as usize;
        self.win_n += 1;
        self.last_loss = step[0];
        Ok(())
    }

    fn log(&mut self, u: &Update) -> LogLine {
        let tok_s = self.win_tokens as f64 / self.win_start.elapsed().as_secs_f64().max(1e-9);
        let avg = self.win_loss / self.win_n as f64;
        self.first_loss.get_or_insert(avg);
        (self.win_loss, self.win_n, self.win_tokens) = (0.0, 0, 0);
        self.win_start = Instant::now();
        let (lr, grad_norm) = (u.lr, u.grad_norm);
        LogLine {
            fields: vec![
                ("loss", json!(avg)),
                ("lr", json!(lr)),
                ("grad_norm", json!(grad_norm)),
                ("tokens_per_s", json!(tok_s)),
            ],
            message: format!("loss {avg:.4} lr {lr:.2e} {tok_s:.0} tok/s"),
            line: format!(
                "step {}/{} loss {avg:.4} lr {lr:.2e} grad_norm {grad_norm:.3} {tok_s:.0} tok/s",
                u.step, u.total_steps
            ),
        }
    }

    fn has_validation(&self) -> bool {
        !self.valid.is_empty()
    }

    fn validate(&mut self, step: usize, dp: &dyn DataParallel) -> anyhow::Result<Validation> {
        let mine = &self.valid[dp.share(self.valid.len())];
        let mut sums = eval_loss_sums(self.model, mine, self.eval_batch)?;
        dp.sum(&mut sums)?;
        let vl = if sums[1] == 0.0 {
            f64::NAN
        } else {
            sums[0] / sums[1]
        };
        Ok(Validation {
            metric: vl,
            fields: vec![("eval_loss", json!(vl))],
            line: format!("step {step} validation loss {vl:.4}"),
        })
    }

    fn best_note(&self, metric: f64) -> String {
        format!("validation loss {metric:.4}")
    }
}
