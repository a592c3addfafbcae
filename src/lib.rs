//! memgen — MemGen (generative latent memory for self-evolving LLM agents) on Candle.
//!
//! The modules follow the method, lowest layer first (each uses only the ones above it in this
//! list, plus `config`):
//!
//! - [`backbone`]: the frozen decoder: [`backbone::load`] a GGUF file or Hugging Face directory,
//!   its tokenizer, chat messages ([`backbone::chat`]), plain generation ([`backbone::generate`]).
//! - [`memory`]: the weaver that turns the reasoner's context into latent embeddings, the trigger
//!   that decides where to weave, and [`MemGenModel`], which splices latents into the reasoner's
//!   stream (teacher-forced for training, KV-cached for generation).
//! - [`tasks`]: datasets, prompts and graders; [`retrieval`]: the Search-R1 retriever the search
//!   tasks ask.
//! - [`rollout`]: driving the model over task samples: episodes and the [`rollout::evaluate`] loop.
//! - [`training`]: weaver SFT, weaver GRPO and trigger GRPO.
//! - [`config`]: the YAML run config ([`RunConfig`]).
//!
//! See `docs/DESIGN.md` for the data path and `README.md` for the command line.

mod allocator;
pub mod backbone;
// The binary's entry point (src/main.rs is another crate) and its one-line error formatting,
// which the parity test and the benches reuse; not a library API.
#[doc(hidden)]
pub mod cli;
pub mod config;
pub mod distributed;
pub mod memory;
pub mod retrieval;
pub mod rollout;
pub(crate) mod signals;
pub mod tasks;
pub mod training;
pub(crate) mod util;

pub use allocator::keep_freed_memory;
pub use backbone::{load, Backbone, LoadedModel, TextTokenizer};
pub use config::RunConfig;
pub use memory::{MemGenModel, MemGenSpec, Trigger, Weaver};
pub use tasks::{build_task, Sample, Task};
