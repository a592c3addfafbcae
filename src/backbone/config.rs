//! Architecture hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`
//! (the latter in [`super::hf_config`], one function per family).
//!
//! Every field here changes the math of the forward pass; anything a checkpoint asks for that is
//! not represented here is refused when the config is read, so a model is never silently different.

use serde::{Deserialize, Serialize};

use super::BackboneError;
use candle_core::quantized::gguf_file;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    /// Qwen2 without q/k/v biases, plus an RMSNorm over each q and k head before RoPE.
    Qwen3,
    /// Llama with some layers that skip RoPE (NoPE).
    SmolLM3,
}

/// What memgen names in its messages.
pub const SUPPORTED_ARCHS: &str = "llama, qwen2, qwen3 and smollm3";

impl Arch {
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "llama" | "LlamaForCausalLM" | "mistral" => Some(Arch::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Some(Arch::Qwen2),
            "qwen3" | "Qwen3ForCausalLM" => Some(Arch::Qwen3),
            "smollm3" | "SmolLM3ForCausalLM" => Some(Arch::SmolLM3),
            _ => None,
        }
    }

    /// `model_type` and the `architectures` entry of a Hugging Face `config.json`.
    pub fn hf_names(self) -> (&'static str, &'static str) {
        match self {
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Arch::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
            Arch::SmolLM3 => ("smollm3", "SmolLM3ForCausalLM"),
        }
    }
}

/// How the rotary frequencies are rescaled (transformers' `rope_scaling`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor` (i.e. every inverse frequency divided by it).
    Linear { factor: f64 },
    /// Llama 3.1's band-wise rescaling (transformers' `_compute_llama3_parameters`): long
    /// wavelengths divided by `factor`, short ones kept, the band between interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors, as llama.cpp stores llama3 scaling in GGUF (`rope_freqs.weight`).
    Freqs { factors: Vec<f32> },
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
    /// Rescaled rotary frequencies (None: plain RoPE).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// RMSNorm over each q and k head (weights `q_norm`/`k_norm`, size head_dim) before RoPE.
    #[serde(default)]
    pub qk_norm: bool,
    /// Layers that apply no rotary embedding at all (SmolLM3's NoPE layers), ascending.
    #[serde(default)]
    pub nope_layers: Vec<usize>,
}

impl Config {
    /// Whether layer `li` rotates its queries and keys.
    pub fn uses_rope(&self, li: usize) -> bool {
        !self.nope_layers.contains(&li)
    }

