//! The multi-turn search environment of the open-QA tasks (Search-R1 style), as pure logic: the
//! caller generates each assistant turn; [`SearchEnv::step`] cuts it, runs the search and returns
//! the next user message; [`Episode`] keeps the conversation.

use std::sync::Arc;

use super::{Message, TaskConfig};
use crate::backbone::TextTokenizer;
use crate::retrieval::client::{HttpRetriever, RetrievalConfig};
use crate::retrieval::Retriever;

/// The fixed reply to a turn that neither searches nor answers.
pub const INVALID_ACTION_REPLY: &str = "\nMy previous action is invalid. If I want to search, I should put the query between <search> and </search>. If I want to give the final answer, I should put the answer between <answer> and </answer>. Let me try again.\n";

/// The observation when retrieval fails.
pub const NO_PAGES: &str = crate::retrieval::RETRIEVAL_FAILED_TEXT;

/// Cuts an observation to the token budget (ending in `...` when it cut); plug in the tokenizer.
pub type Truncate = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// A [`Truncate`] from a tokenizer: texts longer than `max_tokens` tokens are cut to their first
/// `max_tokens` tokens and end in `...`; shorter ones pass unchanged.
pub fn token_truncator<E, D>(max_tokens: usize, encode: E, decode: D) -> Truncate
where
    E: Fn(&str) -> Vec<u32> + Send + Sync + 'static,
    D: Fn(&[u32]) -> String + Send + Sync + 'static,
{
    Arc::new(move |s: &str| {
        let ids = encode(s);
        if ids.len() <= max_tokens {
            s.to_string()
        } else {
            format!("{}...", decode(&ids[..max_tokens]))
        }
    })
}

/// What an assistant turn asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Search with this query (first line of the `<search>` body, trimmed).
    Search(String),
    /// Final answer (the `<answer>` body, trimmed).
    Answer(String),
    Invalid,
}

/// The response up to and including the first `</search>`, else the first `</answer>`, else all.
pub fn cut_response(raw: &str) -> &str {
    for tag in ["</search>", "</answer>"] {
        if let Some(p) = raw.find(tag) {
            return &raw[..p + tag.len()];
        }
    }
    raw
}

/// The first complete `<search>…</search>` or `<answer>…</answer>` of a (cut) response, as
/// Search-R1's `<(search|answer)>(.*?)</\1>` finds it.
pub fn parse_action(text: &str) -> Action {
    let mut best: Option<(usize, Action)> = None;
    for (open, close, is_search) in [
        ("<search>", "</search>", true),
        ("<answer>", "</answer>", false),
    ] {
        let mut from = 0;
        while let Some(p) = text[from..].find(open) {
            let start = from + p;
            let body_start = start + open.len();
            if let Some(c) = text[body_start..].find(close) {
                let body = text[body_start..body_start + c].trim();
                let action = if is_search {
                    Action::Search(body.lines().next().unwrap_or("").trim().to_string())
                } else {
                    Action::Answer(body.to_string())
                };
                if best.as_ref().is_none_or(|(b, _)| start < *b) {
                    best = Some((start, action));
                }
                break;
            }
            from = body_start;
        }
    }
    best.map(|(_, a)| a).unwrap_or(Action::Invalid)
}

pub use crate::retrieval::format_passages;

/// Send one query and fail if `retriever` does not answer. A failed search only shows the model
/// `Cannot find corresponding pages.` (as the original does), so a long run against a server that
/// is down would quietly train on nothing but that.
pub fn check_retriever(retriever: &dyn Retriever) -> anyhow::Result<()> {
    retriever
        .retrieve(&["connectivity check".to_string()], 1)
        .map(|_| ())
        .map_err(|e| {
            anyhow::anyhow!(
                "the retrieval server does not answer ({e:#}); start one with `memgen retriever serve` or set retrieval.url"
            )
        })
}

