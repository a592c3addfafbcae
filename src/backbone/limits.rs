//! Context limits of one backbone, checked before any work: a request that cannot fit the
//! backbone's context (`max_position_embeddings`) fails at once with one line instead of running
//! for minutes past the positions the model was trained on. What memories add to a request is
//! counted in `memory/limits.rs`.

use super::model::Backbone;

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