    /// The rotary inverse frequencies (head_dim / 2 of them), rescaled as the config says,
    /// computed in f32 as transformers computes them (so the tables match it bit for bit).
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1f32 / (self.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => {
                base.iter().map(|f| f / *factor as f32).collect()
            }
            Some(RopeScaling::Freqs { factors }) => {
                base.iter().zip(factors).map(|(f, s)| f / s).collect()
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let (factor, low, high, old) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                    *original_max_position_embeddings as f32,
                );
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    })
                    .collect()
            }
        }
    }

    /// From GGUF metadata (`{arch}.block_count`, …, llama.cpp's names); `vocab_size`, tying, the
    /// q/k norms and llama3 frequency factors come from the tensors.
    pub fn from_gguf(ct: &gguf_file::Content, file: &str) -> Result<Config, BackboneError> {
        let md = |key: &str| ct.metadata.get(key);
        let arch_name = md("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| BackboneError::format(file, "missing general.architecture"))?
            .clone();
        let arch = Arch::parse(&arch_name).ok_or_else(|| {
            BackboneError::format(
                file,
                format!(
                    "unsupported architecture `{arch_name}` (memgen supports {SUPPORTED_ARCHS})"
                ),
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
        let bad = |m: String| Err(BackboneError::format(file, m));
        let hidden_size = get_u("embedding_length")?;
        let num_attention_heads = get_u("attention.head_count")?;
        let num_key_value_heads = get_u("attention.head_count_kv").unwrap_or(num_attention_heads);
        let head_dim = get_u("attention.key_length").unwrap_or(hidden_size / num_attention_heads);
        let num_hidden_layers = get_u("block_count")?;
        let embd = ct
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| BackboneError::format(file, "missing tensor token_embd.weight"))?;
        let vocab_size = embd.shape.dims()[0];
        if let Ok(rot) = get_u("rope.dimension_count") {
            if rot != head_dim {
                return bad(format!(
                    "metadata `{arch_name}.rope.dimension_count` = {rot}: partial rotary (head_dim {head_dim}) is not supported"
                ));
            }
        }
        for k in ["attention.sliding_window", "expert_count"] {
            if md(&format!("{arch_name}.{k}")).is_some() {
                return bad(format!(
                    "metadata `{arch_name}.{k}` is set: not supported by memgen"
                ));
            }
        }
        let scaling_type = md(&format!("{arch_name}.rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .cloned();
        let mut rope_scaling = match scaling_type.as_deref() {
            None | Some("none") => None,
            Some("linear") => Some(RopeScaling::Linear {
                factor: get_f("rope.scaling.factor", 1.0),
            }),
            Some(other) => {
                return bad(format!(
                    "metadata `{arch_name}.rope.scaling.type` = `{other}` is not supported (memgen implements linear and llama3)"
                ))
            }
        };
        // llama.cpp writes llama3 rope scaling as a tensor of per-frequency divisors.
        if let Some(info) = ct.tensor_infos.get("rope_freqs.weight") {
            if rope_scaling.is_some() {
                return bad("both rope_freqs.weight and rope.scaling.type are set".into());
            }
            if info.shape.elem_count() != head_dim / 2 {
                return bad(format!(
                    "tensor `rope_freqs.weight` has {} entries, expected head_dim/2 = {}",
                    info.shape.elem_count(),
                    head_dim / 2
                ));
            }
            rope_scaling = Some(RopeScaling::Freqs { factors: vec![] });
        }
        let qk_norm = ct.tensor_infos.contains_key("blk.0.attn_q_norm.weight");
        if arch == Arch::Qwen3 && !qk_norm {
            return bad("qwen3 without tensor `blk.0.attn_q_norm.weight`".into());
        }
        if arch != Arch::Qwen3 && qk_norm {
            return bad(format!(
                "tensor `blk.0.attn_q_norm.weight` on a {arch_name} model is not supported"
            ));
        }
        // llama.cpp keeps SmolLM3's NoPE layout in code, not metadata: every 4th layer.
        let nope_layers = if arch == Arch::SmolLM3 {
            nope_from_interval(num_hidden_layers, 4)
        } else {
            vec![]
        };
        Ok(Config {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: get_u("feed_forward_length")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta: get_f("rope.freq_base", 10_000.0),
            max_position_embeddings: get_u("context_length").unwrap_or(32_768),
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
            attention_bias: arch == Arch::Qwen2
                || ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
            rope_scaling,
            qk_norm,
            nope_layers,
        })
    }

    /// From a Hugging Face `config.json` (see `hf_config.rs`).
    pub fn from_hf_json(text: &str, file: &str) -> Result<Config, BackboneError> {
        super::hf_config::parse(text, file)
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
        if let Some(&l) = self
            .nope_layers
            .iter()
            .find(|&&l| l >= self.num_hidden_layers)
        {
            return bad(format!(
                "NoPE layer {l} but only {} layers",
                self.num_hidden_layers
            ));
        }
        Ok(())
    }
}

/// SmolLM3's default layout (transformers' `SmolLM3Config`): layer i uses RoPE unless
/// (i + 1) is a multiple of `interval`.
pub fn nope_from_interval(layers: usize, interval: usize) -> Vec<usize> {
    (0..layers)
        .filter(|i| interval > 0 && (i + 1) % interval == 0)
        .collect()
}
