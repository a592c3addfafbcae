//! `memgen eval`: evaluate the reasoner with a trained weaver (or the plain reasoner) on a task's
//! test split, as the original's `eval.sh` does.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use crate::backbone::generate::SamplingConfig;
use crate::config::{parse_options, RunConfig};
use crate::memory::checkpoint::{resolve_checkpoint, Part};
use crate::memory::limits::Budget;
use crate::memory::{MemGenModel, MemGenSpec};
use crate::rollout::episode::EpisodeOptions;
use crate::rollout::eval::{evaluate, EvalSettings};
use crate::tasks::search::SearchEnv;
use crate::tasks::{build_task, Split};

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Run config (YAML), e.g. configs/latent_memory/gsm8k.yaml.
    #[arg(long)]
    pub config: PathBuf,
    /// Config overrides as dotted `key value` pairs (e.g. `model.max_inference_aug_num 3`).
    #[arg(long, num_args = 1.., value_names = ["KEY", "VALUE"])]
    pub options: Vec<String>,
    /// The trained checkpoint: `model.safetensors` (memgen's or the original's) or its directory.
    #[arg(long)]
    pub load_model_path: Option<PathBuf>,
    /// Evaluate the plain reasoner (no memory).
    #[arg(long)]
    pub vanilla: bool,
    /// Evaluate with a freshly initialised weaver when no checkpoint is given (for testing).
    #[arg(long)]
    pub allow_untrained: bool,
    /// Where `evaluate/` goes (default: the config's run.output_dir).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Evaluate the first N test rows (overrides run.generation.max_samples).
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// Rows generated together (overrides run.generation.batch_size).
    #[arg(long)]
    pub batch_size: Option<usize>,
}

/// The model to evaluate: vanilla, a checkpoint, or (only when asked) an untrained weaver.
fn build_model(args: &EvalArgs, cfg: &RunConfig) -> anyhow::Result<(MemGenModel, String)> {
    let device = cfg.model.device.open()?;
    let mut spec = cfg.memgen_spec(false);
    if args.vanilla {
        // Zero-length memories are the plain reasoner exactly, with no weaver compute.
        spec.prompt_latents_len = 0;
        spec.inference_latents_len = 0;
        spec.trigger_model = None;
        return Ok((MemGenModel::build(&spec, &device)?, "vanilla".into()));
    }
    let path = args
        .load_model_path
        .clone()
        .or_else(|| cfg.model.load_model_path.clone());
    let Some(path) = path else {
        if !args.allow_untrained {
            anyhow::bail!(
                "no trained weaver: pass --load-model-path <checkpoint>, or --vanilla for the plain reasoner (--allow-untrained evaluates a random weaver)"
            );
        }
        eprintln!("warning: evaluating an untrained weaver (seeded random initialisation)");
        return Ok((MemGenModel::build(&spec, &device)?, "untrained".into()));
    };
    let (file, saved) = resolve_checkpoint(&path)?;
    if let Some(saved) = saved {
        // The checkpoint fixes the architecture; the run config sets the eval-time insertion caps.
        let wanted = spec.reasoner_model.clone();
        spec = MemGenSpec {
            insertion: spec.insertion,
            dtype: spec.dtype,
            trigger_model: saved.trigger_model.clone().or(spec.trigger_model),
            ..saved
        };
        if wanted != "default" && wanted != spec.reasoner_model {
            eprintln!(
                "warning: using the checkpoint's reasoner `{}` (the config names `{wanted}`)",
                spec.reasoner_model
            );
        }
    }
    let m = MemGenModel::build(&spec, &device)?;
    let mut parts = vec![Part::Weaver];
    if m.trigger.is_some() {
        parts.push(Part::Trigger);
    }
    let missing = m.load_weights(&file, &parts)?;
    let weaver_missing = missing
        .iter()
        .filter(|k| !k.starts_with("trigger."))
        .count();
    let weaver_keys = m
        .named_vars()
        .iter()
        .filter(|(_, _, p)| *p == Part::Weaver)
        .count();
    if weaver_missing == weaver_keys {
        anyhow::bail!("{}: holds no weaver tensors", file.display());
    }
    if !missing.is_empty() {
        eprintln!(
            "warning: {} trainable tensors not in {} (left at their initial values), e.g. {}",
            missing.len(),
            file.display(),
            missing[0]
        );
    }
    Ok((m, file.display().to_string()))
}

