//! LoRA adapters (PEFT semantics): `y = W x + b + (alpha / r) · B A dropout(x)`, A (r × in) with
//! PEFT's Kaiming-uniform init, B (out × r) zero-initialised so a fresh adapter leaves the base
//! model unchanged. A and B are Candle `Var`s: the only trainable tensors of a backbone.

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The linear projections of a decoder block a LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The Hugging Face module name, as PEFT's `target_modules` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The module path inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`, …).
    pub fn module_path(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == s)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// PEFT-style LoRA settings (`peft_config` in the original configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    #[serde(default = "default_dropout")]
    pub lora_dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
    /// PEFT's `bias: none` is the only setting the original uses; kept for config compatibility.
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default = "default_task_type")]
    pub task_type: String,
}

fn default_r() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_dropout() -> f64 {
    0.1
}
fn default_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}
fn default_bias() -> String {
    "none".into()
}
fn default_task_type() -> String {
    "CAUSAL_LM".into()
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: default_dropout(),
            target_modules: default_targets(),
            bias: default_bias(),
            task_type: default_task_type(),
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    pub fn targets(&self) -> anyhow::Result<Vec<Target>> {
        if self.r == 0 {
            anyhow::bail!("LoRA rank r must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            anyhow::bail!("lora_dropout must be in [0, 1), got {}", self.lora_dropout);
        }
        if self.bias != "none" {
            anyhow::bail!("LoRA bias `{}` is not supported (only `none`)", self.bias);
        }
        self.target_modules
            .iter()
            .map(|s| {
                Target::parse(s).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown LoRA target module `{s}` (expected one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                    )
                })
            })
            .collect()
    }
}

/// One adapter on one projection.
#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

/// The adapters of a whole backbone: `layers[i][target]`.
#[derive(Debug, Clone, Default)]
pub struct LoraSet {
    pub layers: Vec<[Option<Lora>; 7]>,
}

impl LoraSet {
    /// Fresh adapters: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform with a = sqrt(5)), B = 0.
    pub fn new(
        cfg: &LoraConfig,
        dims: impl Fn(Target) -> (usize, usize),
        num_layers: usize,
        seed: u64,
        device: &Device,
    ) -> anyhow::Result<LoraSet> {
        let targets = cfg.targets()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            let mut slot: [Option<Lora>; 7] = Default::default();
            for &t in &targets {
                let (out, inp) = dims(t);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..cfg.r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, inp), device)?)?;
                let b = Var::zeros((out, cfg.r), candle_core::DType::F32, device)?;
                slot[t.index()] = Some(Lora {
                    a,
                    b,
                    scale: cfg.scale(),
                    dropout: cfg.lora_dropout,
                });
            }
            layers.push(slot);
        }
        Ok(LoraSet { layers })
    }

    pub fn get(&self, layer: usize, t: Target) -> Option<&Lora> {
        self.layers.get(layer).and_then(|l| l[t.index()].as_ref())
    }

    /// Every (layer, target, adapter), in a stable order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, Target, &Lora)> {
        self.layers.iter().enumerate().flat_map(|(i, l)| {
            Target::ALL
                .into_iter()
                .filter_map(move |t| l[t.index()].as_ref().map(|a| (i, t, a)))
        })
    }

    pub fn vars(&self) -> Vec<Var> {
        self.iter()
            .flat_map(|(_, _, l)| [l.a.clone(), l.b.clone()])
            .collect()
    }
}
