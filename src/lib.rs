//! memgen — MemGen (generative latent memory for self-evolving LLM agents) on Candle.
//!
//! The tree follows the method: a frozen decoder `backbone`, the `memory` modules that weave latent
//! memories into its input stream (weaver, trigger, insertion), `training` (SFT, GRPO), `tasks`
//! (datasets, graders, environments), `retrieval` (Search-R1 client and server), and the `cli`.

pub mod backbone;
pub mod cli;
pub mod config;
pub mod distributed;
pub mod memory;
pub mod retrieval;
pub mod signals;
pub mod tasks;
pub mod training;
pub mod util;
