//! Architecture hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use serde::{Deserialize, Serialize};

use super::BackboneError;
use candle_core::quantized::gguf_file;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "llama" | "LlamaForCausalLM" | "mistral" => Some(Arch::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            _ => None,
        }
    }
}

/// Everything the forward pass needs to know about a decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2).
    pub attention_bias: bool,
}

impl Config {
    /// From GGUF metadata (`{arch}.block_count`, …); `vocab_size` and tying come from the tensors.
    pub fn from_gguf(ct: &gguf_file::Content, file: &str) -> Result<Config, BackboneError> {
        let md = |key: &str| ct.metadata.get(key);
        let arch_name = md("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| BackboneError::format(file, "missing general.architecture"))?
            .clone();
        let arch = Arch::parse(&arch_name).ok_or_else(|| {
            BackboneError::format(
                file,
                format!("unsupported architecture `{arch_name}` (memgen supports llama and qwen2)"),
            )
        })?;
        let get_u = |k: &str| -> Result<usize, BackboneError> {
            let key = format!("{arch_name}.{k}");
            md(&key)
                .and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
                .map(|v| v as usize)
                .ok_or_else(|| BackboneError::format(file, format!("missing metadata `{key}`")))
        };
        let get_f = |k: &str, default: f64| -> f64 {
            md(&format!("{arch_name}.{k}"))
                .and_then(|v| v.to_f32().ok())
                .map(f64::from)
                .unwrap_or(default)
        };
        let hidden_size = get_u("embedding_length")?;
        let num_attention_heads = get_u("attention.head_count")?;
        let num_key_value_heads = get_u("attention.head_count_kv").unwrap_or(num_attention_heads);
        let embd = ct
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| BackboneError::format(file, "missing tensor token_embd.weight"))?;
        let vocab_size = embd.shape.dims()[0];
        Ok(Config {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: get_u("feed_forward_length")?,
            num_hidden_layers: get_u("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim: get_u("attention.key_length").unwrap_or(hidden_size / num_attention_heads),
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta: get_f("rope.freq_base", 10_000.0),
            max_position_embeddings: get_u("context_length").unwrap_or(32_768),
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
            attention_bias: arch == Arch::Qwen2
                || ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
        })
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str, file: &str) -> Result<Config, BackboneError> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| BackboneError::format(file, format!("invalid JSON: {e}")))?;
        let req_u = |k: &str| -> Result<usize, BackboneError> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| BackboneError::format(file, format!("missing field `{k}`")))
        };
        let arch_name = v
            .get("model_type")
            .and_then(|x| x.as_str())
            .or_else(|| {
                v.get("architectures")
                    .and_then(|a| a.get(0))
                    .and_then(|x| x.as_str())
            })
            .ok_or_else(|| BackboneError::format(file, "missing field `model_type`"))?;
        let arch = Arch::parse(arch_name).ok_or_else(|| {
            BackboneError::format(
                file,
                format!("unsupported architecture `{arch_name}` (memgen supports llama and qwen2)"),
            )
        })?;
        let hidden_size = req_u("hidden_size")?;
        let num_attention_heads = req_u("num_attention_heads")?;
        let opt_f = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        Ok(Config {
            arch,
            vocab_size: req_u("vocab_size")?,
            hidden_size,
            intermediate_size: req_u("intermediate_size")?,
            num_hidden_layers: req_u("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: req_u("num_key_value_heads").unwrap_or(num_attention_heads),
            head_dim: req_u("head_dim").unwrap_or(hidden_size / num_attention_heads),
            rms_norm_eps: opt_f("rms_norm_eps", 1e-6),
            rope_theta: opt_f("rope_theta", 10_000.0),
            max_position_embeddings: req_u("max_position_embeddings").unwrap_or(32_768),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            attention_bias: v
                .get("attention_bias")
                .and_then(|x| x.as_bool())
                .unwrap_or(arch == Arch::Qwen2),
        })
    }

    pub fn validate(&self, file: &str) -> Result<(), BackboneError> {
        let bad = |m: String| Err(BackboneError::format(file, m));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("zero attention heads".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "{} attention heads is not a multiple of {} key/value heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} is odd (rotary needs pairs)",
                self.head_dim
            ));
        }
        Ok(())
    }
}
