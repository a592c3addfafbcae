//! Driving the model with memory over task samples: the rollouts that evaluation and GRPO share.
//!
//! This sits above `memory` (it runs [`crate::memory::MemGenModel`]) and above `tasks` (it reads
//! samples, asks the search environment for observations, and grades), so `tasks/` stays data,
//! prompts and graders.
//!
//! - [`episode`]: one assistant turn, or a multi-turn search episode, per sample (batched).
//! - [`eval`]: `memgen eval`'s loop: roll out, grade, write `answers.jsonl` and `metrics.json`.

pub mod episode;
pub mod eval;

pub use episode::{run_episodes, EpisodeOptions, EpisodeResult};
pub use eval::{evaluate, EvalSettings};
