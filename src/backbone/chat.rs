//! Chat messages and their rendering: MemGen's fixed ChatML (what tasks and training feed the
//! reasoner) and the model's own Jinja template rendered with minijinja (Python-compatible string
//! methods on, since Hugging Face templates call `.strip()`, `.startswith()` and friends).

use serde::{Deserialize, Serialize};

/// One chat message. Roles: `system`, `user`, `assistant`, `tool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Render a conversation with MemGen's fixed ChatML template: every message as
/// `<|im_start|>{role}\n{content}<|im_end|>\n` (a `tool` message in the same format as a `user`
/// one, under its own role), then `<|im_start|>assistant\n` when `add_generation_prompt`. No BOS, no default system prompt.
pub fn render_chatml(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    out
}

/// Render `messages` with the model's own Jinja chat `template`.
pub fn render(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> anyhow::Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| anyhow::anyhow!("chat template does not parse: {e}"))?;
    let tmpl = env.get_template("chat")?;
    let out = tmpl
        .render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| anyhow::anyhow!("rendering the chat template: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml() {
        let msgs = vec![
            Message::system("S"),
            Message::user("Q?"),
            Message::assistant("A."),
            Message::new("tool", "obs"),
        ];
        assert_eq!(
            render_chatml(&msgs, true),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n\
             <|im_start|>assistant\nA.<|im_end|>\n<|im_start|>tool\nobs<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert_eq!(
            render_chatml(&[Message::user("hi")], false),
            "<|im_start|>user\nhi<|im_end|>\n"
        );
        assert_eq!(render_chatml(&[], true), "<|im_start|>assistant\n");
    }
}
