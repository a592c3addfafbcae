//! Run configs: the YAML files under `configs/`, shaped like the original project's (`model`,
//! `datasets`, `run`), with dotted `--options key value` overrides. Unknown keys, wrong types,
//! values out of range and spellings outside a closed set are one-line errors that name the key;
//! contradictory settings are caught before any work starts.
//!
//! - `sections.rs`: the model, run, split and generation sections;
//! - `phases.rs`: the SFT and GRPO settings and the [`TrainingArgs`] they share;
//! - `enums.rs`: the closed sets of spellings; `checked.rs`: one-value rules;
//! - `validate.rs`: rules relating several keys; `ignored.rs`: accepted-but-ignored keys.

mod checked;
mod enums;
mod ignored;
mod phases;
mod sections;
mod validate;

pub use enums::{
    Device, Dtype, IntervalStrategy, LossType, LrScheduler, NotOneOf, Optim, RunMode, TrainMethod,
    TriggerMethod,
};
pub use phases::{GrpoConfig, SftConfig, TrainingArgs};
pub use sections::{
    GenerationConfig, ModelSection, RunSection, SplitSection, TriggerRun, TriggerSection,
    WeaverRun, WeaverSection,
};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::memory::{InsertionConfig, MemGenSpec};
use crate::retrieval::client::RetrievalConfig;
use crate::tasks::TaskConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    /// One entry: the task name, its data and split settings (`mode`, `sft`, `grpo`) and any
    /// task option (`train_path`, `test_path`, `fields`, `limit`, …).
    #[serde(default)]
    pub datasets: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub run: RunSection,
    /// The Search-R1 retriever, for the search tasks.
    #[serde(default)]
    pub retrieval: RetrievalConfig,
}

/// The dataset entry of a run: its name, split settings and the task config built from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub name: String,
    /// Which phase's split settings apply (`datasets.<name>.mode`, default
    /// `run.train_weaver_method`).
    pub mode: TrainMethod,
    pub sft: SplitSection,
    pub grpo: SplitSection,
    pub task: TaskConfig,
}

/// Set `a.b.c = value` in a JSON tree, creating objects on the way; `value` is parsed as YAML so
/// numbers, booleans, null and lists work (`[q_proj, v_proj]`).
fn set_dotted(root: &mut serde_json::Value, key: &str, value: &str) -> anyhow::Result<()> {
    let parsed: serde_json::Value = serde_yaml::from_str(value)
        .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        anyhow::bail!("--options: bad key `{key}`");
    }
    for (i, p) in parts.iter().enumerate() {
        let obj = cur.as_object_mut().ok_or_else(|| {
            anyhow::anyhow!(
                "--options {key}: `{}` is not a section",
                parts[..i].join(".")
            )
        })?;
        if i + 1 == parts.len() {
            obj.insert(p.to_string(), parsed);
            return Ok(());
        }
        cur = obj
            .entry(p.to_string())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if cur.is_null() {
            *cur = serde_json::Value::Object(Default::default());
        }
    }
    Ok(())
}

