//! Context limits, checked before any work: a request that cannot fit a backbone's context
//! (`max_position_embeddings`) fails at once with one line instead of running for minutes past
//! the positions the model was trained on.
//!
//! What is counted, per backbone:
//! - **reasoner**: the prompt, `max_new_tokens`, and every latent a memory may insert — latents
//!   take positions in its stream (docs/DESIGN.md, "Weaving a memory"), so a generation may add up to
//!   K_p for the prompt memory plus `max_inference_aug_num` × K_i. The count is an upper bound
//!   (the last sampled token is never fed back, and the trigger may insert fewer memories), so a
//!   request that passes never runs past the context.
//! - **weaver**: it reads the reasoner's stream so far plus K query positions, which is never more
//!   than the reasoner's total above, so the same bound against the weaver's own context.
//! - **trigger**: it reads token ids only (no latents): prompt + `max_new_tokens`.

use candle_core::Tensor;

use super::{Kind, MemGenModel, Point};
// The per-backbone check lives with the backbone (plain generation uses it too); memory adds
// what latents cost.
pub use crate::backbone::limits::{check_backbone, check_context, context, Budget, LimitError};

impl MemGenModel {
    /// Latent positions a generation may insert: K_p for the prompt memory (when on) and K_i for
    /// each of up to `max_inference` inference memories.
    pub fn latent_budget(&self, prompt_memory: bool, max_inference: usize) -> usize {
        let kp = if prompt_memory {
            self.weaver.k(Kind::Prompt)
        } else {
            0
        };
        kp + max_inference * self.weaver.k(Kind::Inference)
    }

    /// The latent positions of memories at `points` (teacher forcing: they are known exactly).
    pub fn latents_at(&self, points: &[Point]) -> usize {
        points.iter().map(|p| self.weaver.k(p.kind)).sum()
    }

    /// Check a request against the reasoner, the weaver and (when there is one) the trigger.
    pub fn check_fits(&self, what: &str, budget: Budget) -> Result<(), LimitError> {
        check_backbone(&self.reasoner, "reasoner", what, budget, true)?;
        if budget.latents > 0 {
            check_backbone(&self.weaver.backbone, "weaver", what, budget, true)?;
        }
        if let Some(t) = &self.trigger {
            check_backbone(&t.backbone, "trigger", what, budget, false)?;
        }
        Ok(())
    }

    /// The guard of every generation call: each prompt, with the latents replayed into it, plus
    /// the tokens and latents this call may add.
    pub(crate) fn check_generation(
        &self,
        prompts: &[Vec<u32>],
        replay: &[Vec<(usize, Tensor)>],
        new_tokens: usize,
        prompt_memory: bool,
        max_inference: usize,
    ) -> Result<(), LimitError> {
        let fresh = self.latent_budget(prompt_memory, max_inference);
        for (r, p) in prompts.iter().enumerate() {
            let replayed: usize = replay
                .get(r)
                .map(|v| v.iter().map(|(_, t)| t.dims()[0]).sum())
                .unwrap_or(0);
            let what = if prompts.len() == 1 {
                "the prompt".to_string()
            } else {
                format!("prompt {r} of the batch")
            };
            self.check_fits(
                &what,
                Budget {
                    tokens: p.len(),
                    new_tokens,
                    latents: replayed + fresh,
                },
            )?;
        }
        Ok(())
    }
}

/// The one warning line for training rows left out because they do not fit (`why` says what
/// they are longer than), or nothing when none were.
pub fn skipped_rows_warning(skipped: usize, total: usize, why: &str) -> Option<String> {
    (skipped > 0)
        .then(|| format!("warning: skipped {skipped} of {total} training rows longer than {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_every_part() {
        let e = LimitError::TooLong {
            what: "the prompt".into(),
            tokens: 20_000,
            new_tokens: 256,
            latents: 48,
            needed: 20_304,
            model: "reasoner",
            context: 8192,
        };
        assert_eq!(
            e.to_string(),
            "the prompt: 20000 tokens + 256 max_new_tokens + 48 memory latents (at most) = 20304 positions exceed the reasoner's context of 8192 (max_position_embeddings)"
        );
        assert_eq!(skipped_rows_warning(0, 5, "x"), None);
        assert_eq!(
            skipped_rows_warning(2, 5, "the context").unwrap(),
            "warning: skipped 2 of 5 training rows longer than the context"
        );
    }
}
