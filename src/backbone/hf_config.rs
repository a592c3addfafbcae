//! [`Config`] from a Hugging Face `config.json`, one function per family saying what differs from
//! llama. Every field that changes the math and that memgen does not implement is refused with
//! one line naming the field and the file: a checkpoint must never load as a different model.

use serde_json::Value;

use super::config::{nope_from_interval, Arch, Config, RopeScaling, SUPPORTED_ARCHS};
use super::BackboneError;

/// The parsed JSON with the file name, for one-line errors that name both.
struct Json<'a> {
    v: Value,
    file: &'a str,
}

impl Json<'_> {
    fn err(&self, msg: impl Into<String>) -> BackboneError {
        BackboneError::format(self.file, msg)
    }

    /// A field that is present and not JSON null.
    fn get(&self, k: &str) -> Option<&Value> {
        self.v.get(k).filter(|x| !x.is_null())
    }

    fn req_u(&self, k: &str) -> Result<usize, BackboneError> {
        self.get(k)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| self.err(format!("missing field `{k}`")))
    }

    fn opt_u(&self, k: &str) -> Result<Option<usize>, BackboneError> {
        match self.get(k) {
            None => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(format!("field `{k}` is not a non-negative integer"))),
        }
    }

    fn opt_f(&self, k: &str, default: f64) -> Result<f64, BackboneError> {
        match self.get(k) {
            None => Ok(default),
            Some(x) => x
                .as_f64()
                .ok_or_else(|| self.err(format!("field `{k}` is not a number"))),
        }
    }

    fn opt_bool(&self, k: &str, default: bool) -> Result<bool, BackboneError> {
        match self.get(k) {
            None => Ok(default),
            Some(x) => x
                .as_bool()
                .ok_or_else(|| self.err(format!("field `{k}` is not a boolean"))),
        }
    }

    /// Refuse `k: true` (a feature memgen does not implement).
    fn refuse_true(&self, k: &str, what: &str) -> Result<(), BackboneError> {
        if self.opt_bool(k, false)? {
            return Err(self.err(format!("`{k}: true` ({what}) is not supported")));
        }
        Ok(())
    }
}

pub fn parse(text: &str, file: &str) -> Result<Config, BackboneError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| BackboneError::format(file, format!("invalid JSON: {e}")))?;
    let j = Json { v, file };
    let arch_name = j
        .get("model_type")
        .and_then(Value::as_str)
        .or_else(|| {
            j.get("architectures")
                .and_then(|a| a.get(0))
                .and_then(Value::as_str)
        })
        .ok_or_else(|| j.err("missing field `model_type`"))?;
    let arch = Arch::parse(arch_name).ok_or_else(|| {
        j.err(format!(
            "unsupported architecture `{arch_name}` (memgen supports {SUPPORTED_ARCHS})"
        ))
    })?;
    let mut c = common(&j, arch)?;
    match arch {
        Arch::Llama => llama(&j, &mut c)?,
        Arch::Qwen2 => qwen2(&j, &mut c)?,
        Arch::Qwen3 => qwen3(&j, &mut c)?,
        Arch::SmolLM3 => smollm3(&j, &mut c)?,
    }
    Ok(c)
}

