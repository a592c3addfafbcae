//! Frozen base weights: loaded once (dequantized to the compute dtype) and shared by every model
//! instance that names the same checkpoint — reasoner, weaver and trigger hold one copy between them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use super::config::{Arch, Config, RopeScaling};
use super::kernels::PackedWeight;
use super::BackboneError;

/// One decoder block's frozen tensors, in Hugging Face layout (out × in).
#[derive(Debug)]
pub struct LayerWeights {
    pub q_proj: Tensor,
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    pub o_proj: Tensor,
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    pub down_proj: Tensor,
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    /// Qwen3's RMSNorm weights over each q / k head (size head_dim), applied before RoPE.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// `[q; k; v]` stacked by rows, so inference runs one matmul for all three; after
    /// [`LayerWeights::fuse`] `q_proj`, `k_proj` and `v_proj` are views into it (no second copy).
    pub qkv_proj: Option<Tensor>,
    /// `[q_bias, k_bias, v_bias]` when the projections have biases (then `q_bias`… are views).
    pub qkv_bias: Option<Tensor>,
    /// `[gate; up]` stacked by rows; `gate_proj` and `up_proj` are then views into it.
    pub gate_up_proj: Option<Tensor>,
    /// Panel-packed copies for many-row `Mode::Infer` matmuls, made on first use (graph-mode
    /// forwards never read them; SFT's gradient-free prompt prefix does).
    pub packed: PackedLayer,
}

/// [`PackedWeight`]s of one block's fused q/k/v, o, fused gate/up and down matrices.
#[derive(Debug, Default)]
pub struct PackedLayer {
    pub qkv: OnceLock<PackedWeight>,
    pub o: OnceLock<PackedWeight>,
    pub gate_up: OnceLock<PackedWeight>,
    pub down: OnceLock<PackedWeight>,
}

impl LayerWeights {
    /// Stack q/k/v and gate/up into single matrices (fewer, larger matmuls) and make the separate
    /// fields views into them, so memory use is unchanged.
    pub fn fuse(&mut self) -> candle_core::Result<()> {
        if self.qkv_proj.is_some() || self.gate_up_proj.is_some() {
            return Ok(());
        }
        let rows = |t: &Tensor| t.dim(0);
        let (nq, nk, nv) = (
            rows(&self.q_proj)?,
            rows(&self.k_proj)?,
            rows(&self.v_proj)?,
        );
        let qkv = Tensor::cat(&[&self.q_proj, &self.k_proj, &self.v_proj], 0)?;
        let biases = [&self.q_bias, &self.k_bias, &self.v_bias];
        if biases.iter().all(|b| b.is_some()) {
            let b: Vec<&Tensor> = biases.iter().map(|b| b.as_ref().unwrap()).collect();
            let qkv_b = Tensor::cat(&b, 0)?;
            self.q_bias = Some(qkv_b.narrow(0, 0, nq)?);
            self.k_bias = Some(qkv_b.narrow(0, nq, nk)?);
            self.v_bias = Some(qkv_b.narrow(0, nq + nk, nv)?);
            self.qkv_bias = Some(qkv_b);
        } else if biases.iter().any(|b| b.is_some()) {
            // Mixed biases: keep the projections separate.
            return Ok(());
        }
        self.q_proj = qkv.narrow(0, 0, nq)?;
        self.k_proj = qkv.narrow(0, nq, nk)?;
        self.v_proj = qkv.narrow(0, nq + nk, nv)?;
        self.qkv_proj = Some(qkv);
        let ng = rows(&self.gate_proj)?;
        let gu = Tensor::cat(&[&self.gate_proj, &self.up_proj], 0)?;
        self.gate_proj = gu.narrow(0, 0, ng)?;
        self.up_proj = gu.narrow(0, ng, rows(&self.up_proj)?)?;
        self.gate_up_proj = Some(gu);
        Ok(())
    }
}

#[derive(Debug)]
pub struct BaseWeights {
    pub config: Config,
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    /// The LM head; shares storage with `embed_tokens` when the checkpoint ties them.
    pub lm_head: Tensor,
    /// The LM head packed for generation's logits (made on first use; a copy even when tied).
    pub lm_head_packed: OnceLock<PackedWeight>,
    pub dtype: DType,
    pub device: Device,
}

type Key = (PathBuf, String, String);

fn registry() -> &'static Mutex<HashMap<Key, Weak<BaseWeights>>> {
    static REG: OnceLock<Mutex<HashMap<Key, Weak<BaseWeights>>>> = OnceLock::new();
    REG.get_or_init(|| Mutex::new(HashMap::new()))
}