/// Settings of the environment.
#[derive(Clone)]
pub struct EnvConfig {
    pub max_turns: usize,
    pub topk: usize,
    pub use_information_tags: bool,
    pub truncate: Truncate,
}

impl EnvConfig {
    /// From the task config, with `truncate` the identity (plug in the tokenizer with
    /// [`EnvConfig::with_truncate`]; `max_obs_tokens` says how many tokens to keep).
    pub fn from_task(cfg: &TaskConfig) -> Self {
        Self {
            max_turns: cfg.max_turns,
            topk: cfg.topk,
            use_information_tags: cfg.use_information_tags,
            truncate: Arc::new(|s: &str| s.to_string()),
        }
    }
    pub fn with_truncate(mut self, truncate: Truncate) -> Self {
        self.truncate = truncate;
        self
    }
}

impl std::fmt::Debug for EnvConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvConfig")
            .field("max_turns", &self.max_turns)
            .field("topk", &self.topk)
            .field("use_information_tags", &self.use_information_tags)
            .finish_non_exhaustive()
    }
}

/// One processed assistant turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The response as kept in the conversation (cut after the first `</search>`/`</answer>`).
    pub response: String,
    pub action: Action,
    /// The next user message (search results or the invalid-action reply); `None` for an answer.
    pub observation: Option<String>,
}

/// The search environment: the retriever plus settings.
pub struct SearchEnv {
    retriever: Arc<dyn Retriever>,
    cfg: EnvConfig,
}

impl SearchEnv {
    pub fn new(retriever: Arc<dyn Retriever>, cfg: EnvConfig) -> Self {
        Self { retriever, cfg }
    }

    /// The environment `memgen eval` and GRPO training use: the Search-R1 HTTP client with the
    /// run's `retrieval` settings, the task's `topk` and tags, `max_turns` turns, observations cut
    /// to `max_obs_tokens` tokens of `tokenizer`.
    pub fn over_http(
        retrieval: &RetrievalConfig,
        task: &TaskConfig,
        max_turns: usize,
        max_obs_tokens: usize,
        tokenizer: Arc<TextTokenizer>,
    ) -> anyhow::Result<Self> {
        let retriever = HttpRetriever::new(retrieval.clone())?;
        let t2 = tokenizer.clone();
        let mut cfg = EnvConfig::from_task(task).with_truncate(token_truncator(
            max_obs_tokens,
            move |s| tokenizer.encode(s).unwrap_or_default(),
            move |ids| t2.decode(ids).unwrap_or_default(),
        ));
        cfg.max_turns = max_turns;
        Ok(Self::new(Arc::new(retriever), cfg))
    }

    pub fn config(&self) -> &EnvConfig {
        &self.cfg
    }

    /// Process one raw assistant response.
    pub fn step(&self, raw: &str) -> Step {
        self.step_batch(&[raw])
            .pop()
            .expect("one step per response")
    }

    /// Process a batch of raw responses, with one retrieval call for all their searches.
    pub fn step_batch(&self, raws: &[&str]) -> Vec<Step> {
        let mut steps: Vec<Step> = raws
            .iter()
            .map(|raw| {
                let response = cut_response(raw).to_string();
                let action = parse_action(&response);
                Step {
                    response,
                    action,
                    observation: None,
                }
            })
            .collect();
        let queries: Vec<(usize, String)> = steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match &s.action {
                Action::Search(q) => Some((i, q.clone())),
                _ => None,
            })
            .collect();
        let results = if queries.is_empty() {
            Ok(Vec::new())
        } else {
            let qs: Vec<String> = queries.iter().map(|(_, q)| q.clone()).collect();
            self.retriever.retrieve(&qs, self.cfg.topk)
        };
        if let Err(e) = &results {
            tracing::warn!("retrieval failed: {e:#}");
        }
        for (k, (i, _)) in queries.iter().enumerate() {
            let text = match &results {
                Ok(r) => match r.get(k) {
                    Some(passages) => (self.cfg.truncate)(&format_passages(passages)),
                    None => NO_PAGES.to_string(),
                },
                Err(_) => NO_PAGES.to_string(),
            };
            steps[*i].observation = Some(self.wrap(&text));
        }
        for s in &mut steps {
            if s.action == Action::Invalid {
                s.observation = Some(INVALID_ACTION_REPLY.to_string());
            }
        }
        steps
    }

    fn wrap(&self, text: &str) -> String {
        if self.cfg.use_information_tags {
            format!("<information>{}</information>", text.trim())
        } else {
            text.to_string()
        }
    }
}

