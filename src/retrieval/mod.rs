//! Retrieval for the search tasks: the Search-R1 `/retrieve` protocol (client and a built-in server).

use serde::{Deserialize, Serialize};

/// One retrieved passage, as Search-R1 returns it: `contents` is `"Title"\ntext` (title line first,
/// quotes included when the corpus has them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Passage {
    pub id: String,
    pub contents: String,
    pub score: Option<f32>,
}

/// Anything that answers a batch of queries with `topk` passages each (one list per query).
pub trait Retriever: Send + Sync {
    fn retrieve(&self, queries: &[String], topk: usize) -> anyhow::Result<Vec<Vec<Passage>>>;
}
