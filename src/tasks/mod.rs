//! Tasks with verifiable answers: datasets, prompts, graders and environments.

use serde::{Deserialize, Serialize};

/// One chat message. Roles: `system`, `user`, `assistant`, `tool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}