/// A conversation in progress: the prompt, then assistant turns and observations.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    pub messages: Vec<Message>,
    /// Messages that belong to the prompt (not generated).
    pub prompt_len: usize,
    pub turns: usize,
    pub done: bool,
    /// The final answer, when the episode ended with one.
    pub answer: Option<String>,
}

impl Episode {
    pub fn new(prompt: Vec<Message>) -> Self {
        Self {
            prompt_len: prompt.len(),
            messages: prompt,
            turns: 0,
            done: false,
            answer: None,
        }
    }

    /// Record a processed turn: the (cut) response as an assistant message, then the observation as
    /// the next user message unless the episode ends (an answer, or `max_turns` reached).
    pub fn push(&mut self, step: Step, max_turns: usize) {
        if self.done {
            return;
        }
        self.turns += 1;
        self.messages.push(Message::assistant(step.response));
        if let Action::Answer(a) = step.action {
            self.answer = Some(a);
            self.done = true;
            return;
        }
        if self.turns >= max_turns {
            self.done = true;
            return;
        }
        if let Some(obs) = step.observation {
            self.messages.push(Message::user(obs));
        }
    }

    /// The generated assistant text, turns joined by `\n` (what graders read).
    pub fn assistant_text(&self) -> String {
        self.messages[self.prompt_len..]
            .iter()
            .filter(|m| m.role == "assistant")
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retrieval::Passage;

    #[test]
    fn cutting_and_parsing() {
        assert_eq!(
            cut_response("<think>x</think><search> a\nb </search> junk <answer>y</answer>"),
            "<think>x</think><search> a\nb </search>"
        );
        assert_eq!(
            cut_response("<answer> y </answer> more"),
            "<answer> y </answer>"
        );
        assert_eq!(cut_response("nothing"), "nothing");
        assert_eq!(
            parse_action("<search> capital of France\nsecond </search>"),
            Action::Search("capital of France".into())
        );
        assert_eq!(
            parse_action("<answer> Paris </answer>"),
            Action::Answer("Paris".into())
        );
        assert_eq!(
            parse_action("<answer>a</answer><search>q</search>"),
            Action::Answer("a".into())
        );
        assert_eq!(parse_action("<search>q"), Action::Invalid);
        assert_eq!(parse_action("<search>q</answer>"), Action::Invalid);
        assert_eq!(
            parse_action("<search>x <answer>a</answer>"),
            Action::Answer("a".into())
        );
    }

    #[test]
    fn truncator() {
        // A toy tokenizer: one token per character.
        let t = token_truncator(
            4,
            |s: &str| s.chars().map(|c| c as u32).collect(),
            |ids: &[u32]| ids.iter().filter_map(|&i| char::from_u32(i)).collect(),
        );
        assert_eq!(t("abc"), "abc");
        assert_eq!(t("abcd"), "abcd");
        assert_eq!(t("abcdef"), "abcd...");
    }

    #[test]
    fn passages() {
        let p = vec![
            Passage {
                id: "0".into(),
                contents: "\"Paris\"\nParis is the capital.\nMore.".into(),
                score: None,
            },
            Passage {
                id: "1".into(),
                contents: "T".into(),
                score: Some(1.0),
            },
        ];
        assert_eq!(
            format_passages(&p),
            "Doc 1(Title: \"Paris\") Paris is the capital.\nMore.\nDoc 2(Title: T) \n"
        );
    }
}