/// Every test prompt is checked against the contexts before the first batch runs, so an
/// over-long row fails the run at once rather than after hours of answers. The budget is the
/// prompt + `max_new_tokens` + the latents one turn may insert. A multi-turn episode also grows by
/// its observations, which are not known yet: its later turns are checked by the generation guard
/// as they come.
fn check_prompts_fit(
    model: &MemGenModel,
    samples: &[crate::tasks::Sample],
    max_new_tokens: usize,
) -> anyhow::Result<()> {
    let ins = &model.spec.insertion;
    let latents = model.latent_budget(ins.max_prompt_aug_num > 0, ins.max_inference_aug_num);
    for s in samples {
        let prompt = model
            .tokenizer
            .encode(&crate::tasks::render_chatml(&s.messages, true))?;
        let budget = Budget {
            tokens: prompt.len(),
            new_tokens: max_new_tokens,
            latents,
        };
        model.check_fits(&format!("test row {}", s.id), budget)?;
    }
    Ok(())
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    if args.vanilla && args.load_model_path.is_some() {
        anyhow::bail!("--vanilla and --load-model-path exclude each other");
    }
    if args.batch_size == Some(0) {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let options = parse_options(&args.options)?;
    let cfg = RunConfig::load(&args.config, &options)?;
    cfg.warn_ignored_keys();
    let ds = cfg.dataset()?;
    let task = build_task(&ds.task)?;
    let gen = &cfg.run.generation;
    let max_samples = args.max_samples.or(gen.max_samples);
    let mut samples = task.load(Split::Test)?;
    if let Some(n) = max_samples {
        samples.truncate(n);
    }
    if samples.is_empty() {
        anyhow::bail!("no test samples for {} (check test_path)", ds.name);
    }
    let (model, model_desc) = build_model(&args, &cfg)?;
    check_prompts_fit(&model, &samples, gen.max_new_tokens)?;

    let env = if task.multi_turn() {
        Some(SearchEnv::over_http(
            &cfg.retrieval,
            &ds.task,
            gen.max_turns,
            gen.max_obs_tokens,
            model.tokenizer.clone(),
        )?)
    } else {
        None
    };

    let dir = args
        .output_dir
        .clone()
        .unwrap_or_else(|| cfg.output_dir())
        .join("evaluate");
    let mut info = BTreeMap::new();
    info.insert("task".into(), serde_json::json!(ds.name));
    info.insert("model".into(), serde_json::json!(model_desc));
    info.insert(
        "reasoner".into(),
        serde_json::json!(model.spec.reasoner_model),
    );
    info.insert(
        "max_new_tokens".into(),
        serde_json::json!(gen.max_new_tokens),
    );
    info.insert("temperature".into(), serde_json::json!(gen.temperature));
    info.insert("top_p".into(), serde_json::json!(gen.top_p));
    info.insert("top_k".into(), serde_json::json!(gen.top_k));
    info.insert("max_turns".into(), serde_json::json!(gen.max_turns));
    info.insert(
        "trigger_do_sample".into(),
        serde_json::json!(gen.trigger_do_sample),
    );
    info.insert(
        "insertion".into(),
        serde_json::to_value(&model.spec.insertion)?,
    );
    info.insert(
        "latents".into(),
        serde_json::json!([
            model.spec.prompt_latents_len,
            model.spec.inference_latents_len
        ]),
    );
    let settings = EvalSettings {
        batch_size: args.batch_size.unwrap_or(gen.batch_size).max(1),
        sampling: SamplingConfig {
            temperature: gen.temperature,
            top_p: gen.top_p,
            top_k: gen.top_k,
            max_new_tokens: gen.max_new_tokens,
            seed: cfg.run.seed,
        },
        episode: EpisodeOptions {
            // Greedy tokens with a sampling trigger: its decisions at temperature 1.
            decision_temperature: (gen.trigger_do_sample && gen.temperature <= 0.0).then_some(1.0),
            ..EpisodeOptions::from_model(&model, gen.max_turns, cfg.run.seed)
        },
        dir: dir.clone(),
        info,
    };
    // First SIGINT/SIGTERM: finish the batch in flight (its rows are kept), then stop with exit
    // code 128 + signal; a second one exits at once (after a row write in progress).
    crate::signals::install("finishing the current batch, then stopping");
    let metrics = evaluate(&model, task.as_ref(), &samples, env.as_ref(), &settings)?;
    if crate::distributed::world().is_root() {
        println!("{}", serde_json::to_string(&metrics)?);
        eprintln!("eval: wrote {}", dir.display());
    }
    Ok(())
}
