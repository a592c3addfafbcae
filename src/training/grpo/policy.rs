//! The policy GRPO trains — the weaver (its policy tokens: the generated tokens) or the trigger
//! (its decisions) — scored on finished rollouts, and the reference policy of the KL term.

use std::path::Path;

use candle_core::{DType, Tensor, Var, D};

use super::loss::{sequence_loss, LossSpec};
use super::rollout::Rollout;
use super::Target;
use crate::backbone::{Mode, Side, Stream};
use crate::memory::teacher::TfRow;
use crate::memory::MemGenModel;

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

    /// One rollout's term of the loss: [`sequence_loss`] on its policy tokens' log-probs under
    /// the current weights (advantage `adv`, weight `weight`; `old` and `reference` as there).
    /// None when it has no policy tokens.
    pub fn loss(
        &self,
        r: &Rollout,
        adv: f64,
        weight: f64,
        old: Option<&Tensor>,
        reference: Option<&Tensor>,
        mode: &mut Mode,
    ) -> anyhow::Result<Option<Tensor>> {
        if self.len(r) == 0 {
            return Ok(None);
        }
        let (new, _) = self.logprobs(std::slice::from_ref(r), mode)?;
        sequence_loss(&new, old, reference, adv, weight, self.spec).map(Some)
    }
}

/// Run `f` with `vars` temporarily set to `values` (the reference policy for the KL term).
pub(crate) fn with_values<T>(
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

/// The reference policy's values: saved at the start of a run (so a resumed run keeps the same
/// reference), read back when present.
pub(crate) fn reference_values(
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
