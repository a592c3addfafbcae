//! MemGen's memory: the weaver that turns the reasoner's context into latent embeddings, the
//! trigger that decides when to weave, and the model that splices latents into the reasoner's
//! input stream — teacher-forced for training and KV-cached for generation (see docs/DESIGN.md).

pub mod checkpoint;
pub mod generate;
pub(crate) mod insertion;
pub(crate) mod limits;
pub(crate) mod model;
pub(crate) mod params;
pub mod teacher;
pub(crate) mod trigger;
pub(crate) mod weaver;

use serde::{Deserialize, Serialize};

pub use insertion::BoundaryDetector;
pub use model::{MemGenModel, MemGenSpec};
pub use trigger::Trigger;
pub use weaver::Weaver;

/// Which query latents a memory is woven from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Right after the prompt (the generation prompt included), before the first answer token.
    Prompt,
    /// Inside the answer, at a delimiter boundary.
    Inference,
}

/// An insertion point in a token sequence: the latents go right before `tokens[pos]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub pos: usize,
    pub kind: Kind,
}

/// Caps and delimiters of memory insertion (`model.*` keys of the original configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InsertionConfig {
    #[serde(default = "one")]
    pub max_prompt_aug_num: usize,
    #[serde(default = "five")]
    pub max_inference_aug_num: usize,
    #[serde(default = "default_delimiters")]
    pub delimiters: Vec<String>,
}

fn one() -> usize {
    1
}
fn five() -> usize {
    5
}
pub fn default_delimiters() -> Vec<String> {
    vec![",".into(), ".".into(), "\n".into()]
}

impl Default for InsertionConfig {
    fn default() -> Self {
        InsertionConfig {
            max_prompt_aug_num: 1,
            max_inference_aug_num: 5,
            delimiters: default_delimiters(),
        }
    }
}