impl RunConfig {
    /// Read a YAML config, apply `--options` overrides, and check it.
    pub fn load(path: &Path, options: &[(String, String)]) -> anyhow::Result<RunConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::from_yaml(&text, &path.display().to_string(), options)
    }

    pub fn from_yaml(
        text: &str,
        file: &str,
        options: &[(String, String)],
    ) -> anyhow::Result<RunConfig> {
        let mut tree: serde_json::Value =
            serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("{file}: invalid YAML: {e}"))?;
        if tree.is_null() {
            tree = serde_json::Value::Object(Default::default());
        }
        // The original's single `dataset: {name: …}` section maps onto `datasets.<name>`.
        if let Some(obj) = tree.as_object_mut() {
            if let Some(mut ds) = obj.remove("dataset") {
                let name = ds
                    .as_object_mut()
                    .and_then(|o| o.remove("name"))
                    .and_then(|n| n.as_str().map(String::from))
                    .ok_or_else(|| anyhow::anyhow!("{file}: `dataset` needs a `name`"))?;
                obj.insert("datasets".into(), serde_json::json!({ name: ds }));
            }
        }
        for (k, v) in options {
            set_dotted(&mut tree, k, v).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        }
        let cfg: RunConfig = serde_path_to_error::deserialize(&tree).map_err(|e| {
            match e.path().to_string().as_str() {
                // An error about the whole file (a missing `model` section) has no key to name.
                "." => anyhow::anyhow!("{file}: {}", e.inner()),
                at => anyhow::anyhow!("{file}: {at}: {}", e.inner()),
            }
        })?;
        cfg.validate().map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        Ok(cfg)
    }

    /// The run's dataset entry and the task config it describes.
    pub fn dataset(&self) -> anyhow::Result<Dataset> {
        let (name, v) = self
            .datasets
            .iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("datasets: no dataset configured"))?;
        let mut obj = match v {
            serde_json::Value::Object(o) => o.clone(),
            serde_json::Value::Null => Default::default(),
            _ => anyhow::bail!("datasets.{name} must be a mapping"),
        };
        let mode = match obj.remove("mode") {
            None => self.run.train_weaver_method,
            Some(m) => serde_json::from_value(m)
                .map_err(|e| anyhow::anyhow!("datasets.{name}.mode: {e}"))?,
        };
        let split = |v: Option<serde_json::Value>, key: &str| -> anyhow::Result<SplitSection> {
            match v {
                None | Some(serde_json::Value::Null) => Ok(SplitSection::default()),
                Some(v) => serde_path_to_error::deserialize(&v).map_err(|e| {
                    anyhow::anyhow!("datasets.{name}.{key}.{}: {}", e.path(), e.inner())
                }),
            }
        };
        let sft = split(obj.remove("sft"), "sft")?;
        let grpo = split(obj.remove("grpo"), "grpo")?;
        obj.entry("name")
            .or_insert_with(|| serde_json::Value::String(name.clone()));
        obj.entry("seed")
            .or_insert_with(|| serde_json::json!(self.run.seed));
        let val_ratio = match mode {
            TrainMethod::Sft => sft.val_ratio,
            TrainMethod::Grpo => grpo.val_ratio,
        };
        obj.entry("val_ratio")
            .or_insert_with(|| serde_json::json!(val_ratio));
        let task: TaskConfig = serde_path_to_error::deserialize(&serde_json::Value::Object(obj))
            .map_err(|e| anyhow::anyhow!("datasets.{name}.{}: {}", e.path(), e.inner()))?;
        Ok(Dataset {
            name: name.clone(),
            mode,
            sft,
            grpo,
            task,
        })
    }

    /// Where this run writes: `run.output_dir`, else `runs/<dataset>`.
    pub fn output_dir(&self) -> PathBuf {
        self.run.output_dir.clone().unwrap_or_else(|| {
            PathBuf::from("runs").join(
                self.datasets
                    .keys()
                    .next()
                    .cloned()
                    .unwrap_or_else(|| "run".into()),
            )
        })
    }

    /// The MemGen model this config describes. `with_trigger`: build a trainable/active trigger.
    pub fn memgen_spec(&self, with_trigger: bool) -> MemGenSpec {
        let m = &self.model;
        let trigger = with_trigger || m.trigger.active;
        MemGenSpec {
            reasoner_model: m.reasoner_model_name.clone(),
            weaver_model: m.weaver.weaver_model_name.clone(),
            trigger_model: trigger.then(|| {
                m.trigger
                    .trigger_model_name
                    .clone()
                    .unwrap_or_else(|| m.reasoner_model_name.clone())
            }),
            weaver_lora: m.weaver.peft_config.clone(),
            trigger_lora: m.trigger.peft_config.clone(),
            prompt_latents_len: m.weaver.prompt_latents_len,
            inference_latents_len: m.weaver.inference_latents_len,
            insertion: InsertionConfig {
                max_prompt_aug_num: m.max_prompt_aug_num,
                max_inference_aug_num: m.max_inference_aug_num,
                delimiters: m.delimiters.clone(),
            },
            dtype: m.dtype.as_str().to_string(),
            seed: self.run.seed,
        }
    }

    /// The resolved config as YAML (saved as `<output_dir>/config.yaml`).
    pub fn to_yaml(&self) -> anyhow::Result<String> {
        Ok(serde_yaml::to_string(self)?)
    }
}

/// Parse `--options k1 v1 k2 v2 …` into pairs.
pub fn parse_options(words: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    if !words.len().is_multiple_of(2) {
        anyhow::bail!(
            "--options takes key value pairs; `{}` has no value",
            words.last().unwrap()
        );
    }
    Ok(words
        .chunks(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect())
}
