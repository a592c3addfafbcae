//! The frozen decoder every part of MemGen stands on: LLaMA (3.x rope scaling), Qwen2, Qwen3 and
//! SmolLM3 on Candle, loaded from GGUF,
//! a Hugging Face directory or a hub repo id; its tokenizer and chat template; generation.

pub mod chat;
pub(crate) mod config;
pub mod generate;
pub(crate) mod hf_config;
pub(crate) mod kernels;
pub(crate) mod limits;
pub(crate) mod lora;
// Public only for the mask → positions helpers the tests and benches build inputs with.
#[doc(hidden)]
pub mod model;
pub(crate) mod ops;
pub mod stream;
pub(crate) mod tokenizer;
pub(crate) mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

pub use config::{Arch, Config, RopeScaling};
pub use lora::{LoraConfig, LoraSet, Target};
pub use model::{Backbone, KvCache, Mode};
pub use ops::Kernels;
pub use stream::{Side, Stream, StreamError};
pub use tokenizer::TextTokenizer;
pub use weights::BaseWeights;

/// Errors from reading model files: each names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {msg}")]
    Format { file: String, msg: String },
}

impl BackboneError {
    pub fn io(file: &str, source: std::io::Error) -> Self {
        BackboneError::Io {
            file: file.to_string(),
            source,
        }
    }
    pub fn format(file: &str, msg: impl Into<String>) -> Self {
        BackboneError::Format {
            file: file.to_string(),
            msg: msg.into(),
        }
    }
}

/// The file name of the default model, fetched by `scripts/fetch-model.sh`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The Qwen2 checkpoint fetched by `scripts/fetch-model.sh qwen`.
pub const QWEN_MODEL_FILE: &str = "Qwen2.5-Coder-0.5B-Instruct.gguf";

/// Where the default model lives: `$MEMGEN_MODELS_DIR`, else `./models`, else the source tree's
/// `models/` (so the binary finds it from any working directory of a checkout).
pub fn models_dir() -> PathBuf {
    if let Ok(d) = std::env::var("MEMGEN_MODELS_DIR") {
        return PathBuf::from(d);
    }
    let local = PathBuf::from("models");
    if local.join(DEFAULT_MODEL_FILE).is_file() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
}

pub fn default_model_path() -> PathBuf {
    models_dir().join(DEFAULT_MODEL_FILE)
}

/// Resolve a `--model` value: a `.gguf` file, a model directory, the words `default`/`smollm2`/`qwen`,
/// or a hub repo id (`org/name`, through the hf-hub cache; works offline once cached).
pub fn resolve_model(spec: Option<&str>) -> anyhow::Result<PathBuf> {
    let spec = spec.unwrap_or("default");
    match spec {
        "default" | "smollm2" | "smollm2-135m" => {
            let p = default_model_path();
            if !p.is_file() {
                anyhow::bail!(
                    "default model {} not found: run scripts/fetch-model.sh first",
                    p.display()
                );
            }
            return Ok(p);
        }
        "qwen" | "qwen2.5-coder-0.5b" => {
            let p = models_dir().join(QWEN_MODEL_FILE);
            if !p.is_file() {
                anyhow::bail!(
                    "Qwen model {} not found: run scripts/fetch-model.sh qwen first",
                    p.display()
                );
            }
            return Ok(p);
        }
        _ => {}
    }
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    let looks_like_repo = spec.split('/').count() == 2
        && !spec.starts_with('.')
        && !spec.ends_with(".gguf")
        && !spec.starts_with('/');
    if looks_like_repo {
        return hub_snapshot(spec);
    }
    anyhow::bail!("{spec}: no such file or directory")
}

/// Fetch (or find in the hf-hub cache) what a hub model needs, returning the snapshot directory.
fn hub_snapshot(repo_id: &str) -> anyhow::Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(repo_id.to_string());
    let needed = ["config.json", "tokenizer.json"];
    if let (Some(cfg), true) = (
        cached.get("config.json"),
        needed.iter().all(|f| cached.get(f).is_some()),
    ) {
        let dir = cfg.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file()
        {
            return Ok(dir);
        }
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(true)
        .build()
        .map_err(|e| anyhow::anyhow!("{repo_id}: hub client: {e}"))?;
    let repo = api.model(repo_id.to_string());
    let fetch = |f: &str| {
        repo.get(f).map_err(|e| {
            anyhow::anyhow!(
                "{repo_id}: not in the local hub cache and could not be downloaded ({f}: {e})"
            )
        })
    };
    let cfg = fetch("config.json")?;
    fetch("tokenizer.json")?;
    let _ = repo.get("tokenizer_config.json");
    match repo.get("model.safetensors") {
        Ok(_) => {}
        Err(_) => {
            let index = fetch("model.safetensors.index.json")?;
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                fetch(&s)?;
            }
        }
    }
    Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Parse `--device`: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ord: usize = s
                .strip_prefix("cuda:")
                .map(|n| n.parse())
                .transpose()
                .map_err(|_| anyhow::anyhow!("bad device `{s}` (expected cpu, cuda or cuda:N)"))?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!(
                    "device `{s}`: this memgen was built without CUDA (rebuild with `--features cuda`)"
                );
            }
            Device::new_cuda(ord).map_err(|e| anyhow::anyhow!("device `{s}`: {e}"))
        }
        _ => anyhow::bail!("bad device `{s}` (expected cpu, cuda or cuda:N)"),
    }
}

pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => anyhow::bail!("bad dtype `{s}` (expected f32, f16 or bf16)"),
    }
}

/// A backbone with the tokenizer that belongs to it.
#[derive(Clone)]
pub struct LoadedModel {
    pub backbone: Backbone,
    pub tokenizer: Arc<TextTokenizer>,
    pub path: PathBuf,
}

/// A model's tokenizer and config without its weights: enough to check a request against the
/// context (`max_position_embeddings`) before the slow weight load.
pub fn peek(path: &Path) -> anyhow::Result<(TextTokenizer, Config)> {
    if !path.exists() {
        anyhow::bail!("{}: no such file or directory", path.display());
    }
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let file = cfg_path.display().to_string();
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| BackboneError::io(&file, e))?;
        Ok((
            TextTokenizer::from_hf_dir(path)?,
            Config::from_hf_json(&text, &file)?,
        ))
    } else {
        let file = path.display().to_string();
        let mut f = std::fs::File::open(path).map_err(|e| BackboneError::io(&file, e))?;
        // Reads the header (metadata and tensor index) only, not the tensor data.
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f)
            .map_err(|e| BackboneError::format(&file, format!("not a readable GGUF file: {e}")))?;
        Ok((
            TextTokenizer::from_gguf(&ct, &file)?,
            Config::from_gguf(&ct, &file)?,
        ))
    }
}

/// Load a model (weights shared with any other instance of the same checkpoint) and its tokenizer.
pub fn load(path: &Path, dtype: DType, device: &Device) -> anyhow::Result<LoadedModel> {
    let (tokenizer, _) = peek(path)?;
    let weights = BaseWeights::load_shared(path, dtype, device)?;
    Ok(LoadedModel {
        backbone: Backbone::new(weights),
        tokenizer: Arc::new(tokenizer),
        path: path.to_path_buf(),
    })
}
