//! Shared test helpers: locating the real models (fetched on demand) and the shared fixtures.
#![allow(dead_code)]

pub mod retrieval;

use std::path::PathBuf;
use std::sync::Mutex;

static FETCH: Mutex<()> = Mutex::new(());

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn shared() -> PathBuf {
    root().join("..").join("shared")
}

/// Path to a real model: in `$MEMGEN_MODELS_DIR` when there, else in `models/`, running
/// scripts/fetch-model.sh the first time (tests fetch what they need).
pub fn model(which: &str) -> PathBuf {
    let file = match which {
        "qwen" => memgen::backbone::QWEN_MODEL_FILE,
        _ => memgen::backbone::DEFAULT_MODEL_FILE,
    };
    // Models already fetched where the binary looks first (`$MEMGEN_MODELS_DIR`) need no copy.
    if let Ok(d) = std::env::var("MEMGEN_MODELS_DIR") {
        let p = PathBuf::from(d).join(file);
        if p.is_file() {
            return p;
        }
    }
    let path = root().join("models").join(file);
    let _g = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if !path.is_file() {
        let st = std::process::Command::new("bash")
            .arg(root().join("scripts/fetch-model.sh"))
            .arg(which)
            .env("MEMGEN_MODELS_DIR", root().join("models"))
            .status()
            .expect("running scripts/fetch-model.sh");
        assert!(st.success(), "scripts/fetch-model.sh {which} failed");
    }
    path
}

pub fn fixture(name: &str) -> serde_json::Value {
    let p = shared().join("fixtures").join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

use candle_core::{Device, Tensor};
use memgen::backbone::{Arch, Backbone, BaseWeights, Config, RopeScaling};

/// A tiny randomly initialised decoder of each family, built in code. Qwen3's head_dim (12)
/// differs from hidden / heads (8), so every shape has to use heads × head_dim.
pub fn tiny_config(arch: Arch) -> Config {
    Config {
        arch,
        vocab_size: 61,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: if arch == Arch::Qwen3 { 12 } else { 8 },
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        max_position_embeddings: 512,
        tie_word_embeddings: matches!(arch, Arch::Llama | Arch::SmolLM3),
        attention_bias: arch == Arch::Qwen2,
        rope_scaling: None,
        qk_norm: arch == Arch::Qwen3,
        // The second layer skips RoPE.
        nope_layers: if arch == Arch::SmolLM3 {
            vec![1]
        } else {
            vec![]
        },
    }
}

pub fn tiny(arch: Arch, seed: u64) -> Backbone {
    tiny_from(tiny_config(arch), seed)
}

pub fn tiny_from(config: Config, seed: u64) -> Backbone {
    let w = BaseWeights::random(config, seed, &Device::Cpu).unwrap();
    Backbone::new(std::sync::Arc::new(w))
}

/// The families the machinery is checked on: each architecture, plus llama with Llama 3.1 rope
/// scaling (original context 64, so with head_dim 8 and theta 1e4 one frequency is kept, one
/// interpolated and two divided by the factor).
pub const FAMILIES: [&str; 5] = ["llama", "qwen2", "qwen3", "smollm3", "llama3"];

pub fn tiny_family_config(family: &str) -> Config {
    match family {
        "llama" => tiny_config(Arch::Llama),
        "qwen2" => tiny_config(Arch::Qwen2),
        "qwen3" => tiny_config(Arch::Qwen3),
        "smollm3" => tiny_config(Arch::SmolLM3),
        "llama3" => Config {
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            }),
            ..tiny_config(Arch::Llama)
        },
        other => panic!("unknown test family {other}"),
    }
}

pub fn tiny_family(family: &str, seed: u64) -> Backbone {
    tiny_from(tiny_family_config(family), seed)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Word-level tokenizer over the tiny models' 61 ids; every third id ends with `.`, `,` or `\n`.
pub fn tiny_tokenizer() -> std::sync::Arc<memgen::backbone::TextTokenizer> {
    use tokenizers::models::wordlevel::WordLevel;
    let vocab: std::collections::HashMap<String, u32> = (0..61u32)
        .map(|i| {
            let s = match i % 9 {
                0 => format!("w{i}."),
                3 => format!("w{i},"),
                6 => format!("w{i}\n"),
                _ => format!("w{i}"),
            };
            (s, i)
        })
        .collect();
    let wl = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("w1".into())
        .build()
        .unwrap();
    let mut tk = tokenizers::Tokenizer::new(wl);
    tk.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::whitespace::WhitespaceSplit,
    ));
    std::sync::Arc::new(memgen::backbone::TextTokenizer {
        inner: tk,
        bos_token: None,
        eos_token: None,
        eos_ids: vec![],
        pad_id: 1,
        chat_template: None,
    })
}

