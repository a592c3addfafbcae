//! The closed sets of strings a run config takes (`dtype`, `optim`, `lr_scheduler_type`,
//! `*_strategy`, `loss_type`, the training methods, …) as enums. Each accepts the spellings the
//! original's configs and Hugging Face's TrainingArguments use, serialises as its canonical
//! spelling, and rejects anything else with one line that lists what it accepts, so a typo is
//! caught at load time and the code that reads the value matches it exhaustively.

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A config value outside its closed set: the value and every spelling that would have worked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotOneOf {
    pub got: String,
    pub accepted: &'static [&'static str],
}

impl fmt::Display for NotOneOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not one of {}",
            self.got,
            self.accepted.join(", ")
        )
    }
}

impl std::error::Error for NotOneOf {}

/// Serde support shared by every config enum: a string in, through `FromStr`, with the
/// [`NotOneOf`] message as the error.
fn deserialize_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr<Err = NotOneOf>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<T: std::str::FromStr<Err = NotOneOf>> de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            s.parse().map_err(E::custom)
        }
    }
    d.deserialize_str(V(std::marker::PhantomData))
}

/// Declares a config enum: variants with their canonical spelling first and any other accepted
/// spellings after `|`. Generates `as_str` (canonical), `ACCEPTED` (every spelling, for the
/// error), `FromStr`, `Display` and serde impls.
macro_rules! config_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $canon:literal $(| $alt:literal)* ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every spelling the config accepts, canonical ones first within each variant.
            pub const ACCEPTED: &'static [&'static str] = &[$( $canon $(, $alt)* ),+];

            /// The canonical spelling (what a resolved config writes back).
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $canon ),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = NotOneOf;
            fn from_str(s: &str) -> Result<Self, NotOneOf> {
                match s {
                    $( $canon $(| $alt)* => Ok($name::$variant), )+
                    _ => Err(NotOneOf { got: s.to_string(), accepted: Self::ACCEPTED }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                deserialize_str(d)
            }
        }
    };
}

config_enum! {
    /// `model.dtype`: the precision the models compute in (torch's names accepted too).
    pub enum Dtype {
        F32 = "f32" | "float32",
        F16 = "f16" | "float16",
        Bf16 = "bf16" | "bfloat16",
    }
}

config_enum! {
    /// `run.mode` (informational: the subcommand decides what runs).
    pub enum RunMode {
        Train = "train",
        Evaluate = "evaluate",
    }
}

config_enum! {
    /// `run.train_weaver_method` and `datasets.<name>.mode`.
    pub enum TrainMethod {
        Sft = "sft",
        Grpo = "grpo",
    }
}

config_enum! {
    /// `run.train_trigger_method`: the trigger learns from rewards only.
    pub enum TriggerMethod {
        Grpo = "grpo",
    }
}

config_enum! {
    /// `lr_scheduler_type`: the Hugging Face schedules memgen implements
    /// (`training/schedule.rs`).
    pub enum LrScheduler {
        Linear = "linear",
        Cosine = "cosine",
        Constant = "constant",
        ConstantWithWarmup = "constant_with_warmup",
    }
}

config_enum! {
    /// `logging_strategy`, `eval_strategy`, `save_strategy` (Hugging Face's IntervalStrategy).
    pub enum IntervalStrategy {
        No = "no",
        Steps = "steps",
        Epoch = "epoch",
    }
}

config_enum! {
    /// GRPO `loss_type`: how per-token losses are averaged (TRL's names).
    pub enum LossType {
        /// Mean per sequence, then over sequences.
        Grpo = "grpo",
        /// Mean over all policy tokens.
        Bnpo = "bnpo",
        /// Sum over tokens divided by sequences × max completion length.
        DrGrpo = "dr_grpo",
    }
}