/// What every family reads the same way (transformers' llama defaults), and the refusals that
/// apply to all of them.
fn common(j: &Json, arch: Arch) -> Result<Config, BackboneError> {
    let hidden_size = j.req_u("hidden_size")?;
    let num_attention_heads = j.req_u("num_attention_heads")?;
    if num_attention_heads == 0 {
        return Err(j.err("`num_attention_heads` is 0"));
    }
    let act = j
        .get("hidden_act")
        .map(|a| a.as_str().unwrap_or("?"))
        .unwrap_or("silu");
    if act != "silu" {
        return Err(j.err(format!(
            "`hidden_act: {act}` is not supported (memgen implements silu)"
        )));
    }
    let partial = j.opt_f("partial_rotary_factor", 1.0)?;
    if partial != 1.0 {
        return Err(j.err(format!(
            "`partial_rotary_factor: {partial}` (partial rotary) is not supported"
        )));
    }
    if j.get("quantization_config").is_some() {
        return Err(j.err("`quantization_config` (a pre-quantized checkpoint) is not supported"));
    }
    j.refuse_true("mlp_bias", "biases on the MLP projections")?;
    sliding_window(j)?;
    let (rope_theta, rope_scaling) = rope(j)?;
    Ok(Config {
        arch,
        vocab_size: j.req_u("vocab_size")?,
        hidden_size,
        intermediate_size: j.req_u("intermediate_size")?,
        num_hidden_layers: j.req_u("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads: j
            .opt_u("num_key_value_heads")?
            .unwrap_or(num_attention_heads),
        head_dim: j
            .opt_u("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads),
        rms_norm_eps: j.opt_f("rms_norm_eps", 1e-6)?,
        rope_theta,
        max_position_embeddings: j.opt_u("max_position_embeddings")?.unwrap_or(32_768),
        tie_word_embeddings: j.opt_bool("tie_word_embeddings", false)?,
        attention_bias: false,
        rope_scaling,
        qk_norm: false,
        nope_layers: vec![],
    })
}

/// Sliding-window attention changes which keys a query sees; memgen attends to all of them.
/// transformers applies it where `layer_types` says `sliding_attention`, or (configs without
/// `layer_types`) where `use_sliding_window` is on with a window, or always for mistral's window.
fn sliding_window(j: &Json) -> Result<(), BackboneError> {
    if let Some(types) = j.get("layer_types") {
        let types = types
            .as_array()
            .ok_or_else(|| j.err("field `layer_types` is not a list"))?;
        for t in types {
            match t.as_str() {
                Some("full_attention") => {}
                Some("sliding_attention") => {
                    return Err(j.err(
                        "`layer_types` has `sliding_attention` (sliding-window attention) which is not supported",
                    ))
                }
                _ => {
                    return Err(j.err(format!(
                        "`layer_types` entry {t} is not supported (memgen implements full_attention)"
                    )))
                }
            }
        }
        return Ok(());
    }
    let has_window = j.get("sliding_window").is_some();
    if has_window && j.get("model_type").and_then(Value::as_str) == Some("mistral") {
        return Err(j.err("`sliding_window` (sliding-window attention) is not supported"));
    }
    if has_window && j.opt_bool("use_sliding_window", false)? {
        return Err(j.err("`use_sliding_window: true` (sliding-window attention) is not supported"));
    }
    Ok(())
}

/// `rope_theta` and `rope_scaling` (or transformers 5's `rope_parameters`, which holds both).
fn rope(j: &Json) -> Result<(f64, Option<RopeScaling>), BackboneError> {
    let (key, params) = match (j.get("rope_parameters"), j.get("rope_scaling")) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(s)) => ("rope_scaling", Some(s)),
        (None, None) => ("rope_scaling", None),
    };
    let mut theta = j.opt_f("rope_theta", 10_000.0)?;
    let Some(p) = params else {
        return Ok((theta, None));
    };
    if !p.is_object() {
        return Err(j.err(format!("field `{key}` is not an object")));
    }
    if let Some(t) = p.get("rope_theta").and_then(Value::as_f64) {
        theta = t;
    }
    // `type` is the legacy spelling of `rope_type`; errors name the key the file uses.
    let (type_key, kind) = match (p.get("rope_type"), p.get("type")) {
        (Some(t), _) => ("rope_type", t.as_str().unwrap_or("?")),
        (None, Some(t)) => ("type", t.as_str().unwrap_or("?")),
        (None, None) => ("rope_type", "default"),
    };
    let num = |k: &str| -> Result<f64, BackboneError> {
        p.get(k).and_then(Value::as_f64).ok_or_else(|| {
            j.err(format!(
                "`{key}.{k}` is missing (needed by rope type `{kind}`)"
            ))
        })
    };
    let scaling = match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => {
            return Err(j.err(format!(
                "`{key}.{type_key}: {other}` is not supported (memgen implements default, linear and llama3)"
            )))
        }
    };
    if let Some(RopeScaling::Llama3 {
        low_freq_factor,
        high_freq_factor,
        ..
    }) = &scaling
    {
        if high_freq_factor <= low_freq_factor {
            return Err(j.err(format!(
                "`{key}`: high_freq_factor must exceed low_freq_factor"
            )));
        }
    }
    Ok((theta, scaling))
}

/// Llama (and mistral): `attention_bias` would put biases on q, k, v *and* o; memgen has no
/// o bias, so it is refused rather than half-applied.
fn llama(j: &Json, _c: &mut Config) -> Result<(), BackboneError> {
    j.refuse_true(
        "attention_bias",
        "biases on the attention projections, o_proj included",
    )
}

/// Qwen2: q/k/v always carry biases (transformers ignores `attention_bias` for this family).
fn qwen2(_j: &Json, c: &mut Config) -> Result<(), BackboneError> {
    c.attention_bias = true;
    Ok(())
}

/// Qwen3: no biases (unless `attention_bias`, which also biases o_proj: refused), q/k norms.
fn qwen3(j: &Json, c: &mut Config) -> Result<(), BackboneError> {
    j.refuse_true(
        "attention_bias",
        "biases on the attention projections, o_proj included",
    )?;
    c.qk_norm = true;
    Ok(())
}

/// SmolLM3: `no_rope_layers[i]` is 1 where layer i *uses* RoPE (transformers' `use_rope`); when
/// absent, every `no_rope_layer_interval`-th layer (default 4) is NoPE. Ties by default.
fn smollm3(j: &Json, c: &mut Config) -> Result<(), BackboneError> {
    j.refuse_true(
        "attention_bias",
        "biases on the attention projections, o_proj included",
    )?;
    c.tie_word_embeddings = j.opt_bool("tie_word_embeddings", true)?;
    let n = c.num_hidden_layers;
    c.nope_layers = match j.get("no_rope_layers") {
        Some(list) => {
            let list = list
                .as_array()
                .filter(|l| l.len() == n)
                .ok_or_else(|| j.err(format!("`no_rope_layers` is not a list of {n} flags")))?;
            let mut nope = vec![];
            for (i, x) in list.iter().enumerate() {
                match x.as_u64() {
                    Some(1) => {}
                    Some(0) => nope.push(i),
                    _ => {
                        return Err(j.err(format!("`no_rope_layers[{i}]` is {x}, not 0 or 1")));
                    }
                }
            }
            nope
        }
        None => {
            let interval = j.opt_u("no_rope_layer_interval")?.unwrap_or(4);
            if interval == 0 {
                return Err(j.err("`no_rope_layer_interval` is 0"));
            }
            nope_from_interval(n, interval)
        }
    };
    Ok(())
}
