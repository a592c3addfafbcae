//! The GRPO objective as numbers: group-normalised advantages, the clipped-ratio per-token loss
//! with the k3 KL term, and how the three `loss_type`s weight each sequence's tokens
//! (docs/DESIGN.md, "GRPO"). Training and the tests call the same [`sequence_loss`].

use candle_core::Tensor;

use crate::config::LossType;

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
    pub loss_type: LossType,
    pub eps_low: f64,
    pub eps_high: f64,
    pub beta: f64,
    /// `dr_grpo` normaliser: the configured maximum completion length.
    pub max_completion_length: usize,
}

/// Per-token GRPO loss: −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) + β·KL, with r = e^(new−old)
/// and the k3 estimator KL = e^(ref−new) − (ref−new) − 1 (as TRL). `a[i]`: token i's advantage.
fn per_token_loss(
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
    seq_weights_over(lens, lens.len(), lens.iter().sum(), spec)
}

/// [`seq_weights`] of some of a batch's sequences (`lens`), normalised over the whole batch's
/// `n_seqs` sequences and `total` policy tokens: data-parallel ranks each hold a part.
pub fn seq_weights_over(lens: &[usize], n_seqs: usize, total: usize, spec: &LossSpec) -> Vec<f64> {
    let n_seqs = n_seqs.max(1) as f64;
    let total = total.max(1) as f64;
    lens.iter()
        .map(|&l| match spec.loss_type {
            LossType::Grpo => 1.0 / (n_seqs * l.max(1) as f64),
            LossType::DrGrpo => 1.0 / (n_seqs * spec.max_completion_length.max(1) as f64),
            LossType::Bnpo => 1.0 / total,
        })
        .collect()
}

/// One sequence's term of the GRPO loss: its per-token losses (advantage `adv` on each of its
/// policy tokens) summed and scaled by `weight` (its [`seq_weights`] entry, times any micro-batch
/// share). The loss of a batch is the sum of its sequences' terms; training backpropagates each
/// term apart, so only one rollout's graph is alive at a time. `old`: the log-probs fixed before
/// the first update (None: the new ones detached, ratio 1, as TRL does with one update per
/// rollout); `reference`: the reference policy's, for the KL term.
pub fn sequence_loss(
    new_lp: &Tensor,
    old_lp: Option<&Tensor>,
    ref_lp: Option<&Tensor>,
    adv: f64,
    weight: f64,
    spec: &LossSpec,
) -> anyhow::Result<Tensor> {
    let n = new_lp.dims1()?;
    let old = match old_lp {
        Some(o) => o.clone(),
        None => new_lp.detach(),
    };
    let per = per_token_loss(new_lp, &old, ref_lp, &vec![adv; n], spec)?;
    Ok((per.sum_all()? * weight)?)
}