impl BaseWeights {
    /// Load (or reuse, when already in memory) the weights behind `path` — a `.gguf` file or a
    /// Hugging Face model directory.
    pub fn load_shared(
        path: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Arc<BaseWeights>, BackboneError> {
        let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let key = (canon, format!("{dtype:?}"), format!("{device:?}"));
        let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = reg.get(&key).and_then(Weak::upgrade) {
            return Ok(w);
        }
        let w = Arc::new(if path.is_dir() {
            Self::from_hf_dir(path, dtype, device)?
        } else {
            Self::from_gguf(path, dtype, device)?
        });
        reg.insert(key, Arc::downgrade(&w));
        Ok(w)
    }

    pub fn from_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Self, BackboneError> {
        let file = path.display().to_string();
        let mut f = std::fs::File::open(path).map_err(|e| BackboneError::io(&file, e))?;
        let file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let ct = gguf_file::Content::read(&mut f)
            .map_err(|e| BackboneError::format(&file, format!("not a readable GGUF file: {e}")))?;
        let config = Config::from_gguf(&ct, &file)?;
        config.validate(&file)?;
        // A truncated download shows up as tensors that extend past the end of the file.
        for (name, info) in ct.tensor_infos.iter() {
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size()
                * info.ggml_dtype.type_size();
            let end = ct.tensor_data_offset + info.offset + bytes as u64;
            if end > file_len {
                return Err(BackboneError::format(
                    &file,
                    format!("truncated: tensor `{name}` ends at byte {end} but the file has {file_len} bytes"),
                ));
            }
        }
        let mut load = |name: &str| -> Result<Tensor, BackboneError> {
            let qt = ct
                .tensor(&mut f, name, device)
                .map_err(|e| BackboneError::format(&file, format!("tensor `{name}`: {e}")))?;
            qt.dequantize(device)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(|e| BackboneError::format(&file, format!("dequantizing `{name}`: {e}")))
        };
        let mut config = config;
        if let Some(RopeScaling::Freqs { factors }) = &mut config.rope_scaling {
            *factors = load("rope_freqs.weight")?
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| {
                    BackboneError::format(&file, format!("tensor `rope_freqs.weight`: {e}"))
                })?;
        }
        let qk = config.qk_norm;
        let qk_norm = |name: &str, load: &mut dyn FnMut(&str) -> Result<Tensor, BackboneError>| {
            if qk {
                load(name).map(Some)
            } else {
                Ok(None)
            }
        };
        let embed_tokens = load("token_embd.weight")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        let (h, kv, hd) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        );
        for i in 0..config.num_hidden_layers {
            let p = format!("blk.{i}");
            let mut q = load(&format!("{p}.attn_q.weight"))?;
            let mut k = load(&format!("{p}.attn_k.weight"))?;
            if matches!(config.arch, Arch::Llama | Arch::SmolLM3) {
                // llama.cpp stores llama's (and SmolLM3's, converted as llama) Q/K rows permuted for interleaved RoPE; undo it so the
                // weights (and any LoRA on them) are in Hugging Face's layout.
                q = unpermute_rows(&q, h, hd).map_err(|e| BackboneError::format(&file, e))?;
                k = unpermute_rows(&k, kv, hd).map_err(|e| BackboneError::format(&file, e))?;
            }
            let bias = |n: &str, load: &mut dyn FnMut(&str) -> Result<Tensor, BackboneError>| {
                let name = format!("{p}.{n}.bias");
                if ct.tensor_infos.contains_key(&name) {
                    load(&name).map(Some)
                } else {
                    Ok(None)
                }
            };
            let q_bias = bias("attn_q", &mut load)?;
            let k_bias = bias("attn_k", &mut load)?;
            let v_bias = bias("attn_v", &mut load)?;
            layers.push(LayerWeights {
                q_proj: q,
                k_proj: k,
                v_proj: load(&format!("{p}.attn_v.weight"))?,
                o_proj: load(&format!("{p}.attn_output.weight"))?,
                q_bias,
                k_bias,
                v_bias,
                gate_proj: load(&format!("{p}.ffn_gate.weight"))?,
                up_proj: load(&format!("{p}.ffn_up.weight"))?,
                down_proj: load(&format!("{p}.ffn_down.weight"))?,
                input_layernorm: load(&format!("{p}.attn_norm.weight"))?,
                post_attention_layernorm: load(&format!("{p}.ffn_norm.weight"))?,
                q_norm: qk_norm(&format!("{p}.attn_q_norm.weight"), &mut load)?,
                k_norm: qk_norm(&format!("{p}.attn_k_norm.weight"), &mut load)?,
                qkv_proj: None,
                qkv_bias: None,
                gate_up_proj: None,
                packed: Default::default(),
            });
        }
        let norm = load("output_norm.weight")?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            load("output.weight")?
        };
        let mut w = BaseWeights {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            lm_head_packed: OnceLock::new(),
            dtype,
            device: device.clone(),
        };
        w.check_shapes(&file)?;
        w.fuse()
            .map_err(|e| BackboneError::format(&file, format!("fusing projections: {e}")))?;
        Ok(w)
    }

    pub fn from_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self, BackboneError> {
        let cfg_path = dir.join("config.json");
        let cfg_file = cfg_path.display().to_string();
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| BackboneError::io(&cfg_file, e))?;
        let config = Config::from_hf_json(&text, &cfg_file)?;
        config.validate(&cfg_file)?;
        let files = safetensors_files(dir)?;
        let shown = files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        // SAFETY: the files are opened read-only; memgen never writes to a checkpoint it has mapped.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
                BackboneError::format(&shown, format!("not a readable safetensors file: {e}"))
            })?;
        let has = |name: &str| st.get(name).is_ok();
        // Stored bf16/f16/f32 goes straight to the compute dtype: the same dtype is a copy of the
        // stored bits and widening is exact (tests/dtypes.rs); only narrowing (f32 → bf16, or
        // between bf16 and f16) rounds, once, to nearest.
        let load = |name: &str| -> Result<Tensor, BackboneError> {
            if !has(name) {
                // Candle's own error carries a multi-line backtrace; this is one line.
                return Err(BackboneError::format(
                    &shown,
                    format!("missing tensor `{name}`"),
                ));
            }
            st.load(name, device)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(|e| BackboneError::format(&shown, format!("tensor `{name}`: {e}")))
        };
        // Required where the family has them: a missing q/k norm must not load as "no norm".
        let qk_norm = |name: &str| -> Result<Option<Tensor>, BackboneError> {
            if config.qk_norm {
                load(name).map(Some)
            } else if has(name) {
                Err(BackboneError::format(
                    &shown,
                    format!("tensor `{name}` is not used by a {:?} model", config.arch),
                ))
            } else {
                Ok(None)
            }
        };
        let embed_tokens = load("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let opt = |n: &str| -> Result<Option<Tensor>, BackboneError> {
                let name = format!("{p}.{n}");
                if has(&name) {
                    load(&name).map(Some)
                } else {
                    Ok(None)
                }
            };
            layers.push(LayerWeights {
                q_proj: load(&format!("{p}.self_attn.q_proj.weight"))?,
                k_proj: load(&format!("{p}.self_attn.k_proj.weight"))?,
                v_proj: load(&format!("{p}.self_attn.v_proj.weight"))?,
                o_proj: load(&format!("{p}.self_attn.o_proj.weight"))?,
                q_bias: opt("self_attn.q_proj.bias")?,
                k_bias: opt("self_attn.k_proj.bias")?,
                v_bias: opt("self_attn.v_proj.bias")?,
                gate_proj: load(&format!("{p}.mlp.gate_proj.weight"))?,
                up_proj: load(&format!("{p}.mlp.up_proj.weight"))?,
                down_proj: load(&format!("{p}.mlp.down_proj.weight"))?,
                input_layernorm: load(&format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: load(&format!("{p}.post_attention_layernorm.weight"))?,
                q_norm: qk_norm(&format!("{p}.self_attn.q_norm.weight"))?,
                k_norm: qk_norm(&format!("{p}.self_attn.k_norm.weight"))?,
                qkv_proj: None,
                qkv_bias: None,
                gate_up_proj: None,
                packed: Default::default(),
            });
        }
        let norm = load("model.norm.weight")?;
        // An untied model without its head must not quietly become a tied one.
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else if has("lm_head.weight") {
            load("lm_head.weight")?
        } else {
            return Err(BackboneError::format(
                &shown,
                "missing tensor `lm_head.weight` (config.json says tie_word_embeddings: false)",
            ));
        };
        let mut w = BaseWeights {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            lm_head_packed: OnceLock::new(),
            dtype,
            device: device.clone(),
        };
        w.check_shapes(&shown)?;
        w.fuse()
            .map_err(|e| BackboneError::format(&shown, format!("fusing projections: {e}")))?;
        Ok(w)
    }

    /// Every tensor has the shape the config promises; a mismatch names the tensor.
    fn check_shapes(&self, file: &str) -> Result<(), BackboneError> {
        let c = &self.config;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let qd = c.num_attention_heads * hd;
        let kvd = c.num_key_value_heads * hd;
        let want = |name: &str, t: &Tensor, shape: &[usize]| {
            if t.dims() != shape {
                Err(BackboneError::format(
                    file,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {:?}",
                        t.dims(),
                        shape
                    ),
                ))
            } else {
                Ok(())
            }
        };
        want("embed_tokens", &self.embed_tokens, &[c.vocab_size, d])?;
        want("lm_head", &self.lm_head, &[c.vocab_size, d])?;
        want("norm", &self.norm, &[d])?;
        for (i, l) in self.layers.iter().enumerate() {
            want(&format!("layers.{i}.q_proj"), &l.q_proj, &[qd, d])?;
            want(&format!("layers.{i}.k_proj"), &l.k_proj, &[kvd, d])?;
            want(&format!("layers.{i}.v_proj"), &l.v_proj, &[kvd, d])?;
            want(&format!("layers.{i}.o_proj"), &l.o_proj, &[d, qd])?;
            for (n, t) in [("q_norm", &l.q_norm), ("k_norm", &l.k_norm)] {
                match t {
                    Some(t) => want(&format!("layers.{i}.{n}"), t, &[hd])?,
                    None if c.qk_norm => {
                        return Err(BackboneError::format(
                            file,
                            format!("missing tensor layers.{i}.{n}"),
                        ))
                    }
                    None => {}
                }
            }
            want(
                &format!("layers.{i}.gate_proj"),
                &l.gate_proj,
                &[c.intermediate_size, d],
            )?;
            want(
                &format!("layers.{i}.up_proj"),
                &l.up_proj,
                &[c.intermediate_size, d],
            )?;
            want(
                &format!("layers.{i}.down_proj"),
                &l.down_proj,
                &[d, c.intermediate_size],
            )?;
        }
        Ok(())
    }

    /// Write these weights as a Hugging Face model directory (`config.json` + `model.safetensors`,
    /// f32 or the compute dtype), e.g. to hand a GGUF model to another stack.
    pub fn save_hf_dir(&self, dir: &Path) -> anyhow::Result<()> {
        let c = &self.config;
        // Decided before anything is written, so a refusal leaves nothing half-written.
        let rope_scaling = match &c.rope_scaling {
            None => serde_json::Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            Some(RopeScaling::Freqs { .. }) => anyhow::bail!(
                "{}: llama.cpp's per-frequency rope factors (rope_freqs.weight) have no config.json form",
                dir.display()
            ),
        };
        let mut t: Vec<(String, Tensor)> = vec![
            (
                "model.embed_tokens.weight".into(),
                self.embed_tokens.clone(),
            ),
            ("model.norm.weight".into(), self.norm.clone()),
        ];
        if !c.tie_word_embeddings {
            t.push(("lm_head.weight".into(), self.lm_head.clone()));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut put = |n: &str, x: &Tensor| t.push((format!("{p}.{n}"), x.clone()));
            put("self_attn.q_proj.weight", &l.q_proj);
            put("self_attn.k_proj.weight", &l.k_proj);
            put("self_attn.v_proj.weight", &l.v_proj);
            put("self_attn.o_proj.weight", &l.o_proj);
            for (n, b) in [("q", &l.q_bias), ("k", &l.k_bias), ("v", &l.v_bias)] {
                if let Some(b) = b {
                    put(&format!("self_attn.{n}_proj.bias"), b);
                }
            }
            put("mlp.gate_proj.weight", &l.gate_proj);
            put("mlp.up_proj.weight", &l.up_proj);
            put("mlp.down_proj.weight", &l.down_proj);
            put("input_layernorm.weight", &l.input_layernorm);
            for (n, w) in [("q_norm", &l.q_norm), ("k_norm", &l.k_norm)] {
                if let Some(w) = w {
                    put(&format!("self_attn.{n}.weight"), w);
                }
            }
            put(
                "post_attention_layernorm.weight",
                &l.post_attention_layernorm,
            );
        }
        std::fs::create_dir_all(dir)?;
        let map: HashMap<String, Tensor> = t.into_iter().collect();
        let tmp = tempfile::Builder::new()
            .prefix(".model.safetensors.")
            .tempfile_in(dir)?;
        candle_core::safetensors::save(&map, tmp.path())?;
        crate::util::persist(tmp, &dir.join("model.safetensors"))?;
        let (model_type, arch) = c.arch.hf_names();
        let mut cfg = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": c.tie_word_embeddings,
            "attention_bias": c.attention_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "rope_scaling": rope_scaling,
        });
        if c.arch == Arch::SmolLM3 {
            let flags: Vec<u8> = (0..c.num_hidden_layers)
                .map(|i| u8::from(c.uses_rope(i)))
                .collect();
            cfg["no_rope_layers"] = serde_json::json!(flags);
        }
        crate::util::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&cfg)?.as_bytes(),
        )?;
        Ok(())
    }

    /// Random weights for tests and benchmarks of the machinery (not of the language model).
    pub fn random(config: Config, seed: u64, device: &Device) -> candle_core::Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut t = |shape: &[usize], scale: f32| -> candle_core::Result<Tensor> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
            Tensor::from_vec(v, shape, device)
        };
        let c = &config;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let qd = c.num_attention_heads * hd;
        let kvd = c.num_key_value_heads * hd;
        let s = 1.0 / (d as f32).sqrt();
        let embed_tokens = t(&[c.vocab_size, d], 1.0)?;
        let mut layers = vec![];
        for _ in 0..c.num_hidden_layers {
            let bias = c.attention_bias;
            layers.push(LayerWeights {
                q_proj: t(&[qd, d], s)?,
                k_proj: t(&[kvd, d], s)?,
                v_proj: t(&[kvd, d], s)?,
                o_proj: t(&[d, qd], s)?,
                q_bias: if bias { Some(t(&[qd], 0.1)?) } else { None },
                k_bias: if bias { Some(t(&[kvd], 0.1)?) } else { None },
                v_bias: if bias { Some(t(&[kvd], 0.1)?) } else { None },
                gate_proj: t(&[c.intermediate_size, d], s)?,
                up_proj: t(&[c.intermediate_size, d], s)?,
                down_proj: t(
                    &[d, c.intermediate_size],
                    1.0 / (c.intermediate_size as f32).sqrt(),
                )?,
                input_layernorm: (t(&[d], 0.2)? + 1.0)?,
                post_attention_layernorm: (t(&[d], 0.2)? + 1.0)?,
                q_norm: if c.qk_norm {
                    Some((t(&[hd], 0.2)? + 1.0)?)
                } else {
                    None
                },
                k_norm: if c.qk_norm {
                    Some((t(&[hd], 0.2)? + 1.0)?)
                } else {
                    None
                },
                qkv_proj: None,
                qkv_bias: None,
                gate_up_proj: None,
                packed: Default::default(),
            });
        }
        let norm = (t(&[d], 0.2)? + 1.0)?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            t(&[c.vocab_size, d], s)?
        };
        let mut w = BaseWeights {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            lm_head_packed: OnceLock::new(),
            dtype: DType::F32,
            device: device.clone(),
        };
        w.fuse()?;
        Ok(w)
    }

    /// Fuse every layer's projections (see [`LayerWeights::fuse`]).
    pub fn fuse(&mut self) -> candle_core::Result<()> {
        self.layers.iter_mut().try_for_each(LayerWeights::fuse)
    }
}

/// Undo llama.cpp's Q/K row permutation: GGUF rows within each head are ordered
/// (pair 0 elem 0, pair 0 elem 1, pair 1 elem 0, …); Hugging Face orders them (first halves, second halves).
fn unpermute_rows(w: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor, String> {
    let (out, inp) = w.dims2().map_err(|e| e.to_string())?;
    if out != heads * head_dim {
        return Err(format!(
            "Q/K weight has {out} rows, expected {heads} heads x {head_dim}"
        ));
    }
    w.reshape((heads, head_dim / 2, 2, inp))
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape((out, inp)))
        .map_err(|e| e.to_string())
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, BackboneError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let file = index.display().to_string();
    if !index.is_file() {
        return Err(BackboneError::format(
            &dir.display().to_string(),
            "no model.safetensors or model.safetensors.index.json in the model directory",
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| BackboneError::io(&file, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| BackboneError::format(&file, format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| BackboneError::format(&file, "missing `weight_map`"))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|x| x.as_str().map(String::from))
        .collect();
    names.sort();
    names.dedup();
    let files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    for f in &files {
        if !f.is_file() {
            return Err(BackboneError::format(
                &file,
                format!("shard {} is missing", f.display()),
            ));
        }
    }
    Ok(files)
}