/// Central finite differences (step 1e-2) of `f` with respect to a few entries of `var`, against
/// the analytic gradient `grad`. `at` picks entries as quarters of the length (0 = first, 1 = n/3,
/// 2 = n/2, 3 = last); the check is |numeric − analytic| ≤ rel · max(|numeric|, |analytic|) + abs.
pub fn fd_check(
    what: &str,
    var: &candle_core::Var,
    grad: &Tensor,
    f: &dyn Fn() -> f32,
    at: &[usize],
    rel: f32,
    abs: f32,
) {
    let flat = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let g = grad.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let n = flat.len();
    let eps = 1e-2f32;
    for &which in at {
        let i = [0, n / 3, n / 2, n - 1][which];
        let set = |v: f32| {
            let mut w = flat.clone();
            w[i] = v;
            var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        };
        set(flat[i] + eps);
        let up = f();
        set(flat[i] - eps);
        let down = f();
        set(flat[i]);
        let numeric = (up - down) / (2.0 * eps);
        assert!(
            (numeric - g[i]).abs() <= rel * numeric.abs().max(g[i].abs()) + abs,
            "{what}[{i}]: analytic {} vs numeric {numeric}",
            g[i]
        );
    }
}

/// A tiny random model of `arch` saved as a Hugging Face directory, with SmolLM2's tokenizer (its
/// vocabulary size, so real task text tokenizes as it would for the real model).
pub fn tiny_hf_dir(family: &str) -> (tempfile::TempDir, BaseWeights) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_family_config(family);
    cfg.vocab_size = 49152; // SmolLM2's tokenizer
    let w = BaseWeights::random(cfg, 11, &Device::Cpu).unwrap();
    w.save_hf_dir(dir.path()).unwrap();
    let smol =
        memgen::backbone::load(&model("smollm2"), candle_core::DType::F32, &Device::Cpu).unwrap();
    smol.tokenizer
        .inner
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    (dir, w)
}

/// Every tensor of a safetensors file as f32 values, sorted by name: bit-for-bit comparisons.
pub fn read_tensors(p: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let map = candle_core::safetensors::load(p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut v: Vec<(String, Vec<f32>)> = map
        .into_iter()
        .map(|(k, t)| {
            let t = t.to_dtype(candle_core::DType::F32).unwrap();
            (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Logits (L × vocab, as f32 whatever the model's dtype) of one unpadded sequence, by the given
/// mode's path: the fused inference kernels for `Mode::Infer`, the differentiable ops otherwise.
pub fn sequence_logits(
    m: &memgen::backbone::LoadedModel,
    ids: &[u32],
    mode: &mut memgen::backbone::Mode,
) -> Vec<Vec<f32>> {
    use memgen::backbone::{Side, Stream};
    let x = Stream::tokens(&m.backbone, &[ids.to_vec()], 0, Side::Left).unwrap();
    let h = m.backbone.forward(&x, None, mode).unwrap();
    let lg = match mode {
        memgen::backbone::Mode::Infer => m.backbone.logits_infer(&h),
        _ => m.backbone.logits(&h),
    };
    lg.unwrap()
        .squeeze(0)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

/// A tiny qwen2 model directory and a work directory holding the run config `write` puts there
/// (`write(work_dir, model_dir)` returns the config's path): the start of every end-to-end run test.
pub struct RunSetup {
    pub _model: tempfile::TempDir,
    pub work: tempfile::TempDir,
    pub config: PathBuf,
}

pub fn run_setup(write: fn(&std::path::Path, &std::path::Path) -> PathBuf) -> RunSetup {
    let (model, _) = tiny_hf_dir("qwen2");
    let work = tempfile::tempdir().unwrap();
    let config = write(work.path(), model.path());
    RunSetup {
        _model: model,
        work,
        config,
    }
}
