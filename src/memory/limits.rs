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
use crate::backbone::model::Backbone;

/// Errors of the limit checks; the CLI prints them as one line.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// `what` needs more positions than the `model` backbone's context.
    #[error("{what}: {tokens} tokens{new}{latents} = {needed} positions exceed the {model}'s context of {context} (max_position_embeddings)", new = plus("max_new_tokens", *new_tokens), latents = plus("memory latents (at most)", *latents))]
    TooLong {
        /// What was checked: `the prompt`, `test row gsm8k-17`, …
        what: String,
        /// Prompt (or prompt + answer) tokens.
        tokens: usize,
        /// Tokens still to be generated.
        new_tokens: usize,
        /// Latent positions memories may insert.
        latents: usize,
        /// Their sum.
        needed: usize,
        /// `reasoner`, `weaver` or `trigger`.
        model: &'static str,
        context: usize,
    },
}

fn plus(name: &str, n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" + {n} {name}")
    }
}

/// The positions one request needs (see the module docs for what each part covers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub tokens: usize,
    pub new_tokens: usize,
    pub latents: usize,
}

impl Budget {
    pub fn positions(&self) -> usize {
        self.tokens + self.new_tokens + self.latents
    }
}

/// The context of a backbone: the positions its rotary embedding was trained for.
pub fn context(b: &Backbone) -> usize {
    b.config().max_position_embeddings
}

/// Check `budget` against one backbone; `with_latents` false for the trigger (it reads ids only).
pub fn check_backbone(
    b: &Backbone,
    model: &'static str,
    what: &str,
    budget: Budget,
    with_latents: bool,
) -> Result<(), LimitError> {
    let budget = if with_latents {
        budget
    } else {
        Budget {
            latents: 0,
            ..budget
        }
    };
    check_context(context(b), model, what, budget)
}

/// Check `budget` against a context of `ctx` positions (from a loaded backbone, or from a model's
/// header before its weights load).
pub fn check_context(
    ctx: usize,
    model: &'static str,
    what: &str,
    budget: Budget,
) -> Result<(), LimitError> {
    if budget.positions() > ctx {
        return Err(LimitError::TooLong {
            what: what.to_string(),
            tokens: budget.tokens,
            new_tokens: budget.new_tokens,
            latents: budget.latents,
            needed: budget.positions(),
            model,
            context: ctx,
        });
    }
    Ok(())
}

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
