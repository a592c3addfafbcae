//! Tokenizers (from `tokenizer.json`, or rebuilt from GGUF metadata) and chat templates.

use std::collections::HashSet;
use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::BackboneError;

/// Qwen2's pre-tokenizer split: contractions, letters with one leading non-letter, single digits,
/// punctuation runs, newlines, and whitespace (trailing whitespace kept apart from the next word).
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
    r"|[^\r\n\p{L}\p{N}]?\p{L}+",
    r"|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"|\s*[\r\n]+",
    r"|\s+(?!\S)",
    r"|\s+"
);

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A tokenizer plus what generation and chat formatting need from the model's files.
#[derive(Clone)]
pub struct TextTokenizer {
    pub inner: Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Ids that end generation: the model's eos and, when present, `<|im_end|>`.
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
    pub chat_template: Option<String>,
}

impl TextTokenizer {
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        // No BOS/EOS post-processing: MemGen's prompts carry no BOS (docs/DESIGN.md, "Prompts and the chat template").
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode keeping special tokens (boundary checks and `--json` output see them).
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    pub fn decode_skip_special(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Render the model's own chat template (for `generate --chat`; tasks use MemGen's fixed ChatML).
    pub fn apply_chat_template(
        &self,
        messages: &[super::chat::Message],
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("the model has no chat template"))?;
        super::chat::render(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
    }

    pub fn from_gguf(ct: &gguf_file::Content, file: &str) -> Result<Self, BackboneError> {
        let md = |k: &str| ct.metadata.get(k);
        let err = |m: String| BackboneError::format(file, m);
        let model = md("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| err("missing tokenizer.ggml.model".into()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{model}` is not supported (memgen reads byte-level BPE, `gpt2`)"
            )));
        }
        let strings = |k: &str| -> Result<Vec<String>, BackboneError> {
            let arr = md(k)
                .and_then(|v| v.to_vec().ok())
                .ok_or_else(|| err(format!("missing {k}")))?;
            arr.iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|_| err(format!("{k} holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| err(format!("malformed merge `{m}`")))
            })
            .collect::<Result<_, _>>()?;
        let types: Vec<i64> = match md("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
            Some(arr) => arr
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(format!("building BPE: {e}")))?;
        let mut tk = Tokenizer::new(bpe);
        let pre = md("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "gpt2".into());
        match pre.as_str() {
            "qwen2" => {
                let split = Split::new(
                    SplitPattern::Regex(QWEN2_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| err(format!("pre-tokenizer regex: {e}")))?;
                tk.with_normalizer(Some(NFC))
                    .map_err(|e| err(format!("normalizer: {e}")))?;
                tk.with_pre_tokenizer(Some(Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, false, false).into(),
                ])));
            }
            "smollm" => {
                // SmolLM2: every digit its own piece, then the GPT-2 regex; no prefix space.
                tk.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])));
            }
            _ => {
                tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
        }
        tk.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == TOKEN_TYPE_CONTROL))
            .collect();
        let (ctrl, user): (Vec<_>, Vec<_>) = specials.into_iter().partition(|t| t.special);
        tk.add_special_tokens(ctrl)
            .map_err(|e| err(format!("special tokens: {e}")))?;
        tk.add_tokens(user)
            .map_err(|e| err(format!("added tokens: {e}")))?;
        let id = |k: &str| md(k).and_then(|v| v.to_u32().ok());
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let pad_id = id("tokenizer.ggml.padding_token_id");
        let name = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize).cloned());
        let chat_template = md("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok(Self::finish(
            tk,
            name(bos_id),
            name(eos_id),
            pad_id.or(eos_id),
            chat_template,
        ))
    }

    /// From a Hugging Face directory: `tokenizer.json` plus `tokenizer_config.json` (chat template,
    /// bos/eos names).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, BackboneError> {
        let tj = dir.join("tokenizer.json");
        let tk = Tokenizer::from_file(&tj)
            .map_err(|e| BackboneError::format(&tj.display().to_string(), e.to_string()))?;
        let tc = dir.join("tokenizer_config.json");
        let mut bos = None;
        let mut eos = None;
        let mut pad = None;
        let mut chat_template = None;
        if tc.is_file() {
            let file = tc.display().to_string();
            let text = std::fs::read_to_string(&tc).map_err(|e| BackboneError::io(&file, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| BackboneError::format(&file, format!("invalid JSON: {e}")))?;
            let tok_str = |k: &str| -> Option<String> {
                match v.get(k)? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Object(o) => {
                        o.get("content").and_then(|c| c.as_str()).map(String::from)
                    }
                    _ => None,
                }
            };
            bos = tok_str("bos_token");
            eos = tok_str("eos_token");
            pad = tok_str("pad_token");
            chat_template = match v.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(String::from),
                _ => None,
            };
        }
        let pad_id = pad
            .as_deref()
            .and_then(|p| tk.token_to_id(p))
            .or_else(|| eos.as_deref().and_then(|e| tk.token_to_id(e)));
        Ok(Self::finish(tk, bos, eos, pad_id, chat_template))
    }

    fn finish(
        tk: Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        pad_id: Option<u32>,
        chat_template: Option<String>,
    ) -> Self {
        let mut eos_ids: Vec<u32> = vec![];
        let mut seen = HashSet::new();
        for t in [eos_token.as_deref(), Some("<|im_end|>")]
            .into_iter()
            .flatten()
        {
            if let Some(id) = tk.token_to_id(t) {
                if seen.insert(id) {
                    eos_ids.push(id);
                }
            }
        }
        TextTokenizer {
            pad_id: pad_id.or_else(|| eos_ids.first().copied()).unwrap_or(0),
            inner: tk,
            bos_token,
            eos_token,
            eos_ids,
            chat_template,
        }
    }
}