config_enum! {
    /// `optim`: Hugging Face's optimiser names. memgen always runs AdamW (computed as
    /// `torch.optim.AdamW`); the others are accepted so the original's configs load, and warn
    /// (`config/ignored.rs`).
    pub enum Optim {
        AdamwTorch = "adamw_torch",
        AdamwTorchFused = "adamw_torch_fused",
        AdamwHf = "adamw_hf",
        /// Not a Hugging Face name; memgen has always taken it for AdamW.
        Adamw = "adamw",
        AdamwTorchXla = "adamw_torch_xla",
        AdamwTorchNpuFused = "adamw_torch_npu_fused",
        AdamwApexFused = "adamw_apex_fused",
        Adafactor = "adafactor",
        AdamwAnyprecision = "adamw_anyprecision",
        AdamwTorch4bit = "adamw_torch_4bit",
        AdamwTorch8bit = "adamw_torch_8bit",
        Ademamix = "ademamix",
        Sgd = "sgd",
        Adagrad = "adagrad",
        AdamwBnb8bit = "adamw_bnb_8bit",
        Adamw8bit = "adamw_8bit",
        Ademamix8bit = "ademamix_8bit",
        Lion8bit = "lion_8bit",
        Lion32bit = "lion_32bit",
        PagedAdamw32bit = "paged_adamw_32bit",
        PagedAdamw8bit = "paged_adamw_8bit",
        PagedAdemamix32bit = "paged_ademamix_32bit",
        PagedAdemamix8bit = "paged_ademamix_8bit",
        PagedLion32bit = "paged_lion_32bit",
        PagedLion8bit = "paged_lion_8bit",
        Rmsprop = "rmsprop",
        RmspropBnb = "rmsprop_bnb",
        RmspropBnb8bit = "rmsprop_bnb_8bit",
        RmspropBnb32bit = "rmsprop_bnb_32bit",
        GaloreAdamw = "galore_adamw",
        GaloreAdamw8bit = "galore_adamw_8bit",
        GaloreAdafactor = "galore_adafactor",
        GaloreAdamwLayerwise = "galore_adamw_layerwise",
        GaloreAdamw8bitLayerwise = "galore_adamw_8bit_layerwise",
        GaloreAdafactorLayerwise = "galore_adafactor_layerwise",
        Lomo = "lomo",
        Adalomo = "adalomo",
        Grokadamw = "grokadamw",
        ScheduleFreeRadam = "schedule_free_radam",
        ScheduleFreeAdamw = "schedule_free_adamw",
        ScheduleFreeSgd = "schedule_free_sgd",
        ApolloAdamw = "apollo_adamw",
        ApolloAdamwLayerwise = "apollo_adamw_layerwise",
        StableAdamw = "stable_adamw",
    }
}

impl Optim {
    /// The names memgen's AdamW (as `torch.optim.AdamW`) stands for: these stay quiet.
    pub fn is_adamw(self) -> bool {
        matches!(
            self,
            Optim::AdamwTorch | Optim::AdamwTorchFused | Optim::AdamwHf | Optim::Adamw
        )
    }
}

/// `model.device`: `cpu`, `cuda` or `cuda:N`. Written back as given (`cuda` stays `cuda`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA ordinal; `None` is plain `cuda` (device 0).
    Cuda(Option<usize>),
}

impl Device {
    /// What the error lists: `N` stands for a device number.
    pub const ACCEPTED: &'static [&'static str] = &["cpu", "cuda", "cuda:N"];

    /// The candle device (an error when this memgen was built without CUDA).
    pub fn open(self) -> anyhow::Result<candle_core::Device> {
        crate::backbone::parse_device(&self.to_string())
    }
}

impl std::str::FromStr for Device {
    type Err = NotOneOf;
    fn from_str(s: &str) -> Result<Self, NotOneOf> {
        let bad = || NotOneOf {
            got: s.to_string(),
            accepted: Self::ACCEPTED,
        };
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(None)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse().map(|n| Device::Cuda(Some(n))).map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(None) => f.write_str("cuda"),
            Device::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_str(d)
    }
}
